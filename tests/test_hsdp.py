"""Replicated boxes of sharded tensors: HSDP DTensors ([Replicate, Shard] on a 2-D mesh), 2-D
sharding and Shard wrappers that several ranks declare with the same box.

The plan's dedup logic is tested in-process on hand-made descriptions; the end-to-end cases run 4
and 2 gloo ranks of tests/dist/hsdp.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import free_port

import ckptguard
from ckptguard.inventory import DESC_SCHEMA
from ckptguard.plan import (
    SHARDED,
    OneRank,
    Plan,
    PlanError,
    assignment,
    make_plan,
    replica_groups,
    writer_from_json,
)

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "dist", "hsdp.py")


# -- the plan, in-process -------------------------------------------------------------------------
def desc(*rows: tuple) -> pa.Table:
    """One rank's description: rows of (key, global shape, offsets, shape, hash or None)."""
    cols: dict[str, list] = {name: [] for name in DESC_SCHEMA.names}
    for key, gshape, offs, shape, h in rows:
        sharded = offs is not None
        cols["key"].append(key)
        cols["dtype"].append("float32")
        cols["kind"].append("torch")
        cols["device"].append("cpu")
        cols["requires_grad"].append(False)
        cols["parameter"].append(False)
        cols["sharded"].append(sharded)
        cols["per_rank"].append(False)
        shape = shape if sharded else gshape
        cols["nbytes"].append(int(np.prod(shape)) * 4)
        cols["hash"].append(None if h is None else bytes([h]) * 16)
        cols["global_shape"].append(list(gshape))
        cols["offsets"].append(list(offs) if sharded else [0] * len(gshape))
        cols["shape"].append(list(shape))
        cols["view"].append(None)
    return pa.table(cols, schema=DESC_SCHEMA)


def hsdp_descs(hashes: tuple = (1, 2, 1, 2), extra: tuple | list = ()) -> list[pa.Table]:
    """A 2x2 mesh with [Replicate, Shard(0)]: ranks 0, 2 hold rows 0:4 of w, ranks 1, 3 rows 4:8."""
    return [
        desc(("w", (8, 6), (4 * (r % 2), 0), (4, 6), hashes[r]), *(e[r] for e in extra))
        for r in range(4)
    ]


class Ref:
    def __init__(self, key: str) -> None:
        self.key = key


def writers(plan: Plan, key: str, world: int) -> list[int]:
    """The ranks that write their piece of ``key``, as each rank decodes the plan."""
    return [r for r in range(world) if assignment(plan.keys, plan.writer, [Ref(key)], r)[0][1]]


def test_replica_groups() -> None:
    offs = np.array([[0, 0], [4, 0], [0, 0], [4, 0], [2, 0], [8, 0], [8, 0]])
    lens = np.array([[4, 6], [4, 6], [4, 6], [4, 6], [1, 6], [0, 6], [0, 6]])
    members, starts = replica_groups(offs, lens)
    assert members.tolist() == [0, 2, 1, 3]  # empty boxes (rows 5, 6) are never grouped
    assert starts.tolist() == [0, 2]
    members, starts = replica_groups(np.zeros((3, 0)), np.zeros((3, 0)))  # 0-d: one box
    assert members.tolist() == [0, 1, 2] and starts.tolist() == [0]
    members, starts = replica_groups(offs[:2], lens[:2])
    assert members.size == 0 and starts.size == 0


def test_replicated_boxes_are_written_once_balanced() -> None:
    plan = make_plan(hsdp_descs())
    assert writers(plan, "w", 4) == [0, 1]  # one rank per box
    assert plan.bytes_per_rank == [96, 96, 0, 0]
    wire = json.loads(json.dumps([w.to_json() for w in plan.writer]))  # the plan travels as JSON
    assert [writer_from_json(w) for w in wire] == plan.writer
    # A second HSDP tensor's boxes go to the other replica: bytes balance across ranks.
    v = [("v", (8, 6), (4 * (r % 2), 0), (4, 6), 7) for r in range(4)]
    plan = make_plan(hsdp_descs(extra=[v]))
    assert writers(plan, "w", 4) == [0, 1] and writers(plan, "v", 4) == [2, 3]
    assert plan.bytes_per_rank == [96] * 4


