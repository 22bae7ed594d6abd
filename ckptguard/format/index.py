"""index.parquet: one row per chunk (docs/format.md section 4); writing, reading, validation."""

from __future__ import annotations

import io
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from json.encoder import encode_basestring
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .datafile import RECORD_HEADER_SIZE, FormatError, pack_footer
from .layout import align


def int_lists(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 values, per-row lengths) of a list<int64> column."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64)
    return flat, lengths


def int_list_array(seqs: Sequence[Sequence[int]]) -> pa.ListArray:
    """A list<int64> array of ``seqs`` (tuples of ints), built from one flat list of values
    and their lengths (no Python list per row)."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 1 << 31:  # beyond a list array's 32-bit offsets
        return pa.array(list(seqs), pa.list_(pa.int64()))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), np.int64, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat))


SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("tensor", pa.int32()),
        ("dtype", pa.string()),
        ("global_shape", pa.list_(pa.int64())),
        ("shard_offsets", pa.list_(pa.int64())),
        ("shard_lengths", pa.list_(pa.int64())),
        ("chunk", pa.int32()),
        ("shard_byte_offset", pa.int64()),
        ("raw_len", pa.int64()),
        ("rank", pa.int32()),
        ("file", pa.string()),
        ("offset", pa.int64()),
        ("stored_len", pa.int64()),
        ("codec", pa.string()),
        ("elem_size", pa.int32()),
        ("hash", pa.binary(16)),
        ("base", pa.string()),
        ("key_id", pa.string()),
    ]
)
NULLABLE = {"base", "key_id"}
PACKED_RECORDS = "packed-records"
"""Feature: several rows may share one record, each a slice of its raw bytes (format.md 4.1)."""
PACK_COLUMNS = ("record_byte_offset", "record_raw_len")
PACKED_SCHEMA = pa.schema([*SCHEMA, *((name, pa.int64()) for name in PACK_COLUMNS)])
"""The index under ``packed-records``: the v1 columns, then where each row's raw bytes lie in
its record's raw bytes and that record's raw length."""


@dataclass(slots=True)
class Row:
    """One chunk: which tensor bytes it holds and where its record lies."""

    key: str
    tensor: int
    dtype: str
    global_shape: tuple[int, ...]
    shard_offsets: tuple[int, ...]
    shard_lengths: tuple[int, ...]
    chunk: int
    shard_byte_offset: int
    raw_len: int
    rank: int
    file: str
    offset: int
    stored_len: int
    codec: str
    elem_size: int
    hash: bytes
    base: str | None = None
    key_id: str | None = None
    record_byte_offset: int = 0
    """Where this row's raw bytes start in its record's raw bytes (0 unless packed)."""
    record_raw_len: int = 0
    """The raw length of the record holding this row (given as 0: this row's ``raw_len``)."""

    def __post_init__(self) -> None:
        if not self.record_raw_len:
            self.record_raw_len = self.raw_len

    @property
    def packed(self) -> bool:
        """Whether this row is a slice of a record that holds other rows too."""
        return self.record_raw_len != self.raw_len

    def to_json(self, packed: bool = False) -> dict:
        """The row as a footer object (members in column order, hash in hex); ``packed``: with
        the members of ``PACK_COLUMNS`` (a footer of a file that holds a packed record)."""
        d = {name: getattr(self, name) for name in (PACKED_NAMES if packed else FIELD_NAMES)}
        for k in ("global_shape", "shard_offsets", "shard_lengths"):
            d[k] = list(d[k])
        d["hash"] = self.hash.hex()
        return d

    @property
    def extent(self) -> int:
        """End of this record's aligned extent in its file."""
        return align(self.offset + RECORD_HEADER_SIZE + self.stored_len)


PACKED_NAMES = [f.name for f in fields(Row)]
FIELD_NAMES = PACKED_NAMES[: -len(PACK_COLUMNS)]
assert SCHEMA.names == FIELD_NAMES and PACKED_SCHEMA.names == PACKED_NAMES


def is_packed(table: pa.Table) -> bool:
    """Whether an index table has the ``packed-records`` columns."""
    return table.schema.names == PACKED_NAMES


def to_table(rows: list[Row]) -> pa.Table:
    """The rows as an index table (``table_of`` their columns)."""
    return table_of({name: [getattr(r, name) for r in rows] for name in PACKED_NAMES})


def table_of(cols: Mapping[str, Any]) -> pa.Table:
    """An index table from whole columns, one per name of ``PACKED_NAMES`` (each a sequence, a
    numpy array or an Arrow array): with the ``packed-records`` columns only if some row is a
    slice of a shared record, so that a checkpoint without one is the v1 index exactly."""
    arrays = {
        f.name: col if isinstance(col, pa.Array) else pa.array(col, f.type)
        for f in PACKED_SCHEMA
        for col in [cols[f.name]]
    }
    packed = pc.any(pc.not_equal(arrays["record_raw_len"], arrays["raw_len"])).as_py()
    schema = PACKED_SCHEMA if packed else SCHEMA
    return pa.table([arrays[n] for n in schema.names], schema=schema)


def footer(rank: int, uuid_hex: str, table: pa.Table, packed: bool) -> bytes:
    """The footer of a data file whose index rows are ``table`` (in footer order): the bytes of
    ``pack_footer(rank, uuid_hex, [r.to_json(packed) for r in rows])``, written as JSON text
    column by column by Arrow's string kernels instead of through one dict per row."""
    names = PACKED_NAMES if packed else FIELD_NAMES
    parts: list[Any] = []
    for i, name in enumerate(names):
        parts.append(pa.scalar(("{" if i == 0 else ",") + encode_basestring(name) + ":", _TEXT))
        parts.append(_json_column(table.column(name).combine_chunks(), name))
    parts.append(pa.scalar("}", _TEXT))
    rows = pc.binary_join_element_wise(*parts, pa.scalar("", _TEXT))
    whole = pa.LargeListArray.from_arrays(pa.array([0, len(rows)], pa.int64()), rows)
    text = pc.binary_join(whole, pa.scalar(",", _TEXT))[0].as_buffer()
    head = pack_footer(rank, uuid_hex, [])
    assert head.endswith(b"[]}")
    return head[:-2] + (text.to_pybytes() if text is not None else b"") + b"]}"


_TEXT = pa.large_string()  # footers of any size: no 2 GiB limit on one Arrow string array
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_NEEDS_ESCAPE = r'["\\\x00-\x1f]'  # what json.dumps escapes with ensure_ascii=False
_NULL = pa.scalar("null", _TEXT)


def _json_column(col: pa.Array, name: str) -> pa.Array:
    """Each value of an index column as ``json.dumps`` writes it in a footer (``_TEXT``)."""
    if name == "hash":
        return _hex_texts(col)
    if isinstance(col.type, pa.ListType):
        inner = pc.binary_join(pc.cast(col, pa.list_(_TEXT)), pa.scalar(",", _TEXT))
        return pc.binary_join_element_wise(
            pa.scalar("[", _TEXT), inner, pa.scalar("]", _TEXT), pa.scalar("", _TEXT)
        )
    if pa.types.is_string(col.type):
        enc = pc.dictionary_encode(col)
        if len(enc.dictionary) * 2 <= len(col):  # few distinct values (dtype, file, codec)
            return pc.fill_null(_string_texts(enc.dictionary).take(enc.indices), _NULL)
        return pc.fill_null(_string_texts(col), _NULL)
    return pc.cast(col, _TEXT)


def _string_texts(col: pa.Array) -> pa.Array:
    """A string column as JSON strings (nulls stay null)."""
    col = col.cast(_TEXT)
    quote = pa.scalar('"', _TEXT)
    texts = pc.binary_join_element_wise(quote, col, quote, pa.scalar("", _TEXT))
    needs = pc.fill_null(pc.match_substring_regex(col, _NEEDS_ESCAPE), False)
    escape = np.flatnonzero(needs.to_numpy(zero_copy_only=False))
    if len(escape):
        fixed = texts.to_pylist()
        for i in escape.tolist():
            fixed[i] = encode_basestring(col[i].as_py())
        texts = pa.array(fixed, _TEXT)
    return texts


def _hex_texts(col: pa.Array) -> pa.Array:
    """A binary(16) column (no nulls) as quoted lowercase hex texts."""
    n = len(col)
    if not n:
        return pa.array([], _TEXT)
    data = np.frombuffer(col.buffers()[1], dtype=np.uint8)
    raw = data[col.offset * 16 : (col.offset + n) * 16].reshape(n, 16)
    out = np.empty((n, 34), dtype=np.uint8)
    out[:, 0] = out[:, 33] = ord('"')
    out[:, 1:33:2] = _HEX[raw >> 4]
    out[:, 2:33:2] = _HEX[raw & 15]
    offsets = np.arange(0, 34 * (n + 1), 34, dtype=np.int64)
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out))


