"""Commit overhead of a distributed save, and rank 0's work for a simulated 4,096-rank save.

    python benchmarks/commit_scale.py simulate --ranks 4096 --rows 500
    python benchmarks/commit_scale.py overhead --ranks 2,4,8,16,32 [--trials 3]

``simulate`` times exactly what rank 0 does with the reports of every rank (decode the Arrow IPC
reports, validate all rows: shard coverage, contiguity, placement; write index.parquet durably).
``overhead`` runs real saves under ``mpiexec -n N`` (oversubscribed on a small machine) and
reports the time from the last rank's fsync of its data file to the checkpoint being visible.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

HERE = os.path.dirname(os.path.abspath(__file__))


def rank_report(rank: int, ranks: int, rows: int) -> bytes:
    """What rank ``rank`` sends rank 0: one 64-row shard of each of ``rows`` 2-D tensors."""
    from ckptguard.format.index import SCHEMA
    from ckptguard.saver import _ipc, _pack

    raw = 64 * 1024 * 2
    n = rows
    table = pa.table(
        {
            "key": [f"layer{t}/w" for t in range(n)],
            "tensor": pa.array(np.arange(n), pa.int32()),
            "dtype": ["bfloat16"] * n,
            "global_shape": [[ranks * 64, 1024]] * n,
            "shard_offsets": [[rank * 64, 0]] * n,
            "shard_lengths": [[64, 1024]] * n,
            "chunk": pa.array(np.zeros(n), pa.int32()),
            "shard_byte_offset": np.zeros(n, np.int64),
            "raw_len": np.full(n, raw),
            "rank": pa.array(np.full(n, rank), pa.int32()),
            "file": [f"rank-{rank:05d}.ckg"] * n,
            "offset": 4096 + np.arange(n) * (4096 * 33),
            "stored_len": np.full(n, raw),
            "codec": ["raw"] * n,
            "elem_size": pa.array(np.full(n, 2), pa.int32()),
            "hash": pa.array([b"\0" * 16] * n, pa.binary(16)),
            "base": pa.nulls(n, pa.string()),
            "key_id": pa.nulls(n, pa.string()),
        },
        schema=SCHEMA,
    )
    doc = {
        "ok": True,
        "written_at": 0.0,
        "file": {
            "name": f"rank-{rank:05d}.ckg",
            "rank": rank,
            "size": 4096 + n * 4096 * 33 + 10**6,
            "chunks": n,
        },
    }
    return _pack(doc, _ipc(table))


def rank_description(rank: int, ranks: int, rows: int) -> bytes:
    """What rank ``rank`` sends first: its tree and the description of its tensors."""
    from ckptguard.plan import DESC_SCHEMA
    from ckptguard.saver import _dump, _ipc, _pack

    n = rows
    desc = pa.table(
        {
            "key": [f"layer{t}/w" for t in range(n)],
            "dtype": ["bfloat16"] * n,
            "kind": ["torch"] * n,
            "device": ["cuda:0"] * n,
            "requires_grad": [False] * n,
            "parameter": [False] * n,
            "sharded": [True] * n,
            "nbytes": np.full(n, 64 * 1024 * 2),
            "hash": pa.nulls(n, pa.binary(16)),
            "global_shape": [[ranks * 64, 1024]] * n,
            "offsets": [[rank * 64, 0]] * n,
            "shape": [[64, 1024]] * n,
        },
        schema=DESC_SCHEMA,
    )
    tree = {"model": {f"layer{t}.w": {"$tensor": t} for t in range(n)}, "step": 100}
    return _pack({"ok": True, "pickle": False}, _dump(tree), _ipc(desc))


def simulate(ranks: int, rows: int, trials: int) -> dict:
    """Time rank 0's work on simulated messages of ``ranks`` ranks with ``rows`` tensors each."""
    import pyarrow.compute  # noqa: F401  (warm import outside the timing)

    from ckptguard.plan import make_plan
    from ckptguard.saver import _from_ipc, _merge_trees, _report, _unpack, validate_and_index

    descs = [rank_description(r, ranks, rows) for r in range(ranks)]
    reports = [rank_report(r, ranks, rows) for r in range(ranks)]
    times = []
    for _ in range(trials):
        d = tempfile.mkdtemp(dir=".")
        t0 = time.perf_counter()
        msgs = [_unpack(b) for b in descs]
        tables = [_from_ipc(parts[1]) for _, parts in msgs]
        plan = make_plan(tables)
        _merge_trees([parts[0] for _, parts in msgs], tables, plan.keys)
        t1 = time.perf_counter()
        parsed = [_report(b) for b in reports]
        table = pa.concat_tables([t for _, t in parsed])
        sizes = {doc["file"]["name"]: doc["file"]["size"] for doc, _ in parsed}
        t2 = time.perf_counter()
        validate_and_index(d, table, plan.tensors, sizes, set())
        t3 = time.perf_counter()
        index_bytes = os.path.getsize(os.path.join(d, "index.parquet"))
        shutil.rmtree(d)
        times.append(
            {
                "plan_s": t1 - t0,
                "decode_reports_s": t2 - t1,
                "validate_and_write_s": t3 - t1,
            }
        )
    med = {k: statistics.median(t[k] for t in times) for k in times[0]}
    return {
        "ranks": ranks,
        "rows_per_rank": rows,
        "rows": ranks * rows,
        "description_bytes": sum(map(len, descs)),
        "report_bytes": sum(map(len, reports)),
        "index_bytes": index_bytes,
        "median": med,
        "trials": times,
        "target_validate_and_write_s": 2.0,
    }


