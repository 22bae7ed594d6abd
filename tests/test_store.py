"""Store semantics: listing only committed checkpoints, LATEST, overwrite, delete, gc."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import commit_one, opened_outside, record_opens, small_state, snapshot

import ckptguard
from ckptguard.commit import INTENT_SUFFIX
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


def test_gc_removes_only_the_protection_records_of_checkpoints_that_are_gone(tmp_path):
    """A node-local store (format.md section 12): a record whose checkpoint was deleted, or
    replaced by another of the name, and a half-built one, go; the live checkpoint's stays."""
    save(tmp_path, "a", 1)
    save(tmp_path, "b", 2)
    uid = {i.name: i.uuid for i in ckptguard.Store(tmp_path).list()}
    red = tmp_path / ".redundancy"
    for n in (f"a.{uid['a']}", f"b.{uid['b']}", f"a.{'0' * 32}", f".tmp-a.{uid['a']}.77"):
        (red / n).mkdir(parents=True)
        (red / n / "SET.json").write_text("{}\n")
    ckptguard.Store(tmp_path).delete("b")
    removed = ckptguard.Store(tmp_path).gc(older_than=0)
    gone = sorted(os.path.basename(p) for p in removed)
    assert gone == sorted([f"b.{uid['b']}", f"a.{'0' * 32}", f".tmp-a.{uid['a']}.77"])
    assert os.listdir(red) == [f"a.{uid['a']}"]
    assert ckptguard.Store(tmp_path).gc(older_than=0) == []


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
    naming it, the old one at .staging/a.<uuid>.old, the new one at .staging/a.<uuid>, and the
    overwrite's intent record .staging/a.<uuid>.overwrite."""
    save(tmp_path, "a", 1)
    save(tmp_path, "x", 2)
    (tmp_path / LATEST).write_text("a\n")
    uid = "0123456789abcdef0123456789abcdef"
    (tmp_path / STAGING / f"a.{uid}{INTENT_SUFFIX}").write_text("a\n")
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


@pytest.mark.parametrize("point", ["overwrite.before_remove_old", "remove.manifest_removed"])
def test_deleted_name_stays_deleted_after_an_interrupted_fallback_overwrite(
    tmp_path, monkeypatch, point
):
    """The replaced checkpoint left in .staging after the fallback's second rename (whole, or
    partly removed) is garbage: after delete, gc never puts it back (I11)."""
    monkeypatch.setenv("CKPTGUARD_RENAME_EXCHANGE", "0")
    save(tmp_path, "a", 1)
    monkeypatch.setenv("CKPTGUARD_FAILPOINT", f"{point}:*:eio")
    with pytest.warns(ckptguard.CheckpointWarning, match="gc removes"):
        save(tmp_path, "a", 2, overwrite=True)
    monkeypatch.delenv("CKPTGUARD_FAILPOINT")
    left = os.listdir(tmp_path / STAGING)
    assert len(left) == 1 and left[0].endswith(".old"), left  # the intent record went first
    store = ckptguard.Store(tmp_path)
    store.delete("a")
    store.gc(older_than=0)
    assert store.list() == [] and store.latest_name() is None
    assert not (tmp_path / "a").exists() and os.listdir(tmp_path / STAGING) == []


def test_gc_never_restores_an_old_copy_once_the_new_one_was_in_place(tmp_path):
    """An intent record whose new copy was renamed into place (and then deleted): the old copy
    is garbage, even with the record still there."""
    _interrupted_overwrite(tmp_path, new_whole=True)
    staging = tmp_path / STAGING
    new = next(p for p in staging.iterdir() if len(p.name) == len("a.") + 32)
    os.rename(new, tmp_path / "a")  # the second rename happened; then the kill
    ckptguard.Store(tmp_path).delete("a")
    ckptguard.Store(tmp_path).gc(older_than=0)
    assert ckptguard.Store(tmp_path).list() == [] and os.listdir(staging) == []


def _occupant(tmp_path, kind: str):
    target = tmp_path / "a"
    if kind == "dir":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    elif kind == "file":
        target.write_text("mine")
    elif kind == "link":
        save(tmp_path, "real", 1)
        target.symlink_to(tmp_path / "real")
    elif kind == "broken":  # a checkpoint directory whose manifest does not decode
        target.mkdir()
        (target / "MANIFEST.json").write_text("{")
    return target


