"""The host pool of async saves: reusable host memory for snapshots, prepared ahead of need.

The pool is a few large uint8 tensors (pinned when CUDA is available), each a region that holds
one snapshot at a time, carved front to back. Regions are allocated on a save's first need, or
ahead of the saves by ``prepare`` (on a thread of its own: ``Preparation``), and reused; every
page is touched as it is allocated, so no copy into the pool faults. A state larger than the
pool's bound is not snapshotted: ``HostPool.stream_buffers`` lends the pool's memory as two
buffers that the save streams the state through (``sources.BufferedSource``).
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from collections.abc import Callable
from typing import Any

import torch

from .errors import (
    CaptureCancelledError,
    HostPoolPrepareError,
    HostPoolTooSmallError,
    brief,
)

ALIGN = 64


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


TOUCH_SLICE = 64 << 20  # bytes touched between checks for a stop request


def _host_buffer(nbytes: int, pin: bool, stop: Callable[[], bool] = lambda: False) -> torch.Tensor:
    """``nbytes`` of host memory with every page already mapped, so no copy into it faults.

    Pinned memory is page-locked by CUDA as it is allocated (resident from the start). Pageable
    memory is an anonymous private mapping with transparent huge pages requested (copies into it
    run about 1.3x faster on this kind of machine, from fewer page walks), touched here slice by
    slice: at allocation, never inside a stall. ``stop`` is asked between slices; when it says
    so the buffer is dropped and ``CaptureCancelledError`` raised.
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
    for start in range(0, nbytes, TOUCH_SLICE):
        if stop():
            raise CaptureCancelledError("the host pool's allocation was stopped")
        buf[start : start + TOUCH_SLICE].zero_()
    return buf


Allocator = Callable[[int, bool], tuple[torch.Tensor, Any]]
"""Makes a region's buffer: (bytes, pin) -> (uint8 tensor, a tag such as a shared pool's id)."""


