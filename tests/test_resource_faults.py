"""Real resource faults, not injected ones: permission denied on one rank's file or directory, a
data file deleted or replaced between commit and load (and during a load), a small file system
that fills in the middle of a four-rank save, and the clock jumping during gc.

Root ignores mode bits, and the Python of this project may live under /root (0700), so a
privilege drop to ``nobody`` cannot run Python. Permissions are therefore tested with processes
that keep uid 0 but lose the capabilities that bypass mode bits (``setpriv --bounding-set
-dac_override,-dac_read_search``), with one MPI rank whose file-system uid alone is ``nobody``
(``setfsuid``, after its imports), and with one MPI rank in its own mount namespace where the
store is a read-only bind mount. Without root these tests use plain ``chmod`` or skip.

Run as a script, this file is the rank program of the MPI tests:
``mpiexec -n N python tests/test_resource_faults.py SCENARIO STORE NAME OUTDIR``.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SETPRIV = shutil.which("setpriv")
UNSHARE = shutil.which("unshare")
ROOT = os.geteuid() == 0
NOBODY = 65534


# ============================================================================ the rank program


def rank_state(rank: int, world: int, rows: int, seed: int = 0) -> dict:
    """Rows of a (world*rows, 256) float32 tensor (incompressible) plus a replicated bias."""
    from ckptguard import Shard

    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return {
        "w": Shard(torch.randn(rows, 256, generator=g), (world * rows, 256), (rank * rows, 0)),
        "bias": torch.arange(8.0) + seed,
        "rank": rank,
    }


def _setfsuid(uid: int, gid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.setfsgid(gid)
    libc.setfsuid(uid)
    if libc.setfsuid(-1) != uid:  # setfsuid returns the previous fsuid; -1 only asks
        raise OSError("setfsuid did not take")


def rank_main() -> int:
    """One rank of an MPI save; writes its outcome to OUTDIR/rank-R.json."""
    from mpi4py import MPI

    import ckptguard

    scenario, store, name, outdir = sys.argv[1:5]
    rank, world = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    rows = int(os.environ.get("RF_ROWS", "64"))
    seed = int(os.environ.get("RF_SEED", "1"))
    result: dict[str, Any] = {"rank": rank}
    try:
        if scenario == "fsuid" and rank == int(os.environ["RF_RANK"]):
            # Warm every lazy import and code path first: afterwards this process reads and
            # writes files as nobody, who cannot read the Python installation under /root.
            warm = os.path.join(outdir, f"warm-{rank}")
            ckptguard.save(rank_state(0, 1, 4), os.path.join(warm, "w"), coordinator="local")
            ckptguard.load(os.path.join(warm, "w"))
            shutil.rmtree(warm)
            _setfsuid(NOBODY, NOBODY)
        state = rank_state(rank, world, rows, seed)
        info = ckptguard.save(state, os.path.join(store, name), coordinator="mpi", timeout=60)
        result.update(ok=True, name=info.name)
    except ckptguard.CheckpointError as e:
        cause = e.__cause__
        result.update(
            ok=False,
            type=type(e).__name__,
            error=str(e),
            failed_rank=getattr(e, "rank", None),
            cause=type(cause).__name__ if cause is not None else None,
        )
    if scenario == "fsuid" and rank == int(os.environ["RF_RANK"]):
        _setfsuid(0, 0)  # CAP_SETUID was kept: write the outcome as root again
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, f"rank-{rank}.json"), "w") as f:
        json.dump(result, f)
    MPI.COMM_WORLD.Barrier()
    return 0 if result["ok"] else 3


if __name__ == "__main__":
    sys.exit(rank_main())


# ============================================================================ the tests

import pytest  # noqa: E402
from conftest import run_command, small_state, succeeds  # noqa: E402
from mpikit import MPIEXEC, need_mpi  # noqa: E402

import ckptguard  # noqa: E402
import ckptguard.commit as commit_mod  # noqa: E402
import ckptguard.saver as saver_mod  # noqa: E402
import ckptguard.store as store_mod  # noqa: E402
from ckptguard.open import CheckpointReader  # noqa: E402


def _two_rank_checkpoint(path: str, seed: int = 0) -> None:
    """A committed 2-rank checkpoint (ranks as threads), each rank with its own data file."""
    from test_adversarial import save_sharded

    save_sharded(path, seed)


# ---------------------------------------------------------------------------- unreadable files

_CHILD = r"""
import json, os, sys
import ckptguard
out = {}
def run(label, fn):
    try:
        r = fn()
        probs = [[p.message, p.file] for p in getattr(r, "problems", [])]
        out[label] = {"ok": True, "problems": probs}
    except ckptguard.CheckpointError as e:
        out[label] = {"ok": False, "type": type(e).__name__, "typed": True, "error": str(e),
                      "file": getattr(e, "file", None) or os.path.basename(getattr(e, "path", ""))}
    except BaseException as e:
        out[label] = {"ok": False, "type": type(e).__name__, "typed": False, "error": str(e)}
