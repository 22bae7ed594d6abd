"""Bad input gets a typed error and changes nothing: missing or damaged manifests, newer formats,
hostile index rows, invalid names, read-only and full stores, injected I/O errors."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import independent_reader as ir
import pyarrow as pa
import pytest
import torch
from conftest import record_opens, resign_manifest, rewrite_index, rewrite_rows, small_state

import ckptguard

DATA = "rank-00000.ckg"


def commit_one(store: str, name: str = "c1", **kw: Any) -> str:
    """Save a small multi-chunk checkpoint; return its path."""
    path = os.path.join(store, name)
    ckptguard.save(small_state(), path, chunk_size=128, **kw)
    return path


def snapshot(root: str, *, staging: bool = False) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root`` (LATEST included): a file with its size, mtime and a hash of its
    bytes, a symlink with its target, a directory by name. ``.staging`` is left out unless
    ``staging``: a failed save may leave garbage there for gc; a failed read may not even create it.
    """
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if not staging and rel.split(os.sep)[0] == ".staging":
            continue
        for f in dirnames + filenames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                entry: tuple[Any, ...] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                entry = ("dir",)
            else:
                with open(p, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
                entry = ("file", st.st_size, st.st_mtime_ns, digest)
            out[os.path.relpath(p, root)] = entry
    return out


def assert_store_is(store: str, names: list[str], latest: str) -> None:
    """The store holds exactly ``names`` (plus LATEST and .staging), LATEST loads and verifies."""
    s = ckptguard.Store(store)
    assert [i.name for i in s.list()] == names
    assert ir.list_store(store) == sorted(names)
    latest_info = s.latest()
    assert latest_info is not None and latest_info.name == latest
    assert set(os.listdir(store)) - {".staging"} == {*names, "LATEST"}
    ckptguard.load(store)
    assert ckptguard.verify(store).ok
    ir.read_checkpoint(store)


def assert_refused(path: str, error: type[BaseException]) -> None:
    """load raises ``error``; verify raises it too or reports a problem."""
    with pytest.raises(error):
        ckptguard.load(path)
    try:
        report = ckptguard.verify(path)
    except error:
        return
    assert not report.ok and report.problems


# ------------------------------------------------------------------ missing / damaged manifest


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


def test_dir_without_manifest(store: str) -> None:
    d = os.path.join(store, "c1")
    os.makedirs(d)
    Path(d, DATA).write_bytes(b"\0" * 8192)
    before = snapshot(store, staging=True)
    with pytest.raises((ckptguard.CorruptCheckpointError, ckptguard.CheckpointNotFoundError)):
        ckptguard.load(d)
    assert ckptguard.Store(store).list() == []
    assert snapshot(store, staging=True) == before


def _set(member: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mut(body: dict[str, Any]) -> None:
        body[member] = value

    return mut


def _drop(member: str) -> Callable[[dict[str, Any]], None]:
    def mut(body: dict[str, Any]) -> None:
        del body[member]

    return mut


GARBLED: dict[str, Callable[[str], None]] = {
    "empty": lambda d: Path(d, ir.MANIFEST).write_bytes(b""),
    "random": lambda d: Path(d, ir.MANIFEST).write_bytes(os.urandom(300)),
    "plain_json": lambda d: Path(d, ir.MANIFEST).write_bytes(b'{"format": "ckptguard"}\n'),
    "truncated": lambda d: os.truncate(
        Path(d, ir.MANIFEST), os.path.getsize(Path(d, ir.MANIFEST)) // 2
    ),
    "no_newline": lambda d: os.truncate(
        Path(d, ir.MANIFEST), os.path.getsize(Path(d, ir.MANIFEST)) - 1
    ),
    "extra_space": lambda d: Path(d, ir.MANIFEST).write_bytes(
        Path(d, ir.MANIFEST).read_bytes().replace(b'{"checksum":', b'{ "checksum":', 1)
    ),
    "body_not_json": lambda d: Path(d, ir.MANIFEST).write_bytes(ir.frame_manifest(b"{nope")),
    "body_is_list": lambda d: Path(d, ir.MANIFEST).write_bytes(ir.frame_manifest(b"[1,2]")),
    "body_nan": lambda d: resign_manifest(d, _set("metadata", float("nan"))),
    "unknown_member": lambda d: resign_manifest(d, _set("surprise", 1)),
    "missing_tensors": lambda d: resign_manifest(d, _drop("tensors")),
    "missing_index": lambda d: resign_manifest(d, _drop("index")),
    "format_not_ckptguard": lambda d: resign_manifest(d, _set("format", "other")),
    "version_as_string": lambda d: resign_manifest(d, _set("format_version", "1")),
    "world_size_zero": lambda d: resign_manifest(d, _set("world_size", 0)),
    "name_invalid": lambda d: resign_manifest(d, _set("name", "../up")),
    "rank_trees_missing": lambda d: resign_manifest(d, _drop("rank_trees")),
    "rank_trees_rank0": lambda d: resign_manifest(d, _set("rank_trees", {"0": {}})),
    "rank_trees_beyond_world": lambda d: resign_manifest(d, _set("rank_trees", {"1": {}})),
    "rank_trees_not_object": lambda d: resign_manifest(d, _set("rank_trees", [])),
    "uuid_mismatch": lambda d: resign_manifest(d, _set("uuid", "0" * 32)),
    "bad_created": lambda d: resign_manifest(d, _set("created", "yesterday")),
    "tensors_not_list": lambda d: resign_manifest(d, _set("tensors", {})),
    "tree_bad_tensor_id": lambda d: resign_manifest(d, _set("tree", {"x": {"$tensor": 99}})),
    "tree_unknown_tag": lambda d: resign_manifest(d, _set("tree", {"$what": 1})),
    "totals_wrong": lambda d: resign_manifest(
        d, lambda b: b["totals"].__setitem__("chunks", b["totals"]["chunks"] + 1)
    ),
    "file_size_wrong": lambda d: resign_manifest(
        d, lambda b: b["files"][0].__setitem__("size", b["files"][0]["size"] + 4096)
    ),
    "file_missing": lambda d: resign_manifest(d, _set("files", [])),
    "index_hash_wrong": lambda d: resign_manifest(
        d, lambda b: b["index"].__setitem__("xxh3_128", "0" * 32)
    ),
    "index_size_wrong": lambda d: resign_manifest(
        d, lambda b: b["index"].__setitem__("size", b["index"]["size"] - 1)
    ),
    "index_file_path": lambda d: resign_manifest(
        d, lambda b: b["index"].__setitem__("file", "../index.parquet")
    ),
}


@pytest.mark.parametrize("name", sorted(GARBLED))
def test_garbled_manifest(name: str, store: str) -> None:
    """A manifest that is damaged, or well signed but wrong, is CorruptCheckpointError."""
    d = commit_one(store)
    GARBLED[name](d)
    before = snapshot(store, staging=True)
    assert_refused(d, ckptguard.CorruptCheckpointError)
    with pytest.raises(ir.SpecViolation):
        ir.read_checkpoint(d)
    assert snapshot(store, staging=True) == before


def test_renamed_directory_still_loads(store: str) -> None:
    """format.md section 3: the manifest keeps the name it was committed under; a directory
    renamed by hand still loads and verifies."""
    d = commit_one(store)
    moved = os.path.join(store, "renamed")
    os.rename(d, moved)
    assert ckptguard.verify(moved).ok
    assert torch.equal(ckptguard.load(moved)["model"]["w"], small_state()["model"]["w"])
    ir.read_checkpoint(moved)


@pytest.mark.parametrize(
    "mutate",
    [_set("format_version", 2), _set("format_version", 1000)],
    ids=["v2", "v1000"],
)
def test_future_format_version(store: str, mutate: Callable[[dict[str, Any]], None]) -> None:
    d = commit_one(store)
    resign_manifest(d, mutate)
    before = snapshot(store, staging=True)
    assert_refused(d, ckptguard.FormatVersionError)
    with pytest.raises(ir.VersionViolation):
        ir.read_checkpoint(d)
    assert snapshot(store, staging=True) == before


def test_future_version_with_new_members(store: str) -> None:
    """A newer body may have members v1 does not know: still FormatVersionError, not corrupt."""
    d = commit_one(store)

    def mut(body: dict[str, Any]) -> None:
        body["format_version"] = 2
        body["shiny"] = {"new": True}
        del body["totals"]

    resign_manifest(d, mut)
    before = snapshot(store, staging=True)
    assert_refused(d, ckptguard.FormatVersionError)
    assert snapshot(store, staging=True) == before


@pytest.mark.parametrize("features", [["teleport"], ["pickle", "quantum"]])
def test_unknown_feature(store: str, features: list[str]) -> None:
    d = commit_one(store)
    resign_manifest(d, _set("features", features))
    before = snapshot(store, staging=True)
    assert_refused(d, ckptguard.FormatVersionError)
    assert snapshot(store, staging=True) == before


# ------------------------------------------------------------------ hostile index rows


def _rows(fn: Callable[[list[dict[str, Any]]], Any]) -> Callable[[str], None]:
    return lambda d: rewrite_rows(d, fn)


def _row0(**changes: Any) -> Callable[[str], None]:
    def mut(rows: list[dict[str, Any]]) -> None:
        rows[0].update(changes)

    return _rows(mut)


def _file_everywhere(name: str) -> Callable[[str], None]:
    """Point every row and the manifest's file entry at ``name``, with a valid decoy copy of the
    data file where ``name`` would lead if it were followed as a path."""

    def apply(d: str) -> None:
        store = os.path.dirname(d)
        decoy = os.path.normpath(os.path.join(d, name))
        if decoy.startswith(os.path.dirname(store)) and not os.path.exists(decoy):
            os.makedirs(os.path.dirname(decoy), exist_ok=True)
            shutil.copy2(os.path.join(d, DATA), decoy)

        def rows(rs: list[dict[str, Any]]) -> None:
            for r in rs:
                r["file"] = name

        def body(b: dict[str, Any]) -> None:
            b["files"][0]["name"] = name

        rewrite_rows(d, rows, body)

    return apply


def _reshape_tensor(d: str) -> None:
    """Grow one tensor's shape in manifest and index alike: its chunks no longer add up."""
    body = ir.parse_manifest(ir.read_manifest_bytes(d))
    tid = next(i for i, t in enumerate(body["tensors"]) if t["shape"] and t["shape"][0] > 1)

    def rows(rs: list[dict[str, Any]]) -> None:
        for r in rs:
            if r["tensor"] == tid:
                r["global_shape"] = [r["global_shape"][0] + 1, *r["global_shape"][1:]]
                r["shard_lengths"] = [r["shard_lengths"][0] + 1, *r["shard_lengths"][1:]]

    def mbody(b: dict[str, Any]) -> None:
        t = b["tensors"][tid]
        t["shape"] = [t["shape"][0] + 1, *t["shape"][1:]]

    rewrite_rows(d, rows, mbody)


def _retype_dtype(d: str) -> None:
    """An unknown dtype in the manifest and every row of tensor 0."""

    def rows(rs: list[dict[str, Any]]) -> None:
        for r in rs:
            if r["tensor"] == 0:
                r["dtype"] = "float128"

    rewrite_rows(d, rows, lambda b: b["tensors"][0].__setitem__("dtype", "float128"))


def _table(fn: Callable[[pa.Table], pa.Table]) -> Callable[[str], None]:
    return lambda d: rewrite_index(d, fn)


def _second_same_file(rs: list[dict[str, Any]]) -> None:
    rs[1]["offset"] = rs[0]["offset"]


def _swap_offsets(rs: list[dict[str, Any]]) -> None:
    rs[0]["offset"], rs[1]["offset"] = rs[1]["offset"], rs[0]["offset"]


def _not_parquet(d: str) -> None:
    """index.parquet replaced by other bytes, correctly signed in the manifest."""
    data = b"not a parquet file at all" * 10
    Path(d, ir.INDEX).write_bytes(data)

    def fix(b: dict[str, Any]) -> None:
        b["index"]["size"] = len(data)
        b["index"]["xxh3_128"] = ir.xxh3_128_hex(data)

    resign_manifest(d, fix)


HOSTILE: dict[str, Callable[[str], None]] = {
    "file_parent_not_listed": _row0(file="../x.ckg"),
    "file_parent": _file_everywhere("../x.ckg"),
    "file_absolute": _file_everywhere("/etc/passwd"),
    "file_dotdot_chain": _file_everywhere("rank-00000.ckg/../.."),
    "file_resolves_to_itself": _file_everywhere("sub/../rank-00000.ckg"),
    "file_other_rank_name": _file_everywhere("rank-00001.ckg"),
    "offset_negative": _row0(offset=-4096),
    "offset_unaligned": _row0(offset=4097),
    "offset_past_end": _row0(offset=1 << 40),
    "offset_in_header": _row0(offset=0),
    "raw_len_negative": _row0(raw_len=-16, stored_len=-16),
    "raw_len_zero": _row0(raw_len=0, stored_len=0),
    "raw_len_huge": _row0(raw_len=1 << 44, stored_len=1 << 44),
    "stored_len_huge_lz4": _row0(codec="shuffle-lz4", stored_len=(1 << 44) - 1, raw_len=1 << 44),
    "stored_len_negative": _row0(stored_len=-1),
    "shard_length_negative": _rows(
        lambda rs: rs[0].__setitem__("shard_lengths", [-1] * len(rs[0]["shard_lengths"]))
    ),
    "shard_offset_negative": _rows(
        lambda rs: rs[0].__setitem__("shard_offsets", [-1] * len(rs[0]["shard_offsets"]))
    ),
    "shard_dims_wrong": _rows(lambda rs: rs[0].__setitem__("shard_offsets", [0, 0, 0, 0, 0])),
    "overlapping_records": _rows(_second_same_file),
    "records_swapped": _rows(_swap_offsets),
    "raw_len_vs_shape": _reshape_tensor,
    "raw_len_not_elem_multiple": _row0(raw_len=3, stored_len=3),
    "chunk_numbering_gap": _rows(lambda rs: rs[1].__setitem__("chunk", rs[1]["chunk"] + 7)),
    "row_deleted": _rows(lambda rs: rs[1:]),
    "row_duplicated": _rows(lambda rs: [rs[0], *rs]),
    "unknown_codec": _row0(codec="zstd"),
    "unknown_dtype": _retype_dtype,
    "dtype_mismatch": _row0(dtype="int8"),
    "elem_size_wrong": _row0(elem_size=3),
    "tensor_id_out_of_range": _row0(tensor=99),
    "tensor_id_negative": _row0(tensor=-1),
    "key_mismatch": _row0(key="someone/else"),
    "null_key": _row0(key=None),
    "null_offset": _row0(offset=None),
    "base_without_feature": _row0(base="c0"),
    "key_id_without_feature": _row0(key_id="k1"),
    "hash_wrong": _row0(hash=b"\0" * 16),
    "column_dropped": _table(lambda t: t.drop_columns(["elem_size"])),
    "column_extra": _table(lambda t: t.append_column("extra", pa.array([1] * t.num_rows))),
    "column_retyped": _table(
        lambda t: t.set_column(1, "tensor", t.column("tensor").cast(pa.int64()))
    ),
    "not_parquet": _not_parquet,
}


def _opened_outside(opened: list[str], ckpt_dir: str) -> list[str]:
    """Opened paths that leave the checkpoint dir (relative ones are relative to it or a dir_fd
    inside it, so only a '..' component or an absolute path elsewhere leaves it)."""
    bad = []
    for p in opened:
        if os.path.isabs(p):
            q = os.path.normpath(p)
            if (
                q != ckpt_dir
                and not q.startswith(ckpt_dir + os.sep)
                and ("passwd" in p or "x.ckg" in p or p.startswith(os.path.dirname(ckpt_dir)))
            ):
                bad.append(p)
        elif ".." in p.split("/") or "/" in p:
            bad.append(p)
    return bad


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_index(name: str, store: str) -> None:
    """Re-signed index rows that break section 4: CorruptCheckpointError, nothing outside read."""
    d = commit_one(store)
    HOSTILE[name](d)
    before = snapshot(os.path.dirname(store), staging=True)
    with record_opens() as opened:
        assert_refused(d, ckptguard.CorruptCheckpointError)
    assert not _opened_outside(opened, d), opened
    with pytest.raises(ir.SpecViolation):
        ir.read_checkpoint(d)
    assert snapshot(os.path.dirname(store), staging=True) == before


def test_latest_pointing_outside(store: str) -> None:
    """A LATEST naming a path instead of a checkpoint is refused, never followed."""
    commit_one(store)
    decoy = os.path.join(os.path.dirname(store), "elsewhere")
    shutil.copytree(os.path.join(store, "c1"), decoy)
    for text in (b"../elsewhere\n", b"/etc\n", b"..\n", b"\n", b"c1\nc1\n", b"x" * 300 + b"\n"):
        Path(store, "LATEST").write_bytes(text)
        before = snapshot(os.path.dirname(store), staging=True)
        with pytest.raises((ckptguard.CorruptCheckpointError, ckptguard.CheckpointNotFoundError)):
            ckptguard.load(store)
        with pytest.raises((ckptguard.CorruptCheckpointError, ckptguard.CheckpointNotFoundError)):
            ckptguard.Store(store).latest()
        assert snapshot(os.path.dirname(store), staging=True) == before, text


# ------------------------------------------------------------------ missing store, file as store

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


# ------------------------------------------------------------------ names


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


@pytest.mark.parametrize("bad", ["..", "../c1", "c1/x", ""])
def test_delete_invalid_name(store: str, bad: str) -> None:
    commit_one(store)
    before = snapshot(os.path.dirname(store))
    with pytest.raises((ckptguard.InvalidNameError, ckptguard.CheckpointNotFoundError)):
        ckptguard.Store(store).delete(bad)
    assert snapshot(os.path.dirname(store)) == before


def test_existing_name(store: str) -> None:
    commit_one(store)
    before = snapshot(store)
    with pytest.raises(ckptguard.CheckpointExistsError):
        ckptguard.save(small_state(1), os.path.join(store, "c1"))
    assert snapshot(store) == before


# ------------------------------------------------------------------ read-only and full stores


def _sh(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """``mount(opts)`` mounts a fresh tmpfs and returns it; all unmounted at teardown."""
    mounted: list[str] = []

    def mount(opts: str) -> str:
        d = str(tmp_path / f"mnt{len(mounted)}")
        os.mkdir(d)
        if os.geteuid() != 0 or not _sh("mount", "-t", "tmpfs", "-o", opts, "tmpfs", d):
            pytest.skip("needs root and permission to mount a tmpfs")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        _sh("umount", "-l", d)


def _make_read_only(store: str) -> Callable[[], None]:
    """Make ``store`` read-only: a read-only remount when it is a tmpfs mount point (root
    ignores permissions), else chmod. Returns the undo."""
    mnt = os.path.dirname(store)
    if os.geteuid() == 0:
        assert _sh("mount", "-o", "remount,ro", mnt), "remount read-only failed"
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
        ({"compress": "zstd"}, ValueError),
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
