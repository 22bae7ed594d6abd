"""Describe this rank's state for the save plan: one row per tensor, as an Arrow table.

The description carries what rank 0 needs to check that the ranks fit together and to pick
writers (dtype, kind, global shape, the box this rank holds, its size, and the hash of a copy
that other ranks may also hold); it travels to rank 0 as an Arrow IPC stream (``report``).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from operator import attrgetter

import numpy as np
import pyarrow as pa
import xxhash

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
        ("view", pa.string()),
    ]
)
"""One row per local tensor; ``hash`` is null where no other rank can hold the same box;
``view`` the JSON of a view's ``view`` member (its storage by key), null for other tensors."""

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
    box (``ref.unique_box``). A view has no bytes to write or compare: its size is 0 and its
    hash that of its ``view`` member (its storage's bytes are compared as the storage's). Each
    column is read off the refs in one pass (``map`` over an attribute getter), never a dict or
    list per tensor."""
    n = len(refs)
    cols: dict[str, list | pa.Array] = {
        name: list(map(attrgetter(name), refs))
        for name in ("key", "dtype", "kind", "device", "requires_grad", "parameter")
    }
    cols["sharded"] = list(map(attrgetter("sharded"), refs))
    cols["per_rank"] = list(map(attrgetter("per_rank"), refs))
    shapes = list(map(attrgetter("shape"), refs))
    cols["nbytes"] = [
        math.prod(shape) * SIZES[dtype] for shape, dtype in zip(shapes, cols["dtype"], strict=True)
    ]
    found = list(map(attrgetter("view"), refs))
    viewed = any(found)  # a View is true, None false: one pass at C speed
    cols["view"] = (
        [None if v is None else json.dumps(v.to_json()) for v in found] if viewed else [None] * n
    )
    if hasher is None:
        cols["hash"] = [None] * n
    else:
        cols["hash"] = [
            None if ref.unique_box or v is not None else hasher(ref)
            for ref, v in zip(refs, found, strict=True)
        ]
    for i, v in enumerate(cols["view"] if viewed else ()):
        if v is not None:
            cols["nbytes"][i] = 0
            cols["hash"][i] = None if hasher is None else xxhash.xxh3_128_digest(v.encode())
    # The shape columns from one flat list of values each (no list per tensor).
    lengths = np.fromiter(map(len, shapes), dtype=np.int32, count=n)
    starts = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int32)]), pa.int32())
    for name, values in (
        ("global_shape", map(attrgetter("global_shape"), refs)),
        ("offsets", map(attrgetter("offsets"), refs)),
        ("shape", shapes),
    ):
        flat = pa.array(list(itertools.chain.from_iterable(values)), pa.int64())
        cols[name] = pa.ListArray.from_arrays(starts, flat)
    return pa.table(cols, schema=DESC_SCHEMA)
