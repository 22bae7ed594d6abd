"""A preemption-safe training loop: resume from LATEST, checkpoint when the agent asks, exit.

Run one per rank under the agent (slurm/train.sbatch does this):

    srun ckptguard run --time-margin 10m -- python examples/resumable_train.py --store ckpts

Every rank trains a data-parallel replica over torch.distributed (the agent set RANK, WORLD_SIZE,
MASTER_ADDR, ...), averaging gradients with one all_reduce per parameter (DDP would do, but its
bucket layout changes after the first step of a process, and with it the floating-point order).
On start it resumes from the store's LATEST checkpoint, if any. Each step it asks whether the
agents want a checkpoint (a signal, preemption or the time limit); when they do, every rank saves
one checkpoint together and exits: the agent then exits 85 and the job script requeues the job.
The data of step s on rank r depends only on (s, r), so a resumed run computes exactly what an
uninterrupted one does (tests/test_slurm.py checks the final weights bitwise).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import ckptguard


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 4099 + rank)
    x = torch.randn(32, 16, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", help="rank 0 writes the final weights here (torch.save)")
    ap.add_argument("--progress", help="rank 0 writes the step it is at here, each step")
    ap.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step (demos)")
    args = ap.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    world = dist.get_world_size()

    start = 0
    if ckptguard.Store(args.store).latest_name() is not None:
        # Every rank loads the replicated state; collectively, rank 0 alone reads the manifest
        # and index and sends them to the others, and all ranks load the same checkpoint.
        state = ckptguard.load(args.store, collective=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start = state["step"]
        if rank == 0:
            print(f"resumed from step {start}", flush=True)

    for step in range(start, args.steps):
        x, y = batch(step, rank)
        loss = torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        for p in net.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
        # The first step after a (re)start ends a recovery: its time is the store's MTTR record
        # (only the first call of the process does anything).
        ckptguard.training_step(step + 1, store=args.store)
        if rank == 0 and args.progress:
            with open(args.progress, "w") as f:
                f.write(str(step + 1))
        time.sleep(args.step_sleep)
        # Ranks may hear of a request one step apart: agree before the collective save.
        flag = torch.tensor([int(ckptguard.checkpoint_requested())])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            state = {"model": net.state_dict(), "optim": opt.state_dict(), "step": step + 1}
            path = os.path.join(args.store, f"step-{step + 1}")
            ckptguard.save(state, path, step=step + 1, coordinator="torch")
            if rank == 0:
                print(f"checkpointed at step {step + 1}; exiting for requeue", flush=True)
            break
    else:
        if rank == 0 and args.out:
            torch.save(net.state_dict(), args.out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
