"""Drain (multi-level checkpointing): copy committed checkpoints from a staging store to
a durable one, verified, committed atomically, LATEST moved forward only."""

from __future__ import annotations

import errno
import os
import stat
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from conftest import run_command, small_state
from threadcoord import ThreadCoordinator, run_ranks

import ckptguard
from ckptguard.drain import DrainConflictError, drain, lustre, stripe_count
from ckptguard.drain import copy as drain_copy
from ckptguard.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StoreError,
)
from ckptguard.format.layout import LATEST, STAGING

# ---- helpers -----------------------------------------------------------------------------------


def equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(equal, a, b))
    return a == b


def save(root: Path, name: str, seed: int, **kw: object) -> dict:
    state = small_state(seed)
    ckptguard.save(state, str(root / name), step=seed, chunk_size=4096, **kw)
    return state


def visible(root: Path) -> list[str]:
    """Everything of a store but its staging area, its events (the saves' records) and the
    transient LATEST temporaries."""
    if not root.exists():
        return []
    hidden = (STAGING, ".events")
    return sorted(n for n in os.listdir(root) if n not in hidden and not n.startswith(".LATEST."))


def staging_left(root: Path) -> list[str]:
    st = root / STAGING
    return sorted(os.listdir(st)) if st.exists() else []


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """(inode, mtime_ns, bytes) of every committed file, to show a store did not change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != STAGING]
        for n in filenames:
            p = Path(dirpath, n)
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_ino, st.st_mtime_ns, p.read_bytes())
    return out


def flip_payload_byte(ckpt: Path, key: str) -> None:
    import pyarrow.parquet as pq

    rows = [r for r in pq.read_table(ckpt / "index.parquet").to_pylist() if r["key"] == key]
    row = rows[0]
    pos = row["offset"] + 64 + row["stored_len"] // 2
    with open(ckpt / row["file"], "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ 0xFF]))


def save_sharded(path: Path, ranks: int = 4, rows: int = 64) -> torch.Tensor:
    """A ``ranks``-file checkpoint of one row-sharded tensor; returns the global tensor."""
    full = torch.arange(rows * 256, dtype=torch.float32).reshape(rows, 256)
    per = rows // ranks

    def rank_main(coord: ThreadCoordinator) -> None:
        r = coord.rank
        piece = full[r * per : (r + 1) * per].clone()
        state = {"w": ckptguard.Shard(piece, (rows, 256), (r * per, 0)), "step": 7}
        ckptguard.save(state, str(path), step=7, chunk_size=4096, coordinator=coord)

    run_ranks(ranks, rank_main, abort_on_error=True)
    return full


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A staging store with step-1 and step-2 (LATEST)."""
    root = tmp_path / "fast"
    save(root, "step-1", 1)
    save(root, "step-2", 2)
    return root


@pytest.fixture
def dst(tmp_path: Path) -> Path:
    return tmp_path / "durable"


# ---- the copy ----------------------------------------------------------------------------------


def test_drain_copies_verifies_and_moves_latest(src: Path, dst: Path) -> None:
    seen = []
    out = drain(src, dst, on_drained=lambda i, n, s: seen.append((i.name, n, s)))
    assert [i.name for i in out] == ["step-1", "step-2"]  # oldest first
    assert [i.path for i in out] == [str(dst / "step-1"), str(dst / "step-2")]
    assert [n for n, _, _ in seen] == ["step-1", "step-2"]
    for name, nbytes, secs in seen:
        assert nbytes == sum(p.stat().st_size for p in (src / name).iterdir()) and secs >= 0
        assert ckptguard.verify(dst / name).ok
        # a byte-for-byte replica: same uuid, same created, same files
        for f in (src / name).iterdir():
            assert (dst / name / f.name).read_bytes() == f.read_bytes()
    assert (dst / LATEST).read_text() == "step-2\n"
    assert equal(ckptguard.load(str(dst)), small_state(2))
    assert equal(ckptguard.load(str(dst / "step-1")), small_state(1))
    assert staging_left(dst) == []
    assert [i.uuid for i in ckptguard.Store(dst).list()] == [
        i.uuid for i in ckptguard.Store(src).list()
    ]


