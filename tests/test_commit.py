"""commit.publish: the one commit tail of a save and a drain (rename, fsync, LATEST, replaced)."""

from __future__ import annotations

import errno
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import commit_one, small_state, snapshot

import ckptguard
from ckptguard import commit, readonly
from ckptguard import drain as drain_pkg
from ckptguard.commit import SAVE, new_staging, publish
from ckptguard.errors import (
    CheckpointExistsError,
    CoordinationTimeoutError,
    CorruptCheckpointError,
)
from ckptguard.format import manifest
from ckptguard.format.layout import LATEST, MANIFEST, STAGING
from ckptguard.format.manifest import CheckpointInfo


def staged(tmp_path: Path, store: Path, name: str, value: int, keep_manifest: bool) -> tuple:
    """A whole checkpoint in ``store``'s staging area, as a save or a drain leaves it before its
    commit tail: (staging path, manifest body, manifest bytes). Without ``keep_manifest`` the
    MANIFEST.json is removed (a save writes it in ``publish``)."""
    scratch = tmp_path / f"scratch-{name}-{value}"
    ckptguard.save({"v": torch.tensor(value)}, scratch / name, step=value)
    _, staging = new_staging(str(store), name)
    os.rmdir(staging)
    os.rename(scratch / name, staging)
    raw = Path(staging, MANIFEST).read_bytes()
    if not keep_manifest:
        os.unlink(Path(staging, MANIFEST))
    return staging, manifest.decode(raw), raw


def latest(store: Path) -> str | None:
    p = store / LATEST
    return p.read_text().removesuffix("\n") if p.exists() else None


def leftovers(store: Path) -> list[str]:
    d = store / STAGING
    return sorted(os.listdir(d)) if d.is_dir() else []


def value(path: Path) -> int:
    return int(ckptguard.load(str(path))["v"].item())


