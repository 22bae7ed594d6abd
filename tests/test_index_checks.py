"""The index checks (format.md section 4) give one verdict whatever the order of the rows and
however the row-local rules are cut into blocks.

Rank 0 checks ten million rows per save at scale, so the checks take shortcuts: row-local rules
run a block of rows at a time (``placement.BLOCK``), placement skips its sort when the rows are
already in file order, and shards are ordered by tensor alone when each tensor's rows already
come in order of start. These tests hold the shortcuts to the plain answer: the same error (the
same first bad row) with blocks of one row or of a few as with one block, and the same grids and
the same rule broken when the rows are shuffled.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from ckptguard.format import locator, placement, validate
from ckptguard.format.datafile import FormatError
from ckptguard.format.index import SCHEMA

RANKS, TENSORS, ROWS, COLS = 5, 4, 2, 3
RECORD = 4096  # a 24-byte record with its header, aligned


def _tensors() -> list[dict[str, Any]]:
    return [
        {"key": f"t{t}", "dtype": "float32", "shape": [RANKS * ROWS, COLS]} for t in range(TENSORS)
    ]


def _rows() -> list[dict[str, Any]]:
    """What a save of RANKS ranks writes: each rank a ROWS-row shard of every tensor, one
    record each, in its own file, rank after rank and tensor after tensor."""
    out = []
    for r in range(RANKS):
        for t in range(TENSORS):
            out.append(
                {
                    "key": f"t{t}",
                    "tensor": t,
                    "dtype": "float32",
                    "global_shape": [RANKS * ROWS, COLS],
                    "shard_offsets": [r * ROWS, 0],
                    "shard_lengths": [ROWS, COLS],
                    "chunk": 0,
                    "shard_byte_offset": 0,
                    "raw_len": ROWS * COLS * 4,
                    "rank": r,
                    "file": f"rank-{r:05d}.ckg",
                    "offset": RECORD * (1 + t),
                    "stored_len": ROWS * COLS * 4,
                    "codec": "raw",
                    "elem_size": 4,
                    "hash": bytes(16),
                    "base": None,
                    "key_id": None,
                }
            )
    return out


FILES = {f"rank-{r:05d}.ckg": RECORD * (2 + TENSORS) for r in range(RANKS)}


def _check(rows: list[dict[str, Any]]) -> validate.Shards | None:
    return validate.check_table(pa.Table.from_pylist(rows, schema=SCHEMA), _tensors(), FILES, set())


def _set(i: int, **changes: Any) -> Callable[[list[dict]], None]:
    def mut(rows: list[dict]) -> None:
        rows[i].update(changes)

    return mut


def _split(rows: list[dict]) -> None:
    """Row 7's shard in two chunks (rows 7 and a new last row), its records one after another:
    valid, and not the every-shard-one-chunk path."""
    half = ROWS * COLS * 2
    rows[7].update(raw_len=half, stored_len=half)
    file_rows = [r for r in rows if r["file"] == rows[7]["file"]]
    rows.append(
        dict(
            rows[7],
            chunk=1,
            shard_byte_offset=half,
            offset=max(r["offset"] for r in file_rows) + RECORD,
        )
    )


# Mutations of the save above: None, the save is valid; otherwise what the checks must say.
CASES: dict[str, tuple[Callable[[list[dict]], Any], str | None]] = {
    "valid": (lambda rows: None, None),
    "valid_split_shard": (_split, None),
    "elem_size_mid": (_set(9, elem_size=2), "elem_size does not match"),
    "raw_len_last": (_set(-1, raw_len=7, stored_len=7), "bad raw_len"),
    "offset_unaligned_mid": (_set(11, offset=RECORD * 2 + 8), "not aligned"),
    "extent_past_end": (_set(3, offset=RECORD * (2 + TENSORS)), "past the end"),
    "stored_len_raw": (_set(6, stored_len=8), "stored_len != raw_len"),
    "compressed_longer": (_set(6, codec="shuffle-lz4"), "compressed chunk with bad stored_len"),
    "outside_tensor": (_set(13, shard_offsets=[RANKS * ROWS - 1, 0]), "outside the tensor"),
    "global_shape": (_set(14, global_shape=[RANKS * ROWS, COLS + 1]), "global_shape disagrees"),
    "key": (_set(15, key="t0"), "key disagrees"),
    "record_gap": (_set(11, offset=RECORD * (2 + TENSORS - 1)), "does not follow"),
    "record_twice": (_set(5, offset=RECORD), "does not follow"),
    "shard_twice": (_set(6, shard_offsets=[0, 0]), "not numbered from 0"),
    "shard_overlap": (_set(6, shard_offsets=[1, 0]), "overlap or leave a gap"),
    "chunk_numbering": (_set(8, chunk=1), "not numbered from 0"),
}


def _verdict(rows: list[dict]) -> str | None:
    try:
        _check(rows)
    except FormatError as e:
        return str(e)
    return None


def _case(name: str) -> list[dict]:
    rows = _rows()
    CASES[name][0](rows)
    return rows


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_case_gets_its_verdict(name: str) -> None:
    """The cases themselves: valid saves pass, each broken one fails on its rule."""
    verdict, expected = _verdict(_case(name)), CASES[name][1]
    if expected is None:
        assert verdict is None
    else:
        assert verdict is not None and expected in verdict, verdict


@pytest.mark.parametrize("block", [1, 3, 7])
@pytest.mark.parametrize("name", sorted(CASES))
def test_blocks_of_any_size_give_the_same_verdict(
    name: str, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut into blocks of 1, 3 or 7 rows, every check names the same first bad row."""
    whole = _verdict(_case(name))
    monkeypatch.setattr(placement, "BLOCK", block)
    assert _verdict(_case(name)) == whole


