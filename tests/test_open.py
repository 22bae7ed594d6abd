"""ckptguard.open: opening a checkpoint (manifest and index validated), its data files opened
and checked whole, and the typed error of each way that goes wrong."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import flip_byte, resign_manifest, small_state

import ckptguard
from ckptguard.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckptguard.open import CheckpointReader

DATA = "rank-00000.ckg"


@pytest.fixture
def ckpt(store: str) -> str:
    path = os.path.join(store, "c1")
    ckptguard.save(small_state(), path, chunk_size=128)
    return path


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_open_reads_manifest_index_and_rows(ckpt: str) -> None:
    with CheckpointReader(ckpt) as rd:
        assert set(rd.files) == {DATA} and rd.files[DATA] == os.path.getsize(Path(ckpt, DATA))
        rows = rd.rows_of_file(DATA)
        assert [r.offset for r in rows] == sorted(r.offset for r in rd.rows)
        assert [rd.seq(r) for r in rows] == list(range(len(rows)))
        ids = sorted({r.tensor for r in rows})[:1]
        assert {r.tensor for r in rd.rows_of_tensors(ids)} == set(ids)
        fd = rd.open_file(DATA)
        os.close(fd)
    assert rd.dir_fd == -1


def test_no_checkpoint_and_no_manifest(tmp_path: Path, ckpt: str) -> None:
    with pytest.raises(CheckpointNotFoundError):
        CheckpointReader(str(tmp_path / "none"))
    os.remove(os.path.join(ckpt, "MANIFEST.json"))
    before = _open_fds()
    with pytest.raises(CorruptCheckpointError, match="MANIFEST.json is missing") as info:
        CheckpointReader(ckpt)
    assert info.value.file == "MANIFEST.json"
    assert _open_fds() == before  # the directory opened is closed again


def test_index_that_does_not_match_its_hash(ckpt: str) -> None:
    flip_byte(os.path.join(ckpt, "index.parquet"), 100)
    with pytest.raises(CorruptCheckpointError, match="does not match the hash") as info:
        CheckpointReader(ckpt)
    assert info.value.file == "index.parquet"


def test_totals_that_disagree_with_the_index(ckpt: str) -> None:
    resign_manifest(ckpt, lambda b: b["totals"].__setitem__("chunks", b["totals"]["chunks"] + 1))
    with pytest.raises(CorruptCheckpointError, match="totals disagree"):
        CheckpointReader(ckpt)


def test_data_file_checks(ckpt: str) -> None:
    with CheckpointReader(ckpt) as rd:
        os.truncate(os.path.join(ckpt, DATA), rd.files[DATA] - 1)
        with pytest.raises(CorruptCheckpointError, match="data file") as info:
            rd.check_sizes([DATA])
        assert info.value.file == DATA
        with pytest.raises(CorruptCheckpointError) as info:
            rd.open_file(DATA)
        assert info.value.file == DATA


def test_data_file_header_of_another_rank(ckpt: str) -> None:
    flip_byte(os.path.join(ckpt, DATA), 12)  # the rank in the header (its hash follows)
    with CheckpointReader(ckpt) as rd, pytest.raises(CorruptCheckpointError) as info:
        rd.open_file(DATA)
    assert info.value.file == DATA


def test_a_symlinked_data_file_is_not_followed(ckpt: str, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    os.rename(os.path.join(ckpt, DATA), target)
    os.symlink(target, os.path.join(ckpt, DATA))
    with CheckpointReader(ckpt) as rd, pytest.raises(CorruptCheckpointError) as info:
        rd.open_file(DATA)
    assert info.value.file == DATA
