"""Parts: each saved rank's top-level entries of one checkpoint, loaded by name by any rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from threadcoord import run_ranks

import ckptguard
from ckptguard.errors import CorruptCheckpointError, UnsupportedObjectError
from ckptguard.parts import PartNotFoundError, Parts


def _state(rank: int) -> dict:
    g = torch.Generator().manual_seed(rank)
    return {
        f"file{rank}.pt": {"w": torch.randn(64, 8, generator=g), "step": rank, "opt": [1.5]},
        "shared": {"x": torch.arange(4.0)},  # on both ranks: a replica, loaded from rank 0
        "objects": {f"o/shard_{rank}_2": {"rng": torch.tensor([rank])}},
    }


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "store" / "c"
    run_ranks(2, lambda c: ckptguard.save(_state(c.rank), path, coordinator=c))
    return path


def test_each_name_loads_from_the_rank_that_saved_it(saved: Path) -> None:
    with Parts(saved) as parts:
        assert parts.owners == {"file0.pt": 0, "shared": 0, "objects": 0, "file1.pt": 1}
        got = parts.load(["file1.pt", "file0.pt"])
    assert list(got) == ["file1.pt", "file0.pt"]
    for rank in (0, 1):
        want = _state(rank)[f"file{rank}.pt"]
        assert torch.equal(got[f"file{rank}.pt"]["w"], want["w"])
        assert got[f"file{rank}.pt"]["step"] == rank and got[f"file{rank}.pt"]["opt"] == [1.5]


def test_names_within_an_entry(saved: Path) -> None:
    with Parts(saved, within="objects") as parts:
        assert parts.owners == {"o/shard_0_2": 0, "o/shard_1_2": 1}
        got = parts.load(["o/shard_1_2"])
    assert torch.equal(got["o/shard_1_2"]["rng"], torch.tensor([1]))


def test_a_missing_name_is_not_found_and_says_what_is_there(saved: Path) -> None:
    with Parts(saved) as parts, pytest.raises(PartNotFoundError, match="'nope'.*'file0.pt'"):
        parts.load(["nope"])


def test_a_tree_that_is_not_a_mapping_has_no_parts(tmp_path: Path) -> None:
    ckptguard.save([torch.ones(2)], tmp_path / "s" / "c")
    with pytest.raises(UnsupportedObjectError, match="no mapping of names"):
        Parts(tmp_path / "s" / "c")


def test_pickled_values_load_only_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "s" / "c"
    ckptguard.save({"a": {"f": complex}}, path, allow_pickle=True)  # a class: pickled
    with Parts(path) as parts, pytest.raises(UnsupportedObjectError, match="allow_pickle"):
        parts.load(["a"])
    with Parts(path, allow_pickle=True) as parts:
        assert parts.load(["a"]) == {"a": {"f": complex}}


def test_a_damaged_chunk_is_reported(saved: Path) -> None:
    data = saved / "rank-00001.ckg"
    raw = bytearray(data.read_bytes())
    raw[4096 + 200] ^= 0xFF  # inside the first record's payload
    data.write_bytes(bytes(raw))
    with Parts(saved) as parts:
        parts.load(["file0.pt"])  # rank 0's file is intact
        with pytest.raises(CorruptCheckpointError):
            parts.load(["file1.pt"])
