"""The rank report wire format (ckptguard.report): messages, Arrow parts, the merged object
trees and the CheckpointInfo JSON of an outcome."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pyarrow as pa
import pytest

from ckptguard.errors import CheckpointWarning
from ckptguard.format import ranktrees
from ckptguard.format.manifest import CheckpointInfo
from ckptguard.report import (
    dump_json,
    from_ipc,
    info_from_json,
    info_to_json,
    merge_trees,
    pack,
    pack_report,
    to_ipc,
    unpack,
    unpack_report,
)


def test_pack_round_trip() -> None:
    doc, parts = unpack(pack({"ok": True, "n": [1, 2]}, b"", b"abc", bytes(range(256))))
    assert doc == {"ok": True, "n": [1, 2]}
    assert [bytes(p) for p in parts] == [b"", b"abc", bytes(range(256))]
    assert unpack(pack({"ok": False})) == ({"ok": False}, [])


def test_tables_travel_as_arrow_ipc() -> None:
    table = pa.table({"a": [1, 2, 3], "b": ["x", None, "z"]})
    assert from_ipc(to_ipc(table)).equals(table)
    doc, rows = unpack_report(pack_report({"ok": True}, table))
    assert doc == {"ok": True} and rows is not None and rows.equals(table)
    assert unpack_report(pack_report({"ok": False}, None)) == ({"ok": False}, None)


def test_dump_json_refuses_nan() -> None:
    assert dump_json({"a": [1, "x"]}) == b'{"a":[1,"x"]}'
    with pytest.raises(ValueError):
        dump_json(float("nan"))


def _descs(keys: list[list[str]]) -> list[pa.Table]:
    return [pa.table({"key": pa.array(k, pa.string())}) for k in keys]


def test_merge_trees() -> None:
    t0 = {"w": {"$tensor": 0}, "b": {"$tensor": 1}, "rank": 0}
    t1 = {"w": {"$tensor": 0}, "b": {"$tensor": 1}, "rank": 1}
    swapped = {"w": {"$tensor": 1}, "b": {"$tensor": 0}, "rank": 2}  # keys in another order
    blobs = [memoryview(dump_json(t)) for t in (t0, t0, t1, swapped)]
    descs = _descs([["w", "b"], ["w", "b"], ["w", "b"], ["b", "w"]])
    tree0, diffs = merge_trees(blobs, descs, ["w", "b"])
    assert tree0 == t0 and set(diffs) == {"2", "3"}  # rank 1's tree equals rank 0's
    doc = {"tree": tree0, "rank_trees": diffs, "features": [ranktrees.RANK_TREE_DIFFS]}
    assert ranktrees.rank_tree(doc, 2) == t1
    assert ranktrees.rank_tree(doc, 3) == {"w": {"$tensor": 0}, "b": {"$tensor": 1}, "rank": 2}


def test_info_json_round_trip() -> None:
    info = CheckpointInfo(
        "a", "/s/a", "0" * 32, 3, dt.datetime(2026, 1, 2, 3, 4, 5, 6, dt.timezone.utc),
        2, 5, 7, 100, 80, 2, metadata={"k": [1]},
    )  # fmt: skip
    doc = json.loads(json.dumps(info_to_json(info)))
    assert info_from_json(doc) == info and info_from_json(doc).metadata == {"k": [1]}
    late = info_to_json(dataclasses.replace(info, warnings=("LATEST was not moved",)))
    with pytest.warns(CheckpointWarning, match="LATEST was not moved"):
        back = info_from_json(late)
    assert back.warnings == ("LATEST was not moved",)
