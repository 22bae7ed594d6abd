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
import collections
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

STRACE = "/usr/bin/strace"
TRACED = (
    "%file,fsync,fdatasync,fstat,fstatfs,getdents64,close,read,pread64,readv,preadv,preadv2,"
    "lseek,write,pwrite64,writev,pwritev,pwritev2,fchmod,fchown,ftruncate,fallocate"
)
MARKER = "/ckg-phase-marker/"  # a stat of MARKER + phase starts that phase in a rank's trace
FOOTER_TRAILER = 32
HEADER = 4096

_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+|\?)(?:<(.*)>)?(?:\s+(E[A-Z]+).*)?$")
_UNFINISHED = re.compile(r"^(\d+)\s+(.*)\s+<unfinished \.\.\.>$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$")
_STAGED = re.compile(r"/\.staging/([^/]+)\.[0-9a-f]{32}/")
_FD = re.compile(r"^(-?\d+|AT_FDCWD)(?:<(.*)>)?$")
_STAT_PATH = {"stat", "lstat", "newfstatat", "statx", "access", "faccessat", "faccessat2"}
_STAT_PATH |= {"readlink", "readlinkat", "statfs"}
_SETATTR = {"chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown"}
_SETATTR |= {"fchownat", "utimensat", "ftruncate", "truncate", "fallocate"}
_READS = {"read", "pread64", "readv", "preadv", "preadv2"}
_WRITES = {"write", "pwrite64", "writev", "pwritev", "pwritev2"}


@dataclass
class Call:
    """One completed system call of a trace: name, arguments (top-level, as text), result."""

    pid: int
    name: str
    args: list[str]
    ret: int
    ret_path: str | None = None
    error: str | None = None


def split_args(text: str) -> list[str]:
    """Top-level comma-separated arguments of a strace call, quotes and brackets respected."""
    out, depth, cur, quoted, i = [], 0, [], False, 0
    while i < len(text):
        ch = text[i]
        if quoted:
            cur.append(ch)
            if ch == "\\":
                cur.append(text[i + 1])
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
            cur.append(ch)
        elif ch in "{[<(":
            depth += 1
            cur.append(ch)
        elif ch in "}]>)":
            depth -= 1
            cur.append(ch)
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        i += 1
    if cur or out:
        out.append("".join(cur).strip())
    return out


def parse_lines(lines: list[str]) -> list[Call]:
    """The completed calls of a ``strace -f -y`` output, unfinished/resumed pairs stitched."""
    pending: dict[int, str] = {}
    calls = []
    for raw in lines:
        line = raw.rstrip("\n")
        m = _UNFINISHED.match(line)
        if m:
            pending[int(m.group(1))] = m.group(2)
            continue
        m = _RESUMED.match(line)
        if m:
            pid = int(m.group(1))
            line = f"{pid} {pending.pop(pid, m.group(2) + '(')}{m.group(3)}"
        m = _LINE.match(line)
        if not m or m.group(4) == "?":
            continue
        calls.append(
            Call(
                int(m.group(1)),
                m.group(2),
                split_args(m.group(3)),
                int(m.group(4)),
                m.group(5),
                m.group(6),
            )
        )
    return calls


def _unquote(s: str) -> str:
    return s[1:-1].encode().decode("unicode_escape") if s.startswith('"') else s


def _fd_path(arg: str) -> tuple[str, str | None]:
    """(fd text, the path strace -y shows for it)."""
    m = _FD.match(arg)
    if not m:
        return arg, None
    path = m.group(2)
    if path and path.endswith(" (deleted)"):
        path = path[: -len(" (deleted)")]
    return m.group(1), path


def call_path(c: Call) -> str | None:
    """The absolute path a call acts on (the first path for a rename or link)."""
    if not c.args:
        return None
    if c.name in ("openat", "newfstatat", "statx", "mkdirat", "unlinkat", "renameat", "renameat2"):
        _, base = _fd_path(c.args[0])
        rel = _unquote(c.args[1]) if len(c.args) > 1 else ""
        if rel == "" and c.name in ("newfstatat", "statx"):
            return base  # AT_EMPTY_PATH: the descriptor itself
        return os.path.normpath(os.path.join(base or "/", rel))
    if c.name in ("fchmodat", "fchownat", "faccessat", "faccessat2", "readlinkat", "linkat"):
        _, base = _fd_path(c.args[0])
        return os.path.normpath(os.path.join(base or "/", _unquote(c.args[1])))
    if c.args[0].startswith('"'):
        return os.path.normpath(_unquote(c.args[0]))
    return _fd_path(c.args[0])[1]


def classify(c: Call, dir_fds: set[str]) -> str | None:
    """The metadata kind of a call, or None for calls that move bytes (or are not counted).

    ``dir_fds``: descriptors opened with O_DIRECTORY and not yet closed (kept up to date here),
    so that an fsync of one counts as a directory fsync."""
    n, a = c.name, c.args
    if n in ("open", "openat", "creat"):
        flags = a[2] if n == "openat" else (a[1] if len(a) > 1 else "")
        if "O_DIRECTORY" in flags and c.ret >= 0:
            dir_fds.add(str(c.ret))
        if n == "creat" or "O_CREAT" in flags:
            return "create"
        return "open_dir" if "O_DIRECTORY" in flags else "open"
    if n == "close":
        fd = _fd_path(a[0])[0]
        dir_fds.discard(fd)
        return "close"
    if n in ("mkdir", "mkdirat"):
        return "mkdir"
    if n in ("rename", "renameat", "renameat2"):
        return "rename"
    if n in ("unlink", "unlinkat"):
        return "rmdir" if n == "unlinkat" and "AT_REMOVEDIR" in a[-1] else "unlink"
    if n in ("link", "linkat", "symlink", "symlinkat"):
        return "link"
    if n in ("fsync", "fdatasync"):
        return "fsync_dir" if _fd_path(a[0])[0] in dir_fds else "fsync_file"
    if n == "fstat" or (n in ("newfstatat", "statx") and _unquote(a[1]) == ""):
        return "fstat"
    if n in _STAT_PATH:
        return "stat"
    if n == "fstatfs":
        return "stat"
    if n in _SETATTR:
        return "setattr"
    if n == "getdents64":
        return "readdir"
    return None


