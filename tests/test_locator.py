"""The locator (docs/format.md section 4.5): the grid of each tensor's shards and every data
file's footer hash, written by every save without a linked file, checked by every reader of the
index and by the independent reader; hostile locators are refused and change nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import independent_reader as ir
import numpy as np
import pytest
import torch
from conftest import resign_manifest, snapshot
from threadcoord import ThreadCoordinator, run_ranks

import ckptguard
from ckptguard.format import locator
from ckptguard.format.manifest import decode

RANKS = 4


def _body(path: Path) -> dict[str, Any]:
    return decode((path / "MANIFEST.json").read_bytes())


def _grid_of(body: dict, key: str) -> dict | None:
    t = next(i for i, e in enumerate(body["tensors"]) if e["key"] == key)
    ref = body["locator"]["tensors"][t]
    return None if ref is None else body["locator"]["grids"][ref]


def _state(r: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(16, 8, generator=g)
    block = torch.randn(8, 8, generator=g)
    brick = torch.randn(4, 8, generator=g)
    # A layout that is not a grid: rows 0-1 cut at column 4, rows 2-3 at column 6.
    bricks = [((0, 0), (2, 4)), ((0, 4), (2, 4)), ((2, 0), (2, 6)), ((2, 6), (2, 2))]
    (o0, o1), (n0, n1) = bricks[r]
    return {
        "rows": ckptguard.Shard(rows[4 * r : 4 * r + 4].clone(), (16, 8), (4 * r, 0)),
        "block": ckptguard.Shard(
            block[4 * (r // 2) : 4 * (r // 2) + 4, 4 * (r % 2) : 4 * (r % 2) + 4].clone(),
            (8, 8),
            (4 * (r // 2), 4 * (r % 2)),
        ),
        "brick": ckptguard.Shard(brick[o0 : o0 + n0, o1 : o1 + n1].clone(), (4, 8), (o0, o1)),
        "bias": torch.arange(5.0),
        "scale": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "step": 3,
    }


def _save_sharded(path: Path, **options: Any) -> None:
    def rank_main(coord: ThreadCoordinator) -> None:
        ckptguard.save(_state(coord.rank), str(path), coordinator=coord, **options)

    run_ranks(RANKS, rank_main, abort_on_error=True)


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    path = tmp_path / "store" / "ck"
    _save_sharded(path, chunk_size=64)
    return path


def test_a_sharded_save_locates_each_grid_and_hashes_each_footer(sharded: Path) -> None:
    body = _body(sharded)
    assert "locator" in body["features"]
    files = [f["name"] for f in body["files"]]
    assert files == [f"rank-{r:05d}.ckg" for r in range(RANKS)]
    assert _grid_of(body, "rows") == {"cuts": [[0, 4, 8, 12, 16], [0, 8]], "files": [0, 1, 2, 3]}
    assert _grid_of(body, "block") == {"cuts": [[0, 4, 8], [0, 4, 8]], "files": [0, 1, 2, 3]}
    assert _grid_of(body, "brick") is None  # its shards are not the cells of one grid
    assert _grid_of(body, "empty") is None  # no elements, no rows
    bias, scale = _grid_of(body, "bias"), _grid_of(body, "scale")
    assert bias is not None and bias["cuts"] == [[0, 5]] and len(bias["files"]) == 1
    assert scale is not None and scale["cuts"] == [] and len(scale["files"]) == 1
    loc = body["locator"]
    assert len(loc["grids"]) == len({json.dumps(g) for g in loc["grids"]})  # each listed once
    import xxhash

    for name, want in zip(files, loc["footers"], strict=True):
        lay = ir.scan_data_file(str(sharded / name))
        assert xxhash.xxh3_128_hexdigest(lay.footer) == want
    ck = ir.read_checkpoint(str(sharded))  # the independent reader agrees, grid by grid
    assert ck.manifest["locator"] == loc
    assert ckptguard.verify(str(sharded)).ok
    got = ckptguard.load(str(sharded))
    want_state = _state(0)
    assert torch.equal(got["bias"], want_state["bias"]) and got["step"] == 3


def test_grids_agree_with_the_cells_a_box_overlaps(sharded: Path) -> None:
    body = _body(sharded)
    rows = _grid_of(body, "rows")
    block = _grid_of(body, "block")
    assert rows is not None and block is not None
    assert locator.cells(rows, (6, 0), (4, 8)) == [1, 2]  # rows 6-9: cells of ranks 1 and 2
    assert locator.cells(rows, (4, 2), (4, 1)) == [1]
    assert locator.cells(block, (3, 3), (2, 2)) == [0, 1, 2, 3]
    assert locator.cells(block, (0, 4), (4, 4)) == [1]
    assert locator.cells(block, (0, 0), (0, 4)) == []
    assert locator.cells({"cuts": [], "files": [2]}, (), ()) == [0]


def test_digests_add_the_footers_sha256(tmp_path: Path) -> None:
    path = tmp_path / "s" / "d"
    ckptguard.save({"w": torch.randn(64, 4)}, str(path), digests=True)
    loc = _body(path)["locator"]
    import hashlib

    lay = ir.scan_data_file(str(path / "rank-00000.ckg"))
    assert loc["footer_sha256"] == [hashlib.sha256(lay.footer).hexdigest()]
    ir.read_checkpoint(str(path))


def test_an_incremental_save_has_no_locator(tmp_path: Path) -> None:
    s = {"w": torch.randn(256, 64), "v": torch.randn(256, 64)}
    ckptguard.save(s, str(tmp_path / "a"), chunk_size=4096)
    s["v"] += 1
    ckptguard.save(s, str(tmp_path / "b"), chunk_size=4096, base="auto")
    body = _body(tmp_path / "b")
    assert (
        "incremental" in body["features"]
        and "locator" not in body
        and "locator" not in (body["features"])
    )
    assert "locator" in _body(tmp_path / "a")["features"]


def _grid(i: int, **changes: Any) -> Callable[[dict], None]:
    def mut(body: dict) -> None:
        body["locator"]["grids"][i].update(changes)

    return mut


def _ref(key: str, value: Any) -> Callable[[dict], None]:
    def mut(body: dict) -> None:
        t = next(i for i, e in enumerate(body["tensors"]) if e["key"] == key)
        body["locator"]["tensors"][t] = value

    return mut


def _drop_grid(key: str) -> Callable[[dict], None]:
    """Null ``key``'s reference and drop its grid (no other tensor names it here)."""

    def mut(body: dict) -> None:
        loc = body["locator"]
        t = next(i for i, e in enumerate(body["tensors"]) if e["key"] == key)
        gone, loc["tensors"][t] = loc["tensors"][t], None
        del loc["grids"][gone]
        loc["tensors"] = [r if r is None or r < gone else r - 1 for r in loc["tensors"]]

    return mut


