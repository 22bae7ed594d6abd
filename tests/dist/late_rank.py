"""One rank comes late to its first save; run by tests/test_coord_deadline.py.

Usage: late_rank.py BACKEND STORE OUTDIR LATE_RANK SLEEP_S TIMEOUT

Rank LATE_RANK sleeps SLEEP_S seconds before its first save (the coordinator's communicator or
gloo group is created in that save); the other ranks must give up within TIMEOUT (plus slack).
Then every rank meets on the application's own world (MPI barrier / gloo default group) and
saves again, on time: that save must create a fresh communicator and commit. Each rank writes
OUTDIR/rank-R.json with both outcomes and the time its first save call took.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import ckptguard
from ckptguard import Shard

ROWS, COLS = 8, 3


def state(rank: int, world: int) -> dict:
    full = torch.arange(float(ROWS * COLS)).reshape(ROWS, COLS)
    a, b = rank * ROWS // world, (rank + 1) * ROWS // world
    return {"w": Shard(full[a:b].clone(), (ROWS, COLS), (a, 0)), "bias": torch.ones(2)}


def attempt(store: str, name: str, rank: int, world: int, timeout: float) -> dict:
    t0 = time.monotonic()
    try:
        info = ckptguard.save(state(rank, world), os.path.join(store, name), timeout=timeout)
        out: dict = {"ok": True, "name": info.name, "uuid": info.uuid}
    except ckptguard.CheckpointError as e:
        out = {"ok": False, "type": type(e).__name__, "error": str(e)}
    out["seconds"] = time.monotonic() - t0
    return out


def main() -> int:
    backend, store, outdir = sys.argv[1], sys.argv[2], sys.argv[3]
    late, sleep_s, timeout = int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
    if backend == "mpi":
        from mpi4py import MPI

        rank, world = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        barrier = MPI.COMM_WORLD.Barrier
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        barrier = dist.barrier
    os.makedirs(outdir, exist_ok=True)
    if rank == late:
        time.sleep(sleep_s)
    result: dict = {"rank": rank, "first": attempt(store, "first", rank, world, timeout)}
    barrier()  # every rank is past its first save (the late one too)
    if rank == 0:
        result["visible"] = sorted(os.listdir(store)) if os.path.isdir(store) else []
    barrier()
    result["second"] = attempt(store, "second", rank, world, timeout)
    with open(os.path.join(outdir, f"rank-{rank}.json"), "w") as f:
        json.dump(result, f)
    barrier()
    if backend != "mpi":
        # Every rank is past the barrier and has written its outcome. Exit without tearing gloo
        # down: torch's teardown at exit sometimes aborts ("terminate called without an active
        # exception", once in CI, after a load that made no groups of ckptguard's).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
