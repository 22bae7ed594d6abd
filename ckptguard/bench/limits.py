"""The machine's own limits, measured in the directory the engines write to.

- sequential write, by each strategy a writer can use (large aligned blocks of incompressible
  bytes, fsync of each file and the directory inside the timing): write everything then fsync,
  one file and several files in parallel; buffered with early writeback (writeback of each block
  started as soon as it is written); O_DIRECT (skipped, with the reason, where the file system
  refuses it). The best of them is "the write limit": a writer that picks its strategy well
  reaches it, so an engine above 100% of it would mean the limit was measured wrong;
- cold sequential read of those files (page cache dropped first; the method is recorded);
- host memory copy (the floor of a capture on CPU);
- on a GPU: pinned and pageable device-to-host and host-to-device copies into (from) a host buffer
  allocated once and reused (pages faulted in before timing), and a device-to-host copy into
  freshly allocated, untouched pageable memory each time (what ``t.cpu()`` does: the page faults
  are part of the copy).

Rates are logical bytes per second of wall time, in GB/s (10^9).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckptguard.units import GB

from ..fsutil import fsync_dir
from ..io import write_all
from .disk import make_cold, start_writeback

BLOCK = 16 << 20  # bytes per write() / readinto(); a multiple of 4096


def _aligned_block(nbytes: int = BLOCK) -> mmap.mmap:
    """A page-aligned block of incompressible bytes (at most BLOCK, at least one page)."""
    n = min(BLOCK, max(4096, nbytes // 4096 * 4096))
    buf = mmap.mmap(-1, n)
    buf.write(os.urandom(n))
    return buf


class Refused(Exception):
    """The file system refuses a write strategy here (O_DIRECT on tmpfs, for one)."""


def _open_direct(path: str) -> int:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        raise Refused("this platform has no O_DIRECT")
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise Refused(f"the file system refuses O_DIRECT ({exc.strerror})") from None
        raise


def _write_file(path: str, nbytes: int, block: mmap.mmap, strategy: str = "fsync") -> str:
    """Write ``nbytes`` of ``block`` to ``path`` by ``strategy``, then fsync; say how.

    fsync: buffered writes, one fsync at the end. writeback: buffered, and writeback of each block
    started once it is written (sync_file_range; where that call is missing, fdatasync of each
    block). direct: O_DIRECT from the page-aligned block (Refused where the file system says no).
    """
    how = HOW_WRITE[strategy]
    if strategy == "direct":
        fd = _open_direct(path)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(block)
        pos = 0
        while pos < nbytes:
            try:
                n = write_all(fd, view[: min(nbytes - pos, len(view))])
            except OSError as exc:
                if strategy == "direct" and exc.errno == errno.EINVAL:
                    raise Refused(
                        f"the file system refuses O_DIRECT writes ({exc.strerror})"
                    ) from None
                raise
            if strategy == "writeback" and not start_writeback(fd, pos, n):
                os.fdatasync(fd)
                how = "buffered, fdatasync of each 16 MiB block (no sync_file_range here)"
            pos += n
        os.fsync(fd)
    finally:
        os.close(fd)
    return how


HOW_WRITE = {
    "fsync": "buffered, write everything then fsync",
    "writeback": "buffered, writeback of each 16 MiB block started at once (sync_file_range)",
    "direct": "O_DIRECT, 16 MiB page-aligned writes, then fsync",
}


def _read_file(path: str) -> int:
    buf = bytearray(BLOCK)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / GB if seconds > 0 else 0.0


def write_strategies(parallel: int) -> list[tuple[str, int]]:
    """(strategy, files) of every write limit measured, in the order of the first trial."""
    plan = [("fsync", 1), ("writeback", 1), ("direct", 1)]
    return plan + ([("fsync", parallel)] if parallel > 1 else [])


def _write_limit(
    work: str, strategy: str, nfiles: int, nbytes: int, block: mmap.mmap
) -> tuple[dict[str, Any], list[str]]:
    """One write limit: the entry and the files it wrote (none when the strategy was refused)."""
    per = max(4096, (nbytes // nfiles) // 4096 * 4096)
    paths = [os.path.join(work, f"{strategy}-{nfiles}-{i}.bin") for i in range(nfiles)]
    entry: dict[str, Any] = {"limit": f"write_{strategy}", "files": nfiles}
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(nfiles) as pool:
            hows = list(pool.map(lambda p: _write_file(p, per, block, strategy), paths))
        fsync_dir(work)
    except Refused as exc:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        entry.update(bytes=0, seconds=0.0, gbps=0.0, skipped=str(exc))
        return entry, []
    dt = time.perf_counter() - t0
    total = per * nfiles
    entry.update(bytes=total, seconds=dt, gbps=_rate(total, dt), how=hows[0])
    return entry, paths


def disk_limits(
    directory: str, nbytes: int, parallel: int, evict_bytes: int = 0, trial: int = 0
) -> list[dict[str, Any]]:
    """One trial of every write strategy (their order rotates with ``trial``, so that none
    always runs first) and a cold read of what the write-then-fsync ones wrote.

    Every call returns the same entries in the same order (a refused strategy gives an entry
    with ``skipped``), so that ranks can combine them entry by entry.
    """
    work = os.path.join(directory, "limits")
    os.makedirs(work, exist_ok=True)
    block = _aligned_block(nbytes)
    plan = write_strategies(parallel)
    k = trial % len(plan)
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        for strategy, nfiles in plan[k:] + plan[:k]:
            entry, paths = _write_limit(work, strategy, nfiles, nbytes, block)
            out[(strategy, nfiles)] = [entry]
            if strategy == "fsync" and paths:
                cold = make_cold(paths, directory, evict_bytes)
                t0 = time.perf_counter()
                with ThreadPoolExecutor(nfiles) as pool:
                    got = sum(pool.map(_read_file, paths))
                dt = time.perf_counter() - t0
                read = {"limit": "read_cold", "files": nfiles, "bytes": got, "seconds": dt}
                out[(strategy, nfiles)].append({**read, "gbps": _rate(got, dt), "cache": cold})
            for p in paths:
                os.remove(p)
    finally:
        block.close()
        shutil.rmtree(work, ignore_errors=True)
    return [e for key in plan for e in out[key]]


def _best_of(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memcpy_limit(nbytes: int, reps: int = 3) -> dict[str, Any]:
    """Host-to-host copy rate with torch's copy (bytes copied once per copy)."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    dt = _best_of(lambda: dst.copy_(src), reps)
    return {
        "limit": "memcpy",
        "bytes": nbytes,
        "seconds": dt,
        "gbps": _rate(nbytes, dt),
        "how": "copy_ between two pre-faulted host buffers",
    }


