"""Commit overhead of a distributed save, and rank 0's and a loading rank's work at scale.

    python benchmarks/commit_scale.py simulate --ranks 4096 --rows 500
    python benchmarks/commit_scale.py simulate --ranks 10000 --rows 1000 --load
    python benchmarks/commit_scale.py overhead --ranks 2,4,8,16,32 [--trials 3]

``simulate`` times exactly what rank 0 does with the messages of every rank: plan (decode the
Arrow descriptions, check agreement, shard coverage and replicas, merge the per-rank trees),
then its commit: decode the reports into one table, validate all rows (shard coverage,
contiguity, placement) while writing index.parquet durably, then encode the manifest and read
it back (as commit does), the collector paused as a save pauses it. Targets: the whole at
4,096 x 500 within 2 s, the commit at 10,000 x 1,000 within 5 s (this 2-core VM). Peak memory
is the process's high-water RSS; the simulation keeps every message for the next trial, where
a save frees them once decoded. Each rank's tree has one per-rank value (its rank), so every
tree differs from rank 0's; hashes are random (incompressible, as real ones). With ``--load``
it then plays one rank of a job loading that checkpoint: open it (manifest, index, every index
rule checked), rebuild its tree, and select and plan its reads for 1/ranks of every tensor (a
box straddling two saved shards); then the same rank in a collective load, located (the
manifest from rank 0, the footers of its two data files, which the simulation writes) and with
the index broadcast.
``overhead`` runs real saves under ``mpiexec -n N`` (oversubscribed on a small machine) and
reports the time from the last rank's fsync of its data file to the checkpoint being visible.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

HERE = os.path.dirname(os.path.abspath(__file__))
SHARD_ROWS, COLS, ELEM = 64, 1024, 2  # each rank: a 64 x 1024 bfloat16 shard of every tensor
RAW = SHARD_ROWS * COLS * ELEM
RECORD = 4096 * 33  # one record: 64-byte header + 128 KiB payload, padded


class _Columns:
    """Columns every rank's messages share (built once: the simulation, not the timing)."""

    def __init__(self, ranks: int, rows: int) -> None:
        n = rows
        self.keys = pa.array([f"layer{t}/w" for t in range(n)], pa.string())
        self.tensor = pa.array(np.arange(n, dtype=np.int32))
        self.dtype = pa.array(["bfloat16"] * n, pa.string())
        gshape = np.tile(np.array([ranks * SHARD_ROWS, COLS], np.int64), n)
        self.global_shape = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2)), gshape)
        lengths = np.tile(np.array([SHARD_ROWS, COLS], np.int64), n)
        self.offsets2 = pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32))
        self.shard_lengths = pa.ListArray.from_arrays(self.offsets2, lengths)
        self.zeros32 = pa.array(np.zeros(n, np.int32))
        self.zeros64 = pa.array(np.zeros(n, np.int64))
        self.raw = pa.array(np.full(n, RAW, np.int64))
        self.offset = pa.array(4096 + np.arange(n, dtype=np.int64) * RECORD)
        self.codec = pa.array(["raw"] * n, pa.string())
        self.elem = pa.array(np.full(n, ELEM, np.int32))
        self.nulls = pa.nulls(n, pa.string())
        self.kind = pa.array(["torch"] * n, pa.string())
        self.device = pa.array(["cuda:0"] * n, pa.string())
        self.false = pa.array(np.zeros(n, bool))
        self.true = pa.array(np.ones(n, bool))
        self.no_hash = pa.nulls(n, pa.binary(16))
        self.rng = np.random.default_rng(0)


