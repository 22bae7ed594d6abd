"""File-system metadata operations per save and per load, counted with strace, ckptguard vs DCP.

Runs one real sharded save and real loads under ``mpiexec -n N`` with ckptguard (load alone, then
``load(collective=True)``) and the same job with PyTorch DCP (``dcp.save``/``dcp.load`` of
DTensors on a gloo process group, N processes spawned with MASTER_ADDR/PORT, RANK, WORLD_SIZE),
each rank under ``strace -f -y``. Every system call on a path inside the store (ckptguard) or
the checkpoint directory (DCP) is classified by kind (create, open, stat, rename, fsync of a
directory, ...) and by file role, per rank; bytes read are split into metadata (manifest, index,
data-file header and footer; DCP's ``.metadata``) and payload. Then, over the world sizes run,
each count of rank 0 and of the other ranks is fitted as ``a + b*N`` and the job's total is
extrapolated (docs/operations.md, "Metadata load on a parallel file system (model)").

    python benchmarks/metadata_ops.py --ranks 2,4,8 --tensors 20 \
        --json benchmarks/results/metadata_ops.json

Not a timed test: strace slows every traced call; only counts and bytes are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script or imported

from syscall_trace import (  # noqa: E402
    FOOTER_TRAILER,
    HEADER,
    MARKER,
    TRACED,
    Tally,
    dirs_of,
    footer_spans,
    parse_lines,
    tally,
)

STRACE = "/usr/bin/strace"


CKG_WORKER = """
import os, sys, torch, ckptguard, ckptguard.measure
from mpi4py import MPI
from ckptguard import Shard
c = MPI.COMM_WORLD; r, n = c.Get_rank(), c.Get_size()
store, t = sys.argv[1], int(sys.argv[2])
def state(fill):
    s = {f"layer{i}.w": Shard(fill(64, 512), (64 * n, 512), (64 * r, 0)) for i in range(t)}
    s["bias"] = torch.ones(256)  # replicated: equal on every rank
    return s
def phase(p):
    c.Barrier(); ckptguard.measure.flush()
    try: os.stat(MARKER + p)
    except OSError: pass
phase("save_first")
ckptguard.save(state(torch.randn), f"{store}/step-1", coordinator="mpi")
phase("save")
ckptguard.save(state(torch.randn), f"{store}/step-2", coordinator="mpi")
phase("load")
ckptguard.load(store, template=state(torch.zeros), coordinator="mpi")
phase("load_collective")
ckptguard.load(store, template=state(torch.zeros), coordinator="mpi", collective=True)
phase("end")
""".replace("MARKER", repr(MARKER))

DCP_WORKER = """
import os, sys, warnings, torch, torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
dist.init_process_group("gloo"); r, n = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (n,))
path, t = sys.argv[1], int(sys.argv[2])
def state(fill):
    s = {f"layer{i}.w": DTensor.from_local(fill(64, 512), mesh, [Shard(0)]) for i in range(t)}
    s["bias"] = torch.ones(256)  # replicated: equal on every rank
    return s
def phase(p):
    dist.barrier()
    try: os.stat(MARKER + p)
    except OSError: pass
