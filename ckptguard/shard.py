"""Sharded tensors: ``Shard`` annotations and DTensor placements, as (local, global, offsets);
``PerRank`` tensors, whose value is each rank's own."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Shard:
    """This rank's piece of a global tensor: ``local`` starts at ``offsets`` in ``global_shape``.

    Use it in the state you save (each rank passes its own piece) and in the template you load
    into (the piece is filled in place from whatever shards the checkpoint holds).
    """

    local: Any
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]

    def __post_init__(self) -> None:
        self.global_shape = tuple(int(n) for n in self.global_shape)
        self.offsets = tuple(int(n) for n in self.offsets)
        shape = tuple(self.local.shape)
        if len(shape) != len(self.global_shape) or len(self.offsets) != len(shape):
            raise ValueError(
                f"Shard: local shape {shape}, global shape {self.global_shape} and offsets "
                f"{self.offsets} must have the same number of dimensions"
            )
        for o, n, g in zip(self.offsets, shape, self.global_shape, strict=True):
            if o < 0 or o + n > g:
                raise ValueError(
                    f"Shard: local {shape} at {self.offsets} lies outside {self.global_shape}"
                )


@dataclass
class PerRank:
    """A tensor (or numpy array) whose value is this rank's own, e.g. ``torch.get_rng_state()``.

    Every rank passes its own under the same key; each is stored (as row ``rank`` of a tensor
    with a leading dimension of the world size, docs/format.md section 3.1) and each rank loads
    its own back. A plain tensor under one key on several ranks is a replica instead: saved
    once, and its copies must be equal.
    """

    local: Any

    def __post_init__(self) -> None:
        if is_dtensor(self.local) or not isinstance(self.local, (torch.Tensor, np.ndarray)):
            raise TypeError(
                f"PerRank wraps a plain tensor or numpy array, not {type(self.local).__name__}"
            )


def is_dtensor(t: Any) -> bool:
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def dtensor_shard(t: Any) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...], bool]:
    """(local tensor, global shape, offsets, replicated) of a DTensor."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not all(p.is_shard() or isinstance(p, Replicate) for p in t.placements):
        raise ValueError(
            f"DTensor with placements {t.placements} (partial?) cannot be saved; "
            "redistribute it to Shard/Replicate first"
        )
    local = t.to_local()
    _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    replicated = all(isinstance(p, Replicate) for p in t.placements)
    return local, tuple(t.shape), tuple(int(o) for o in offsets), replicated


def dtensor_copies(t: Any) -> int:
    """How many ranks hold the same local box of a DTensor: the product of the sizes of the mesh
    dimensions it is replicated along (1 when each box is on one rank only)."""
    from torch.distributed.tensor import Replicate

    return math.prod(
        t.device_mesh.size(d) for d, p in enumerate(t.placements) if isinstance(p, Replicate)
    )
