"""index.parquet: one row per chunk (docs/format.md section 4); writing, reading, validation."""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, fields

import pyarrow as pa
import pyarrow.parquet as pq

from . import dtypes
from .datafile import CODECS, HEADER_SIZE, RECORD_HEADER_SIZE, FormatError
from .layout import ALIGN, align, is_name

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

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("global_shape", "shard_offsets", "shard_lengths"):
            d[k] = list(d[k])
        d["hash"] = self.hash.hex()
        return d

    @property
    def extent(self) -> int:
        """End of this record's aligned extent in its file."""
        return align(self.offset + RECORD_HEADER_SIZE + self.stored_len)


FIELD_NAMES = [f.name for f in fields(Row)]
assert SCHEMA.names == FIELD_NAMES


def to_table(rows: list[Row]) -> pa.Table:
    cols = {name: [getattr(r, name) for r in rows] for name in FIELD_NAMES}
    return pa.table(cols, schema=SCHEMA)


def write(rows: list[Row]) -> bytes:
    """Serialize rows to Parquet bytes."""
    buf = io.BytesIO()
    pq.write_table(to_table(rows), buf, compression="zstd")
    return buf.getvalue()


def read(data: bytes) -> list[Row]:
    """Parse Parquet bytes into rows, checking the schema and nulls (not the cross-row rules)."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as e:  # pyarrow raises many kinds on garbage
        raise FormatError(f"index.parquet cannot be parsed: {e}") from None
    if table.schema.names != SCHEMA.names:
        raise FormatError(
            f"index.parquet has columns {table.schema.names}, expected {SCHEMA.names}"
        )
    for name, field in zip(SCHEMA.names, SCHEMA, strict=True):
        col = table.column(name)
        if not col.type.equals(field.type):
            raise FormatError(f"index column {name!r} has type {col.type}, expected {field.type}")
        if name not in NULLABLE and col.null_count:
            raise FormatError(f"index column {name!r} has nulls")
    cols = [table.column(n).to_pylist() for n in FIELD_NAMES]
    rows = []
    for vals in zip(*cols, strict=True):
        r = Row(*vals)
        for k in ("global_shape", "shard_offsets", "shard_lengths"):
            v = getattr(r, k)
            if any(x is None for x in v):
                raise FormatError(f"index column {k!r} has nulls")
            setattr(r, k, tuple(v))
        rows.append(r)
    return rows


def row_from_json(d: object) -> Row:
    """Parse one footer row (same fields as the index, hash in hex)."""
    if not isinstance(d, dict) or list(d) != FIELD_NAMES:
        raise FormatError("footer row has unexpected fields")
    try:
        d = dict(d)
        d["hash"] = bytes.fromhex(d["hash"])
        for k in ("global_shape", "shard_offsets", "shard_lengths"):
            d[k] = tuple(d[k])
        return Row(**d)
    except (TypeError, ValueError) as e:
        raise FormatError(f"footer row is malformed: {e}") from None


def check_rows(rows: list[Row], tensors: list[dict], files: dict[str, int], features: set) -> None:
    """Check every rule of format.md section 4 except record placement against footers.

    ``files`` maps each data file name to its size. Raises FormatError naming the row.
    """
    per_shard: dict[tuple, list[Row]] = {}
    for i, r in enumerate(rows):
        where = f"index row {i} ({r.key!r} chunk {r.chunk})"
        _check_row(r, where, tensors, files, features)
        per_shard.setdefault((r.tensor, r.shard_offsets, r.shard_lengths), []).append(r)
    shards_by_tensor: dict[int, list[tuple]] = {}
    for (tid, offs, lens), chunks in per_shard.items():
        chunks.sort(key=lambda r: r.chunk)
        pos = 0
        for n, r in enumerate(chunks):
            if r.chunk != n or r.shard_byte_offset != pos:
                raise FormatError(f"tensor {r.key!r}: chunks of a shard are not contiguous")
            pos += r.raw_len
        if pos != math.prod(lens) * chunks[0].elem_size:
            raise FormatError(
                f"tensor {chunks[0].key!r}: chunks hold {pos} bytes, shard needs "
                f"{math.prod(lens) * chunks[0].elem_size}"
            )
        shards_by_tensor.setdefault(tid, []).append((offs, lens))
    for tid, t in enumerate(tensors):
        check_cover(t, shards_by_tensor.get(tid, []))
    _check_placement(rows)


def _check_row(r: Row, where: str, tensors: list[dict], files: dict, features: set) -> None:
    if not 0 <= r.tensor < len(tensors):
        raise FormatError(f"{where}: tensor id {r.tensor} out of range")
    t = tensors[r.tensor]
    if r.key != t["key"] or r.dtype != t["dtype"] or r.global_shape != tuple(t["shape"]):
        raise FormatError(f"{where}: key, dtype or shape disagree with the manifest")
    size = dtypes.elem_size(r.dtype)
    if size is None:
        raise FormatError(f"{where}: unknown dtype {r.dtype!r}")
    if r.elem_size != size:
        raise FormatError(f"{where}: elem_size {r.elem_size} does not match dtype {r.dtype}")
    nd = len(r.global_shape)
    if len(r.shard_offsets) != nd or len(r.shard_lengths) != nd:
        raise FormatError(f"{where}: shard offsets/lengths do not match the tensor's rank")
    for o, n, g in zip(r.shard_offsets, r.shard_lengths, r.global_shape, strict=True):
        if o < 0 or n < 0 or o + n > g:
            raise FormatError(f"{where}: shard lies outside the tensor")
    if r.raw_len <= 0 or r.raw_len % size or r.shard_byte_offset < 0 or r.chunk < 0:
        raise FormatError(f"{where}: bad raw_len, chunk or shard_byte_offset")
    if r.file not in files:
        raise FormatError(f"{where}: data file {r.file!r} is not one of this checkpoint's files")
    if r.codec not in CODECS:
        raise FormatError(f"{where}: unknown codec {r.codec!r}")
    if r.codec == "raw" and r.stored_len != r.raw_len:
        raise FormatError(f"{where}: raw chunk with stored_len != raw_len")
    if r.codec != "raw" and not 0 < r.stored_len < r.raw_len:
        raise FormatError(f"{where}: compressed chunk with bad stored_len")
    if r.offset < HEADER_SIZE or r.offset % ALIGN:
        raise FormatError(f"{where}: record offset {r.offset} is not an aligned data offset")
    if r.extent > files[r.file]:
        raise FormatError(f"{where}: record runs past the end of {r.file}")
    if r.base is not None and ("incremental" not in features or not is_name(r.base)):
        raise FormatError(f"{where}: base {r.base!r} invalid or not declared as a feature")
    if r.key_id is not None and "encryption" not in features:
        raise FormatError(f"{where}: key_id present but encryption is not declared")


def check_cover(t: dict, shards: list[tuple]) -> None:
    """Shards of one tensor must not overlap and must cover it exactly."""
    total = math.prod(t["shape"])
    covered = 0
    boxes = [(o, n) for o, n in shards if math.prod(n) > 0]
    for i, (o, n) in enumerate(boxes):
        covered += math.prod(n)
        for o2, n2 in boxes[i + 1 :]:
            if all(a < b + m and b < a + k for a, k, b, m in zip(o, n, o2, n2, strict=True)):
                raise FormatError(f"tensor {t['key']!r}: shards overlap")
    if covered != total:
        raise FormatError(f"tensor {t['key']!r}: shards cover {covered} of {total} elements")


def _check_placement(rows: list[Row]) -> None:
    by_file: dict[str, list[Row]] = {}
    for r in rows:
        by_file.setdefault(r.file, []).append(r)
    for name, rs in by_file.items():
        rs.sort(key=lambda r: r.offset)
        for a, b in zip(rs, rs[1:], strict=False):
            if b.offset < a.extent:
                raise FormatError(f"{name}: records at {a.offset} and {b.offset} overlap")
