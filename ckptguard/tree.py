"""Flatten nested state into a JSON object tree plus a tensor list, without pickle
(``treeload`` rebuilds it; both names are here for callers).

The encoding is docs/format.md section 6. Tensors and numpy arrays become ``{"$tensor": id}``;
the same tensor reached twice gets one id (tied weights stay tied). Tensors that share a storage
or are not contiguous are then made views of one stored storage (``views``, section 3.2).
"""

from __future__ import annotations

import argparse
import base64
import collections
import math
import pathlib
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import quantized, treemaps, treetypes, views
from .errors import UnsupportedObjectError
from .format.entries import MAX_DIMS
from .shard import PerRank, Shard, dtensor_copies, dtensor_shard, is_dtensor
from .stateful import is_stateful
from .treeload import I64, INT_LIMIT, PATH_CLASSES, SPARSE_PARTS, meta_fits
from .treeload import MAX_DEPTH as MAX_DEPTH
from .treeload import MAX_INT_DIGITS as MAX_INT_DIGITS
from .treeload import NUMPY_BY_NAME as NUMPY_BY_NAME
from .treeload import TORCH_BY_NAME as TORCH_BY_NAME
from .treeload import TORCH_DTYPES as TORCH_DTYPES
from .treeload import TreeError as TreeError
from .treeload import check_tree as check_tree
from .treeload import key_path as key_path
from .treeload import unflatten as unflatten
from .treemaps import join
from .views import View


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
    view: View | None = None  # its values are read from another ref's bytes (no bytes of its own)

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


