"""Megatron-Core dist_checkpointing through ckptguard's strategies, run by tests/test_megatron.py
under ``torchrun --nproc_per_node N`` (gloo).

A column-parallel linear model: rank r holds rows [r*R/N, (r+1)*R/N) of the weight and the Adam
moments of its rows, saved as ShardedTensors; the step count and each rank's RNG state (as a
ShardedObject) beside them. Usage: megatron_run.py MODE OUT [ARGS...]; each rank writes
OUT/<mode>-rank-R.json.

  train OUT        K steps, save OUT/it3, STEPS - K more; records the losses after the save and
                   the gathered weight and moments (hex of their bytes)
  kill OUT POINT   K steps, save OUT/it3, 2 more, save OUT/it5 with POINT armed on rank 0
  resume OUT KILL  fresh: load OUT/it3, STEPS - K steps; records the same. Then KILL/it5 (the
                   killed save) and KILL/it3: what each load gave or raised
  full OUT         one rank: OUT/it3 loaded as whole tensors (a reshard to one rank)
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

ROWS, COLS = 8, 6
K, STEPS = 3, 6


def make(rank: int, world: int):
    torch.manual_seed(99)
    full = torch.randn(ROWS, COLS)
    n = ROWS // world
    weight = torch.nn.Parameter(full[rank * n : (rank + 1) * n].clone())
    opt = torch.optim.Adam([weight], lr=0.05)
    return weight, opt


def step(weight, opt, i: int) -> float:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(4, COLS, generator=g)
    noise = torch.rand(weight.shape[0])  # the global RNG, restored from each rank's object
    local = ((x @ weight.t()) ** 2).sum() + (noise * weight.sum(1)).sum()
    opt.zero_grad()
    local.backward()
    opt.step()
    total = local.detach().clone()
    dist.all_reduce(total)
    return total.item()


def sharded(weight, opt, rank: int, world: int, data: bool = True) -> dict:
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    state = opt.state[weight] if data else {}

    def ten(key, t):
        return ShardedTensor.from_rank_offsets(key, t, (0, rank, world))

    return {
        "weight": ten("weight", weight.data),
        "exp_avg": ten("exp_avg", state["exp_avg"] if data else torch.empty_like(weight)),
        "exp_avg_sq": ten("exp_avg_sq", state["exp_avg_sq"] if data else torch.empty_like(weight)),
        "step": int(state["step"].item()) if data else None,
        "rng": ShardedObject(
            "rng", torch.get_rng_state() if data else None, (world,), (rank,), replica_id=0
        ),
    }


def save(weight, opt, path: str, rank: int, world: int) -> None:
    from megatron.core import dist_checkpointing

    import ckptguard.megatron

    if rank == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    sd = sharded(weight, opt, rank, world)
    dist_checkpointing.save(sd, path, sharded_strategy=ckptguard.megatron.SaveStrategy())


def load(weight, opt, path: str, rank: int, world: int) -> None:
    from megatron.core import dist_checkpointing

    # Adam's state exists once it has stepped: a zero-learning-rate step creates it, untouched
    for group in opt.param_groups:
        group["lr"], lr = 0.0, group["lr"]
    weight.grad = torch.zeros_like(weight)
    opt.step()
    for group in opt.param_groups:
        group["lr"] = lr
    target = sharded(weight, opt, rank, world, data=False)
    got = dist_checkpointing.load(target, path)
    state = opt.state[weight]
    with torch.no_grad():
        weight.copy_(got["weight"])
    state["exp_avg"].copy_(got["exp_avg"])
    state["exp_avg_sq"].copy_(got["exp_avg_sq"])
    state["step"].fill_(got["step"])
    torch.set_rng_state(got["rng"])


def gathered(weight, opt, world: int) -> dict:
    out = {}
    state = opt.state[weight]
    for name, t in (("weight", weight.data), *((k, state[k]) for k in ("exp_avg", "exp_avg_sq"))):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        out[name] = torch.cat(parts).numpy().tobytes().hex()
    return out


def main() -> None:
    mode, out, *args = sys.argv[1:]
    import ckptguard.megatron

    ckptguard.megatron.register()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    record: dict = {}
    if mode == "full":
        from megatron.core import dist_checkpointing

        meta = dist_checkpointing.load_tensors_metadata(os.path.join(out, "it3"))
        target = {
            k: v.__class__.from_rank_offsets(k, torch.empty(v.global_shape))
            for k, v in meta.items()
        }
        got = dist_checkpointing.load(target, os.path.join(out, "it3"))
        record = {k: got[k].numpy().tobytes().hex() for k in ("weight", "exp_avg", "exp_avg_sq")}
        record["step"] = got["step"]
    elif mode in ("train", "kill"):
        weight, opt = make(rank, world)
        for i in range(K):
            step(weight, opt, i)
        save(weight, opt, os.path.join(out, "it3"), rank, world)
        if mode == "kill":
            for i in range(K, K + 2):
                step(weight, opt, i)
            os.environ["CKPTGUARD_FAILPOINT"] = f"{args[0]}:0:kill"
            save(weight, opt, os.path.join(out, "it5"), rank, world)
        record["saved"] = gathered(weight, opt, world)
        record["losses"] = [step(weight, opt, i) for i in range(K, STEPS)]
        record["final"] = gathered(weight, opt, world)
    elif mode == "resume":
        weight, opt = make(rank, world)
        load(weight, opt, os.path.join(out, "it3"), rank, world)
        record["saved"] = gathered(weight, opt, world)
        record["losses"] = [step(weight, opt, i) for i in range(K, STEPS)]
        record["final"] = gathered(weight, opt, world)
        for name in ("it5", "it3"):
            w2, o2 = make(rank, world)
            try:
                load(w2, o2, os.path.join(args[0], name), rank, world)
                record[name] = gathered(w2, o2, world)
            except Exception as e:  # noqa: BLE001 - the test reads which error
                record[name] = {"error": type(e).__name__, "message": str(e)}
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    with open(os.path.join(out, f"{mode}-rank-{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