HOW = {
    "pinned": "pinned host buffer, allocated once and reused",
    "pageable": "pageable host buffer, allocated once, pre-faulted and reused",
    "pageable_fresh": "fresh pageable allocation per copy, untouched (t.cpu())",
}


def fresh_host_copy_seconds(src: Any, reps: int, sync: Any) -> float:
    """Median seconds of copying ``src`` into newly allocated, untouched pageable host memory
    (``src.to("cpu", copy=True)``, as ``t.cpu()`` does), the copy freed before the next one.

    Each copy gets fresh pages from the allocator (blocks this large are mmap'ed and unmapped on
    free), so the page faults of the destination are timed along with the transfer.
    """
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        host = src.to("cpu", copy=True)
        sync()
        times.append(time.perf_counter() - t0)
        del host
    return statistics.median(times)


def gpu_copy_limits(nbytes: int, pageable_bytes: int, reps: int = 3) -> list[dict[str, Any]]:
    """Pinned and pageable device-to-host and host-to-device copy rates on cuda:0, and the
    device-to-host rate into a fresh pageable allocation; [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    pageable_bytes = min(pageable_bytes, nbytes)  # copies are of slices of one device buffer
    out = []
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.fill_(1)
    for kind, n in (("pinned", nbytes), ("pageable", pageable_bytes)):
        if n <= 0:
            continue
        host = torch.empty(n, dtype=torch.uint8, pin_memory=(kind == "pinned"))
        host.fill_(0)  # fault the pages in: measure the copy, not the allocation
        d = dev[:n]
        for direction, fn in (
            ("d2h", lambda h=host, d=d: h.copy_(d, non_blocking=True)),
            ("h2d", lambda h=host, d=d: d.copy_(h, non_blocking=True)),
        ):

            def run(fn: Any = fn) -> None:
                fn()
                torch.cuda.synchronize()

            run()  # warm-up
            dt = _best_of(run, reps)
            out.append(
                {
                    "limit": f"{direction}_{kind}",
                    "bytes": n,
                    "seconds": dt,
                    "gbps": _rate(n, dt),
                    "how": HOW[kind],
                }
            )
        del host
    if pageable_bytes > 0:  # no warm-up: every copy's destination is new memory
        dt = fresh_host_copy_seconds(dev[:pageable_bytes], reps, torch.cuda.synchronize)
        out.append(
            {
                "limit": "d2h_pageable_fresh",
                "bytes": pageable_bytes,
                "seconds": dt,
                "gbps": _rate(pageable_bytes, dt),
                "how": HOW["pageable_fresh"],
            }
        )
    del dev
    torch.cuda.empty_cache()
    return out
