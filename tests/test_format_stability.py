"""The bytes a save writes do not drift: a fixed state, saved with fixed uuids, gives a data file
and index rows whose digests are recorded here. A change that alters them changes the on-disk
format (docs/format.md) and must say so there, bump what it must, and update these digests on
purpose. The LZ4 payloads are left out: another LZ4 library may compress differently and still
be valid (docs/format.md section 7)."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest
import torch

import ckptguard
from ckptguard.format import index

RAW_DATAFILE_SHA256 = "6b1d1e8c104a56b2a06aba7738401bf9dc349340d7cd4bd85dcf78789a4d372f"
RAW_DATAFILE_SIZE = 1473977
INDEX_ROWS_SHA256 = "401dddcec9b401ccd365a148132a3bf4310954e29de452bbc4b536e0d0866b7d"


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(300, 257, generator=g),
        "b": torch.arange(1000, dtype=torch.int64),
        "h": torch.randn(5000, generator=g).half(),
        "z": torch.zeros(1 << 18),
        "meta": {"step": 3, "names": ["a", "b"], "t": (1, 2.5, None)},
    }


@pytest.fixture
def fixed_uuids(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = iter(range(1, 1 << 20))
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=next(counter)))


def test_raw_data_file_bytes_are_stable(tmp_path: Path, fixed_uuids: None) -> None:
    path = tmp_path / "s" / "a"
    ckptguard.save(_state(), path, compress="none", step=3, chunk_size=1 << 16)
    data = (path / "rank-00000.ckg").read_bytes()
    assert len(data) == RAW_DATAFILE_SIZE
    assert hashlib.sha256(data).hexdigest() == RAW_DATAFILE_SHA256


@pytest.mark.parametrize("compress", ["none", "lz4"])
def test_index_rows_are_stable(tmp_path: Path, fixed_uuids: None, compress: str) -> None:
    """The index's rows (not the parquet bytes, which carry the pyarrow version) are the same for
    both codecs but for the stored lengths, codecs and offsets, and the same on every run."""
    path = tmp_path / "s" / "a"
    ckptguard.save(_state(), path, compress=compress, step=3, chunk_size=1 << 16)
    rows = index.read((path / "index.parquet").read_bytes())
    keep = ("key", "tensor", "dtype", "global_shape", "chunk", "raw_len", "hash", "elem_size")
    text = json.dumps([{k: r.to_json()[k] for k in keep} for r in rows], sort_keys=True)
    assert len(rows) == 23
    assert hashlib.sha256(text.encode()).hexdigest() == INDEX_ROWS_SHA256


def test_one_file_checkpoint_holds_the_same_data_file(tmp_path: Path, fixed_uuids: None) -> None:
    """A one-file checkpoint's first member is the data file a directory save writes, byte for
    byte (docs/format.md section 10): the container adds no second format of the data."""
    path = tmp_path / "a.pt"
    ckptguard.save(_state(), path, compress="none", step=3, chunk_size=1 << 16)
    data = path.read_bytes()[:RAW_DATAFILE_SIZE]
    assert hashlib.sha256(data).hexdigest() == RAW_DATAFILE_SHA256
    assert path.read_bytes()[-8:] == b"CKGFILE1"
