"""ckptguard.loader.load_checkpoint: the steps of a load put together (open, select, place, read,
copy, finish)."""

from __future__ import annotations

import os

import pytest
import torch

import ckptguard
from ckptguard import select
from ckptguard.errors import CorruptCheckpointError, WorldSizeError
from ckptguard.loader import load_checkpoint
from ckptguard.open import CheckpointReader


def test_whole_load(store: str) -> None:
    path = os.path.join(store, "c")
    w = torch.nn.Parameter(torch.randn(6, 5))
    ckptguard.save({"w": w, "n": 3, "s": torch.tensor(2.5)}, path, chunk_size=64)
    out = load_checkpoint(path)
    assert isinstance(out["w"], torch.nn.Parameter) and torch.equal(out["w"], w)
    assert out["n"] == 3 and out["s"].item() == 2.5


def test_template_reads_only_the_chunks_of_its_box(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = os.path.join(store, "c")
    full = torch.arange(8 * 16, dtype=torch.float32).reshape(8, 16)
    ckptguard.save({"w": full}, path, chunk_size=64)  # a chunk per row
    read: list[int] = []
    real = select.plan_reads

    def spy(*a: object) -> dict:
        out = real(*a)  # type: ignore[arg-type]
        read.extend(r.offset for ps in out.values() for p in ps for r in p.rows)
        return out

    monkeypatch.setattr(select, "plan_reads", spy)
    want = ckptguard.Shard(torch.zeros(3, 2), (8, 16), (2, 1))
    out = load_checkpoint(path, template={"w": want})
    assert out["w"] is want and torch.equal(want.local, full[2:5, 1:3])
    with CheckpointReader(path) as rd:
        assert sorted(read) == sorted(r.offset for r in rd.rows if r.chunk in (2, 3, 4))


def test_per_rank_tensors_load_as_a_saved_rank(store: str) -> None:
    path = os.path.join(store, "c")
    ckptguard.save({"r": ckptguard.PerRank(torch.ones(2))}, path)
    assert torch.equal(load_checkpoint(path, rank=0, world=1)["r"], torch.ones(2))
    with pytest.raises(WorldSizeError, match="2 ranks load it"):
        load_checkpoint(path, rank=0, world=2)
    with pytest.raises(WorldSizeError, match="no rank 3"):
        load_checkpoint(path, rank=3)


def test_a_tree_naming_a_tensor_that_does_not_exist(store: str) -> None:
    from conftest import resign_manifest

    path = os.path.join(store, "c")
    ckptguard.save({"w": torch.ones(2)}, path)
    resign_manifest(path, lambda b: b["tree"]["w"].__setitem__("$tensor", 7))
    with pytest.raises(CorruptCheckpointError, match="tensor 7, which does not exist"):
        load_checkpoint(path)
