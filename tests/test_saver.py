"""ckptguard.saver: SaveOptions checked before anything is created, and a save that fails on
its storage (a read-only store, a full one, an injected ENOSPC or EIO at each point before the
rename) raises the typed StoreError and leaves the store as it was."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import assert_store_is, commit_one, small_state, snapshot, succeeds

import ckptguard


def _make_read_only(store: str) -> Callable[[], None]:
    """Make ``store`` read-only: a read-only remount when it is a tmpfs mount point (root
    ignores permissions), else chmod. Returns the undo."""
    mnt = os.path.dirname(store)
    if os.geteuid() == 0:
        assert succeeds(["mount", "-o", "remount,ro", mnt]), "remount read-only failed"
        return lambda: None
    os.chmod(store, 0o555)
    return lambda: os.chmod(store, 0o755)


@pytest.mark.parametrize("overwrite", [False, True])
def test_read_only_store(tmpfs: Callable[[str], str], tmp_path: Path, overwrite: bool) -> None:
    base = tmpfs("size=16m") if os.geteuid() == 0 else str(tmp_path)
    store = os.path.join(base, "store")
    commit_one(store)
    undo = _make_read_only(store)
    try:
        name = "c1" if overwrite else "c2"
        before = snapshot(store, staging=True)
        with pytest.raises(ckptguard.StoreNotWritableError):
            ckptguard.save(small_state(1), os.path.join(store, name), overwrite=overwrite)
        assert snapshot(store, staging=True) == before
        assert_store_is(store, ["c1"], "c1")
        assert torch.equal(ckptguard.load(store)["model"]["w"], small_state()["model"]["w"])
    finally:
        undo()


@pytest.mark.parametrize("overwrite", [False, True])
def test_full_store(tmpfs: Callable[[str], str], overwrite: bool) -> None:
    """A real ENOSPC (2 MiB tmpfs, 4 MiB state): StoreFullError, previous checkpoint intact."""
    store = os.path.join(tmpfs("size=2m"), "store")
    commit_one(store)
    big = {"x": torch.randn(1 << 20)}  # 4 MiB, incompressible
    name = "c1" if overwrite else "c2"
    before = snapshot(store)
    with pytest.raises(ckptguard.StoreFullError):
        ckptguard.save(big, os.path.join(store, name), overwrite=overwrite)
    assert snapshot(store) == before
    assert_store_is(store, ["c1"], "c1")
    assert torch.equal(ckptguard.load(store)["model"]["w"], small_state()["model"]["w"])
    # once staging garbage is reclaimed, a small save fits again
    ckptguard.Store(store).gc(older_than=0)
    commit_one(store, "c3")
    assert_store_is(store, ["c1", "c3"], "c3")


SAVE_POINTS = [
    "save.start",
    "save.staging_created",
    "save.data_written",
    "commit.index_written",
    "commit.manifest_written",
    "commit.before_rename",
]


@pytest.mark.parametrize("point", SAVE_POINTS)
@pytest.mark.parametrize("overwrite", [False, True])
def test_failpoint_enospc(
    store: str, monkeypatch: pytest.MonkeyPatch, point: str, overwrite: bool
) -> None:
    """An injected ENOSPC anywhere before the rename: StoreFullError, nothing visible."""
    commit_one(store)
    before = snapshot(store)
    monkeypatch.setenv("CKPTGUARD_FAILPOINT", f"{point}::enospc")
    name = "c1" if overwrite else "c2"
    with pytest.raises(ckptguard.StoreFullError):
        ckptguard.save(small_state(1), os.path.join(store, name), overwrite=overwrite)
    monkeypatch.delenv("CKPTGUARD_FAILPOINT")
    assert snapshot(store) == before
    assert_store_is(store, ["c1"], "c1")


def test_failpoint_eio(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An injected EIO is a StoreError (not "full", not "read-only"), nothing visible."""
    commit_one(store)
    before = snapshot(store)
    monkeypatch.setenv("CKPTGUARD_FAILPOINT", "save.data_written::eio")
    with pytest.raises(ckptguard.StoreError) as ei:
        ckptguard.save(small_state(1), os.path.join(store, "c2"))
    assert not isinstance(ei.value, (ckptguard.StoreFullError, ckptguard.StoreNotWritableError))
    monkeypatch.delenv("CKPTGUARD_FAILPOINT")
    assert snapshot(store) == before
    assert_store_is(store, ["c1"], "c1")


@pytest.mark.parametrize(
    "kw, err",
    [
        ({"compress": "brotli"}, ValueError),
        ({"compress": "zstd:99"}, ValueError),
        ({"compress": "lz4:3"}, ValueError),
        ({"compress": "zstd:"}, ValueError),
        ({"step": "10"}, TypeError),
        ({"chunk_size": 100}, ValueError),
        ({"timeout": 0}, ValueError),
        ({"timeout": float("nan")}, ValueError),
        ({"timeout": "60"}, ValueError),
        ({"metadata": {"x": object()}}, ckptguard.UnsupportedObjectError),
    ],
)
def test_bad_save_options(tmp_path: Path, kw: dict, err: type) -> None:
    """An option that cannot be right is refused before anything is created."""
    with pytest.raises(err):
        ckptguard.save({"x": torch.ones(2)}, str(tmp_path / "store" / "a"), **kw)
    assert not (tmp_path / "store").exists()
