"""index.parquet: one row per chunk (docs/format.md section 4); writing, reading, validation."""

from __future__ import annotations

import io
from dataclasses import dataclass, fields
from json.encoder import encode_basestring

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
    """The rows as an index table: with the ``packed-records`` columns only if some row is a
    slice of a shared record, so that a checkpoint without one is the v1 index exactly."""
    packed = any(r.packed for r in rows)
    schema = PACKED_SCHEMA if packed else SCHEMA
    cols = {name: [getattr(r, name) for r in rows] for name in schema.names}
    return pa.table(cols, schema=schema)


def footer(rank: int, uuid_hex: str, table: pa.Table, packed: bool) -> bytes:
    """The footer of a data file whose index rows are ``table`` (in footer order): the bytes of
    ``pack_footer(rank, uuid_hex, [r.to_json(packed) for r in rows])``, written as JSON text by
    Arrow, column by column, instead of through one dict and three lists per row."""
    names = PACKED_NAMES if packed else FIELD_NAMES
    head = pack_footer(rank, uuid_hex, [])
    assert head.endswith(b"[]}")
    if not table.num_rows:
        return head
    parts: list = []
    for i, n in enumerate(names):
        column = _json_column(table, n).cast(pa.large_string())  # a footer may pass 2 GiB
        parts += [_text(("{" if i == 0 else ",") + encode_basestring(n) + ":"), column]
    parts.append(_text("},"))  # each row's comma: the last one is cut below
    text = pc.binary_join_element_wise(*parts, _text(""))
    offsets = np.frombuffer(text.buffers()[1], dtype=np.int64)[text.offset :]
    data = text.buffers()[2].to_pybytes()[offsets[0] : offsets[len(text)] - 1]
    return head[:-2] + data + b"]}"


def _text(s: str) -> pa.Scalar:
    return pa.scalar(s, pa.large_string())


_ESCAPED = r'[\x00-\x1f"\\]'  # what json.dumps (ensure_ascii=False) escapes in a string


def _json_column(table: pa.Table, name: str) -> pa.Array:
    """Each value of an index column as ``json.dumps`` writes it in a footer, as a string array."""
    col = table.column(name).combine_chunks()
    if name == "hash":
        n = len(col)
        raw = col.buffers()[1].to_pybytes()[16 * col.offset : 16 * (col.offset + n)]
        text = np.full((n, 34), ord('"'), dtype=np.uint8)
        text[:, 1:33] = np.frombuffer(raw.hex().encode(), dtype=np.uint8).reshape(n, 32)
        offsets = np.arange(0, 34 * n + 1, 34, dtype=np.int64)
        return pa.Array.from_buffers(
            pa.large_string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(text)]
        )
    if isinstance(col.type, pa.ListType):
        digits = pc.binary_join(col.cast(pa.list_(pa.string())), ",")
        return pc.binary_join_element_wise("[", digits, "]", "")
    if pa.types.is_string(col.type):
        if pc.any(pc.match_substring_regex(col, _ESCAPED)).as_py():
            col = pa.array(
                [None if v is None else encode_basestring(v)[1:-1] for v in col.to_pylist()],
                pa.string(),
            )
        return pc.binary_join_element_wise('"', col, '"', "").fill_null("null")
    return col.cast(pa.string())


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
