"""DeepSpeed on the CPU (gloo) saving through ckptguard, run by tests/test_deepspeed.py under
``torchrun --nproc_per_node N``.

Usage: deepspeed_run.py MODE OUT [ARGS...]; each rank writes OUT/<mode>-rank-R.json.

  train OUT STAGES...        per ZeRO stage: K steps, save tag "k", STEPS - K more steps; records
                             the losses after the save and the final parameters' digest
  resume OUT STAGES...       per stage, fresh engine: load_checkpoint (the tag in `latest`),
                             STEPS - K steps; records the same. Then, for each OUT/kill-*/ that
                             a kill left (its case.json: the stage), fresh engines load the
                             checkpoint there without a tag and with tag "k2"; records the tag,
                             step and digest each load gave, or the error it raised
  kill DIR STAGE POINT RANK  K steps, save "k", 2 more, save "k2" with the failpoint armed (the
                             process dies there); records the digest at each tag first
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import ckptguard.deepspeed  # noqa: E402

K, STEPS = 3, 6


def make_engine(stage: int):
    torch.manual_seed(1234)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 4}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**6,
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    ckptguard.deepspeed.install(engine)
    return engine


def step(engine, i: int) -> float:
    g = torch.Generator().manual_seed(1000 * i + dist.get_rank())
    x = torch.randn(2, 8, generator=g)
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


def digest(engine) -> str:
    """The parameters' bytes, gathered where ZeRO-3 partitioned them (every rank calls it)."""
    params = list(engine.module.parameters())
    h = hashlib.sha256()
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        for p in params:
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def write(out: str, mode: str, record: dict) -> None:
    with open(os.path.join(out, f"{mode}-rank-{dist.get_rank()}.json"), "w") as f:
        json.dump(record, f)


def train(out: str, stages: list[int]) -> dict:
    record = {}
    for stage in stages:
        engine = make_engine(stage)
        for i in range(K):
            step(engine, i)
        engine.save_checkpoint(os.path.join(out, f"z{stage}"), tag="k")
        losses = [step(engine, i) for i in range(K, STEPS)]
        record[str(stage)] = {"losses": losses, "digest": digest(engine)}
    return record


def resume(out: str, stages: list[int]) -> dict:
    record = {}
    for stage in stages:
        engine = make_engine(stage)
        path, _ = engine.load_checkpoint(os.path.join(out, f"z{stage}"))
        assert path is not None, "load_checkpoint found no checkpoint"
        assert engine.global_steps == K, engine.global_steps
        losses = [step(engine, i) for i in range(K, STEPS)]
        record[str(stage)] = {"losses": losses, "digest": digest(engine)}
    for name in sorted(os.listdir(out)):
        if name.startswith("kill-"):
            with open(os.path.join(out, name, "case.json")) as f:
                case = json.load(f)
            record[name] = check(os.path.join(out, name), case["stage"])
    return record


def kill(out: str, stage: int, point: str, rank: int) -> dict:
    engine = make_engine(stage)
    save_dir = os.path.join(out, "ckpt")
    record: dict = {}
    for i in range(K):
        step(engine, i)
    record["k"] = digest(engine)
    write(out, "kill", record)
    engine.save_checkpoint(save_dir, tag="k")
    for i in range(K, K + 2):
        step(engine, i)
    record["k2"] = digest(engine)
    write(out, "kill", record)
    os.environ["CKPTGUARD_FAILPOINT"] = f"{point}:{rank}:kill"
    engine.save_checkpoint(save_dir, tag="k2")
    record["survived"] = True
    return record


def check(case_dir: str, stage: int) -> dict:
    save_dir = os.path.join(case_dir, "ckpt")
    record = {}
    for tag in (None, "k2"):
        engine = make_engine(stage)
        try:
            path, _ = engine.load_checkpoint(save_dir, tag=tag)
        except Exception as e:  # noqa: BLE001 - the test reads which error
            record[str(tag)] = {"error": type(e).__name__, "message": str(e)}
            continue
        loaded = os.path.basename(os.path.dirname(path)) if path else None
        record[str(tag)] = {"tag": loaded, "steps": engine.global_steps, "digest": digest(engine)}
    return record


def main() -> None:
    mode, out, *args = sys.argv[1:]
    deepspeed.init_distributed(dist_backend="gloo")
    if mode == "train":
        record = train(out, [int(s) for s in args])
    elif mode == "resume":
        record = resume(out, [int(s) for s in args])
    elif mode == "kill":
        record = kill(out, int(args[0]), args[1], int(args[2]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    write(out, mode, record)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
