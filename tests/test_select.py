"""ckptguard.select: the load planner (boxes, the rows a load reads, pieces, template targets).

The vectorised planner is compared with the scalar one of tests/select_oracle.py here on a
hand-made index, and on random indexes in test_scale.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from select_oracle import index_table
from select_oracle import plan_reads as scalar_plan_reads

import ckptguard
from ckptguard import select
from ckptguard.errors import CheckpointError

# An 8x4 tensor saved as two shards of 4 rows, one row (16 bytes) per chunk; a 0-d tensor.
TENSORS = [{"shape": [8, 4]}, {"shape": []}]
TABLE = index_table([([8, 4], [((0, 0), (4, 4)), ((4, 0), (4, 4))], 16), ([], [((), ())], 4)])


def _summary(pieces: list[select.Piece]) -> list:
    return sorted(
        (p.shard, p.overlap, p.row0, p.row1, sorted(r.shard_byte_offset for r in p.rows))
        for p in pieces
    )


def test_intersect() -> None:
    assert select.intersect(((0, 0), (4, 4)), ((2, 1), (4, 2))) == ((2, 1), (2, 2))
    assert select.intersect(((0,), (4,)), ((4,), (2,))) is None  # they only touch
    assert select.intersect(((0,), (4,)), ((1,), (0,))) is None  # an empty box meets nothing
    assert select.intersect(((), ()), ((), ())) == ((), ())  # 0-d boxes


def test_a_box_across_two_shards_reads_only_its_rows() -> None:
    box = ((3, 1), (3, 2))  # rows 3..5, columns 1..2
    pieces = select.plan_reads(TABLE, TENSORS, {0: box})
    assert _summary(pieces[0]) == [
        (((0, 0), (4, 4)), ((3, 1), (1, 2)), 3, 4, [48]),
        (((4, 0), (4, 4)), ((4, 1), (2, 2)), 0, 2, [0, 16]),
    ]
    rows = select.rows_for(TABLE, TENSORS, {0: box})
    assert sorted((r.shard_offsets, r.shard_byte_offset) for r in rows) == [
        ((0, 0), 48),
        ((4, 0), 0),
        ((4, 0), 16),
    ]
    assert _summary(pieces[0]) == _summary(
        scalar_plan_reads(select.rows_for(TABLE, TENSORS, {0: ((0, 0), (8, 4))}), box)
    )


def test_0d_tensors_are_always_read_and_empty_boxes_read_nothing() -> None:
    pieces = select.plan_reads(TABLE, TENSORS, {0: ((2, 0), (0, 4)), 1: ((), ())})
    assert pieces[0] == []
    assert _summary(pieces[1]) == [(((), ()), ((), ()), 0, 1, [0])]
    assert select.plan_reads(TABLE, TENSORS, {}) == {}


def test_a_box_of_the_wrong_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="wrong number of dimensions"):
        select.rows_for(TABLE, TENSORS, {0: ((0,), (8,))})


def test_piece_spans() -> None:
    (p,) = [q for q in select.plan_reads(TABLE, TENSORS, {0: ((5, 0), (2, 4))})[0]]
    assert (p.row_bytes, p.span, p.chunk_span) == (16, (16, 48), (16, 48))


def test_boxes_of_whole_and_per_rank_tensors() -> None:
    assert select.whole_box({"shape": [3, 2]}, 5) == ((0, 0), (3, 2))
    per_rank = {"shape": [4, 3], "per_rank": True}
    assert select.whole_box(per_rank, 2) == select.rank_box(per_rank, 2) == ((2, 0), (1, 3))


def test_template_targets() -> None:
    tensors = [
        {"key": "w", "dtype": "float32", "shape": [8, 4]},
        {"key": "r", "dtype": "int64", "shape": [2, 3], "per_rank": True},
    ]
    part = ckptguard.Shard(torch.zeros(2, 4), (8, 4), (6, 0))
    out = select.template_targets(
        {"w": part, "r": torch.zeros(3, dtype=torch.int64)}, tensors, "p", 1
    )
    assert out[0].box == ((6, 0), (2, 4)) and not out[0].fresh
    assert out[1].box == ((1, 0), (1, 3)) and out[1].fill.shape == (1, 3)
    with pytest.raises(CheckpointError, match="is not in checkpoint p"):
        select.template_targets({"x": torch.zeros(1)}, tensors, "p", 0)
    with pytest.raises(CheckpointError, match="holds float32"):
        select.template_targets({"w": torch.zeros(8, 4, dtype=torch.float64)}, tensors, "p", 0)
    with pytest.raises(CheckpointError, match="per-rank values"):
        select.template_targets({"r": torch.zeros(2, 3, dtype=torch.int64)}, tensors, "p", 0)


def test_whole_packed_takes_the_one_row_slices_of_shared_records(tmp_path: Path) -> None:
    path = str(tmp_path / "c")
    state = {f"s{i}": torch.ones(100) for i in range(12)}  # 400 B each: 10 in a 4 KiB pack
    state["w"] = torch.ones(5000)  # more than a quarter of the chunk: records of its own
    state["h"] = torch.ones(3, dtype=torch.float16)  # alone of its element size: not packed
    ckptguard.save(state, path, chunk_size=4096, compress="none")
    with ckptguard.open.CheckpointReader(path) as rd:
        ids = {t["key"]: i for i, t in enumerate(rd.tensors)}
        small = [ids[f"s{i}"] for i in range(12)]
        packs = select.whole_packed(rd.table, rd.tensors, [ids["w"], *small[::-1], ids["h"]])
        assert sorted(packs.tensor.tolist()) == small and len(packs.rows) == 2
        rows = {r.key: r for r in rd.rows}
        by_record = [
            (rows[rd.tensors[g]["key"]].offset, int(a))
            for g, a in zip(packs.tensor, packs.at, strict=True)
        ]
        assert by_record == sorted(by_record)  # in file, record and slice order
        for k, r in enumerate(packs.rows):
            m = packs.members(k)
            assert packs.at[m][0] == 0 and r.record_byte_offset == 0 and r.packed
            assert packs.length[m].sum() == r.record_raw_len
            assert {rows[rd.tensors[g]["key"]].offset for g in packs.tensor[m]} == {r.offset}
        assert packs.dtypes == {"float32"}
        # Only the ids asked for: a record's other slices are not taken.
        part = select.whole_packed(rd.table, rd.tensors, small[3:5])
        assert part.tensor.tolist() == small[3:5] and part.at.tolist() == [1200, 1600]
        none = select.whole_packed(rd.table, rd.tensors, [ids["w"], ids["h"]])
        assert len(none.tensor) == 0 and none.rows == []