def test_second_drain_copies_nothing(src: Path, dst: Path) -> None:
    drain(src, dst)
    before = snapshot(dst)
    assert drain(src, dst) == []
    assert snapshot(dst) == before


def test_new_checkpoints_only_and_latest_only_forward(src: Path, dst: Path) -> None:
    drain(src, dst, names=["step-2"])
    assert visible(dst) == ["LATEST", "step-2"]
    out = drain(src, dst, names=["step-1"])  # older than DST's LATEST: LATEST stays
    assert [i.name for i in out] == ["step-1"]
    assert (dst / LATEST).read_text() == "step-2\n"
    save(src, "step-3", 3)
    assert [i.name for i in drain(src, dst)] == ["step-3"]  # only what DST lacks
    assert (dst / LATEST).read_text() == "step-3\n"


def test_rerun_completes_latest_after_a_crash_after_rename(src: Path, dst: Path) -> None:
    drain(src, dst, names=["step-1"])
    drain(src, dst, names=["step-2"])
    (dst / LATEST).write_text("step-1\n")  # as if killed between the rename and LATEST
    assert drain(src, dst) == []
    assert (dst / LATEST).read_text() == "step-2\n"


def test_multi_file_checkpoint_in_parallel_pieces(tmp_path: Path, monkeypatch) -> None:
    full = save_sharded(tmp_path / "fast" / "sharded", ranks=4)
    monkeypatch.setattr(drain_copy, "PIECE_BYTES", 3 * 4096)  # several pieces per file
    monkeypatch.setattr(drain_copy, "BLOCK_BYTES", 4096)  # several blocks per piece
    (info,) = drain(tmp_path / "fast", tmp_path / "durable", jobs=8)
    assert info.files == 4
    src_dir, dst_dir = tmp_path / "fast" / "sharded", tmp_path / "durable" / "sharded"
    assert sorted(os.listdir(dst_dir)) == sorted(os.listdir(src_dir))
    for f in src_dir.iterdir():
        assert (dst_dir / f.name).read_bytes() == f.read_bytes()
    assert ckptguard.verify(dst_dir).ok
    assert torch.equal(ckptguard.load(str(dst_dir))["w"], full)


# ---- refusals ----------------------------------------------------------------------------------


def test_corrupt_source_is_refused_and_dst_unchanged(src: Path, dst: Path) -> None:
    drain(src, dst, names=["step-1"])
    before = snapshot(dst)
    flip_payload_byte(src / "step-2", "model/w")
    with pytest.raises(CorruptCheckpointError) as ei:
        drain(src, dst)
    e = ei.value
    assert e.file == "rank-00000.ckg" and e.key == "model/w" and e.chunk is not None
    assert e.path == str(src / "step-2")
    assert "source checkpoint is damaged" in str(e)
    assert snapshot(dst) == before and visible(dst) == ["LATEST", "step-1"]
    ckptguard.Store(dst).gc(older_than=0)
    assert staging_left(dst) == []


def test_name_conflict(src: Path, dst: Path) -> None:
    save(dst, "step-2", 99)  # same name, another checkpoint
    before = snapshot(dst)
    with pytest.raises(DrainConflictError) as ei:
        drain(src, dst)
    e = ei.value
    assert isinstance(e, CheckpointExistsError)
    src_uuid = ckptguard.Store(src).latest().uuid
    dst_uuid = ckptguard.Store(dst).latest().uuid
    assert e.src_uuid == src_uuid and e.dst_uuid == dst_uuid
    assert src_uuid in str(e) and dst_uuid in str(e)
    assert str(src / "step-2") in str(e) and str(dst / "step-2") in str(e)
    assert snapshot(dst) == before  # nothing copied, not even the step-1 without conflict
    out = drain(src, dst, overwrite=True)
    assert [i.name for i in out] == ["step-1", "step-2"]
    assert ckptguard.Store(dst).latest().uuid == src_uuid
    assert equal(ckptguard.load(str(dst / "step-2")), small_state(2))
    assert staging_left(dst) == []  # the replaced checkpoint was removed


