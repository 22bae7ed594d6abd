"""Save planning (ckptguard.plan) on hand-made descriptions: agreement, coverage, replicas,
balance, manifest entries, and the writer representation that travels to every rank."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from ckptguard.inventory import DESC_SCHEMA
from ckptguard.plan import (
    SHARDED,
    EveryRank,
    OneRank,
    PlanError,
    SomeRanks,
    assignment,
    first_differing,
    make_plan,
    writer_from_json,
)


def desc(*rows: dict) -> pa.Table:
    """One rank's description; each row overrides a float32 (4,) replica with hash 1."""
    cols: dict[str, list] = {name: [] for name in DESC_SCHEMA.names}
    for row in rows:
        shape = row.get("shape", [4])
        full = {
            "dtype": "float32",
            "kind": "torch",
            "device": "cpu",
            "requires_grad": False,
            "parameter": False,
            "sharded": False,
            "per_rank": False,
            "nbytes": int(np.prod(shape)) * 4,
            "hash": bytes([1]) * 16,
            "global_shape": shape,
            "offsets": [0] * len(shape),
            "shape": shape,
            "view": None,
            **row,
        }
        for name in DESC_SCHEMA.names:
            cols[name].append(full[name])
    return pa.table(cols, schema=DESC_SCHEMA)


class Ref:
    def __init__(self, key: str) -> None:
        self.key = key


def test_writers_round_trip_through_json() -> None:
    some = SomeRanks.of([0, 3, 9], 12)
    for w in (OneRank(5), SHARDED, some):
        assert writer_from_json(json.loads(json.dumps(w.to_json()))) == w
    assert EveryRank() == SHARDED and SHARDED.to_json() == -1
    assert [r for r in range(16) if some.writes(r)] == [0, 3, 9]  # beyond world: never
    assert [r for r in range(4) if OneRank(2).writes(r)] == [2]
    for bad in (-2, 1.5, None, True, [1]):
        with pytest.raises(ValueError):
            writer_from_json(bad)


def test_replica_goes_to_the_least_loaded_rank() -> None:
    big = {"key": "big", "shape": [100], "hash": None, "sharded": True, "global_shape": [200]}
    descs = [
        desc({**big, "offsets": [off]}, {"key": "b"}, {"key": "c", "shape": [50]})
        for off in (0, 100)
    ]
    plan = make_plan(descs)
    assert plan.keys == ["big", "b", "c"]
    # c (larger) first, onto rank 0 (a tie: the lowest rank), then b onto the less loaded rank 1
    assert plan.writer == [SHARDED, OneRank(1), OneRank(0)]
    assert plan.bytes_per_rank == [400 + 200, 400 + 16]
    mine = assignment(plan.keys, plan.writer, [Ref("c"), Ref("b"), Ref("big")], 1)
    assert mine == [(2, False), (1, True), (0, True)]


def test_disagreement_names_key_option_and_ranks() -> None:
    with pytest.raises(PlanError, match=r"tensor 'b': dtype is 'float32' on rank 0 but 'int64'"):
        make_plan([desc({"key": "b"}), desc({"key": "b", "dtype": "int64"})])
    with pytest.raises(PlanError, match="global_shape is \\[4\\] on rank 0 but \\[5\\] on rank 2"):
        make_plan([desc({"key": "b"}), desc({"key": "b"}), desc({"key": "b", "shape": [5]})])
    with pytest.raises(PlanError, match="PerRank on every rank"):
        make_plan([desc({"key": "b"}), desc({"key": "b", "per_rank": True})])


def test_gap_names_the_ranks() -> None:
    piece = {"key": "w", "sharded": True, "global_shape": [8], "hash": None}
    with pytest.raises(PlanError, match=r"shards from ranks \[0, 1\]"):
        make_plan([desc({**piece, "offsets": [0]}), desc({**piece, "offsets": [2]})])


def test_unchecked_replicas_report_differing_copies() -> None:
    descs = [desc({"key": "b", "hash": bytes([r]) * 16}) for r in range(3)]
    with pytest.raises(PlanError, match="values differ"):
        make_plan(descs)
    plan = make_plan(descs, check_replicated=False)
    assert plan.differing == ["b"] and plan.writer == [OneRank(0)]


def test_first_differing() -> None:
    valid = np.ones(4, dtype=bool)
    hashes = np.zeros((4, 16), dtype=np.uint8)
    members, starts = np.array([0, 1, 2, 3]), np.array([0, 2])
    assert first_differing(members, starts, valid, hashes) is None
    hashes[3, 0] = 1
    assert first_differing(members, starts, valid, hashes) == 1
    valid[1] = False  # an unhashed copy cannot be checked
    assert first_differing(members, starts, valid, hashes) == 0


