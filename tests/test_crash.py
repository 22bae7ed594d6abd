"""Crash safety: a save SIGKILLed at each stage of the commit leaves the store as it was (I1-I4)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import run_command

import ckptguard
from ckptguard.format.layout import LATEST, STAGING

BEFORE_VISIBLE = [
    "save.start",
    "save.staging_created",
    "save.data_written",
    "commit.index_written",
    "commit.manifest_written",
    "commit.before_rename",
]
AFTER_VISIBLE = ["commit.after_rename", "commit.latest_tmp_written"]

CHILD = textwrap.dedent(
    """
    import sys, torch, ckptguard
    state = {"w": torch.full((3000,), float(sys.argv[2])), "step": int(sys.argv[2])}
    ckptguard.save(state, sys.argv[1], overwrite=True, chunk_size=4096)
    """
)


def run_child(path, value: int, failpoint: str, **extra: str) -> subprocess.CompletedProcess:
    env = {"CKPTGUARD_FAILPOINT": failpoint, **extra}
    return run_command([sys.executable, "-c", CHILD, path, value], 120, env=env)


def leftovers(store) -> list[str]:
    staging = store / STAGING
    items = sorted(os.listdir(staging)) if staging.exists() else []
    return items + sorted(n for n in os.listdir(store) if n.startswith(".LATEST."))


@pytest.fixture
def store(tmp_path):
    ckptguard.save({"w": torch.full((3000,), 1.0), "step": 1}, tmp_path / "old", chunk_size=4096)
    return tmp_path


def check_old_intact(store) -> None:
    assert (store / LATEST).read_text() == "old\n"
    assert ckptguard.load(store)["step"] == 1
    assert ckptguard.verify(store / "old").ok


@pytest.mark.parametrize("point", BEFORE_VISIBLE)
def test_kill_before_visible_leaves_store_unchanged(store, point):
    proc = run_child(store / "new", 2, point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [i.name for i in ckptguard.Store(store).list()] == ["old"]
    assert not (store / "new").exists()
    check_old_intact(store)
    before = leftovers(store)
    assert bool(before) == (point != "save.start")  # the staging dir is there to reclaim
    removed = ckptguard.Store(store).gc(older_than=0)
    assert sorted(os.path.basename(p) for p in removed) == before
    assert leftovers(store) == []
    check_old_intact(store)


@pytest.mark.parametrize("point", AFTER_VISIBLE)
def test_kill_after_rename_leaves_a_whole_checkpoint(store, point):
    proc = run_child(store / "new", 2, point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [i.name for i in ckptguard.Store(store).list()] == ["old", "new"]
    check_old_intact(store)  # LATEST not yet moved: still the old, whole checkpoint
    assert ckptguard.verify(store / "new").ok
    assert ckptguard.load(store / "new")["step"] == 2
    ckptguard.Store(store).gc(older_than=0)
    assert leftovers(store) == []


def test_kill_after_latest_moved(store):
    proc = run_child(store / "new", 2, "commit.after_latest")
    assert proc.returncode == -signal.SIGKILL
    assert ckptguard.load(store)["step"] == 2
    assert ckptguard.Store(store).gc(older_than=0) == []


@pytest.mark.parametrize("point", [*BEFORE_VISIBLE, "overwrite.before_remove_old"])
def test_kill_during_overwrite(store, point):
    proc = run_child(store / "old", 2, point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    expected = 2 if point == "overwrite.before_remove_old" else 1
    assert [i.name for i in ckptguard.Store(store).list()] == ["old"]
    assert ckptguard.load(store)["step"] == expected
    assert ckptguard.verify(store / "old").ok
    ckptguard.Store(store).gc(older_than=0)
    assert leftovers(store) == []


FALLBACK_STEPS = [
    ("commit.before_rename", 1),
    ("overwrite.intent_written", 1),
    ("overwrite.fallback_old_moved", None),  # gc completes it: the new one, whole
    ("commit.after_rename", 2),
    ("commit.after_latest", 2),
    ("overwrite.before_remove_old", 2),
    ("remove.manifest_removed", 2),  # the old one partly removed
]


@pytest.mark.parametrize("point,step", FALLBACK_STEPS)
def test_kill_during_fallback_overwrite_then_delete(store, point, step):
    """Killed at each step of the overwrite without renameat2, then the checkpoint deleted and
    gc run: it stays deleted, and nothing is left (I11)."""
    proc = run_child(store / "old", 2, point, CKPTGUARD_RENAME_EXCHANGE="0")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    st = ckptguard.Store(store)
    if step is None:  # stopped between the renames: gc puts the new one in place
        assert st.list() == []
        st.gc(older_than=0)
        step = 2
    assert [i.name for i in st.list()] == ["old"]
    assert ckptguard.load(store / "old")["step"] == step
    st.delete("old")
    st.gc(older_than=0)
    assert st.list() == [] and st.latest_name() is None
    assert leftovers(store) == []


@pytest.mark.parametrize(
    "action,error", [("eio", ckptguard.StoreError), ("enospc", ckptguard.StoreFullError)]
)
@pytest.mark.parametrize(
    "point", ["save.data_written", "commit.manifest_written", "commit.before_rename"]
)
def test_io_error_raises_typed_and_cleans_up(store, monkeypatch, point, action, error):
    monkeypatch.setenv("CKPTGUARD_FAILPOINT", f"{point}:*:{action}")
    with pytest.raises(error):
        ckptguard.save({"w": torch.zeros(10)}, store / "new")
    monkeypatch.delenv("CKPTGUARD_FAILPOINT")
    assert [i.name for i in ckptguard.Store(store).list()] == ["old"]
    assert leftovers(store) == []  # the failed save removed its own staging directory
    check_old_intact(store)


def test_failpoint_for_another_rank_does_nothing(store, monkeypatch):
    monkeypatch.setenv("CKPTGUARD_FAILPOINT", "save.data_written:3:kill")
    ckptguard.save({"w": torch.zeros(10)}, store / "new")
    assert ckptguard.load(store)["w"].shape == (10,)


def test_gc_spares_young_staging_dirs(store):
    run_child(store / "new", 2, "save.data_written")
    assert ckptguard.Store(store).gc(older_than=3600) == []
    assert len(leftovers(store)) == 1
