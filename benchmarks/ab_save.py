"""Builds or settings of ckptguard, interleaved on one workload: what a change costs
(docs/benchmarks.md).

Two builds (``--a``, ``--b``), or settings of one build (``--variants``: ``compress`` values,
each optionally with ``/odirect=0|1|auto`` and ``@TREE`` for another build, e.g. ``auto none lz4
none/odirect=1 auto@../main``). Each round
runs one child process per variant, the order rotated from round to round, so a slow period of
a shared machine hits every variant alike. ``--congestion`` runs the bench's competing O_DIRECT
writer (ckptguard.bench.congestion) on the disk of ``--dir`` for the whole run. A child builds the
workload from a fixed seed, saves it once to warm up, then measures, per trial (``--only``: some):

  encode   every tensor through the native write path (``codec.write_records``) into one file
           on a memory file system (``--mem-dir``, /dev/shm): the CPU cost of chunking, hashing,
           copying, compressing and the kernel's copy into the page cache, no disk
  save     a durable ``ckptguard.save`` into a fresh store (fsync included) under ``--dir``
  save-mem the same save into a store on the memory file system: the whole save path, no disk
  load-mem a verified ``ckptguard.load`` of that store: the whole load path, no disk

Each figure is the median over all trials of all rounds; the report gives B/A per figure, and
for each variant what its durable saves used (``CheckpointInfo.write_stats``, where the build
reports it): the share of raw bytes per codec and through O_DIRECT. A tree is a checkout whose
``ckptguard`` package (with its built extension) the child imports first.

    python benchmarks/ab_save.py --a /path/to/old --b . --size 512MiB --rounds 6
    python benchmarks/ab_save.py --variants auto none lz4 auto/odirect=1 --only save
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "": 1}


def parse_size(text: str) -> int:
    for unit in ("GiB", "MiB", "KiB", ""):
        if text.endswith(unit) and text[: len(text) - len(unit)].isdigit():
            return int(text[: len(text) - len(unit)]) * UNITS[unit]
    raise argparse.ArgumentTypeError(f"size {text!r}: a whole number with KiB, MiB or GiB")


def child(args: argparse.Namespace) -> None:
    """One build's trials; prints one JSON line of seconds per figure."""
    import torch

    import ckptguard
    from ckptguard import backend
    from ckptguard.bench.workloads import iter_tensors, make_workload
    from ckptguard.io import write_records

    try:  # where the compress names live differs between builds
        from ckptguard.options import COMPRESS
    except ImportError:
        from ckptguard.saver import COMPRESS  # type: ignore[no-redef,attr-defined]

    work = make_workload(args.workload, args.size, seed=1)
    tensors = [t for t in iter_tensors(work.state) if isinstance(t, torch.Tensor)]
    out: dict[str, list[float]] = {"encode": [], "save": [], "save-mem": [], "load-mem": []}
    used: dict[str, dict[str, int]] = {"codec": {}, "io": {}}
    memstore = os.path.join(args.mem_dir, f"ab_save.{os.getpid()}.store")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ckptguard.save(work.state, os.path.join(tmp, "s", "warm"), compress=args.compress)
        mem = os.path.join(args.mem_dir, f"ab_save.{os.getpid()}.tmp")
        fd = os.open(mem, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(args.trials):
                if "encode" not in args.only:
                    break
                os.ftruncate(fd, 0)
                pos = 0
                t0 = time.perf_counter()
                for t in tensors:
                    buf = t.detach().contiguous().view(-1).view(torch.uint8)
                    pos = write_records(
                        fd,
                        mem,
                        pos,
                        0,
                        buf,
                        t.element_size(),
                        4 << 20,
                        COMPRESS["lz4" if args.compress == "auto" else args.compress],
                    ).end
                out["encode"].append(time.perf_counter() - t0)
            for i in range(args.trials):
                t0 = time.perf_counter()
                info = ckptguard.save(
                    work.state, os.path.join(tmp, "s", f"t{i}"), compress=args.compress
                )
                out["save"].append(time.perf_counter() - t0)
                add_used(used, getattr(info, "write_stats", None))
                shutil.rmtree(os.path.join(tmp, "s", f"t{i}"))
                if "save-mem" not in args.only:
                    continue
                t0 = time.perf_counter()
                ckptguard.save(work.state, os.path.join(memstore, "m"), compress=args.compress)
                out["save-mem"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ckptguard.load(os.path.join(memstore, "m"))
                out["load-mem"].append(time.perf_counter() - t0)
                shutil.rmtree(memstore)
        finally:
            os.close(fd)
            os.unlink(mem)
    out = {k: v for k, v in out.items() if v}
    print(json.dumps({"backend": backend.name(), "used": used, **out}))


def add_used(into: dict[str, dict[str, int]], stats: dict | None) -> None:
    """Add a save's raw bytes per codec and per I/O mode (``write_stats``; None: not reported)."""
    for part in ("codec", "io"):
        for k, v in (stats or {}).get(part, {}).items():
            into[part][k] = into[part].get(k, 0) + v


def describe_used(used: dict[str, dict[str, int]]) -> str:
    """``raw 80% shuffle-lz4 20%, direct 35%``, or ``-`` where the build did not report it."""
    total = sum(used["codec"].values())
    if not total:
        return "-"
    codecs = " ".join(f"{k} {v / total:.0%}" for k, v in sorted(used["codec"].items()))
    return f"{codecs}, direct {used['io'].get('direct', 0) / total:.0%}"


def run_child(tree: str, compress: str, odirect: str | None, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    if odirect is not None:
        env["CKPTGUARD_ODIRECT"] = odirect
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--size",
        str(args.size),
        "--workload",
        args.workload,
        "--compress",
        compress,
        "--trials",
        str(args.trials),
        "--mem-dir",
        args.mem_dir,
        "--only",
        *args.only,
    ] + (["--dir", args.dir] if args.dir else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"ab_save: the child for {tree} failed:\n{res.stderr[-2000:]}")
    got = json.loads(res.stdout.strip().splitlines()[-1])
    got.setdefault("used", {"codec": {}, "io": {}})
    if got.pop("backend") != "native":
        raise SystemExit(f"ab_save: {tree} has no native extension built (setup.py build_ext)")
    return got


def variants(args: argparse.Namespace) -> list[tuple[str, str, str, str | None]]:
    """(label, tree, compress, CKPTGUARD_ODIRECT or None) of each variant."""
    if args.variants:
        out = []
        for spec in args.variants:
            setting, _, tree = spec.partition("@")
            compress, _, rest = setting.partition("/")
            odirect = rest.split("=", 1)[1] if rest.startswith("odirect=") else None
            out.append((spec, tree or args.b or ".", compress, odirect))
        return out
    if not (args.a and args.b):
        raise SystemExit("ab_save: --a and --b, or --variants, are required")
    return [("A", args.a, args.compress, None), ("B", args.b, args.compress, None)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", help="the baseline tree")
    p.add_argument("--b", help="the changed tree (with --variants: the tree, default .)")
    p.add_argument("--variants", nargs="+", help="settings: compress[/odirect=X][@TREE]")
    p.add_argument("--size", type=parse_size, default=parse_size("512MiB"))
    p.add_argument("--workload", default="model")
    p.add_argument("--compress", default="none")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--only", nargs="+", default=["encode", "save", "save-mem", "load-mem"])
    p.add_argument("--congestion", action="store_true", help="a competing O_DIRECT writer")
    p.add_argument("--dir", help="where the stores go (default: the system's temp dir)")
    p.add_argument("--mem-dir", default="/dev/shm", help="a memory file system for 'encode'")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    vs = variants(args)
    times: dict[str, dict[str, list[float]]] = {v[0]: {} for v in vs}
    used: dict[str, dict[str, dict[str, int]]] = {v[0]: {"codec": {}, "io": {}} for v in vs}
    from ckptguard.bench.congestion import CompetingWriter

    # The bench's own competing writer: stopped and its file removed however this run ends
    # (also when this process is killed: the writer watches its parent).
    load = (
        CompetingWriter("dd", args.dir or tempfile.gettempdir(), 1 << 30)
        if args.congestion
        else contextlib.nullcontext()
    )
    with load:
        for r in range(args.rounds):
            for label, tree, compress, odirect in vs[r % len(vs) :] + vs[: r % len(vs)]:
                got = run_child(tree, compress, odirect, args)
                for part, counts in got.pop("used").items():
                    add_used(used[label], {part: counts})
                for k, v in got.items():
                    times[label].setdefault(k, []).extend(v)
    print(
        f"workload {args.workload}, {args.size / 2**20:.0f} MiB, "
        f"{'beside a competing O_DIRECT writer' if args.congestion else 'no added load'}, "
        f"{args.rounds} rounds x {args.trials} trials, medians (ratio to {vs[0][0]}):"
    )
    for k in times[vs[0][0]]:
        base = statistics.median(times[vs[0][0]][k])
        cells = []
        for label, *_ in vs:
            m = statistics.median(times[label][k])
            cells.append(f"{label} {m:.3f} s ({m / base:.2f})")
        print(f"  {k:8s} " + "   ".join(cells))
    shares = [f"{label}: {describe_used(used[label])}" for label, *_ in vs]
    print("  used (durable saves): " + "   ".join(shares))


if __name__ == "__main__":
    main()
