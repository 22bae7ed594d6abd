"""Flatten nested state into a JSON object tree plus a tensor list, and back, without pickle.

The encoding is docs/format.md section 6. Tensors and numpy arrays become ``{"$tensor": id}``;
the same tensor reached twice gets one id (tied weights stay tied).
"""

from __future__ import annotations

import base64
import collections
import enum
import math
import pickle
import re
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import UnsupportedObjectError
from .format import dtypes
from .format.manifest import MAX_DIMS
from .shard import PerRank, Shard, dtensor_copies, dtensor_shard, is_dtensor

MAX_DEPTH = 512
# Trees up to MAX_DEPTH are valid, and flattening, JSON and rebuilding each recurse a few frames
# per level: make sure Python allows that (only ever raised, never lowered).
_RECURSION_NEEDED = 8 * MAX_DEPTH + 1000
if sys.getrecursionlimit() < _RECURSION_NEEDED:
    sys.setrecursionlimit(_RECURSION_NEEDED)
_I64 = 1 << 63
# Digits of a ``$int`` (Python's default limit on int <-> str conversion, fixed here so that a
# tree's validity does not depend on the interpreter's setting).
MAX_INT_DIGITS = 4300
_INT_LIMIT = 10**MAX_INT_DIGITS
_INT_RE = re.compile(r"-?[1-9][0-9]*")  # canonical decimal: no sign on zero, no leading zeros
_HEX_RE = re.compile(r"[0-9a-f]*")
_DEVICE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}(:(0|[1-9][0-9]{0,8}))?")  # str(torch.device)

