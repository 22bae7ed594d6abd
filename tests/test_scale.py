"""Scale of the manifest and of a load's row selection, at small sizes.

Per-rank trees are stored as diffs against rank 0's (format.md section 6.1), so the manifest
grows with what differs, not with ranks x tree size; a load selects the index rows its boxes
need on the Arrow table before building Python rows.
"""

from __future__ import annotations

import collections
import json
import math
import os
import random
from types import SimpleNamespace
from typing import Any

import independent_reader as ir
import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import resign_manifest
from select_oracle import index_table, plan_reads
from threadcoord import ThreadCoordinator, run_ranks

import ckptguard
from ckptguard import select
from ckptguard.errors import CorruptCheckpointError
from ckptguard.format import cover, manifest, ranktrees, validate
from ckptguard.format.datafile import FormatError
from ckptguard.format.index import SCHEMA, int_lists
from ckptguard.inventory import describe_local
from ckptguard.loader import load_checkpoint
from ckptguard.open import CheckpointReader
from ckptguard.plan import make_plan
from ckptguard.report import dump_json, merge_trees, to_ipc
from ckptguard.tree import TreeError, check_tree, flatten

# ---------------------------------------------------------------- ranks as threads


def save_ranks(states: list[Any], path: str) -> None:
    def main(coord: ThreadCoordinator) -> None:
        ckptguard.save(states[coord.rank], path, coordinator=coord, timeout=60)

    run_ranks(len(states), main)


def same(a: Any, b: Any) -> bool:
    """Equal in type and value, recursively (1, 1.0 and True differ; so do 0.0 and -0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return repr(a) == repr(b)
    return a == b


# ---------------------------------------------------------------- per-rank trees as diffs


W = torch.arange(12, dtype=torch.float32).reshape(3, 4)
SHARED = torch.arange(5, dtype=torch.int64)


def rank_state(r: int) -> dict:
    """Rank 0's values, with each plain type of section 6 changed on some ranks."""
    one: list[Any] = [1, 1.0, True, 1]  # rank 0 and 3 agree; 1 and 2 differ only in type
    gen = random.Random(r)
    state: dict[str, Any] = {
        "model": {"w": W, "shared": SHARED, "layers": [{"scale": 0.5} for _ in range(20)]},
        "rank": r,
        "one": one[r],
        "zero": -0.0 if r == 2 else 0.0,
        "none": None if r != 1 else "not none",
        "text": f"r\u00e9ng-{r}" if r else "rank zero",
        "big": 2**70 + r,
        "float": [float("inf"), float("nan"), float("-inf")][r % 3] if r else 1.5,
        "bytes": bytes([r]) * 3,
        "tuple": (1, (2, r), ()),
        "int_keys": {0: "a", 7: r},
        "odict": collections.OrderedDict([("z", r), ("a", [2, 3])]),
        "np": np.float32(r) if r != 3 else np.int16(3),
        "dtype": torch.bfloat16 if r % 2 else torch.float16,
        "size": torch.Size([2, r]),
        "device": torch.device("cpu") if r != 2 else torch.device("meta"),
        "rng": (3, tuple(gen.getrandbits(32) for _ in range(625)), None),
        "flags": [r == i for i in range(4)],
    }
    state["model"]["layers"][7]["scale"] = 0.5 + r  # deep in a list of 20 equal dicts
    if r == 2:  # structure differs: another key, a longer list, a tensor only rank 2 has
        state["extra"] = {"only_on": 2, "t": torch.full((3,), 2.0)}
        state["flags"].append(True)
    if r == 3:
        del state["int_keys"][0]
    return state


