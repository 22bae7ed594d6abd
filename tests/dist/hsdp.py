"""Hybrid-sharded (HSDP) and 2-D DTensor scenarios, run by tests/test_hsdp.py as gloo ranks.

Usage: hsdp.py SCENARIO STORE, with MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE set. Each rank
writes its outcome to STORE/../out/rank-R.json, which the test reads. Scenarios:

- ``save4`` (4 ranks, a 2x2 mesh): saves ``good`` (HSDP [Replicate, Shard(0)], 2-D
  [Shard(0), Shard(1)], Shard wrappers with each box on two ranks, a replicated tensor), tries
  ``bad`` whose replicas of one box differ (must abort), saves it as ``unchecked`` with
  ``check_replicated=False``, then loads ``good`` into templates with the same placements and
  with the placements swapped.
- ``load2`` (2 ranks, a 1-D mesh): loads ``good`` into [Shard(1)] DTensors and column Shards.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.distributed.tensor import Shard as DShard

import ckptguard

HSDP = [Replicate(), DShard(0)]
GRID = [DShard(0), DShard(1)]


def global_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "w": torch.randn(8, 6, generator=g),  # HSDP: boxes of 4 rows, each on two ranks
        "m": torch.randn(6, 4, generator=g),  # 2-D sharding: four 3x2 boxes
        "tiny": torch.randn(1, 3, generator=g),  # HSDP with an empty box on two ranks
        "s": torch.randn(4, 3, generator=g).double(),  # Shard wrappers: each box on two ranks
        "b": torch.arange(5.0),  # plain replicated
    }


def wrapped(t: torch.Tensor, box: int, parts: int, dim: int) -> ckptguard.Shard:
    n = t.shape[dim] // parts
    local = t.narrow(dim, box * n, n).clone()
    offsets = tuple(box * n if d == dim else 0 for d in range(t.dim()))
    return ckptguard.Shard(local, tuple(t.shape), offsets)


def state4(
    mesh: DeviceMesh, full: dict, m_placement: list, w_placement: list, zeros: bool = False
) -> dict:
    src = {k: torch.zeros_like(v) for k, v in full.items()} if zeros else full
    rank = dist.get_rank()
    return {
        "model": {
            "w": distribute_tensor(src["w"], mesh, w_placement),
            "tiny": distribute_tensor(src["tiny"], mesh, HSDP),
            "b": src["b"].clone(),
        },
        "optim": {"m": distribute_tensor(src["m"], mesh, m_placement)},
        "s": wrapped(src["s"], rank % 2, 2, 0),
    }


def check(out: dict, full: dict, s_dim: int, parts: int) -> None:
    rank = dist.get_rank()
    assert torch.equal(out["model"]["w"].full_tensor(), full["w"]), "w differs"
    assert torch.equal(out["model"]["tiny"].full_tensor(), full["tiny"]), "tiny differs"
    assert torch.equal(out["optim"]["m"].full_tensor(), full["m"]), "m differs"
    assert torch.equal(out["model"]["b"], full["b"]), "b differs"
    want = wrapped(full["s"], rank % parts, parts, s_dim)
    assert torch.equal(out["s"].local, want.local), "s differs"


def save4(store: str, result: dict) -> None:
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2))
    full = global_state()
    info = ckptguard.save(state4(mesh, full, GRID, HSDP), os.path.join(store, "good"), timeout=60)
    result.update(name=info.name, uuid=info.uuid)

    # Replicas of w's box that differ: every rank must raise the same error.
    st = state4(mesh, full, GRID, HSDP)
    w = st["model"]["w"]
    st["model"]["w"] = DTensor.from_local(w.to_local() + rank, mesh, HSDP, run_check=False)
    try:
        ckptguard.save(st, os.path.join(store, "bad"), timeout=60)
        result["bad"] = None
    except ckptguard.CheckpointAbortedError as e:
        result["bad"] = [type(e).__name__, str(e)]
    info = ckptguard.save(st, os.path.join(store, "unchecked"), timeout=60, check_replicated=False)
    result["unchecked"] = info.name

    for m_pl, w_pl in ((GRID, HSDP), (HSDP, GRID)):  # same placements, then swapped
        tmpl = state4(mesh, full, m_pl, w_pl, zeros=True)
        out = ckptguard.load(os.path.join(store, "good"), template=tmpl)
        assert out["model"]["w"] is tmpl["model"]["w"], "template DTensor not filled in place"
        assert out["model"]["w"].placements == tuple(w_pl)
        check(out, full, 0, 2)


def load2(store: str, result: dict) -> None:
    mesh = init_device_mesh("cpu", (2,))
    full = global_state()
    cols = [DShard(1)]
    lo, width = (0, 2) if dist.get_rank() == 0 else (2, 1)  # s: uneven column pieces
    tmpl = {
        "model": {
            "w": distribute_tensor(torch.zeros(8, 6), mesh, cols),
            "tiny": distribute_tensor(torch.zeros(1, 3), mesh, [Replicate()]),
            "b": torch.zeros(5),
        },
        "optim": {"m": distribute_tensor(torch.zeros(6, 4), mesh, cols)},
        "s": ckptguard.Shard(torch.zeros(4, width, dtype=torch.float64), (4, 3), (0, lo)),
    }
    out = ckptguard.load(os.path.join(store, "good"), template=tmpl)
    assert torch.equal(out["model"]["w"].full_tensor(), full["w"]), "w differs"
    assert torch.equal(out["model"]["tiny"].full_tensor(), full["tiny"]), "tiny differs"
    assert torch.equal(out["optim"]["m"].full_tensor(), full["m"]), "m differs"
    assert torch.equal(out["model"]["b"], full["b"]), "b differs"
    assert torch.equal(out["s"].local, full["s"][:, lo : lo + width]), "s differs"
    result["placements"] = str(out["model"]["w"].placements)


def main() -> int:
    scenario, store = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    outdir = os.path.join(os.path.dirname(store), "out")
    os.makedirs(outdir, exist_ok=True)
    result: dict = {"rank": rank, "world": dist.get_world_size(), "ok": False}
    try:
        {"save4": save4, "load2": load2}[scenario](store, result)
        result["ok"] = True
    except (ckptguard.CheckpointError, AssertionError) as e:
        result.update(type=type(e).__name__, error=str(e))
    with open(os.path.join(outdir, f"rank-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()  # no rank exits while another is still in a collective
    # Every rank is past the barrier and has written its outcome. Exit without tearing gloo
    # down: torch's teardown at exit sometimes aborts ("terminate called without an active
    # exception", once in CI, after a load that made no groups of ckptguard's).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if result["ok"] else 3)


if __name__ == "__main__":
    main()
