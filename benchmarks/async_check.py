"""The async path's figures: stall against the copy floor, durable time, and the slowdown
of a compute loop while a save persists, plus a bitwise round trip. GPU first, CPU as a check.

    python benchmarks/async_check.py --size 16GiB --device cuda --dir /scratch --out results.json

Measured in one run, on one state (bf16 tensors of 64 MiB and a few small ones):
- floor: one copy of every tensor into preallocated, touched host memory of the pool's kind
  (pinned on a GPU);
- first saves (``--rounds`` rounds, the variants interleaved, medians): the stall of the first
  ``save_async`` of a fresh ``Checkpointer`` without a prepared pool ("cold": it allocates the
  pool), of one built with ``prepare=state`` once that preparation is done ("prepared"), and of
  the next save of each ("warm"), each against the floor measured in the same round;
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
from ckptguard.pool import HostPool
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


def floor_buffers(state: dict, device: str) -> dict:
    """Host memory for the floor's copy, of the kind the pool uses (an anonymous mapping with huge
    pages requested; pinned on a GPU), allocated and touched once, before any timing."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    pool = HostPool(None, 1, device == "cuda")
    pool.prepare(state_bytes(tensors))
    region = pool.regions[0]
    return {
        k: region.take(v.numel() * v.element_size()).view(v.dtype).view(v.shape)
        for k, v in tensors.items()
    }


def copy_once(state: dict, dst: dict, device: str) -> float:
    pin = device == "cuda"
    sync(device)
    t0 = time.perf_counter()
    for k, d in dst.items():
        d.copy_(state[k], non_blocking=pin)
    sync(device)
    return time.perf_counter() - t0


def floor(state: dict, device: str) -> float:
    dst = floor_buffers(state, device)
    return min(copy_once(state, dst, device) for _ in range(3))


def first_and_warm(state: dict, store: str, device: str, prepared: bool) -> tuple[float, float]:
    """Stalls of the first and the second ``save_async`` of a fresh Checkpointer."""
    extra = {"prepare": state} if prepared else {}
    stalls = []
    with ckptguard.Checkpointer(store, compress="none", overwrite=True, **extra) as c:
        if prepared:
            assert c.preparation is not None
            c.preparation.wait()
        for i in range(2):
            sync(device)
            t0 = time.perf_counter()
            h = c.save_async(state, "first", step=i)
            stalls.append(time.perf_counter() - t0)
            h.result()
    return stalls[0], stalls[1]


def first_saves(state: dict, store: str, device: str, rounds: int) -> dict:
    """Per round: the floor, then a cold and a prepared Checkpointer (in alternating order);
    medians of the seconds and of each round's ratios to its floor."""
    dst = floor_buffers(state, device)
    rows: dict[str, list[float]] = {"floor": [], "cold": [], "prepared": [], "warm": []}
    for r in range(rounds):
        fl = copy_once(state, dst, device)
        rows["floor"].append(fl)
        for prepared in (r % 2 == 0, r % 2 == 1):
            first, warm = first_and_warm(state, store, device, prepared)
            rows["prepared" if prepared else "cold"].append(first)
            rows["warm"].append(warm)
    floors = rows["floor"]
    out: dict = {"rounds": rounds, "raw": rows}
    for k, v in rows.items():
        out[k] = statistics.median(v)
        if k != "floor":
            per = [x / floors[i // 2 if k == "warm" else i] for i, x in enumerate(v)]
            out[f"{k}_x_floor"] = statistics.median(per)
    return out


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
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the first-save comparison")
    ap.add_argument("--first-only", action="store_true", help="only the first-save comparison")
    args = ap.parse_args()
    state = make_state(parse_size(args.size), args.device)
    nbytes = state_bytes(state)
    work = tempfile.mkdtemp(prefix="ckptguard-async-", dir=args.dir)
    res: dict = {"device": args.device, "bytes": nbytes, "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.device == "cuda":
        res["card"] = torch.cuda.get_device_name(0)
    try:
        res["floor"] = floor(state, args.device)
        res["first"] = first_saves(state, work, args.device, args.rounds)
        if not args.first_only:
            res["snapshot"] = saves(state, work, args.device, host_bytes=nbytes)
            stream_bytes = max(nbytes // 8, 8 << 20)
            res["stream"] = saves(state, work, args.device, max_host_bytes=stream_bytes)
            res["compute"] = compute_loop(state, work, args.device, args.steps)
        back = ckptguard.load(os.path.join(work, "first"), map_location=args.device)
        res["round_trip_equal"] = all(
            torch.equal(back[k], v) for k, v in state.items() if isinstance(v, torch.Tensor)
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    fl = res["floor"]
    print(f"{args.device} {res.get('card', '')}: {nbytes / 2**30:.2f} GiB, floor {fl:.3f} s")
    f = res["first"]
    print(f"  first saves, {f['rounds']} rounds, medians (stall s, x the round's floor):")
    for kind in ("cold", "prepared", "warm"):
        print(f"    {kind:9s} {f[kind]:.3f} s  {f[kind + '_x_floor']:.2f}x")
    if args.first_only:
        print(f"  round trip bitwise equal: {res['round_trip_equal']}")
        return
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
