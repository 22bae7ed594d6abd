"""What chunk digests (SHA-256, feature ``digests``) and signing cost a durable save (issue 17).

Interleaved: each round saves the same state once per variant, the order rotating from round
to round, into a fresh directory on the disk given (``--dir``), with the default options
(``compress="auto"``, fsync). Variants: ``plain`` (no digests), ``digests`` (``digests=True``)
and, where ckptguard has signing and ``--key`` names an Ed25519 key, ``signed``
(``sign_key=``). Workloads: ``model`` (``ckptguard bench``'s model workload: fp32 weights and
Adam state, ``--size`` bytes) and ``small`` (10,000 fp32 tensors of 4 KiB). Reported per
workload: the median save seconds of each variant and its ratio to ``plain`` (the cost), and
the machine's single-thread SHA-256 and xxh3-128 rates measured in the same run, so the ratio
can be read against them.

    python benchmarks/digest_cost.py --size 1GiB --rounds 5 --dir /tmp [--key K.key] [--json F]
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import xxhash

import ckptguard
from ckptguard.bench.workloads import make_workload
from ckptguard.units import parse_size


def _rate(fn: Any, buf: bytes) -> float:
    fn(buf)
    t0 = time.perf_counter()
    fn(buf)
    return len(buf) / (time.perf_counter() - t0) / 1e9


def _variants(key: str | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"plain": {}, "digests": {"digests": True}}
    if key and "sign_key" in inspect.signature(ckptguard.save).parameters:
        out["signed"] = {"sign_key": key}
    return out


def run(size: int, rounds: int, where: str, key: str | None) -> dict[str, Any]:
    """Median save seconds per workload and variant, and the hash rates of this machine."""
    sample = os.urandom(256 << 20)
    result: dict[str, Any] = {
        "sha256_GBps": round(_rate(lambda b: hashlib.sha256(b).digest(), sample), 2),
        "xxh3_128_GBps": round(_rate(xxhash.xxh3_128_digest, sample), 2),
        "cpus": os.cpu_count(),
        "workloads": {},
    }
    del sample
    variants = _variants(key)
    for name in ("model", "small"):
        state = make_workload(name, size).state
        times: dict[str, list[float]] = {v: [] for v in variants}
        names = list(variants)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for v in order:
                d = tempfile.mkdtemp(dir=where, prefix="ckg-digest-")
                try:
                    t0 = time.perf_counter()
                    ckptguard.save(state, os.path.join(d, "c"), **variants[v])
                    times[v].append(time.perf_counter() - t0)
                finally:
                    shutil.rmtree(d, ignore_errors=True)
        med = {v: statistics.median(ts) for v, ts in times.items()}
        result["workloads"][name] = {
            "seconds": {v: round(m, 3) for v, m in med.items()},
            "ratio_to_plain": {v: round(m / med["plain"], 3) for v, m in med.items()},
            "all": {v: [round(t, 3) for t in ts] for v, ts in times.items()},
        }
        print(name, json.dumps(result["workloads"][name]["ratio_to_plain"]), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--key", help="an Ed25519 private key (ckptguard key generate)")
    ap.add_argument("--json")
    a = ap.parse_args()
    res = run(parse_size(a.size), a.rounds, a.dir, a.key)
    res.update(size=a.size, rounds=a.rounds, dir=a.dir, load=os.getloadavg())
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