warnings.simplefilter("ignore")
phase("save_first")
dcp.save(state(torch.randn), checkpoint_id=f"{path}/step-1")
phase("save")
dcp.save(state(torch.randn), checkpoint_id=f"{path}/step-2")
phase("load")
dcp.load(state(torch.zeros), checkpoint_id=f"{path}/step-2")
phase("end")
dist.destroy_process_group()
""".replace("MARKER", repr(MARKER))


def _strace(out: str) -> list[str]:
    return [STRACE, "-f", "-qq", "-y", "-s", "0", "-e", f"trace={TRACED}", "-o", out]


def run_ckptguard(n: int, tensors: int, work: str) -> str:
    """Trace a ckptguard job of ``n`` ranks; returns its store (traces in ``work``)."""
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or "mpiexec"
    store = os.path.join(work, "store")
    trace = " ".join(_strace(os.path.join(work, "trace.ckg.$PMI_RANK")))
    cmd = f'exec {trace} "$@"'
    args = [sys.executable, "-c", CKG_WORKER, store, str(tensors)]
    subprocess.run([mpiexec, "-n", str(n), "sh", "-c", cmd, "sh", *args], check=True, cwd=work)
    return store


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_dcp(n: int, tensors: int, work: str) -> str:
    """Trace a DCP job of ``n`` gloo ranks; returns its checkpoint directory."""
    path = os.path.join(work, "dcp")
    port = str(_port())
    procs = []
    for r in range(n):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        env.update(RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r))
        cmd = [*_strace(os.path.join(work, f"trace.dcp.{r}"))]
        cmd += [sys.executable, "-c", DCP_WORKER, path, str(tensors)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=work))
    if any(p.wait(timeout=900) for p in procs):
        raise RuntimeError(f"a DCP rank failed at n={n}")
    return path


def _as_dict(t: Tally) -> dict[str, dict[str, int]]:
    return {
        k: dict(sorted(getattr(t, k).items()))
        for k in ("ops", "by_role", "failed", "read", "written")
    }


def measure(system: str, n: int, tensors: int) -> dict[str, Any]:
    """One traced job: per phase, per rank, the counts (and the sizes of what it wrote)."""
    work = tempfile.mkdtemp(prefix=f"mdops-{system}-{n}-", dir=os.environ.get("MDOPS_DIR"))
    try:
        root = (run_ckptguard if system == "ckptguard" else run_dcp)(n, tensors, work)
        traces = []
        for r in range(n):
            with open(
                os.path.join(work, f"trace.{'ckg' if system == 'ckptguard' else 'dcp'}.{r}")
            ) as f:
                traces.append(parse_lines(f.readlines()))
        dirs = dirs_of(root, [c for t in traces for c in t])
        spans = footer_spans(root)
        phases: dict[str, list[dict]] = {}
        for r, calls in enumerate(traces):
            for ph, t in tally(calls, root, dirs, spans).items():
                if ph not in ("start", "end"):
                    phases.setdefault(ph, [{} for _ in range(n)])[r] = _as_dict(t)
        return {
            "system": system,
            "ranks": n,
            "tensors": tensors,
            "phases": phases,
            "sizes": sizes(root),
        }
    finally:
        _remove(work)


def _remove(path: str) -> None:
    """Remove a work directory, committed checkpoints (read-only) included."""
    for d, _, _ in os.walk(path):
        os.chmod(d, 0o755)
    shutil.rmtree(path, ignore_errors=True)


def sizes(root: str) -> dict[str, Any]:
    """Sizes of the files the checkpoint the loads read holds: metadata files whole, data
    files' footers."""
    root = os.path.join(root, "step-2")
    out: dict[str, Any] = {"data_files": 0, "data_bytes": 0, "footer_bytes": 0, "footer_rows": 0}
    for d, _, names in os.walk(root):
        for name in names:
            p = os.path.join(d, name)
            if name in ("MANIFEST.json", "index.parquet", ".metadata"):
                out[name] = os.path.getsize(p)
            elif name.endswith((".ckg", ".distcp")):
                out["data_files"] += 1
                out["data_bytes"] += os.path.getsize(p)
    for name, (off, size) in footer_spans(root).items():
        out["footer_bytes"] += size - FOOTER_TRAILER - off
        with open(name, "rb") as f:
            f.seek(off)
            out["footer_rows"] += len(json.loads(f.read(size - FOOTER_TRAILER - off))["rows"])
    return out


def summary(run: dict[str, Any], phase: str, what: str = "ops") -> dict[str, dict[str, Any]]:
    """Per kind: rank 0's count, the other ranks' (min, max) and the job's total."""
    ranks = run["phases"][phase]
    kinds = sorted({k for r in ranks for k in r[what]})
    out = {}
    for k in kinds:
        vals = [r[what].get(k, 0) for r in ranks]
        out[k] = {"rank0": vals[0], "others": [min(vals[1:]), max(vals[1:])], "total": sum(vals)}
    return out


def fit(points: dict[int, int]) -> dict[str, Any]:
    """``a + b*N`` through the smallest and largest N; whether every other point is on it."""
    ns = sorted(points)
    if len(ns) < 2:
        return {"per_job": None, "per_rank": None, "linear": None}
    lo, hi = ns[0], ns[-1]
    b = (points[hi] - points[lo]) / (hi - lo)
    a = points[lo] - b * lo
    linear = all(abs(a + b * n - points[n]) < 1e-9 for n in ns)
    return {
        "per_job": a,
        "per_rank": b,
        "linear": linear,
        "at_1000": a + b * 1000,
        "at_10000": a + b * 10000,
    }


