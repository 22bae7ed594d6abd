"""Many medium tensors: a save with batched writes against one write call per tensor (issue 14).

The writer queues tensors and writes up to ``writer.BATCH_BYTES`` of them in one call (one native
call, the GIL released, the pool fed across tensors); ``CKPTGUARD_BATCH=0`` writes each tensor
by its own call, as before batching. Both write the same bytes. Two states:

  adamw    an AdamW training state of ``--size`` bytes: per parameter a bf16 weight and fp32
           master weight, exp_avg and exp_avg_sq (86 parameters: 344 tensors), shapes as in a
           small transformer (embedding, attention, MLP, norms)
  medium   ``--count`` fp32 tensors of 64 KiB to 2 MiB, log-uniform

Each round saves the state once with batching off and once on (the order alternates), on each
directory given (``--dirs``: tmpfs and a disk). Reported per state and directory: native write
calls per save, Python function calls per save (cProfile, one extra save each), the median save
seconds of each and their ratio (after / before; below 1 is faster).

    python benchmarks/medium_tensors.py --rounds 7 --dirs /dev/shm /tmp [--json out.json]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch

import ckptguard
from ckptguard import writer as _writer

MODES = {"before": "0", "after": "1"}


def adamw_state(size: int) -> dict[str, torch.Tensor]:
    """An AdamW state of about ``size`` bytes: 86 parameters of a small transformer, each as a
    bf16 weight and fp32 master, exp_avg and exp_avg_sq (14 bytes per element)."""
    g = torch.Generator().manual_seed(0)
    layers, per = 12, 7  # q, k, v, o, up, down, norm per layer
    d = max(16, int(math.sqrt(size / 14 / (layers * 12 + 8))) // 16 * 16)  # 152 d^2 elements
    shapes = [(8 * d, d), (d,)]  # embedding, final norm
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(4 * d, d), (d, 4 * d), (d,)]
    assert len(shapes) == 2 + layers * per == 86
    state: dict[str, torch.Tensor] = {}
    for i, s in enumerate(shapes):
        master = torch.randn(s, generator=g) * 0.02
        state[f"p{i}.weight"] = master.bfloat16()
        state[f"p{i}.master"] = master
        state[f"p{i}.exp_avg"] = torch.randn(s, generator=g) * 1e-3
        state[f"p{i}.exp_avg_sq"] = torch.rand(s, generator=g) * 1e-6
    return state


def medium_state(count: int) -> dict[str, torch.Tensor]:
    """``count`` fp32 tensors of 64 KiB to 2 MiB, log-uniform."""
    rng = np.random.default_rng(0)
    sizes = np.exp(rng.uniform(math.log(64 << 10), math.log(2 << 20), count)).astype(int) // 4
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(int(n), generator=g) for i, n in enumerate(sizes)}


class CallCounter:
    """Counts the writer's write calls (one native call each on the native path)."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = _writer.write_segments

    def __enter__(self) -> CallCounter:
        def counted(*a: Any, **k: Any) -> Any:
            self.calls += 1
            return self._real(*a, **k)

        _writer.write_segments = counted  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        _writer.write_segments = self._real  # type: ignore[assignment]


def save_once(state: dict, root: str, tag: str, mode: str, compress: str) -> float:
    os.environ[_writer.BATCH_ENV] = MODES[mode]
    path = os.path.join(root, tag)
    t0 = time.perf_counter()
    ckptguard.save(state, path, compress=compress)
    took = time.perf_counter() - t0
    shutil.rmtree(path)
    return took


def profile_calls(state: dict, root: str, mode: str, compress: str) -> tuple[int, int]:
    """(Python function calls, write calls) of one save."""
    prof = cProfile.Profile()
    with CallCounter() as cc:
        prof.enable()
        save_once(state, root, f"prof-{mode}", mode, compress)
        prof.disable()
    return pstats.Stats(prof).total_calls, cc.calls  # type: ignore[attr-defined]


def run(state: dict, where: str, rounds: int, compress: str) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix="ckg-medium-", dir=where)
    try:
        counts = {m: profile_calls(state, root, m, compress) for m in MODES}
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for rnd in range(rounds + 1):  # round 0 warms up and is not counted
            order = list(MODES) if rnd % 2 else list(MODES)[::-1]
            for m in order:
                took = save_once(state, root, f"{m}-{rnd}", m, compress)
                if rnd:
                    times[m].append(took)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        os.environ.pop(_writer.BATCH_ENV, None)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {
        "python_calls": {m: c[0] for m, c in counts.items()},
        "write_calls": {m: c[1] for m, c in counts.items()},
        "save_s": med,
        "ratio": med["after"] / med["before"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256 << 20, help="bytes of the adamw state")
    ap.add_argument("--count", type=int, default=2000, help="tensors of the medium state")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dirs", nargs="+", default=["/dev/shm", tempfile.gettempdir()])
    ap.add_argument("--compress", default="lz4")
    ap.add_argument("--states", nargs="+", default=["adamw", "medium"])
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    makers = {"adamw": lambda: adamw_state(args.size), "medium": lambda: medium_state(args.count)}
    out: dict[str, Any] = {"compress": args.compress, "threads": _threads()}
    print(f"compress={args.compress}, {out['threads']} threads, {args.rounds} rounds")
    print(
        f"{'state':<8} {'dir':<10} {'MB':>7} {'tensors':>7} {'calls b/a':>11} "
        f"{'py calls b/a':>17} {'save s b/a':>13} {'ratio':>6}"
    )
    for name in args.states:
        state = makers[name]()
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        for where in args.dirs:
            r = run(state, where, args.rounds, args.compress)
            out[f"{name}@{where}"] = {**r, "bytes": nbytes, "tensors": len(state)}
            w, p, s = r["write_calls"], r["python_calls"], r["save_s"]
            print(
                f"{name:<8} {where:<10} {nbytes / 1e6:7.0f} {len(state):7d} "
                f"{w['before']:5d}/{w['after']:<5d} {p['before']:8d}/{p['after']:<8d} "
                f"{s['before']:6.3f}/{s['after']:<6.3f} {r['ratio']:6.2f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def _threads() -> int:
    from ckptguard import backend

    return backend.default_threads()


if __name__ == "__main__":
    main()
