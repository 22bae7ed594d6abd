"""Legal holds (ckptguard/holds.py, ``Store.hold``/``release``) and read-only committed
checkpoints (ckptguard/readonly.py): a held checkpoint refuses every destructive operation,
also one already under way; hostile markers fail closed; committed files are 0444 and
directories 0555, and delete, gc, overwrite and incremental saves still work."""

from __future__ import annotations

import os
import pwd
import stat
import sys
import threading
from pathlib import Path

import pytest
import torch
from threadcoord import ThreadCoordinator, run_ranks

import ckptguard
from ckptguard import commit, holds, keys, readonly
from ckptguard import store as store_mod
from ckptguard.drain import drain
from ckptguard.errors import CheckpointHeldError, CheckpointNotFoundError
from ckptguard.format.layout import STAGING
from ckptguard.shard import Shard


def _save(store: Path, name: str, seed: float, **kw: object) -> None:
    ckptguard.save({"w": torch.full((64,), seed)}, store / name, **kw)


def _names(store: Path) -> set[str]:
    return {i.name for i in ckptguard.Store(store).list()}


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    s = tmp_path / "store"
    _save(s, "a", 1.0)
    _save(s, "b", 2.0)
    return s


def test_a_held_checkpoint_refuses_delete_overwrite_and_prune(store: Path) -> None:
    st = ckptguard.Store(store)
    hold = st.hold("a", "litigation 42")
    assert hold.uuid == ckptguard.Store(store).list()[0].uuid
    for attempt in (
        lambda: st.delete("a"),
        lambda: _save(store, "a", 9.0, overwrite=True),
        lambda: st.hold("a", "again"),
    ):
        with pytest.raises(CheckpointHeldError, match="litigation 42") as e:
            attempt()
        assert e.value.name == "a" and e.value.reason == "litigation 42"
    decisions, failed = st.prune({"keep_last": 1})
    assert not failed and _names(store) == {"a", "b"}
    (held,) = [d for d in decisions if d.info.name == "a"]
    assert held.keep and held.reasons == ("hold",)
    assert ckptguard.load(store / "a")["w"][0].item() == 1.0 and ckptguard.verify(store / "a").ok
    assert st.release("a") == hold
    with pytest.raises(CheckpointNotFoundError, match="not held"):
        st.release("a")
    _save(store, "a", 3.0, overwrite=True)
    st.delete("a")
    assert _names(store) == {"b"} and st.holds() == []