def test_plain_replicas_and_boxes_share_the_balance() -> None:
    b = [("b", (12,), None, None, 9) for _ in range(4)]
    m = [("m", (2, 4), (r // 2, 2 * (r % 2)), (1, 2), None) for r in range(4)]  # 2-D grid
    plan = make_plan(hsdp_descs(extra=[b, m]))
    assert plan.writer[plan.keys.index("m")] == SHARDED  # no copies: every rank writes
    assert plan.writer[plan.keys.index("b")] == OneRank(2)  # the least-loaded holder after w
    assert writers(plan, "w", 4) == [0, 1]
    assert plan.bytes_per_rank == [104, 104, 56, 8]


def test_pure_sharding_keeps_the_cheap_path() -> None:
    descs = [desc(("w", (8, 6), (2 * r, 0), (2, 6), None)) for r in range(4)]
    plan = make_plan(descs)
    assert plan.writer == [SHARDED] and plan.bytes_per_rank == [48] * 4


def test_duplicated_empty_boxes_need_no_hash() -> None:
    # [Replicate, Shard(0)] of a 1-row tensor: ranks 1 and 3 hold the same empty box.
    descs = [
        desc(("t", (1, 3), (r % 2, 0), (1 - r % 2, 3), None if r % 2 else 4)) for r in range(4)
    ]
    plan = make_plan(descs)
    assert writers(plan, "t", 4) == [0, 1, 3]  # empty pieces are written as before


def test_divergent_replicas_of_a_box() -> None:
    with pytest.raises(PlanError) as e:
        make_plan(hsdp_descs(hashes=(1, 2, 1, 3)))
    msg = str(e.value)
    assert "tensor 'w'" in msg and "offsets [4, 0]" in msg and "ranks [1, 3]" in msg
    assert "check_replicated=False" in msg
    with pytest.raises(PlanError, match="values differ"):  # an unhashed copy cannot be checked
        make_plan(hsdp_descs(hashes=(1, 2, None, 2)))
    plan = make_plan(hsdp_descs(hashes=(1, 2, 5, 3)), check_replicated=False)
    assert writers(plan, "w", 4) == [0, 1]  # unchecked: the lowest rank's copy


def test_plain_replica_error_unchanged() -> None:
    descs = [desc(("b", (3,), None, None, r)) for r in range(2)]
    with pytest.raises(PlanError) as e:
        make_plan(descs)
    assert str(e.value) == (
        "tensor 'b' is replicated on ranks [0, 1] but their values differ. If each rank's value "
        "is its own (an RNG state), wrap it in ckptguard.PerRank and every rank gets its own "
        "back; pass check_replicated=False only to save the lowest rank's copy for every rank"
    )
    assert make_plan([desc(("b", (3,), None, None, None))]).writer == [
        OneRank(0)
    ]  # one rank: no hash


def test_partial_overlap_is_still_an_error() -> None:
    descs = [desc(("w", (6, 2), (o, 0), (4, 2), 1)) for o in (0, 2)]
    with pytest.raises(PlanError, match="overlap"):
        make_plan(descs)
    descs = [desc(("w", (6, 2), (0, 0), (4, 2), 1)) for _ in range(2)]  # copies, and a gap
    with pytest.raises(PlanError, match="cover 8 of 12"):
        make_plan(descs)
    descs = [desc(("w", (8, 2), (0, 0), (4, 2), 1)) for _ in range(2)]
    with pytest.raises(PlanError, match="overlap or leave a gap"):
        make_plan(descs)


def test_shard_wrapper_may_be_replicated() -> None:
    from ckptguard.tree import flatten

    _, refs, _ = flatten({"s": ckptguard.Shard(torch.ones(2, 3), (4, 3), (2, 0))})
    assert refs[0].sharded and not refs[0].unique_box


# -- 4 and 2 gloo ranks ---------------------------------------------------------------------------
def gloo(n: int, scenario: str, store: Path, timeout: float = 120) -> list[dict]:
    """Run ``n`` ranks of tests/dist/hsdp.py; return each rank's outcome."""
    port, procs = str(free_port()), []
    for r in range(n):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(r),
            "WORLD_SIZE": str(n),
        }
        log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed below
        cmd = [sys.executable, SCRIPT, scenario, str(store)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=log), log))
    codes, logs, out = [], [], []
    for r, (p, log) in enumerate(procs):
        codes.append(p.wait(timeout=timeout))
        log.seek(0)
        logs.append(f"--- rank {r} exit {codes[-1]}\n{log.read()[-3000:]}")
        log.close()
        try:
            with open(store.parent / "out" / f"rank-{r}.json") as f:
                out.append(json.load(f))
        except FileNotFoundError:
            out.append({"rank": r, "ok": False, "error": "no outcome written"})
    assert codes == [0] * n, "\n".join([json.dumps(out), *logs])
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """save4 once (saves, the divergent save, loads at 4) for the tests below."""
    store = tmp_path_factory.mktemp("hsdp") / "store"
    return store, gloo(4, "save4", store)