def unify(tables: list[pa.Table]) -> pa.Table:
    """Concatenate index tables of several ranks: where any has the ``packed-records`` columns,
    the others get them too (each row its own record: offset 0, its own raw length)."""
    if not any(is_packed(t) for t in tables):
        return pa.concat_tables(tables)
    out = []
    for t in tables:
        if not is_packed(t):
            t = t.append_column(
                PACKED_SCHEMA.field(PACK_COLUMNS[0]), pa.array(np.zeros(t.num_rows, np.int64))
            ).append_column(PACKED_SCHEMA.field(PACK_COLUMNS[1]), t.column("raw_len"))
        out.append(t.cast(PACKED_SCHEMA))
    return pa.concat_tables(out)


def write(rows: list[Row]) -> bytes:
    """Serialize rows to Parquet bytes."""
    return write_table(to_table(rows))


def read(data: bytes) -> list[Row]:
    """Parse Parquet bytes into rows, checking the schema and nulls (not the cross-row rules)."""
    return rows_from_table(read_table(data))


def read_table(data: bytes) -> pa.Table:
    """Parse Parquet bytes into a table with exactly the v1 schema (or the v1 schema and the
    ``packed-records`` columns) and no forbidden nulls."""
    try:
        # One thread: Arrow's pool can abort the process at exit beside torch (apache/arrow#34314).
        table = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
        table.validate(full=True)  # e.g. strings that are not UTF-8, which Parquet reads as is
    except Exception as e:  # pyarrow raises many kinds on garbage
        raise FormatError(f"index.parquet cannot be parsed: {e}") from None
    schema = PACKED_SCHEMA if table.schema.names == PACKED_NAMES else SCHEMA
    if table.schema.names != schema.names:
        raise FormatError(
            f"index.parquet has columns {table.schema.names}, expected {SCHEMA.names} "
            f"(or those and {list(PACK_COLUMNS)})"
        )
    for name, field in zip(schema.names, schema, strict=True):
        col = table.column(name)
        same = col.type.equals(field.type) or (
            isinstance(field.type, pa.ListType)
            and isinstance(col.type, pa.ListType)
            and col.type.value_type.equals(field.type.value_type)
        )
        if not same:
            raise FormatError(f"index column {name!r} has type {col.type}, expected {field.type}")
        if name not in NULLABLE and col.null_count:
            raise FormatError(f"index column {name!r} has nulls")
        if isinstance(field.type, pa.ListType) and pc.list_flatten(col).null_count:
            raise FormatError(f"index column {name!r} has nulls")
    return table


