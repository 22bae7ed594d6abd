"""Store semantics: listing only committed checkpoints, LATEST, overwrite, delete, gc."""

from __future__ import annotations

import os
import time

import pytest
import torch

import ckptguard
from ckptguard.format.layout import LATEST, STAGING


def save(store, name, value, **kw):
    return ckptguard.save({"v": torch.tensor(value)}, store / name, step=value, **kw)


def test_list_and_latest(tmp_path):
    assert ckptguard.Store(tmp_path).list() == []
    assert ckptguard.Store(tmp_path).latest() is None
    save(tmp_path, "a", 1)
    save(tmp_path, "b", 2)
    (tmp_path / "half").mkdir()  # a directory without a manifest is never listed (I1)
    (tmp_path / "half" / "rank-00000.ckg").write_bytes(b"x")
    (tmp_path / ".hidden").mkdir()
    store = ckptguard.Store(tmp_path)
    assert [i.name for i in store.list()] == ["a", "b"]
    assert store.latest().name == "b" and store.latest().step == 2
    assert store.list()[1].raw_bytes == 8 and store.list()[1].files == 1


def test_existing_name_is_an_error_unless_overwrite(tmp_path):
    save(tmp_path, "a", 1)
    with pytest.raises(ckptguard.CheckpointExistsError):
        save(tmp_path, "a", 2)
    assert ckptguard.load(tmp_path / "a")["v"].item() == 1
    save(tmp_path, "a", 3, overwrite=True)
    assert ckptguard.load(tmp_path / "a")["v"].item() == 3
    assert [i.name for i in ckptguard.Store(tmp_path).list()] == ["a"]
    assert os.listdir(tmp_path / STAGING) == []  # the old one was removed after the commit


def test_delete_moves_latest_first(tmp_path):
    save(tmp_path, "a", 1)
    time.sleep(0.01)
    save(tmp_path, "b", 2)
    store = ckptguard.Store(tmp_path)
    store.delete("b")
    assert store.latest().name == "a"
    assert ckptguard.load(tmp_path)["v"].item() == 1
    store.delete("a")
    assert store.latest() is None and not (tmp_path / LATEST).exists()
    with pytest.raises(ckptguard.CheckpointNotFoundError):
        store.delete("a")
    with pytest.raises(ckptguard.InvalidNameError):
        store.delete("../etc")


def test_delete_of_non_latest_keeps_latest(tmp_path):
    save(tmp_path, "a", 1)
    save(tmp_path, "b", 2)
    ckptguard.Store(tmp_path).delete("a")
    assert ckptguard.Store(tmp_path).latest().name == "b"


def test_gc_never_touches_committed(tmp_path):
    save(tmp_path, "a", 1)
    (tmp_path / STAGING / "x.0123").mkdir(parents=True)
    (tmp_path / ".LATEST.abc.tmp").write_text("a\n")
    removed = ckptguard.Store(tmp_path).gc(older_than=0)
    assert sorted(os.path.basename(p) for p in removed) == [".LATEST.abc.tmp", "x.0123"]
    assert ckptguard.verify(tmp_path / "a").ok


def test_latest_naming_a_missing_checkpoint_is_reported(tmp_path):
    save(tmp_path, "a", 1)
    (tmp_path / LATEST).write_text("gone\n")
    with pytest.raises(ckptguard.CorruptCheckpointError):
        ckptguard.Store(tmp_path).latest()
    (tmp_path / LATEST).write_text("../a\n")
    with pytest.raises(ckptguard.CorruptCheckpointError):
        ckptguard.load(tmp_path)


def test_load_of_empty_or_missing_store(tmp_path):
    with pytest.raises(ckptguard.CheckpointNotFoundError):
        ckptguard.load(tmp_path)
    with pytest.raises(ckptguard.CheckpointNotFoundError):
        ckptguard.load(tmp_path / "nope")
    with pytest.raises(ckptguard.CheckpointNotFoundError):
        ckptguard.Store(tmp_path / "nope").list()


def test_latest_naming_a_missing_checkpoint_is_corrupt_on_load(tmp_path):
    save(tmp_path, "a", 1)
    (tmp_path / LATEST).write_text("gone\n")
    with pytest.raises(ckptguard.CorruptCheckpointError):
        ckptguard.load(tmp_path)


def test_latest_as_a_link_is_refused(tmp_path):
    save(tmp_path, "a", 1)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.write_text("a\n")
    (tmp_path / LATEST).unlink()
    (tmp_path / LATEST).symlink_to(outside)
    with pytest.raises(ckptguard.CorruptCheckpointError):
        ckptguard.Store(tmp_path).latest_name()


def test_overwrite_without_rename_exchange(tmp_path, monkeypatch):
    """The fallback for file systems without renameat2 replaces the checkpoint and leaves
    nothing behind."""
    monkeypatch.setenv("CKPTGUARD_RENAME_EXCHANGE", "0")
    save(tmp_path, "a", 1)
    save(tmp_path, "a", 2, overwrite=True)
    assert ckptguard.load(tmp_path)["v"].item() == 2
    assert os.listdir(tmp_path / STAGING) == []


def _interrupted_overwrite(tmp_path, new_whole: bool):
    """The store as a crash between the fallback's two renames leaves it: ``a`` absent, LATEST
    naming it, the old one at .staging/a.<uuid>.old, the new one at .staging/a.<uuid>."""
    save(tmp_path, "a", 1)
    save(tmp_path, "x", 2)
    (tmp_path / LATEST).write_text("a\n")
    uid = "0123456789abcdef0123456789abcdef"
    os.rename(tmp_path / "x", tmp_path / STAGING / f"a.{uid}")
    if not new_whole:
        os.unlink(tmp_path / STAGING / f"a.{uid}" / "MANIFEST.json")
    os.rename(tmp_path / "a", tmp_path / STAGING / f"a.{uid}.old")


@pytest.mark.parametrize("new_whole", [True, False])
def test_gc_finishes_an_interrupted_overwrite(tmp_path, new_whole):
    """Rolled forward when the new checkpoint is whole, else back; never lost (I2, I3)."""
    _interrupted_overwrite(tmp_path, new_whole)
    store = ckptguard.Store(tmp_path)
    with pytest.raises(ckptguard.CorruptCheckpointError, match="ckptguard gc"):
        store.latest()
    assert store.gc(older_than=3600) == []  # just renamed: left to a save still at it
    assert store.list() == []
    store.gc(older_than=0)
    assert [i.name for i in store.list()] == ["a"]
    assert ckptguard.load(tmp_path)["v"].item() == (2 if new_whole else 1)
    assert ckptguard.verify(tmp_path).ok
    assert os.listdir(tmp_path / STAGING) == []
