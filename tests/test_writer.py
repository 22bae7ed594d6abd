"""ckptguard.writer.RankWriter: one rank's data file from encode + io, checked after the write."""

from __future__ import annotations

import os

import pytest
import torch

from ckptguard import backend
from ckptguard.format.datafile import FormatError
from ckptguard.tree import TensorRef
from ckptguard.writer import RankWriter

UUID = "ab" * 16


def _ref(key: str, t: torch.Tensor) -> TensorRef:
    shape = tuple(t.shape)
    return TensorRef(
        key, "float32", shape, "torch", "cpu", False, False, t, shape, (0,) * len(shape)
    )


@pytest.mark.parametrize("be", ["python", "native"])
def test_rows_describe_the_chunks_written(tmp_path, be: str):
    if be == "native" and not backend.available():
        pytest.skip(backend.reason())
    t = torch.arange(1000, dtype=torch.float32)
    with backend.use(be):
        w = RankWriter(str(tmp_path), 3, UUID, chunk_size=1024)
        w.add(0, _ref("w", t), codec=1)
        table = w.finish()
    rows = w.rows
    assert table.num_rows == len(rows) == 4
    assert [r.chunk for r in rows] == [0, 1, 2, 3]
    assert [r.raw_len for r in rows] == [1024, 1024, 1024, 928]
    assert [r.shard_byte_offset for r in rows] == [0, 1024, 2048, 3072]
    assert all(r.offset % 4096 == 0 and r.file == w.name and r.rank == 3 for r in rows)
    assert os.path.getsize(w.path) == w.size


def test_parts_must_be_whole_chunks_but_the_last(tmp_path):
    t = torch.arange(1000, dtype=torch.float32)
    raw = t.numpy().view("uint8")
    w = RankWriter(str(tmp_path), 0, UUID, chunk_size=1024)
    try:
        w.add(0, _ref("w", t), True, raw[:2048])
        w.add(0, _ref("w", t), True, raw[2048:3000])  # 952 bytes: not whole chunks
        with pytest.raises(ValueError, match="not whole chunks"):
            w.add(0, _ref("w", t), True, raw[3000:])
    finally:
        w.abort()
    assert w.fd == -1


def test_parts_give_the_chunks_of_one_piece(tmp_path):
    t = torch.arange(3000, dtype=torch.float32)
    raw = t.numpy().view("uint8")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = RankWriter(str(tmp_path / "a"), 0, UUID, 4096)
    one.add(0, _ref("w", t), True)
    parts = RankWriter(str(tmp_path / "b"), 0, UUID, 4096)
    parts.add(0, _ref("w", t), True, raw[:8192])
    parts.add(0, _ref("w", t), True, raw[8192:])
    assert one.finish() == parts.finish()
    with open(one.path, "rb") as a, open(parts.path, "rb") as b:
        assert a.read() == b.read()


def test_recheck_catches_a_record_changed_under_the_writer(tmp_path, monkeypatch):
    """finish() re-reads every record header: one that reads back differently is a FormatError."""
    t = torch.arange(1000, dtype=torch.float32)
    w = RankWriter(str(tmp_path), 0, UUID, chunk_size=1024)
    w.add(0, _ref("w", t), codec=0)
    first = w.rows[0].offset
    os.pwrite(w.fd, b"X", first + 10)  # inside the first record header
    with pytest.raises(FormatError, match="reads back differently"):
        w.finish()


def test_existing_file_is_never_overwritten(tmp_path):
    w = RankWriter(str(tmp_path), 0, UUID)
    w.abort()
    with pytest.raises(FileExistsError):
        RankWriter(str(tmp_path), 0, UUID)


def test_two_shards_of_one_tensor_are_two_shards(tmp_path):
    """A rank may hold several pieces of one tensor (DCP's chunks): each is its own shard,
    chunked from 0, not a continuation of the other."""
    t = torch.arange(2000, dtype=torch.float32).reshape(20, 100)
    w = RankWriter(str(tmp_path), 0, UUID, chunk_size=1024)
    for start in (0, 10):
        piece = t[start : start + 10]
        ref = TensorRef(
            "w",
            "float32",
            (10, 100),
            "torch",
            "cpu",
            False,
            False,
            piece,
            (20, 100),
            (start, 0),
            sharded=True,
        )
        w.add(0, ref, codec=0)
    w.finish()
    assert {r.shard_offsets for r in w.rows} == {(0, 0), (10, 0)}
    for offsets in ((0, 0), (10, 0)):
        mine = [(r.chunk, r.shard_byte_offset) for r in w.rows if r.shard_offsets == offsets]
        assert mine == [(n, n * 1024) for n in range(4)], (offsets, mine)