def test_per_rank_trees_round_trip_exactly(store: str) -> None:
    world = 4
    states = [rank_state(r) for r in range(world)]
    path = os.path.join(store, "diffs")
    save_ranks(states, path)
    body = ir.parse_manifest(ir.read_manifest_bytes(path))
    assert manifest.RANK_TREE_DIFFS in body["features"]
    assert sorted(body["rank_trees"]) == ["1", "2", "3"]
    assert all(isinstance(d, list) for d in body["rank_trees"].values())
    # a diff holds what differs: one leaf deep in the model, not the model or the whole tree;
    # rank 2's root has another member, so its whole tree is replaced
    assert [p for p, _ in body["rank_trees"]["2"]] == [[]]
    for r in ("1", "3"):
        paths = [p for p, _ in body["rank_trees"][r]]
        assert ["model", "layers", 7, "scale"] in paths, r
        assert any(p[:1] == ["rng"] for p in paths), r
        assert not any(p in ([], ["model"], ["model", "layers"]) for p in paths), r
    for r in range(world):  # every rank gets exactly the values it saved, types included
        out = load_checkpoint(path, rank=r)
        assert same(out, states[r]), r
    assert same(load_checkpoint(path, rank=world + 3), states[0])  # beyond the saved world
    assert ckptguard.verify(path).ok
    ck = ir.read_checkpoint(path)  # the independent reader reconstructs the same trees
    assert sorted(ck.rank_trees) == [1, 2, 3]
    for r in (1, 2, 3):
        mine = ir.apply_diff(body["tree"], body["rank_trees"][str(r)])
        assert json.dumps(mine) == json.dumps(ranktrees.rank_tree(body, r))


def test_whole_rank_trees_still_read() -> None:
    """Without the feature a rank_trees value is that rank's whole tree (null included)."""
    doc = {"tree": {"a": 1}, "rank_trees": {"1": None, "2": [1]}, "features": []}
    assert ranktrees.rank_tree(doc, 1) is None and ranktrees.rank_tree(doc, 2) == [1]
    assert ranktrees.rank_tree(doc, 3) == {"a": 1}
    doc = _doc({"a": [1, 2]}, {"1": [[["a", 1], None]]})
    assert ranktrees.rank_tree(doc, 1) == {"a": [1, None]} and doc["tree"] == {"a": [1, 2]}


def test_agreeing_ranks_need_no_feature(store: str) -> None:
    path = os.path.join(store, "same")
    save_ranks([{"w": W, "step": 3, "lr": 0.1}] * 3, path)
    body = ir.parse_manifest(ir.read_manifest_bytes(path))
    assert body["features"] == ["locator"] and body["rank_trees"] == {}


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, 1, -1, 2**62, rng.randrange(-1000, 1000)])
    if kind == 2:
        return rng.choice([0.0, -0.0, 1.0, 0.5, 1e300, rng.random()])
    if kind in (3, 4):
        return rng.choice(["", "a", "$x", "\u2603", str(rng.random())])
    if kind in (5, 6):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(5))]
    if kind == 7:
        return {f"k{i}": _random_json(rng, depth + 1) for i in range(rng.randrange(5))}
    tag = rng.choice(["$tuple", "$dict", "$odict"])
    if tag == "$tuple":
        return {tag: [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]}
    return {tag: [[i, _random_json(rng, depth + 1)] for i in range(rng.randrange(4))]}


def _mutate(rng: random.Random, v: Any) -> Any:
    if isinstance(v, list) and v and rng.random() < 0.8:
        v = list(v)
        i = rng.randrange(len(v))
        v[i] = _mutate(rng, v[i])
        return v
    if isinstance(v, dict) and v and rng.random() < 0.8:
        v = dict(v)
        k = rng.choice(list(v))
        v[k] = _mutate(rng, v[k])
        return v
    return _random_json(rng, 3)


@pytest.mark.parametrize("seed", range(60))
def test_diff_round_trips_random_json(seed: int) -> None:
    rng = random.Random(seed)
    base = {"root": _random_json(rng), "more": [_random_json(rng) for _ in range(6)]}
    before = dump_json(base)
    differ = ranktrees.TextDiffer(before.decode())
    for _ in range(5):
        other = base
        for _ in range(rng.randrange(1, 6)):
            other = _mutate(rng, other)
        text = dump_json(other)
        d = differ.diff(text.decode())
        if text == before:
            assert d == []
            continue
        ranktrees.check_diff(base, d, "diff")
        ir.check_diff(base, d, "diff")
        assert dump_json(ranktrees.apply_diff(base, d)) == text
        assert dump_json(ir.apply_diff(base, d)) == text
        assert len(json.dumps(d)) <= 2 * len(text) + 16  # never much more than the whole
    assert dump_json(base) == before  # the base is left as it was


