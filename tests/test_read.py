"""ckptguard.read: reading records (checked against their index rows), and verify's report."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import flip_byte, small_state

import ckptguard
from ckptguard.errors import CorruptCheckpointError
from ckptguard.open import CheckpointReader
from ckptguard.read import (
    Problem,
    VerifyReport,
    problem_of,
    read_into,
    read_record,
    verify_checkpoint,
    verify_rows,
)

DATA = "rank-00000.ckg"


@pytest.fixture
def ckpt(store: str) -> str:
    path = os.path.join(store, "c1")
    ckptguard.save(small_state(), path, chunk_size=128)
    return path


def test_read_record_and_read_into_agree(ckpt: str) -> None:
    with CheckpointReader(ckpt) as rd:
        fd = rd.open_file(DATA)
        try:
            rows = rd.rows_of_file(DATA)
            one = b"".join(read_record(rd, fd, r) for r in rows)
            dest = np.zeros(sum(r.raw_len for r in rows), np.uint8)
            offs = np.cumsum([0] + [r.raw_len for r in rows])[:-1].tolist()
            read_into(rd, fd, rows, dest, offs)
        finally:
            os.close(fd)
    assert dest.tobytes() == one


def test_a_damaged_record_names_file_tensor_and_chunk(ckpt: str) -> None:
    with CheckpointReader(ckpt) as rd:
        r = rd.rows_of_file(DATA)[1]
    flip_byte(os.path.join(ckpt, DATA), r.offset + 64)  # the first payload byte
    with CheckpointReader(ckpt) as rd:
        fd = rd.open_file(DATA)
        try:
            with pytest.raises(CorruptCheckpointError) as info:
                read_record(rd, fd, r)
            dest = np.zeros(r.raw_len, np.uint8)
            with pytest.raises(CorruptCheckpointError) as info2:
                read_into(rd, fd, [r], dest, [0])
        finally:
            os.close(fd)
    for e in (info.value, info2.value):
        assert (e.file, e.key, e.chunk, e.offset) == (DATA, r.key, r.chunk, r.offset)
    assert "hash mismatch" in str(info.value) or "LZ4" in str(info.value)
    report = verify_checkpoint(ckpt)
    assert [p.offset for p in report.problems] == [r.offset]
    assert report.chunks_checked == len(rd.rows_of_file(DATA)) - 1


def test_verify_rows_of_some_rows(ckpt: str) -> None:
    with CheckpointReader(ckpt) as rd:
        rows = rd.rows_of_file(DATA)[2:4]
        report = VerifyReport(ckpt)
        seen: list[tuple[int, int]] = []
        verify_rows(rd, [(DATA, rows)], report, lambda d, t: seen.append((d, t)))
    assert report.ok and report.chunks_checked == 2
    assert report.bytes_checked == sum(r.raw_len for r in rows)
    total = sum(r.stored_len for r in rows)
    assert seen == [(rows[0].stored_len, total), (total, total)]


def test_a_missing_file_is_one_problem(ckpt: str) -> None:
    os.remove(os.path.join(ckpt, DATA))
    report = verify_checkpoint(ckpt)
    assert [(p.message, p.file, p.chunk) for p in report.problems] == [
        ("data file is missing", DATA, None)
    ]


def test_problem() -> None:
    e = CorruptCheckpointError("bad", path="/p", file="f", key="k", chunk=3, offset=4096)
    p = problem_of(e)
    assert p == Problem("bad", "f", "k", 3, 4096)
    assert str(p).startswith("bad") and "k" in str(p)