path = sys.argv[1]
run("load", lambda: ckptguard.load(path))
run("verify", lambda: ckptguard.verify(path))
store = sys.argv[2]
run("list", lambda: [i.name for i in ckptguard.Store(store).list()])
print(json.dumps(out))
"""


def run_unprivileged(path: str, store: str) -> dict[str, dict]:
    """load, verify and Store.list in a process for which mode bits apply."""
    cmd = [sys.executable, "-c", _CHILD, path, store]
    if ROOT:
        if SETPRIV is None:
            pytest.skip("root without setpriv: mode bits cannot be made to apply")
        cmd = [SETPRIV, "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]
    proc = run_command(cmd, 120, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def two_rank_store(tmp_path: Path) -> Iterator[str]:
    store = str(tmp_path / "store")
    _two_rank_checkpoint(os.path.join(store, "c1"))
    yield store
    for dirpath, dirnames, filenames in os.walk(tmp_path):  # undo the chmods for cleanup
        for n in dirnames + filenames:
            os.chmod(os.path.join(dirpath, n), 0o755, follow_symlinks=False)
    os.chmod(tmp_path, 0o755)


UNREADABLE = {
    "rank1_data_file": ("c1/rank-00001.ckg", 0o000, "rank-00001.ckg"),
    "index": ("c1/index.parquet", 0o000, "index.parquet"),
    "manifest": ("c1/MANIFEST.json", 0o000, "MANIFEST.json"),
    "checkpoint_dir_not_listable": ("c1", 0o300, None),
    "latest": ("LATEST", 0o000, "LATEST"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_file_or_directory(two_rank_store: str, case: str) -> None:
    """One file (or the checkpoint directory) the reader may not read: load and verify give a
    typed error naming it, never data; the readable checkpoint is untouched."""
    rel, mode, named = UNREADABLE[case]
    os.chmod(os.path.join(two_rank_store, rel), mode)
    target = two_rank_store if case == "latest" else os.path.join(two_rank_store, "c1")
    out = run_unprivileged(target, two_rank_store)
    load = out["load"]
    assert not load["ok"] and load["typed"], load
    if named:
        assert load["file"] == named, load
    else:
        assert load["type"] == "StoreError" and "Permission denied" in load["error"], load
    verify = out["verify"]
    if verify["ok"]:
        assert verify["problems"] and any(f == named for _, f in verify["problems"]), verify
    else:
        assert verify["typed"], verify
    assert out["list"]["ok"] or out["list"]["typed"], out["list"]


def test_checkpoint_dir_without_any_permission(two_rank_store: str) -> None:
    os.chmod(os.path.join(two_rank_store, "c1"), 0o000)
    out = run_unprivileged(os.path.join(two_rank_store, "c1"), two_rank_store)
    assert out["load"]["typed"] and out["verify"]["typed"], out


def test_store_dir_without_any_permission(two_rank_store: str) -> None:
    os.chmod(two_rank_store, 0o000)
    out = run_unprivileged(two_rank_store, two_rank_store)
    assert out["load"]["typed"] and out["verify"]["typed"] and out["list"]["typed"], out


@pytest.mark.parametrize("where", ["store", "staging"])
def test_save_into_unwritable_directory(tmp_path: Path, where: str) -> None:
    """The store (or its .staging) is not writable for this process: StoreNotWritableError,
    the committed checkpoint stays as it was."""
    store = str(tmp_path / "store")
    ckptguard.save(small_state(), os.path.join(store, "c1"), chunk_size=128)
    os.makedirs(os.path.join(store, ".staging"), exist_ok=True)
    os.chmod(os.path.join(store, ".staging") if where == "staging" else store, 0o555)
    code = (
        "import sys, ckptguard, torch\n"
        "try:\n"
        "    ckptguard.save({'x': torch.ones(3)}, sys.argv[1])\n"
        "    print('SAVED')\n"
        "except ckptguard.CheckpointError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    cmd = [sys.executable, "-c", code, os.path.join(store, "c2")]
    if ROOT:
        if SETPRIV is None:
            pytest.skip("root without setpriv")
        cmd = [SETPRIV, "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]
    try:
        proc = run_command(cmd, 120)
    finally:
        os.chmod(os.path.join(store, ".staging"), 0o755)
        os.chmod(store, 0o755)
    assert proc.stdout.startswith("StoreNotWritableError"), proc.stdout + proc.stderr[-2000:]
    assert "Permission denied" in proc.stdout
    assert [i.name for i in ckptguard.Store(store).list()] == ["c1"]
    assert ckptguard.Store(store).latest().name == "c1"
    assert ckptguard.verify(store).ok


# ---------------------------------------------------------------------------- one rank of a save


def mpirun(
    n: int, scenario: str, store: str, name: str, outdir: str, env: dict | None = None, **kw: Any
) -> list[dict]:
    """Run the rank program on ``n`` ranks (``wrap`` prefixes rank ``wrap_rank``'s command)."""
    need_mpi()
    prog = [sys.executable, os.path.abspath(__file__), scenario, store, name, outdir]
    wrap, wrap_rank = kw.get("wrap"), kw.get("wrap_rank", 1)
    if wrap is None:
        cmd = [MPIEXEC, "-n", str(n), *prog]
    else:  # MPMD: rank wrap_rank runs under the wrapper
        cmd = [MPIEXEC]
        for r in range(n):
            cmd += [":"] if r else []
            cmd += ["-n", "1", *(wrap if r == wrap_rank else []), *prog]
    proc = run_command(cmd, 180, env=env)
    out = []
    for r in range(n):
        p = os.path.join(outdir, f"rank-{r}.json")
        assert os.path.exists(p), f"rank {r} wrote no outcome:\n{proc.stderr[-3000:]}"
        with open(p) as f:
            out.append(json.load(f))
    shutil.rmtree(outdir)
    return out


def _same_abort(res: list[dict], rank: int | None, word: str) -> None:
    """Every rank raised the same CheckpointAbortedError naming the failing rank and ``word``."""
    assert all(not r["ok"] for r in res), res
    assert {r["type"] for r in res} == {"CheckpointAbortedError"}, res
    assert len({r["error"] for r in res}) == 1, res
    failed = res[0]["failed_rank"]
    assert failed == rank if rank is not None else failed in range(len(res)), res
    assert f"rank {failed}" in res[0]["error"] and word in res[0]["error"], res[0]["error"]


def _store_as_before(store: str, names: list[str], latest: str) -> None:
    s = ckptguard.Store(store)
    assert [i.name for i in s.list()] == names
    assert s.latest().name == latest
    assert ckptguard.verify(store).ok
    s.gc(older_than=0)
    staging = os.path.join(store, ".staging")
    assert not os.path.exists(staging) or os.listdir(staging) == []


@pytest.mark.skipif(not ROOT, reason="needs root to give one rank another file-system uid")
@pytest.mark.rank_job
def test_one_rank_without_write_permission(tmp_path: Path) -> None:
    """Rank 2 of 4 writes as nobody (setfsuid) into the root-owned staging directory: EACCES on
    its data file; every rank raises the same abort naming rank 2; the store is unchanged."""
    store = str(tmp_path / "store")
    _two_rank_checkpoint(os.path.join(store, "c1"))
    out = str(tmp_path / "out")
    res = mpirun(4, "fsuid", store, "c2", out, env={"RF_RANK": "2"})
    _same_abort(res, 2, "StoreNotWritableError")
    assert "Permission denied" in res[0]["error"]
    assert "rank-00002.ckg" in res[0]["error"], res[0]  # the file, not just the staging directory
    _store_as_before(store, ["c1"], "c1")
    res = mpirun(4, "plain", store, "c2", out)  # the same save, every rank allowed
    assert all(r["ok"] for r in res), res
    _store_as_before(store, ["c1", "c2"], "c2")


@pytest.mark.skipif(not ROOT or UNSHARE is None, reason="needs root and unshare")
@pytest.mark.rank_job
def test_one_rank_sees_a_read_only_store(tmp_path: Path) -> None:
    """Rank 1 of 3 runs in its own mount namespace where the store is a read-only bind mount
    (a node whose mount went read-only): EROFS, the same abort on every rank naming rank 1."""
    store = str(tmp_path / "store")
    _two_rank_checkpoint(os.path.join(store, "c1"))
    if not succeeds([UNSHARE, "-m", "sh", "-c", f"mount --bind {store} {store}"]):
        pytest.skip("cannot create a mount namespace with a bind mount here")
    script = f'mount --bind {store} {store} && mount -o remount,ro,bind {store} && exec "$@"'
    wrap = [UNSHARE, "-m", "sh", "-c", script, "ro-rank"]
    res = mpirun(3, "plain", store, "c2", str(tmp_path / "out"), wrap=wrap, wrap_rank=1)
    _same_abort(res, 1, "StoreNotWritableError")
    assert "Read-only file system" in res[0]["error"]
    _store_as_before(store, ["c1"], "c1")


# ---------------------------------------------------------------------------- full file system


def test_filesystem_fills_during_a_four_rank_save(tmpfs: Callable[[str], str]) -> None:
    """4 ranks write 256 KiB... 1 MiB each into a 3 MiB tmpfs that already holds a checkpoint:
    a real ENOSPC part way through; every rank raises the same abort (StoreFullError of the
    rank that hit it), nothing new is visible, and once gc ran a save that fits commits."""
    store = os.path.join(tmpfs("size=3m"), "store")
    ckptguard.save(small_state(), os.path.join(store, "c1"), chunk_size=128)
    out = os.path.join(os.path.dirname(os.path.dirname(store)), "out")  # not on the tmpfs
    res = mpirun(4, "plain", store, "big", out, env={"RF_ROWS": "1024"})  # 4 x 1 MiB
    _same_abort(res, None, "StoreFullError")
    assert "No space left on device" in res[0]["error"]
    _store_as_before(store, ["c1"], "c1")
    res = mpirun(4, "plain", store, "small", out, env={"RF_ROWS": "64"})  # 4 x 64 KiB
    assert all(r["ok"] for r in res), res
    _store_as_before(store, ["c1", "small"], "small")


# ---------------------------------------------------------------------------- replaced data files


def _load_error(path: str) -> ckptguard.CorruptCheckpointError:
    with pytest.raises(ckptguard.CorruptCheckpointError) as ei:
        ckptguard.load(path)
    return ei.value


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str]:
    """Two committed 2-rank checkpoints of the same shapes (so their files have equal sizes)."""
    store = str(tmp_path / "store")
    a, b = os.path.join(store, "a"), os.path.join(store, "b")
    _two_rank_checkpoint(b, seed=1)
    _two_rank_checkpoint(a, seed=0)
    return a, b