def test_diff_keeps_types_apart() -> None:
    long = "x" * 200  # so that entries are shorter than the list
    base = {"a": [1, 0.0, True, 1.5, "1", None, 2**62, long], "b": {"x": 1}}
    other = {"a": [1.0, -0.0, 1, 1.5, 1, False, 2**62, long], "b": {"x": True}}
    d = ranktrees.TextDiffer(dump_json(base).decode()).diff(dump_json(other).decode())
    assert dump_json(ranktrees.apply_diff(base, d)) == dump_json(other)
    assert sorted(map(str, (p for p, _ in d))) == sorted(
        map(str, (["a", 0], ["a", 1], ["a", 2], ["a", 4], ["a", 5], ["b", "x"]))
    )


def _doc(tree: Any, diffs: dict) -> dict:
    return {"tree": tree, "rank_trees": diffs, "features": [manifest.RANK_TREE_DIFFS]}


@pytest.mark.parametrize(
    "diff",
    [
        [],
        {},
        [[["a"]]],
        [["a", 1]],
        [[["nope"], 1]],
        [[["a", 5], 1]],
        [[["a", -1], 1]],
        [[["a", True], 1]],
        [[["a", 0.0], 1]],
        [[["b", "0"], 1]],
        [[[0], 1]],
        [[["a"], 1], [["a", 0], 2]],
        [[["a", 0], 1], [["a", 0], 2]],
        [[[], 1], [["b"], 2]],
        [[["b"] + ["x"] * 3000, 1]],
    ],
)
def test_bad_diffs_are_refused(diff: Any) -> None:
    tree = {"a": [1, 2], "b": {"$tuple": [1]}}
    with pytest.raises(FormatError):
        ranktrees.check_diff(tree, diff, "diff")
    with pytest.raises(ir.SpecViolation):
        ir.check_diff(tree, diff, "diff")


def _resave_diff(path: str, diff: list) -> None:
    def mut(body: dict) -> None:
        body["rank_trees"]["1"] = diff

    resign_manifest(path, mut)


@pytest.mark.parametrize(
    "diff",
    [
        [[["t", "$tensor"], 99]],  # a tensor that does not exist
        [[["t"], {"$tensor": 0, "x": 1}]],  # a tag with other members
        [[["v", "$npscalar"], "float64"]],  # the hex no longer fits the dtype
        [[["v"], {"$bogus": 1}]],
    ],
)
def test_malformed_reconstructed_trees_are_corrupt(store: str, diff: list) -> None:
    path = os.path.join(store, "bad")
    states = [
        {"t": W, "v": np.float32(r), "deep": [[0]], "r": r} for r in range(2)
    ]  # rank 1 differs: the feature is on
    save_ranks(states, path)
    _resave_diff(path, diff)
    with open(os.path.join(path, "MANIFEST.json"), "rb") as f:
        manifest.decode(f.read())  # the paths resolve: what is wrong is the tree they make
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint(path, rank=1)
    load_checkpoint(path, rank=0)  # rank 0's tree is intact
    report = ckptguard.verify(path)
    assert not report.ok and "object tree is malformed" in str(report.problems[0])
    with pytest.raises(ir.SpecViolation):
        ir.read_checkpoint(path)


def test_diff_anchor_finds_the_value_and_its_depth() -> None:
    """The value re-checked after a replacement, and its depth as section 6 counts it."""
    tree = {
        "a": [{"b": {"$tuple": [1, {"$dict": [[0, {"c": 2}]]}]}}],
        "v": {"$npscalar": "float32", "hex": "00000000"},
    }
    anchor = ranktrees.diff_anchor
    assert anchor(tree, []) == (0, 0)
    assert anchor(tree, ["a", 0, "b"]) == (3, 3)
    assert anchor(tree, ["a", 0, "b", "$tuple", 1]) == (5, 4)
    assert anchor(tree, ["a", 0, "b", "$tuple", 1, "$dict", 0, 1, "c"]) == (9, 6)
    assert anchor(tree, ["a", 0, "b", "$tuple", 1, "$dict", 0, 0]) == (5, 4)  # a key: the $dict
    assert anchor(tree, ["a", 0, "b", "$tuple"]) == (3, 3)  # the list itself: the $tuple
    assert anchor(tree, ["v", "hex"]) == (1, 1)
    check_tree([[0]], 0, depth=510)
    with pytest.raises(TreeError):
        check_tree([[0]], 0, depth=511)  # the inner list would be at depth 513