WORKER = """
import json, os, sys, time, torch, ckptguard
from mpi4py import MPI
from ckptguard import Shard
from ckptguard.saver import LAST_TIMINGS
c = MPI.COMM_WORLD; r, n = c.Get_rank(), c.Get_size()
store, trials = sys.argv[1], int(sys.argv[2])
state = {f"layer{i}": Shard(torch.randn(64, 256), (64 * n, 256), (64 * r, 0)) for i in range(20)}
state["bias"] = torch.ones(256)
out = []
for t in range(trials + 1):
    c.Barrier()
    t0 = time.time()
    ckptguard.save(state, f"{store}/t{t}", overwrite=True, coordinator="mpi")
    if r == 0 and t:
        out.append({"total_s": time.time() - t0,
                    "overhead_s": LAST_TIMINGS["visible"] - LAST_TIMINGS["last_rank_written"],
                    "rank0_commit_s": LAST_TIMINGS["visible"] - LAST_TIMINGS["reports_received"]})
if r == 0:
    print(json.dumps(out))
"""


def overhead(ranks: list[int], trials: int) -> list[dict]:
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or "mpiexec"
    results = []
    for n in ranks:
        d = tempfile.mkdtemp(dir=".")
        try:
            proc = subprocess.run(
                [mpiexec, "-n", str(n), sys.executable, "-c", WORKER, d, str(trials)],
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if proc.returncode:
                raise RuntimeError(proc.stderr[-2000:])
            tr = json.loads(proc.stdout.strip().splitlines()[-1])
        finally:
            shutil.rmtree(d, ignore_errors=True)
        med = {k: statistics.median(t[k] for t in tr) for k in tr[0]}
        results.append(
            {
                "ranks": n,
                "median": med,
                "min_overhead_s": min(t["overhead_s"] for t in tr),
                "max_overhead_s": max(t["overhead_s"] for t in tr),
                "trials": tr,
            }
        )
        print(
            f"{n:3d} ranks: overhead median {med['overhead_s'] * 1e3:7.1f} ms "
            f"(rank-0 commit {med['rank0_commit_s'] * 1e3:6.1f} ms, save {med['total_s']:.2f} s)",
            flush=True,
        )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["simulate", "overhead"])
    ap.add_argument("--ranks", default="4096")
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--json", default=None, help="write results here")
    a = ap.parse_args()
    if a.mode == "simulate":
        res = simulate(int(a.ranks), a.rows, a.trials)
        m = res["median"]
        print(
            f"{res['ranks']} ranks x {res['rows_per_rank']} rows = {res['rows']:,} rows: "
            f"plan {m['plan_s']:.2f} s; decode reports {m['decode_reports_s']:.2f} s, then "
            f"validate + write index.parquet ({res['index_bytes'] / 1e6:.1f} MB) "
            f"{m['validate_and_write_s']:.2f} s in all (target <= 2 s)"
        )
    else:
        res = overhead([int(x) for x in a.ranks.split(",")], a.trials)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
