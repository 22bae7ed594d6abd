"""Describing the local state (ckptguard.inventory): one row per tensor, hashes only for copies
another rank may hold, PerRank tensors bound to this rank's row."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
import xxhash

from ckptguard import PerRank, Shard
from ckptguard.format.dtypes import SIZES
from ckptguard.inventory import DESC_SCHEMA, bind_per_rank, describe_local
from ckptguard.tree import flatten


def refs_of(state: dict) -> list:
    return flatten(state)[1]


def test_rows_and_hashes() -> None:
    state = {
        "w": torch.ones(2, 3),
        "a": np.zeros(5, dtype=np.int16),
        "s": Shard(torch.ones(2), offsets=(2,), global_shape=(4,)),
    }
    refs = refs_of(state)
    table = describe_local(refs, lambda ref: ref.key.encode().ljust(16, b"."))
    assert table.schema == DESC_SCHEMA
    rows = {r["key"]: r for r in table.to_pylist()}
    assert rows["w"]["nbytes"] == 24 and rows["w"]["global_shape"] == [2, 3]
    assert rows["a"]["kind"] == "numpy" and rows["a"]["dtype"] == "int16"
    assert rows["s"]["sharded"] and rows["s"]["offsets"] == [2] and rows["s"]["shape"] == [2]
    assert rows["s"]["global_shape"] == [4]
    assert rows["w"]["hash"] == b"w".ljust(16, b".")  # a Shard's box may be on several ranks
    assert rows["s"]["hash"] == b"s".ljust(16, b".")
    assert describe_local(refs, None).column("hash").null_count == 3  # one rank: no hashes


def test_per_rank_is_row_rank_of_a_world_tensor() -> None:
    refs = refs_of({"rng": PerRank(torch.arange(3)), "x": torch.ones(1)})
    bind_per_rank(refs, 2, 5)
    rng = next(r for r in refs if r.key == "rng")
    assert (rng.shape, rng.global_shape, rng.offsets) == ((1, 3), (5, 3), (2, 0))
    assert rng.sharded and rng.unique_box
    rows = {r["key"]: r for r in describe_local(refs, lambda ref: b"h" * 16).to_pylist()}
    assert rows["rng"]["hash"] is None and rows["rng"]["per_rank"]  # the only copy of its box
    assert rows["x"]["hash"] == b"h" * 16 and not rows["x"]["per_rank"]


def _rows_of_each_ref(refs: list, hasher: Any) -> list[dict]:
    """The description one ref at a time: what the columns must hold (a view: no bytes, its
    hash that of its ``view`` member)."""
    return [_row_of(r, hasher) for r in refs]


def _row_of(r: Any, hasher: Any) -> dict:
    if r.view is None:
        view = None
        nbytes = math.prod(r.shape) * SIZES[r.dtype]
        digest = None if r.unique_box or hasher is None else hasher(r)
    else:
        view = json.dumps(r.view.to_json())
        nbytes = 0
        digest = None if hasher is None else xxhash.xxh3_128_digest(view.encode())
    return {
        "key": r.key,
        "dtype": r.dtype,
        "kind": r.kind,
        "device": r.device,
        "requires_grad": r.requires_grad,
        "parameter": r.parameter,
        "sharded": r.sharded,
        "per_rank": r.per_rank,
        "nbytes": nbytes,
        "hash": digest,
        "global_shape": list(r.global_shape),
        "offsets": list(r.offsets),
        "shape": list(r.shape),
        "view": view,
    }


def test_columns_are_each_refs_row_on_a_mixed_state() -> None:
    base = torch.randn(6, 4)
    state = {
        "nested": {"l": [base, {"t": base.t()}], "row": base[1]},  # views of one storage
        "tied": base,
        "scalar": torch.tensor(2.0),
        "empty": torch.zeros(0, 3),
        "bf16": torch.ones(5, dtype=torch.bfloat16),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "np": np.arange(6, dtype=np.int64).reshape(2, 3)[:, ::2],
        "shard": Shard(torch.ones(2, 3), offsets=(2, 0), global_shape=(4, 3)),
        "mine": PerRank(torch.arange(4)),
    }
    refs = refs_of(state)
    bind_per_rank(refs, 1, 3)
    for hasher in (None, lambda ref: ref.key.encode()[:16].ljust(16, b"-")):
        table = describe_local(refs, hasher)
        assert table.schema == DESC_SCHEMA
        assert table.to_pylist() == _rows_of_each_ref(refs, hasher)
    assert describe_local([], None).num_rows == 0
