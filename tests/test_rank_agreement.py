"""Ranks of one save must agree: on its options, and on which values are per-rank (thread ranks)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import independent_reader as ir
import numpy as np
import pytest
import torch
from threadcoord import ThreadCoordinator, run_ranks

import ckptguard

WORLD = 4


def _state(rank: int) -> dict:
    return {"w": torch.arange(12.0).reshape(3, 4), "rank": rank}


def _save_everywhere(kwargs_of: Any, state_of: Any = _state) -> list[Any]:
    """Run one save on WORLD thread ranks; each rank's outcome (CheckpointInfo or exception)."""
    out: list[Any] = [None] * WORLD
    lock = threading.Lock()

    def rank_main(coord: ThreadCoordinator) -> None:
        kw = {"timeout": 60, **kwargs_of(coord.rank)}
        path = kw.pop("path")
        try:
            res: Any = ckptguard.save(state_of(coord.rank), path, coordinator=coord, **kw)
        except Exception as e:  # every rank's outcome is compared below
            res = e
        with lock:
            out[coord.rank] = res

    run_ranks(WORLD, rank_main)
    return out


def _unchanged(store: Path, names: list[str]) -> None:
    assert [i.name for i in ckptguard.Store(store).list()] == names
    if names:
        assert ckptguard.Store(store).latest().name == names[-1]
    staging = store / ".staging"
    assert not staging.exists() or os.listdir(staging) == []


@pytest.mark.parametrize(
    "option,base,other",
    [
        ("path", {"path": "new"}, {"path": "other"}),
        ("path", {"path": "new"}, {"path": "../store2/new"}),
        ("overwrite", {"overwrite": False}, {"overwrite": True}),
        ("compress", {"compress": "auto"}, {"compress": "none"}),
        ("chunk_size", {"chunk_size": 1 << 20}, {"chunk_size": 4096}),
        ("allow_pickle", {"allow_pickle": False}, {"allow_pickle": True}),
        ("check_replicated", {"check_replicated": True}, {"check_replicated": False}),
        ("step", {"step": 10}, {"step": 11}),
        ("metadata", {"metadata": {"run": "a"}}, {"metadata": {"run": "b"}}),
    ],
)
def test_ranks_that_pass_different_options_all_raise(
    tmp_path: Path, option: str, base: dict, other: dict
) -> None:
    store = tmp_path / "store"
    ckptguard.save(_state(0), store / "old", coordinator="local")

    def kwargs_of(rank: int) -> dict:
        kw = {"path": "new", **(other if rank == 2 else base)}
        kw["path"] = str(store / kw["path"])
        return kw

    out = _save_everywhere(kwargs_of)
    assert all(isinstance(e, ckptguard.OptionsMismatchError) for e in out), out
    assert isinstance(out[0], ckptguard.CheckpointAbortedError)
    assert len({str(e) for e in out}) == 1  # the same error on every rank
    msg = str(out[0])
    assert repr(option) in msg and "rank 2" in msg and "ranks 0, 1, 3" in msg, msg
    assert all(e.option == option for e in out)
    assert out[0].values[0] != out[0].values[2] and out[0].values[0] == out[0].values[1]
    _unchanged(store, ["old"])
    assert not (tmp_path / "store2").exists() or not os.listdir(tmp_path / "store2")