# ---------------------------------------------------------------- manifest size at many ranks


def _descriptions(ranks: int, tensors: int) -> tuple[list[bytes], list[pa.Table], list[Any]]:
    blobs, descs, trees = [], [], []
    for r in range(ranks):
        state = {
            "model": {f"layer{i}.w": torch.empty(2, 3) for i in range(tensors)},
            "rank": r,
            "rng": (3, tuple(range(r, r + 8)), None),
            "step": 100,
        }
        tree, refs, _ = flatten(state)
        blobs.append(dump_json(tree))
        descs.append(pa.ipc.open_stream(to_ipc(describe_local(refs, None))).read_all())
        trees.append(tree)
    return blobs, descs, trees


def test_manifest_stays_small_at_2000_ranks() -> None:
    ranks, tensors = 2000, 100
    blobs, descs, trees = _descriptions(ranks, tensors)
    plan = make_plan(descs, check_replicated=False)
    tree0, diffs = merge_trees([memoryview(b) for b in blobs], descs, plan.keys)
    assert len(diffs) == ranks - 1
    doc = _doc(tree0, diffs)
    size = len(json.dumps(diffs, separators=(",", ":")))
    whole = len(blobs[1]) * (ranks - 1)  # what whole trees per rank took
    assert size < 120 * ranks and size * 20 < whole, (size, whole)
    for r in (1, 999, ranks - 1):
        assert json.dumps(ranktrees.rank_tree(doc, r)) == json.dumps(trees[r])
        ranktrees.check_diff(tree0, diffs[str(r)], "diff")


# ---------------------------------------------------------------- row selection on the table


def _random_index(rng: random.Random, whole: bool = False) -> tuple[list[dict], pa.Table]:
    """Tensors of 0-3 dimensions, split into shards along one or two dimensions, each shard's
    bytes cut into chunks of random multiples of the element size (one chunk if ``whole``)."""
    tensors, rows = [], []
    for t in range(12):
        nd = rng.randrange(4)
        shape = [rng.randrange(1, 7) for _ in range(nd)]
        es = rng.choice([1, 2, 4, 8])
        tensors.append({"key": f"t{t}", "shape": shape, "dtype": "x", "elem": es})
        cuts = []
        for d in range(nd):
            k = rng.randrange(1, 3) if d < 2 else 1
            pts = sorted(rng.sample(range(1, shape[d]), min(k - 1, shape[d] - 1)))
            cuts.append([0, *pts, shape[d]])
        boxes = [((), ())]
        for d in range(nd):
            boxes = [
                ((*o, a), (*n, b - a))
                for o, n in boxes
                for a, b in zip(cuts[d], cuts[d][1:], strict=False)
            ]
        for o, n in boxes:
            total = math.prod(n) * es
            pos, chunk = 0, 0
            while pos < total:
                raw = total if whole else min(total - pos, es * rng.randrange(1, 6))
                rows.append(
                    {
                        "key": f"t{t}",
                        "tensor": t,
                        "dtype": "x",
                        "global_shape": shape,
                        "shard_offsets": list(o),
                        "shard_lengths": list(n),
                        "chunk": chunk,
                        "shard_byte_offset": pos,
                        "raw_len": raw,
                        "rank": 0,
                        "file": "rank-00000.ckg",
                        "offset": 4096 * (len(rows) + 1),
                        "stored_len": raw,
                        "codec": "raw",
                        "elem_size": es,
                        "hash": bytes(16),
                        "base": None,
                        "key_id": None,
                    }
                )
                pos += raw
                chunk += 1
    rng.shuffle(rows)
    return tensors, pa.Table.from_pylist(rows, schema=SCHEMA)


