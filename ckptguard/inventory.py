"""Describe this rank's state for the save plan: one row per tensor, as an Arrow table.

The description carries what rank 0 needs to check that the ranks fit together and to pick
writers (dtype, kind, global shape, the box this rank holds, its size, and the hash of a copy
that other ranks may also hold); it travels to rank 0 as an Arrow IPC stream (``report``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyarrow as pa

from .format.dtypes import SIZES
from .tree import TensorRef

DESC_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("dtype", pa.string()),
        ("kind", pa.string()),
        ("device", pa.string()),
        ("requires_grad", pa.bool_()),
        ("parameter", pa.bool_()),
        ("sharded", pa.bool_()),
        ("per_rank", pa.bool_()),
        ("nbytes", pa.int64()),
        ("hash", pa.binary(16)),
        ("global_shape", pa.list_(pa.int64())),
        ("offsets", pa.list_(pa.int64())),
        ("shape", pa.list_(pa.int64())),
    ]
)
"""One row per local tensor; ``hash`` is null where no other rank can hold the same box."""

Hasher = Callable[[TensorRef], bytes]
"""The 16-byte digest of a tensor's bytes (replicas are compared by it)."""


def bind_per_rank(refs: Sequence[TensorRef], rank: int, world: int) -> None:
    """Make each ``PerRank`` tensor of this rank row ``rank`` of a tensor of ``world`` rows: a
    shard of shape (1, *shape) at (rank, 0, ...), the only copy of its box."""
    for ref in refs:
        if ref.per_rank:
            shape = tuple(ref.shape)
            ref.shape, ref.global_shape = (1, *shape), (world, *shape)
            ref.offsets = (rank,) + (0,) * len(shape)
            ref.sharded = ref.unique_box = True


def describe_local(refs: Sequence[TensorRef], hasher: Hasher | None) -> pa.Table:
    """This rank's tensors as a ``DESC_SCHEMA`` table. ``hasher`` (None: hash nothing, as in a
    one-rank save) hashes every tensor and shard but those known to be the only copy of their
    box (``ref.unique_box``)."""
    cols: dict[str, list] = {name: [] for name in DESC_SCHEMA.names}
    for ref in refs:
        cols["key"].append(ref.key)
        cols["dtype"].append(ref.dtype)
        cols["kind"].append(ref.kind)
        cols["device"].append(ref.device)
        cols["requires_grad"].append(ref.requires_grad)
        cols["parameter"].append(ref.parameter)
        cols["sharded"].append(ref.sharded)
        cols["per_rank"].append(ref.per_rank)
        cols["nbytes"].append(math.prod(ref.shape) * SIZES[ref.dtype])
        cols["hash"].append(None if ref.unique_box or hasher is None else hasher(ref))
        cols["global_shape"].append(list(ref.global_shape))
        cols["offsets"].append(list(ref.offsets))
        cols["shape"].append(list(ref.shape))
    return pa.table(cols, schema=DESC_SCHEMA)