def test_equivalent_paths_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative and an absolute spelling of one checkpoint are the same path."""
    monkeypatch.chdir(tmp_path)
    out = _save_everywhere(
        lambda r: {"path": "store/ck" if r % 2 else str(tmp_path / "store" / "ck")}
    )
    assert all(isinstance(i, ckptguard.CheckpointInfo) for i in out), out
    assert {i.path for i in out} == {str(tmp_path / "store" / "ck")}


# ---------------------------------------------------------------- per-rank tensors


def _rng(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    return g.get_state()  # a uint8 tensor, different on every rank


def _per_rank_state(rank: int) -> dict:
    return {
        "rng": ckptguard.PerRank(_rng(rank)),
        "np": ckptguard.PerRank(np.full(3, rank, dtype=np.int64)),
        "w": torch.arange(6.0),  # replicated
        "rank": rank,
    }


def _load_everywhere(path: Path, world: int = WORLD, **kw: Any) -> list[Any]:
    out: list[Any] = [None] * world
    lock = threading.Lock()

    def rank_main(coord: ThreadCoordinator) -> None:
        tmpl = kw.get("template")
        try:
            res: Any = ckptguard.load(
                path,
                coordinator=coord,
                **{**kw, "template": tmpl(coord.rank) if tmpl else None},
            )
        except Exception as e:
            res = e
        with lock:
            out[coord.rank] = res

    run_ranks(world, rank_main)
    return out


@pytest.fixture
def per_rank_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "store" / "pr"
    out = _save_everywhere(lambda r: {"path": str(path)}, _per_rank_state)
    assert all(isinstance(i, ckptguard.CheckpointInfo) for i in out), out
    return path


def test_each_rank_gets_its_own_per_rank_tensor_back(per_rank_ckpt: Path) -> None:
    out = _load_everywhere(per_rank_ckpt)
    for r, got in enumerate(out):
        assert isinstance(got, dict), got
        assert torch.equal(got["rng"], _rng(r)) and got["rng"].dtype == torch.uint8
        assert np.array_equal(got["np"], np.full(3, r, dtype=np.int64))
        assert torch.equal(got["w"], torch.arange(6.0)) and got["rank"] == r
    assert ckptguard.verify(per_rank_ckpt).ok


def test_per_rank_tensors_fill_a_template_in_place(per_rank_ckpt: Path) -> None:
    def template(rank: int) -> dict:
        return {"rng": torch.zeros_like(_rng(0)), "np": ckptguard.PerRank(np.zeros(3, np.int64))}

    out = _load_everywhere(per_rank_ckpt, template=template)
    for r, got in enumerate(out):
        assert torch.equal(got["rng"], _rng(r))
        assert np.array_equal(got["np"].local, np.full(3, r))  # the PerRank passed, filled


def test_per_rank_tensors_are_stored_as_rows_of_one_tensor(per_rank_ckpt: Path) -> None:
    """format.md section 3.1, as the independent reader reads it."""
    ck = ir.read_checkpoint(str(per_rank_ckpt))
    assert "per-rank-tensors" in ck.manifest["features"]
    rng = ck.tensors["rng"]
    assert rng.per_rank and rng.shape == (WORLD, *_rng(0).shape)
    for r in range(WORLD):
        assert np.array_equal(rng.of_rank(r), _rng(r).numpy())
    assert not ck.tensors["w"].per_rank
    rows = [x for x in ck.rows if x["key"] == "rng"]
    assert sorted((x["rank"], tuple(x["shard_offsets"])[0]) for x in rows) == [
        (r, r) for r in range(WORLD)
    ]


def test_another_world_size_must_choose_a_rank(per_rank_ckpt: Path) -> None:
    with pytest.raises(ckptguard.WorldSizeError, match=r"'rng'.*4 ranks.*1 ranks load.*rank="):
        ckptguard.load(per_rank_ckpt)  # one process: world size 1
    out = _load_everywhere(per_rank_ckpt, world=2)
    assert all(isinstance(e, ckptguard.WorldSizeError) for e in out), out
    got = ckptguard.load(per_rank_ckpt, rank=2)  # whose values: rank 2's
    assert torch.equal(got["rng"], _rng(2)) and got["rank"] == 2
    with pytest.raises(ckptguard.WorldSizeError, match="no rank 4"):
        ckptguard.load(per_rank_ckpt, rank=4)


def test_differing_plain_tensors_point_to_per_rank(tmp_path: Path) -> None:
    out = _save_everywhere(
        lambda r: {"path": str(tmp_path / "s" / "x")}, lambda r: {"rng": _rng(r)}
    )
    assert all(isinstance(e, ckptguard.CheckpointAbortedError) for e in out), out
    assert "'rng'" in str(out[0]) and "ckptguard.PerRank" in str(out[0])
    assert not (tmp_path / "s" / "x").exists()


def test_unchecked_differing_replicas_warn_on_every_rank(tmp_path: Path) -> None:
    path = tmp_path / "s" / "x"
    with pytest.warns(ckptguard.ReplicaMismatchWarning) as caught:
        out = _save_everywhere(
            lambda r: {"path": str(path), "check_replicated": False},
            lambda r: {"rng": _rng(r), "same": torch.ones(3)},
        )
    assert all(isinstance(i, ckptguard.CheckpointInfo) for i in out), out
    msgs = [str(w.message) for w in caught if w.category is ckptguard.ReplicaMismatchWarning]
    assert len(msgs) == WORLD
    assert "'rng'" in msgs[0] and "'same'" not in msgs[0] and "PerRank" in msgs[0]
    assert torch.equal(ckptguard.load(path)["rng"], _rng(0))  # as the warning says


def test_per_rank_on_some_ranks_only_is_refused(tmp_path: Path) -> None:
    def state(r: int) -> dict:
        return {"rng": ckptguard.PerRank(_rng(r)) if r != 1 else _rng(r)}

    out = _save_everywhere(lambda r: {"path": str(tmp_path / "s" / "x")}, state)
    assert all(isinstance(e, ckptguard.CheckpointAbortedError) for e in out), out
    assert "per_rank" in str(out[0]) and "rank 1" in str(out[0])
    assert not (tmp_path / "s" / "x").exists()
