"""Ranks of one save must agree: on its options, and on which values are per-rank (thread ranks)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

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