TORCH_DTYPES: dict[torch.dtype, str] = {
    getattr(torch, n): n for n in dtypes.SIZES if isinstance(getattr(torch, n, None), torch.dtype)
}
TORCH_BY_NAME = {v: k for k, v in TORCH_DTYPES.items()}
NUMPY_BY_NAME = {
    n: np.dtype(n)
    for n in dtypes.SIZES
    if n
    in {
        "bool",
        "uint8",
        "int8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    }
}


@dataclass
class TensorRef:
    """A tensor found in the tree: its key path, its type facts, and the object itself."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    kind: str  # "torch" or "numpy"
    device: str
    requires_grad: bool
    parameter: bool
    value: Any
    global_shape: tuple[int, ...] = ()
    offsets: tuple[int, ...] = ()
    sharded: bool = False  # a piece of a global tensor (Shard or sharded DTensor)
    # Known to be the only copy of its box on any rank (a DTensor not replicated along any mesh
    # dimension): not hashed for the replica check. A Shard's box may be on several ranks.
    unique_box: bool = False
    outer: Any = None  # the object the user passed (Shard, DTensor or the tensor itself)
    per_rank: bool = False  # each rank's own value (PerRank): row ``rank`` of a stacked tensor

    def __post_init__(self) -> None:
        if not self.sharded:
            self.global_shape = self.shape
            self.offsets = _zeros(len(self.shape))
        if self.outer is None:
            self.outer = self.value


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_DEVICE_NAMES: dict[torch.device, str] = {}  # str(device) once per device, not per tensor
_ZEROS = [(0,) * n for n in range(MAX_DIMS + 1)]


def _zeros(n: int) -> tuple[int, ...]:
    return _ZEROS[n] if n <= MAX_DIMS else (0,) * n


def _key_part(k: Any) -> str:
    return str(k).replace("%", "%25").replace("/", "%2F")


def _join(path: str, k: Any) -> str:
    return f"{path}/{_key_part(k)}" if path else _key_part(k)


class _Flattener:
    def __init__(self, allow_pickle: bool, tensors_only: bool = False) -> None:
        self.allow_pickle = allow_pickle
        self.tensors_only = tensors_only
        self.tensors: list[TensorRef] = []
        self.ids: dict[tuple, int] = {}
        self.keys: set[str] = set()
        self.used_pickle = False

    def shard(self, s: Shard, path: str) -> dict:
        node, ref = self._wrapped(s, path)
        ref.global_shape, ref.offsets, ref.sharded = s.global_shape, s.offsets, True
        return node

    def per_rank(self, p: PerRank, path: str) -> dict:
        node, ref = self._wrapped(p, path)
        ref.per_rank = True
        return node

    def _wrapped(self, w: Shard | PerRank, path: str) -> tuple[dict, TensorRef]:
        """The node and ref of a wrapper's tensor, which must be that wrapper's alone."""
        node = self.tensor(w.local, path)
        ref = self.tensors[node["$tensor"]]
        if ref.value is not w.local:
            raise UnsupportedObjectError(
                f"the tensor of {type(w).__name__} at {path!r} is also used elsewhere", path
            )
        ref.outer = w
        return node, ref

    def dtensor(self, t: Any, path: str) -> dict:
        try:
            local, global_shape, offsets, replicated = dtensor_shard(t)
        except ValueError as e:
            raise UnsupportedObjectError(f"{e} (at {path!r})", path) from None
        if replicated:
            node = self.tensor(local, path)
        else:  # sharded along some mesh dimension, maybe replicated along others (HSDP)
            node = self.shard(Shard(local, global_shape, offsets), path)
            self.tensors[node["$tensor"]].unique_box = dtensor_copies(t) == 1
        self.tensors[node["$tensor"]].outer = t
        return node

    def tensor(self, t: Any, path: str) -> dict:
        if type(t) in _PLAIN_TENSORS:  # the common case first: no DTensor or numpy checks
            return self.torch_tensor(t, path)
        if is_dtensor(t):
            return self.dtensor(t, path)
        if isinstance(t, np.ndarray):
            name = str(t.dtype) if t.dtype.isnative or t.dtype.itemsize == 1 else None
            if name not in NUMPY_BY_NAME:
                return self.other(t, path, f"numpy array of dtype {t.dtype}")
            ident: tuple = ("np", id(t))  # what makes two references the same tensor
            ref = TensorRef(path or "$root", name, tuple(t.shape), "numpy", "cpu", False, False, t)
            return self.add(ident, ref, path)
        return self.torch_tensor(t, path)

    def torch_tensor(self, t: Any, path: str) -> dict:
        if type(t) not in _PLAIN_TENSORS or t.layout != torch.strided:
            return self.other(t, path, f"tensor of type {type(t).__name__}/{t.layout}")
        dtype = t.dtype
        name = TORCH_DTYPES.get(dtype)
        if name is None or t.is_quantized or t.is_meta:
            return self.other(t, path, f"tensor of dtype {dtype}")
        shape = tuple(t.shape)
        device = t.device
        where = _DEVICE_NAMES.get(device) or _DEVICE_NAMES.setdefault(device, str(device))
        ident = (
            "pt",
            t.untyped_storage().data_ptr() if t.numel() else id(t),
            t.storage_offset(),
            shape,
            t.stride(),
            dtype,
            where,
            t.is_conj(),  # a conjugate or negative view shares storage, not values
            t.is_neg(),
        )
        ref = TensorRef(
            path or "$root",
            name,
            shape,
            "torch",
            where,
            bool(t.requires_grad and t.is_leaf),
            isinstance(t, torch.nn.Parameter),
            t,
            shape,
            _zeros(len(shape)),
        )
        return self.add(ident, ref, path)

    def add(self, ident: tuple, ref: TensorRef, path: str) -> dict:
        """The node of tensor ``ref`` (``ident`` says which tensors are the same one)."""
        if len(ref.shape) > MAX_DIMS:
            raise UnsupportedObjectError(
                f"tensor at {ref.key!r} has {len(ref.shape)} dimensions; at most {MAX_DIMS} can "
                "be saved",
                key_path=path,
            )
        if ident in self.ids:
            return {"$tensor": self.ids[ident]}
        if ref.key in self.keys:
            raise UnsupportedObjectError(
                f"two different tensors have the key path {ref.key!r} (e.g. int key 1 and str key "
                "'1' in one dict): rename one",
                key_path=path,
            )
        self.keys.add(ref.key)
        self.ids[ident] = len(self.tensors)
        self.tensors.append(ref)
        return {"$tensor": len(self.tensors) - 1}

    def other(self, obj: Any, path: str, what: str) -> Any:
        if self.tensors_only:
            return None
        if not self.allow_pickle:
            raise UnsupportedObjectError(
                f"cannot save {what} at {path or '<root>'!r} without pickle; convert it to "
                "tensors/plain values, or pass allow_pickle=True at save and at load",
                key_path=path,
            )
        self.used_pickle = True
        return {"$pickle": base64.b64encode(pickle.dumps(obj, protocol=4)).decode()}

    def walk(self, obj: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise UnsupportedObjectError(f"nesting deeper than {MAX_DEPTH} at {path!r}", path)
        t = type(obj)
        if t in _PLAIN_TENSORS:
            return self.torch_tensor(obj, path)
        if obj is None or isinstance(obj, (bool, str)) and t in (bool, str):
            return obj
        if t is int:
            if -_I64 <= obj < _I64:
                return obj
            if abs(obj) >= _INT_LIMIT:
                raise UnsupportedObjectError(
                    f"integer at {path or '<root>'!r} has more than {MAX_INT_DIGITS} digits", path
                )
            return {"$int": str(obj)}
        if t is float:
            return obj if math.isfinite(obj) else {"$float": repr(obj)}
        if t is bytes:
            return {"$bytes": base64.b64encode(obj).decode()}
        if isinstance(obj, (torch.Tensor, np.ndarray)):
            return self.tensor(obj, path)
        if t is Shard:
            return self.shard(obj, path)
        if t is PerRank:
            return self.per_rank(obj, path)
        if isinstance(obj, np.generic) and str(obj.dtype) in NUMPY_BY_NAME:
            return {
                "$npscalar": str(obj.dtype),
                "hex": np.asarray(obj).astype(obj.dtype.newbyteorder("<")).tobytes().hex(),
            }
        if t is list:
            return [self.walk(v, _join(path, i), depth + 1) for i, v in enumerate(obj)]
        if t is tuple:
            return {"$tuple": [self.walk(v, _join(path, i), depth + 1) for i, v in enumerate(obj)]}
        if t in (dict, collections.OrderedDict):
            return self.mapping(obj, path, depth, ordered=t is collections.OrderedDict)
        if t is torch.dtype and obj in TORCH_DTYPES:
            return {"$dtype": TORCH_DTYPES[obj]}
        if t is torch.Size:
            if any(d < 0 for d in obj):
                raise UnsupportedObjectError(
                    f"torch.Size {tuple(obj)} at {path or '<root>'!r} has a negative entry", path
                )
            return {"$size": list(obj)}
        if t is torch.device:
            return {"$device": str(obj)}
        return self.other(obj, path, f"object of type {t.__module__}.{t.__qualname__}")

    def mapping(self, obj: dict, path: str, depth: int, ordered: bool) -> Any:
        for k in obj:
            if type(k) not in (str, int):
                self_path = _join(path, repr(k))
                raise UnsupportedObjectError(
                    f"dict key {k!r} of type {type(k).__name__} at {path or '<root>'!r}: only str "
                    "and int keys can be saved",
                    key_path=self_path,
                )
        items = [(k, self.walk(v, _join(path, k), depth + 1)) for k, v in obj.items()]
        plain = all(type(k) is str and not k.startswith("$") for k, _ in items)
        if ordered:
            return {"$odict": [[k, v] for k, v in items]}
        if plain:
            return dict(items)
        return {"$dict": [[k, v] for k, v in items]}


def flatten(
    obj: Any, allow_pickle: bool = False, tensors_only: bool = False
) -> tuple[Any, list[TensorRef], bool]:
    """Return (JSON tree, tensors in id order, whether pickle was used).

    ``tensors_only`` finds the tensors and ignores values that cannot be stored (for templates).
    """
    f = _Flattener(allow_pickle, tensors_only)
    tree = f.walk(obj, "", 0)
    return tree, f.tensors, f.used_pickle


@dataclass
class Flat:
    """An object already flattened (``flatten``'s result), e.g. in another process; the saver
    takes it in place of the object."""

    tree: Any
    refs: list[TensorRef]
    used_pickle: bool = False


class TreeError(ValueError):
    """The stored tree is malformed (the reader turns this into CorruptCheckpointError)."""


class _Pickled(enum.Enum):
    """What rebuilding a tree does with a ``$pickle`` value."""

    REFUSE = "refuse"  # TreeError: the caller did not opt in
    LOAD = "load"  # unpickle: the caller opted in at save and at load
    CHECK = "check"  # check its base64 only and build None (validation builds nothing)


def unflatten(tree: Any, tensors: list[Any], allow_pickle: bool = False) -> Any:
    """Rebuild the object from its JSON tree and the loaded tensors (indexed by id)."""
    return _build(tree, tensors, _Pickled.LOAD if allow_pickle else _Pickled.REFUSE, 0)


def check_tree(tree: Any, n_tensors: int, depth: int = 0) -> None:
    """Validate a stored tree's structure without building pickled objects (``depth``: the
    nesting depth of ``tree`` when it is a value inside a larger tree)."""
    _build(tree, [None] * n_tensors, _Pickled.CHECK, depth)


def _pairs(tag: str, v: Any) -> list:
    """The ``[key, value]`` pairs of a ``$dict``/``$odict``: keys str or int, none twice; a
    ``$dict`` has a key a plain object cannot hold (an int, or a str starting with ``$``)."""
    if not isinstance(v, list) or not all(isinstance(p, list) and len(p) == 2 for p in v):
        raise TreeError(f"malformed {tag} in tree")
    seen: set = set()
    for k, _ in v:
        if type(k) not in (str, int):
            raise TreeError(f"{tag} key in tree is not a string or integer")
        if (type(k), k) in seen:
            raise TreeError(f"{tag} key {str(k)[:100]!r} appears twice")
        seen.add((type(k), k))
    if tag == "$dict" and all(type(k) is str and not k.startswith("$") for k, _ in v):
        raise TreeError("$dict whose keys are all plain strings (must be a JSON object)")
    return v


def _build(node: Any, tensors: list[Any], pickled: _Pickled, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise TreeError("tree nested too deeply")
    if type(node) is dict and len(node) == 1:  # a tensor reference (most nodes of a state)
        v = node.get("$tensor")
        if type(v) is int and 0 <= v < len(tensors):
            return tensors[v]
    if node is None or isinstance(node, (bool, str)):
        return node
    if type(node) is int:
        if not -_I64 <= node < _I64:
            raise TreeError("integer outside int64 in tree (must be $int)")
        return node
    if type(node) is float:
        if not math.isfinite(node):  # a JSON number beyond float range, such as 1e400
            raise TreeError("non-finite number in tree (must be $float)")
        return node
    if isinstance(node, list):
        return [_build(v, tensors, pickled, depth + 1) for v in node]
    if not isinstance(node, dict):
        raise TreeError(f"unexpected JSON value {type(node).__name__} in tree")
    tags = [k for k in node if k.startswith("$")]
    if not tags:
        return {k: _build(v, tensors, pickled, depth + 1) for k, v in node.items()}
    tag = tags[0]
    expect = {"$npscalar": {"$npscalar", "hex"}}.get(tag, {tag})
    if set(node) != expect:
        raise TreeError(f"tagged value {tag} has unexpected members")
    v = node[tag]
    try:
        return _tagged(tag, v, node, tensors, pickled, depth)
    except (TypeError, ValueError, KeyError, IndexError, OverflowError) as e:
        if isinstance(e, TreeError):
            raise
        raise TreeError(f"malformed {tag} value in tree: {e}") from None


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


def _tagged(tag: str, v: Any, node: dict, tensors: list, pickled: _Pickled, depth: int) -> Any:
    sub = depth + 1
    if tag == "$tensor":
        if type(v) is not int or not 0 <= v < len(tensors):
            raise TreeError("tensor reference out of range")
        return tensors[v]
    if tag == "$tuple":
        if not isinstance(v, list):
            raise TreeError("$tuple is not a list")
        return tuple(_build(x, tensors, pickled, sub) for x in v)
    if tag in ("$dict", "$odict"):
        cls = dict if tag == "$dict" else collections.OrderedDict
        return cls((k, _build(x, tensors, pickled, sub)) for k, x in _pairs(tag, v))
    if tag == "$int":
        if (
            not isinstance(v, str)
            or len(v.lstrip("-")) > MAX_INT_DIGITS
            or not _INT_RE.fullmatch(v)
        ):
            raise TreeError(f"$int is not a canonical decimal of at most {MAX_INT_DIGITS} digits")
        n = int(v)
        if -_I64 <= n < _I64:
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
        raw = bytes.fromhex(hx)
        return np.frombuffer(raw, dtype=dt)[0].astype(NUMPY_BY_NAME[v])
    if tag == "$dtype":
        return TORCH_BY_NAME[v]
    if tag == "$size":
        if not isinstance(v, list) or not all(type(x) is int and 0 <= x < _I64 for x in v):
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
        if pickled is _Pickled.CHECK:
            return None
        if pickled is _Pickled.REFUSE:
            raise TreeError("tree holds a pickled object but allow_pickle is off")
        return pickle.loads(blob)  # _Pickled.LOAD: the caller opted in at save and load
    raise TreeError(f"unknown tag {tag} in tree")
