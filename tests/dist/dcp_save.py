"""One rank of a PyTorch DCP save over gloo, for tests/test_import.py (``ckptguard import`` of a
DCP checkpoint written by several ranks).

Usage (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): dcp_save.py DIR. Every rank saves
``state(rank, world)``: replicated keys, keys of its own, and a DTensor sharded across the ranks.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist


def full_weight(world: int) -> torch.Tensor:
    """The global tensor the ranks hold row blocks of."""
    return torch.arange(world * 2 * 6, dtype=torch.float32).reshape(world * 2, 6)


def state(rank: int, world: int, sharded: Any = None) -> dict[str, Any]:
    """What rank ``rank`` saves (``sharded``: its DTensor; the test passes the full tensor)."""
    return {
        "model": {
            "w": torch.linspace(-1, 1, 12).reshape(3, 4),
            "b": torch.zeros(4, dtype=torch.bfloat16),
            "sharded": full_weight(world) if sharded is None else sharded,
        },
        "opt": {
            "state": {"0": {"step": torch.tensor(3.0), "exp_avg": torch.full((3, 4), 0.5)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": ["0"]}],
        },
        f"rank{rank}": {"rng": torch.full((5,), float(rank)), "seen": rank},
        "epoch": 7,
    }


def main() -> None:
    from torch.distributed.checkpoint import save
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    sharded = distribute_tensor(full_weight(world), mesh, [Shard(0)])
    save(state(rank, world, sharded), checkpoint_id=sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()
    print("rank", rank, "ok")


if __name__ == "__main__":
    main()