def role(path: str, root: str, dirs: set[str]) -> str:
    """What a path in the store or checkpoint directory is, for the breakdown."""
    base = os.path.basename(path)
    rel = os.path.relpath(path, root)
    if path in dirs or path == root:
        return "dir"
    if rel.startswith(".events"):
        return "events"
    if re.fullmatch(r"rank-\d+(\.[0-9a-f]{32})?\.ckg", base) or base.endswith(".distcp"):
        return "data"
    if base == "index.parquet":
        return "index"
    if base.startswith("MANIFEST.json") or base.startswith(".metadata"):
        return "manifest"
    if base == "LATEST" or (base.startswith(".LATEST.") and base.endswith(".tmp")):
        return "latest"
    return "other"


def footer_spans(root: str) -> dict[str, tuple[int, int]]:
    """Each ckptguard data file under ``root`` by its committed path: (footer offset, file
    size), from its trailer."""
    spans = {}
    for d, _, names in os.walk(root):
        for n in names:
            if n.endswith(".ckg"):
                p = os.path.join(d, n)
                with open(p, "rb") as f:
                    f.seek(-FOOTER_TRAILER, os.SEEK_END)
                    off = struct.unpack("<QQQ8s", f.read(FOOTER_TRAILER))[0]
                spans[p] = (off, os.path.getsize(p))
    return spans


def committed(path: str) -> str:
    """The path a file written in a staging directory has once its checkpoint is committed."""
    return _STAGED.sub(r"/\1/", path)


@dataclass
class Tally:
    """One rank's counts in one phase: ops by kind, by (kind, role), bytes read and written."""

    ops: collections.Counter = field(default_factory=collections.Counter)
    by_role: collections.Counter = field(default_factory=collections.Counter)
    failed: collections.Counter = field(default_factory=collections.Counter)
    read: collections.Counter = field(default_factory=collections.Counter)
    written: collections.Counter = field(default_factory=collections.Counter)


def _data_split(off: int, n: int, span: tuple[int, int] | None) -> tuple[int, int]:
    """(metadata, payload) bytes of a read of ``n`` bytes at ``off`` of a data file."""
    if span is None:  # a DCP data file: its items are payload
        return 0, n
    foot = span[0]
    meta = max(0, min(off + n, HEADER) - off) + max(0, off + n - max(off, foot))
    return meta, n - meta


def tally(
    calls: list[Call], root: str, dirs: set[str], spans: dict[str, tuple[int, int]]
) -> dict[str, Tally]:
    """Per phase (split at MARKER stats), the counts of the calls on paths under ``root``."""
    phases: dict[str, Tally] = {}
    cur = phases.setdefault("start", Tally())
    dir_fds: set[str] = set()
    pos: dict[str, int] = {}
    inside = root.rstrip("/") + "/"
    for c in calls:
        path = call_path(c)
        if path and path.startswith(MARKER):
            cur = phases.setdefault(path[len(MARKER) :], Tally())
            continue
        kind = classify(c, dir_fds)
        if not path or not (path == root or path.startswith(inside)):
            continue
        r = role(path, root, dirs)
        fd = _fd_path(c.args[0])[0] if c.args else ""
        if kind in ("open", "create", "open_dir") and c.ret >= 0:
            pos[str(c.ret)] = 0
        if c.name == "lseek" and c.ret >= 0:
            pos[fd] = c.ret
        if c.name in _READS and c.ret > 0:
            off = int(c.args[-1]) if c.name in ("pread64", "preadv", "preadv2") else pos.get(fd, 0)
            if c.name in ("read", "readv"):
                pos[fd] = off + c.ret
            if r == "data":
                meta, payload = _data_split(off, c.ret, spans.get(committed(path)))
                cur.read["data_meta"] += meta
                cur.read["data_payload"] += payload
            else:
                cur.read[r] += c.ret
        if c.name in _WRITES and c.ret > 0:
            cur.written[r] += c.ret
        if kind is None or (kind == "close" and r == "dir"):
            continue
        cur.ops[kind] += 1
        cur.by_role[f"{kind}:{r}"] += 1
        if c.ret < 0:
            cur.failed[f"{kind}:{c.error}"] += 1
    return phases


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


def _dirs(root: str, calls: list[Call]) -> set[str]:
    """Directories under ``root``: those there now, and those any rank created or opened as one."""
    dirs = {d for d, _, _ in os.walk(root)}
    for c in calls:
        flags = c.args[2] if c.name == "openat" and len(c.args) > 2 else ""
        if c.name in ("mkdir", "mkdirat") or "O_DIRECTORY" in flags:
            p = call_path(c)
            if p:
                dirs.add(p)
    return dirs


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
        dirs = _dirs(root, [c for t in traces for c in t])
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
        "ckptguard_collective": index + manifest + ranks * opened * footer,
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
