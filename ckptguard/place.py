"""Placement: the memory a load fills, and copying what it read into the tensors it returns.

Every allocation of a load goes through ``allocate``, so that a failure is one typed
OutOfMemoryError naming the tensor, the bytes and the memory (host, pinned or a device).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from .errors import CheckpointError, OutOfMemoryError, UnsupportedObjectError
from .format.dtypes import SIZES
from .format.index import Row
from .select import Piece, Target
from .tree import NUMPY_BY_NAME, TORCH_BY_NAME
from .units import format_size

MapLocation = str | torch.device | dict | Callable | None
T = TypeVar("T")


def _out_of_memory(e: BaseException) -> bool:
    """Whether an allocator's exception means that the memory was not there: numpy raises
    MemoryError, torch OutOfMemoryError (device) or a RuntimeError from its CPU allocator."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and "memory" in str(e).lower()


def allocate(key: str, nbytes: int, where: str, make: Callable[[], T]) -> T:
    """``make()``: the one place where a load allocates memory for tensor ``key`` (``nbytes`` of
    ``where``: host, pinned or a device). An allocation failure becomes OutOfMemoryError naming
    the tensor and the bytes; nothing else is caught."""
    try:
        return make()
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        raise OutOfMemoryError(
            f"cannot allocate {nbytes} bytes ({format_size(nbytes)}) of {where} memory for "
            f"tensor {key!r} while loading: {str(e).strip()[:300] or type(e).__name__} (free "
            "memory, raise the limit, or load with a template/map_location that needs less)",
            key,
            nbytes,
            where,
        ) from e


def nbytes(shape: Sequence[int], entry: dict) -> int:
    """The bytes of a tensor of ``shape`` with the dtype of manifest entry ``entry``."""
    return math.prod(shape) * SIZES[entry["dtype"]]


def dtype_of(entry: dict) -> Any:
    """The numpy or torch dtype of a manifest tensor entry; UnsupportedObjectError if this
    numpy or torch has none of that name."""
    key = entry["key"]
    if entry["kind"] == "numpy":
        dt = NUMPY_BY_NAME.get(entry["dtype"])
        if dt is None:
            raise UnsupportedObjectError(f"numpy has no dtype {entry['dtype']!r}", key)
        return dt
    dtype = TORCH_BY_NAME.get(entry["dtype"])
    if dtype is None:
        raise UnsupportedObjectError(
            f"this torch has no dtype {entry['dtype']!r} (tensor {key!r})", key
        )
    return dtype


def host_empty(entry: dict) -> Any:
    """A fresh host tensor/array for a manifest tensor entry (its global shape; one rank's row
    of a per-rank tensor)."""
    shape = tuple(entry["shape"][1:] if entry.get("per_rank") else entry["shape"])
    dt = dtype_of(entry)
    if entry["kind"] == "numpy":
        return allocate(entry["key"], nbytes(shape, entry), "host", lambda: np.empty(shape, dt))
    return allocate(
        entry["key"], nbytes(shape, entry), "host", lambda: torch.empty(shape, dtype=dt)
    )


def fresh_target(entry: dict, box: Any) -> Target:
    """A newly allocated host target for a tensor the load rebuilds whole (``box``)."""
    t = host_empty(entry)
    fill = t[None] if entry.get("per_rank") else t  # a view: the rank's row
    return Target(t, fill, box, True)


def byte_view(t: Any) -> np.ndarray | None:
    """A writable uint8 view of a contiguous host tensor/array, else None."""
    if isinstance(t, np.ndarray):
        return t.reshape(-1).view(np.uint8) if t.flags.c_contiguous else None
    if t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad:
        return t.reshape(-1).view(torch.uint8).numpy()
    return None


@dataclass
class Landing:
    """Where a piece's chunks land: ``buf`` holds the saved shard's bytes from shard byte
    offset ``lo`` on (whole chunks)."""

    piece: Piece
    buf: np.ndarray
    lo: int = 0

    def dest_offset(self, r: Row) -> int:
        """Where a chunk's raw bytes go in ``buf``."""
        return r.shard_byte_offset - self.lo

    def block(self) -> np.ndarray:
        """The piece's overlap as an array of shape (*overlap lengths, elem_size) of bytes."""
        p = self.piece
        lo, hi = p.span
        needed = self.buf[lo - self.lo : hi - self.lo]
        if not p.shard[1]:
            return needed.reshape(p.elem_size)
        rows = needed.reshape(p.row1 - p.row0, *p.shard[1][1:], p.elem_size)
        sl = [slice(0, p.row1 - p.row0)]
        sl += [
            slice(o - so, o - so + n)
            for o, n, so in zip(p.overlap[0][1:], p.overlap[1][1:], p.shard[0][1:], strict=True)
        ]
        return rows[tuple(sl)]