def rank_report(c: _Columns, rank: int, rows: int, real: bool = False) -> tuple[bytes, bytes]:
    """What rank ``rank`` sends rank 0: one 64-row shard of each of ``rows`` 2-D tensors; and,
    if ``real``, its data file's footer (the hash in the report is then that footer's, and the
    file's size exact: a loading rank reads it; other ranks' footer hashes are random)."""
    from ckptguard.format import datafile
    from ckptguard.format.index import SCHEMA
    from ckptguard.format.index import footer as index_footer
    from ckptguard.format.locator import footer_digests
    from ckptguard.report import pack, to_ipc

    n = rows
    offs = np.zeros((n, 2), np.int64)
    offs[:, 0] = rank * SHARD_ROWS
    name = f"rank-{rank:05d}.ckg"
    hashes = c.rng.integers(0, 256, size=16 * n, dtype=np.uint8).tobytes()
    table = pa.table(
        [
            c.keys,
            c.tensor,
            c.dtype,
            c.global_shape,
            pa.ListArray.from_arrays(c.offsets2, offs.ravel()),
            c.shard_lengths,
            c.zeros32,
            c.zeros64,
            c.raw,
            pa.array(np.full(n, rank, np.int32)),
            pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), [name]).cast(pa.string()),
            c.offset,
            c.raw,
            c.codec,
            c.elem,
            pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(hashes)]),
            c.nulls,
            c.nulls,
        ],
        schema=SCHEMA,
    )
    footer = b""
    size = 4096 + n * RECORD + 10**6
    digest = {"xxh3_128": c.rng.bytes(16).hex()}
    if real:
        footer = index_footer(rank, "0" * 32, table, False)
        size = 4096 + n * RECORD + len(footer) + datafile.TRAILER_SIZE
        digest = footer_digests(footer, False)
    doc = {
        "ok": True,
        "written_at": 0.0,
        "file": {"name": name, "rank": rank, "size": size, "chunks": n},
        "footer": digest,
    }
    return pack(doc, to_ipc(table)), footer


def write_data_file(where: str, rank: int, rows: int, footer: bytes) -> None:
    """A sparse data file of rank ``rank`` with its header, ``footer`` and trailer (the records
    between are never read by the simulation)."""
    from ckptguard.format import datafile

    off = 4096 + rows * RECORD
    with open(os.path.join(where, f"rank-{rank:05d}.ckg"), "wb") as f:
        f.write(datafile.pack_file_header(rank, "0" * 32))
        f.seek(off)
        f.write(footer + datafile.pack_trailer(off, footer))


def rank_tree(rank: int, rows: int) -> dict:
    """A rank's object tree: its tensors, one per-rank value (the rank) and a shared step."""
    return {
        "model": {f"layer{t}.w": {"$tensor": t} for t in range(rows)},
        "rank": rank,
        "step": 100,
    }


def rank_description(c: _Columns, rank: int, ranks: int, rows: int) -> bytes:
    """What rank ``rank`` sends first: its tree and the description of its tensors."""
    from ckptguard.inventory import DESC_SCHEMA
    from ckptguard.report import dump_json, pack, to_ipc

    n = rows
    offs = np.zeros((n, 2), np.int64)
    offs[:, 0] = rank * SHARD_ROWS
    desc = pa.table(
        [
            c.keys,
            c.dtype,
            c.kind,
            c.device,
            c.false,
            c.false,
            c.true,
            c.false,
            c.raw,
            c.no_hash,
            c.global_shape,
            pa.ListArray.from_arrays(c.offsets2, offs.ravel()),
            c.shard_lengths,
            c.nulls,
        ],
        schema=DESC_SCHEMA,
    )
    return pack({"ok": True, "pickle": False}, dump_json(rank_tree(rank, n)), to_ipc(desc))


def _body(
    plan, tree0: dict, rank_trees: dict, ranks: int, files: list, entry: dict, table, locator
) -> dict:  # noqa: ANN001
    import datetime as dt

    from ckptguard.format import manifest

    return manifest.build(
        name="sim",
        uuid="0" * 32,
        world_size=ranks,
        step=100,
        writer={"ckptguard": "bench"},
        metadata=None,
        tree=tree0,
        rank_trees=rank_trees,
        tensors=plan.tensors,
        files=files,
        index=entry,
        table=table,
        pickle=False,
        created=dt.datetime(2026, 11, 27, tzinfo=dt.timezone.utc),
        locator=locator,
    )