@pytest.mark.parametrize("jobs", [1, 4])
def test_interrupted_drain_leaves_nothing_visible(tmp_path: Path, monkeypatch, jobs) -> None:
    save_sharded(tmp_path / "fast" / "sharded", ranks=4)
    dst = tmp_path / "durable"
    save(dst, "old", 1)
    before = snapshot(dst)
    real = drain_copy.CheckpointCopier.copy
    calls = []
    lock = threading.Lock()

    def copy_then_fail(self, piece) -> None:  # noqa: ANN001
        with lock:
            if len(calls) >= 2:  # 2 of the 5 files (4 data files, the index) are copied
                raise OSError(errno.EIO, "injected EIO")
            calls.append(piece.file.name)
        real(self, piece)

    monkeypatch.setattr(drain_copy.CheckpointCopier, "copy", copy_then_fail)
    with pytest.raises(StoreError, match="injected EIO"):
        drain(tmp_path / "fast", dst, jobs=jobs)
    assert len(calls) == 2
    assert snapshot(dst) == before and visible(dst) == ["LATEST", "old"]
    assert [i.name for i in ckptguard.Store(dst).list()] == ["old"]
    ckptguard.Store(dst).gc(older_than=0)
    assert staging_left(dst) == []
    monkeypatch.setattr(drain_copy.CheckpointCopier, "copy", real)
    assert [i.name for i in drain(tmp_path / "fast", dst)] == ["sharded"]


CHILD = textwrap.dedent(
    """
    import sys
    from ckptguard.drain import drain
    drain(sys.argv[1], sys.argv[2], jobs=1)
    """
)


@pytest.mark.parametrize("point", ["drain.piece_copied", "drain.verified"])
def test_killed_drain_is_reclaimed_by_gc(src: Path, dst: Path, point: str) -> None:
    proc = run_command(
        [sys.executable, "-c", CHILD, src, dst], 120, env={"CKPTGUARD_FAILPOINT": f"{point}:*:kill"}
    )
    assert proc.returncode == -9, proc.stderr
    assert visible(dst) == [] and ckptguard.Store(dst).list() == []
    assert len(staging_left(dst)) == 1  # the torn drain, as a save's
    removed = ckptguard.Store(dst).gc(older_than=0)
    assert len(removed) == 1 and staging_left(dst) == []
    assert [i.name for i in drain(src, dst)] == ["step-1", "step-2"]


def test_symlinked_file_in_source_is_refused(src: Path, dst: Path, tmp_path: Path) -> None:
    data = src / "step-2" / "rank-00000.ckg"
    outside = tmp_path / "elsewhere.ckg"
    outside.write_bytes(data.read_bytes())  # the same bytes, but outside the checkpoint
    data.unlink()
    data.symlink_to(outside)
    with pytest.raises(CorruptCheckpointError) as ei:
        drain(src, dst)
    assert ei.value.file == "rank-00000.ckg" and "symbolic link" in str(ei.value)
    assert "step-2" not in visible(dst)
    ckptguard.Store(dst).gc(older_than=0)
    assert staging_left(dst) == []


def test_symlinked_checkpoint_directory_is_not_a_candidate(src: Path, dst: Path) -> None:
    (src / "linked").symlink_to(src / "step-1", target_is_directory=True)
    with pytest.raises(CheckpointNotFoundError):
        drain(src, dst, names=["linked"])
    assert [i.name for i in drain(src, dst)] == ["step-1", "step-2"]
    assert "linked" not in visible(dst)


