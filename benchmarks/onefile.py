"""One-file checkpoints against directory checkpoints of the same state, interleaved.

Each round saves the workload with ckptguard's defaults to a directory checkpoint
(``store/d-N``, committed with LATEST) and to a one-file checkpoint (``m-N.pt``), in an order
that alternates per round, then loads each back (verified, page cache dropped first where the
platform allows, so the loads read the disk). torch.save + fsync of the same state is measured in
the same rounds as the reference a one-file path replaces.

Reported: the median save and load seconds of each, and one-file over directory (the target:
a one-file save no slower than a directory save, i.e. <= 1.0x within the spread shown).

    python benchmarks/onefile.py --workload model --size 1GiB --rounds 5 [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch

import ckptguard
from ckptguard.bench.workloads import WORKLOADS, make_workload
from ckptguard.units import parse_size


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_cache(path: str) -> None:
    """Ask the kernel to forget the cached pages of every file under ``path``."""
    files = [path] if os.path.isfile(path) else []
    for d, _, names in os.walk(path):
        files += [os.path.join(d, n) for n in names]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _torch_save(state: Any, root: str, n: int) -> str:
    path = os.path.join(root, f"t-{n}.pt")
    torch.save(state, path)
    _fsync(path)
    _fsync(root)
    return path


ENGINES = {
    "directory": (
        lambda s, root, n: ckptguard.save(s, os.path.join(root, "store", f"d-{n}")).path,
        lambda p: ckptguard.load(p),
    ),
    "one-file": (
        lambda s, root, n: ckptguard.save(s, os.path.join(root, f"m-{n}.pt")).path,
        lambda p: ckptguard.load(p),
    ),
    "torch.save": (
        _torch_save,
        lambda p: torch.load(p, weights_only=True),
    ),
}


def run(workload: str, size: int, rounds: int, root: str) -> dict[str, dict[str, list[float]]]:
    state = make_workload(workload, size).state
    times: dict[str, dict[str, list[float]]] = {e: {"save": [], "load": []} for e in ENGINES}
    names = list(ENGINES)
    for rnd in range(rounds + 1):  # round 0 warms up and is not counted
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            save, load = ENGINES[name]
            t0 = time.perf_counter()
            path = save(state, root, rnd)
            t1 = time.perf_counter()
            _drop_cache(path)
            t2 = time.perf_counter()
            load(path)
            t3 = time.perf_counter()
            if rnd:
                times[name]["save"].append(t1 - t0)
                times[name]["load"].append(t3 - t2)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="model", choices=WORKLOADS)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="ckg-onefile-", dir=a.dir)
    try:
        times = run(a.workload, parse_size(a.size), a.rounds, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {e: {k: statistics.median(v) for k, v in t.items()} for e, t in times.items()}
    print(f"{a.workload} {a.size}, {a.rounds} rounds (medians; min-max)")
    print(f"{'engine':<12} {'save s':>18} {'cold load s':>18}")
    for e, t in times.items():
        s, ld = t["save"], t["load"]
        print(
            f"{e:<12} {med[e]['save']:7.3f} ({min(s):.2f}-{max(s):.2f}) "
            f"{med[e]['load']:7.3f} ({min(ld):.2f}-{max(ld):.2f})"
        )
    for k in ("save", "load"):
        ratio = med["one-file"][k] / med["directory"][k]
        print(f"one-file {k} vs directory: {ratio:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"times": times, "medians": med}, f, indent=1)


if __name__ == "__main__":
    main()