def recorded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every failpoint the commit tail reaches (commit's, drain's, a tree's removal)."""
    seen: list[str] = []
    monkeypatch.setattr(commit, "failpoint", seen.append)
    monkeypatch.setattr(readonly, "failpoint", seen.append)
    monkeypatch.setattr(drain_pkg, "failpoint", seen.append)
    return seen


# ---- the save flavour --------------------------------------------------------------------------


def test_save_flavour_writes_the_manifest_and_moves_latest(tmp_path, monkeypatch) -> None:
    store = tmp_path / "store"
    staging, body, _ = staged(tmp_path, store, "a", 1, keep_manifest=False)
    body["created"] = "2026-01-02T03:04:05.000006Z"  # the body is whole (manifest.build's)
    seen = recorded(monkeypatch)
    info = publish(str(store), "a", staging, body, overwrite=False)
    assert info.path == str(store / "a") and info.name == "a" and info.warnings == ()
    assert info.created == manifest.parse_time(body["created"])
    assert manifest.decode((store / "a" / MANIFEST).read_bytes()) == body
    assert info == ckptguard.Store(store).latest() and latest(store) == "a"
    assert ckptguard.verify(store / "a").ok and value(store / "a") == 1
    assert leftovers(store) == []
    assert seen == [
        "commit.manifest_written",
        "commit.before_rename",
        "commit.after_rename",
        "commit.latest_tmp_written",
        "commit.after_latest",
    ]


def test_existing_name_without_overwrite_changes_nothing(tmp_path) -> None:
    store = tmp_path / "store"
    staging, body, _ = staged(tmp_path, store, "a", 1, keep_manifest=False)
    publish(str(store), "a", staging, body, overwrite=False)
    staging2, body2, _ = staged(tmp_path, store, "a", 2, keep_manifest=False)
    with pytest.raises(CheckpointExistsError):
        publish(str(store), "a", staging2, body2, overwrite=False)
    assert value(store / "a") == 1 and latest(store) == "a"
    assert leftovers(store) == [os.path.basename(staging2)]  # the caller discards it


@pytest.mark.parametrize("exchange", ["1", "0"])
def test_overwrite_replaces_and_removes_the_old(tmp_path, monkeypatch, exchange) -> None:
    """The atomic exchange, and the fallback of two renames behind an intent record."""
    monkeypatch.setenv("CKPTGUARD_RENAME_EXCHANGE", exchange)
    store = tmp_path / "store"
    staging, body, _ = staged(tmp_path, store, "a", 1, keep_manifest=False)
    publish(str(store), "a", staging, body, overwrite=False)
    staging2, body2, _ = staged(tmp_path, store, "a", 2, keep_manifest=False)
    seen = recorded(monkeypatch)
    info = publish(str(store), "a", staging2, body2, overwrite=True)
    assert info.warnings == () and info.uuid == body2["uuid"]
    assert value(store / "a") == 2 and latest(store) == "a"
    assert leftovers(store) == []  # the old one, and the fallback's intent record, are gone
    fallback = ["overwrite.intent_written", "overwrite.fallback_old_moved"]
    assert [p for p in seen if p in fallback] == (fallback if exchange == "0" else [])
    assert seen[-2:] == ["overwrite.before_remove_old", "remove.manifest_removed"]


def test_a_replaced_checkpoint_is_kept_while_the_rename_is_not_durable(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("CKPTGUARD_RENAME_EXCHANGE", "0")
    store = tmp_path / "store"
    staging, body, _ = staged(tmp_path, store, "a", 1, keep_manifest=False)
    publish(str(store), "a", staging, body, overwrite=False)
    staging2, body2, _ = staged(tmp_path, store, "a", 2, keep_manifest=False)
    real = commit.fsync_dir

    def fsync_dir(path: str) -> None:
        if path == str(store):
            raise OSError(errno.EIO, "injected EIO")
        real(path)

    monkeypatch.setattr(commit, "fsync_dir", fsync_dir)
    info = publish(str(store), "a", staging2, body2, overwrite=True)
    assert value(store / "a") == 2 and latest(store) == "a"  # committed; LATEST already named it
    assert len(info.warnings) == 2
    assert "fsync of" in info.warnings[0] and "LATEST was not moved" in info.warnings[0]
    assert "replaced checkpoint's files remain" in info.warnings[1]
    name = os.path.basename(staging2)
    assert leftovers(store) == [name + commit.OLD_SUFFIX, name + commit.INTENT_SUFFIX]
    monkeypatch.setattr(commit, "fsync_dir", real)
    ckptguard.Store(store).gc(older_than=0)  # the new one is in place: gc drops the old one
    assert value(store / "a") == 2 and leftovers(store) == []


def test_past_the_deadline_nothing_is_committed(tmp_path) -> None:
    store = tmp_path / "store"
    staging, body, _ = staged(tmp_path, store, "a", 1, keep_manifest=False)
    with pytest.raises(CoordinationTimeoutError, match="deadline"):
        publish(str(store), "a", staging, body, overwrite=False, deadline=time.time() - 1)
    assert not (store / "a").exists() and latest(store) is None
    assert leftovers(store) == [os.path.basename(staging)]
    info = publish(str(store), "a", staging, body, overwrite=False, deadline=time.time() + 60)
    assert info.warnings == () and latest(store) == "a"


def _raise_eio() -> None:
    raise OSError(errno.EIO, "injected EIO")


def test_failures_after_the_rename_are_warnings(tmp_path) -> None:
    store = tmp_path / "store"
    staging, body, _ = staged(tmp_path, store, "a", 1, keep_manifest=False)
    info = publish(
        str(store),
        "a",
        staging,
        body,
        overwrite=False,
        flavour=replace(SAVE, after_rename=_raise_eio),
    )
    assert ckptguard.verify(store / "a").ok and latest(store) is None
    assert len(info.warnings) == 1 and "LATEST was not moved" in info.warnings[0]

    def damaged(store: str, info: CheckpointInfo) -> None:
        raise CorruptCheckpointError("LATEST is damaged", path=store, file=LATEST)

    staging, body, _ = staged(tmp_path, store, "b", 2, keep_manifest=False)
    info = publish(
        str(store), "b", staging, body, overwrite=False, flavour=replace(SAVE, move_latest=damaged)
    )
    assert ckptguard.verify(store / "b").ok
    assert len(info.warnings) == 1 and "LATEST was not moved to it" in info.warnings[0]


# ---- the drain flavour -------------------------------------------------------------------------


def test_drain_flavour_keeps_the_manifest_bytes_and_latest_only_moves_forward(
    tmp_path, monkeypatch
) -> None:
    store = tmp_path / "store"
    older = staged(tmp_path, store, "old", 1, keep_manifest=True)
    newer = staged(tmp_path, store, "new", 2, keep_manifest=True)
    seen = recorded(monkeypatch)
    staging, body, raw = newer
    info = publish(str(store), "new", staging, body, overwrite=False, flavour=drain_pkg.DRAIN)
    assert (store / "new" / MANIFEST).read_bytes() == raw  # byte for byte: uuid, created
    assert info == CheckpointInfo.from_manifest(body, str(store / "new"))
    assert latest(store) == "new"
    assert seen == ["drain.after_rename", "commit.latest_tmp_written"]

    seen.clear()
    staging, body, raw = older
    info = publish(str(store), "old", staging, body, overwrite=False, flavour=drain_pkg.DRAIN)
    assert info.warnings == () and (store / "old" / MANIFEST).read_bytes() == raw
    assert latest(store) == "new"  # an older checkpoint never moves LATEST back
    assert seen == ["drain.after_rename"]
    assert leftovers(store) == []


def test_existing_name_through_save_changes_nothing(store: str) -> None:
    """save under a committed name without overwrite: CheckpointExistsError, not a byte moved."""
    commit_one(store)
    before = snapshot(store)
    with pytest.raises(ckptguard.CheckpointExistsError):
        ckptguard.save(small_state(1), os.path.join(store, "c1"))
    assert snapshot(store) == before