def land(key: str, piece: Piece, target: Target) -> tuple[Landing, bool]:
    """Where ``piece``'s chunks go, and whether they still need copying into ``target``: a
    piece that is the target's whole box lands straight in a contiguous host target; any other
    gets a host buffer from its first chunk's start to its last one's end."""
    view = byte_view(target.fill) if piece.shard == piece.overlap == target.box else None
    if view is not None:
        return Landing(piece, view), False
    lo, hi = piece.chunk_span
    buf = allocate(key, hi - lo, "host", lambda: np.empty(hi - lo, dtype=np.uint8))
    return Landing(piece, buf, lo), True


def copy_block(target: Target, entry: dict, landing: Landing) -> None:
    """Copy a landed piece's overlap into ``target`` (whose element 0 is at its box's origin)."""
    piece, origin, dest = landing.piece, target.box[0], target.fill
    lens = piece.overlap[1]
    block = np.ascontiguousarray(landing.block())
    sl = tuple(
        slice(o - b, o - b + n) for o, b, n in zip(piece.overlap[0], origin, lens, strict=True)
    )
    if isinstance(dest, np.ndarray):
        dest[sl] = block.view(dest.dtype).reshape(lens)
        return
    src = torch.from_numpy(block).view(TORCH_BY_NAME[entry["dtype"]]).reshape(lens)
    with torch.no_grad():
        dest[sl].copy_(src)