class Region:
    """One reusable host buffer; a snapshot takes its bytes front to back."""

    def __init__(
        self,
        nbytes: int,
        pin: bool,
        allocator: Allocator | None = None,
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        if allocator is None:
            self.buf, self.tag = _host_buffer(nbytes, pin, stop), None
        else:
            self.buf, self.tag = allocator(nbytes, pin)
        self.capacity = nbytes
        self.used = 0
        self.busy = False

    def take(self, nbytes: int) -> torch.Tensor:
        start = self.used
        self.used += aligned(nbytes)
        if self.used > self.capacity:
            raise RuntimeError("capture: region overflow (state changed during capture?)")
        return self.buf[start : start + nbytes]


class HostPool:
    """Host memory for snapshots: at most ``regions`` regions and ``max_bytes`` bytes in all.

    ``acquire`` hands out a free region large enough for one snapshot, allocating or growing one
    while the bound allows, else waiting until ``release`` frees one (or until a region being
    prepared that will fit is ready). ``prepare`` allocates the regions ahead of the saves;
    ``slot_bytes`` does so at construction. Every allocation happens outside the pool's lock,
    its bytes counted against the bound (``pending``) while it runs.
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
        self.pending: list[int] = []  # sizes of the regions being allocated
        self.cond = threading.Condition()
        self.closed = False
        self.allocator = allocator
        self.allocations = 0  # regions allocated so far (for tests and reports)
        if slot_bytes:
            if max_bytes is not None and aligned(slot_bytes) > max_bytes:
                raise HostPoolTooSmallError(
                    f"host_bytes={slot_bytes} does not fit in max_host_bytes={max_bytes}",
                    slot_bytes,
                    max_bytes or 0,
                )
            self.prepare(slot_bytes)

    @property
    def allocated(self) -> int:
        return sum(r.capacity for r in self.regions)

    def acquire(self, nbytes: int, cancelled: Callable[[], bool] = lambda: False) -> Region:
        nbytes = max(aligned(nbytes), ALIGN)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise HostPoolTooSmallError(
                f"a snapshot needs {nbytes} bytes of host memory but max_host_bytes is "
                f"{self.max_bytes} (stream the state through the pool instead)",
                nbytes,
                self.max_bytes,
            )

        def stop() -> bool:
            return self.closed or cancelled()

        with self.cond:
            while True:
                if stop():
                    raise CaptureCancelledError("the capture was cancelled (checkpointer closed)")
                free = [r for r in self.regions if not r.busy]
                fits = [r for r in free if r.capacity >= nbytes]
                if fits:
                    region: Region | None = min(fits, key=lambda r: r.capacity)
                elif any(p >= nbytes for p in self.pending):
                    region = None  # a region being prepared will hold it: wait for that one
                else:
                    region = self._grow(nbytes, free, stop)
                if region is not None:
                    region.busy, region.used = True, 0
                    return region
                self.cond.wait(1.0)

    def prepare(self, nbytes: int, stop: Callable[[], bool] = lambda: False) -> None:
        """Allocate and touch the regions that snapshots of ``nbytes`` take, one after another
        (a save may take the first while the next is allocated), as many as the pool may hold
        and ``max_bytes`` allows, growing free regions that are too small. A state that can
        never fit is streamed through the whole pool: one region of ``max_bytes`` is prepared.

        Returns early when ``stop()`` or the pool is closed (``CaptureCancelledError`` if that
        happens inside an allocation); an allocation's own error (out of memory, a pinned
        allocation refused) is raised, the regions already prepared stay.
        """
        size, count = self.plan(nbytes)

        def halt() -> bool:
            return self.closed or stop()

        with self.cond:
            while not halt():
                have = sum(r.capacity >= size for r in self.regions)
                have += sum(p >= size for p in self.pending)
                if have >= count:
                    return
                small = [r for r in self.regions if not r.busy and r.capacity < size]
                if self._grow(size, small, halt) is None:
                    return  # no room left: the saves hold what the bound allows

    def plan(self, nbytes: int) -> tuple[int, int]:
        """(bytes per region, regions) that ``prepare(nbytes)`` makes the pool hold."""
        if nbytes <= 0:
            return 0, 0
        size = max(aligned(nbytes), ALIGN)
        if self.max_bytes is None:
            return size, self.max_regions
        if size > self.max_bytes:  # streamed: lent whole as two buffers
            return self.max_bytes, 1
        return size, min(self.max_regions, self.max_bytes // size)

    def _room(self, nbytes: int, drop: list[Region]) -> bool:
        """Whether a region of ``nbytes`` fits the bounds once the regions ``drop`` are gone."""
        count = len(self.regions) + len(self.pending) - len(drop)
        used = self.allocated + sum(self.pending) - sum(r.capacity for r in drop)
        limit = self.max_bytes
        return count < self.max_regions and (limit is None or used + nbytes <= limit)

    def _grow(self, nbytes: int, free: list[Region], stop: Callable[[], bool]) -> Region | None:
        """A new region of ``nbytes``, in place of as few regions of ``free`` (the largest first)
        as the bounds need, or None if even all of them are not enough (``cond`` held; it is
        released while the memory is allocated and touched)."""
        drop: list[Region] = []
        for r in sorted(free, key=lambda r: -r.capacity):
            if self._room(nbytes, drop):
                break
            drop.append(r)
        if not self._room(nbytes, drop):
            return None
        return self._allocate(nbytes, drop, stop)

    def _allocate(self, nbytes: int, drop: list[Region], stop: Callable[[], bool]) -> Region:
        for r in drop:  # their bytes leave the pool before the new ones come
            self.regions.remove(r)
            r.buf = torch.empty(0, dtype=torch.uint8)
        self.pending.append(nbytes)
        self.cond.release()
        try:
            region = Region(nbytes, self.pin, self.allocator, stop)
        finally:
            self.cond.acquire()
            self.pending.remove(nbytes)
            self.cond.notify_all()
        self.allocations += 1
        if self.closed:  # close() dropped the free regions: this one goes too
            region.buf = torch.empty(0, dtype=torch.uint8)
            raise CaptureCancelledError("the host pool was closed while it was allocated")
        self.regions.append(region)
        return region

    def fits(self, nbytes: int) -> bool:
        """Whether a snapshot of ``nbytes`` can ever be held (else it must be streamed)."""
        return self.max_bytes is None or max(aligned(nbytes), ALIGN) <= self.max_bytes

    def stream_buffers(
        self, unit: int, cancelled: Callable[[], bool] = lambda: False
    ) -> StreamBuffers:
        """Lend the pool as two buffers, each a multiple of ``unit`` bytes (``StreamBuffers``)."""
        return StreamBuffers(self, unit, cancelled)

    def lend(self, nbytes: int, cancelled: Callable[[], bool]) -> list[Region]:
        """Every region, once none is busy, reshaped where needed into room for two buffers of
        ``nbytes``; returns the one or two regions holding them, busy until released."""
        with self.cond:
            while self.pending or any(r.busy for r in self.regions):
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
                self.allocations += 1
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


class Preparation:
    """``HostPool.prepare`` on a thread of its own, so that the caller goes on at once.

    ``wait()`` returns once the pool is prepared, or raises ``HostPoolPrepareError`` (its
    ``__cause__`` the allocation's error) if it could not be: the saves are unaffected by such a
    failure, each allocates what it needs as it would without a preparation. ``after``: a
    preparation of the same pool that this one follows (they run one at a time).
    """

    def __init__(self, pool: HostPool, nbytes: int, after: Preparation | None = None) -> None:
        self.pool, self.nbytes, self._after = pool, nbytes, after
        self.error: HostPoolPrepareError | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._reported = False
        self._thread = threading.Thread(target=self._run, name="ckptguard-prepare", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._after is not None:
            self._after._thread.join()
        try:
            self.pool.prepare(self.nbytes, self._stop.is_set)
        except CaptureCancelledError:
            pass  # stopped, or the pool closed: nothing failed
        except Exception as e:
            err = HostPoolPrepareError(
                f"the host pool could not be prepared for snapshots of {self.nbytes} bytes "
                f"({brief(e)}); saves allocate it as they need it",
                self.nbytes,
            )
            err.__cause__ = e
            self.error = err

    def done(self) -> bool:
        """Whether the preparation is over (prepared, failed or stopped)."""
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        """Wait until it is over; raises its ``HostPoolPrepareError``, or ``TimeoutError``."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"host pool not prepared after {timeout} s")
        if self.error is not None:
            with self._lock:
                self._reported = True
            raise self.error

    def stop(self) -> None:
        """Stop it and those it follows (at the next slice of memory touched); wait for them."""
        self._stop.set()
        if self._after is not None:
            self._after.stop()
        self._thread.join()

    def unreported_error(self) -> HostPoolPrepareError | None:
        """Its failure, if it failed and neither ``wait`` nor this has returned it before."""
        with self._lock:
            if self.error is None or self._reported:
                return None
            self._reported = True
            return self.error


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
