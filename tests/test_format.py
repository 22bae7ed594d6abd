"""format/manifest.py and format/validate.py: the rules of format.md sections 3 and 4 as load and
verify apply them. A manifest damaged or well signed but wrong, a newer format or an unknown
feature, index rows re-signed so they reach the deep checks (paths outside the directory, '..',
absolute, negative or overlapping ranges, wrong sizes, unknown codecs and dtypes): each is a typed
error, no file outside the checkpoint is opened, and nothing changes. Damage that a hash already
catches (flipped bytes, truncations) is tests/test_corruption.py's."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import independent_reader as ir
import pyarrow as pa
import pytest
import torch
from conftest import (
    assert_refused,
    commit_one,
    opened_outside,
    record_opens,
    resign_manifest,
    rewrite_index,
    rewrite_rows,
    small_state,
    snapshot,
)

import ckptguard

DATA = "rank-00000.ckg"

# ------------------------------------------------------------------ manifests (section 3)


def _set(member: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mut(body: dict[str, Any]) -> None:
        body[member] = value

    return mut


def _drop(member: str) -> Callable[[dict[str, Any]], None]:
    def mut(body: dict[str, Any]) -> None:
        del body[member]

    return mut


GARBLED: dict[str, Callable[[str], None]] = {
    "random": lambda d: Path(d, ir.MANIFEST).write_bytes(os.urandom(300)),
    "plain_json": lambda d: Path(d, ir.MANIFEST).write_bytes(b'{"format": "ckptguard"}\n'),
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


# ------------------------------------------------------------------ hostile index rows (section 4)


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


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_index(name: str, store: str) -> None:
    """Re-signed index rows that break section 4: CorruptCheckpointError, nothing outside read."""
    d = commit_one(store)
    HOSTILE[name](d)
    before = snapshot(os.path.dirname(store), staging=True)
    with record_opens() as opened:
        assert_refused(d, ckptguard.CorruptCheckpointError)
    assert not opened_outside(opened, d), opened
    with pytest.raises(ir.SpecViolation):
        ir.read_checkpoint(d)
    assert snapshot(os.path.dirname(store), staging=True) == before
