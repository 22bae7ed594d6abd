"""index.parquet: one row per chunk (docs/format.md section 4); writing, reading, validation."""

from __future__ import annotations

import hashlib
import io
import itertools
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from json.encoder import encode_basestring
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from .datafile import RECORD_HEADER_SIZE, FormatError, pack_footer
from .layout import align


def one_array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """``col`` as one array: its only chunk as it is (``combine_chunks`` copies even one chunk,
    and at ten million rows a copy of a list column is 240 MB of fresh memory)."""
    if not isinstance(col, pa.ChunkedArray):
        return col
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def int_lists(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 values, per-row lengths) of a list<int64> column without nulls. The values
    are a read-only view of the column's buffer where they can be (no copy of the largest
    arrays of an index); the lengths are of the list offsets' type (int32 for a list)."""
    col = one_array(col)
    lengths = np.diff(col.offsets.to_numpy())
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
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
DIGESTS = "digests"
"""Feature: every row has the SHA-256 digest of its record's raw bytes (format.md 4.2)."""
DIGEST = "digest"
DIGEST_BYTES = 32
INCREMENTAL = "incremental"
"""Feature: linked data files of earlier saves, whose rows have a ``base`` (format.md 4.3)."""
FULL_SCHEMA = pa.schema([*PACKED_SCHEMA, (DIGEST, pa.binary(DIGEST_BYTES))])
"""Every column an index may have, in order: the packed-records columns and ``digest`` are
present only under their features."""


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
    digest: bytes | None = None
    """SHA-256 of the record's raw bytes (feature ``digests``); None without the feature."""

    def __post_init__(self) -> None:
        if not self.record_raw_len:
            self.record_raw_len = self.raw_len

    @property
    def packed(self) -> bool:
        """Whether this row is a slice of a record that holds other rows too."""
        return self.record_raw_len != self.raw_len

    def to_json(self, packed: bool = False) -> dict:
        """The row as a footer object (members in column order, hash and digest in hex);
        ``packed``: with the members of ``PACK_COLUMNS`` (a footer of a file that holds a packed
        record); with ``digest`` where the row has one."""
        d = {name: getattr(self, name) for name in names_of(packed, self.digest is not None)}
        for k in ("global_shape", "shard_offsets", "shard_lengths"):
            d[k] = list(d[k])
        d["hash"] = self.hash.hex()
        if self.digest is not None:
            d[DIGEST] = self.digest.hex()
        return d

    @property
    def extent(self) -> int:
        """End of this record's aligned extent in its file."""
        return align(self.offset + RECORD_HEADER_SIZE + self.stored_len)


FIELD_NAMES = SCHEMA.names
PACKED_NAMES = PACKED_SCHEMA.names
assert FULL_SCHEMA.names == [f.name for f in fields(Row)]


def names_of(packed: bool, digests: bool) -> list[str]:
    """The columns of an index with or without the ``packed-records`` and ``digests``
    columns, in order."""
    return (PACKED_NAMES if packed else FIELD_NAMES) + ([DIGEST] if digests else [])


def schema_of(packed: bool, digests: bool) -> pa.Schema:
    """The schema of ``names_of(packed, digests)``."""
    return pa.schema([FULL_SCHEMA.field(n) for n in names_of(packed, digests)])


def is_packed(table: pa.Table) -> bool:
    """Whether an index table has the ``packed-records`` columns."""
    return PACK_COLUMNS[-1] in table.schema.names


def has_digests(table: pa.Table) -> bool:
    """Whether an index table has the ``digest`` column (feature ``digests``)."""
    return DIGEST in table.schema.names


def has_base(table: pa.Table) -> bool:
    """Whether some row of an index table has a ``base``: a row of a linked data file
    (feature ``incremental``)."""
    return table.column("base").null_count < table.num_rows


def to_table(rows: list[Row]) -> pa.Table:
    """The rows as an index table (``table_of`` their columns)."""
    names = PACKED_NAMES + ([DIGEST] if rows and rows[0].digest is not None else [])
    return table_of({name: [getattr(r, name) for r in rows] for name in names})


