"""The async path's figures: stall against the copy floor, durable time, and the slowdown
of a compute loop while a save persists, plus a bitwise round trip. GPU first, CPU as a check.

    python benchmarks/async_check.py --size 16GiB --device cuda --dir /scratch --out results.json

Measured in one run, on one state (bf16 tensors of 64 MiB and a few small ones):
- floor: one copy of every tensor into preallocated host memory (pinned on a GPU);
- snapshot: ``Checkpointer(host_bytes=...)`` (pool allocated before timing), ``save_async`` x3:
  the stall of each (first and later) and its time to durable (``result()``);
- stream: the same with ``max_host_bytes`` at 1/8 of the state: the state streams through;
- compute: median step time of a matmul loop alone, then while a save persists (``--steps``);
- round trip: the last checkpoint loaded back onto the device, compared with ``torch.equal``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch

import ckptguard
from ckptguard.capture import state_bytes
from ckptguard.units import parse_size


def make_state(size: int, device: str) -> dict:
    n = max(size // (64 << 20), 1)
    per = size // n // 2  # bf16 elements
    g = torch.Generator(device=device).manual_seed(0)
    state: dict = {
        f"layer{i}.w": torch.randn(per, device=device, generator=g).bfloat16() for i in range(n)
    }
    state["norm"] = torch.ones(4096, device=device)
    state["step"] = 7
    return state


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def floor(state: dict, device: str) -> float:
    pin = device == "cuda"
    dst = {
        k: torch.empty(v.shape, dtype=v.dtype, pin_memory=pin)
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }
    best = float("inf")
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        for k, d in dst.items():
            d.copy_(state[k], non_blocking=pin)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def saves(state: dict, store: str, device: str, **pool: int) -> list[dict]:
    out = []
    with ckptguard.Checkpointer(store, compress="none", overwrite=True, **pool) as c:
        for i in range(3):
            sync(device)
            t0 = time.perf_counter()
            h = c.save_async(state, "ckpt", step=i)
            stall = time.perf_counter() - t0
            h.result()
            done = time.perf_counter() - t0
            out.append({"stall": stall, "durable": done, "streamed": h.streamed})
        out[-1]["pool_bytes"] = c.pool.allocated
    return out


def compute_loop(state: dict, store: str, device: str, steps: int) -> dict:
    dim = 8192 if device == "cuda" else 512
    a = torch.randn(dim, dim, device=device, dtype=torch.bfloat16)

    def step() -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ a
        sync(device)
        return time.perf_counter() - t0

    for _ in range(5):
        step()
    alone = [step() for _ in range(steps)]
    busy = []
    with ckptguard.Checkpointer(store, compress="none", overwrite=True) as c:
        c.save(state, "warm")  # the pool is allocated before the measured save
        h = c.save_async(state, "ckpt")
        while not h.done() or len(busy) < 3:
            busy.append(step())
        h.result()
    a_med, b_med = statistics.median(alone), statistics.median(busy)
    return {"step_alone": a_med, "step_during_persist": b_med, "slowdown": b_med / a_med - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dir", default=".")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="async_check.json")
    args = ap.parse_args()
    state = make_state(parse_size(args.size), args.device)
    nbytes = state_bytes(state)
    work = tempfile.mkdtemp(prefix="ckptguard-async-", dir=args.dir)
    res: dict = {"device": args.device, "bytes": nbytes, "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.device == "cuda":
        res["card"] = torch.cuda.get_device_name(0)
    try:
        res["floor"] = floor(state, args.device)
        res["snapshot"] = saves(state, work, args.device, host_bytes=nbytes)
        res["stream"] = saves(state, work, args.device, max_host_bytes=max(nbytes // 8, 8 << 20))
        res["compute"] = compute_loop(state, work, args.device, args.steps)
        back = ckptguard.load(os.path.join(work, "ckpt"), map_location=args.device)
        res["round_trip_equal"] = all(
            torch.equal(back[k], v) for k, v in state.items() if isinstance(v, torch.Tensor)
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    fl = res["floor"]
    print(f"{args.device} {res.get('card', '')}: {nbytes / 2**30:.2f} GiB, floor {fl:.3f} s")
    for kind in ("snapshot", "stream"):
        for i, s in enumerate(res[kind]):
            print(
                f"  {kind} save {i}: stall {s['stall']:.3f} s ({s['stall'] / fl:.2f}x floor), "
                f"durable {s['durable']:.3f} s"
            )
    c = res["compute"]
    print(f"  compute step {c['step_alone'] * 1e3:.2f} ms alone, slowdown {c['slowdown']:.1%}")
    print(f"  round trip bitwise equal: {res['round_trip_equal']}")


if __name__ == "__main__":
    main()
