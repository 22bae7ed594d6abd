"""Ranks of a torchrun job that save and load through DCP with ckptguard's storage backend, for
tests/test_dcp_backend.py and the fault matrix's ``dcp`` scenario (tests/faultkit.py).

Usage: torchrun --standalone --nproc-per-node N dcp_backend.py SCENARIO OUT ARGS... Each rank
writes its outcome to OUT/rank-R.json. Scenarios:

- ``train OUT STORE STEPS AT`` (4 ranks): an FSDP2 model (``fully_shard``, uneven shards) and
  AdamW train STEPS steps on data that depends only on the step; after step AT the state is
  saved by ``dcp.save`` with ``ckptguard.dcp.Writer`` (STORE/step-AT), by DCP's own
  FileSystemWriter (OUT/fs) and by ``dcp.async_save`` with the Writer (STORE/async-AT, awaited
  after the next step); rank 0 writes the full saved tensors (OUT/ref.pt) and, after the last
  step, the full parameters (OUT/final.pt).
- ``resume OUT STORE STEPS`` (4 ranks): a fresh model and optimizer (another seed) load STORE's
  LATEST through ``ckptguard.dcp.Reader`` (a ``Stateful`` app state, as DCP's tutorials do) and
  train to STEPS; rank 0 writes the full parameters (OUT/final.pt).
- ``load OUT CKPT FS`` (any number of ranks): a fresh model and optimizer load CKPT through the
  Reader and, into a second fresh state, FS through DCP's FileSystemReader; every rank checks
  that the two are equal (each DTensor's local shard, each value) and rank 0 that the full
  tensors are OUT/ref.pt's.
- ``base STORE`` / ``fail STORE NAME TIMEOUT`` (4 ranks, the fault matrix): save a small
  sharded state as STORE/step-10 / as STORE/NAME with collectives bounded by TIMEOUT seconds.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import ckptguard.dcp

BATCH = 8


def model_and_optim(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An MLP with a layer norm and dropout, each layer sharded by FSDP2 over all ranks (30
    rows over 4 ranks: uneven shards), and its AdamW."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 30),
        torch.nn.LayerNorm(30),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(30, 3),
    )
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, (torch.nn.Linear, torch.nn.LayerNorm)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def step(model: torch.nn.Module, optim: torch.optim.Optimizer, n: int) -> None:
    """Training step ``n``: the rank's slice of a batch that depends only on ``n``."""
    g = torch.Generator().manual_seed(1000 + n)
    x, y = torch.randn(BATCH * 4, 10, generator=g), torch.randn(BATCH * 4, 3, generator=g)
    r = dist.get_rank() % 4
    part = slice(r * BATCH, (r + 1) * BATCH)
    loss = torch.nn.functional.mse_loss(model(x[part]), y[part])
    loss.backward()
    optim.step()
    optim.zero_grad()


class App:
    """The training state as a DCP ``Stateful``: model, optimizer, RNG state and step."""

    def __init__(self, model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim, self.step = model, optim, 0

    def state_dict(self) -> dict[str, Any]:
        msd, osd = get_state_dict(self.model, self.optim)
        return {"model": msd, "optim": osd, "rng": torch.get_rng_state(), "step": self.step}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"]
        )
        torch.set_rng_state(sd["rng"])
        self.step = sd["step"]