def _grid_for_brick(body: dict) -> None:
    t = next(i for i, e in enumerate(body["tensors"]) if e["key"] == "brick")
    body["locator"]["tensors"][t] = len(body["locator"]["grids"])
    body["locator"]["grids"].append({"cuts": [[0, 4], [0, 8]], "files": [0]})


def _swap_files(body: dict) -> None:
    g = _grid_of(body, "rows")
    assert g is not None
    g["files"] = [1, 0, 2, 3]


def _extra_grid(body: dict) -> None:
    body["locator"]["grids"].append({"cuts": [[0, 1]], "files": [0]})


def _short_footers(body: dict) -> None:
    body["locator"]["footers"].pop()


def _no_locator_member(body: dict) -> None:
    del body["locator"]


def _locator_without_feature(body: dict) -> None:
    body["features"].remove("locator")


HOSTILE: dict[str, tuple[Callable[[dict], None], str]] = {
    "cells in other files": (_swap_files, "disagrees with the index"),
    "no grid for a tensor that has one": (_drop_grid("rows"), "exactly if its shards form one"),
    "a grid for a tensor that has none": (_grid_for_brick, "exactly if its shards form one"),
    "a grid of another shape": (_ref("bias", 0), "another shape"),
    "a grid no tensor names": (_extra_grid, "no tensor names"),
    "cuts that do not rise": (_grid(0, cuts=[[0, 8, 4, 12, 16], [0, 8]]), "rise strictly"),
    "a bool for a file": (_grid(0, files=[True, 1, 2, 3]), "one integer per cell"),
    "a file outside files": (_grid(0, files=[0, 1, 2, 9]), "outside manifest.files"),
    "too few cells": (_grid(0, files=[0, 1, 2]), "one integer per cell"),
    "one footer hash too few": (_short_footers, "footers"),
    "the feature without the member": (_no_locator_member, "members"),
    "the member without the feature": (_locator_without_feature, "members"),
    "a reference out of range": (_ref("rows", 99), "grid's position"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_locator_is_refused_and_changes_nothing(sharded: Path, case: str) -> None:
    mutate, message = HOSTILE[case]
    resign_manifest(sharded, mutate)
    store = str(sharded.parent)
    before = snapshot(store, staging=True)
    with pytest.raises(ckptguard.CorruptCheckpointError, match=message):
        ckptguard.load(str(sharded))
    assert not ckptguard.verify(str(sharded)).ok
    with pytest.raises(ir.SpecViolation):
        ir.read_checkpoint(str(sharded))
    assert snapshot(store, staging=True) == before


def test_grids_of_a_table_with_a_shard_split_across_files() -> None:
    """A shard whose rows lie in two files has no grid (a reader of one file would miss
    rows); built from the shards the checks return for such a table."""
    import pyarrow as pa

    from ckptguard.format.index import SCHEMA
    from ckptguard.format.validate import check_table

    tensors = [
        {
            "key": "w",
            "dtype": "float32",
            "shape": [2, 4],
            "kind": "torch",
            "device": "cpu",
            "requires_grad": False,
            "parameter": False,
        }
    ]
    n = 2
    names = ["rank-00000.ckg", "rank-00001.ckg"]
    cols = {
        "key": ["w"] * n,
        "tensor": pa.array([0, 0], pa.int32()),
        "dtype": ["float32"] * n,
        "global_shape": [[2, 4]] * n,
        "shard_offsets": [[0, 0]] * n,
        "shard_lengths": [[2, 4]] * n,
        "chunk": pa.array([0, 1], pa.int32()),
        "shard_byte_offset": [0, 16],
        "raw_len": [16, 16],
        "rank": pa.array([0, 1], pa.int32()),
        "file": names,
        "offset": [4096, 4096],
        "stored_len": [16, 16],
        "codec": ["raw"] * n,
        "elem_size": pa.array([4, 4], pa.int32()),
        "hash": pa.array([b"\0" * 16] * n, pa.binary(16)),
        "base": pa.nulls(n, pa.string()),
        "key_id": pa.nulls(n, pa.string()),
    }
    table = pa.table(cols, schema=SCHEMA)
    shards = check_table(table, tensors, dict.fromkeys(names, 1 << 20), set())
    assert shards is not None and bool(shards.mixed[0])
    assert locator.grids(shards, tensors) == [None]
    # The same shard in one file has its one-cell grid.
    one = table.set_column(table.schema.get_field_index("file"), "file", pa.array(names[:1] * 2))
    one = one.set_column(one.schema.get_field_index("rank"), "rank", pa.array([0, 0], pa.int32()))
    one = one.set_column(one.schema.get_field_index("offset"), "offset", pa.array([4096, 8192]))
    g = locator.grids(check_table(one, tensors, dict.fromkeys(names, 1 << 20), set()), tensors)
    assert g[0] is not None and [c.tolist() for c in g[0][0]] == [[0, 2], [0, 4]]
    assert np.array_equal(g[0][1], [0])