def test_data_file_deleted_after_commit(pair: tuple[str, str]) -> None:
    a, _ = pair
    os.remove(os.path.join(a, "rank-00001.ckg"))
    err = _load_error(a)
    assert err.file == "rank-00001.ckg" and "missing" in str(err)
    assert [p.file for p in ckptguard.verify(a).problems] == ["rank-00001.ckg"]


def test_data_file_replaced_by_another_checkpoints(pair: tuple[str, str]) -> None:
    """Same name, same size, same rank, valid in itself, but another checkpoint's: refused by its
    uuid before a byte of it is used."""
    a, b = pair
    name = "rank-00001.ckg"
    assert os.path.getsize(os.path.join(a, name)) == os.path.getsize(os.path.join(b, name))
    shutil.copyfile(os.path.join(b, name), os.path.join(a, name))
    err = _load_error(a)
    assert err.file == name and "another checkpoint" in str(err)
    assert not ckptguard.verify(a).ok


def test_data_file_replaced_by_a_truncated_copy(pair: tuple[str, str]) -> None:
    a, _ = pair
    name = "rank-00000.ckg"
    data = Path(a, name).read_bytes()
    tmp = os.path.join(a, name + ".new")
    Path(tmp).write_bytes(data[: len(data) // 2])
    os.rename(tmp, os.path.join(a, name))  # replaced atomically, as a careless copy would be
    err = _load_error(a)
    assert err.file == name and f"has {len(data) // 2} bytes, {len(data)} were expected" in str(err)


RACES = ["replace_by_other", "truncate_in_place", "overwrite_in_place_with_other"]


@pytest.mark.parametrize("backend", ["python", "native"])
@pytest.mark.parametrize("race", RACES)
def test_data_file_changes_during_a_load(
    pair: tuple[str, str], monkeypatch: pytest.MonkeyPatch, race: str, backend: str
) -> None:
    """The file changes after the reader checked the manifest, the index and (for the in-place
    changes) the file's header and footer: still a typed error naming the file, never the other
    checkpoint's bytes in the result."""
    from ckptguard import backend as be

    if backend == "native" and not be.available():
        pytest.skip(be.reason())
    a, b = pair
    name = "rank-00001.ckg"
    path, other = os.path.join(a, name), os.path.join(b, name)
    real_open = CheckpointReader.open_file
    real_sizes = CheckpointReader.check_sizes

    def sizes(self: CheckpointReader, names: Any) -> None:
        real_sizes(self, names)
        if race == "replace_by_other":  # after the size check, before the open
            shutil.copyfile(other, path + ".new")
            os.rename(path + ".new", path)

    def open_file(self: CheckpointReader, n: str) -> int:
        fd = real_open(self, n)
        if n == name and race == "truncate_in_place":
            os.truncate(path, os.path.getsize(path) // 2)
        elif n == name and race == "overwrite_in_place_with_other":
            with open(path, "r+b") as f:  # same inode: the open descriptor sees it
                f.write(Path(other).read_bytes())
        return fd

    monkeypatch.setattr(CheckpointReader, "check_sizes", sizes)
    monkeypatch.setattr(CheckpointReader, "open_file", open_file)
    with be.use(backend):
        err = _load_error(a)
    assert err.file == name, err
    if race != "replace_by_other":  # caught while reading a record: the chunk is named
        assert err.key is not None and err.chunk is not None, err


# ---------------------------------------------------------------------------- clock jumps and gc

DAY = 86400.0


def _fake_clock(monkeypatch: pytest.MonkeyPatch, offset: float | Callable[[], float]) -> None:
    """gc's clock runs ``offset`` seconds from the real one (or returns ``offset()``)."""
    now = offset if callable(offset) else (lambda: time.time() + offset)
    monkeypatch.setattr(store_mod, "time", types.SimpleNamespace(time=now))


def _set_mtimes(root: str, t: float) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), (t, t), follow_symlinks=False)
    os.utime(root, (t, t))


class PausedSave:
    """A save running in a thread, held at a failpoint until ``resume``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: str, point: str) -> None:
        self.reached, self.go = threading.Event(), threading.Event()
        self.result: Any = None
        real = {"saver": saver_mod.failpoint, "commit": commit_mod.failpoint}

        def hold(which: str) -> Callable[[str], None]:
            def fp(p: str) -> None:
                if p == point:
                    self.reached.set()
                    assert self.go.wait(60), "the test never resumed the save"
                real[which](p)

            return fp

        monkeypatch.setattr(saver_mod, "failpoint", hold("saver"))
        monkeypatch.setattr(commit_mod, "failpoint", hold("commit"))

        def run() -> None:
            try:
                self.result = ckptguard.save(small_state(7), path, chunk_size=128)
            except BaseException as e:  # handed to the test
                self.result = e

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.reached.wait(60), "the save never reached the failpoint"

    def resume(self) -> Any:
        self.go.set()
        self.thread.join(60)
        assert not self.thread.is_alive()
        return self.result


def _staging_dirs(store: str) -> list[str]:
    d = os.path.join(store, ".staging")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


@pytest.mark.parametrize("jump", [-DAY, -10 * 365 * DAY, +DAY, +10 * 365 * DAY])
def test_gc_never_removes_committed_checkpoints(store: str, monkeypatch: pytest.MonkeyPatch, jump):
    """Committed checkpoints and LATEST with mtimes far in the past or future, gc's clock
    jumped either way, older_than=0: gc removes only staging garbage."""
    ckptguard.save(small_state(), os.path.join(store, "old"), chunk_size=128)
    ckptguard.save(small_state(1), os.path.join(store, "new"), chunk_size=128)
    _set_mtimes(os.path.join(store, "old"), 0.0)  # 1970
    _set_mtimes(os.path.join(store, "new"), time.time() + 20 * 365 * DAY)
    os.makedirs(os.path.join(store, ".staging", "junk.0123"))
    _set_mtimes(os.path.join(store, ".staging", "junk.0123"), 1.0)
    _fake_clock(monkeypatch, jump)
    removed = ckptguard.Store(store).gc(older_than=0)
    assert [os.path.basename(p) for p in removed] == ["junk.0123"]
    assert [i.name for i in ckptguard.Store(store).list()] == ["old", "new"]
    assert ckptguard.Store(store).latest().name == "new"
    assert ckptguard.verify(os.path.join(store, "old")).ok and ckptguard.verify(store).ok


@pytest.mark.parametrize("point", ["save.data_written", "commit.before_rename"])
@pytest.mark.parametrize("older_than", [0.0, 3600.0])
def test_gc_after_the_clock_jumped_back_keeps_a_save_in_progress(
    store: str, monkeypatch: pytest.MonkeyPatch, point: str, older_than: float
) -> None:
    """A save in progress whose files were written before the clock jumped back a day (their
    mtimes are now in the future), gc run with the new clock, again and again as it keeps
    going back: the staging directory is kept, and the save then commits and loads."""
    ckptguard.save(small_state(), os.path.join(store, "c1"), chunk_size=128)
    save = PausedSave(monkeypatch, os.path.join(store, "c2"), point)
    try:
        [staging] = _staging_dirs(store)
        ticks = iter(range(100))
        _fake_clock(monkeypatch, lambda: time.time() - DAY - 60 * next(ticks))
        for _ in range(3):
            assert ckptguard.Store(store).gc(older_than=older_than) == []
        assert _staging_dirs(store) == [staging]
    finally:
        result = save.resume()
    assert isinstance(result, ckptguard.CheckpointInfo), result
    assert [i.name for i in ckptguard.Store(store).list()] == ["c1", "c2"]
    assert torch.equal(ckptguard.load(store)["model"]["w"], small_state(7)["model"]["w"])


def test_garbage_from_before_a_backward_jump_is_reclaimed_later(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staging garbage whose mtimes lie in the future is kept (it might be a save in progress)
    until the clock passes them; then gc reclaims it. Committed checkpoints stay."""
    ckptguard.save(small_state(), os.path.join(store, "c1"), chunk_size=128)
    junk = os.path.join(store, ".staging", "c9.abc")
    os.makedirs(junk)
    Path(junk, "rank-00000.ckg").write_bytes(b"x" * 100)
    t = time.time() + DAY
    _set_mtimes(junk, t)
    assert ckptguard.Store(store).gc(older_than=0) == []
    _fake_clock(monkeypatch, lambda: t + 3600 + 1)
    assert ckptguard.Store(store).gc(older_than=3600) == [junk]
    assert [i.name for i in ckptguard.Store(store).list()] == ["c1"]


@pytest.mark.parametrize("point", ["save.data_written", "commit.before_rename"])
def test_gc_after_a_forward_jump_removes_a_save_in_progress_which_then_fails_cleanly(
    store: str, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """The limit of mtime-based gc: a clock jumped forward by more than ``older_than`` makes a
    save in progress look abandoned, and gc removes its staging directory. The save must then
    fail with a typed error and leave the store as it was (I4), never commit a partial
    checkpoint."""
    ckptguard.save(small_state(), os.path.join(store, "c1"), chunk_size=128)
    save = PausedSave(monkeypatch, os.path.join(store, "c2"), point)
    try:
        _fake_clock(monkeypatch, 2 * DAY)
        removed = ckptguard.Store(store).gc(older_than=DAY)
        assert len(removed) == 1 and _staging_dirs(store) == []
    finally:
        result = save.resume()
    assert isinstance(result, ckptguard.StoreError), result
    assert [i.name for i in ckptguard.Store(store).list()] == ["c1"]
    assert ckptguard.Store(store).latest().name == "c1"
    assert ckptguard.verify(store).ok
    assert not os.path.exists(os.path.join(store, "c2"))


# ============================================================================ memory on load

_LOAD_UNDER_LIMIT = """
import resource, sys
import ckptguard, ckptguard.loader, ckptguard.read  # the package root imports lazily
import pyarrow.parquet, torch
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
limit = vm + (256 << 20)  # what the process has mapped so far, plus 256 MiB
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    ckptguard.load(sys.argv[1])
except ckptguard.OutOfMemoryError as e:
    print("OOM", e.key, e.nbytes, e.where, "|", e)
    sys.exit(0)
except BaseException as e:
    print("OTHER", type(e).__name__, e)
    sys.exit(1)
print("LOADED")
sys.exit(2)
"""


def test_load_under_an_address_space_limit_names_the_tensor(tmp_path: Path) -> None:
    """A real limit (RLIMIT_AS) too small for one tensor: a typed error naming it and its bytes."""
    big = 512 << 20
    path = tmp_path / "store" / "big"
    ckptguard.save({"small": torch.ones(4), "huge": torch.zeros(big // 4)}, path)
    proc = run_command(
        [sys.executable, "-c", _LOAD_UNDER_LIMIT, path], 300, env={"MALLOC_ARENA_MAX": "1"}
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"OOM huge {big} host |"), proc.stdout
    assert "'huge'" in proc.stdout and str(big) in proc.stdout


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 48 bytes."),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 48 bytes"),
        MemoryError(),
    ],
    ids=["torch-cpu", "torch-device", "numpy"],
)
def test_an_allocation_failure_on_load_is_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    import numpy as np

    path = tmp_path / "ck"
    ckptguard.save({"a": torch.ones(3, 4), "n": np.ones(6)}, path)

    real = {torch: torch.empty, np: np.empty}

    def failing_in_place(lib: Any) -> Any:
        # Only the tensors' own allocations fail: the index checks allocate small arrays too,
        # and the claim here is about the memory a tensor needs.
        def failing(*args: Any, **kw: Any) -> Any:
            if sys._getframe(1).f_globals.get("__name__") == "ckptguard.place":
                raise exc
            return real[lib](*args, **kw)

        return failing

    monkeypatch.setattr(torch, "empty", failing_in_place(torch))
    monkeypatch.setattr(np, "empty", failing_in_place(np))
    with pytest.raises(ckptguard.OutOfMemoryError) as info:
        ckptguard.load(path)
    assert isinstance(info.value, ckptguard.CheckpointError) and isinstance(info.value, MemoryError)
    assert info.value.key in ("a", "n") and info.value.nbytes == 48
    assert repr(info.value.key) in str(info.value) and "48 bytes" in str(info.value)


def test_other_allocator_errors_are_not_called_out_of_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ck"
    ckptguard.save({"a": torch.ones(3)}, path)

    def failing(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("invalid device ordinal")

    monkeypatch.setattr(torch, "empty", failing)
    with pytest.raises(RuntimeError, match="invalid device ordinal") as info:
        ckptguard.load(path)
    assert not isinstance(info.value, ckptguard.CheckpointError)