def fits(runs: list[dict[str, Any]], what: str = "ops") -> dict[str, dict[str, dict[str, Any]]]:
    """For each system and phase, each kind's fitted total, rank-0 and other-rank counts."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for system in sorted({r["system"] for r in runs}):
        mine = [r for r in runs if r["system"] == system]
        for phase in mine[0]["phases"]:
            per_n = {r["ranks"]: summary(r, phase, what) for r in mine}
            kinds = sorted({k for s in per_n.values() for k in s})
            res = {}
            for k in kinds:
                z = {"rank0": 0, "others": [0, 0], "total": 0}
                got = {n: s.get(k, z) for n, s in per_n.items()}
                res[k] = {
                    "total": fit({n: g["total"] for n, g in got.items()}),
                    "rank0": fit({n: g["rank0"] for n, g in got.items()}),
                    "other_max": fit({n: g["others"][1] for n, g in got.items()}),
                    "others_equal": all(g["others"][0] == g["others"][1] for g in got.values()),
                }
            out[f"{system}/{phase}"] = res
    return out


# Rank 0's files at scale, from benchmarks/commit_scale.py's simulation (docs/benchmarks.md):
# index.parquet 165.0 MB at 10,000 ranks x 1,000 tensors and 33.8 MB at 4,096 x 500 (16.5 B per
# row both), MANIFEST.json 1.10 MB and 0.46 MB (solved for bytes per tensor and per rank).
INDEX_ROW_BYTES = 16.5
MANIFEST_PER_TENSOR, MANIFEST_PER_RANK = 104.0, 99.6
WIDER_NUMBERS = 14  # footer row bytes added by 10,000-rank offsets, ranks and file offsets


def model(runs: list[dict[str, Any]], ranks: int, tensors: int) -> dict[str, float]:
    """Metadata bytes read by a whole job at ``ranks`` x ``tensors`` (each rank a shard of every
    tensor), from the per-row and per-shard sizes measured here and commit_scale's index and
    manifest; data files opened per rank as measured (its own and the replicated tensor's)."""
    ckg = max((r for r in runs if r["system"] == "ckptguard"), key=lambda r: r["ranks"])
    row = ckg["sizes"]["footer_bytes"] / ckg["sizes"]["footer_rows"] + WIDER_NUMBERS
    footer = HEADER + FOOTER_TRAILER + tensors * row  # one data file's header, footer, trailer
    opened = fits(runs, "by_role")["ckptguard/load"]["open:data"]["other_max"]["per_job"]
    index = INDEX_ROW_BYTES * ranks * tensors
    manifest = MANIFEST_PER_TENSOR * tensors + MANIFEST_PER_RANK * ranks
    dcp = sorted((r for r in runs if r["system"] == "dcp"), key=lambda r: r["ranks"])
    size = fit({r["ranks"]: r["sizes"][".metadata"] for r in dcp})
    t0 = dcp[0]["tensors"]
    metadata = size["per_job"] / (t0 + 1) * tensors + size["per_rank"] / t0 * ranks * tensors
    return {
        "ranks": ranks,
        "tensors": tensors,
        "index_bytes": index,
        "manifest_bytes": manifest,
        "footer_row_bytes": row,
        "data_files_opened_per_rank": opened,
        "ckptguard_alone": ranks * (index + manifest + opened * footer),
        # rank 0 reads the manifest alone, each rank its files' footers (format.md 4.5)
        "ckptguard_collective": manifest + ranks * opened * footer,
        "dcp_metadata_bytes": metadata,
        "dcp_bytes_per_shard": size["per_rank"] / t0,
        "dcp": ranks * metadata,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,4,8")
    ap.add_argument("--tensors", type=int, default=20, help="sharded tensors per rank")
    ap.add_argument("--systems", default="ckptguard,dcp")
    ap.add_argument("--json", default=None, help="write the counts and fits here")
    ap.add_argument("--refit", default=None, help="fit the runs of this --json file, run none")
    a = ap.parse_args()
    runs = []
    if a.refit:
        with open(a.refit) as f:
            runs = json.load(f)["runs"]
        a.systems = ""
    for system in filter(None, a.systems.split(",")):
        for n in (int(x) for x in a.ranks.split(",")):
            print(f"{system}: {n} ranks", flush=True)
            runs.append(measure(system, n, a.tensors))
            for phase in runs[-1]["phases"]:
                s = summary(runs[-1], phase)
                line = ", ".join(f"{k} {v['rank0']}/{v['others'][1]}" for k, v in s.items())
                print(f"  {phase} (rank 0/other): {line}")
                b = summary(runs[-1], phase, "read")
                print("    read: " + ", ".join(f"{k} {v['total']}" for k, v in b.items()))
    result = {"runs": runs, "ops": fits(runs), "read": fits(runs, "read")}
    result["by_role"] = fits(runs, "by_role")
    if len({r["ranks"] for r in runs}) > 1 and len({r["system"] for r in runs}) > 1:
        result["model"] = [model(runs, n, 1000) for n in (1000, 10000)]
        for m in result["model"]:
            print(json.dumps(m))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