def _damage(rng: random.Random, table: pa.Table) -> pa.Table:
    """One shard (all its chunks) dropped, moved by one within the tensor, or duplicated: a
    gap or an overlap that only the coverage check sees."""
    rows = table.to_pylist()
    shards = sorted({(r["tensor"], tuple(r["shard_offsets"])) for r in rows if r["global_shape"]})
    t, o = rng.choice(shards)
    mine = [r for r in rows if r["tensor"] == t and tuple(r["shard_offsets"]) == o]
    kind, d = rng.randrange(3), rng.randrange(len(o))
    if kind == 1:
        r0 = mine[0]
        if o[d] > 0:
            step = -1
        elif o[d] + r0["shard_lengths"][d] < r0["global_shape"][d]:
            step = 1
        else:
            kind = 0
    if kind == 0:
        rows = [r for r in rows if r not in mine]
    elif kind == 1:
        for r in mine:
            r["shard_offsets"] = [x + step * (i == d) for i, x in enumerate(r["shard_offsets"])]
    else:
        rows += [dict(r, offset=r["offset"] + 4096 * 10**6) for r in mine]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("seed", range(60))
def test_coverage_check_agrees_with_check_cover(seed: int, whole: bool) -> None:
    """The coverage check of all tensors at once gives check_cover's verdict on each."""
    rng = random.Random(seed)
    tensors, table = _random_index(rng, whole)
    entries = [{"key": t["key"], "shape": t["shape"]} for t in tensors]
    if seed % 4:
        table = _damage(rng, table)
    expect = None
    boxes: dict = collections.defaultdict(list)
    for r in table.to_pylist():
        if r["chunk"] == 0:
            boxes[r["tensor"]].append((r["shard_offsets"], r["shard_lengths"]))
    try:
        for i, t in enumerate(tensors):
            nd = len(t["shape"])
            offs = np.array([b[0] for b in boxes[i]], dtype=np.int64).reshape(len(boxes[i]), nd)
            lens = np.array([b[1] for b in boxes[i]], dtype=np.int64).reshape(len(boxes[i]), nd)
            cover.check_cover(t["key"], t["shape"], offs, lens)
    except FormatError as e:
        expect = str(e)
    lists = {n: int_lists(table.column(n))[0] for n in ("shard_offsets", "shard_lengths")}
    cols = [validate._np(table, c) for c in ("raw_len", "shard_byte_offset", "chunk")]
    got = None
    try:
        validate._check_shards(
            validate._Boxes.of(entries, validate._np(table, "tensor"), lists),
            validate._Rows(table),
            *cols,
            validate._np(table, "elem_size"),
            np.zeros(table.num_rows, dtype=np.int64),
        )
    except FormatError as e:
        got = str(e)
    assert (got is None) == (expect is None), (got, expect)
    if got is not None and "index row" not in got:  # a duplicate may break chunk rules first
        assert got == expect


def _table_of(shape: list[int], boxes: list[tuple[list[int], list[int]]]) -> pa.Table:
    """One tensor ``t`` saved as ``boxes``, one chunk per box."""
    return index_table([(shape, [(tuple(o), tuple(n)) for o, n in boxes], 1 << 62)], keys=["t"])


@pytest.mark.parametrize(
    "boxes,error",
    [
        ([([0, 0], [2, 4]), ([2, 0], [2, 4]), ([4, 0], [2, 4])], None),
        ([([0, 0], [2, 4]), ([1, 0], [2, 4]), ([4, 0], [2, 4])], "overlap or leave a gap"),
        ([([0, 0], [3, 2]), ([0, 2], [3, 2]), ([3, 0], [3, 2]), ([3, 2], [3, 2])], None),
        ([([0, 0], [3, 2]), ([0, 2], [3, 2]), ([3, 0], [3, 3]), ([2, 1], [1, 1])], "overlap"),
        ([([0, 0], [6, 4])], None),
        ([([0, 0], [6, 2]), ([0, 2], [6, 2])], None),
        ([([0, 0], [6, 2]), ([0, 1], [6, 2])], "overlap or leave a gap"),
        ([([0, 0], [6, 2]), ([0, 1], [6, 3])], "cover 30 of 24"),
    ],
)
def test_coverage_of_chosen_layouts(boxes: list, error: str | None) -> None:
    table = _table_of([6, 4], boxes)
    files = {"rank-00000.ckg": 4096 * 100}
    entry = {"key": "t", "dtype": "float32", "shape": [6, 4]}
    if error is None:
        validate.check_table(table, [entry], files, set())
    else:
        with pytest.raises(FormatError, match=error):
            validate.check_table(table, [entry], files, set())


