"""A data file's footer written from the index columns is the JSON of its rows, byte for byte.

``index.footer`` writes the footer text column by column; ``Row.to_json`` + ``pack_footer`` (one
dict per row, through ``json.dumps``) define it. Keys with quotes, backslashes, control
characters and non-ASCII text, 0-d and n-d shapes, null and set optional columns, packed and
plain tables must give the same bytes.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from ckptguard.format.datafile import pack_footer
from ckptguard.format.index import Row, footer, is_packed, to_table

pytestmark = pytest.mark.backend_independent

KEYS = ['a"b', "back\\slash", "ctl\x00\x1f\x7f", "tab\tnl\n", "ünïcode/€/𝄞", "", "$x", "plain"]


def _rows(packed: bool) -> list[Row]:
    rows = []
    for i, key in enumerate(KEYS):
        shape = [(), (3,), (2, 5, 7), (1 << 40,)][i % 4]
        rows.append(
            Row(
                key,
                i,
                "float32",
                shape,
                (0,) * len(shape),
                shape,
                0,
                0,
                8,
                0,
                "rank-00000.ckd",
                4096 * (i // 2 if packed else i + 1),
                8,
                "raw",
                4,
                bytes(range(i, i + 16)),
                base="prev-ckpt" if i == 3 else None,
                key_id="k\u00e9y" if i == 5 else None,
                record_byte_offset=8 * (i % 2) if packed else 0,
                record_raw_len=16 if packed else 0,
            )
        )
    return rows


@pytest.mark.parametrize("packed", [False, True])
def test_footer_from_columns_is_the_json_of_its_rows(packed: bool) -> None:
    rows = _rows(packed)
    table = to_table(rows)
    assert is_packed(table) == packed
    want = pack_footer(3, "ab" * 16, [r.to_json(packed) for r in rows])
    assert footer(3, "ab" * 16, table, packed) == want


def test_footer_of_no_rows() -> None:
    table = to_table([])
    assert footer(0, "cd" * 16, table, False) == pack_footer(0, "cd" * 16, [])


@pytest.mark.parametrize("packed", [False, True])
def test_footer_of_a_slice_or_chunked_table(packed: bool) -> None:
    rows = _rows(packed)
    table = to_table(rows)
    want = pack_footer(1, "ef" * 16, [r.to_json(packed) for r in rows[2:6]])
    assert footer(1, "ef" * 16, table.slice(2, 4), packed) == want
    chunked = pa.concat_tables([table.slice(2, 1), table.slice(3, 3)])
    assert chunked.column("key").num_chunks == 2
    assert footer(1, "ef" * 16, chunked, packed) == want


def test_footer_of_many_rows_with_few_distinct_strings() -> None:
    """Columns with few distinct values (dtype, file, codec, base) are written once per value
    and then repeated: still the JSON of each row, escapes and nulls included."""
    rows = []
    for i in range(200):
        shape = (i % 5,) * (i % 3)
        rows.append(
            Row(
                KEYS[i % len(KEYS)] + str(i),
                i,
                ["float32", 'odd"dtype', "bfloat16"][i % 3],
                shape,
                (0,) * len(shape),
                shape,
                i % 2,
                i,
                8,
                1,
                "rank-00001.ckd",
                4096 * (i // 10),
                8,
                ["raw", "lz4"][i // 10 % 2],
                [4, 2][i % 2],
                bytes([i % 256] * 16),
                base=None if i % 4 else "tab\there",
                key_id=None,
                record_byte_offset=8 * (i % 10),
                record_raw_len=80,
            )
        )
    table = to_table(rows)
    want = pack_footer(1, "ef" * 16, [r.to_json(True) for r in rows])
    assert footer(1, "ef" * 16, table, True) == want
