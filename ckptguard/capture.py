"""The capture step of an async save: copy a state's tensors into a reusable host pool.

A snapshot is the same nested structure with every tensor replaced by a view into one region of
the pool (same dtype and shape): torch tensors and numpy arrays are copied (CPU ones too, so the
caller may change its own tensors as soon as the snapshot is complete), ``Shard`` pieces keep
their wrapper around the copied local tensor, DTensors become the ``Shard`` (or, replicated, the
plain tensor) that the saver would have made of them. Other values are immutable or deep-copied.

The pool is a few large uint8 tensors (pinned when CUDA is available), allocated on first need
and reused; each region holds one snapshot at a time, carved by a bump allocator. Device-to-host
copies run on a dedicated CUDA stream per device, ordered after the caller's stream, and an event
per device marks the snapshot complete.

A state larger than the pool's bound is not snapshotted: ``HostPool.staging`` lends the pool's
memory as two buffers that the save streams the state through (see ``staging``).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import mmap
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .errors import CaptureCancelledError, HostPoolTooSmallError
from .shard import PerRank, Shard, dtensor_shard, is_dtensor

ALIGN = 64


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _copyable(t: Any) -> bool:
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.layout == torch.strided
        and not t.is_quantized
        and not t.is_meta
    )


def _numpy_copyable(a: np.ndarray) -> bool:
    return a.dtype.kind in "biufc" and (a.dtype.isnative or a.dtype.itemsize == 1)


def _ident(t: torch.Tensor) -> tuple:
    """What makes two tensor objects the same tensor to the saver (tied weights stay tied)."""
    ptr = t.untyped_storage().data_ptr() if t.numel() else id(t)
    return (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, str(t.device))


def state_bytes(obj: Any) -> int:
    """Host bytes a snapshot of ``obj`` takes in the pool (each tensor 64-byte aligned)."""
    total = 0
    seen: set = set()
    for t in _tensors(obj):
        key = ("np", id(t)) if isinstance(t, np.ndarray) else _ident(t)
        if key not in seen:
            seen.add(key)
            total += _aligned(
                t.nbytes if isinstance(t, np.ndarray) else t.numel() * t.element_size()
            )
    return total


def _tensors(obj: Any, depth: int = 0) -> Any:
    if depth > 512:
        return
    t = type(obj)
    if t in (dict, collections.OrderedDict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif t in (list, tuple):
        for v in obj:
            yield from _tensors(v, depth + 1)
    elif t in (Shard, PerRank):
        yield from _tensors(obj.local, depth + 1)
    elif is_dtensor(obj):
        yield obj.to_local()
    elif isinstance(obj, np.ndarray):
        if _numpy_copyable(obj):
            yield obj
    elif isinstance(obj, torch.Tensor) and _copyable(obj):
        yield obj


def _host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """``nbytes`` of host memory with every page already mapped, so no copy into it faults.

    Pinned memory is mapped by CUDA. Pageable memory is an anonymous private mapping with
    transparent huge pages requested (copies into it run about 1.3x faster on this kind of
    machine, from fewer page walks), touched once here: at allocation, never inside a stall.
    """
    if pin or nbytes == 0:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    try:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):
                m.madvise(mmap.MADV_HUGEPAGE)
        buf = torch.frombuffer(m, dtype=torch.uint8)  # keeps ``m`` alive as long as it lives
    except (AttributeError, OSError, ValueError):  # no anonymous mmap here: torch's allocator
        buf = torch.empty(nbytes, dtype=torch.uint8)
    buf.zero_()
    return buf


Allocator = Callable[[int, bool], tuple[torch.Tensor, Any]]
"""Makes a region's buffer: (bytes, pin) -> (uint8 tensor, a tag such as a shared pool's id)."""


class Region:
    """One reusable host buffer; a snapshot takes its bytes front to back."""

    def __init__(self, nbytes: int, pin: bool, allocator: Allocator | None = None) -> None:
        if allocator is None:
            self.buf, self.tag = _host_buffer(nbytes, pin), None
        else:
            self.buf, self.tag = allocator(nbytes, pin)
        self.capacity = nbytes
        self.used = 0
        self.busy = False

    def take(self, nbytes: int) -> torch.Tensor:
        start = self.used
        self.used += _aligned(nbytes)
        if self.used > self.capacity:
            raise RuntimeError("capture: region overflow (state changed during capture?)")
        return self.buf[start : start + nbytes]


class HostPool:
    """Host memory for snapshots: at most ``regions`` regions and ``max_bytes`` bytes in all.

    ``acquire`` hands out a free region large enough for one snapshot, allocating or growing one
    while the bound allows, else waiting until ``release`` frees one. ``slot_bytes`` allocates the
    regions up front (as many as fit in ``max_bytes``).
    """

    def __init__(
        self,
        max_bytes: int | None = None,
        regions: int = 2,
        pin: bool | None = None,
        slot_bytes: int | None = None,
        allocator: Allocator | None = None,
    ) -> None:
        if regions < 1:
            raise ValueError("a host pool needs at least one region")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_host_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.max_regions = regions
        self.pin = torch.cuda.is_available() if pin is None else bool(pin)
        self.regions: list[Region] = []
        self.cond = threading.Condition()
        self.closed = False
        self.allocator = allocator
        if slot_bytes:
            n = regions if max_bytes is None else min(regions, max_bytes // _aligned(slot_bytes))
            if n < 1:
                raise HostPoolTooSmallError(
                    f"host_bytes={slot_bytes} does not fit in max_host_bytes={max_bytes}",
                    slot_bytes,
                    max_bytes or 0,
                )
            self.regions = [Region(_aligned(slot_bytes), self.pin, allocator) for _ in range(n)]

    @property
    def allocated(self) -> int:
        return sum(r.capacity for r in self.regions)

    def acquire(self, nbytes: int, cancelled: Callable[[], bool] = lambda: False) -> Region:
        nbytes = max(_aligned(nbytes), ALIGN)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise HostPoolTooSmallError(
                f"a snapshot needs {nbytes} bytes of host memory but max_host_bytes is "
                f"{self.max_bytes} (stream the state through the pool instead)",
                nbytes,
                self.max_bytes,
            )
        with self.cond:
            while True:
                if self.closed or cancelled():
                    raise CaptureCancelledError("the capture was cancelled (checkpointer closed)")
                region = self._try_take(nbytes)
                if region is not None:
                    region.busy, region.used = True, 0
                    return region
                self.cond.wait(1.0)

    def _try_take(self, nbytes: int) -> Region | None:
        free = [r for r in self.regions if not r.busy]
        fits = [r for r in free if r.capacity >= nbytes]
        if fits:
            return min(fits, key=lambda r: r.capacity)
        limit = self.max_bytes
        if len(self.regions) < self.max_regions and (
            limit is None or self.allocated + nbytes <= limit
        ):
            self.regions.append(Region(nbytes, self.pin, self.allocator))
            return self.regions[-1]
        for r in free:  # grow a free region that is too small, if the bound allows
            if limit is None or self.allocated - r.capacity + nbytes <= limit:
                self.regions.remove(r)
                r.buf = torch.empty(0, dtype=torch.uint8)
                self.regions.append(Region(nbytes, self.pin, self.allocator))
                return self.regions[-1]
        return None

    def fits(self, nbytes: int) -> bool:
        """Whether a snapshot of ``nbytes`` can ever be held (else it must be streamed)."""
        return self.max_bytes is None or max(_aligned(nbytes), ALIGN) <= self.max_bytes

    def staging(self, unit: int, cancelled: Callable[[], bool] = lambda: False) -> Staging:
        """Lend the pool as two buffers, each a multiple of ``unit`` bytes (see ``Staging``)."""
        return Staging(self, unit, cancelled)

    def _lend(self, nbytes: int, cancelled: Callable[[], bool]) -> list[Region]:
        with self.cond:
            while any(r.busy for r in self.regions):
                if self.closed or cancelled():
                    raise CaptureCancelledError("the capture was cancelled (checkpointer closed)")
                self.cond.wait(1.0)
            if self.closed or cancelled():
                raise CaptureCancelledError("the capture was cancelled (checkpointer closed)")
            big = [r for r in self.regions if r.capacity >= 2 * nbytes]
            two = sorted(
                (r for r in self.regions if r.capacity >= nbytes), key=lambda r: r.capacity
            )
            if big:
                chosen = [min(big, key=lambda r: r.capacity)]
            elif len(two) >= 2:
                chosen = two[:2]
            else:  # reshape the pool: drop what is free, allocate one region for both buffers
                for r in self.regions:
                    r.buf = torch.empty(0, dtype=torch.uint8)
                self.regions = [Region(2 * nbytes, self.pin, self.allocator)]
                chosen = self.regions[:]
            for r in chosen:
                r.busy, r.used = True, 0
            return chosen

    def retire(self, region: Region) -> None:
        """Never reuse ``region`` (another process may still read it); its bytes leave the pool."""
        with self.cond:
            if region in self.regions:
                self.regions.remove(region)
            self.cond.notify_all()

    def release(self, region: Region) -> None:
        with self.cond:
            region.busy = False
            self.cond.notify_all()

    def close(self) -> None:
        """Wake waiting captures (they raise) and drop the regions not in use."""
        with self.cond:
            self.closed = True
            self.regions = [r for r in self.regions if r.busy]
            self.cond.notify_all()


class Staging:
    """Two equal host buffers lent by a pool for streaming one save (allocated on first use).

    ``unit`` is the granularity a piece must keep (the save's chunk size): each buffer holds the
    largest multiple of it that lets two fit in ``max_host_bytes``.
    """

    def __init__(self, pool: HostPool, unit: int, cancelled: Callable[[], bool]) -> None:
        self.pool, self.unit, self.cancelled = pool, unit, cancelled
        limit = pool.max_bytes
        self.piece = (1 << 30) // unit * unit if limit is None else (limit // 2) // unit * unit
        self.regions: list[Region] = []

    def buffers(self) -> list[torch.Tensor]:
        """The two buffers (raises ``HostPoolTooSmallError`` if two chunks do not fit)."""
        if self.piece < self.unit:
            raise HostPoolTooSmallError(
                f"streaming through the host pool needs two {self.unit}-byte chunks but "
                f"max_host_bytes is {self.pool.max_bytes}: raise max_host_bytes or lower "
                "chunk_size",
                2 * self.unit,
                self.pool.max_bytes or 0,
            )
        if not self.regions:
            self.regions = self.pool._lend(self.piece, self.cancelled)
        if len(self.regions) == 1:
            buf = self.regions[0].buf
            return [buf[: self.piece], buf[self.piece : 2 * self.piece]]
        return [r.buf[: self.piece] for r in self.regions]

    def release(self) -> None:
        for r in self.regions:
            self.pool.release(r)
        self.regions = []


class Snapshot:
    """A state copied into a pool region; ``wait()`` returns once every copy has landed."""

    def __init__(self, state: Any, region: Region, events: list) -> None:
        self.state = state
        self.region = region
        self.events = events

    def wait(self) -> None:
        for e in self.events:
            e.synchronize()
        self.events = []


class _Copier:
    def __init__(self, region: Region, streams: dict, caller_streams: dict | None) -> None:
        self.region = region
        self.streams = streams  # device index -> dedicated copy stream (owned by the pool user)
        self.caller_streams = caller_streams or {}
        self.used: dict[int, Any] = {}
        self.memo: dict[tuple, Any] = {}

    def stream(self, device: torch.device) -> Any:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self.used:
            s = self.streams.get(idx)
            if s is None:
                s = self.streams[idx] = torch.cuda.Stream(device=idx)
            caller = self.caller_streams.get(idx) or torch.cuda.current_stream(idx)
            s.wait_stream(caller)  # copies start after the work the caller queued before saving
            self.used[idx] = s
        return self.used[idx]

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        key = _ident(t)
        if key in self.memo:
            return self.memo[key]
        src = t.detach()
        dst = self.region.take(src.numel() * src.element_size())
        dst = (
            dst.view(src.dtype).view(src.shape)
            if src.numel()
            else torch.empty(src.shape, dtype=src.dtype)
        )
        if src.device.type == "cuda" and src.numel():
            with torch.cuda.stream(self.stream(src.device)):
                dst.copy_(src, non_blocking=True)
        elif src.numel():
            if src.device.type != "cpu":
                src = src.cpu()
            dst.copy_(src)
        if isinstance(t, torch.nn.Parameter):
            dst = torch.nn.Parameter(dst, requires_grad=t.requires_grad)
        elif t.requires_grad and t.is_leaf:
            dst.requires_grad_(True)
        self.memo[key] = dst
        return dst

    def array(self, a: np.ndarray) -> np.ndarray:
        key = ("np", id(a))
        if key not in self.memo:
            raw = self.region.take(a.nbytes).numpy()
            dst = raw.view(a.dtype).reshape(a.shape) if a.nbytes else np.empty_like(a)
            np.copyto(dst, a)
            self.memo[key] = dst
        return self.memo[key]

    def walk(self, obj: Any, depth: int = 0) -> Any:
        if depth > 512:
            return obj  # the saver reports the nesting error
        t = type(obj)
        if obj is None or t in (bool, int, float, str, bytes, torch.dtype, torch.Size):
            return obj
        if t in (dict, collections.OrderedDict):
            return t((k, self.walk(v, depth + 1)) for k, v in obj.items())
        if t is list:
            return [self.walk(v, depth + 1) for v in obj]
        if t is tuple:
            return tuple(self.walk(v, depth + 1) for v in obj)
        if t is Shard:
            return Shard(self.walk(obj.local, depth + 1), obj.global_shape, obj.offsets)
        if t is PerRank:
            return PerRank(self.walk(obj.local, depth + 1))
        if is_dtensor(obj):
            try:
                local, global_shape, offsets, replicated = dtensor_shard(obj)
            except ValueError:
                return obj  # the saver reports it with its key path
            local = self.tensor(local)
            return local if replicated else Shard(local, global_shape, offsets)
        if isinstance(obj, np.ndarray) and _numpy_copyable(obj):
            return self.array(obj)
        if isinstance(obj, torch.Tensor) and _copyable(obj):
            return self.tensor(obj)
        if isinstance(obj, (torch.Tensor, torch.device, np.generic)):
            return obj
        try:  # values the saver may pickle (allow_pickle): a copy, not the caller's object
            return copy.deepcopy(obj)
        except Exception:
            return obj  # the saver reports what it cannot store


def capture(
    obj: Any,
    region: Region,
    streams: dict | None = None,
    caller_streams: dict | None = None,
) -> Snapshot:
    """Copy ``obj`` into ``region``; CUDA copies are queued on ``streams`` (see ``Snapshot``)."""
    c = _Copier(region, {} if streams is None else streams, caller_streams)
    state = c.walk(obj)
    events = []
    for s in c.used.values():
        e = torch.cuda.Event()
        e.record(s)
        events.append(e)
    return Snapshot(state, region, events)


def caller_streams() -> dict | None:
    """The calling thread's current CUDA stream per device (copies are ordered after them)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return {i: torch.cuda.current_stream(i) for i in range(torch.cuda.device_count())}