def simulate(
    ranks: int, rows: int, trials: int, load: bool = False, old_path: bool = False
) -> dict:
    """Time rank 0's work on simulated messages of ``ranks`` ranks with ``rows`` tensors each."""
    from ckptguard import collector
    from ckptguard.format import manifest
    from ckptguard.format.index import unify
    from ckptguard.format.locator import for_save
    from ckptguard.plan import make_plan
    from ckptguard.report import from_ipc, merge_trees, unpack, unpack_report
    from ckptguard.saver import validate_and_index

    c = _Columns(ranks, rows)
    descs = [rank_description(c, r, ranks, rows) for r in range(ranks)]
    me = ranks // 2  # the loading rank: its box straddles the shards of ranks me and me + 1
    made = [rank_report(c, r, rows, load and r in (me, me + 1)) for r in range(ranks)]
    reports = [m[0] for m in made]
    times = []
    keep = tempfile.mkdtemp(dir=".") if load else None
    load_before = os.getloadavg()
    for trial in range(trials):
        d = tempfile.mkdtemp(dir=".")
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        with collector.paused():  # as the save pauses it in its CPU phases
            msgs = [unpack(b) for b in descs]
            tables = [from_ipc(parts[1]) for _, parts in msgs]
            plan = make_plan(tables)
            t_plan = time.perf_counter()
            tree0, rank_trees = merge_trees([parts[0] for _, parts in msgs], tables, plan.keys)
        t1 = time.perf_counter()
        with collector.paused():
            parsed = [unpack_report(b) for b in reports]
            table = unify([t for _, t in parsed])
            files = [doc["file"] for doc, _ in parsed]
            footers = [doc["footer"] for doc, _ in parsed]
            sizes = {f["name"]: f["size"] for f in files}
            t2 = time.perf_counter()
            entry, shards = validate_and_index(d, table, plan.tensors, sizes, set())
            t3 = time.perf_counter()
            locator = for_save(shards, plan.tensors, files, footers, False)
            body = _body(plan, tree0, rank_trees, ranks, files, entry, table, locator)
            data = manifest.encode(body)
            manifest.decode(data)  # commit reads back what it is about to write
        t4, c4 = time.perf_counter(), time.process_time()
        index_bytes = os.path.getsize(os.path.join(d, "index.parquet"))
        if keep is not None and trial == trials - 1:
            shutil.move(os.path.join(d, "index.parquet"), os.path.join(keep, "index.parquet"))
            with open(os.path.join(keep, "MANIFEST.json"), "wb") as f:
                f.write(data)
            for r in (me, me + 1):
                write_data_file(keep, r, rows, made[r][1])
        shutil.rmtree(d)
        del msgs, tables, parsed, table, shards
        times.append(
            {
                "plan_s": t_plan - t0,
                "merge_trees_s": t1 - t_plan,
                "decode_reports_s": t2 - t1,
                "validate_and_write_s": t3 - t2,
                "manifest_s": t4 - t3,
                "commit_s": t4 - t1,  # from the reports to the manifest: a save's commit
                "total_s": t4 - t0,
                "total_cpu_s": c4 - c0,  # both threads: validation and the index write overlap
            }
        )
        print(f"  trial {trial}: " + ", ".join(f"{k} {v:.2f}" for k, v in times[-1].items()))
    med = {k: statistics.median(t[k] for t in times) for k in times[0]}
    res = {
        "ranks": ranks,
        "rows_per_rank": rows,
        "rows": ranks * rows,
        "description_bytes": sum(map(len, descs)),
        "report_bytes": sum(map(len, reports)),
        "index_bytes": index_bytes,
        "manifest_bytes": len(data),
        "rank_trees_bytes": len(json.dumps(rank_trees, separators=(",", ":"))),
        "median": med,
        "trials": times,
        "target_s": 2.0,
        "commit_target_s": 5.0,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loadavg_before_after": [load_before, os.getloadavg()],
    }
    del descs, reports
    if keep is not None:
        try:
            res["load"] = simulate_load(keep, ranks, trials, old_path)
        finally:
            shutil.rmtree(keep)
    return res