def full(state: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a state dict by its dotted key, DTensors gathered whole (a collective)."""
    out: dict[str, Any] = {}
    items = state.items() if isinstance(state, dict) else enumerate(state)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list)) and not (isinstance(v, list) and not v):
            out.update(full(v, f"{key}."))
        elif isinstance(v, DTensor):
            out[key] = v.full_tensor()
        elif isinstance(v, torch.Tensor):
            out[key] = v.clone()
        else:
            out[key] = v
    return out


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() for k, v in model.state_dict().items()}


def train(out: Path, store: Path, steps: int, at: int) -> dict:
    model, optim = model_and_optim(seed=1)
    app = App(model, optim)
    # An async save runs its collectives in a thread: on a group of its own (DCP's advice), not
    # beside the training's on the default group.
    background = dist.new_group(backend="gloo")
    fut = None
    for n in range(1, steps + 1):
        step(model, optim, n)
        app.step = n
        if fut is not None:
            fut.result()  # the async save of the step before, overlapped with this step
            fut = None
        if n != at:
            continue
        writer = ckptguard.dcp.Writer(store / f"step-{n}", step=n)
        dcp.save({"app": app}, storage_writer=writer)
        dcp.save({"app": app}, checkpoint_id=str(out / "fs"))
        later = ckptguard.dcp.Writer(store / f"async-{n}", step=n)
        fut = dcp.async_save({"app": app}, storage_writer=later, process_group=background)
        ref = full(app.state_dict())
        if dist.get_rank() == 0:
            torch.save({f"app.{k}": v for k, v in ref.items()}, out / "ref.pt")
    final = params(model)
    if dist.get_rank() == 0:
        torch.save(final, out / "final.pt")
    return {"committed": writer.info.name if writer.info else None}


def resume(out: Path, store: Path, steps: int) -> dict:
    model, optim = model_and_optim(seed=2)
    app = App(model, optim)
    dcp.load({"app": app}, storage_reader=ckptguard.dcp.Reader(store))
    start = app.step
    for n in range(start + 1, steps + 1):
        step(model, optim, n)
    final = params(model)
    if dist.get_rank() == 0:
        torch.save(final, out / "final.pt")
    return {"resumed_at": start}


def fresh_state() -> dict[str, Any]:
    model, optim = model_and_optim(seed=3)
    msd, osd = get_state_dict(model, optim)  # the optimizer's state, initialized
    return {
        "app": {
            "model": msd,
            "optim": osd,
            "rng": torch.zeros_like(torch.get_rng_state()),
            "step": -1,
        }
    }


def load(out: Path, ckpt: Path, fs: Path) -> dict:
    ours, theirs = fresh_state(), fresh_state()
    dcp.load(ours, storage_reader=ckptguard.dcp.Reader(ckpt))
    dcp.load(theirs, storage_reader=dcp.FileSystemReader(str(fs)))
    mismatches = _compare(_leaves(ours), _leaves(theirs))
    whole = full(ours)
    if dist.get_rank() == 0:
        ref = torch.load(out / "ref.pt", weights_only=False)
        assert set(ref) == set(whole), sorted(set(ref) ^ set(whole))
        mismatches += _compare(whole, ref)
    assert not mismatches, mismatches[:5]
    n = sum(isinstance(v, DTensor) for v in _leaves(ours).values())
    return {"dtensors": n, "keys": len(whole)}


def _leaves(state: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    items = state.items() if isinstance(state, dict) else enumerate(state)
    for k, v in items:
        if isinstance(v, (dict, list)) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    bad = [f"keys differ: {sorted(set(a) ^ set(b))[:5]}"] if set(a) != set(b) else []
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if isinstance(x, DTensor):
            if not isinstance(y, DTensor) or not torch.equal(x.to_local(), y.to_local()):
                bad.append(k)
        elif isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.dtype != y.dtype or not torch.equal(x, y):
                bad.append(k)
        elif x != y:
            bad.append(f"{k}: {x!r} != {y!r}")
    return bad


def small(seed: int) -> dict[str, Any]:
    """The fault matrix's state: a sharded DTensor, a replicated tensor, plain values."""
    g = torch.Generator().manual_seed(seed)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    w = distribute_tensor(torch.randn(64, 33, generator=g), mesh, [Shard(0)])
    return {"model": {"w": w, "i": torch.arange(100) * seed}, "seed": seed}


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    args = sys.argv[3:]
    timeout = float(args[1]) if scenario == "fail" else 300.0
    dist.init_process_group("gloo", timeout=dt.timedelta(seconds=timeout))
    rank = dist.get_rank()
    report: dict[str, Any] = {"rank": rank}
    code = 0
    try:
        if scenario == "train":
            report.update(train(out, Path(args[0]), int(args[1]), int(args[2])))
        elif scenario == "resume":
            report.update(resume(out, Path(args[0]), int(args[1])))
        elif scenario == "load":
            report.update(load(out, Path(args[0]), Path(args[1])))
        elif scenario == "base":
            dcp.save(small(10), storage_writer=ckptguard.dcp.Writer(out / "step-10", step=10))
        elif scenario == "fail":
            writer = ckptguard.dcp.Writer(out / args[0], timeout=timeout)
            import warnings

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                dcp.save(small(11), storage_writer=writer)
            report["warnings"] = [str(w.message) for w in caught if "injected" in str(w.message)]
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
        report["ok"] = True
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        report.update(ok=False, type=type(e).__name__, error=f"{e}\n{traceback.format_exc()}")
        code = 1
    where = out.parent / "out" if scenario in ("base", "fail") else out
    where.mkdir(parents=True, exist_ok=True)
    (where / f"rank-{rank}.json").write_text(json.dumps(report))
    if code == 0:
        dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's finalization: gloo's worker threads can still hold work
    # objects whose destruction then needs the GIL of an interpreter being torn down, which
    # aborts the process ("terminate called without an active exception") after everything
    # this script checks is done and reported.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
