"""The manifest's tensor entries (docs/format.md sections 3, 3.1 and 3.2), and the exact-members
type check every member of the manifest goes through."""

from __future__ import annotations

import itertools
import math
import operator
from typing import Any

from . import dtypes
from .datafile import FormatError
from .views import check_views

MAX_TENSOR_BYTES = 1 << 62
MAX_DIMS = 64  # dimensions of a tensor (format.md section 3)
PER_RANK_TENSORS = "per-rank-tensors"
"""Feature: tensor entries may be ``per_rank``, one row per rank (format.md section 3.1)."""
_TENSOR = {
    "key": str,
    "dtype": str,
    "shape": list,
    "kind": str,
    "device": str,
    "requires_grad": bool,
    "parameter": bool,
}


def typed(obj: Any, spec: dict, what: str, exact: bool = True) -> None:
    if not isinstance(obj, dict):
        raise FormatError(f"{what} is not an object")
    if exact and set(obj) != set(spec):
        raise FormatError(f"{what} has members {sorted(obj)}, expected {sorted(spec)}")
    for k, t in spec.items():
        v = obj.get(k)
        if t is int or (isinstance(t, tuple) and int in t):
            if isinstance(v, bool) or not isinstance(v, t):
                raise FormatError(f"{what}.{k} has the wrong type")
        elif not isinstance(v, t):
            raise FormatError(f"{what}.{k} has the wrong type")


def validate_tensors(tensors: list, world_size: int, per_rank: bool, views: bool = False) -> None:
    """Check ``manifest.tensors`` (format.md sections 3.1 and 3.2). A view's ``view`` member is
    checked once every entry is (it names another entry)."""
    entries = [_without_view(t) for t in tensors] if views else tensors
    if not _plain_tensors(entries):
        _validate_each(entries, world_size, per_rank)
    if views:
        check_views(tensors)


def _without_view(t: Any) -> Any:
    return {k: v for k, v in t.items() if k != "view"} if type(t) is dict and "view" in t else t


def _validate_each(tensors: list, world_size: int, per_rank: bool) -> None:
    """``_validate_tensors``'s checks one entry at a time, naming the first that fails."""
    keys = set()
    for i, t in enumerate(tensors):
        if per_rank and isinstance(t, dict) and "per_rank" in t:
            if t["per_rank"] is not True:
                raise FormatError(f"manifest.tensors[{i}].per_rank is not true")
            t = {k: v for k, v in t.items() if k != "per_rank"}
            shape = t.get("shape")
            if not isinstance(shape, list) or not shape or shape[0] != world_size:
                raise FormatError(
                    f"manifest.tensors[{i}] is per-rank but its first dimension is not world_size"
                )
        if not _plain_tensor(t):  # the exact error for whatever is not
            typed(t, _TENSOR, f"manifest.tensors[{i}]")
        size = dtypes.elem_size(t["dtype"])
        if size is None:
            raise FormatError(f"tensor {t['key']!r} has unknown dtype {t['dtype']!r}")
        if t["kind"] not in ("torch", "numpy"):
            raise FormatError(f"tensor {t['key']!r} has unknown kind {t['kind']!r}")
        shape = t["shape"]
        if not _naturals(shape):
            raise FormatError(f"tensor {t['key']!r} has an invalid shape")
        if len(shape) > MAX_DIMS:
            raise FormatError(f"tensor {t['key']!r} has more than {MAX_DIMS} dimensions")
        if _extent(shape) * size > MAX_TENSOR_BYTES:
            # beyond any file system; also keeps the index checks' int64 arithmetic exact, and
            # every stride of an empty tensor too (numpy and torch refuse larger ones)
            raise FormatError(f"tensor {t['key']!r} is larger than 2**62 bytes")
        if t["key"] in keys:
            raise FormatError(f"tensor key {t['key']!r} appears twice")
        keys.add(t["key"])


_TENSOR_VALUES = operator.itemgetter(*_TENSOR)
_TENSOR_TYPES = tuple(_TENSOR.values())
assert int not in _TENSOR_TYPES  # else _plain_tensor would have to refuse bools as _typed does


def _plain_tensor(t: Any) -> bool:
    """Whether ``typed(t, _TENSOR, ...)`` passes, checked at C speed for the one tensor entry
    of a manifest of many (False: let ``_typed`` name what is wrong)."""
    return (
        type(t) is dict
        and t.keys() == _TENSOR.keys()
        and all(map(isinstance, _TENSOR_VALUES(t), _TENSOR_TYPES))
    )


def _plain_tensors(tensors: list) -> bool:
    """Whether every entry passes ``_validate_tensors`` without ``per_rank``: the same checks,
    each over a column at C speed (False: the loop there finds and names what is wrong)."""
    if not tensors:
        return True
    if set(map(type, tensors)) != {dict} or set(map(len, tensors)) != {len(_TENSOR)}:
        return False
    try:  # every member present, and no other (the counts are equal)
        columns = {k: list(map(operator.itemgetter(k), tensors)) for k in _TENSOR}
    except KeyError:
        return False
    if any(set(map(type, columns[k])) != {t} for k, t in _TENSOR.items()):
        return False  # JSON gives exact types; anything else is for the loop to judge
    keys, names, shapes = columns["key"], columns["dtype"], columns["shape"]
    if not set(names) <= dtypes.SIZES.keys() or not set(columns["kind"]) <= {"torch", "numpy"}:
        return False
    flat = list(itertools.chain.from_iterable(shapes))
    if flat and (set(map(type, flat)) != {int} or min(flat) < 0):
        return False
    dims = max(map(len, shapes))
    if dims > MAX_DIMS:
        return False
    # No tensor has more bytes than the largest dimension to the most dimensions of the widest
    # element; only where that bound passes the limit is each tensor's size needed.
    widest = max(map(dtypes.SIZES.__getitem__, set(names)))
    if (max(flat, default=0) ** dims) * widest > MAX_TENSOR_BYTES and max(
        map(operator.mul, map(_extent, shapes), map(dtypes.SIZES.__getitem__, names))
    ) > (MAX_TENSOR_BYTES):
        return False
    return len(set(keys)) == len(keys)


def _extent(shape: list) -> int:
    """The elements ``shape`` would have with every 0 read as 1: its size, or for an empty
    tensor the size its largest stride implies."""
    return math.prod(n or 1 for n in shape)


def _naturals(shape: list) -> bool:
    """Whether every entry of ``shape`` is an int (not a bool) >= 0."""
    if set(map(type, shape)) <= {int}:
        return not shape or min(shape) >= 0
    return all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
