"""What encryption at rest (``encrypt=``, docs/format.md section 4.4) costs a durable save and a
load.

Two workloads of ``ckptguard bench``: ``model`` (bf16 weights and fp32 AdamW state, about
``--size`` bytes) and ``small`` (10,000 fp32 tensors of 4 KiB: per-record costs). Each round
saves the workload twice into fresh stores, in an order that alternates from round to round:
``plain`` and ``sealed`` (``encrypt="bench"``: every tensor under one scope, whose key the
first sealed save of the run creates). Each save is durable when it returns (fsync, the
commit). Then both checkpoints are loaded (verified), alternating again, with their files in
the page cache. The key-encryption key comes from ``CKPTGUARD_KEK`` (set here to a fixed test
value; never do that with a real key).

Reported per workload, the median over the rounds of each round's ratio: the sealed save's time
against the plain save's (the issue's target: at most 1.10 on the model workload) and the
sealed load's against the plain load's. In the same run, for reading them against the machine:
the single-thread AES-256-GCM rate of the ``cryptography`` package (OpenSSL) into a buffer of
its own, and the disk's durable write rate (256 MiB written and fsynced). With ``--loaded``
each trial runs beside CPU hogs (one per core), reported apart.

    python benchmarks/encryption.py --size 1GiB --rounds 5 --dir /tmp [--loaded] [--json F]
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

import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import ckptguard
from ckptguard import backend
from ckptguard.bench.limits import disk_limits
from ckptguard.bench.workloads import make_workload
from ckptguard.units import parse_size

BENCH_KEK = "be" * 32  # a fixed, public test KEK: this benchmark's stores are thrown away
VARIANTS = ("plain", "sealed")


def _timed(fn: Any, *args: Any, **kw: Any) -> float:
    t0 = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0


def _aes_rate() -> float:
    """GB/s of AES-256-GCM over 4 MiB chunks (the default chunk size), one thread."""
    aead, nonce = AESGCM(os.urandom(32)), os.urandom(12)
    data = os.urandom(4 << 20)
    out = bytearray(len(data) + 16)
    aead.encrypt_into(nonce, data, b"", out)
    n = 64
    t0 = time.perf_counter()
    for _ in range(n):
        aead.encrypt_into(nonce, data, b"", out)
    return n * len(data) / (time.perf_counter() - t0) / 1e9


def _disk_rate(where: str) -> float:
    """GB/s of 256 MiB written and fsynced in ``where`` (``ckptguard bench``'s own probe)."""
    fsynced = [e for e in disk_limits(where, 256 << 20, 1) if e["limit"] == "write_fsync"]
    return float(fsynced[0].get("gbps", "nan")) if fsynced else float("nan")


def _hog(stop: Any) -> None:
    x = 0
    while not stop.is_set():
        x = (x * 1103515245 + 12345) % (1 << 31)


def round_once(state: dict, where: str, keyed: Path, order: list[str]) -> dict[str, float]:
    """One round: the save both ways (in ``order``; the sealed one into a fresh checkpoint of
    the store ``keyed``, whose keyring holds the scope's key), then both loads (in ``order``)."""
    root = Path(tempfile.mkdtemp(dir=where, prefix="ckg-enc-"))
    paths = {"plain": root / "p" / "c", "sealed": keyed / root.name}
    try:
        out: dict[str, float] = {}
        for v in order:
            kw = {"encrypt": "bench"} if v == "sealed" else {}
            out[f"{v}_s"] = _timed(ckptguard.save, state, str(paths[v]), **kw)
        body = json.loads((paths["sealed"] / "MANIFEST.json").read_bytes())["manifest"]
        assert "encryption" in body["features"], "the sealed save is not encrypted"
        os.sync()  # no writeback of the saves behind the loads
        for v in order:
            out[f"{v}_load_s"] = _timed(ckptguard.load, str(paths[v]))
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(paths["sealed"], ignore_errors=True)


def run_workload(name: str, size: int, rounds: int, where: str) -> dict[str, Any]:
    w = make_workload(name, size)
    keyed = Path(tempfile.mkdtemp(dir=where, prefix="ckg-enc-store-"))
    try:
        ckptguard.save({"x": torch.ones(4)}, str(keyed / "warmup"), encrypt="bench")
        trials = []
        for r in range(rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            trials.append(round_once(w.state, where, keyed, order))
            print(name, json.dumps({k: round(v, 4) for k, v in trials[-1].items()}), flush=True)
    finally:
        shutil.rmtree(keyed, ignore_errors=True)

    def ratio(a: str, b: str) -> float:  # the median of the rounds' own ratios
        return round(statistics.median(t[a] / t[b] for t in trials), 4)

    med = {k: round(statistics.median(t[k] for t in trials), 4) for k in trials[0]}
    return {
        "workload": w.description,
        "logical_bytes": w.logical_bytes,
        "median": med,
        "ratios": {
            "save_time": ratio("sealed_s", "plain_s"),
            "load_time": ratio("sealed_load_s", "plain_load_s"),
        },
        "trials": trials,
    }


def run(size: int, rounds: int, where: str, loaded: bool) -> dict[str, Any]:
    os.environ["CKPTGUARD_KEK"] = BENCH_KEK
    for var in ("CKPTGUARD_KEK_FILE", "CKPTGUARD_KEK_COMMAND"):
        os.environ.pop(var, None)
    result: dict[str, Any] = {
        "aes_256_gcm_GBps_1_thread": round(_aes_rate(), 2),
        "disk_write_fsync_GBps": round(_disk_rate(where), 2),
        "cpus": os.cpu_count(),
        "backend": backend.name(),
        "loaded": loaded,
    }
    stop = mp.Event()
    hogs = [mp.Process(target=_hog, args=(stop,)) for _ in range(os.cpu_count() or 1)]
    if loaded:
        for h in hogs:
            h.start()
    try:
        for name in ("model", "small"):
            result[name] = run_workload(name, size, rounds, where)
    finally:
        stop.set()
        for h in hogs:
            if h.is_alive():
                h.join()
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
    short = {
        k: ({kk: vv for kk, vv in v.items() if kk != "trials"} if isinstance(v, dict) else v)
        for k, v in res.items()
    }
    print(json.dumps(short, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
