"""What an incremental save (``base=``, docs/format.md section 4.3) writes and costs.

The ``finetune`` workload of ``ckptguard bench`` (a frozen bf16 base of ~95% of the bytes, LoRA
adapters and their AdamW state): each round saves it in full as ``a`` in a fresh store, takes one
optimizer step, then saves the second checkpoint twice, in an order that alternates from round
to round: ``full`` (a full save into a fresh store) and ``incremental`` (``base="a"`` beside
``a``). Each save is durable when it returns (fsync, the commit). Then both second checkpoints
are loaded, alternating again, after ``sync`` (no writeback behind the loads), ``LOADS`` times
each: with their files in the page cache (``warm``), then after ``posix_fadvise(DONTNEED)`` on
each of their files before each load (``cold``: read from the disk where the file system
honours it); the median of each counts.

Reported, the median over the rounds of each round's ratio: the bytes the second save wrote
(its own data files, index and manifest; linked files are not written) against the full
save's, its time against the full save's, and each load's time against the full checkpoint's.
In the same run, for reading them against the machine: the single-thread xxh3-128
rate (the reuse decision hashes every chunk) and the disk's durable write rate (256 MiB written
and fsynced). With ``--loaded`` each trial runs beside CPU hogs (one per core), reported
apart.

    python benchmarks/incremental.py --size 1GiB --rounds 5 --dir /tmp [--loaded] [--json F]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import xxhash

import ckptguard
from ckptguard.bench.workloads import make_workload
from ckptguard.units import parse_size

LOADS = 3  # loads of each checkpoint per round and kind, alternating; their median counts


def _written(ckpt: Path) -> int:
    """Bytes a save wrote into checkpoint ``ckpt``: every file but the linked data files."""
    return sum(p.stat().st_size for p in ckpt.iterdir() if p.name.count(".") < 2)


def _evict(ckpt: Path) -> None:
    for p in ckpt.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _timed(fn: Any, *args: Any, **kw: Any) -> float:
    t0 = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0


def _xxh3_rate() -> float:
    buf = os.urandom(256 << 20)
    xxhash.xxh3_128_digest(buf)
    return len(buf) / _timed(xxhash.xxh3_128_digest, buf) / 1e9


def _disk_rate(where: str) -> float:
    path = os.path.join(where, f"ckg-incr-disk-{os.getpid()}")
    buf = os.urandom(256 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    rate = len(buf) / (time.perf_counter() - t0) / 1e9
    os.unlink(path)
    return rate


def _hog(stop: Any) -> None:
    x = 0
    while not stop.is_set():
        x = (x * 1103515245 + 12345) % (1 << 31)


def round_once(state: dict, advance: Any, where: str, order: list[str]) -> dict[str, float]:
    """One round: ``a`` in full, one step, the second save both ways (in ``order``), both
    loads warm and cold (in ``order``)."""
    root = Path(tempfile.mkdtemp(dir=where, prefix="ckg-incr-"))
    try:
        out: dict[str, float] = {}
        out["first_s"] = _timed(ckptguard.save, state, str(root / "s" / "a"))
        out["full_first_bytes"] = _written(root / "s" / "a")
        advance(state)
        paths = {"full": root / "f" / "b", "incremental": root / "s" / "b"}
        for v in order:
            kw = {"base": "a"} if v == "incremental" else {}
            out[f"{v}_s"] = _timed(ckptguard.save, state, str(paths[v]), **kw)
            out[f"{v}_bytes"] = _written(paths[v])
        body = json.loads((paths["incremental"] / "MANIFEST.json").read_bytes())["manifest"]
        assert body.get("incremental", {}).get("base") == "a", "the save did not link its base"
        os.sync()  # no writeback of the saves behind the loads
        for kind in ("warm", "cold"):
            times: dict[str, list[float]] = {v: [] for v in order}
            for _ in range(LOADS):
                for v in order:
                    if kind == "cold":
                        _evict(paths[v])
                        _evict(root / "s" / "a")
                    times[v].append(_timed(ckptguard.load, str(paths[v])))
            for v in order:
                out[f"{v}_load_{kind}_s"] = statistics.median(times[v])
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(size: int, rounds: int, where: str, loaded: bool) -> dict[str, Any]:
    w = make_workload("finetune", size)
    assert w.advance is not None
    result: dict[str, Any] = {
        "workload": w.description,
        "logical_bytes": w.logical_bytes,
        "xxh3_128_GBps_1_thread": round(_xxh3_rate(), 2),
        "disk_write_fsync_GBps": round(_disk_rate(where), 2),
        "cpus": os.cpu_count(),
        "loaded": loaded,
    }
    stop = mp.Event()
    hogs = [mp.Process(target=_hog, args=(stop,)) for _ in range(os.cpu_count() or 1)]
    if loaded:
        for h in hogs:
            h.start()
    try:
        trials = []
        for r in range(rounds):
            order = ["full", "incremental"] if r % 2 == 0 else ["incremental", "full"]
            trials.append(round_once(w.state, w.advance, where, order))
            print(json.dumps({k: round(v, 4) for k, v in trials[-1].items()}), flush=True)
    finally:
        stop.set()
        for h in hogs:
            if h.is_alive():
                h.join()
    med = {k: statistics.median(t[k] for t in trials) for k in trials[0]}
    result["median"] = {k: round(v, 4) for k, v in med.items()}

    def ratio(a: str, b: str) -> float:  # the median of the rounds' own ratios
        return round(statistics.median(t[a] / t[b] for t in trials), 4)

    result["ratios"] = {
        "bytes_written": ratio("incremental_bytes", "full_bytes"),
        "save_time": ratio("incremental_s", "full_s"),
        "load_warm": ratio("incremental_load_warm_s", "full_load_warm_s"),
        "load_cold": ratio("incremental_load_cold_s", "full_load_cold_s"),
    }
    result["trials"] = trials
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--loaded", action="store_true", help="CPU hogs beside every trial")
    ap.add_argument("--json")
    a = ap.parse_args()
    res = run(parse_size(a.size), a.rounds, a.dir, a.loaded)
    res.update(size=a.size, rounds=a.rounds, dir=a.dir, load_average=os.getloadavg())
    print(json.dumps({k: v for k, v in res.items() if k != "trials"}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