def test_a_hold_of_a_missing_checkpoint_fails_and_leaves_no_marker(store: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        ckptguard.Store(store).hold("nope")
    assert not (store / ".holds" / "nope.json").exists()


def _hostile(store: Path, kind: str) -> None:
    d = store / ".holds"
    d.mkdir(exist_ok=True)
    m = d / "a.json"
    if kind == "symlink":
        (store / "elsewhere.json").write_text("{}")
        m.symlink_to(store / "elsewhere.json")
    elif kind == "fifo":
        os.mkfifo(m)
    elif kind == "huge":
        m.write_bytes(b" " * (holds.MAX_HOLD_BYTES + 1))
    elif kind == "json":
        m.write_text('{"name": "a", "name": "a"}\n')
    elif kind == "members":
        m.write_text('{"name":"a"}\n')
    elif kind == "dirlink":
        d.rmdir()
        (store / "real-holds").mkdir()
        d.symlink_to(store / "real-holds")


@pytest.mark.parametrize("kind", ["symlink", "fifo", "huge", "json", "members", "dirlink"])
def test_a_hostile_marker_fails_closed(store: Path, kind: str) -> None:
    _hostile(store, kind)
    st = ckptguard.Store(store)
    with pytest.raises(CheckpointHeldError, match="cannot be read"):
        st.delete("a")
    with pytest.raises(CheckpointHeldError):
        _save(store, "a", 5.0, overwrite=True)
    assert "a" in _names(store) and ckptguard.verify(store / "a").ok
    if kind == "dirlink":
        return  # not a marker to release: the operator removes the link
    ((name, hold, problem),) = st.holds()
    assert name == "a" and hold is None and problem
    assert st.release("a") is None
    st.delete("a")
    assert _names(store) == {"b"}


def _hook(point: str, ready: threading.Event, go: threading.Event):  # type: ignore[no-untyped-def]
    def fp(p: str) -> None:
        if p == point:
            ready.set()
            assert go.wait(30)

    return fp


def test_a_hold_placed_during_a_delete_undoes_it(store: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The delete passed its first check; the hold's marker is written before the delete's
    rename; the delete sees it after its rename and puts the checkpoint (and LATEST) back."""
    st = ckptguard.Store(store)
    d_ready, d_go, h_ready, h_go = (threading.Event() for _ in range(4))
    monkeypatch.setattr(store_mod, "failpoint", _hook("delete.start", d_ready, d_go))
    real_write = holds.write

    def write(*a: object, **kw: object) -> holds.Hold:
        hold = real_write(*a, **kw)  # type: ignore[arg-type]
        h_ready.set()
        assert h_go.wait(30)
        return hold

    monkeypatch.setattr(holds, "write", write)
    out: dict[str, object] = {}

    def run(key: str, fn) -> None:  # type: ignore[no-untyped-def]
        try:
            out[key] = fn()
        except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
            out[key] = e

    deleter = threading.Thread(target=run, args=("delete", lambda: st.delete("b")))
    holder = threading.Thread(target=run, args=("hold", lambda: st.hold("b", "audit")))
    deleter.start()
    assert d_ready.wait(30)
    holder.start()
    assert h_ready.wait(30)
    d_go.set()
    deleter.join(30)
    h_go.set()
    holder.join(30)
    assert isinstance(out["delete"], CheckpointHeldError), out
    assert isinstance(out["hold"], holds.Hold), out
    assert _names(store) == {"a", "b"} and st.latest_name() == "b"
    assert ckptguard.verify(store / "b").ok
    assert stat.S_IMODE(os.stat(store / "b").st_mode) == readonly.DIR_MODE


def test_a_hold_placed_during_an_overwrite_undoes_it(store: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The overwrite's exchange (or first rename) moved the old checkpoint away; a hold marker
    is there when it checks: the old one goes back, the save fails, nothing new is visible."""
    old = ckptguard.Store(store).list()[0].uuid
    real = commit._exchange

    def exchange(a: str, b: str) -> bool:
        done = real(a, b)
        if done and not (store / ".holds").exists():  # the first: the overwrite's own
            holds.write(str(store), "a", old, "late hold")
        return done

    monkeypatch.setattr(commit, "_exchange", exchange)
    with pytest.raises(CheckpointHeldError, match="late hold"):
        _save(store, "a", 7.0, overwrite=True)
    assert ckptguard.Store(store).list()[0].uuid == old
    assert ckptguard.load(store / "a")["w"][0].item() == 1.0 and ckptguard.verify(store / "a").ok
    ckptguard.Store(store).gc(older_than=0)
    assert os.listdir(store / ".staging") == []


def test_concurrent_hold_and_delete_never_both_succeed(tmp_path: Path) -> None:
    """Many rounds of a hold and a delete of one checkpoint at once: a held checkpoint is
    listed and whole, a deleted one has no hold; never a hold on a deleted checkpoint."""
    store = tmp_path / "store"
    _save(store, "keep", 0.0)
    st = ckptguard.Store(store)
    seen = set()
    for i in range(25):
        _save(store, "c", float(i), overwrite=True)
        barrier = threading.Barrier(2)
        out: dict[str, object] = {}

        def run(key: str, fn, barrier=barrier, out=out) -> None:  # type: ignore[no-untyped-def]
            barrier.wait()
            try:
                out[key] = fn()
            except (CheckpointHeldError, CheckpointNotFoundError) as e:
                out[key] = e

        ts = [
            threading.Thread(target=run, args=("hold", lambda: st.hold("c"))),
            threading.Thread(target=run, args=("delete", lambda: st.delete("c"))),
        ]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        held, deleted = isinstance(out["hold"], holds.Hold), out["delete"] is None
        assert not (held and deleted), out
        marker = (store / ".holds" / "c.json").exists()
        assert marker == held, out
        if held:
            assert "c" in _names(store) and ckptguard.verify(store / "c").ok
            st.release("c")
        else:
            assert isinstance(out["hold"], CheckpointNotFoundError), out
        assert ("c" in _names(store)) != deleted, out
        seen.add((held, deleted))
        if "c" in _names(store):
            st.delete("c")
    assert st.latest_name() == "keep" and _names(store) == {"keep"}
    st.gc(older_than=0)
    assert os.listdir(store / ".staging") == []


def test_committed_checkpoints_are_read_only_and_still_removable(tmp_path: Path) -> None:
    store = tmp_path / "store"
    state = {"w": torch.arange(1 << 16, dtype=torch.float32)}
    ckptguard.save(state, store / "a", chunk_size=1 << 14)
    state["w"][0] = 5.0
    ckptguard.save(state, store / "b", chunk_size=1 << 14, base="a")  # links a's data file
    for name in ("a", "b"):
        d = store / name
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o555
        assert {stat.S_IMODE(os.stat(f).st_mode) for f in d.iterdir()} == {0o444}
    assert any(f.stat().st_nlink == 2 for f in (store / "b").iterdir())
    ckptguard.save(state, store / "b", chunk_size=1 << 14, base="a", overwrite=True)
    st = ckptguard.Store(store)
    st.delete("a")
    assert ckptguard.verify(store / "b").ok and ckptguard.load(store / "b")["w"][0].item() == 5.0
    st.gc(older_than=0)
    assert os.listdir(store / ".staging") == [] and _names(store) == {"b"}


def _sealed(d: Path) -> bool:
    """Whether ``d`` is a committed checkpoint sealed whole: directory 0555, every file 0444."""
    files = list(d.iterdir())
    assert any(f.name.endswith(".ckg") for f in files), files
    modes = {f.name: stat.S_IMODE(f.lstat().st_mode) for f in files}
    return stat.S_IMODE(os.stat(d).st_mode) == 0o555 and set(modes.values()) == {0o444}


def _two_ranks(path: Path, seed: float, **kw: object) -> None:
    def rank_main(coord: ThreadCoordinator) -> None:
        r = coord.rank
        piece = torch.full((16, 256), seed + r)
        state = {"w": Shard(piece, (32, 256), (16 * r, 0)), "small": torch.ones(3)}
        ckptguard.save(state, path, coordinator=coord, chunk_size=1 << 12, **kw)

    run_ranks(2, rank_main)


def _every_kind_of_save(store: Path, tmp_path: Path) -> list[str]:
    """Save into ``store`` each kind of checkpoint whose files some writer seals; their names."""
    priv = keys.generate(tmp_path / "k")[0]
    state = {"w": torch.arange(1 << 14, dtype=torch.float32), "b": torch.ones(5), "n": 3}
    ckptguard.save(state, store / "plain", chunk_size=1 << 12)  # "b": a packed record
    state["w"][0] = 7.0
    ckptguard.save(state, store / "incremental", chunk_size=1 << 12, base="plain")
    ckptguard.save(state, store / "encrypted", encrypt="tenant", digests=True)
    ckptguard.save(state, store / "signed", sign_key=priv)
    ckptguard.save_async(state, store / "async").result(60)
    _two_ranks(store / "ranks", 1.0)
    _two_ranks(store / "ranks-incremental", 1.0, base="ranks")
    return ["plain", "incremental", "encrypted", "signed", "async", "ranks", "ranks-incremental"]


@pytest.fixture()
def kek(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CKPTGUARD_KEK_FILE", "CKPTGUARD_KEK_COMMAND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CKPTGUARD_KEK", "c3" * 32)


@pytest.mark.usefixtures("kek")
def test_every_file_of_every_kind_of_committed_checkpoint_is_read_only(tmp_path: Path) -> None:
    """Plain, incremental, encrypted, signed, async and two-rank saves, and drained copies: the
    directory 0555, every file 0444 (data files by their writers, linked ones shared with the
    base). A one-file checkpoint is the user's file and stays writable, as torch.save's would."""
    store = tmp_path / "store"
    names = _every_kind_of_save(store, tmp_path)
    for name in names:
        assert _sealed(store / name), name
    assert any(f.stat().st_nlink == 2 for f in (store / "incremental").iterdir())
    assert sum(f.stat().st_nlink == 2 for f in (store / "ranks-incremental").iterdir()) == 2
    drain(store, tmp_path / "dst", names=["plain", "ranks"])
    assert _sealed(tmp_path / "dst" / "plain") and _sealed(tmp_path / "dst" / "ranks")
    ckptguard.save({"w": torch.ones(8)}, tmp_path / "model.pt")
    assert stat.S_IMODE(os.stat(tmp_path / "model.pt").st_mode) & 0o200
    for name in names:
        assert ckptguard.verify(store / name).ok, name


@pytest.mark.usefixtures("kek")
def test_rank_0_seals_only_its_own_files_and_each_writer_its_data_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the commit of a save, rank 0 chmods MANIFEST.json, index.parquet, SIGNATURE.json and
    the directory, never a data file, and lists no staging directory: each data file was made
    0444 by its own writer (fchmod), before the fsync that makes it durable."""
    chmods: list[str] = []
    listed: list[str] = []
    events: list[tuple[str, int]] = []
    chmod, scandir, fchmod, fsync = os.chmod, os.scandir, os.fchmod, os.fsync

    def record_chmod(path: object, mode: int, *a: object, **kw: object) -> None:
        chmods.append(os.fsdecode(path))
        chmod(path, mode, *a, **kw)

    def record_scandir(path: object = ".") -> object:
        listed.append(os.fsdecode(path) if isinstance(path, str | bytes | os.PathLike) else "")
        return scandir(path)

    def record_fchmod(fd: int, mode: int) -> None:
        events.append(("fchmod", fd) if mode == readonly.FILE_MODE else ("other", fd))
        fchmod(fd, mode)

    def record_fsync(fd: int) -> None:
        events.append(("fsync", fd))
        fsync(fd)

    monkeypatch.setattr(os, "chmod", record_chmod)
    monkeypatch.setattr(os, "scandir", record_scandir)
    monkeypatch.setattr(os, "fchmod", record_fchmod)
    monkeypatch.setattr(os, "fsync", record_fsync)
    store = tmp_path / "store"
    names = _every_kind_of_save(store, tmp_path)
    monkeypatch.undo()
    staging = str(store / STAGING) + os.sep  # what is in it (it is chmodded when created)
    sealed = [p for p in chmods if p.startswith(staging)]
    assert not [p for p in sealed if os.path.basename(p) not in readonly.OWN_FILES], sealed
    assert {os.path.basename(p) for p in sealed} == set(readonly.OWN_FILES)  # one signed save
    assert {os.path.basename(p) for p in chmods if os.path.dirname(p) == str(store)} >= set(names)
    assert not [p for p in listed if p.startswith(staging)], listed
    datafiles = sum(f.name.startswith("rank-") for n in names for f in (store / n).iterdir())
    writers = [i for i, (what, _) in enumerate(events) if what == "fchmod"]
    assert len(writers) == datafiles - 3  # the linked files were sealed by the base's writers
    for i in writers:  # each followed by the fsync of its file
        assert ("fsync", events[i][1]) in events[i + 1 :]


def _immutable_supported(tmp: Path) -> bool:
    probe = tmp / "probe"
    probe.write_bytes(b"")
    try:
        readonly.set_immutable(str(tmp / "probe"), True)  # a file: the flag only
    except OSError:
        return False
    readonly.set_immutable(str(tmp / "probe"), False)
    return True


def test_an_immutable_hold(store: Path, tmp_path: Path) -> None:
    if not _immutable_supported(tmp_path):
        with pytest.warns(ckptguard.CheckpointWarning, match="not immutable"):
            ckptguard.Store(store).hold("a", immutable=True)
        return
    st = ckptguard.Store(store)
    assert st.hold("a", "freeze", immutable=True).immutable
    assert readonly.immutable(str(store / "a"))
    assert readonly.immutable(str(store / "a" / "MANIFEST.json"))
    assert not readonly.immutable(str(store / "a" / "rank-00000.ckg"))  # may be shared
    with pytest.raises(OSError):
        (store / "a" / "new").write_bytes(b"x")  # even root: the attribute, not the mode
    st.release("a")
    assert not readonly.immutable(str(store / "a"))
    readonly.set_immutable(str(store / "b"), True)  # left behind without a hold
    st.delete("a")
    st.delete("b")
    assert _names(store) == set()


_AS_NOBODY = """
import os, sys, torch, ckptguard
s = sys.argv[1]
ckptguard.save({"w": torch.ones(4)}, s + "/a")
ckptguard.save({"w": torch.ones(4)}, s + "/b")
ckptguard.save({"w": torch.ones(4)}, s + "/c", base="b")  # links b's read-only data file
for _ in range(2):  # a one-file save reopens its data file to append the tail: not sealed
    ckptguard.save({"w": torch.ones(4)}, s + ".pt")
    assert os.stat(s + ".pt").st_mode & 0o200
for bad in (lambda: open(s + "/a/MANIFEST.json", "ab"), lambda: open(s + "/a/new", "wb")):
    try:
        bad()
    except PermissionError:
        pass
    else:
        sys.exit("a write into a committed checkpoint succeeded")
ckptguard.save({"w": torch.zeros(4)}, s + "/a", overwrite=True)
st = ckptguard.Store(s)
st.hold("b")
try:
    st.delete("b")
except ckptguard.CheckpointHeldError:
    pass
else:
    sys.exit("a held checkpoint was deleted")
st.release("b")
st.delete("b")
st.delete("c")
st.delete("a")
st.gc(older_than=0)
assert os.listdir(s + "/.staging") == [] and st.list() == []
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a step as another user")
def test_read_only_for_the_owner_who_is_not_root(tmp_path: Path) -> None:
    """As a user without root's privileges (nobody, in a forked child: this interpreter may not
    be nobody's to start): a committed checkpoint's files and directory refuse writes, and
    save, overwrite, hold, delete and gc still work."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    warm = tmp_path / "warm"  # every module the child needs, imported here (it may not read them)
    _save(warm, "a", 1.0)
    _save(warm, "a", 1.0, overwrite=True)
    _save(warm, "b", 1.0, base="a")
    ckptguard.save({"w": torch.ones(4)}, tmp_path / "warm.pt")
    ckptguard.Store(warm).hold("a")
    ckptguard.Store(warm).release("a")
    ckptguard.Store(warm).delete("a")
    ckptguard.Store(warm).gc(older_than=0)
    work = tmp_path / "asnobody"
    work.mkdir()
    os.chown(work, nobody.pw_uid, nobody.pw_gid)
    parents = [tmp_path, *(p for p in tmp_path.parents if str(p).startswith("/tmp/"))]
    saved = {p: stat.S_IMODE(os.stat(p).st_mode) for p in parents}
    for p in parents:
        os.chmod(p, saved[p] | 0o005)  # nobody must reach its directory
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                sys.argv = ["-", str(work / "store")]
                exec(compile(_AS_NOBODY, "as-nobody", "exec"), {})
                code = 0
            except BaseException as e:  # noqa: BLE001 - reported through the exit status
                print(f"as nobody: {e!r}", file=sys.stderr)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        for p, m in saved.items():
            os.chmod(p, m)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_held_checkpoint_left_in_staging_is_kept_by_gc_and_discard(store: Path) -> None:
    """Where an undo could not put a held checkpoint back (its name was taken in that instant),
    its tree in .staging is the only copy: neither gc nor a failed save's discard removes it."""
    st = ckptguard.Store(store)
    uuid = st.hold("a", "audit").uuid
    staging = store / ".staging"
    staging.mkdir(exist_ok=True)
    readonly.unseal(str(store / "a"))
    left = staging / f"a.{'0' * 32}.deleted"
    os.rename(store / "a", left)
    swapped = staging / f"a.{'1' * 32}"  # an overwrite's staging path holding the held one
    os.rename(left, swapped)
    commit.discard_staging(str(swapped))
    assert swapped.is_dir()
    os.rename(swapped, left)
    st.gc(older_than=0)
    assert left.is_dir() and holds.tree_uuid(str(left)) == uuid
    st.release("a")
    st.gc(older_than=0)
    assert not left.exists()
