"""Rebuild an object from its stored JSON tree and tensors, and check stored trees, without
pickle unless the caller opted in (docs/format.md section 6; ``tree`` is the save side).

The value ranges of the tree (depth, integer digits, the dtypes by name) are defined here, where
a stored tree is judged, and the save side writes within them.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import enum
import math
import pathlib
import pickle
import re
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from . import quantized, treemaps, treetypes
from .errors import RegisteredTypeError
from .format import dtypes
from .format.entries import MAX_DIMS, MAX_TENSOR_BYTES
from .treemaps import METADATA, MetadataError
from .treemaps import join as join
from .treetypes import NUMPY_BY_NAME as NUMPY_BY_NAME

MAX_DEPTH = 512
# Trees up to MAX_DEPTH are valid, and flattening, JSON and rebuilding each recurse a few frames
# per level: make sure Python allows that (only ever raised, never lowered).
_RECURSION_NEEDED = 8 * MAX_DEPTH + 1000
if sys.getrecursionlimit() < _RECURSION_NEEDED:
    sys.setrecursionlimit(_RECURSION_NEEDED)
I64 = 1 << 63
# Digits of a ``$int`` (Python's default limit on int <-> str conversion, fixed here so that a
# tree's validity does not depend on the interpreter's setting).
MAX_INT_DIGITS = 4300
INT_LIMIT = 10**MAX_INT_DIGITS
_INT_RE = re.compile(r"-?[1-9][0-9]*")  # canonical decimal: no sign on zero, no leading zeros
_HEX_RE = re.compile(r"[0-9a-f]*")
_DEVICE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}(:(0|[1-9][0-9]{0,8}))?")  # str(torch.device)

TORCH_DTYPES: dict[torch.dtype, str] = {
    getattr(torch, n): n for n in dtypes.SIZES if isinstance(getattr(torch, n, None), torch.dtype)
}
TORCH_BY_NAME = {v: k for k, v in TORCH_DTYPES.items()}
# The path classes a tree names: a concrete path loads as the loading system's ``Path``.
PATH_CLASSES: dict[str, type] = {
    "Path": pathlib.Path,
    "PurePosixPath": pathlib.PurePosixPath,
    "PureWindowsPath": pathlib.PureWindowsPath,
}
# The parts of a sparse tensor, by layout: the names in its parts' key paths, in stored order.
SPARSE_PARTS = {
    torch.sparse_coo: ("indices", "values"),
    torch.sparse_csr: ("crow_indices", "col_indices", "values"),
}
_SPARSE_LAYOUTS = {"coo": torch.sparse_coo, "csr": torch.sparse_csr}
_MEMBERS = {
    "$sparse": {"$sparse", "shape", "parts", "coalesced"},
    "$structured": {"$structured", "shape", "data"},
    "$npscalar": {"$npscalar", "hex"},
    "$path": {"$path", "class"},
    "$enum": {"$enum", "name"},
    "$dataclass": {"$dataclass", "fields"},
    "$namedtuple": {"$namedtuple", "fields"},
    "$meta": {"$meta", "shape", "requires_grad", "parameter"},
    "$quantized": quantized.MEMBERS,
}


def meta_fits(shape: list[int], dtype: str) -> bool:
    """Whether a meta tensor's shape is storable: its nonzero entries' product times the dtype's
    size is at most 2**62 bytes (torch's own stride arithmetic stays within int64)."""
    return math.prod(d for d in shape if d) * dtypes.SIZES[dtype] <= MAX_TENSOR_BYTES


class TreeError(ValueError):
    """The stored tree is malformed (the reader turns this into CorruptCheckpointError)."""


class _Pickled(enum.Enum):
    """What rebuilding a tree does with a ``$pickle`` value."""

    REFUSE = "refuse"  # TreeError: the caller did not opt in
    LOAD = "load"  # unpickle: the caller opted in at save and at load
    CHECK = "check"  # check its base64 only and build None (validation builds nothing)


@dataclasses.dataclass(frozen=True)
class _EnumName:
    """A checked ``$enum`` (its class unknown to the check): equal exactly when stored alike,
    and to no other value, so set elements and keys compare as the stored tree says."""

    cls: str
    name: str


class _Unregistered(Exception):
    """A registered-type node this process cannot rebuild; ``unflatten`` adds its key path."""

    def __init__(self, message: str, node: dict, name: str, hint: bool = True) -> None:
        super().__init__(message)
        self.node, self.name, self.hint = node, name, hint


def unflatten(tree: Any, tensors: list[Any], allow_pickle: bool = False, types: bool = True) -> Any:
    """Rebuild the object from its JSON tree and the loaded tensors (indexed by id). ``types``:
    the checkpoint lists the feature ``tree-types`` (else its tags are refused)."""
    b = _Builder(tensors, _Pickled.LOAD if allow_pickle else _Pickled.REFUSE, types)
    try:
        return b.build(tree, 0)
    except MetadataError as e:
        raise _located(tree, e) from None
    except _Unregistered as e:
        where = node_path(tree, e.node) or "<root>"
        hint = f": {treetypes.how_to_register(e.name)}" if e.hint else ""
        raise RegisteredTypeError(f"{e} at {where!r}{hint}", where, e.name) from None


def check_tree(tree: Any, n_tensors: int, depth: int = 0, types: bool = True) -> None:
    """Validate a stored tree's structure without building pickled objects or registered
    classes (``depth``: the nesting depth of ``tree`` when it is a value inside a larger tree;
    ``types``: the checkpoint lists the feature ``tree-types``)."""
    try:
        _Builder([None] * n_tensors, _Pickled.CHECK, types).build(tree, depth)
    except MetadataError as e:
        raise _located(tree, e) from None


def _located(tree: Any, e: MetadataError) -> TreeError:
    return TreeError(f"{e} at {node_path(tree, e.node) or '<root>'!r}")


def node_path(tree: Any, target: dict) -> str:
    """The key path (format.md section 6) of the JSON value ``target`` (by identity) in
    ``tree``, or "" where it is the root or not found."""
    stack: list[tuple[Any, str]] = [(tree, "")]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if isinstance(node, list):
            stack.extend((x, join(path, i)) for i, x in enumerate(node))
        elif isinstance(node, dict) and node:
            tag = next(iter(node))
            v = node[tag]
            if not tag.startswith("$"):
                stack.extend((x, join(path, k)) for k, x in node.items())
            elif tag in ("$dict", "$odict"):  # a key (an $enum, say) is at its value's path
                stack.extend(treemaps.node_children(node, path) or ())
            elif tag in ("$dataclass", "$namespace", "$namedtuple"):
                stack.append((node.get("fields", v), path))
            elif tag in ("$sparse", "$structured"):
                continue
            elif isinstance(v, list):
                stack.extend((x, join(path, i)) for i, x in enumerate(v))
    return ""


def key_path(parts: Iterable[Any]) -> str:
    """The key ``tree.flatten`` gives a tensor reached through the dict keys and list indices
    ``parts``: the parts escaped and joined by "/"; "$root" for none."""
    path = ""
    for k in parts:
        path = join(path, k)
    return path or "$root"


def _b64(tag: str, v: Any) -> bytes:
    """Canonical base64 (RFC 4648 section 4, padded, zero pad bits): one text per byte string."""
    if not isinstance(v, str):
        raise TreeError(f"{tag} is not a string")
    try:
        blob = base64.b64decode(v, validate=True)
    except ValueError:
        raise TreeError(f"{tag} is not base64") from None
    if base64.b64encode(blob).decode() != v:
        raise TreeError(f"{tag} is not canonical base64 (padding or pad bits)")
    return blob


class _Builder:
    """One rebuild (or check) of a stored tree."""

    def __init__(self, tensors: list[Any], pickled: _Pickled, types: bool) -> None:
        self.tensors = tensors
        self.pickled = pickled
        self.types = types
        self.quantized_seen: dict[str, Any] = {}  # canonical text -> its quantized tensor

    def build(self, node: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise TreeError("tree nested too deeply")
        if type(node) is dict and len(node) == 1:  # a tensor reference (most nodes of a state)
            v = node.get("$tensor")
            if type(v) is int and 0 <= v < len(self.tensors):
                return self.tensors[v]
        if node is None or isinstance(node, (bool, str)):
            return node
        if type(node) is int:
            if not -I64 <= node < I64:
                raise TreeError("integer outside int64 in tree (must be $int)")
            return node
        if type(node) is float:
            if not math.isfinite(node):  # a JSON number beyond float range, such as 1e400
                raise TreeError("non-finite number in tree (must be $float)")
            return node
        if isinstance(node, list):
            return [self.build(v, depth + 1) for v in node]
        if not isinstance(node, dict):
            raise TreeError(f"unexpected JSON value {type(node).__name__} in tree")
        tags = [k for k in node if k.startswith("$")]
        if not tags:
            return {k: self.build(v, depth + 1) for k, v in node.items()}
        tag = tags[0]
        members = set(node)
        mapping_with_metadata = tag in ("$dict", "$odict") and members == {tag, METADATA}
        if members != _MEMBERS.get(tag, {tag}) and not mapping_with_metadata:
            raise TreeError(f"tagged value {tag} has unexpected members")
        try:
            if tag in _TYPED:
                if not self.types:
                    raise TreeError(f"{tag} in a tree without the feature tree-types")
                return _TYPED[tag](self, node[tag], node, depth + 1)
            return self.tagged(tag, node[tag], node, depth + 1)
        except (TypeError, ValueError, KeyError, IndexError, OverflowError) as e:
            if isinstance(e, (TreeError, MetadataError)):
                raise
            raise TreeError(f"malformed {tag} value in tree: {e}") from None

    def tagged(self, tag: str, v: Any, node: dict, sub: int) -> Any:
        """A value of one of the tags every version-1 reader knows."""
        if tag == "$tensor":
            if type(v) is not int or not 0 <= v < len(self.tensors):
                raise TreeError("tensor reference out of range")
            return self.tensors[v]
        if tag == "$tuple":
            if not isinstance(v, list):
                raise TreeError("$tuple is not a list")
            return tuple(self.build(x, sub) for x in v)
        if tag in ("$dict", "$odict"):
            return treemaps.decode(self, tag, node, sub)
        if tag == "$int":
            if (
                not isinstance(v, str)
                or len(v.lstrip("-")) > MAX_INT_DIGITS
                or not _INT_RE.fullmatch(v)
            ):
                raise TreeError(
                    f"$int is not a canonical decimal of at most {MAX_INT_DIGITS} digits"
                )
            n = int(v)
            if -I64 <= n < I64:
                raise TreeError(f"$int {v} is within int64 (must be a JSON number)")
            return n
        if tag == "$float":
            if v not in ("inf", "-inf", "nan"):
                raise TreeError("$float is not inf, -inf or nan")
            return float(v)
        if tag == "$bytes":
            return _b64(tag, v)
        if tag == "$npscalar":
            dt = NUMPY_BY_NAME[v].newbyteorder("<")
            hx = node["hex"]
            if not isinstance(hx, str) or len(hx) != 2 * dt.itemsize or not _HEX_RE.fullmatch(hx):
                raise TreeError(f"$npscalar hex is not {2 * dt.itemsize} lowercase hex digits")
            return np.frombuffer(bytes.fromhex(hx), dtype=dt)[0].astype(NUMPY_BY_NAME[v])
        if tag == "$dtype":  # a quantized dtype's name needs the feature tree-types
            return (
                TORCH_BY_NAME[v] if v in TORCH_BY_NAME or not self.types else quantized.QDTYPES[v]
            )
        if tag == "$size":
            if not isinstance(v, list) or not all(type(x) is int and 0 <= x < I64 for x in v):
                raise TreeError("$size is not a list of integers in [0, 2**63)")
            return torch.Size(v)
        if tag == "$device":
            if not isinstance(v, str) or not _DEVICE_RE.fullmatch(v):
                raise TreeError("$device is not a device type with an optional canonical index")
            try:
                return torch.device(v)
            except RuntimeError as e:  # torch's error for a string that names no device
                raise TreeError(f"$device {v[:100]!r} is not a device: {e}") from None
        if tag == "$pickle":
            blob = _b64(tag, v)
            if self.pickled is _Pickled.CHECK:
                return None
            if self.pickled is _Pickled.REFUSE:
                raise TreeError("tree holds a pickled object but allow_pickle is off")
            return pickle.loads(blob)  # _Pickled.LOAD: the caller opted in at save and load
        raise TreeError(f"unknown tag {tag} in tree")

    def hashable(self, node: Any, sub: int, what: str) -> Any:
        """A set element or a non-str, non-int dict key: built, then of a shape that
        ``treetypes.hashable_node`` allows."""
        if not self.types:
            raise TreeError(f"{what} in tree is not a string or integer")
        value = self.build(node, sub)
        if not treetypes.hashable_node(node):
            raise TreeError(f"{what} in tree is not a hashable value (format.md section 6.2)")
        return value

    def elements(self, tag: str, v: Any, sub: int) -> list:
        """The elements of a ``$set``/``$frozenset``: distinct, in canonical JSON text order."""
        if not isinstance(v, list):
            raise TreeError(f"{tag} is not a list")
        out = [self.hashable(x, sub, f"{tag} element") for x in v]
        texts = [treetypes.element_text(x) for x in v]
        if any(a >= b for a, b in zip(texts, texts[1:], strict=False)):
            raise TreeError(f"{tag} elements are not in canonical order")
        if len(set(out)) != len(out):
            raise TreeError(f"{tag} has two equal elements")
        return out

    def floats(self, v: Any, sub: int) -> complex:
        if not isinstance(v, list) or len(v) != 2:
            raise TreeError("$complex is not [real, imag]")
        re_, im = (self.build(x, sub) for x in v)
        if type(re_) is not float or type(im) is not float:
            raise TreeError("$complex parts are not floats")
        return complex(re_, im)

    def slice_(self, v: Any, sub: int) -> slice:
        if not isinstance(v, list) or len(v) != 3:
            raise TreeError("$slice is not [start, stop, step]")
        return slice(*(self.build(x, sub) for x in v))

    def path(self, v: Any, node: dict, sub: int) -> Any:
        cls = PATH_CLASSES.get(node["class"]) if isinstance(node["class"], str) else None
        if cls is None or not isinstance(v, str) or not v:
            raise TreeError("$path is not a non-empty string and a path class")
        p = cls(v)
        if cls is not pathlib.Path and str(p) != v:
            raise TreeError(f"$path {v[:100]!r} is not the canonical text of a {cls.__name__}")
        return p

    def namespace(self, v: Any, sub: int) -> argparse.Namespace:
        d = self.build(v, sub)
        if type(d) is not dict or not all(type(k) is str for k in d):
            raise TreeError("$namespace is not a mapping of str keys")
        return argparse.Namespace(**d)

    def meta(self, v: Any, node: dict, sub: int) -> Any:
        shape, grad, param = node["shape"], node["requires_grad"], node["parameter"]
        if v not in TORCH_BY_NAME or type(grad) is not bool or type(param) is not bool:
            raise TreeError("$meta is not a dtype name with boolean requires_grad, parameter")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < I64 for d in shape):
            raise TreeError("$meta shape is not a list of integers in [0, 2**63)")
        if len(shape) > MAX_DIMS or not meta_fits(shape, v):
            raise TreeError(f"$meta shape has over {MAX_DIMS} entries or over 2**62 bytes")
        t = torch.empty(shape, dtype=TORCH_BY_NAME[v], device="meta")
        if grad and not (t.is_floating_point() or t.is_complex()):
            raise TreeError(f"$meta of dtype {v} cannot require grad")
        return torch.nn.Parameter(t, requires_grad=grad) if param else t.requires_grad_(grad)

    def sparse(self, v: Any, node: dict, depth: int) -> Any:
        """A sparse tensor from its part tensors (references, which add no level); torch checks
        the indices against the shape (and the order that ``coalesced`` claims)."""
        layout = _SPARSE_LAYOUTS.get(v) if isinstance(v, str) else None
        shape, parts, coalesced = node["shape"], node["parts"], node["coalesced"]
        if layout is None or type(coalesced) is not bool or (coalesced and v != "coo"):
            raise TreeError("$sparse is not coo or csr with a boolean coalesced (csr: false)")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < I64 for d in shape):
            raise TreeError("$sparse shape is not a list of integers in [0, 2**63)")
        if len(shape) > MAX_DIMS:
            raise TreeError(f"$sparse shape has over {MAX_DIMS} entries")
        if (
            not isinstance(parts, list)
            or len(parts) != len(SPARSE_PARTS[layout])
            or not all(type(p) is dict and set(p) == {"$tensor"} for p in parts)
        ):
            raise TreeError(f"$sparse {v} parts are not {len(SPARSE_PARTS[layout])} tensors")
        ts = [self.build(p, depth) for p in parts]
        if self.pickled is _Pickled.CHECK:
            return None
        if not all(isinstance(t, torch.Tensor) and t.layout == torch.strided for t in ts):
            raise TreeError("$sparse parts are not dense torch tensors")
        try:
            if layout == torch.sparse_coo:
                idx, values = ts
                return torch.sparse_coo_tensor(
                    idx, values, shape, is_coalesced=coalesced, check_invariants=True
                )
            crow, col, values = ts
            return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=True)
        except RuntimeError as e:
            raise TreeError(f"$sparse {v} tensor is not consistent: {e}") from None

    def structured(self, v: Any, node: dict, depth: int) -> Any:
        """A numpy array of a structured dtype from its packed little-endian bytes (a uint8
        array referenced as ``data``, which adds no level)."""
        shape, data = node["shape"], node["data"]
        if (
            not isinstance(v, list)
            or not v
            or not all(isinstance(f, list) and len(f) == 2 for f in v)
            or not all(type(n) is str and n and d in NUMPY_BY_NAME for n, d in v)
            or len({n for n, _ in v}) != len(v)
        ):
            raise TreeError("$structured is not a list of distinct [name, numpy dtype] fields")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < I64 for d in shape):
            raise TreeError("$structured shape is not a list of integers in [0, 2**63)")
        if len(shape) > MAX_DIMS or type(data) is not dict or set(data) != {"$tensor"}:
            raise TreeError(f"$structured has over {MAX_DIMS} dimensions or no tensor as data")
        raw = self.build(data, depth)
        if self.pickled is _Pickled.CHECK:
            return None
        stored = np.dtype([(n, NUMPY_BY_NAME[d].newbyteorder("<")) for n, d in v])
        if (
            not isinstance(raw, np.ndarray)
            or raw.dtype != np.uint8
            or raw.shape != (math.prod(shape) * stored.itemsize,)
        ):
            raise TreeError("$structured data is not a uint8 array of its shape's bytes")
        native = np.dtype([(n, NUMPY_BY_NAME[d]) for n, d in v])
        return np.ascontiguousarray(raw).view(stored).reshape(shape).astype(native)

    def quantized(self, v: Any, node: dict, depth: int) -> Any:
        """A ``$quantized`` value; equal ones (one tensor reached twice) build one tensor."""
        text = treetypes.element_text(node)
        seen = self.quantized_seen.get(text)
        if seen is None:
            check = self.pickled is _Pickled.CHECK
            seen = quantized.build(v, node, lambda x: self.build(x, depth), check)
            self.quantized_seen[text] = seen
        return seen

    def registered(self, tag: str, v: Any, node: dict, sub: int) -> Any:
        """A ``$dataclass``, ``$enum`` or ``$namedtuple``: its class looked up by name among
        those registered, never imported; checking builds its fields only."""
        if not isinstance(v, str):
            raise TreeError(f"{tag} is not a class name")
        if tag == "$enum":
            if not isinstance(node["name"], str):
                raise TreeError("$enum name is not a string")
        else:
            fields = self.build(node["fields"], sub)
            if tag == "$dataclass" and (
                type(fields) is not dict or not all(type(k) is str for k in fields)
            ):
                raise TreeError("$dataclass fields are not a mapping of str keys")
            if tag == "$namedtuple" and not isinstance(node["fields"], list):
                raise TreeError("$namedtuple fields are not a list")
        if self.pickled is _Pickled.CHECK:  # equal exactly when stored alike, as set elements
            return _EnumName(v, node["name"]) if tag == "$enum" else None
        cls: Any = treetypes.lookup(v)
        if cls is None or treetypes.tag_of(cls) != tag:
            raise _Unregistered(f"class {v} ({tag[1:]}) is not registered", node, v)
        if tag == "$enum":
            if node["name"] not in cls.__members__:
                raise _Unregistered(f"enum {v} has no member {node['name'][:100]!r}", node, v)
            return cls[node["name"]]
        names = treetypes.init_fields(cls) if tag == "$dataclass" else list(cls._fields)
        stored = list(fields) if tag == "$dataclass" else len(fields)
        if stored != (names if tag == "$dataclass" else len(names)):
            raise _Unregistered(f"class {v} has fields {names}; the tree stores {stored}", node, v)
        try:  # the registered class's own code, which may refuse the stored fields
            return cls(**fields) if tag == "$dataclass" else cls(*fields)
        except Exception as e:
            raise _Unregistered(
                f"class {v} refused its stored fields: {e!r}", node, v, False
            ) from None


_TYPED: dict[str, Any] = {
    "$set": lambda b, v, node, sub: set(b.elements("$set", v, sub)),
    "$frozenset": lambda b, v, node, sub: frozenset(b.elements("$frozenset", v, sub)),
    "$complex": lambda b, v, node, sub: b.floats(v, sub),
    "$slice": lambda b, v, node, sub: b.slice_(v, sub),
    "$path": lambda b, v, node, sub: b.path(v, node, sub),
    "$namespace": lambda b, v, node, sub: b.namespace(v, sub),
    "$meta": lambda b, v, node, sub: b.meta(v, node, sub),
    "$sparse": lambda b, v, node, sub: b.sparse(v, node, sub - 1),
    "$structured": lambda b, v, node, sub: b.structured(v, node, sub - 1),
    "$quantized": lambda b, v, node, sub: b.quantized(v, node, sub - 1),
    "$dataclass": lambda b, v, node, sub: b.registered("$dataclass", v, node, sub),
    "$enum": lambda b, v, node, sub: b.registered("$enum", v, node, sub),
    "$namedtuple": lambda b, v, node, sub: b.registered("$namedtuple", v, node, sub),
}