def _snapshot(path):
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_file():
        return ("file", path.read_bytes())
    return ("dir", sorted((p.name, p.read_bytes()) for p in path.iterdir()))


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("kind", ["dir", "file", "link", "broken"])
def test_save_never_replaces_what_is_not_a_checkpoint(tmp_path, kind, overwrite):
    """A directory of the user's, a file or a link at the name: refused before anything is
    written, naming it; it is left as it was."""
    target = _occupant(tmp_path, kind)
    before = _snapshot(target)
    with pytest.raises(ckptguard.NotACheckpointError, match="not a"):
        save(tmp_path, "a", 2, overwrite=overwrite)
    assert _snapshot(target) == before
    staging = tmp_path / STAGING
    assert not staging.exists() or os.listdir(staging) == []  # nothing was written


@pytest.mark.parametrize("exchange", ["1", "0"])
@pytest.mark.parametrize("kind", ["dir", "file", "link"])
def test_commit_refuses_what_appeared_at_the_name_since_the_save_began(
    tmp_path, monkeypatch, kind, exchange
):
    """The same check at the rename: something put there after the save's first check."""
    from ckptguard import commit
    from ckptguard.format import manifest
    from ckptguard.format.layout import MANIFEST

    monkeypatch.setenv("CKPTGUARD_RENAME_EXCHANGE", exchange)
    save(tmp_path, "x", 1)
    staging = tmp_path / STAGING / "a.0123456789abcdef0123456789abcdef"
    os.rename(tmp_path / "x", staging)
    body = manifest.decode((staging / MANIFEST).read_bytes())
    target = _occupant(tmp_path, kind)
    before = _snapshot(target)
    with pytest.raises(ckptguard.NotACheckpointError):
        commit.publish(str(tmp_path), target.name, str(staging), body, overwrite=True)
    assert _snapshot(target) == before
    assert sorted(os.listdir(tmp_path / STAGING)) == [staging.name]
    assert ckptguard.verify(staging).ok


def test_save_replaces_an_empty_directory(tmp_path):
    (tmp_path / "a").mkdir()  # nothing to lose: the rename replaces it
    save(tmp_path, "a", 1)
    assert ckptguard.load(tmp_path / "a")["v"].item() == 1


_RACER = """
import os, sys, torch, ckptguard
ckptguard.save({"w": torch.zeros(3)}, sys.argv[1] + "-warm" + sys.argv[2])  # lazy setup first
os.environ["CKPTGUARD_FAILPOINT"] = "save.staging_created:*:sleep1"  # both past the first check
print("ready", flush=True)
sys.stdin.readline()  # both processes start saving at once
try:
    ckptguard.save({"w": torch.full((20000,), float(sys.argv[2]))}, sys.argv[1])
    print("ok")
except ckptguard.CheckpointError as e:
    print(type(e).__name__, e)
"""


@pytest.mark.backend_independent  # a timeout, a signal or a race: the same on both backends
def test_two_processes_saving_the_same_new_name(tmp_path):
    """Exactly one wins; the other gets CheckpointExistsError; the store holds the winner's."""
    import subprocess
    import sys

    for r in range(4):
        store = tmp_path / f"s{r}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _RACER, str(store / "x"), str(v)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for v in (1, 2)
        ]
        # Both warm-up saves are committed before either races: "x" is then the last commit.
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=120) for p in procs]
        said = [o.strip().splitlines()[-1] if o.strip() else e[-500:] for o, e in outs]
        winners = [v for v, s in zip((1, 2), said, strict=True) if s == "ok"]
        losers = [s for s in said if s != "ok"]
        assert len(winners) == 1, said
        assert losers[0].startswith("CheckpointExistsError"), said
        assert ckptguard.load(store / "x")["w"][0].item() == winners[0]
        st = ckptguard.Store(store)
        assert {i.name for i in st.list()} == {"x", "x-warm1", "x-warm2"}
        assert st.latest_name() == "x"
        assert os.listdir(store / STAGING) == []  # the loser removed its staging directory


def test_new_store_directories_are_durable(tmp_path, monkeypatch):
    """A first save into a new store fsyncs the parent of every directory it created."""
    from ckptguard import commit, fsutil

    synced = []
    real = fsutil.fsync_dir

    def spy(path):
        synced.append(os.path.abspath(path))
        real(path)

    monkeypatch.setattr(fsutil, "fsync_dir", spy)
    monkeypatch.setattr(commit, "fsync_dir", spy)
    store = tmp_path / "a" / "b" / "store"
    save(store, "x", 1)
    for created in (tmp_path / "a", tmp_path / "a" / "b", store, store / STAGING):
        assert str(created.parent) in synced, (created, synced)