class _Flattener:
    def __init__(
        self, allow_pickle: bool, tensors_only: bool = False, stateful: bool = True
    ) -> None:
        self.allow_pickle = allow_pickle
        self.tensors_only = tensors_only
        self.stateful = stateful
        self.tensors: list[TensorRef] = []
        self.ids: dict[tuple, int] = {}
        self.keys: set[str] = set()
        self.used_pickle = False
        self.quantized_nodes: dict[int, tuple[Any, dict]] = {}  # id -> (tensor, its node)
        self.storages = views.Storages()  # which tensors share a storage or are not contiguous

    def shard(self, s: Shard, path: str, alias: bool = False) -> dict:
        node, ref = self._wrapped(s, path, alias)
        ref.global_shape, ref.offsets, ref.sharded = s.global_shape, s.offsets, True
        return node

    def per_rank(self, p: PerRank, path: str) -> dict:
        node, ref = self._wrapped(p, path)
        ref.per_rank = True
        return node

    def _wrapped(
        self, w: Shard | PerRank, path: str, alias: bool = False
    ) -> tuple[dict, TensorRef]:
        """The node and ref of a wrapper's tensor, which must be that wrapper's alone."""
        node = self.tensor(w.local, path, alias)
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
        # ``local`` is a new view object on each call: the DTensor's tensor by its view.
        if replicated:
            node = self.tensor(local, path, alias=True)
        else:  # sharded along some mesh dimension, maybe replicated along others (HSDP)
            node = self.shard(Shard(local, global_shape, offsets), path, alias=True)
            self.tensors[node["$tensor"]].unique_box = dtensor_copies(t) == 1
        self.tensors[node["$tensor"]].outer = t
        return node

    def tensor(self, t: Any, path: str, alias: bool = False) -> dict:
        if type(t) in _PLAIN_TENSORS:  # the common case first: no DTensor or numpy checks
            return self.torch_tensor(t, path, alias)
        if is_dtensor(t):
            return self.dtensor(t, path)
        if isinstance(t, np.ndarray):
            name = str(t.dtype) if t.dtype.isnative or t.dtype.itemsize == 1 else None
            if t.dtype.names is not None and not self.tensors_only:
                return self.structured(t, path)
            if name not in NUMPY_BY_NAME:
                return self.other(t, path, f"numpy array of dtype {t.dtype}")
            ident: tuple = ("np", id(t))  # what makes two references the same tensor
            ref = TensorRef(path or "$root", name, tuple(t.shape), "numpy", "cpu", False, False, t)
            if ident not in self.ids and t.flags.f_contiguous and not t.flags.c_contiguous:
                self.storages.fortran.append(len(self.tensors))
            return self.add(ident, ref, path)
        return self.torch_tensor(t, path, alias)

    def torch_tensor(self, t: Any, path: str, alias: bool = False) -> dict:
        """The node of a torch tensor. One object reached twice is one tensor id; distinct
        objects are distinct ids (views of one storage are then ``views``), as torch.load
        restores them. ``alias``: ``t`` is a new object made for a value of the tree (a
        DTensor's local view, a sparse or quantized tensor's part), identified by its view of
        storage instead (the same view found again is the same tensor)."""
        if type(t) not in _PLAIN_TENSORS or t.layout != torch.strided:
            if type(t) is torch.Tensor and t.layout in SPARSE_PARTS and not self.tensors_only:
                return self.sparse(t, path)
            return self.other(t, path, f"tensor of type {type(t).__name__}/{t.layout}")
        if t.is_quantized and type(t) is torch.Tensor and not self.tensors_only:
            return self.quantized(t, path)
        dtype = t.dtype
        name = TORCH_DTYPES.get(dtype)
        if name is None or t.is_quantized or t.is_meta:
            if name is not None and t.is_meta and not self.tensors_only:
                return self.meta(t, name, path)
            return self.other(t, path, f"tensor of dtype {dtype}")
        shape = tuple(t.shape)
        device = t.device
        where = _DEVICE_NAMES.get(device) or _DEVICE_NAMES.setdefault(device, str(device))
        numel = t.numel()
        ptr = t.untyped_storage().data_ptr() if numel else id(t)
        lazy = t.is_conj() or t.is_neg()  # a conjugate or negative view shares storage, not values
        ident: tuple = ("obj", id(t))  # ``ref`` keeps ``t`` alive: its id names no other object
        if alias:
            ident = ("pt", ptr, t.storage_offset(), shape, t.stride(), dtype, where, t.is_conj())
            ident += (t.is_neg(),)
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
        n = len(self.tensors)
        node = self.add(ident, ref, path)
        if numel and len(self.tensors) > n and not lazy:
            self.storages.note((where, ptr), n, t)
        return node

    def add_storages(self) -> None:
        """Make the tensors that share a storage or are not contiguous views of one (``views``),
        adding the storages that no member holds whole."""
        for key, value, like in self.storages.assign(self.tensors):
            name = TORCH_DTYPES[value.dtype] if like.kind == "torch" else str(value.dtype)
            ref = TensorRef(
                key, name, tuple(value.shape), like.kind, like.device, False, False, value
            )
            self.add(("storage", key), ref, key)

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
        try:
            blob = pickle.dumps(obj, protocol=4)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise UnsupportedObjectError(
                f"cannot save {what} at {path or '<root>'!r}: pickle cannot store it ({e}); "
                "convert it to plain values (a lambda or local function: a named module-level "
                "function)",
                key_path=path,
            ) from None
        self.used_pickle = True
        return {"$pickle": base64.b64encode(blob).decode()}

    def walk(self, obj: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise UnsupportedObjectError(f"nesting deeper than {MAX_DEPTH} at {path!r}", path)
        t = type(obj)
        if t in _PLAIN_TENSORS:
            return self.torch_tensor(obj, path)
        if obj is None or isinstance(obj, (bool, str)) and t in (bool, str):
            return obj
        if t is int:
            if -I64 <= obj < I64:
                return obj
            if abs(obj) >= INT_LIMIT:
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
            return [self.walk(v, join(path, i), depth + 1) for i, v in enumerate(obj)]
        if t is tuple:
            return {"$tuple": [self.walk(v, join(path, i), depth + 1) for i, v in enumerate(obj)]}
        if t in (dict, collections.OrderedDict):
            return treemaps.encode(self, obj, path, depth, ordered=t is collections.OrderedDict)
        if t is torch.dtype and (obj in TORCH_DTYPES or obj in quantized.DTYPE_NAMES):
            return {"$dtype": TORCH_DTYPES.get(obj) or quantized.DTYPE_NAMES[obj]}
        if t is torch.Size:
            if any(d < 0 for d in obj):
                raise UnsupportedObjectError(
                    f"torch.Size {tuple(obj)} at {path or '<root>'!r} has a negative entry", path
                )
            return {"$size": list(obj)}
        if t is torch.device:
            return {"$device": str(obj)}
        return self.extra(obj, t, path, depth)

    def extra(self, obj: Any, t: type, path: str, depth: int) -> Any:
        """The types of format.md section 6.2 (feature ``tree-types``), else ``other``."""
        if t is complex:
            return {"$complex": [_float(obj.real), _float(obj.imag)]}
        if t is set or t is frozenset:  # no tensors inside: nothing for a template
            kind = "$set" if t is set else "$frozenset"
            return None if self.tensors_only else self.elements(kind, obj, path, depth)
        if t is slice:
            parts = enumerate((obj.start, obj.stop, obj.step))
            return {"$slice": [self.walk(x, join(path, i), depth + 1) for i, x in parts]}
        if t in _PATH_TAGS:
            return {"$path": str(obj), "class": _PATH_TAGS[t]}
        if t is argparse.Namespace:
            return {"$namespace": self.walk(dict(vars(obj)), path, depth + 1)}
        tag = treetypes.tag_of(t)
        if self.stateful and is_stateful(obj) and (tag is None or not treetypes.is_registered(t)):
            return self.walk(obj.state_dict(), path, depth + 1)  # as DCP saves a Stateful
        if tag is None or (self.tensors_only and tag == treetypes.ENUM):
            return self.other(obj, path, f"object of type {t.__module__}.{t.__qualname__}")
        name = treetypes.qualified_name(t)
        # A template's tensors inside a dataclass or named tuple are found registered or not.
        if not self.tensors_only and not treetypes.is_registered(t):
            if self.allow_pickle:
                return self.other(obj, path, f"{tag[1:]} {name}")
            raise UnsupportedObjectError(
                f"cannot save {tag[1:]} {name} at {path or '<root>'!r}: its class is not "
                f"registered; {treetypes.how_to_register(name)}",
                key_path=path,
            )
        if tag == treetypes.ENUM:
            member = obj.name
            members: dict = getattr(t, "__members__", {})
            if members.get(member) is not obj:  # a combination of Flag members has no name
                return self.other(obj, path, f"enum value {obj!r} that is no single member")
            return {"$enum": name, "name": member}
        if tag == treetypes.DATACLASS:
            fields = {f: getattr(obj, f) for f in treetypes.init_fields(t)}
            return {"$dataclass": name, "fields": self.walk(fields, path, depth + 1)}
        return {"$namedtuple": name, "fields": self.walk(list(obj), path, depth + 1)}

    def elements(self, tag: str, obj: Any, path: str, depth: int) -> dict:
        """A set's elements (hashable values only), sorted by their canonical JSON text."""
        by_text: dict[str, Any] = {}
        for i, x in enumerate(obj):
            self.check_hashable(x, join(path, i), "set element")
            node = self.walk(x, join(path, i), depth + 1)
            text = treetypes.element_text(node)
            if text in by_text:  # e.g. two nan objects, which a set holds as two elements
                raise UnsupportedObjectError(
                    f"set at {path or '<root>'!r} holds two elements stored alike ({text[:100]}):"
                    " convert it to a list",
                    key_path=path,
                )
            by_text[text] = node
        return {tag: [by_text[k] for k in sorted(by_text)]}

    def check_hashable(self, x: Any, path: str, what: str) -> None:
        if not treetypes.hashable_value(x) and not self.tensors_only:
            t = type(x)
            raise UnsupportedObjectError(
                f"{what} {_short(x)} of type {t.__module__}.{t.__qualname__} at {path!r}: set "
                "elements and dict keys other than str and int can be None, bool, int, float, "
                "complex, str, bytes, enum members, or tuples and frozensets of these; convert "
                "it (e.g. to str)",
                key_path=path,
            )

    def sparse(self, t: torch.Tensor, path: str) -> dict:
        """A sparse COO or CSR tensor: its index and value tensors, each a tensor of the tree
        (key path: the sparse tensor's, then the part's name)."""
        # Its parts are stored as tensors of the tree, so they must be storable tensors.
        if t.requires_grad:
            return self.other(t, path, "sparse tensor that requires grad")
        if t.is_meta or t.dtype not in TORCH_DTYPES:
            return self.other(t, path, f"sparse tensor of dtype {t.dtype} on {t.device}")
        coo = t.layout == torch.sparse_coo
        parts = (
            (t._indices(), t._values()) if coo else (t.crow_indices(), t.col_indices(), t.values())
        )
        nodes = [
            self.torch_tensor(p, join(path, name), alias=True)
            for name, p in zip(SPARSE_PARTS[t.layout], parts, strict=True)
        ]
        return {
            "$sparse": "coo" if coo else "csr",
            "shape": list(t.shape),
            "parts": nodes,
            "coalesced": bool(coo and t.is_coalesced()),
        }

    def quantized(self, t: torch.Tensor, path: str) -> Any:
        """A quantized tensor: its integer values (and per channel its scales and zero points)
        as tensors of the tree at its key path's ``int_repr`` (``scale``, ``zero_point``)."""
        seen = self.quantized_nodes.get(id(t))
        if seen is not None:  # reached again: the same parts (the tensor is kept alive here)
            return {k: dict(x) if type(x) is dict else x for k, x in seen[1].items()}
        try:
            node, parts = quantized.split(t)
        except ValueError as e:
            return self.other(t, path, str(e))
        for member, part in parts:
            node[member] = self.torch_tensor(part, join(path, member), alias=True)
        self.quantized_nodes[id(t)] = (t, node)
        return node

    def structured(self, t: np.ndarray, path: str) -> dict:
        """A numpy array of a plain structured dtype: its fields (names and dtypes), its shape,
        and its bytes, packed little-endian, as a uint8 array of the tree at its key path."""
        fields = treetypes.plain_fields(t.dtype)
        if fields is None:
            return self.other(t, path, f"numpy array of structured dtype {t.dtype}")
        stored = np.dtype([(n, NUMPY_BY_NAME[d].newbyteorder("<")) for n, d in fields])
        raw = np.ascontiguousarray(t).astype(stored).reshape(-1).view(np.uint8)
        ref = TensorRef(path or "$root", "uint8", raw.shape, "numpy", "cpu", False, False, raw)
        # ``raw`` is new, kept alive by ``ref``: its id names no other array while flattening.
        return {
            "$structured": [list(f) for f in fields],
            "shape": list(t.shape),
            "data": self.add(("np", id(raw)), ref, path),
        }

    def meta(self, t: torch.Tensor, name: str, path: str) -> dict:
        """A meta tensor: its shape and dtype (it has no data)."""
        shape = list(t.shape)
        if len(shape) > MAX_DIMS or not meta_fits(shape, name):
            raise UnsupportedObjectError(
                f"meta tensor at {path or '<root>'!r} of shape {shape} and dtype {name} is "
                f"larger than a tensor can be saved (2**62 bytes, {MAX_DIMS} dimensions)",
                key_path=path,
            )
        return {
            "$meta": name,
            "shape": shape,
            "requires_grad": bool(t.requires_grad),
            "parameter": isinstance(t, torch.nn.Parameter),
        }


_PATH_TAGS = {
    type(pathlib.Path()): "Path",
    pathlib.PurePosixPath: "PurePosixPath",
    pathlib.PureWindowsPath: "PureWindowsPath",
}
assert set(_PATH_TAGS.values()) == set(PATH_CLASSES)


def _float(x: float) -> Any:
    return x if math.isfinite(x) else {"$float": repr(x)}


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 100 else text[:97] + "..."


def flatten(
    obj: Any, allow_pickle: bool = False, tensors_only: bool = False, stateful: bool = True
) -> tuple[Any, list[TensorRef], bool]:
    """Return (JSON tree, tensors in id order, whether pickle was used).

    ``tensors_only`` finds the tensors and ignores values that cannot be stored (for templates).
    ``stateful``: an object with ``state_dict``/``load_state_dict`` is stored as its
    ``state_dict()`` (``stateful``); False: like any other object of an unknown class.
    """
    f = _Flattener(allow_pickle, tensors_only, stateful)
    tree = f.walk(obj, "", 0)
    if not tensors_only:  # a template's tensors are filled each as it is
        f.add_storages()
    return tree, f.tensors, f.used_pickle


@dataclass
class Flat:
    """An object already flattened (``flatten``'s result), e.g. in another process; the saver
    takes it in place of the object."""

    tree: Any
    refs: list[TensorRef]
    used_pickle: bool = False