def simulate_load(path: str, ranks: int, trials: int, old_path: bool = False) -> dict:
    """One rank of a ``ranks``-rank job loading the simulated checkpoint: open, rebuild its
    tree, select and plan its reads for a 1/ranks box of every tensor."""
    from ckptguard.format.ranktrees import rank_tree
    from ckptguard.format.treeids import tensor_ids
    from ckptguard.open import CheckpointReader
    from ckptguard.select import plan_reads

    me = ranks // 2
    times = []
    boxes: dict = {}
    for _ in range(trials):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        rd = CheckpointReader(path)
        t1 = time.perf_counter()
        tree = rank_tree(rd.manifest, me)
        ids = tensor_ids(tree)
        t2 = time.perf_counter()
        lo = me * SHARD_ROWS + SHARD_ROWS // 2  # straddles the shards of ranks me and me+1
        boxes = {g: ((lo, 0), (SHARD_ROWS, COLS)) for g in ids}
        pieces = [p for ps in plan_reads(rd.table, rd.tensors, boxes).values() for p in ps]
        rows = [r for p in pieces for r in p.rows]
        t3, c3 = time.perf_counter(), time.process_time()
        rd.close()
        assert tree["rank"] == me and len(pieces) == 2 * len(ids) and len(rows) == 2 * len(ids)
        times.append(
            {
                "open_s": t1 - t0,
                "tree_s": t2 - t1,
                "select_and_plan_s": t3 - t2,
                "total_s": t3 - t0,
                "total_cpu_s": c3 - c0,
                "rows_built": len(rows),
            }
        )
        print("  load: " + ", ".join(f"{k} {v:.2f}" for k, v in times[-1].items()))
    res = {"rank": me, "median": {k: statistics.median(t[k] for t in times) for k in times[0]}}
    res["collective"] = simulate_collective_load(path, ranks, trials, boxes)
    if old_path:  # a Row for every row of the wanted tensors, then the scalar planner (tests')
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from select_oracle import plan_reads as scalar_plan_reads

        with CheckpointReader(path) as rd:
            t0 = time.perf_counter()
            rows = rd.rows_of_tensors(sorted(boxes))
            by_tensor = {}
            for r in rows:
                by_tensor.setdefault(r.tensor, []).append(r)
            pieces = [
                p for g, b in boxes.items() for p in scalar_plan_reads(by_tensor.get(g, []), b)
            ]
            res["old_select_and_plan_s"] = time.perf_counter() - t0
            assert len(pieces) == 2 * len(boxes)
            res["old_rows_built"] = len(rows)
        print(f"  old path: select + plan {res['old_select_and_plan_s']:.2f} s, {len(rows)} rows")
    return res


def _footer_length(path: str) -> int:
    with open(path, "rb") as f:
        f.seek(-24, os.SEEK_END)
        return int.from_bytes(f.read(8), "little")


