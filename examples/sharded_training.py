"""Sharded checkpointing under MPI: each rank owns a slice of every parameter and moment.

    mpiexec -n 4 python examples/sharded_training.py save ckpts-sharded
    mpiexec -n 2 python examples/sharded_training.py load ckpts-sharded

``save`` trains a small MLP for a few AdamW steps (every rank computes the same steps from the
same seed, standing in for a data-parallel job), then saves only its rows of each weight and
optimizer moment as ``ckptguard.Shard`` pieces, as FSDP/ZeRO-3 would own them; one commit covers
all ranks. ``load`` runs at any number of ranks: each asks for its own rows (a different split
from the one saved) and checks them against a reference it recomputes.
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI

import ckptguard
from ckptguard import Shard

STEPS = 5


def train() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(STEPS):
        x = torch.randn(32, 64)
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """An uneven split of n rows: earlier ranks get one more row when it does not divide."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard(t: torch.Tensor, rank: int, world: int) -> Shard:
    a, b = rows(t.shape[0], rank, world)
    return Shard(t[a:b].clone(), tuple(t.shape), (a,) + (0,) * (t.dim() - 1))


def sharded_state(model, opt, rank: int, world: int) -> dict:  # noqa: ANN001
    params = dict(model.named_parameters())
    moments = {}
    for name, p in params.items():
        st = opt.state[p]
        moments[name] = {
            "exp_avg": shard(st["exp_avg"], rank, world),
            "exp_avg_sq": shard(st["exp_avg_sq"], rank, world),
            "step": st["step"],
        }
    return {
        "model": {n: shard(p.detach(), rank, world) for n, p in params.items()},
        "optim": moments,
        "step": STEPS,
        "world_size_at_save": world,
    }


def template(model, rank: int, world: int) -> dict:  # noqa: ANN001
    """Empty pieces of this rank's rows, to be filled from whatever shards were saved."""
    out = {"model": {}, "optim": {}}
    for n, p in model.named_parameters():
        a, b = rows(p.shape[0], rank, world)
        off = (a,) + (0,) * (p.dim() - 1)

        def piece(p=p, a=a, b=b, off=off) -> Shard:
            return Shard(torch.empty_like(p[a:b]), tuple(p.shape), off)

        out["model"][n] = piece()
        out["optim"][n] = {"exp_avg": piece(), "exp_avg_sq": piece()}
    return out


def main() -> int:
    mode, store = sys.argv[1], sys.argv[2]
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    model, opt = train()
    if mode == "save":
        info = ckptguard.save(
            sharded_state(model, opt, rank, world),
            f"{store}/step-{STEPS}",
            step=STEPS,
            overwrite=True,
        )
        if rank == 0:
            print(
                f"{world} ranks saved {info.name}: {info.tensors} tensors, {info.files} data "
                f"files, {info.stored_bytes:,} bytes stored (one commit for all ranks)"
            )
        return 0
    out = ckptguard.load(store, template=template(model, rank, world), collective=True)
    ok = True
    for n, p in model.named_parameters():
        a, b = rows(p.shape[0], rank, world)
        ok &= torch.equal(out["model"][n].local, p.detach()[a:b])
        ok &= torch.equal(out["optim"][n]["exp_avg"].local, opt.state[p]["exp_avg"][a:b])
        ok &= torch.equal(out["optim"][n]["exp_avg_sq"].local, opt.state[p]["exp_avg_sq"][a:b])
    oks = comm.gather(bool(ok), root=0)
    if rank == 0:
        print(
            f"{world} ranks restored a checkpoint saved by {out['world_size_at_save']} ranks: "
            f"each read only the shards overlapping its rows; equal to training: {all(oks)}"
        )
    return 0 if comm.allreduce(int(not ok)) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