def test_rows_of_one_shard_must_agree_on_its_lengths() -> None:
    """Two rows starting at the same element with different extents are not one shard."""
    table = _table_of([6, 4], [([0, 0], [3, 4]), ([3, 0], [3, 4])]).to_pylist()
    half = dict(table[0], shard_lengths=[2, 4], chunk=1, raw_len=24, stored_len=24)
    table[0].update(raw_len=24, stored_len=24)
    half.update(shard_byte_offset=24, offset=4096 * 3)
    t = pa.Table.from_pylist([*table, half], schema=SCHEMA)
    with pytest.raises(FormatError, match="disagree on its lengths"):
        validate.check_table(
            t,
            [{"key": "t", "dtype": "float32", "shape": [6, 4]}],
            {"rank-00000.ckg": 4096 * 100},
            set(),
        )


def _random_box(rng: random.Random, shape: list[int]) -> tuple[tuple, tuple]:
    offs, lens = [], []
    for n in shape:
        a = rng.randrange(n + 1)
        offs.append(a)
        lens.append(rng.randrange(n - a + 1))
    if rng.random() < 0.3:  # the whole tensor, as a load without a template wants
        return (0,) * len(shape), tuple(shape)
    return tuple(offs), tuple(lens)


def _pieces(rows: list, box: tuple) -> list:
    return sorted(
        (p.shard, p.overlap, p.row0, p.row1, sorted(r.offset for r in p.rows))
        for p in plan_reads(rows, box)
    )


@pytest.mark.parametrize("seed", range(30))
def test_row_filter_matches_the_old_path(seed: int) -> None:
    rng = random.Random(seed)
    tensors, table = _random_index(rng)
    rd = SimpleNamespace(table=table, tensors=tensors)
    ids = rng.sample(range(len(tensors)), rng.randrange(1, len(tensors) + 1))
    boxes = {i: _random_box(rng, tensors[i]["shape"]) for i in ids}
    old = CheckpointReader.rows_of_tensors(rd, sorted(ids))  # every row of the tensors
    new = select.rows_for(table, tensors, boxes)
    planned = select.plan_reads(table, tensors, boxes)
    by_tensor: dict[int, list] = collections.defaultdict(list)
    for r in old:
        by_tensor[r.tensor].append(r)
    new_by_tensor: dict[int, list] = collections.defaultdict(list)
    for r in new:
        new_by_tensor[r.tensor].append(r)
    for i, box in boxes.items():
        wanted = {r.offset for p in plan_reads(by_tensor[i], box) for r in p.rows}
        assert {r.offset for r in new_by_tensor[i]} == wanted, (i, box)
        assert _pieces(new_by_tensor[i], box) == _pieces(by_tensor[i], box)
        assert sorted(
            (p.shard, p.overlap, p.row0, p.row1, sorted(r.offset for r in p.rows))
            for p in planned[i]
        ) == _pieces(by_tensor[i], box)
    assert set(new_by_tensor) <= set(boxes)
    assert len(new) == len({r.offset for r in new})


def test_load_reads_only_the_rows_it_needs(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A template wanting rows 2..4 of a 4-shard tensor builds only the rows of those shards."""
    world = 4
    full = torch.arange(8 * 64, dtype=torch.float32).reshape(8, 64)
    states = [
        {"w": ckptguard.Shard(full[2 * r : 2 * r + 2].clone(), (8, 64), (2 * r, 0))}
        for r in range(world)
    ]
    path = os.path.join(store, "rows")
    save_ranks(states, path)
    built: list[int] = []
    real = select.rows_for

    def spy(table: pa.Table, tensors: list, boxes: dict) -> list:
        out = real(table, tensors, boxes)
        built.append(len(out))
        return out

    monkeypatch.setattr(select, "rows_for", spy)
    want = ckptguard.Shard(torch.zeros(2, 64), (8, 64), (3, 0))
    out = load_checkpoint(path, template={"w": want})
    assert torch.equal(out["w"].local, full[3:5])
    assert built == [2]  # rows 3..4: the shards of ranks 1 and 2, one chunk each
