"""Describing the local state (ckptguard.inventory): one row per tensor, hashes only for copies
another rank may hold, PerRank tensors bound to this rank's row."""

from __future__ import annotations

import numpy as np
import torch

from ckptguard import PerRank, Shard
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