def rows(ckpt: Path) -> list:
    from ckptguard.format.index import read

    return read((ckpt / "index.parquet").read_bytes())


@pytest.mark.rank_job
def test_hsdp_save_at_4_loads_at_4(saved: tuple[Path, list[dict]]) -> None:
    store, res = saved
    assert all(r["ok"] for r in res), res  # includes the loads with both placements
    assert len({(r["uuid"], r["name"]) for r in res}) == 1
    assert ckptguard.verify(store / "good").ok


def test_each_box_written_once_by_balanced_ranks(saved: tuple[Path, list[dict]]) -> None:
    store, _ = saved
    by_key: dict[str, list] = {}
    for r in rows(store / "good"):
        by_key.setdefault(r.key, []).append(r)
    for key, rs in by_key.items():
        chunks = [(r.shard_offsets, r.chunk) for r in rs]
        assert len(chunks) == len(set(chunks)), key  # no chunk twice
    boxes = {k: {r.shard_offsets: r.rank for r in rs if r.raw_len} for k, rs in by_key.items()}
    assert len(boxes["s"]) == 2 and len(boxes["model/w"]) == 2
    assert sorted(boxes["model/w"].values()) in ([0, 1], [0, 3], [1, 2], [2, 3])
    assert len({*boxes["s"].values(), *boxes["model/w"].values()}) == 4  # spread, not replica 0
    assert len(boxes["optim/m"]) == 4 and len(boxes["model/b"]) == 1
    desc = {t.key: t for t in ckptguard.describe(store / "good").tensors}
    assert desc["model/w"].raw_bytes == 8 * 6 * 4 and desc["s"].raw_bytes == 4 * 3 * 8


def test_load_whole_in_one_process(saved: tuple[Path, list[dict]]) -> None:
    store, _ = saved
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import hsdp
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
    full = hsdp.global_state()
    out = ckptguard.load(store / "good")
    assert torch.equal(out["model"]["w"], full["w"]) and torch.equal(out["s"], full["s"])
    assert torch.equal(out["optim"]["m"], full["m"]) and torch.equal(out["model"]["b"], full["b"])
    assert torch.equal(out["model"]["tiny"], full["tiny"])
    # check_replicated=False wrote the lowest rank's copy of each box (rank r added r).
    w = ckptguard.load(store / "unchecked")["model"]["w"]
    assert torch.equal(w[:4], full["w"][:4]) and torch.equal(w[4:], full["w"][4:] + 1)


def test_divergent_box_replicas_abort_on_every_rank(saved: tuple[Path, list[dict]]) -> None:
    store, res = saved
    errors = {tuple(r["bad"]) for r in res}
    assert len(errors) == 1, errors  # the same error on every rank
    kind, msg = errors.pop()
    assert kind == "CheckpointAbortedError"
    assert "tensor 'model/w'" in msg and "values differ" in msg and "ranks [0, 2]" in msg
    assert not (store / "bad").exists()


@pytest.mark.rank_job
def test_load_at_2_with_1d_shard1(saved: tuple[Path, list[dict]]) -> None:
    store, _ = saved
    res = gloo(2, "load2", store)
    assert all(r["ok"] for r in res), res


def _with(table: pa.Table, row: int, field: str, value: object) -> pa.Table:
    """``table`` with ``field`` of ``row`` set to ``value``."""
    col = table.column(field).to_pylist()
    col[row] = value
    i = table.schema.get_field_index(field)
    return table.set_column(i, field, pa.array(col, table.schema.field(field).type))


@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("dtype", "bfloat16", "dtype is 'float32' on rank 0 but 'bfloat16' on rank 2"),
        ("kind", "numpy", "kind is 'torch' on rank 0 but 'numpy' on rank 2"),
        ("sharded", False, "sharded is True on rank 0 but False on rank 2"),
        ("global_shape", [8, 7], "global_shape is [8, 6] on rank 0 but [8, 7] on rank 2"),
        ("global_shape", [8, 6, 1], "global_shape is [8, 6] on rank 0 but [8, 6, 1] on rank 2"),
    ],
)
def test_ranks_that_disagree_on_a_tensor_are_named(field: str, value: object, shown: str) -> None:
    """Every rank must describe a key alike; the first rank that does not is named, with rank 0."""
    descs = [
        desc(("a", (2,), None, None, 1), ("w", (8, 6), (2 * r, 0), (2, 6), None)) for r in range(4)
    ]
    descs[2] = _with(descs[2], 1, field, value)
    descs[3] = _with(descs[3], 1, field, value)  # only the first one is named
    with pytest.raises(PlanError) as e:
        make_plan(descs)
    assert str(e.value) == f"tensor 'w': {shown}"
