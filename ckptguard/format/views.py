"""Views of a stored tensor's bytes (feature ``tensor-views``, docs/format.md section 3.2).

A view is a tensor entry with a ``view`` member and no index rows: its elements are read from
the raw bytes of another entry, its storage, at an element offset and element strides. Every
check that keeps a view inside its storage's bytes is here, in pure Python integers, so that a
reader builds no view a hostile manifest could point outside its memory.
"""

from __future__ import annotations

import math
from typing import Any

from . import dtypes
from .datafile import FormatError

TENSOR_VIEWS = "tensor-views"
"""Feature: tensor entries may be views of another entry's bytes (format.md section 3.2)."""
VIEW_MEMBERS = frozenset({"storage", "offset", "stride"})
MAX_STEP = 1 << 62
"""The most bytes an offset or stride may step (times the element size): within int64 however
torch or numpy combine them, also where the view has no elements or a dimension of length 1
(which the bound on its reach does not limit)."""


def is_view(entry: dict) -> bool:
    """Whether a manifest tensor entry is a view (has no bytes of its own)."""
    return "view" in entry


def storage_of(entry: dict) -> int | None:
    """The tensor id whose bytes a view reads, or None for an entry that is no view."""
    view = entry.get("view")
    return None if view is None else view["storage"]


def storage_bytes(entry: dict) -> int:
    """The raw bytes of a tensor entry: its elements in C order (section 5)."""
    return math.prod(entry["shape"]) * dtypes.SIZES[entry["dtype"]]


def extent(shape: list[int], offset: int, stride: list[int]) -> int:
    """The elements a view reaches from its storage's start: one past its last element's index
    (``offset`` for a view without elements)."""
    if 0 in shape:
        return offset
    return offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) + 1


def _natural(v: Any, limit: int) -> bool:
    return type(v) is int and 0 <= v <= limit


def check_views(tensors: list[dict]) -> None:
    """Check every view entry of ``manifest.tensors`` (section 3.2): its ``view`` member, its
    storage (an entry that is no view and not per-rank, of its kind and device), and that each
    element lies inside the storage's raw bytes. FormatError naming the entry otherwise."""
    for i, t in enumerate(tensors):
        if "view" not in t:
            continue
        view = t["view"]
        where = f"manifest.tensors[{i}] ({t['key']!r}).view"
        if type(view) is not dict or view.keys() != VIEW_MEMBERS:
            raise FormatError(f"{where} is not an object of {sorted(VIEW_MEMBERS)}")
        sid, offset, stride = view["storage"], view["offset"], view["stride"]
        if type(sid) is not int or not 0 <= sid < len(tensors) or sid == i:
            raise FormatError(f"{where}.storage is not the id of another tensor")
        most = MAX_STEP // dtypes.SIZES[t["dtype"]]
        if not _natural(offset, most):
            raise FormatError(f"{where}.offset is not an integer in [0, 2**62 / element size]")
        if (
            type(stride) is not list
            or len(stride) != len(t["shape"])
            or not all(_natural(s, most) for s in stride)
        ):
            raise FormatError(
                f"{where}.stride is not one integer in [0, 2**62 / element size] per dimension"
            )
        if math.prod(n for n in t["shape"] if n) * dtypes.SIZES[t["dtype"]] > MAX_STEP:
            raise FormatError(f"{where}: its shape's nonzero lengths hold over 2**62 bytes")
        s = tensors[sid]
        if "view" in s or "per_rank" in s or "per_rank" in t:
            raise FormatError(f"{where}: a view's storage and the view itself are plain tensors")
        if s["kind"] != t["kind"] or s["device"] != t["device"]:
            raise FormatError(f"{where}: its storage {s['key']!r} is of another kind or device")
        end = extent(t["shape"], offset, stride) * dtypes.SIZES[t["dtype"]]
        if end > storage_bytes(s):
            raise FormatError(
                f"{where} reaches byte {end} of its storage {s['key']!r}, which holds "
                f"{storage_bytes(s)}"
            )


def without_views(tensors: list[dict]) -> list[dict]:
    """``tensors`` as the index covers them: a view holds no bytes of its own (one dimension of
    length 0 in its place, so that no row may belong to it and none is needed)."""
    return [{**t, "shape": [0]} if "view" in t else t for t in tensors]