def _modes(root):
    return {str(p.relative_to(root)): p.stat().st_mode & 0o7777 for p in [root, *root.rglob("*")]}


def test_no_world_writable_directory_under_umask_0(tmp_path):
    """Under umask 000, nothing ckptguard creates is world-writable; .staging is private."""
    old = os.umask(0)
    try:
        store = tmp_path / "new" / "store"
        save(store, "x", 1)
        ckptguard.Store(store).delete("x")
        save(store, "y", 2)
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "new")
    assert not [p for p, m in modes.items() if m & 0o002], modes
    assert modes[f"store/{STAGING}"] == 0o700, modes


def test_a_group_writable_store_is_shared_with_its_group(tmp_path):
    """A store its owner made group-writable: .staging is 0o770, whatever the umask."""
    store = tmp_path / "shared"
    store.mkdir()
    os.chmod(store, 0o2775)
    old = os.umask(0o077)
    try:
        save(store, "x", 1)
    finally:
        os.umask(old)
    assert (store / STAGING).stat().st_mode & 0o777 == 0o770


def test_gc_takes_only_a_regular_file_for_an_intent_record(tmp_path):
    """A directory (or link) named like an intent record is a leftover, not an instruction."""
    save(tmp_path, "a", 1)
    uid = "0123456789abcdef0123456789abcdef"
    (tmp_path / STAGING / f"b.{uid}{INTENT_SUFFIX}").mkdir()
    (tmp_path / STAGING / f"b.{uid}.old").mkdir()
    (tmp_path / STAGING / f"b.{uid}").mkdir()
    ckptguard.Store(tmp_path).gc(older_than=0)
    assert [i.name for i in ckptguard.Store(tmp_path).list()] == ["a"]
    assert os.listdir(tmp_path / STAGING) == []


# ------------------------------------------------------------------ bad input changes nothing


def test_path_does_not_exist(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "c1")
    before = snapshot(str(tmp_path), staging=True)
    with pytest.raises(ckptguard.CheckpointNotFoundError):
        ckptguard.load(missing)
    with pytest.raises(ckptguard.CheckpointNotFoundError):
        ckptguard.verify(missing)
    assert not os.path.exists(tmp_path / "nope")
    assert snapshot(str(tmp_path), staging=True) == before


def test_store_without_latest(store: str) -> None:
    os.makedirs(store)
    before = snapshot(store, staging=True)
    with pytest.raises(ckptguard.CheckpointNotFoundError):
        ckptguard.load(store)
    assert ckptguard.Store(store).list() == []
    assert ckptguard.Store(store).latest() is None
    assert snapshot(store, staging=True) == before


STORE_OPS: dict[str, Callable[[ckptguard.Store], Any]] = {
    "list": lambda s: s.list(),
    "latest": lambda s: s.latest(),
    "gc": lambda s: s.gc(),
    "gc_now": lambda s: s.gc(older_than=0),
}


@pytest.mark.parametrize("op", sorted(STORE_OPS))
@pytest.mark.parametrize("where", ["missing", "missing_parent", "/nonexistent"])
def test_missing_store(tmp_path: Path, op: str, where: str) -> None:
    """Store operations on a root that does not exist: CheckpointNotFoundError (not an empty
    list, not a bare OSError), and the root is not created. ``latest()`` is None instead: a
    job's first run asks it before any save created the store (nothing to resume from)."""
    root = {
        "missing": str(tmp_path / "store"),
        "missing_parent": str(tmp_path / "nope" / "store"),
        "/nonexistent": "/nonexistent",
    }[where]
    if os.path.lexists(root):
        pytest.skip(f"{root} exists on this machine")
    before = snapshot(str(tmp_path), staging=True)
    if op == "latest":
        assert STORE_OPS[op](ckptguard.Store(root)) is None
    else:
        with pytest.raises(ckptguard.CheckpointNotFoundError):
            STORE_OPS[op](ckptguard.Store(root))
    assert not os.path.lexists(root)
    assert snapshot(str(tmp_path), staging=True) == before


