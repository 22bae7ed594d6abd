"""The machine's own limits, measured in the directory the engines write to.

- sequential write with fsync: one file, and several files in parallel (large aligned blocks of
  incompressible bytes, fsync of each file and the directory inside the timing);
- cold sequential read of those files (page cache dropped first; the method is recorded);
- host memory copy (the floor of a capture on CPU);
- on a GPU: pinned and pageable device-to-host and host-to-device copies into (from) a host buffer
  allocated once and reused (pages faulted in before timing), and a device-to-host copy into
  freshly allocated, untouched pageable memory each time (what ``t.cpu()`` does: the page faults
  are part of the copy).

Rates are logical bytes per second of wall time, in GB/s (10^9).
"""

from __future__ import annotations

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
from .disk import make_cold

BLOCK = 16 << 20  # bytes per write() / readinto(); a multiple of 4096


def _aligned_block(nbytes: int = BLOCK) -> mmap.mmap:
    """A page-aligned block of incompressible bytes (at most BLOCK, at least one page)."""
    n = min(BLOCK, max(4096, nbytes // 4096 * 4096))
    buf = mmap.mmap(-1, n)
    buf.write(os.urandom(n))
    return buf


def _write_file(path: str, nbytes: int, block: mmap.mmap) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(block)
        left = nbytes
        while left > 0:
            left -= write_all(fd, view[: min(left, len(view))])
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(path: str) -> int:
    buf = bytearray(BLOCK)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / GB if seconds > 0 else 0.0


def disk_limits(
    directory: str, nbytes: int, parallel: int, evict_bytes: int = 0
) -> list[dict[str, Any]]:
    """One trial of write (1 file, then ``parallel`` files) and cold read (each set)."""
    work = os.path.join(directory, "limits")
    os.makedirs(work, exist_ok=True)
    block = _aligned_block(nbytes)
    out: list[dict[str, Any]] = []
    try:
        for nfiles in (1, parallel):
            per = max(4096, (nbytes // nfiles) // 4096 * 4096)
            paths = [os.path.join(work, f"seq-{nfiles}-{i}.bin") for i in range(nfiles)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(nfiles) as pool:
                list(pool.map(lambda p, n=per: _write_file(p, n, block), paths))
            fsync_dir(work)
            dt = time.perf_counter() - t0
            total = per * nfiles
            out.append(
                {
                    "limit": "write_fsync",
                    "files": nfiles,
                    "bytes": total,
                    "seconds": dt,
                    "gbps": _rate(total, dt),
                }
            )
            cold = make_cold(paths, directory, evict_bytes)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(nfiles) as pool:
                got = sum(pool.map(_read_file, paths))
            dt = time.perf_counter() - t0
            out.append(
                {
                    "limit": "read_cold",
                    "files": nfiles,
                    "bytes": got,
                    "seconds": dt,
                    "gbps": _rate(got, dt),
                    "cache": cold,
                }
            )
            for p in paths:
                os.remove(p)
    finally:
        block.close()
        shutil.rmtree(work, ignore_errors=True)
    return out


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