def test_manifest_entries() -> None:
    p = {"key": "p", "parameter": True, "requires_grad": True, "device": "cuda:0"}
    r = {"key": "r", "per_rank": True, "sharded": True, "hash": None, "global_shape": [2, 4]}
    plan = make_plan([desc(p, {**r, "offsets": [k, 0], "shape": [1, 4]}) for k in range(2)])
    assert plan.tensors == [
        {
            "key": "p",
            "dtype": "float32",
            "shape": [4],
            "kind": "torch",
            "device": "cuda:0",
            "requires_grad": True,
            "parameter": True,
        },
        {
            "key": "r",
            "dtype": "float32",
            "shape": [2, 4],
            "kind": "torch",
            "device": "cpu",
            "requires_grad": False,
            "parameter": False,
            "per_rank": True,
        },
    ]


def test_empty_plan() -> None:
    plan = make_plan([desc(), desc()])
    assert plan.tensors == [] and plan.writer == [] and plan.bytes_per_rank == [0, 0]


def _scalar_plan(descs: list[pa.Table], check: bool) -> tuple[list, list[int], list[str]]:
    """The plan one key at a time, for unsharded keys and sharded keys without copies: each
    replicated key checked, then placed largest first onto its least-loaded holder."""
    holders: dict[str, list[tuple[int, dict]]] = {}
    for r, d in enumerate(descs):
        for row in d.to_pylist():
            holders.setdefault(row["key"], []).append((r, row))
    load = [0] * len(descs)
    writer: dict[str, Any] = {}
    for k, hs in holders.items():
        if hs[0][1]["sharded"]:
            writer[k] = SHARDED
            for r, row in hs:
                load[r] += row["nbytes"]
    plain = [k for k in holders if k not in writer]
    differing = []
    for k in plain:
        hashes = [row["hash"] for _, row in holders[k]]
        if len(hashes) > 1 and (None in hashes or len(set(hashes)) > 1):
            if check:
                raise PlanError(f"tensor {k!r} values differ")
            if None not in hashes:
                differing.append(k)
    for k in sorted(plain, key=lambda k: -holders[k][0][1]["nbytes"]):
        hs = holders[k]
        r = min((load[r], r) for r, _ in hs)[1] if check else hs[0][0]
        load[r] += hs[0][1]["nbytes"]
        writer[k] = OneRank(r)
    return [writer[k] for k in holders], load, differing


@pytest.mark.parametrize("seed", range(12))
def test_column_wise_plan_is_the_scalar_plan(seed: int) -> None:
    """Replicas on random subsets of ranks, sizes with ties, some copies that differ or are not
    hashed, sharded keys without copies, each rank's keys in its own order."""
    rng = np.random.default_rng(seed)
    world = int(rng.integers(1, 5))
    rows: list[list[dict]] = [[] for _ in range(world)]
    for i in range(int(rng.integers(1, 40))):
        key = f"k{i}"
        if rng.random() < 0.2:
            piece = {"key": key, "sharded": True, "global_shape": [4 * world], "hash": None}
            for r in range(world):
                rows[r].append({**piece, "offsets": [4 * r]})
            continue
        shape = [int(rng.choice([1, 4, 16]))]
        holders = [r for r in range(world) if rng.random() < 0.6] or [int(rng.integers(world))]
        for r in holders:
            h = bytes([1]) * 16 if rng.random() < 0.9 else bytes([r + 2]) * 16
            rows[r].append({"key": key, "shape": shape, "hash": None if rng.random() < 0.05 else h})
    for r in range(world):
        rng.shuffle(rows[r])
    descs = [desc(*rs) for rs in rows]
    for check in (True, False):
        try:
            want = _scalar_plan(descs, check)
        except PlanError as e:
            with pytest.raises(PlanError, match=str(e).split()[1]):
                make_plan(descs, check)
            continue
        plan = make_plan(descs, check)
        assert (plan.writer, plan.bytes_per_rank, plan.differing) == want


def test_the_first_key_that_fails_a_check_is_named() -> None:
    """Checks run in key order whichever way each key is checked (column-wise or one by one)."""
    gap = {"key": "s", "sharded": True, "global_shape": [8], "hash": None}
    differ = [{"key": "a", "hash": bytes([r]) * 16} for r in range(2)]
    descs = [desc(differ[r], {**gap, "offsets": [2 * r]}) for r in range(2)]
    with pytest.raises(PlanError, match="'a' is replicated on ranks \\[0, 1\\]"):
        make_plan(descs)
    descs = [desc({**gap, "offsets": [2 * r]}, differ[r]) for r in range(2)]
    with pytest.raises(PlanError, match=r"shards from ranks \[0, 1\]"):
        make_plan(descs)
    plan = make_plan([desc(differ[r]) for r in range(2)], check_replicated=False)
    assert plan.differing == ["a"] and plan.writer == [OneRank(0)]