def device(entry: dict, map_location: MapLocation) -> torch.device:
    """The device a saved torch tensor loads onto: its saved one, mapped by ``map_location``."""
    saved = entry["device"]
    if map_location is None:
        loc = saved
    elif isinstance(map_location, dict):
        loc = map_location.get(saved, saved)
    elif callable(map_location):
        loc = map_location(saved)
    else:
        loc = map_location
    try:
        dev = torch.device(loc)
    except (RuntimeError, TypeError, ValueError) as e:  # a string torch knows no device by
        raise CheckpointError(
            f"tensor {entry['key']!r} was saved on {saved!r}, which maps to {loc!r}: not a "
            f"device this torch knows ({e}); pass map_location"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(
            f"tensor {entry['key']!r} was saved on {saved} but CUDA is not available; "
            "pass map_location='cpu'"
        )
    return dev


def finish(tg: Target, entry: dict, map_location: MapLocation) -> Any:
    """A freshly loaded host tensor as the object saved: on its device, a Parameter or
    requiring grad as it was."""
    obj = tg.result
    if entry["kind"] != "torch":
        return obj
    if callable(map_location) and torch_style(map_location):
        obj = _mapped_storage(obj, entry, map_location)
    else:
        dev = device(entry, map_location)
        if dev.type != "cpu":
            size = nbytes(obj.shape, entry)
            obj = allocate(entry["key"], size, str(dev), lambda: obj.to(dev))
    return _as_saved(obj, entry)


def pack_buffer(key: str, size: int) -> torch.Tensor:
    """One host buffer of ``size`` bytes for a packed record's raw bytes (``key``: its first
    member, which an OutOfMemoryError names). The load returns the record's tensors as views of
    it (``pack_values``)."""
    return allocate(key, size, "host", lambda: torch.empty(size, dtype=torch.uint8))


def pack_values(
    buf: torch.Tensor,
    elem_size: int,
    entries: Sequence[dict],
    at: np.ndarray,
    length: np.ndarray,
    map_location: MapLocation,
) -> list[Any]:
    """The objects of a packed record's members (``entries``, whose bytes are ``[at, at +
    length)`` of ``buf``, the record's raw bytes) as ``finish`` makes them, each a view of
    ``buf`` or of its one copy on each other device their ``map_location`` picks: no
    allocation per tensor.

    A view keeps its whole buffer alive: a tensor kept from a load holds the memory of its
    record (at most the checkpoint's chunk size), ``torch.save`` of it alone writes that
    storage whole, and an operation on the storage itself (``untyped_storage().resize_``)
    reaches the record's other tensors; ``.clone()`` one to have it alone."""
    # Slices tile the record (validated), so cutting at every slice's ends gives each its part.
    bounds = np.unique(np.concatenate(([0, len(buf)], at, at + length)))
    sizes = (np.diff(bounds) // elem_size).tolist()
    part = np.searchsorted(bounds, at).tolist()
    out: list[Any] = [None] * len(entries)
    bases: dict[torch.device, torch.Tensor] = {}
    splits: dict[tuple[str, str], Sequence[torch.Tensor]] = {}  # by saved device and dtype
    for k, e in enumerate(entries):
        if e["kind"] != "torch":
            a = int(at[k])
            flat = buf.numpy()[a : a + int(length[k])]
            out[k] = flat.view(NUMPY_BY_NAME[e["dtype"]]).reshape(e["shape"])
            continue
        parts = splits.get((e["device"], e["dtype"]))
        if parts is None:
            dev = device(e, map_location)
            base = bases.get(dev)
            if base is None:
                base = bases[dev] = _on(buf, dev, e["key"])
            parts = base.view(TORCH_BY_NAME[e["dtype"]]).split_with_sizes(sizes)
            splits[(e["device"], e["dtype"])] = parts
        t = parts[part[k]]
        if len(e["shape"]) != 1:
            t = t.view(e["shape"])
        out[k] = _as_saved(t, e) if e["parameter"] or e["requires_grad"] else t
    return out


def view_of(storage: Any, entry: dict) -> Any:
    """The object of a view entry (format.md section 3.2) on its loaded storage (a tensor or
    array as ``finish`` made it, in memory of its own): the storage's memory at the view's
    element offset and strides, shared with the storage and its other views, as saved. The
    manifest's checks keep every element inside the storage's bytes."""
    view, shape, dt = entry["view"], tuple(entry["shape"]), dtype_of(entry)
    if isinstance(storage, np.ndarray):
        size = np.dtype(dt).itemsize
        strides = tuple(s * size for s in view["stride"])
        return np.ndarray(shape, dt, storage, view["offset"] * size, strides)
    out = torch.empty(0, dtype=dt, device=storage.device)
    start = storage.storage_offset() * storage.element_size()
    if start % out.element_size():
        raise CheckpointError(f"storage of view {entry['key']!r} is not aligned for its dtype")
    with torch.no_grad():
        at = start // out.element_size() + view["offset"]
        out.set_(storage.untyped_storage(), at, shape, view["stride"])
    return _as_saved(out, entry)


def fill_from(target: Target, value: Any) -> None:
    """Copy the part ``target.box`` of a whole loaded ``value`` into the template's memory."""
    src = value[tuple(slice(o, o + n) for o, n in zip(*target.box, strict=True))]
    dest = target.fill
    if isinstance(dest, np.ndarray):
        dest[...] = src if isinstance(src, np.ndarray) else src.detach().cpu().numpy()
        return
    with torch.no_grad():
        dest.copy_(torch.from_numpy(src) if isinstance(src, np.ndarray) else src)


def check_dtypes(names: set[str], entries: Iterable[dict]) -> None:
    """Raise ``dtype_of``'s error for the first of ``entries`` (whose dtypes are ``names``)
    with a dtype this numpy or torch lacks; look at each only if some name may be one."""
    odd = {n for n in names if n not in TORCH_BY_NAME or n not in NUMPY_BY_NAME}
    for e in entries if odd else ():
        if e["dtype"] in odd:
            dtype_of(e)


def _on(buf: torch.Tensor, dev: torch.device, key: str) -> torch.Tensor:
    """``buf`` on device ``dev`` (itself on the CPU)."""
    if dev.type == "cpu":
        return buf
    return allocate(key, len(buf), str(dev), lambda: buf.to(dev))


def _as_saved(obj: torch.Tensor, entry: dict) -> torch.Tensor:
    """A loaded torch tensor as saved: a Parameter or requiring grad as it was."""
    if entry["parameter"]:
        return torch.nn.Parameter(obj, requires_grad=entry["requires_grad"])
    if entry["requires_grad"] and (obj.is_floating_point() or obj.is_complex()):
        obj.requires_grad_(True)
    return obj


def torch_style(map_location: MapLocation) -> bool:
    """Whether ``map_location`` is a callable of torch.load's kind, ``f(storage, location)``
    (rather than ``f(saved_device)``): it needs two positional arguments."""
    if not callable(map_location) or isinstance(map_location, (dict, str, torch.device)):
        return False
    try:
        sig = inspect.signature(map_location)
    except (TypeError, ValueError):  # a builtin without a signature: one argument
        return False
    for args in ((None,), (None, None)):
        try:
            sig.bind(*args)
        except TypeError:
            continue
        return len(args) == 2
    return False


def _mapped_storage(obj: torch.Tensor, entry: dict, fn: Callable) -> torch.Tensor:
    """``obj`` (a fresh host tensor) where a torch.load-style ``fn(storage, location)`` puts
    its storage: None means the saved device; a storage of its bytes elsewhere becomes the
    tensor's (on that device, no second copy)."""
    key, size = entry["key"], obj.untyped_storage().nbytes()
    res = allocate(key, size, "map_location", lambda: fn(obj.untyped_storage(), entry["device"]))
    if res is None:
        dev = device(entry, None)
        return obj if dev.type == "cpu" else allocate(key, size, str(dev), lambda: obj.to(dev))
    if isinstance(res, torch.TypedStorage):
        res = res.untyped()
    if not isinstance(res, torch.UntypedStorage) or res.nbytes() != size:
        raise CheckpointError(
            f"map_location returned {type(res).__name__} for tensor {key!r}: torch.load's kind "
            "of map_location returns the storage it is given (moved or not) or None"
        )
    if res.device == obj.device and res.data_ptr() == obj.untyped_storage().data_ptr():
        return obj
    out = torch.empty(0, dtype=obj.dtype, device=res.device)
    return out.set_(res, obj.storage_offset(), obj.shape, obj.stride())