@pytest.mark.parametrize("op", sorted(STORE_OPS))
def test_store_root_is_a_file(tmp_path: Path, op: str) -> None:
    """A regular file where the store should be: a typed CheckpointError (StoreError or
    CheckpointNotFoundError), never a bare OSError, and the file is left as it was."""
    root = tmp_path / "store"
    root.write_bytes(b"not a store\n")
    before = snapshot(str(tmp_path), staging=True)
    with pytest.raises((ckptguard.StoreError, ckptguard.CheckpointNotFoundError)):
        STORE_OPS[op](ckptguard.Store(root))
    assert snapshot(str(tmp_path), staging=True) == before


@pytest.mark.parametrize("bad", ["..", "../c1", "c1/x", ""])
def test_delete_invalid_name(store: str, bad: str) -> None:
    commit_one(store)
    before = snapshot(os.path.dirname(store))
    with pytest.raises((ckptguard.InvalidNameError, ckptguard.CheckpointNotFoundError)):
        ckptguard.Store(store).delete(bad)
    assert snapshot(os.path.dirname(store)) == before


# LATEST names a committed checkpoint of the store (format.md section 1): a path, a dotted name,
# an empty or two-line file are refused, never followed, and nothing outside the store is opened.
LATEST_TEXTS = [
    b"..\n",
    b"../store\n",
    b"../elsewhere\n",
    b"c1/..\n",
    b"./c1\n",
    b"c1/../c1\n",
    b"/tmp\n",
    b"/etc\n",
    b"c1\0\n",
    b"\n",
    b"c1\nc1\n",
    b"x" * 300 + b"\n",
]


@pytest.mark.parametrize("text", LATEST_TEXTS)
def test_latest_that_names_no_checkpoint_of_the_store(store: str, text: bytes) -> None:
    commit_one(store)
    shutil.copytree(os.path.join(store, "c1"), os.path.join(os.path.dirname(store), "elsewhere"))
    Path(store, "LATEST").write_bytes(text)
    before = snapshot(os.path.dirname(store), staging=True)
    with record_opens() as opened, pytest.raises(ckptguard.CorruptCheckpointError) as ei:
        ckptguard.load(store)
    assert ei.value.file == "LATEST"
    allowed = (store, os.path.join(store, "LATEST"))
    assert not opened_outside(opened, os.path.join(store, "c1"), allowed), opened
    with pytest.raises((ckptguard.CorruptCheckpointError, ckptguard.CheckpointNotFoundError)):
        ckptguard.Store(store).latest()
    assert snapshot(os.path.dirname(store), staging=True) == before


def test_latest_naming_a_symlinked_directory_is_refused(store: str) -> None:
    """format.md section 1: LATEST names a committed checkpoint (a directory of the store, which
    Store.list never takes a link to be); a link leading elsewhere is damage, not followed."""
    ckptguard.save(small_state(), os.path.join(store, "c1"), chunk_size=128)
    elsewhere = os.path.join(os.path.dirname(store), "elsewhere")
    ckptguard.save(small_state(5), os.path.join(elsewhere, "c9"), chunk_size=128)
    os.symlink(os.path.join(elsewhere, "c9"), os.path.join(store, "c2"))
    Path(store, "LATEST").write_text("c2\n")
    assert [i.name for i in ckptguard.Store(store).list()] == ["c1"]
    with pytest.raises(ckptguard.CorruptCheckpointError):
        ckptguard.load(store)


def test_two_deletes_of_latest_at_once_leave_latest_whole(tmp_path: Path) -> None:
    """Two threads delete the LATEST checkpoint at once: one removes it, the other finds it
    gone (CheckpointNotFoundError) and does not point LATEST back at it."""
    import threading

    for i in range(2):
        ckptguard.save({"w": torch.full((4,), float(i))}, tmp_path / "s" / f"c{i}")
    st = ckptguard.Store(tmp_path / "s")
    errors: list = []

    def one() -> None:
        try:
            st.delete("c2")
        except ckptguard.CheckpointNotFoundError as e:
            errors.append(e)

    for _ in range(20):  # the race is narrow: repeat it
        ckptguard.save({"w": torch.full((4,), 2.0)}, tmp_path / "s" / "c2")
        errors.clear()
        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 1
        assert st.latest_name() == "c1" and ckptguard.load(tmp_path / "s")["w"][0].item() == 1.0