def write_table(table: pa.Table) -> bytes:
    """Serialize an index table (already in the v1 schema) to Parquet bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def rows_from_table(table: pa.Table) -> list[Row]:
    """The rows of an index table as ``Row`` objects. Equal shapes and boxes are one tuple
    shared by every row that has them: rows of one shard, and tensors of one shape, add no
    tuples that outlive the call (what the cyclic garbage collector walks on every pass)."""
    names = table.schema.names
    cols = [table.column(n).to_pylist() for n in names]
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
    for name in ("global_shape", "shard_offsets", "shard_lengths"):
        at = names.index(name)
        cols[at] = [shapes.setdefault(t, t) for t in map(tuple, cols[at])]
    return [Row(*vals) for vals in zip(*cols, strict=True)]


def row_from_json(d: object) -> Row:
    """Parse one footer row (same fields as the index, hash in hex; with or without the
    ``packed-records`` members, which the caller checks against the file)."""
    if not isinstance(d, dict) or list(d) not in (FIELD_NAMES, PACKED_NAMES):
        raise FormatError("footer row has unexpected fields")
    try:
        d = dict(d)
        d["hash"] = bytes.fromhex(d["hash"])
        for k in ("global_shape", "shard_offsets", "shard_lengths"):
            d[k] = tuple(d[k])
        return Row(**d)
    except (TypeError, ValueError) as e:
        raise FormatError(f"footer row is malformed: {e}") from None