def table_of(cols: Mapping[str, Any]) -> pa.Table:
    """An index table from whole columns, one per name of ``PACKED_NAMES`` and optionally
    ``digest`` (each a sequence, a numpy array or an Arrow array): with the ``packed-records``
    columns only if some row is a slice of a shared record, so that a checkpoint without one is
    the v1 index exactly; with ``digest`` where it is given."""
    digests = cols.get(DIGEST) is not None
    arrays = {
        name: col if isinstance(col, pa.Array) else pa.array(col, FULL_SCHEMA.field(name).type)
        for name in names_of(True, digests)
        for col in [cols[name]]
    }
    packed = pc.any(pc.not_equal(arrays["record_raw_len"], arrays["raw_len"])).as_py()
    schema = schema_of(bool(packed), digests)
    return pa.table([arrays[n] for n in schema.names], schema=schema)


def footer(rank: int, uuid_hex: str, table: pa.Table, packed: bool) -> bytes:
    """The footer of a data file whose index rows are ``table`` (in footer order): the bytes of
    ``pack_footer(rank, uuid_hex, [r.to_json(packed) for r in rows])``, written as JSON text
    column by column by Arrow's string kernels instead of through one dict per row."""
    names = names_of(packed, has_digests(table))
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
    if name in ("hash", DIGEST):
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
    """A fixed-size binary column (no nulls) as quoted lowercase hex texts."""
    n, w = len(col), col.type.byte_width
    if not n:
        return pa.array([], _TEXT)
    data = np.frombuffer(col.buffers()[1], dtype=np.uint8)
    raw = data[col.offset * w : (col.offset + n) * w].reshape(n, w)
    out = np.empty((n, 2 * w + 2), dtype=np.uint8)
    out[:, 0] = out[:, 2 * w + 1] = ord('"')
    out[:, 1 : 2 * w + 1 : 2] = _HEX[raw >> 4]
    out[:, 2 : 2 * w + 1 : 2] = _HEX[raw & 15]
    offsets = np.arange(0, (2 * w + 2) * (n + 1), 2 * w + 2, dtype=np.int64)
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out))


def unify(tables: list[pa.Table]) -> pa.Table:
    """Concatenate index tables of several ranks into one table of one chunk per column: where
    any has the ``packed-records`` columns, the others get them too (each row its own record:
    offset 0, its own raw length). All or none have digests (ValueError otherwise: the ranks
    disagree on the ``digests`` option). One chunk, because the Parquet writer writes a chunked
    column a chunk at a time (at thousands of ranks, several times slower) and every check of
    the rows would otherwise concatenate the columns it reads again."""
    digests = {has_digests(t) for t in tables}
    if len(digests) > 1:
        raise ValueError("some ranks wrote chunk digests and others did not")
    if not any(is_packed(t) for t in tables):
        return _one_chunk(pa.concat_tables(tables))
    schema = schema_of(True, digests == {True})
    out = []
    for t in tables:
        if not is_packed(t):
            at = len(FIELD_NAMES)
            t = t.add_column(
                at, PACKED_SCHEMA.field(PACK_COLUMNS[0]), pa.array(np.zeros(t.num_rows, np.int64))
            ).add_column(at + 1, PACKED_SCHEMA.field(PACK_COLUMNS[1]), t.column("raw_len"))
        out.append(t.cast(schema))
    return _one_chunk(pa.concat_tables(out))


def _one_chunk(table: pa.Table) -> pa.Table:
    """``table`` with one chunk per column (each column left as it is where its values exceed
    what one Arrow array holds, 2 GiB of strings). Two threads combine the columns: Arrow
    copies without the GIL, and at ten million rows the copy (about 2 GB, most of it memory
    the kernel must first zero) is most of a commit's decoding."""
    if table.num_rows < 1 << 16:
        return pa.Table.from_arrays([_combined(c) for c in table.columns], schema=table.schema)
    with ThreadPoolExecutor(2, thread_name_prefix="ckptguard-combine") as pool:
        cols = list(pool.map(_combined, table.columns))
    return pa.Table.from_arrays(cols, schema=table.schema)


