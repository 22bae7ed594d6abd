"""DCP with ckptguard's storage backend against DCP's own FileSystemWriter/Reader, interleaved.

Each round saves the same state with ``dcp.save`` through ``ckptguard.dcp.Writer`` (a ckptguard
checkpoint: hashed, compress="auto", committed with LATEST) and through DCP's FileSystemWriter
(its defaults: one file per rank, fsync), in an order that alternates per round, then loads
each back with ``dcp.load`` into a preallocated copy of the state (``ckptguard.dcp.Reader``
with every chunk verified; FileSystemReader), the page cache dropped first where the platform
allows so that the loads read the disk. One process (DCP's no-process-group path).

Reported: the median save and load seconds of each and ckptguard over DCP (the target: <= 1.0x,
no slower, within the spread shown).

    python benchmarks/dcp_backend.py --workload model --size 256MiB --rounds 5 [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import ckptguard.dcp
from ckptguard.bench.workloads import WORKLOADS, make_workload
from ckptguard.units import parse_size


def _drop_cache(path: str) -> None:
    """Ask the kernel to forget the cached pages of every file under ``path``."""
    for d, _, names in os.walk(path):
        for n in names:
            fd = os.open(os.path.join(d, n), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _zeros(state: Any) -> Any:
    """A state of the same structure with every tensor a fresh zeroed one (the load target)."""
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: _zeros(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_zeros(v) for v in state]
    return state


Engine = tuple[Callable[[Any, str], None], Callable[[Any, str], None]]

ENGINES: dict[str, Engine] = {
    "ckptguard": (
        lambda s, p: dcp.save(s, storage_writer=ckptguard.dcp.Writer(p)),
        lambda s, p: dcp.load(s, storage_reader=ckptguard.dcp.Reader(p)),
    ),
    "dcp": (
        lambda s, p: dcp.save(s, storage_writer=dcp.FileSystemWriter(p)),
        lambda s, p: dcp.load(s, storage_reader=dcp.FileSystemReader(p)),
    ),
}


def run(workload: str, size: int, rounds: int, root: str) -> dict[str, dict[str, list[float]]]:
    state = make_workload(workload, size).state
    target = _zeros(state)
    times: dict[str, dict[str, list[float]]] = {e: {"save": [], "load": []} for e in ENGINES}
    names = list(ENGINES)
    for rnd in range(rounds + 1):  # round 0 warms up and is not counted
        for name in names if rnd % 2 == 0 else names[::-1]:
            save, load = ENGINES[name]
            path = os.path.join(root, name, f"r-{rnd}")
            t0 = time.perf_counter()
            save(state, path)
            t1 = time.perf_counter()
            _drop_cache(path)
            t2 = time.perf_counter()
            load(target, path)
            t3 = time.perf_counter()
            if rnd:
                times[name]["save"].append(t1 - t0)
                times[name]["load"].append(t3 - t2)
            shutil.rmtree(path)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="model", choices=WORKLOADS)
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    root = tempfile.mkdtemp(prefix="ckg-dcp-", dir=a.dir)
    try:
        times = run(a.workload, parse_size(a.size), a.rounds, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {e: {k: statistics.median(v) for k, v in t.items()} for e, t in times.items()}
    print(f"{a.workload} {a.size}, {a.rounds} rounds (medians; min-max)")
    print(f"{'engine':<10} {'save s':>18} {'cold load s':>18}")
    for e, t in times.items():
        s, ld = t["save"], t["load"]
        print(
            f"{e:<10} {med[e]['save']:7.3f} ({min(s):.2f}-{max(s):.2f}) "
            f"{med[e]['load']:7.3f} ({min(ld):.2f}-{max(ld):.2f})"
        )
    for k in ("save", "load"):
        print(f"ckptguard {k} vs DCP: {med['ckptguard'][k] / med['dcp'][k]:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"times": times, "medians": med}, f, indent=1)


if __name__ == "__main__":
    main()