def _grids(shards: validate.Shards | None) -> list:
    return [
        None if g is None else ([c.tolist() for c in g[0]], g[1].tolist())
        for g in locator.grids(shards, _tensors())
    ]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", sorted(CASES))
def test_row_order_does_not_change_the_verdict(name: str, seed: int) -> None:
    """Shuffled rows (neither in file order nor each tensor's in order of start) break the same
    rule, and a valid save gives the same grids."""
    rows = _case(name)
    shuffled = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    a, b = _verdict(rows), _verdict(shuffled)
    if a is None:
        assert b is None
        assert _grids(_check(shuffled)) == _grids(_check(rows))
    else:
        assert b is not None
        strip = re.compile(r"^index row \d+ \([^)]*\): ")
        assert strip.sub("", a) == strip.sub("", b)


@pytest.mark.parametrize("tensors", [3, 1 << 16, (1 << 16) + 1])
def test_order_by_tensor_then_start_is_the_sort(tensors: int) -> None:
    """The radix-sort shortcut gives the full sort's order, ties kept in row order, whether
    starts come in order per tensor (the shortcut) or not (the fallback)."""
    rng = np.random.default_rng(tensors)
    n = 5000
    tid = rng.integers(0, min(tensors, 50), n).astype(np.int32)
    tid[-1] = tensors - 1
    for start in (
        np.arange(n, dtype=np.int64) // 3,  # in order per tensor, with ties
        rng.integers(0, 40, n).astype(np.int64),  # not
    ):
        order, t_s, s_s = validate._by_tensor_then_start(tid, start, tensors)
        want = placement.sort_order(tid, start)
        assert np.array_equal(order, want)
        assert np.array_equal(t_s, tid[want]) and np.array_equal(s_s, start[want])


def test_file_order_shortcut_only_when_in_order() -> None:
    """Rows in file and offset order index as they are; any other order is sorted."""
    f = np.array([0, 0, 1, 1], dtype=np.int32)
    o = np.array([4096, 8192, 4096, 8192])
    assert placement.order_or_as_is(f, o) == slice(None)
    order = placement.order_or_as_is(f[::-1].copy(), o)
    assert isinstance(order, np.ndarray) and order.tolist() == [2, 3, 0, 1]