def simulate_collective_load(path: str, ranks: int, trials: int, boxes: dict) -> dict:
    """The same rank in a collective load (``load(collective=True)``), two ways. Located (the
    checkpoint has a locator, format.md 4.5): it gets the manifest's bytes from rank 0 (which
    reads and checks MANIFEST.json alone), then reads and checks the footers of the two data
    files its box lies in, and selects from their rows. Index broadcast (a checkpoint without
    a locator): it gets the manifest and index bytes from rank 0 (which reads and checks both
    whole), checks their hashes and parses them, then selects. Also the metadata bytes every
    rank together reads from the file system in each case, and alone."""
    from ckptguard.format.ranktrees import rank_tree
    from ckptguard.format.treeids import tensor_ids
    from ckptguard.open import CheckpointReader, Shared
    from ckptguard.select import plan_reads

    me = ranks // 2
    ino = os.stat(path).st_ino
    with CheckpointReader(path, keep_bytes=True) as rd:
        manifest_raw, index_raw = rd.manifest_raw, rd.index_raw or b""
    ways = {
        "located": Shared(manifest_raw, b"", ino, located=True),
        "index_broadcast": Shared(manifest_raw, index_raw, ino),
    }
    res: dict = {}
    for way, shared in ways.items():
        times = []
        for _ in range(trials):
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            rd = CheckpointReader(path, shared=shared)
            t1 = time.perf_counter()
            tree = rank_tree(rd.manifest, me)
            rd.locate(boxes)
            pieces = plan_reads(rd.table, rd.tensors, boxes)
            t2, c2 = time.perf_counter(), time.process_time()
            rows_parsed = rd.table.num_rows
            rd.close()
            assert sum(map(len, pieces.values())) == 2 * len(tensor_ids(tree))
            times.append(
                {
                    "open_s": t1 - t0,
                    "total_s": t2 - t0,
                    "total_cpu_s": c2 - c0,
                    "rows_parsed": rows_parsed,
                }
            )
            print(
                f"  collective load ({way}), a rank other than 0: "
                + ", ".join(f"{k} {v:.2f}" for k, v in times[-1].items())
            )
        res[way] = {"median": {k: statistics.median(t[k] for t in times) for k in times[0]}}
    footers = sum(_footer_length(os.path.join(path, f"rank-{r:05d}.ckg")) for r in (me, me + 1))
    meta = len(manifest_raw) + len(index_raw)
    res.update(
        index_bytes=len(index_raw),
        manifest_bytes=len(manifest_raw),
        metadata_bytes_read_alone=ranks * meta,
        metadata_bytes_read_index_broadcast=meta,
        metadata_bytes_read_located=len(manifest_raw),
        footer_bytes_per_rank_located=footers,
    )
    print(
        f"  metadata read from the file system by all {ranks} ranks: alone "
        f"{ranks * meta / 1e9:.2f} GB ({ranks * meta / len(index_raw):.0f}x the index), "
        f"index broadcast {meta / 1e6:.1f} MB ({meta / len(index_raw):.2f}x), located "
        f"{len(manifest_raw) / 1e6:.1f} MB ({len(manifest_raw) / len(index_raw):.3f}x; each rank "
        f"also reads the footers of the files it loads from, {footers / 1e6:.2f} MB here, as "
        "every load does)"
    )
    return res


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
    ap.add_argument("--load", action="store_true", help="simulate: also a rank's load")
    ap.add_argument("--old-path", action="store_true", help="--load: also the old row selection")
    ap.add_argument("--json", default=None, help="write results here")
    a = ap.parse_args()
    if a.mode == "simulate":
        res = simulate(int(a.ranks), a.rows, a.trials, a.load, a.old_path)
        m = res["median"]
        print(
            f"{res['ranks']} ranks x {res['rows_per_rank']} rows = {res['rows']:,} rows: "
            f"plan {m['plan_s']:.2f} s + merge trees {m['merge_trees_s']:.2f} s + decode "
            f"reports {m['decode_reports_s']:.2f} s + validate and write index.parquet "
            f"({res['index_bytes'] / 1e6:.1f} MB) {m['validate_and_write_s']:.2f} s + manifest "
            f"({res['manifest_bytes'] / 1e6:.2f} MB, rank_trees {res['rank_trees_bytes'] / 1e6:.2f}"
            f" MB) {m['manifest_s']:.2f} s = {m['total_s']:.2f} s (CPU {m['total_cpu_s']:.2f} s; "
            f"min {min(t['total_s'] for t in res['trials']):.2f} s; target <= 2 s at 4,096 x 500)"
        )
        print(
            f"commit (reports to manifest) {m['commit_s']:.2f} s (target <= 5 s at 10,000 x "
            f"1,000); peak RSS {res['peak_rss_bytes'] / 1e9:.2f} GB (messages "
            f"{(res['description_bytes'] + res['report_bytes']) / 1e9:.2f} GB); load average "
            f"{res['loadavg_before_after'][0][0]:.2f} before, "
            f"{res['loadavg_before_after'][1][0]:.2f} after"
        )
        if "load" in res:
            m = res["load"]["median"]
            print(
                f"load as rank {res['load']['rank']}: open {m['open_s']:.2f} s, tree "
                f"{m['tree_s']:.3f} s, select + plan {m['select_and_plan_s']:.2f} s "
                f"({m['rows_built']} rows built) = {m['total_s']:.2f} s"
            )
            for way in ("located", "index_broadcast"):
                c = res["load"]["collective"][way]["median"]
                print(
                    f"collective load ({way}), a rank other than 0: open {c['open_s']:.2f} s, "
                    f"open and select {c['total_s']:.2f} s ({c['rows_parsed']:.0f} rows parsed; "
                    "target <= 0.5 s at 10,000 x 1,000)"
                )
    else:
        res = overhead([int(x) for x in a.ranks.split(",")], a.trials)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