def _combined(col: pa.ChunkedArray) -> pa.ChunkedArray:
    if col.num_chunks == 1:
        return col
    try:
        return pa.chunked_array([col.combine_chunks()], col.type)
    except (pa.ArrowInvalid, pa.ArrowCapacityError):
        return col


def write(rows: list[Row]) -> bytes:
    """Serialize rows to Parquet bytes."""
    return write_table(to_table(rows))


def read(data: bytes) -> list[Row]:
    """Parse Parquet bytes into rows, checking the schema and nulls (not the cross-row rules)."""
    return rows_from_table(read_table(data))


def read_table(data: bytes) -> pa.Table:
    """Parse Parquet bytes into a table with exactly the v1 schema (or the v1 schema with the
    ``packed-records`` columns, the ``digest`` column, or both) and no forbidden nulls."""
    try:
        # One thread: Arrow's pool can abort the process at exit beside torch (apache/arrow#34314).
        table = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
        table.validate(full=True)  # e.g. strings that are not UTF-8, which Parquet reads as is
    except Exception as e:  # pyarrow raises many kinds on garbage
        raise FormatError(f"index.parquet cannot be parsed: {e}") from None
    schema = schema_of(is_packed(table), has_digests(table))
    if table.schema.names != schema.names:
        raise FormatError(
            f"index.parquet has columns {table.schema.names}, expected {SCHEMA.names} "
            f"(then optionally {list(PACK_COLUMNS)}, then optionally {[DIGEST]})"
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


def member(data: bytes, digests: bool) -> dict:
    """The manifest's ``index`` member for index.parquet bytes ``data`` (format.md section 3):
    its SHA-256 too under the feature ``digests``."""
    doc = {"file": "index.parquet", "size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    return {**doc, "sha256": hashlib.sha256(data).hexdigest()} if digests else doc


_RANDOM = ("hash", DIGEST)
"""Columns of random bytes: dictionaries and compression find nothing in them."""


def write_table(table: pa.Table) -> bytes:
    """Serialize an index table (already in the v1 schema) to Parquet bytes.

    LZ4 (Parquet's LZ4_RAW) for every column but the hashes (random bytes: written plain),
    dictionaries for the string columns only, no statistics (nothing reads them): at ten million
    rows a third less work than zstd with dictionaries everywhere, for a file 4% larger that
    decodes faster. Any Parquet reader reads the same table whatever these choices. A table of
    many chunks is written a chunk at a time, several times slower than one chunk: ``unify``
    combines them."""
    paths, strings = [], []
    for name, kind in zip(table.schema.names, table.schema.types, strict=True):
        paths.append(name + ".list.element" if isinstance(kind, pa.ListType) else name)
        if pa.types.is_string(kind):
            strings.append(name)
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression={p: "none" if p in _RANDOM else "lz4" for p in paths},
        use_dictionary=strings,
        write_statistics=False,
    )
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
    if names in (FIELD_NAMES, PACKED_NAMES):  # positional: Row's first fields
        return [Row(*vals) for vals in zip(*cols, strict=True)]
    return [Row(**dict(zip(names, vals, strict=True))) for vals in zip(*cols, strict=True)]


def row_from_json(d: object) -> Row:
    """Parse one footer row (same fields as the index, hash and digest in hex; with or without
    the ``packed-records`` members and ``digest``, which the caller checks against the file)."""
    if not isinstance(d, dict) or list(d) not in _FOOTER_NAMES:
        raise FormatError("footer row has unexpected fields")
    try:
        d = dict(d)
        d["hash"] = bytes.fromhex(d["hash"])
        if DIGEST in d:
            d[DIGEST] = bytes.fromhex(d[DIGEST])
        for k in ("global_shape", "shard_offsets", "shard_lengths"):
            d[k] = tuple(d[k])
        return Row(**d)
    except (TypeError, ValueError) as e:
        raise FormatError(f"footer row is malformed: {e}") from None


_FOOTER_NAMES = [names_of(p, g) for p in (False, True) for g in (False, True)]
