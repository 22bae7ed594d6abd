"""Many small tensors: ckptguard against safetensors and torch.save, interleaved (issue 14).

The state is ``--count`` fp32 tensors of ``--size`` bytes each (default 10,000 x 4 KiB). Each
round saves it durably with every engine in turn (the order rotates per round, so a slow period
of a shared machine hits all alike), then loads each save back:

  ckptguard    ``ckptguard.save`` (compress="none": small random tensors do not compress) and a
               verified ``ckptguard.load``
  safetensors  ``safetensors.torch.save_file`` + fsync of the file and its directory;
               ``safetensors.torch.load_file``
  torch.save   ``torch.save`` + fsync; ``torch.load(weights_only=True)``

Reported per engine: median save and load seconds, the bytes stored, and ckptguard's ratios to
the others (targets: save <= 1.2x safetensors+fsync, load <= 1.5x safetensors, stored <= 1.15x
the raw bytes). Loads read from the page cache (warm).

    python benchmarks/small_tensors.py --rounds 5 [--dir /tmp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def engines() -> dict[str, tuple[Callable[[dict, str], None], Callable[[str], Any]]]:
    """Each engine's (durable save, load) of a flat dict of tensors at a path."""
    import ckptguard

    out: dict[str, tuple[Callable[[dict, str], None], Callable[[str], Any]]] = {
        "ckptguard": (
            lambda s, p: ckptguard.save(s, p, compress="none"),
            lambda p: ckptguard.load(p),
        )
    }

    def torch_save(s: dict, p: str) -> None:
        torch.save(s, p)
        _fsync(p)
        _fsync(os.path.dirname(p))

    out["torch.save"] = (torch_save, lambda p: torch.load(p, weights_only=True))
    try:
        from safetensors.torch import load_file, save_file
    except ImportError:
        print("safetensors is not installed: its column is left out")
        return out

    def st_save(s: dict, p: str) -> None:
        save_file(s, p)
        _fsync(p)
        _fsync(os.path.dirname(p))

    out["safetensors"] = (st_save, load_file)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=4096, help="bytes per tensor")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    state = {f"layer.{i}.w": torch.randn(args.size // 4, generator=g) for i in range(args.count)}
    raw = args.count * (args.size // 4) * 4
    eng = engines()
    names = list(eng)
    times: dict[str, dict[str, list[float]]] = {n: {"save": [], "load": []} for n in names}
    stored: dict[str, int] = {}
    root = tempfile.mkdtemp(prefix="ckg-small-", dir=args.dir)
    try:
        for rnd in range(args.rounds + 1):  # round 0 warms up and is not counted
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for n in order:
                path = os.path.join(root, f"{n}-{rnd}")
                save, load = eng[n]
                t0 = time.perf_counter()
                save(state, path)
                t1 = time.perf_counter()
                out = load(path)
                t2 = time.perf_counter()
                assert len(out) == len(state)
                stored[n] = _tree_bytes(path)
                if rnd:
                    times[n]["save"].append(t1 - t0)
                    times[n]["load"].append(t2 - t1)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {n: {k: statistics.median(v) for k, v in times[n].items()} for n in names}
    print(f"{args.count} x {args.size} B fp32 ({raw / 1e6:.1f} MB raw), {args.rounds} rounds")
    print(f"{'engine':<12} {'save s':>8} {'load s':>8} {'stored MB':>10} {'stored/raw':>10}")
    for n in names:
        m = med[n]
        print(
            f"{n:<12} {m['save']:8.3f} {m['load']:8.3f} "
            f"{stored[n] / 1e6:10.1f} {stored[n] / raw:10.3f}"
        )
    c = med["ckptguard"]
    ratios = {
        f"{k}_vs_{n}": c[k] / med[n][k] for n in names if n != "ckptguard" for k in ("save", "load")
    }
    for k, v in ratios.items():
        print(f"ckptguard {k.replace('_', ' ')}: {v:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median": med, "stored": stored, "raw": raw, "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
