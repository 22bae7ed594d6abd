"""The capture step of an async save: copy a state's tensors into a reusable host pool.

The state is first flattened (``tree.flatten``: the one tree walk, tensor identity rule and
depth limit of every save); a snapshot is that ``Flat`` with each tensor's value replaced by a
plain host copy in one region of the pool (same dtype and shape, conjugate and negative views
resolved). Torch tensors and numpy arrays are copied, CPU ones too, so the caller may change its
own tensors as soon as the snapshot is complete; other values are already JSON (or pickled) in
the tree.

The pool is a few large uint8 tensors (pinned when CUDA is available), allocated on first need
and reused; each region holds one snapshot at a time, carved by a bump allocator. Device-to-host
copies run on a dedicated CUDA stream per device, ordered after the caller's stream, and an event
per device marks the snapshot complete.

A state larger than the pool's bound is not snapshotted: ``HostPool.stream_buffers`` lends the
pool's memory as two buffers that the save streams the state through (``sources.BufferedSource``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .errors import CaptureCancelledError, HostPoolTooSmallError
from .sources import CopyStreams
from .tree import Flat, TensorRef, flatten

ALIGN = 64


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def refs_bytes(refs: list[TensorRef]) -> int:
    """Host bytes a snapshot of these tensors takes in the pool (each 64-byte aligned)."""
    return sum(_aligned(_nbytes(r.value)) for r in refs)


def _nbytes(v: Any) -> int:
    return v.nbytes if isinstance(v, np.ndarray) else v.numel() * v.element_size()


def state_bytes(obj: Any) -> int:
    """Host bytes a snapshot of ``obj`` takes in the pool: its tensors as ``flatten`` finds them
    (the same tensor reached twice counted once)."""
    return refs_bytes(flatten(obj, tensors_only=True)[1])


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

    def stream_buffers(
        self, unit: int, cancelled: Callable[[], bool] = lambda: False
    ) -> StreamBuffers:
        """Lend the pool as two buffers, each a multiple of ``unit`` bytes (``StreamBuffers``)."""
        return StreamBuffers(self, unit, cancelled)

    def lend(self, nbytes: int, cancelled: Callable[[], bool]) -> list[Region]:
        """Every region, once none is busy, reshaped where needed into room for two buffers of
        ``nbytes``; returns the one or two regions holding them, busy until released."""
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


class StreamBuffers:
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
            self.regions = self.pool.lend(self.piece, self.cancelled)
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

    def __init__(self, state: Any, region: Region | None, events: list) -> None:
        self.state = state
        self.region = region
        self.events = events

    def wait(self) -> None:
        for e in self.events:
            e.synchronize()
        self.events = []


class _HostCopier:
    """Copies tensors and arrays into a region; CUDA copies go on ``streams``' copy streams."""

    def __init__(self, region: Region, streams: CopyStreams) -> None:
        self.region = region
        self.streams = streams

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A plain host copy of ``t``'s values (conjugate and negative bits resolved by copy_)."""
        src = t.detach()
        dst = self.region.take(src.numel() * src.element_size())
        dst = (
            dst.view(src.dtype).view(src.shape)
            if src.numel()
            else torch.empty(src.shape, dtype=src.dtype)
        )
        if src.device.type == "cuda" and src.numel():
            with torch.cuda.stream(self.streams.get(src.device)):
                dst.copy_(src, non_blocking=True)
        elif src.numel():
            if src.device.type != "cpu":
                src = src.cpu()
            dst.copy_(src)
        return dst

    def array(self, a: np.ndarray) -> np.ndarray:
        raw = self.region.take(a.nbytes).numpy()
        dst = raw.view(a.dtype).reshape(a.shape) if a.nbytes else np.empty_like(a)
        np.copyto(dst, a)
        return dst

    def ref(self, r: TensorRef) -> TensorRef:
        """``r`` with its value replaced by the copy (type facts, key and box unchanged)."""
        v = self.array(r.value) if isinstance(r.value, np.ndarray) else self.tensor(r.value)
        return dataclasses.replace(r, value=v, outer=v)


def capture(
    flat: Flat,
    region: Region,
    streams: dict | None = None,
    caller_streams: dict | None = None,
) -> Snapshot:
    """Copy the tensors of ``flat`` (``tree.flatten``'s result) into ``region``; CUDA copies are
    queued on ``streams`` (see ``Snapshot``). The snapshot's state is a ``Flat`` the saver takes
    as it is: the tree walk, the tensor identity rule and the depth limit are flatten's alone."""
    copy_streams = CopyStreams(streams, caller_streams)
    c = _HostCopier(region, copy_streams)
    state = Flat(flat.tree, [c.ref(r) for r in flat.refs], flat.used_pickle)
    events = []
    for s in copy_streams.used.values():
        e = torch.cuda.Event()
        e.record(s)
        events.append(e)
    return Snapshot(state, region, events)


def caller_streams() -> dict | None:
    """The calling thread's current CUDA stream per device (copies are ordered after them)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return {i: torch.cuda.current_stream(i) for i in range(torch.cuda.device_count())}
