"""format/layout.py's names: a checkpoint is <store>/<name> with a valid name; anything else is
InvalidNameError before anything is created."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import assert_store_is, commit_one, small_state, snapshot

import ckptguard

BAD_NAMES = [".hidden", "a b", "x" * 201, "-lead", "a:b", "é", "a\\b", "a\nb"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_name(store: str, bad: str) -> None:
    commit_one(store)
    before = snapshot(os.path.dirname(store))
    with pytest.raises(ckptguard.InvalidNameError):
        ckptguard.save(small_state(), os.path.join(store, bad))
    assert snapshot(os.path.dirname(store)) == before
    assert_store_is(store, ["c1"], "c1")


@pytest.mark.parametrize("suffix", [".", "..", "c1/..", "./..", "c1/../..", "../.."])
def test_dot_path(tmp_path: Path, suffix: str) -> None:
    """A path whose last component is '.' or '..' names no checkpoint: it must not be
    normalised into a checkpoint named after the store or one of its parents."""
    store = str(tmp_path / "a" / "b" / "store")
    commit_one(store)
    before = snapshot(str(tmp_path))
    with pytest.raises(ckptguard.InvalidNameError):
        ckptguard.save(small_state(), store + "/" + suffix)
    assert snapshot(str(tmp_path)) == before
    assert_store_is(store, ["c1"], "c1")


def test_empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """save(state, "") is an invalid name, not a checkpoint named after the working directory."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = snapshot(str(tmp_path))
    with pytest.raises(ckptguard.InvalidNameError):
        ckptguard.save(small_state(), "")
    assert snapshot(str(tmp_path)) == before
