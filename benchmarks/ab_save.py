"""Two builds of ckptguard, interleaved on one workload: what a change costs (docs/benchmarks.md).

Each round runs one child process per build, in alternating order (A B, then B A, ...), so a
slow period of a shared machine hits both builds alike. A child builds the workload from a fixed
seed, saves it once to warm up, then measures, per trial:

  encode   every tensor through the native write path (``ckptguard.io.write_records``) into one file
           on a memory file system (``--mem-dir``, /dev/shm): the CPU cost of chunking, hashing,
           copying, compressing and the kernel's copy into the page cache, no disk
  save     a durable ``ckptguard.save`` into a fresh store (fsync included) under ``--dir``
  save-mem the same save into a store on the memory file system: the whole save path, no disk

Each figure is the median over all trials of all rounds; the report gives B/A per figure. A tree
is a checkout whose ``ckptguard`` package (with its built extension) the child imports first.

    python benchmarks/ab_save.py --a /path/to/old --b . --size 512MiB --rounds 6
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

    try:
        from ckptguard.io import write_records
    except ImportError:  # an A or B build that keeps record I/O in ckptguard.codec
        from ckptguard.codec import write_records  # type: ignore[no-redef]
    from ckptguard.bench.workloads import iter_tensors, make_workload

    work = make_workload(args.workload, args.size, seed=1)
    tensors = [t for t in iter_tensors(work.state) if isinstance(t, torch.Tensor)]
    out: dict[str, list[float]] = {"encode": [], "save": [], "save-mem": []}
    memstore = os.path.join(args.mem_dir, f"ab_save.{os.getpid()}.store")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ckptguard.save(work.state, os.path.join(tmp, "s", "warm"), compress=args.compress)
        mem = os.path.join(args.mem_dir, f"ab_save.{os.getpid()}.tmp")
        fd = os.open(mem, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for i in range(args.trials):
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
                        compress=args.compress != "none",
                    ).end
                out["encode"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ckptguard.save(work.state, os.path.join(tmp, "s", f"t{i}"), compress=args.compress)
                out["save"].append(time.perf_counter() - t0)
                shutil.rmtree(os.path.join(tmp, "s", f"t{i}"))
                t0 = time.perf_counter()
                ckptguard.save(work.state, os.path.join(memstore, "m"), compress=args.compress)
                out["save-mem"].append(time.perf_counter() - t0)
                shutil.rmtree(memstore)
        finally:
            os.close(fd)
            os.unlink(mem)
    print(json.dumps({"backend": backend.name(), **out}))


def run_child(tree: str, args: argparse.Namespace) -> dict[str, list[float]]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--size",
        str(args.size),
        "--workload",
        args.workload,
        "--compress",
        args.compress,
        "--trials",
        str(args.trials),
        "--mem-dir",
        args.mem_dir,
    ] + (["--dir", args.dir] if args.dir else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"ab_save: the child for {tree} failed:\n{res.stderr[-2000:]}")
    got = json.loads(res.stdout.strip().splitlines()[-1])
    if got.pop("backend") != "native":
        raise SystemExit(f"ab_save: {tree} has no native extension built (setup.py build_ext)")
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", help="the baseline tree")
    p.add_argument("--b", help="the changed tree")
    p.add_argument("--size", type=parse_size, default=parse_size("512MiB"))
    p.add_argument("--workload", default="model")
    p.add_argument("--compress", default="none", choices=["none", "lz4"])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--dir", help="where the stores go (default: the system's temp dir)")
    p.add_argument("--mem-dir", default="/dev/shm", help="a memory file system for 'encode'")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if not (args.a and args.b):
        p.error("--a and --b are required")
    times: dict[str, dict[str, list[float]]] = {"A": {}, "B": {}}
    for r in range(args.rounds):
        for label in "AB" if r % 2 == 0 else "BA":
            got = run_child(args.a if label == "A" else args.b, args)
            for k, v in got.items():
                times[label].setdefault(k, []).extend(v)
    print(
        f"workload {args.workload}, {args.size / 2**20:.0f} MiB, compress={args.compress}, "
        f"{args.rounds} rounds x {args.trials} trials, medians:"
    )
    for k in times["A"]:
        a, b = statistics.median(times["A"][k]), statistics.median(times["B"][k])
        print(f"  {k:7s} A {a:.3f} s   B {b:.3f} s   B/A {b / a:.3f}")


if __name__ == "__main__":
    main()