def test_bad_arguments(src: Path, dst: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        drain(src, dst, names=["step-9"])
    with pytest.raises(StoreError, match="same store"):
        drain(src, src)
    with pytest.raises(ValueError):
        drain(src, dst, jobs=0)
    with pytest.raises(CheckpointNotFoundError):
        drain(src.parent / "missing", dst)
    assert visible(dst) == []


# ---- Lustre striping ---------------------------------------------------------------------------


def test_stripe_count() -> None:
    gib = 1 << 30
    assert [stripe_count(n) for n in (0, 1, gib, gib + 1, 2 * gib, 15 * gib + 1)] == [
        1,
        1,
        1,
        2,
        2,
        16,
    ]
    assert stripe_count(16 * gib) == 16 and stripe_count(100 * gib) == 16


@pytest.fixture
def fake_lfs(tmp_path: Path, monkeypatch) -> Path:
    """A TEST DOUBLE for Lustre's ``lfs`` (Lustre cannot run here): it logs its arguments, creates
    the file for ``setstripe`` as the real one does, and exits with $FAKE_LFS_RC."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "lfs.log"
    script = bindir / "lfs"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            echo "$*" >> {log}
            if [ "$1" = setstripe ]; then : > "$4"; fi
            exit ${{FAKE_LFS_RC:-0}}
            """
        )
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def logged(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def test_setstripe_only_when_the_check_says_lustre(src, dst, fake_lfs, monkeypatch) -> None:
    checked = []
    monkeypatch.setattr(lustre, "on_lustre", lambda path, lfs: checked.append(path) or False)
    drain(src, dst, names=["step-1"])
    assert checked == [str(dst)] and logged(fake_lfs) == []  # not Lustre: lfs never runs

    monkeypatch.setattr(lustre, "on_lustre", lambda path, lfs: True)
    monkeypatch.setattr(lustre, "STRIPE_UNIT", 4096)  # small files, several stripes
    drain(src, dst, names=["step-2"])
    calls = logged(fake_lfs)
    assert len(calls) == 1  # one data file; never index.parquet or MANIFEST.json
    size = (src / "step-2" / "rank-00000.ckg").stat().st_size
    want = str(min(16, -(-size // 4096)))
    assert calls[0][:3] == ["setstripe", "-c", want]
    staged = Path(calls[0][3])
    assert staged.name == "rank-00000.ckg" and staged.parent.parent == dst / STAGING
    assert staged.parent.name.startswith("step-2.")
    assert ckptguard.verify(dst / "step-2").ok

    fake_lfs.unlink()
    save(src, "step-3", 3)
    drain(src, dst, stripe=False)  # --no-stripe
    assert logged(fake_lfs) == []


def test_failed_setstripe_falls_back_to_the_default_layout(src, dst, fake_lfs, monkeypatch):
    monkeypatch.setattr(lustre, "on_lustre", lambda path, lfs: True)
    monkeypatch.setenv("FAKE_LFS_RC", "1")
    assert len(drain(src, dst)) == 2
    assert len(logged(fake_lfs)) == 2
    assert ckptguard.verify(dst / "step-2").ok


def test_lustre_detection(tmp_path: Path, fake_lfs: Path, monkeypatch) -> None:
    lfs = lustre.shutil.which("lfs")
    assert lfs is not None and Path(lfs).parent == tmp_path / "bin"
    # statfs answers (tmp is not Lustre): lfs is not even asked
    assert lustre.on_lustre(str(tmp_path), lfs) is False
    assert lustre.lustre_tool(str(tmp_path)) is None
    assert logged(fake_lfs) == []
    # statfs unavailable: `lfs getstripe -d` decides
    monkeypatch.setattr(lustre, "_statfs_type", lambda path: None)
    assert lustre.on_lustre(str(tmp_path), lfs) is True
    assert logged(fake_lfs) == [["getstripe", "-d", str(tmp_path)]]
    monkeypatch.setenv("FAKE_LFS_RC", "2")
    assert lustre.lustre_tool(str(tmp_path)) is None
    # the magic itself
    monkeypatch.setattr(lustre, "_statfs_type", lambda path: lustre.LUSTRE_SUPER_MAGIC)
    assert lustre.lustre_tool(str(tmp_path)) == lfs
    # no lfs on PATH: nothing to do
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert lustre.lustre_tool(str(tmp_path)) is None
