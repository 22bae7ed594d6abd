"""An independent reader of the ckptguard on-disk format, version 1.

Written only from docs/format.md (it never imports ckptguard): it is the proof that the spec is
complete enough to read a checkpoint without the library. ``read_checkpoint(path)`` checks every
rule of sections 3-8 (and 10, for a one-file checkpoint) and returns the manifest, the decoded
object tree and each tensor's raw bytes.
Any violation raises ``SpecViolation`` (``VersionViolation`` for a version or feature this reader
does not implement; ``KeyringViolation`` for a damaged entry of the store's keyring).
Sealed records (feature ``encryption``) open with ``read_checkpoint(path, kek=<32 bytes>)``; a
scope whose data key is unavailable (no KEK, another one, shredded) is checked as stored and its
tensors come back with ``data=None`` (``Checkpoint.unreadable`` says which scope and why;
``TensorData.numpy()`` raises ``SealedUnreadable``). The layout helpers (``scan_data_file``,
``manifest_span``) are also what the corruption tests use to locate the regions they damage.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import itertools
import json
import math
import os
import pathlib
import re
import stat
import struct
from dataclasses import dataclass, field
from typing import Any

import lz4.block
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
import zstandard

ALIGN = 4096
HEADER_SIZE = 4096
RECORD_HEADER = 64
TAG_LEN = 16  # the AES-GCM tag at the end of a sealed record's stored payload (section 4.4)
TRAILER_SIZE = 32
MANIFEST = "MANIFEST.json"
INDEX = "index.parquet"
LATEST = "LATEST"
MAX_MANIFEST = 256 << 20
MAX_LATEST = 256
MAX_DEPTH = 512
MAX_DIMS = 64  # dimensions of a tensor (section 3)
MAX_DIGITS = 4300  # digits of a $int (section 6)
PREFIX_LEN = 58  # '{"checksum":"' + 32 hex + '","manifest":'
SUFFIX = b"}\n"

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}")
DATAFILE_RE = re.compile(r"rank-([0-9]{5,9})\.ckg")
LINKED_RE = re.compile(r"rank-([0-9]{5,9})\.([0-9a-f]{32})\.ckg")
HEX32_RE = re.compile(r"[0-9a-f]{32}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
CREATED_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")

DTYPE_SIZES: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
}
# dtypes numpy can represent natively (little-endian); the others come back as raw bytes only
NUMPY_DTYPES = {
    "bool": "|b1",
    "uint8": "|u1",
    "int8": "|i1",
    "int16": "<i2",
    "uint16": "<u2",
    "int32": "<i4",
    "uint32": "<u4",
    "int64": "<i8",
    "uint64": "<u8",
    "float16": "<f2",
    "float32": "<f4",
    "float64": "<f8",
    "complex64": "<c8",
    "complex128": "<c16",
}
CODECS = {"raw": 0, "shuffle-lz4": 1, "shuffle-zstd": 2}
ZSTD_MAX_RATIO = 32768  # a zstd frame decodes to at most this many bytes per payload byte
# pickled leaves are returned as opaque ``Pickled`` blobs, never loaded; rank-tree-diffs: the
# values of rank_trees are diffs against tree (section 6.1); per-rank-tensors: a tensor entry may
# be per_rank, its row r being rank r's own value (section 3.1)
# packed-records: one record may hold several rows' bytes, each row a slice of it (section 4.1)
# tensor-views: a tensor entry may be a view of another entry's bytes (section 3.2)
# digests: every index row has the SHA-256 of its record's raw bytes, the manifest's index member
# the SHA-256 of index.parquet (section 4.2)
# incremental: linked data files of earlier saves, rows with a base, the manifest's incremental
# member (section 4.3)
# encryption: sealed records (AES-256-GCM) under data keys of the store's keyring, rows with a
# key_id, the manifest's encryption member (sections 1.1, 4.4)
# locator: the manifest's locator member, footer hashes and shard grids (section 4.5)
KNOWN_FEATURES = {
    "locator",
    "digests",
    "encryption",
    "incremental",
    "pickle",
    "rank-tree-diffs",
    "per-rank-tensors",
    "packed-records",
    "zstd",
    "tree-types",
    "tensor-views",
}
MAX_VIEW_STEP = 1 << 62  # section 3.2: offset and strides step at most 2**62 bytes
MAX_DIFF_PATH = 2048
# section 10: one-file checkpoints
CONTAINER_MAGIC = b"CKGFILE1"
CONTAINER_TRAILER = 56
CONTAINER_VERSION = 1
MAX_TOC = 1 << 20
TOC_MEMBER_KEYS = {"name", "offset", "size", "xxh3_128"}

BODY_MEMBERS = {
    "format",
    "format_version",
    "features",
    "name",
    "uuid",
    "created",
    "step",
    "world_size",
    "writer",
    "metadata",
    "tree",
    "rank_trees",
    "tensors",
    "files",
    "index",
    "totals",
    "incremental",
    "encryption",
    "locator",
}
OPTIONAL_BODY_MEMBERS = {"features", "incremental", "encryption", "locator"}
TENSOR_MEMBERS = {"key", "dtype", "shape", "kind", "device", "requires_grad", "parameter"}
FILE_MEMBERS = {"name", "rank", "size", "chunks"}
INDEX_MEMBERS = {"file", "size", "xxh3_128"}
TOTALS_MEMBERS = {"tensors", "chunks", "raw_bytes", "stored_bytes", "files"}

COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(),
    "tensor": pa.int32(),
    "dtype": pa.string(),
    "global_shape": pa.list_(pa.int64()),
    "shard_offsets": pa.list_(pa.int64()),
    "shard_lengths": pa.list_(pa.int64()),
    "chunk": pa.int32(),
    "shard_byte_offset": pa.int64(),
    "raw_len": pa.int64(),
    "rank": pa.int32(),
    "file": pa.string(),
    "offset": pa.int64(),
    "stored_len": pa.int64(),
    "codec": pa.string(),
    "elem_size": pa.int32(),
    "hash": pa.binary(16),
    "base": pa.string(),
    "key_id": pa.string(),
}
NULLABLE = {"base", "key_id"}
FOOTER_ROW_MEMBERS = set(COLUMNS)
PACK_COLUMNS: dict[str, pa.DataType] = {
    "record_byte_offset": pa.int64(),
    "record_raw_len": pa.int64(),
}
PACKED_FOOTER_ROW_MEMBERS = FOOTER_ROW_MEMBERS | set(PACK_COLUMNS)


class SpecViolation(Exception):
    """The checkpoint breaks a rule of docs/format.md (message says which and where)."""


class VersionViolation(SpecViolation):
    """A format version or feature this (version 1) reader does not implement."""


# ---------------------------------------------------------------- decoded tree values


@dataclass(frozen=True)
class TensorRef:
    """``{"$tensor": id}`` in the tree."""

    id: int


@dataclass(frozen=True)
class DType:
    """``{"$dtype": name}``."""

    name: str


@dataclass(frozen=True)
class Size:
    """``{"$size": [...]}`` (a torch.Size)."""

    dims: tuple[int, ...]


@dataclass(frozen=True)
class Device:
    """``{"$device": str}``."""

    name: str


@dataclass(frozen=True)
class NpScalar:
    """``{"$npscalar": dtype, "hex": ...}`` with its raw little-endian bytes."""

    dtype: str
    raw: bytes

    def value(self) -> Any:
        return np.frombuffer(self.raw, dtype=np.dtype(NUMPY_DTYPES[self.dtype]))[0]


@dataclass(frozen=True)
class Pickled:
    """``{"$pickle": base64}``: returned opaque, never unpickled."""

    data: bytes


@dataclass(frozen=True)
class PathValue:
    """``{"$path": text, "class": cls}``."""

    cls: str
    text: str


@dataclass
class Namespace:
    """``{"$namespace": {...}}`` with its decoded attributes."""

    attrs: dict[str, Any]


@dataclass(frozen=True)
class Meta:
    """``{"$meta": dtype, "shape": [...], ...}``: a tensor without data."""

    dtype: str
    shape: tuple[int, ...]
    requires_grad: bool
    parameter: bool


@dataclass(frozen=True)
class Sparse:
    """``{"$sparse": layout, ...}``: a sparse tensor by its part tensors."""

    layout: str
    shape: tuple[int, ...]
    parts: tuple[TensorRef, ...]
    coalesced: bool


@dataclass(frozen=True)
class Structured:
    """``{"$structured": fields, "shape": ..., "data": ref}``: a numpy structured array whose
    packed little-endian bytes are the uint8 tensor ``data``."""

    fields: tuple[tuple[str, str], ...]
    shape: tuple[int, ...]
    data: TensorRef


@dataclass(frozen=True)
class Quantized:
    """``{"$quantized": dtype, "qscheme": ..., ...}``: a quantized tensor by its integer values
    (``int_repr``) and parameters: per tensor a float scale and an int zero point, per channel
    tensors of them and the axis."""

    dtype: str
    qscheme: str
    int_repr: TensorRef
    scale: float | TensorRef
    zero_point: int | TensorRef
    axis: int | None


@dataclass(frozen=True)
class EnumMember:
    """``{"$enum": class, "name": member}``."""

    cls: str
    name: str


@dataclass(frozen=True)
class Registered:
    """``{"$dataclass"|"$namedtuple": class, "fields": ...}`` with its decoded fields."""

    tag: str
    cls: str
    fields: Any = field(compare=False, hash=False)


@dataclass
class TensorData:
    """One tensor of a checkpoint: its manifest entry and its raw C-order bytes."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    kind: str
    device: str
    requires_grad: bool
    parameter: bool
    data: bytes | None  # None: sealed, and its scope's data key unavailable (``unreadable``)
    per_rank: bool = False  # row r of the first dimension is rank r's own value
    view: dict[str, Any] | None = None  # section 3.2: data gathered from its storage's bytes
    scope: str | None = None  # section 4.4: the scope its sealed rows are in, if any
    unreadable: str | None = None  # why ``data`` is None

    @property
    def elem_size(self) -> int:
        return DTYPE_SIZES[self.dtype]

    def of_rank(self, rank: int) -> np.ndarray:
        """A per-rank tensor's value as rank ``rank`` saved it (what that rank's tree means)."""
        _need(self.per_rank and 0 <= rank < self.shape[0], f"{self.key}: no row of rank {rank}")
        return self.numpy()[rank]

    def numpy(self) -> np.ndarray:
        """The tensor as a numpy array (raw bytes as uint8 of shape (*shape, elem) if numpy
        has no such dtype). SealedUnreadable where its scope's data key was unavailable."""
        if self.data is None:
            raise SealedUnreadable(self.key, self.scope or "?", self.unreadable or "")
        if self.dtype in NUMPY_DTYPES:
            return np.frombuffer(self.data, dtype=np.dtype(NUMPY_DTYPES[self.dtype])).reshape(
                self.shape
            )
        return np.frombuffer(self.data, dtype=np.uint8).reshape((*self.shape, self.elem_size))


@dataclass
class Record:
    """One chunk record of a data file, located from the file's footer."""

    seq: int
    offset: int
    stored_len: int
    row: dict[str, Any]  # its first footer row
    rows: list[dict[str, Any]] = field(default_factory=list)  # all (several: a packed record)

    @property
    def payload_offset(self) -> int:
        return self.offset + RECORD_HEADER

    @property
    def payload_end(self) -> int:
        return self.offset + RECORD_HEADER + self.stored_len

    @property
    def end(self) -> int:
        """End of the record's zero padding (a multiple of 4096)."""
        return align(self.payload_end)


@dataclass
class DataFileLayout:
    """Where everything lies in one data file (section 7)."""

    name: str
    size: int
    rank: int
    uuid: str
    footer_offset: int
    footer_len: int
    records: list[Record] = field(default_factory=list)
    footer: bytes = b""  # the footer's bytes (section 4.5 hashes them)

    @property
    def trailer_offset(self) -> int:
        return self.size - TRAILER_SIZE


@dataclass
class Checkpoint:
    """What ``read_checkpoint`` returns."""

    path: str
    manifest: dict[str, Any]
    tree: Any
    rank_trees: dict[int, Any]  # decoded trees of the ranks whose tree differs from rank 0's
    # (reconstructed from their diffs under rank-tree-diffs)
    tensors: dict[str, TensorData]  # by key
    by_id: list[TensorData]
    rows: list[dict[str, Any]]  # index rows, hash as 16 bytes
    files: dict[str, DataFileLayout]
    # section 4.4: scope -> why its data key was unavailable (its tensors' data is None)
    unreadable: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- small helpers


def align(x: int) -> int:
    """``x`` rounded up to a multiple of 4096."""
    return (x + ALIGN - 1) // ALIGN * ALIGN


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise SpecViolation(msg)


def _no_dup_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise SpecViolation(f"duplicate JSON member {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise SpecViolation(f"{name} is not valid JSON (RFC 8259)")


def strict_json(data: bytes, what: str) -> Any:
    """Parse UTF-8 JSON strictly: no NaN/Infinity, no duplicate members."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecViolation(f"{what}: not UTF-8: {e}") from None
    try:
        return json.loads(text, object_pairs_hook=_no_dup_pairs, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise SpecViolation(f"{what}: invalid JSON: {e}") from None
    except RecursionError:
        raise SpecViolation(f"{what}: nested too deeply") from None


def xxh3_128_hex(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def xxh3_64(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def _pread_exact(fd: int, n: int, off: int, what: str) -> bytes:
    b = os.pread(fd, n, off)
    _need(len(b) == n, f"{what}: short read ({len(b)} of {n} bytes at {off})")
    return b


def _open_regular(path: str, what: str) -> tuple[int, int]:
    """Open a regular, non-symlink file; return (fd, size)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise SpecViolation(f"{what}: cannot open as a regular file: {e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SpecViolation(f"{what}: not a regular file")
    return fd, st.st_size


# ---------------------------------------------------------------- section 3: manifest


def manifest_span(raw: bytes) -> tuple[str, int, int]:
    """Check the framing of MANIFEST.json bytes; return (checksum hex, body start, body end)."""
    _need(len(raw) >= PREFIX_LEN + 2 + len(SUFFIX), "MANIFEST.json: too short")
    head = raw[:PREFIX_LEN]
    _need(
        head[:13] == b'{"checksum":"' and head[45:] == b'","manifest":',
        "MANIFEST.json: bad framing prefix",
    )
    hexsum = head[13:45].decode("ascii", "replace")
    _need(bool(HEX32_RE.fullmatch(hexsum)), "MANIFEST.json: checksum is not 32 lowercase hex")
    _need(raw.endswith(SUFFIX), "MANIFEST.json: bad framing suffix")
    return hexsum, PREFIX_LEN, len(raw) - len(SUFFIX)


def frame_manifest(body: bytes) -> bytes:
    """The exact MANIFEST.json bytes for a body (what a writer produces)."""
    return b'{"checksum":"' + xxh3_128_hex(body).encode() + b'","manifest":' + body + SUFFIX


def read_manifest_bytes(ckpt_dir: str) -> bytes:
    path = os.path.join(ckpt_dir, MANIFEST)
    fd, size = _open_regular(path, MANIFEST)
    try:
        _need(size <= MAX_MANIFEST, f"MANIFEST.json: {size} bytes is over 256 MiB")
        return _pread_exact(fd, size, 0, MANIFEST)
    finally:
        os.close(fd)


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """Check framing, checksum, version, features and every member's type (section 3). The
    body's name need not equal the directory's (a checkpoint renamed by hand keeps its name)."""
    hexsum, a, b = manifest_span(raw)
    body_bytes = raw[a:b]
    _need(xxh3_128_hex(body_bytes) == hexsum, "MANIFEST.json: checksum mismatch")
    body = strict_json(body_bytes, "MANIFEST.json body")
    _need(isinstance(body, dict), "MANIFEST.json: body is not an object")
    # version first: a newer body may legitimately have members this reader does not know
    _need(body.get("format") == "ckptguard", "MANIFEST.json: format is not 'ckptguard'")
    ver = body.get("format_version")
    _need(_is_int(ver), "MANIFEST.json: format_version is not an int")
    if ver > 1:
        raise VersionViolation(f"format_version {ver} is newer than 1")
    _need(ver == 1, f"MANIFEST.json: format_version {ver} is not 1")
    feats = body.get("features", [])
    _need(
        isinstance(feats, list) and all(isinstance(f, str) for f in feats),
        "MANIFEST.json: features is not a list of strings",
    )
    unknown = [f for f in feats if f not in KNOWN_FEATURES]
    if unknown:
        raise VersionViolation(f"unsupported features {unknown}")
    extra = set(body) - BODY_MEMBERS
    _need(not extra, f"MANIFEST.json: unknown members {sorted(extra)}")
    missing = BODY_MEMBERS - OPTIONAL_BODY_MEMBERS - set(body)
    _need(not missing, f"MANIFEST.json: missing members {sorted(missing)}")

    name = body["name"]
    _need(isinstance(name, str) and is_name(name), f"MANIFEST.json: bad name {name!r}")
    _need(
        isinstance(body["uuid"], str) and bool(HEX32_RE.fullmatch(body["uuid"])),
        "MANIFEST.json: uuid is not 32 lowercase hex",
    )
    _need(
        isinstance(body["created"], str) and bool(CREATED_RE.fullmatch(body["created"])),
        f"MANIFEST.json: bad created {body['created']!r}",
    )
    _need(body["step"] is None or _is_int(body["step"]), "MANIFEST.json: step is not int/null")
    ws = body["world_size"]
    _need(_is_int(ws) and ws >= 1, "MANIFEST.json: world_size is not an int >= 1")
    w = body["writer"]
    _need(
        isinstance(w, dict) and all(isinstance(v, str) for v in w.values()),
        "MANIFEST.json: writer is not an object of strings",
    )
    rt = body["rank_trees"]
    _need(isinstance(rt, dict), "MANIFEST.json: rank_trees is not an object")
    for r, v in rt.items():
        _need(
            bool(re.fullmatch(r"[1-9][0-9]{0,9}", r)) and int(r) < ws,
            f"MANIFEST.json: rank_trees key {r!r} is not a rank in 1..world_size-1",
        )
        if "rank-tree-diffs" in feats:
            check_diff(body["tree"], v, f"MANIFEST.json: rank_trees[{r!r}]")

    tensors = body["tensors"]
    _need(isinstance(tensors, list), "MANIFEST.json: tensors is not a list")
    keys: set[str] = set()
    for i, t in enumerate(tensors):
        where = f"MANIFEST.json: tensors[{i}]"
        if isinstance(t, dict) and "per_rank" in t:
            _need("per-rank-tensors" in feats, f"{where}: per_rank without its feature")
            _need(t["per_rank"] is True, f"{where}: per_rank is not true")
            sh = t.get("shape")
            _need(
                isinstance(sh, list) and len(sh) >= 1 and sh[0] == ws,
                f"{where}: per-rank tensor whose first dimension is not world_size",
            )
        if isinstance(t, dict) and "view" in t:
            _need("tensor-views" in feats, f"{where}: view without its feature")
        members = (
            TENSOR_MEMBERS
            | ({"per_rank"} if isinstance(t, dict) and "per_rank" in t else set())
            | ({"view"} if isinstance(t, dict) and "view" in t else set())
        )
        _need(isinstance(t, dict) and set(t) == members, f"{where}: wrong members")
        _need(isinstance(t["key"], str), f"{where}: key is not a string")
        _need(t["key"] not in keys, f"{where}: duplicate key {t['key']!r}")
        keys.add(t["key"])
        _need(t["dtype"] in DTYPE_SIZES, f"{where}: unknown dtype {t['dtype']!r}")
        _need(
            isinstance(t["shape"], list)
            and len(t["shape"]) <= MAX_DIMS
            and all(_is_int(d) and d >= 0 for d in t["shape"]),
            f"{where}: shape is not a list of at most {MAX_DIMS} ints >= 0",
        )
        _need(
            math.prod(n or 1 for n in t["shape"]) * DTYPE_SIZES[t["dtype"]] <= 2**62,
            f"{where}: larger than 2**62 bytes (a 0 in the shape counted as 1)",
        )
        _need(t["kind"] in ("torch", "numpy"), f"{where}: bad kind {t['kind']!r}")
        _need(isinstance(t["device"], str), f"{where}: device is not a string")
        _need(
            isinstance(t["requires_grad"], bool) and isinstance(t["parameter"], bool),
            f"{where}: requires_grad/parameter are not bools",
        )
        if t["kind"] == "numpy":
            _need(not t["requires_grad"] and not t["parameter"], f"{where}: numpy with grad")
    for i, t in enumerate(tensors):
        if "view" in t:
            check_view(tensors, i)
    if "tensor-views" in feats:
        _need(any("view" in t for t in tensors), "MANIFEST.json: tensor-views listed but no view")

    incremental = "incremental" in feats
    _need(("incremental" in body) == incremental, "MANIFEST.json: incremental member iff feature")
    if incremental:
        inc = body["incremental"]
        _need(
            isinstance(inc, dict)
            and set(inc) == {"base", "depth"}
            and isinstance(inc["base"], str)
            and is_name(inc["base"])
            and _is_int(inc["depth"])
            and inc["depth"] >= 1,
            "MANIFEST.json: bad incremental member",
        )
    encryption = "encryption" in feats
    _need(("encryption" in body) == encryption, "MANIFEST.json: encryption member iff feature")
    if encryption:
        check_encryption_member(body["encryption"])
    files = body["files"]
    _need(isinstance(files, list), "MANIFEST.json: files is not a list")
    seen: set[str] = set()
    own_ranks: set[int] = set()
    linked_ranks: set[int] = set()
    for i, f in enumerate(files):
        where = f"MANIFEST.json: files[{i}]"
        _need(isinstance(f, dict) and set(f) == FILE_MEMBERS, f"{where}: wrong members")
        m = DATAFILE_RE.fullmatch(f["name"]) if isinstance(f["name"], str) else None
        if m is None and incremental and isinstance(f["name"], str):
            m = LINKED_RE.fullmatch(f["name"])
            _need(m is None or m.group(2) != body["uuid"], f"{where}: links its own uuid")
        _need(m is not None, f"{where}: bad data file name {f['name']!r}")
        _need(f["name"] not in seen, f"{where}: duplicate file {f['name']!r}")
        seen.add(f["name"])
        _need(_is_int(f["rank"]) and f["rank"] >= 0, f"{where}: bad rank")
        _need(int(m.group(1)) == f["rank"], f"{where}: rank does not match the name")
        _need(f["rank"] < ws, f"{where}: rank {f['rank']} >= world_size {ws}")
        _need(
            _is_int(f["size"]) and f["size"] >= HEADER_SIZE + 1 + TRAILER_SIZE,
            f"{where}: bad size",
        )
        _need(_is_int(f["chunks"]) and f["chunks"] >= 0, f"{where}: bad chunks")
        (linked_ranks if m.lastindex == 2 else own_ranks).add(f["rank"])
    _need(linked_ranks <= own_ranks, "MANIFEST.json: a linked file of a rank without its own")
    _need(not incremental or linked_ranks, "MANIFEST.json: incremental without a linked file")

    idx = body["index"]
    digests = "digests" in body.get("features", [])
    want_members = INDEX_MEMBERS | ({"sha256"} if digests else set())
    _need(isinstance(idx, dict) and set(idx) == want_members, "MANIFEST.json: bad index member")
    _need(
        not digests
        or (isinstance(idx["sha256"], str) and bool(SHA256_RE.fullmatch(idx["sha256"]))),
        "MANIFEST.json: bad index.sha256",
    )
    _need(idx["file"] == INDEX, "MANIFEST.json: index.file is not 'index.parquet'")
    _need(_is_int(idx["size"]) and idx["size"] > 0, "MANIFEST.json: bad index.size")
    _need(
        isinstance(idx["xxh3_128"], str) and bool(HEX32_RE.fullmatch(idx["xxh3_128"])),
        "MANIFEST.json: bad index.xxh3_128",
    )
    tot = body["totals"]
    _need(
        isinstance(tot, dict)
        and set(tot) == TOTALS_MEMBERS
        and all(_is_int(v) and v >= 0 for v in tot.values()),
        "MANIFEST.json: bad totals",
    )
    _need(("locator" in body) == ("locator" in feats), "MANIFEST.json: locator member iff feature")
    if "locator" in feats:
        _need(not incremental, "MANIFEST.json: locator with incremental")
        check_locator_member(body)
    return body


# ---------------------------------------------------------------- section 4.5: the locator


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v)


def check_locator_member(body: dict[str, Any]) -> None:
    """The checks of section 4.5 on the manifest alone."""
    loc, files, tensors = body["locator"], body["files"], body["tensors"]
    digests = "digests" in body["features"]
    want = {"footers", "grids", "tensors"} | ({"footer_sha256"} if digests else set())
    _need(isinstance(loc, dict) and set(loc) == want, "locator: wrong members")
    _need(
        isinstance(loc["footers"], list)
        and len(loc["footers"]) == len(files)
        and all(isinstance(h, str) and HEX32_RE.fullmatch(h) for h in loc["footers"]),
        "locator: footers is not one 32-hex string per data file",
    )
    if digests:
        sha = loc["footer_sha256"]
        _need(
            isinstance(sha, list)
            and len(sha) == len(files)
            and all(isinstance(h, str) and SHA256_RE.fullmatch(h) for h in sha),
            "locator: footer_sha256 is not one 64-hex string per data file",
        )
    grids = loc["grids"]
    _need(isinstance(grids, list), "locator: grids is not a list")
    for i, g in enumerate(grids):
        _need(isinstance(g, dict) and set(g) == {"cuts", "files"}, f"locator: grids[{i}] members")
        cuts = g["cuts"]
        _need(isinstance(cuts, list), f"locator: grids[{i}].cuts is not a list")
        cells = 1
        for c in cuts:
            _need(
                _int_list(c)
                and len(c) >= 2
                and c[0] == 0
                and all(c[j] < c[j + 1] for j in range(len(c) - 1)),
                f"locator: grids[{i}] has cuts that do not rise strictly from 0",
            )
            cells *= len(c) - 1
        _need(
            _int_list(g["files"])
            and len(g["files"]) == cells
            and all(0 <= f < len(files) for f in g["files"]),
            f"locator: grids[{i}].files is not one position in files per cell",
        )
    refs = loc["tensors"]
    _need(
        isinstance(refs, list) and len(refs) == len(tensors),
        "locator: tensors is not one entry per tensor",
    )
    named = set()
    for t, ref in enumerate(refs):
        if ref is None:
            continue
        _need(_is_int(ref) and 0 <= ref < len(grids), f"locator: tensors[{t}] is not a grid")
        shape = tensors[t]["shape"]
        cuts = grids[ref]["cuts"]
        _need(
            "view" not in tensors[t]
            and len(cuts) == len(shape)
            and all(c[-1] == n for c, n in zip(cuts, shape, strict=True)),
            f"locator: tensors[{t}] names a grid of another shape",
        )
        named.add(ref)
    _need(len(named) == len(grids), "locator: a grid that no tensor names")


def expected_grid(
    shape: list[int], shards: dict[tuple[tuple[int, ...], tuple[int, ...]], set[int]]
) -> dict[str, Any] | None:
    """The grid of a tensor whose shards (offsets, lengths) -> set of the positions of the files
    holding their rows are ``shards``, or None where they do not form one (section 4.5)."""
    if not shards or any(len(fs) != 1 for fs in shards.values()):
        return None
    k = len(shape)
    cuts = [sorted({o[d] for o, _ in shards} | {shape[d]}) for d in range(k)]
    if any(c[0] != 0 for c in cuts):
        return None
    files = []
    for idx in itertools.product(*(range(len(c) - 1) for c in cuts)):
        o = tuple(cuts[d][i] for d, i in enumerate(idx))
        n = tuple(cuts[d][i + 1] - cuts[d][i] for d, i in enumerate(idx))
        held = shards.get((o, n))
        if held is None:
            return None
        files.append(next(iter(held)))
    if len(files) != len(shards):
        return None
    return {"cuts": cuts, "files": files}


def check_locator_rows(
    body: dict[str, Any], rows: list[dict[str, Any]], layouts: dict[str, DataFileLayout]
) -> None:
    """Section 4.5 against the index and the data files: every tensor's grid (or null) is the
    one its rows give, and every footer has the hashes listed."""
    loc = body["locator"]
    position = {f["name"]: i for i, f in enumerate(body["files"])}
    for name, lay in layouts.items():
        i = position[name]
        _need(xxh3_128_hex(lay.footer) == loc["footers"][i], f"{name}: footer != locator hash")
        if "footer_sha256" in loc:
            _need(
                hashlib.sha256(lay.footer).hexdigest() == loc["footer_sha256"][i],
                f"{name}: footer != locator SHA-256",
            )
    by_tensor: dict[int, dict] = collections.defaultdict(lambda: collections.defaultdict(set))
    for r in rows:
        box = (tuple(r["shard_offsets"]), tuple(r["shard_lengths"]))
        by_tensor[r["tensor"]][box].add(position[r["file"]])
    for t, ref in enumerate(loc["tensors"]):
        want = expected_grid(body["tensors"][t]["shape"], by_tensor.get(t, {}))
        got = None if ref is None else loc["grids"][ref]
        _need(got == want, f"locator: tensor {t}'s grid disagrees with the index")


def is_scope_name(s: Any) -> bool:
    """Sections 1.1 and 4.4: 1 to 256 characters, no control character (U+0000..U+001F,
    U+007F..U+009F), not only white space (read here as Python's ``str.isspace``). Characters
    are Unicode scalar values: a lone surrogate (a JSON escape such as \\ud800) has no UTF-8
    form, so no scope id (section 1.1)."""
    return (
        isinstance(s, str)
        and 1 <= len(s) <= 256
        and not any(
            ord(c) <= 0x1F or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF for c in s
        )
        and not s.isspace()
    )


def check_encryption_member(enc: Any) -> None:
    """Section 4.4: ``{"aead": "aes-256-gcm", "keys": [{"key_id", "scope"}, ...]}``, at least one
    key, sorted by key_id, each key_id once."""
    where = "MANIFEST.json: encryption"
    _need(isinstance(enc, dict) and set(enc) == {"aead", "keys"}, f"{where}: wrong members")
    _need(enc["aead"] == "aes-256-gcm", f"{where}: aead {enc['aead']!r} is not aes-256-gcm")
    keys = enc["keys"]
    _need(isinstance(keys, list) and len(keys) >= 1, f"{where}: keys is not a non-empty list")
    for i, k in enumerate(keys):
        _need(isinstance(k, dict) and set(k) == {"key_id", "scope"}, f"{where}.keys[{i}]: members")
        _need(
            isinstance(k["key_id"], str) and bool(HEX32_RE.fullmatch(k["key_id"])),
            f"{where}.keys[{i}]: key_id is not 32 lowercase hex",
        )
        _need(is_scope_name(k["scope"]), f"{where}.keys[{i}]: bad scope name {k['scope']!r}")
    ids = [k["key_id"] for k in keys]
    _need(
        all(a < b for a, b in itertools.pairwise(ids)),
        f"{where}: keys not sorted by key_id, or a key_id twice",
    )


def check_view(tensors: list[dict[str, Any]], i: int) -> None:
    """Section 3.2: a view's member, its storage, and every element inside the storage's bytes
    (checked with exact integers, so no hostile value can reach outside them)."""
    t = tensors[i]
    where = f"MANIFEST.json: tensors[{i}].view"
    v = t["view"]
    _need(isinstance(v, dict) and set(v) == {"storage", "offset", "stride"}, f"{where}: members")
    sid, off, stride = v["storage"], v["offset"], v["stride"]
    es = DTYPE_SIZES[t["dtype"]]
    _need(_is_int(sid) and 0 <= sid < len(tensors) and sid != i, f"{where}: bad storage id")
    _need(_is_int(off) and 0 <= off * es <= MAX_VIEW_STEP, f"{where}: bad offset")
    _need(
        isinstance(stride, list)
        and len(stride) == len(t["shape"])
        and all(_is_int(x) and 0 <= x * es <= MAX_VIEW_STEP for x in stride),
        f"{where}: bad stride",
    )
    _need(
        math.prod(n for n in t["shape"] if n) * es <= MAX_VIEW_STEP,
        f"{where}: nonzero lengths of its shape over 2**62 bytes",
    )
    st = tensors[sid]
    _need("view" not in st and "per_rank" not in st, f"{where}: storage is a view or per-rank")
    _need("per_rank" not in t, f"{where}: a per-rank view")
    _need(st["kind"] == t["kind"] and st["device"] == t["device"], f"{where}: kind/device")
    have = math.prod(st["shape"]) * DTYPE_SIZES[st["dtype"]]
    if math.prod(t["shape"]) == 0:
        need = off * es
    else:
        need = (off + sum((n - 1) * x for n, x in zip(t["shape"], stride, strict=True)) + 1) * es
    _need(need <= have, f"{where}: reaches byte {need} of a storage of {have} bytes")


def view_bytes(storage: bytes, t: dict[str, Any]) -> bytes:
    """A view's elements in C order, gathered from its storage's raw bytes (section 3.2)."""
    es = DTYPE_SIZES[t["dtype"]]
    off, stride, shape = t["view"]["offset"], t["view"]["stride"], t["shape"]
    if math.prod(shape) == 0:
        return b""
    base = np.frombuffer(storage, dtype=np.uint8)[off * es :]
    # element (i_0, ...) at byte (offset + sum(i_d * stride_d)) * es: in bounds, as checked
    strides = tuple(x * es for x in stride) + (1,)
    elems = np.lib.stride_tricks.as_strided(base, (*shape, es), strides, writeable=False)
    return elems.tobytes()


def _resolve(tree: Any, path: list, where: str) -> Any:
    node = tree
    for step in path:
        if isinstance(step, str):
            _need(isinstance(node, dict) and step in node, f"{where}: path {path} not in tree")
        else:
            _need(_is_int(step) and step >= 0, f"{where}: path step {step!r} is not valid")
            _need(isinstance(node, list) and step < len(node), f"{where}: path {path} not in tree")
        node = node[step]
    return node


def check_diff(tree: Any, diff: Any, where: str) -> None:
    """A rank's diff (section 6.1): a non-empty list of [path, value]; each path resolves in
    ``tree``; no path equals or is a prefix of another."""
    _need(isinstance(diff, list) and len(diff) > 0, f"{where}: not a non-empty list")
    paths: set[tuple] = set()
    for e in diff:
        _need(isinstance(e, list) and len(e) == 2, f"{where}: entry is not [path, value]")
        path = e[0]
        _need(isinstance(path, list) and len(path) <= MAX_DIFF_PATH, f"{where}: bad path")
        _resolve(tree, path, where)
        key = tuple((type(s).__name__, s) for s in path)
        _need(key not in paths, f"{where}: path {path} appears twice")
        paths.add(key)
    for key in paths:
        for k in range(len(key)):
            _need(key[:k] not in paths, f"{where}: path {list(key)} is inside another entry's")


def apply_diff(tree: Any, diff: list) -> Any:
    """Rank r's tree from rank 0's: each entry's path replaced by its value (on a copy)."""
    out = json.loads(json.dumps(tree))
    for path, value in diff:
        if not path:
            return value
        parent = out
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = value
    return out


def is_name(name: str) -> bool:
    """Whether ``name`` is a valid checkpoint name (section 1)."""
    return bool(NAME_RE.fullmatch(name)) and name not in (".", "..")


# ---------------------------------------------------------------- section 4: index


def read_index(ckpt_dir: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Read index.parquet after checking its size and hash; return its rows (hash as bytes)."""
    fd, size = _open_regular(os.path.join(ckpt_dir, INDEX), INDEX)
    try:
        _need(size == body["index"]["size"], f"index.parquet: size {size} != manifest")
        data = _pread_exact(fd, size, 0, INDEX)
    finally:
        os.close(fd)
    return parse_index(data, body)


def parse_index(data: bytes, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of index.parquet's bytes (hash as bytes), after checking its hash and schema."""
    _need(len(data) == body["index"]["size"], f"index.parquet: size {len(data)} != manifest")
    _need(xxh3_128_hex(data) == body["index"]["xxh3_128"], "index.parquet: xxh3_128 mismatch")
    digests = "digests" in body.get("features", [])
    _need(
        not digests or hashlib.sha256(data).hexdigest() == body["index"]["sha256"],
        "index.parquet: sha256 mismatch",
    )
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise SpecViolation(f"index.parquet: unreadable: {e}") from None
    names = table.schema.names
    columns = dict(COLUMNS)
    packed = "packed-records" in body.get("features", [])
    if packed:
        columns.update(PACK_COLUMNS)
    if digests:
        columns["digest"] = pa.binary(32)
    _need(
        sorted(names) == sorted(columns) and len(names) == len(columns),
        f"index.parquet: columns {names} are not exactly {list(columns)}",
    )
    for col, typ in columns.items():
        actual = table.schema.field(col).type
        ok = actual.equals(typ)
        if pa.types.is_list(typ):  # the list item's field name is not part of the format
            ok = pa.types.is_list(actual) and actual.value_type.equals(typ.value_type)
        _need(ok, f"index.parquet: column {col} has type {actual}, expected {typ}")
        if col not in NULLABLE:
            _need(table.column(col).null_count == 0, f"index.parquet: nulls in column {col}")
    rows = table.to_pylist()
    for r in rows:
        for c in ("global_shape", "shard_offsets", "shard_lengths"):
            _need(all(v is not None for v in r[c]), f"index.parquet: null inside {c}")
        if not packed:  # each row its own record (section 4)
            r["record_byte_offset"], r["record_raw_len"] = 0, r["raw_len"]
    return rows


def _row_where(i: int, r: dict[str, Any]) -> str:
    return f"index row {i} (key={r.get('key')!r}, chunk={r.get('chunk')})"


def check_rows(
    body: dict[str, Any], rows: list[dict[str, Any]], layouts: dict[str, DataFileLayout]
) -> None:
    """Every rule of section 4 (plus totals and per-file chunk counts of section 3)."""
    tensors = body["tensors"]
    files = {f["name"]: f for f in body["files"]}
    feats = set(body.get("features", []))
    shards: dict[tuple[int, tuple[int, ...], tuple[int, ...]], list[tuple[int, dict]]] = (
        collections.defaultdict(list)
    )
    listed_keys = {k["key_id"] for k in body.get("encryption", {}).get("keys", [])}
    used_keys: set[str] = set()
    for i, r in enumerate(rows):
        w = _row_where(i, r)
        if r["base"] is not None:
            _need("incremental" in feats, f"{w}: base without the incremental feature")
            _need(is_name(r["base"]), f"{w}: bad base")
        linked = isinstance(r["file"], str) and LINKED_RE.fullmatch(r["file"]) is not None
        _need(linked == (r["base"] is not None), f"{w}: a base exactly on rows of linked files")
        _need(
            not linked or (r["record_byte_offset"] == 0 and r["record_raw_len"] == r["raw_len"]),
            f"{w}: a slice of a packed record in a linked file",
        )
        sealed = r["key_id"] is not None
        if sealed:  # section 4.4
            _need("encryption" in feats, f"{w}: key_id without encryption")
            _need(
                isinstance(r["key_id"], str) and bool(HEX32_RE.fullmatch(r["key_id"])),
                f"{w}: key_id is not 32 lowercase hex",
            )
            _need(r["key_id"] in listed_keys, f"{w}: key_id not in the manifest's encryption.keys")
            _need(r["stored_len"] >= TAG_LEN, f"{w}: sealed stored_len < {TAG_LEN}")
            used_keys.add(r["key_id"])
        # the codec's payload: of a sealed record, the stored payload without the tag
        stored = r["stored_len"] - (TAG_LEN if sealed else 0)
        t = r["tensor"]
        _need(0 <= t < len(tensors), f"{w}: tensor id {t} out of range")
        te = tensors[t]
        _need(r["key"] == te["key"], f"{w}: key != tensors[{t}].key")
        _need("view" not in te, f"{w}: a row of a view (views have no chunks)")
        _need(r["dtype"] == te["dtype"], f"{w}: dtype != tensors[{t}].dtype")
        _need(list(r["global_shape"]) == te["shape"], f"{w}: global_shape != tensors[{t}].shape")
        _need(r["dtype"] in DTYPE_SIZES, f"{w}: unknown dtype {r['dtype']!r}")
        es = DTYPE_SIZES[r["dtype"]]
        _need(r["elem_size"] == es, f"{w}: elem_size {r['elem_size']} != {es}")
        _need(r["file"] in files, f"{w}: file {r['file']!r} is not listed in the manifest")
        _need(r["rank"] == files[r["file"]]["rank"], f"{w}: rank != its file's rank")
        gs, so, sl = r["global_shape"], r["shard_offsets"], r["shard_lengths"]
        _need(len(so) == len(gs) and len(sl) == len(gs), f"{w}: shard dims != global dims")
        for d in range(len(gs)):
            _need(so[d] >= 0 and sl[d] >= 0, f"{w}: negative shard offset/length")
            _need(so[d] + sl[d] <= gs[d], f"{w}: shard exceeds the tensor in dim {d}")
        _need(r["chunk"] >= 0, f"{w}: negative chunk")
        _need(r["raw_len"] > 0, f"{w}: raw_len {r['raw_len']} is not > 0")
        _need(r["raw_len"] % es == 0, f"{w}: raw_len is not a multiple of elem_size")
        _need(r["shard_byte_offset"] >= 0, f"{w}: negative shard_byte_offset")
        rb, rl = r["record_byte_offset"], r["record_raw_len"]
        _need(rb >= 0 and rb + r["raw_len"] <= rl, f"{w}: slice outside the record's raw bytes")
        _need(r["codec"] in CODECS, f"{w}: unknown codec {r['codec']!r}")
        if r["codec"] == "raw":
            _need(stored == rl, f"{w}: raw stored_len != record_raw_len")
        else:
            _need(0 < stored < rl, f"{w}: {r['codec']} stored_len out of range")
        if r["codec"] == "shuffle-lz4":
            _need(rl <= 256 * stored + 64, f"{w}: more raw bytes than LZ4 can hold")
        if r["codec"] == "shuffle-zstd":
            _need("zstd" in feats, f"{w}: shuffle-zstd without the zstd feature")
            _need(rl <= ZSTD_MAX_RATIO * stored, f"{w}: more raw bytes than zstd can hold")
        _need(r["offset"] >= 0 and r["offset"] % ALIGN == 0, f"{w}: offset not 4096-aligned")
        shards[(t, tuple(so), tuple(sl))].append((i, r))

    # section 4.4: "a writer lists exactly those" (and a checkpoint without sealed rows is
    # written without the feature)
    _need(used_keys == listed_keys, "MANIFEST.json: encryption.keys not exactly the rows' key_ids")
    # chunks of each shard: numbered 0..n-1, contiguous, adding up to the shard's bytes
    per_tensor: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = collections.defaultdict(
        list
    )
    for (t, so, sl), members in shards.items():
        members.sort(key=lambda ir: ir[1]["chunk"])
        _need(
            [r["chunk"] for _, r in members] == list(range(len(members))),
            f"tensor {tensors[t]['key']!r} shard {list(so)}: chunks are not numbered 0..n-1",
        )
        pos = 0
        for i, r in members:
            _need(r["shard_byte_offset"] == pos, f"{_row_where(i, r)}: not contiguous")
            pos += r["raw_len"]
        want = math.prod(sl) * DTYPE_SIZES[tensors[t]["dtype"]]
        _need(pos == want, f"tensor {tensors[t]['key']!r}: shard bytes {pos} != {want}")
        per_tensor[t].append((so, sl))
    # shards of each tensor: disjoint and covering exactly
    for t, te in enumerate(tensors):
        boxes = per_tensor.get(t, [])
        total = 0 if "view" in te else math.prod(te["shape"])
        _need(
            sum(math.prod(sl) for _, sl in boxes) == total,
            f"tensor {te['key']!r}: shards do not cover it exactly",
        )
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                (oa, la), (ob, lb) = boxes[a], boxes[b]
                overlap = all(
                    max(oa[d], ob[d]) < min(oa[d] + la[d], ob[d] + lb[d]) for d in range(len(oa))
                )
                _need(not overlap, f"tensor {te['key']!r}: shards overlap")
    # records of each file: after the header, before the footer, disjoint
    by_file: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:
        by_file[r["file"]].append(r)
    record_fields = ("record_raw_len", "stored_len", "codec", "elem_size", "hash", "key_id")
    if "digests" in feats:
        record_fields += ("digest",)
    for name, f in files.items():
        rs = sorted(by_file.get(name, []), key=lambda r: r["offset"])
        _need(len(rs) == f["chunks"], f"{name}: {len(rs)} index rows != files.chunks")
        lay = layouts[name]
        prev_end = HEADER_SIZE
        for off, group in itertools.groupby(rs, key=lambda r: r["offset"]):
            members = sorted(group, key=lambda r: r["record_byte_offset"])
            head = members[0]
            _need(
                len(members) == 1 or ("packed-records" in feats and not LINKED_RE.fullmatch(name)),
                f"{name}: several rows at offset {off} without packed-records or in a linked file",
            )
            pos = 0
            for r in members:  # the slices tile the record's raw bytes
                where = f"{name}: record at {off}, row key={r['key']!r}"
                _need(all(r[k] == head[k] for k in record_fields), f"{where}: disagrees")
                _need(r["record_byte_offset"] == pos, f"{where}: slices overlap or leave a gap")
                pos += r["raw_len"]
            _need(pos == head["record_raw_len"], f"{name}: record at {off}: slices != raw len")
            _need(off >= prev_end, f"{name}: record at {off} overlaps")
            prev_end = align(off + RECORD_HEADER + head["stored_len"])
            _need(prev_end <= lay.footer_offset, f"{name}: record at {off} hits footer")
    tot = body["totals"]
    want_tot = {
        "tensors": len(tensors),
        "chunks": len(rows),
        "raw_bytes": sum(r["raw_len"] for r in rows),
        "stored_bytes": sum(r["stored_len"] for r in rows if r["record_byte_offset"] == 0),
        "files": len(files),
    }
    _need(tot == want_tot, f"MANIFEST.json: totals {tot} != index {want_tot}")


# ---------------------------------------------------------------- section 7: data files


def parse_header(hdr: bytes) -> tuple[int, bytes]:
    """Check a 4096-byte file header; return (rank, uuid bytes)."""
    _need(len(hdr) == HEADER_SIZE, "file header: short")
    magic, ver, rank, uid, alignment, zero, h = struct.unpack_from("<8sII16sIIQ", hdr, 0)
    _need(magic == b"CKGDATA1", "file header: bad magic")
    _need(ver == 1, f"file header: version {ver}")
    _need(alignment == ALIGN, f"file header: alignment {alignment}")
    _need(zero == 0, "file header: nonzero field at 36")
    _need(h == xxh3_64(hdr[:40]), "file header: hash mismatch")
    _need(hdr[48:].count(0) == HEADER_SIZE - 48, "file header: nonzero bytes after 48")
    return rank, uid


def parse_trailer(tr: bytes, size: int) -> tuple[int, int, int]:
    """Check the 32-byte trailer; return (footer offset, footer length, footer hash)."""
    off, length, h, magic = struct.unpack("<QQQ8s", tr)
    _need(magic == b"CKGFOOT1", "trailer: bad magic")
    _need(off >= HEADER_SIZE and off % ALIGN == 0, f"trailer: bad footer offset {off}")
    _need(length > 0 and off + length + TRAILER_SIZE == size, "trailer: sizes do not add up")
    return off, length, h


def scan_data_file(path: str, fd: int | None = None, size: int | None = None) -> DataFileLayout:
    """Parse a data file's header, trailer and footer, checking their internal consistency
    (not against a manifest). ``size``: the data file's, where it is the first part of ``fd``
    (a one-file checkpoint, section 10)."""
    name = os.path.basename(path)
    own = fd is None
    if fd is None:
        fd, size = _open_regular(path, name)
    elif size is None:
        size = os.fstat(fd).st_size
    try:
        _need(size >= HEADER_SIZE + TRAILER_SIZE + 1, f"{name}: too small ({size} bytes)")
        rank, uid = parse_header(_pread_exact(fd, HEADER_SIZE, 0, name))
        try:
            foff, flen, fh = parse_trailer(
                _pread_exact(fd, TRAILER_SIZE, size - TRAILER_SIZE, name), size
            )
        except SpecViolation as e:
            raise SpecViolation(f"{name}: {e}") from None
        fb = _pread_exact(fd, flen, foff, name)
    finally:
        if own:
            os.close(fd)
    _need(xxh3_64(fb) == fh, f"{name}: footer hash mismatch")
    footer = strict_json(fb, f"{name} footer")
    _need(
        isinstance(footer, dict) and set(footer) == {"rank", "uuid", "rows"},
        f"{name}: footer members",
    )
    _need(footer["rank"] == rank and _is_int(footer["rank"]), f"{name}: footer rank != header")
    _need(footer["uuid"] == uid.hex(), f"{name}: footer uuid != header uuid")
    _need(isinstance(footer["rows"], list), f"{name}: footer rows is not a list")
    records: list[Record] = []
    expect = HEADER_SIZE
    rows = footer["rows"]
    # the packed-record members are in every row of a file with a packed record, else in none
    offsets = [row.get("offset") if isinstance(row, dict) else None for row in rows]
    packed = len(set(offsets)) < len(offsets)
    members = PACKED_FOOTER_ROW_MEMBERS if packed else FOOTER_ROW_MEMBERS
    if rows and isinstance(rows[0], dict) and "digest" in rows[0]:  # feature digests
        members = members | {"digest"}
    for i, row in enumerate(rows):
        _need(isinstance(row, dict) and set(row) == members, f"{name}: footer row {i} members")
        off, sl = row["offset"], row["stored_len"]
        _need(_is_int(off) and _is_int(sl) and sl >= 0, f"{name}: footer row {i} offset/len")
        if records and off == records[-1].offset:  # another row of a packed record
            records[-1].rows.append(row)
            continue
        # the layout of section 7: records back to back from 4096, each padded to 4096
        _need(off == expect, f"{name}: record {len(records)} at {off}, expected {expect}")
        rec = Record(seq=len(records), offset=off, stored_len=sl, row=row, rows=[row])
        expect = rec.end
        records.append(rec)
    _need(foff == expect, f"{name}: footer at {foff}, expected {expect} (after last record)")
    return DataFileLayout(
        name=name,
        size=size,
        rank=rank,
        uuid=uid.hex(),
        footer_offset=foff,
        footer_len=flen,
        records=records,
        footer=fb,
    )


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def footer_row_of(index_row: dict[str, Any], packed: bool) -> dict[str, Any]:
    """An index row in the footer's JSON form (hash as text; the packed-record members only in
    a file that holds a packed record)."""
    r = dict(index_row)
    if not packed:
        del r["record_byte_offset"], r["record_raw_len"]
    r["hash"] = r["hash"].hex()
    if "digest" in r:
        r["digest"] = r["digest"].hex()
    r["global_shape"] = list(r["global_shape"])
    r["shard_offsets"] = list(r["shard_offsets"])
    r["shard_lengths"] = list(r["shard_lengths"])
    return r


def unshuffle(data: bytes, w: int) -> bytes:
    """Inverse of the byte-plane shuffle of width ``w``."""
    if w == 1:
        return data
    n = len(data) // w
    return np.frombuffer(data, dtype=np.uint8).reshape(w, n).T.tobytes()


def shuffle(data: bytes, w: int) -> bytes:
    """Byte-plane shuffle of width ``w`` (output byte j*n+i = input byte i*w+j)."""
    if w == 1:
        return data
    n = len(data) // w
    return np.frombuffer(data, dtype=np.uint8).reshape(n, w).T.tobytes()


def zstd_frame(payload: bytes, raw_len: int, where: str) -> bytes:
    """Decode a shuffle-zstd payload (section 7): one zstd frame (RFC 8878) with the magic, no
    checksum or dictionary, Frame_Content_Size == raw_len, nothing after the frame."""
    _need(len(payload) >= 6 and payload[:4] == b"\x28\xb5\x2f\xfd", f"{where}: no zstd magic")
    fhd = payload[4]
    _need(fhd & 0x07 == 0, f"{where}: zstd frame with a checksum or dictionary flag")
    single, fcs_flag = fhd >> 5 & 1, fhd >> 6
    size = [1 if single else 0, 2, 4, 8][fcs_flag]
    _need(size > 0, f"{where}: zstd frame without its content size")
    at = 5 + (0 if single else 1)  # the window descriptor, absent in single-segment frames
    _need(len(payload) >= at + size, f"{where}: zstd frame header truncated")
    fcs = int.from_bytes(payload[at : at + size], "little") + (256 if size == 2 else 0)
    _need(fcs == raw_len, f"{where}: zstd content size {fcs} != raw_len {raw_len}")
    try:
        data = zstandard.ZstdDecompressor().decompress(payload, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise SpecViolation(f"{where}: zstd frame does not decode: {e}") from None
    _need(len(data) == raw_len, f"{where}: decoded {len(data)} != raw_len")
    return data


def read_chunk(
    fd: int,
    rec: Record,
    row: dict[str, Any],
    name: str,
    verify: bool = True,
    seal: SealContext | None = None,
) -> bytes | None:
    """Read, check and decode one chunk record (section 8): all its raw bytes (of a packed
    record, the concatenation of its rows' slices). A sealed record (section 4.4) is checked as
    stored, then opened with its data key from ``seal``; None where that key is unavailable."""
    where = f"{name}: record {rec.seq} (key={row['key']!r}, chunk={row['chunk']})"
    hdr = _pread_exact(fd, RECORD_HEADER, rec.offset, where)
    magic, codec, es, flags, z1, raw_len, stored_len, h, seq, nonce, hh = struct.unpack(
        "<4sBBBBQQ16sI12sQ", hdr
    )
    _need(magic == b"CKGR", f"{where}: bad record magic")
    _need(hh == xxh3_64(hdr[:56]), f"{where}: record header hash mismatch")
    _need(z1 == 0, f"{where}: nonzero reserved header byte 7")
    _need(flags in (0, 1), f"{where}: record flags {flags} are neither 0 nor 1")
    sealed = flags == 1
    _need(sealed or nonce == bytes(12), f"{where}: nonzero nonce in a record in the clear")
    _need(not sealed or row["key_id"] is not None, f"{where}: sealed under a row without key_id")
    _need(sealed or row["key_id"] is None, f"{where}: in the clear under a row with a key_id")
    _need(codec == CODECS[row["codec"]], f"{where}: codec id != row")
    _need(es == row["elem_size"], f"{where}: elem_size != row")
    _need(
        raw_len == row["record_raw_len"] and stored_len == row["stored_len"],
        f"{where}: len != row",
    )
    _need(sealed or h == row["hash"], f"{where}: hash != row")
    _need(seq == rec.seq, f"{where}: sequence number {seq} != {rec.seq}")
    payload = _pread_exact(fd, stored_len, rec.payload_offset, where)
    pad = _pread_exact(fd, rec.end - rec.payload_end, rec.payload_end, where)
    _need(pad.count(0) == len(pad), f"{where}: nonzero padding")
    if sealed:
        _need(seal is not None, f"{where}: a sealed record and no keys to open it with")
        assert seal is not None
        if verify:  # every stored byte is checked, key or not (section 4.4)
            _need(
                xxhash.xxh3_128(payload).digest() == h,
                f"{where}: xxh3-128 of the stored payload mismatch",
            )
            if "digest" in row:
                _need(
                    hashlib.sha256(payload).digest() == row["digest"],
                    f"{where}: SHA-256 of the stored payload mismatch",
                )
        key = seal.keys[row["key_id"]]
        if key.dk is None:
            return None
        aad = seal_aad(seal, rec.seq, row["key_id"], codec, es, raw_len)
        payload = key.open(seal.uuid, seal.rank, nonce, payload, aad, where)
    raw = decode_payload(codec, payload, raw_len, es, where)
    if verify and sealed:
        assert seal is not None
        fp = seal.keys[row["key_id"]].fingerprint(raw)
        _need(fp == row["hash"], f"{where}: fingerprint of the decoded bytes != row hash")
    elif verify:
        _need(xxhash.xxh3_128(raw).digest() == h, f"{where}: xxh3-128 of the bytes mismatch")
        if "digest" in row:
            _need(hashlib.sha256(raw).digest() == row["digest"], f"{where}: SHA-256 mismatch")
    return raw


def decode_payload(codec: int, payload: bytes, raw_len: int, es: int, where: str) -> bytes:
    """A codec payload (section 7) decoded to exactly ``raw_len`` raw bytes."""
    if codec == 0:
        raw = payload
    elif codec == 2:
        raw = unshuffle(zstd_frame(payload, raw_len, where), es)
    else:
        try:
            shuffled = lz4.block.decompress(payload, uncompressed_size=raw_len)
        except lz4.block.LZ4BlockError as e:
            raise SpecViolation(f"{where}: LZ4 block does not decode: {e}") from None
        _need(len(shuffled) == raw_len, f"{where}: decoded {len(shuffled)} != raw_len")
        raw = unshuffle(shuffled, es)
    _need(len(raw) == raw_len, f"{where}: decoded length != raw_len")
    return raw


# ---------------------------------------------------------------- sections 1.1, 4.4: keys

KEYS_DIR = ".keys"
MAX_KEY_ENTRY = 4096
SEAL_MAGIC = b"CKGSEAL1"
LIVE_MEMBERS = {"scope", "key_id", "created", "kek_id", "nonce", "wrapped"}
TOMBSTONE_MEMBERS = {"scope", "key_id", "shredded", "reason", "user", "host"}


class KeyringViolation(SpecViolation):
    """A damaged keyring entry (section 1.1: a link or non-regular file, other members, a scope
    that does not match its file name, a wrap that does not authenticate)."""


class SealedUnreadable(Exception):
    """A sealed tensor's bytes were asked for and its scope's data key was not available (no
    key-encryption key, another one, a shredded scope, no keyring entry). Not a SpecViolation:
    the checkpoint is whole, this reader just cannot open that scope."""

    def __init__(self, key: str, scope: str, reason: str) -> None:
        super().__init__(f"{key}: sealed in scope {scope!r}, unreadable: {reason}")
        self.key, self.scope, self.reason = key, scope, reason


def scope_id(scope: str) -> str:
    """``<sid>`` of a scope's keyring entry (section 1.1)."""
    return hashlib.sha256(b"ckptguard scope\0" + scope.encode("utf-8")).hexdigest()[:32]


def kek_id(kek: bytes) -> str:
    """The ``kek_id`` of a key-encryption key (section 1.1)."""
    return hashlib.sha256(b"ckptguard kek id v1\0" + kek).hexdigest()[:32]


def _hkdf(ikm: bytes, salt: bytes | None, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


@dataclass
class ScopeKey:
    """The data key of one manifest ``encryption.keys`` entry, or why this reader has none."""

    scope: str
    key_id: str
    dk: bytes | None
    reason: str = ""  # why dk is None
    _fk: bytes | None = None

    def fingerprint(self, raw: bytes) -> bytes:
        """A sealed row's ``hash``: xxh3-128 of the raw bytes, enciphered as one AES-256 block
        under the fingerprint key (section 4.4)."""
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        assert self.dk is not None
        if self._fk is None:
            self._fk = _hkdf(self.dk, None, b"ckptguard fingerprint v1")
        enc = Cipher(algorithms.AES(self._fk), modes.ECB()).encryptor()
        return enc.update(xxhash.xxh3_128(raw).digest()) + enc.finalize()

    def open(
        self, uuid: bytes, rank: int, nonce: bytes, payload: bytes, aad: bytes, where: str
    ) -> bytes:
        """Authenticate and decrypt a stored payload under the data file's record key."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        assert self.dk is not None
        rk = _hkdf(self.dk, uuid, b"ckptguard record key v1\0" + struct.pack("<I", rank))
        try:
            return AESGCM(rk).decrypt(nonce, payload, aad)
        except InvalidTag:
            raise SpecViolation(f"{where}: sealed record does not authenticate") from None


@dataclass
class SealContext:
    """What opening a sealed record needs besides its header: its data file's header uuid and
    rank (a linked file's holder's), its index rows, the data keys by key_id."""

    uuid: bytes
    rank: int
    rows: list[dict[str, Any]]
    keys: dict[str, ScopeKey]


def seal_aad(seal: SealContext, seq: int, key_id: str, codec: int, es: int, raw_len: int) -> bytes:
    """The associated data of a sealed record (section 4.4)."""
    rows = sorted(seal.rows, key=lambda r: r["record_byte_offset"])
    parts = [
        SEAL_MAGIC,
        seal.uuid,
        struct.pack("<II", seal.rank, seq),
        bytes.fromhex(key_id),
        struct.pack("<BBQI", codec, es, raw_len, len(rows)),
    ]
    for r in rows:
        so = list(r["shard_offsets"])
        key = r["key"].encode("utf-8")
        parts.append(
            struct.pack(
                "<QQIQI",
                r["record_byte_offset"],
                r["raw_len"],
                r["chunk"],
                r["shard_byte_offset"],
                len(so),
            )
        )
        parts.append(struct.pack(f"<{len(so)}q", *so))
        parts.append(struct.pack("<I", len(key)) + key)
    return b"".join(parts)


def read_keyring_entry(store: str, scope: str) -> dict[str, Any] | None:
    """The checked entry of ``scope`` in ``<store>/.keys`` (section 1.1); None where the store
    has no keyring or no entry for it."""
    keys_dir = os.path.join(store, KEYS_DIR)
    try:
        st = os.lstat(keys_dir)
    except FileNotFoundError:
        return None
    _need_k(stat.S_ISDIR(st.st_mode), f"{keys_dir}: not a directory (or a link)")
    path = os.path.join(keys_dir, scope_id(scope) + ".json")
    if not os.path.lexists(path):
        return None
    try:
        fd, size = _open_regular(path, path)
    except SpecViolation as e:
        raise KeyringViolation(str(e)) from None
    try:
        _need_k(size <= MAX_KEY_ENTRY, f"{path}: over {MAX_KEY_ENTRY} bytes")
        raw = _pread_exact(fd, size, 0, path)
    finally:
        os.close(fd)
    _need_k(raw.endswith(b"\n") and raw.isascii(), f"{path}: not ASCII ending in a newline")
    try:
        doc = strict_json(raw[:-1], path)
    except SpecViolation as e:
        raise KeyringViolation(str(e)) from None
    _need_k(isinstance(doc, dict) and _canonical(doc) == raw[:-1], f"{path}: not canonical JSON")
    _need_k(set(doc) in (LIVE_MEMBERS, TOMBSTONE_MEMBERS), f"{path}: wrong members")
    _need_k(all(isinstance(v, str) for v in doc.values()), f"{path}: a member is not a string")
    _need_k(doc["scope"] == scope, f"{path}: scope {doc['scope']!r} is not its file's")
    _need_k(bool(HEX32_RE.fullmatch(doc["key_id"])), f"{path}: key_id is not 32 hex")
    if set(doc) == LIVE_MEMBERS:
        _need_k(bool(CREATED_RE.fullmatch(doc["created"])), f"{path}: bad created")
        _need_k(bool(HEX32_RE.fullmatch(doc["kek_id"])), f"{path}: kek_id is not 32 hex")
        _need_k(bool(re.fullmatch(r"[0-9a-f]{24}", doc["nonce"])), f"{path}: nonce")
        _need_k(bool(re.fullmatch(r"[0-9a-f]{96}", doc["wrapped"])), f"{path}: wrapped")
    else:
        _need_k(bool(CREATED_RE.fullmatch(doc["shredded"])), f"{path}: bad shredded")
        _need_k(len(doc["reason"]) <= 1024, f"{path}: reason over 1024 characters")
        _need_k(max(len(doc["user"]), len(doc["host"])) <= 256, f"{path}: user/host too long")
    return doc


def _need_k(cond: bool, msg: str) -> None:
    if not cond:
        raise KeyringViolation(msg)


def unwrap_scope(store: str | None, scope: str, key_id: str, kek: bytes | None) -> ScopeKey:
    """The data key ``key_id`` of ``scope`` from the store's keyring, unwrapped under ``kek``;
    a ScopeKey without one (and the reason) where the reader cannot have it."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    def none(reason: str) -> ScopeKey:
        return ScopeKey(scope, key_id, None, reason)

    if store is None:
        return none("no store keyring (a one-file checkpoint)")
    entry = read_keyring_entry(store, scope)
    if entry is None:
        return none("no keyring entry for the scope")
    if "shredded" in entry:
        return none(f"scope shredded at {entry['shredded']}")
    if entry["key_id"] != key_id:
        return none(f"the keyring holds another key ({entry['key_id']}) for the scope")
    if kek is None:
        return none("no key-encryption key")
    if entry["kek_id"] != kek_id(kek):
        return none("the data key is wrapped under another key-encryption key")
    aad = b"ckptguard keyring v1\0" + key_id.encode("ascii") + b"\0" + scope.encode("utf-8")
    try:
        dk = AESGCM(kek).decrypt(
            bytes.fromhex(entry["nonce"]), bytes.fromhex(entry["wrapped"]), aad
        )
    except InvalidTag:
        raise KeyringViolation(
            f"keyring entry of scope {scope!r}: the wrap does not authenticate"
        ) from None
    return ScopeKey(scope, key_id, dk)


def data_keys(body: dict[str, Any], store: str | None, kek: bytes | None) -> dict[str, ScopeKey]:
    """Every data key the manifest's ``encryption.keys`` names, by key_id."""
    if kek is not None and not (isinstance(kek, bytes) and len(kek) == 32):
        raise ValueError("a key-encryption key is 32 raw bytes")
    keys = body.get("encryption", {}).get("keys", [])
    return {k["key_id"]: unwrap_scope(store, k["scope"], k["key_id"], kek) for k in keys}


# ---------------------------------------------------------------- section 6: the tree


def escape_key(part: str) -> str:
    return part.replace("%", "%25").replace("/", "%2F")


class _TreeDecoder:
    def __init__(self, ntensors: int) -> None:
        self.ntensors = ntensors
        self.paths: dict[int, list[str]] = collections.defaultdict(list)
        self.quantized_values: list[Quantized] = []
        self.quantized_by_text: dict[str, Quantized] = {}  # one object per stored value

    def decode(self, v: Any, path: tuple[str, ...], depth: int) -> Any:
        _need(depth <= MAX_DEPTH, "tree: nesting deeper than 512")
        if v is None or isinstance(v, (bool, str)):
            return v
        if _is_int(v):
            _need(-(2**63) <= v < 2**63, f"tree: integer {v} outside int64 must be $int")
            return v
        if isinstance(v, float):
            _need(math.isfinite(v), "tree: non-finite number")
            return v
        if isinstance(v, list):
            return [self.decode(x, (*path, str(i)), depth + 1) for i, x in enumerate(v)]
        _need(isinstance(v, dict), f"tree: unexpected JSON value {type(v)}")
        tags = [k for k in v if k.startswith("$")]
        if not tags:
            return {k: self.decode(x, (*path, escape_key(k)), depth + 1) for k, x in v.items()}
        _need(len(tags) == 1, f"tree: several tags {tags}")
        tag = tags[0]
        members = set(v)
        exact = {
            "$npscalar": {"$npscalar", "hex"},
            "$path": {"$path", "class"},
            "$enum": {"$enum", "name"},
            "$dataclass": {"$dataclass", "fields"},
            "$namedtuple": {"$namedtuple", "fields"},
            "$meta": {"$meta", "shape", "requires_grad", "parameter"},
            "$sparse": {"$sparse", "shape", "parts", "coalesced"},
            "$structured": {"$structured", "shape", "data"},
            "$quantized": {"$quantized", "qscheme", "int_repr", "scale", "zero_point", "axis"},
        }.get(tag, {tag})
        if tag == "$odict" and members == {"$odict", "metadata"}:  # section 6.2
            exact = members
        _need(members == exact, f"tree: tagged value {tag} has members {sorted(members)}")
        x = v[tag]
        if tag in TYPE_TAGS:
            return self.typed(tag, x, v, path, depth)
        if tag == "$int":
            _need(
                isinstance(x, str)
                and bool(re.fullmatch(rf"-?[1-9][0-9]{{0,{MAX_DIGITS - 1}}}", x)),
                "tree: $int is not a canonical decimal of at most 4300 digits",
            )
            n = int(x)
            _need(not -(2**63) <= n < 2**63, f"tree: $int {n} fits int64 (must be a number)")
            return n
        if tag == "$float":
            _need(x in ("inf", "-inf", "nan"), f"tree: bad $float {x!r}")
            return float(x)
        if tag == "$bytes":
            return _base64(tag, x)
        if tag == "$tuple":
            _need(isinstance(x, list), "tree: $tuple is not a list")
            return tuple(self.decode(e, (*path, str(i)), depth + 1) for i, e in enumerate(x))
        if tag in ("$dict", "$odict"):
            _need(isinstance(x, list), f"tree: {tag} is not a list")
            out: dict[Any, Any] = {} if tag == "$dict" else collections.OrderedDict()
            for pair in x:
                _need(isinstance(pair, list) and len(pair) == 2, f"tree: bad {tag} entry")
                kn, val = pair
                if isinstance(kn, str) or _is_int(kn):
                    k, part = kn, escape_key(kn) if isinstance(kn, str) else str(kn)
                else:  # section 6.2: a hashable value, its path part its canonical JSON text
                    k, part = self.hashable(kn, depth + 1), escape_key(canonical_json(kn))
                _need(k not in out, f"tree: duplicate {tag} key {k!r}")
                out[k] = self.decode(val, (*path, part), depth + 1)
            _need(
                tag == "$odict" or any(not isinstance(k, str) or k.startswith("$") for k in out),
                "tree: $dict whose keys are all plain strings (must be an object)",
            )
            if "metadata" in v:  # section 6.2: the OrderedDict's attribute _metadata
                meta = self.decode(v["metadata"], (*path, "_metadata"), depth + 1)
                _need(_plain(v["metadata"]), "tree: $odict metadata is not a plain value")
                out._metadata = meta  # type: ignore[attr-defined]
            return out
        if tag == "$tensor":
            _need(_is_int(x) and 0 <= x < self.ntensors, f"tree: bad tensor id {x!r}")
            self.paths[x].append("/".join(path))
            return TensorRef(x)
        if tag == "$npscalar":
            _need(x in NUMPY_DTYPES, f"tree: $npscalar dtype {x!r}")
            hx = v["hex"]
            _need(
                isinstance(hx, str)
                and len(hx) == 2 * DTYPE_SIZES[x]
                and bool(re.fullmatch(r"[0-9a-f]*", hx)),
                "tree: $npscalar hex is not lowercase hex of the dtype's size",
            )
            raw = bytes.fromhex(hx)
            return NpScalar(x, raw)
        if tag == "$dtype":  # a quantized dtype's name: section 6.2 (feature tree-types)
            _need(
                isinstance(x, str) and (x in DTYPE_SIZES or x in QUANTIZED_DTYPES),
                f"tree: bad $dtype {x!r}",
            )
            return DType(x)
        if tag == "$size":
            _need(
                isinstance(x, list) and all(_is_int(d) and 0 <= d < 2**63 for d in x),
                "tree: $size is not a list of ints in [0, 2**63)",
            )
            return Size(tuple(x))
        if tag == "$device":
            _need(
                isinstance(x, str)
                and bool(re.fullmatch(r"[a-z][a-z0-9_]{0,63}(:(0|[1-9][0-9]{0,8}))?", x)),
                f"tree: bad $device {x!r}",
            )
            return Device(x)
        if tag == "$pickle":
            return Pickled(_base64(tag, x))
        raise SpecViolation(f"tree: unknown tag {tag!r}")

    def hashable(self, node: Any, depth: int) -> Any:
        """A set element or a dict key other than str and int (section 6.2)."""
        value = self.decode(node, (), depth)
        _need(_hashable_shape(node), f"tree: {str(node)[:80]} is not a hashable value")
        return value

    def typed(self, tag: str, x: Any, v: dict, path: tuple[str, ...], depth: int) -> Any:
        """The tags of section 6.2 (feature tree-types)."""
        sub = depth + 1
        if tag in ("$set", "$frozenset"):
            _need(isinstance(x, list), f"tree: {tag} is not a list")
            elems = [self.hashable(e, sub) for e in x]
            texts = [canonical_json(e) for e in x]
            _need(texts == sorted(set(texts)), f"tree: {tag} elements not in canonical order")
            _need(len(set(elems)) == len(elems), f"tree: {tag} has equal elements")
            return set(elems) if tag == "$set" else frozenset(elems)
        if tag == "$complex":
            _need(isinstance(x, list) and len(x) == 2, "tree: $complex is not a pair")
            re_, im = (self.decode(e, path, sub) for e in x)
            _need(isinstance(re_, float) and isinstance(im, float), "tree: $complex parts")
            return complex(re_, im)
        if tag == "$slice":
            _need(isinstance(x, list) and len(x) == 3, "tree: $slice is not a triple")
            return slice(*(self.decode(e, (*path, str(i)), sub) for i, e in enumerate(x)))
        if tag == "$path":
            cls = v["class"]
            _need(cls in ("Path", "PurePosixPath", "PureWindowsPath"), "tree: $path class")
            _need(isinstance(x, str) and x != "", "tree: $path is not a non-empty string")
            if cls != "Path":
                pure = pathlib.PurePosixPath if cls == "PurePosixPath" else pathlib.PureWindowsPath
                _need(str(pure(x)) == x, f"tree: $path {x!r} is not canonical")
            return PathValue(cls, x)
        if tag == "$namespace":
            d = self.decode(x, path, sub)
            _need(type(d) is dict and all(isinstance(k, str) for k in d), "tree: $namespace")
            return Namespace(d)
        if tag == "$meta":
            return _meta(x, v)
        if tag == "$structured":
            shape, data = v["shape"], v["data"]
            _need(
                isinstance(x, list)
                and len(x) > 0
                and all(isinstance(f, list) and len(f) == 2 for f in x)
                and all(isinstance(n, str) and n != "" and d in NUMPY_DTYPES for n, d in x)
                and len({n for n, _ in x}) == len(x),
                "tree: $structured fields",
            )
            _need(
                isinstance(shape, list)
                and len(shape) <= MAX_DIMS
                and all(_is_int(d) and 0 <= d < 2**63 for d in shape),
                "tree: $structured shape",
            )
            _need(isinstance(data, dict) and set(data) == {"$tensor"}, "tree: $structured data")
            ref = self.decode(data, path, depth)
            return Structured(tuple((n, d) for n, d in x), tuple(shape), ref)
        if tag == "$sparse":
            names = SPARSE_PARTS.get(x) if isinstance(x, str) else None
            _need(names is not None, f"tree: $sparse layout {x!r}")
            assert names is not None
            shape, parts, coalesced = v["shape"], v["parts"], v["coalesced"]
            _need(isinstance(coalesced, bool) and (x == "coo" or not coalesced), "tree: coalesced")
            _need(
                isinstance(shape, list)
                and len(shape) <= MAX_DIMS
                and all(_is_int(d) and 0 <= d < 2**63 for d in shape),
                "tree: $sparse shape",
            )
            _need(
                isinstance(parts, list)
                and len(parts) == len(names)
                and all(isinstance(p, dict) and set(p) == {"$tensor"} for p in parts),
                "tree: $sparse parts are not tensor references",
            )
            refs = [self.decode(p, (*path, n), depth) for n, p in zip(names, parts, strict=True)]
            return Sparse(x, tuple(shape), tuple(refs), coalesced)
        if tag == "$quantized":
            return self.quantized(x, v, path, depth)
        _need(isinstance(x, str), f"tree: {tag} class name is not a string")
        if tag == "$enum":
            _need(isinstance(v["name"], str), "tree: $enum name is not a string")
            return EnumMember(x, v["name"])
        fields = self.decode(v["fields"], path, sub)
        if tag == "$dataclass":
            _need(
                type(fields) is dict and all(isinstance(k, str) for k in fields),
                "tree: $dataclass fields are not an object of str keys",
            )
        else:
            _need(isinstance(v["fields"], list), "tree: $namedtuple fields are not an array")
        return Registered(tag, x, fields)

    def quantized(self, x: Any, v: dict, path: tuple[str, ...], depth: int) -> Quantized:
        """Section 6.2 ``$quantized``: its structure here; its part tensors' dtypes and shapes
        against their manifest entries in ``check_quantized``."""
        scheme, axis = v["qscheme"], v["axis"]
        _need(isinstance(x, str) and x in QUANTIZED_INT_DTYPES, f"tree: $quantized dtype {x!r}")
        _need(
            isinstance(scheme, str) and scheme in QSCHEMES, f"tree: $quantized qscheme {scheme!r}"
        )
        per_tensor = scheme == "per_tensor_affine"
        names = ("int_repr",) if per_tensor else ("int_repr", "scale", "zero_point")
        _need(
            all(isinstance(v[n], dict) and set(v[n]) == {"$tensor"} for n in names),
            f"tree: $quantized {names} are not tensor references",
        )
        refs = [self.decode(v[n], (*path, n), depth) for n in names]
        if per_tensor:
            scale = self.decode(v["scale"], path, depth)
            _need(isinstance(scale, float), "tree: $quantized per tensor scale is not a float")
            zp = v["zero_point"]
            _need(_is_int(zp) and -(2**63) <= zp < 2**63, "tree: $quantized zero_point")
            _need(axis is None, "tree: $quantized per tensor axis is not null")
            q = Quantized(x, scheme, refs[0], scale, zp, None)
        else:
            _need(_is_int(axis) and 0 <= axis < MAX_DIMS, "tree: $quantized axis")
            q = Quantized(x, scheme, refs[0], refs[1], refs[2], axis)
        self.quantized_values.append(q)
        # the same JSON value twice is one quantized tensor reached twice: one object
        return self.quantized_by_text.setdefault(canonical_json(v), q)


TYPE_TAGS = {
    "$set",
    "$frozenset",
    "$complex",
    "$slice",
    "$path",
    "$namespace",
    "$dataclass",
    "$enum",
    "$namedtuple",
    "$meta",
    "$sparse",
    "$structured",
    "$quantized",
}
QUANTIZED_INT_DTYPES = {"quint8": "uint8", "qint8": "int8", "qint32": "int32"}
QUANTIZED_DTYPES = {*QUANTIZED_INT_DTYPES, "quint4x2", "quint2x4"}
# per channel: the dtypes of the scale and zero-point tensors
QSCHEMES = {
    "per_tensor_affine": None,
    "per_channel_affine": ("float64", "int64"),
    "per_channel_affine_float_qparams": ("float32", "float32"),
}
FLOAT_DTYPE_PREFIXES = ("float", "bfloat", "complex")
SPARSE_PARTS = {"coo": ("indices", "values"), "csr": ("crow_indices", "col_indices", "values")}


def canonical_json(v: Any) -> str:
    """Section 6.2: compact JSON, no ASCII escaping, members in stored order."""
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _hashable_shape(node: Any) -> bool:
    if node is None or isinstance(node, (bool, int, float, str)):
        return True
    if not isinstance(node, dict):
        return False
    if set(node) == {"$enum", "name"}:
        return True
    if len(node) != 1:
        return False
    tag, x = next(iter(node.items()))
    if tag in ("$int", "$float", "$complex", "$bytes"):
        return True
    return tag in ("$tuple", "$frozenset") and all(_hashable_shape(e) for e in x)


def _meta(dtype: Any, v: dict) -> Meta:
    shape, grad, param = v["shape"], v["requires_grad"], v["parameter"]
    _need(dtype in DTYPE_SIZES, f"tree: $meta dtype {dtype!r}")
    _need(isinstance(grad, bool) and isinstance(param, bool), "tree: $meta flags")
    _need(
        isinstance(shape, list)
        and len(shape) <= MAX_DIMS
        and all(_is_int(d) and 0 <= d < 2**63 for d in shape),
        "tree: $meta shape",
    )
    _need(math.prod(d for d in shape if d) * DTYPE_SIZES[dtype] <= 2**62, "tree: $meta too large")
    _need(not grad or dtype.startswith(FLOAT_DTYPE_PREFIXES), "tree: $meta grad of int dtype")
    return Meta(dtype, tuple(shape), grad, param)


def _base64(tag: str, x: Any) -> bytes:
    """Standard padded base64 whose pad bits are zero: the one text that encodes its bytes."""
    _need(isinstance(x, str), f"tree: {tag} is not a string")
    try:
        blob = base64.b64decode(x, validate=True)
    except ValueError:
        raise SpecViolation(f"tree: bad base64 in {tag}") from None
    _need(base64.b64encode(blob).decode() == x, f"tree: non-canonical base64 in {tag}")
    return blob


def decode_tree(body: dict[str, Any]) -> tuple[Any, dict[int, Any]]:
    """Decode the object tree and the per-rank trees (section 6); tensors become ``TensorRef``.
    Checks each tensor's key is the path of (one of) the places it appears in any tree."""
    dec = _TreeDecoder(len(body["tensors"]))
    out = dec.decode(body["tree"], (), 0)
    feats = set(body.get("features", []))
    ranks = {
        int(r): dec.decode(apply_diff(body["tree"], t) if "rank-tree-diffs" in feats else t, (), 0)
        for r, t in body["rank_trees"].items()
    }
    for tid, paths in dec.paths.items():
        key = body["tensors"][tid]["key"]
        if set(paths) == {""}:
            continue  # a tensor at the root: its path is empty and format.md names no key for it
        _need(key in paths, f"tree: tensors[{tid}].key {key!r} is none of its paths {paths}")
    if "pickle" not in feats:
        _need(
            not any(_contains_pickle(t) for t in (out, *ranks.values())),
            "tree: $pickle without the pickle feature",
        )
    for q in dec.quantized_values:
        check_quantized(q, body["tensors"])
    uses = any(_uses_types(t) for t in (body["tree"], *body["rank_trees"].values()))
    _need(uses == ("tree-types" in feats), "tree: feature tree-types listed iff its tags are used")
    return out, ranks


def check_quantized(q: Quantized, tensors: list[dict]) -> None:
    """Section 6.2: a ``$quantized`` value's part tensors, by their manifest entries."""
    data = tensors[q.int_repr.id]
    _need(
        data["dtype"] == QUANTIZED_INT_DTYPES[q.dtype],
        f"tree: $quantized {q.dtype} int_repr is {data['dtype']}",
    )
    want = QSCHEMES[q.qscheme]
    if want is None:
        return
    shape = data["shape"]
    _need(q.axis is not None and q.axis < len(shape), "tree: $quantized axis beyond int_repr")
    assert q.axis is not None
    for part, dtype in zip((q.scale, q.zero_point), want, strict=True):
        assert isinstance(part, TensorRef)
        entry = tensors[part.id]
        _need(
            entry["dtype"] == dtype and entry["shape"] == [shape[q.axis]],
            f"tree: $quantized {q.qscheme} parameter tensor {entry['key']!r} is "
            f"{entry['dtype']} {entry['shape']}, not {dtype} [{shape[q.axis]}]",
        )


def _plain(v: Any) -> bool:
    """Section 6.2: a plain value (what an $odict's metadata may be)."""
    if v is None or isinstance(v, (bool, str, float)) or _is_int(v):
        return True
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    tags = [k for k in v if k.startswith("$")]
    if not tags:
        return all(_plain(x) for x in v.values())
    if len(v) != 1:
        return False
    tag, x = tags[0], v[tags[0]]
    if tag in ("$int", "$float", "$bytes"):
        return True
    if tag == "$tuple":
        return all(_plain(e) for e in x)
    if tag in ("$dict", "$odict"):
        return all((isinstance(k, str) or _is_int(k)) and _plain(e) for k, e in x)
    return False


def _uses_types(v: Any) -> bool:
    """Whether a stored tree (or diff) has a tag of section 6.2, a $dict/$odict key that is
    not a string or integer, or an $odict with metadata."""
    if isinstance(v, list):
        return any(_uses_types(x) for x in v)
    if not isinstance(v, dict):
        return False
    if "$odict" in v and "metadata" in v:
        return True
    dtype = v.get("$dtype")
    if any(k in TYPE_TAGS for k in v) or (isinstance(dtype, str) and dtype in QUANTIZED_DTYPES):
        return True
    pairs = v.get("$dict", v.get("$odict"))
    if isinstance(pairs, list) and any(
        isinstance(p, list) and p and not (isinstance(p[0], str) or _is_int(p[0])) for p in pairs
    ):
        return True
    return any(_uses_types(x) for x in v.values())


def _contains_pickle(v: Any) -> bool:
    if isinstance(v, Pickled):
        return True
    if isinstance(v, (list, tuple)):
        return any(_contains_pickle(x) for x in v)
    if isinstance(v, dict):
        return any(_contains_pickle(x) for x in v.values())
    return False


# ---------------------------------------------------------------- the whole checkpoint


def resolve(path: str) -> str:
    """A checkpoint dir as given, or a store's LATEST checkpoint."""
    if os.path.lexists(os.path.join(path, MANIFEST)):
        return path
    latest = os.path.join(path, LATEST)
    fd, size = _open_regular(latest, LATEST)
    try:
        _need(size <= MAX_LATEST, "LATEST: too large")
        data = _pread_exact(fd, size, 0, LATEST)
    finally:
        os.close(fd)
    _need(data.endswith(b"\n") and data.count(b"\n") == 1, "LATEST: not one name and a newline")
    name = data[:-1].decode("utf-8", "replace")
    _need(is_name(name), f"LATEST: bad name {name!r}")
    return os.path.join(path, name)


def read_checkpoint(
    path: str,
    verify: bool = True,
    trusted: dict[str, bytes] | None = None,
    kek: bytes | None = None,
) -> Checkpoint:
    """Read a whole checkpoint, checking every rule of sections 3-8 (and 10: a path that is not
    a directory is a one-file checkpoint). ``trusted`` (key id -> raw 32-byte Ed25519 public
    key): the checkpoint must also be signed by one of them (section 2.1).

    ``kek`` (32 raw bytes): the key-encryption key that unwraps the data keys of sealed records
    from the keyring of the store, the checkpoint directory's parent (sections 1.1, 4.4). A
    scope whose data key this reader cannot have (no ``kek``, another one, a shredded scope, no
    entry) is not an error: every stored byte of its records is still checked, its tensors come
    back with ``data=None`` and ``unreadable`` set (``numpy()`` raises SealedUnreadable), and
    ``Checkpoint.unreadable`` maps the scope to the reason. A damaged keyring entry raises
    KeyringViolation; a sealed record that fails authentication, SpecViolation."""
    if os.path.lexists(path) and not os.path.isdir(path):
        _need(trusted is None, "a one-file checkpoint carries no signature (section 2.1)")
        return read_onefile(path, verify, kek)
    ckpt_dir = resolve(path)
    raw = read_manifest_bytes(ckpt_dir)  # read once: the bytes hashed are the bytes parsed
    body = parse_manifest(raw)
    if trusted is not None:
        check_signature(ckpt_dir, raw, body, trusted)
    rows = read_index(ckpt_dir, body)

    def open_data(name: str) -> tuple[int, int]:
        return _open_regular(os.path.join(ckpt_dir, name), name)

    store = os.path.dirname(os.path.abspath(ckpt_dir))
    return _read_data(ckpt_dir, body, rows, open_data, verify, data_keys(body, store, kek))


# ---------------------------------------------------------------- section 2.1: signatures

SIGNATURE = "SIGNATURE.json"
MAX_SIGNATURE = 4096
SIGNATURE_PREFIX = b"ckptguard-checkpoint-signature-v1\n"
STATEMENT_MEMBERS = {"type", "checkpoint", "uuid", "manifest_sha256", "key_id", "signed_at"}
HEX64_RE = re.compile(r"[0-9a-f]{64}")
HEX128_RE = re.compile(r"[0-9a-f]{128}")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def raw_public_key(pem: bytes) -> bytes:
    """The raw 32 bytes of an Ed25519 public key in SubjectPublicKeyInfo PEM."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(pem)
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_signature(
    ckpt_dir: str, manifest_raw: bytes, body: dict[str, Any], trusted: dict[str, bytes]
) -> str:
    """Section 2.1: SIGNATURE.json is a regular file of canonical JSON and a newline, its
    statement names this manifest, checkpoint and uuid, its key is trusted, its signature
    verifies, and the checkpoint has chunk digests. Returns the signing key id."""
    import hashlib

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    fd, size = _open_regular(os.path.join(ckpt_dir, SIGNATURE), SIGNATURE)
    try:
        _need(size <= MAX_SIGNATURE, f"{SIGNATURE}: over {MAX_SIGNATURE} bytes")
        raw = _pread_exact(fd, size, 0, SIGNATURE)
    finally:
        os.close(fd)
    _need(raw.endswith(b"\n"), f"{SIGNATURE}: no final newline")
    doc = strict_json(raw[:-1], SIGNATURE)
    _need(isinstance(doc, dict) and _canonical(doc) == raw[:-1], f"{SIGNATURE}: not canonical")
    _need(set(doc) == {"sig", "statement"}, f"{SIGNATURE}: members")
    st, sig = doc["statement"], doc["sig"]
    _need(isinstance(sig, str) and bool(HEX128_RE.fullmatch(sig)), f"{SIGNATURE}: sig")
    _need(isinstance(st, dict) and set(st) == STATEMENT_MEMBERS, f"{SIGNATURE}: statement")
    _need(all(isinstance(v, str) for v in st.values()), f"{SIGNATURE}: statement types")
    _need(st["type"] == "ckptguard-checkpoint-signature-v1", f"{SIGNATURE}: type")
    _need(bool(HEX64_RE.fullmatch(st["key_id"])), f"{SIGNATURE}: key_id")
    _need(bool(CREATED_RE.fullmatch(st["signed_at"])), f"{SIGNATURE}: signed_at")
    _need(st["key_id"] in trusted, f"{SIGNATURE}: key {st['key_id'][:16]} is not trusted")
    pub = trusted[st["key_id"]]
    _need(hashlib.sha256(pub).hexdigest() == st["key_id"], "trusted key under another id")
    try:
        message = SIGNATURE_PREFIX + _canonical(st)
        Ed25519PublicKey.from_public_bytes(pub).verify(bytes.fromhex(sig), message)
    except InvalidSignature:
        raise SpecViolation(f"{SIGNATURE}: the signature does not verify") from None
    _need(
        st["manifest_sha256"] == hashlib.sha256(manifest_raw).hexdigest(),
        f"{SIGNATURE}: signs another MANIFEST.json",
    )
    _need((st["uuid"], st["checkpoint"]) == (body["uuid"], body["name"]), f"{SIGNATURE}: names")
    _need(
        os.path.basename(os.path.normpath(ckpt_dir)) == st["checkpoint"],
        f"{SIGNATURE}: signed as {st['checkpoint']!r}, read under another name",
    )
    _need("digests" in body.get("features", []), f"{SIGNATURE}: no chunk digests")
    return st["key_id"]


def _read_data(
    ckpt_dir: str,
    body: dict[str, Any],
    rows: list[dict[str, Any]],
    open_data: Any,
    verify: bool,
    keys: dict[str, ScopeKey],
) -> Checkpoint:
    """The data files' part of ``read_checkpoint``: ``open_data(name)`` gives (fd, size) of each
    data file, which starts at offset 0 of that fd; ``keys`` the data keys of its scopes."""
    fds: dict[str, int] = {}
    try:
        layouts: dict[str, DataFileLayout] = {}
        for f in body["files"]:
            name = f["name"]
            fd, size = open_data(name)
            fds[name] = fd
            _need(size == f["size"], f"{name}: size {size} != manifest size {f['size']}")
            lay = scan_data_file(os.path.join(ckpt_dir, name), fd, size)
            _need(lay.rank == f["rank"], f"{name}: header rank {lay.rank} != {f['rank']}")
            link = LINKED_RE.fullmatch(name)  # its holder's uuid (section 4.3)
            holder = link.group(2) if link else body["uuid"]
            _need(lay.uuid == holder, f"{name}: header uuid != the uuid it must have")
            layouts[name] = lay
        check_rows(body, rows, layouts)
        if "locator" in body:
            check_locator_rows(body, rows, layouts)
        by_file: dict[str, list[dict]] = collections.defaultdict(list)
        for r in rows:
            by_file[r["file"]].append(r)
        for name, lay in layouts.items():
            mine = sorted(
                by_file.get(name, []), key=lambda r: (r["offset"], r["record_byte_offset"])
            )
            if LINKED_RE.fullmatch(name):
                check_linked_rows(body, name, lay, mine)
                continue
            packed = any(r["record_raw_len"] != r["raw_len"] for r in mine)
            want = [_canon(footer_row_of(r, packed)) for r in mine]
            got = [_canon(row) for rec in lay.records for row in rec.rows]
            _need(got == want, f"{name}: footer rows != index rows")
        tree, rank_trees = decode_tree(body)
        # read every chunk in file order, then place the shards
        raw_by_row: dict[int, bytes | None] = {}
        row_ids = {id(r): i for i, r in enumerate(rows)}
        for name, lay in layouts.items():
            mine = sorted(
                by_file.get(name, []), key=lambda r: (r["offset"], r["record_byte_offset"])
            )
            uid = bytes.fromhex(lay.uuid)
            if LINKED_RE.fullmatch(name):  # only the records this checkpoint's rows use
                recs = {rec.offset: rec for rec in lay.records}
                for r in mine:
                    seal = SealContext(uid, lay.rank, [r], keys)
                    raw_by_row[row_ids[id(r)]] = read_chunk(
                        fds[name], recs[r["offset"]], r, name, verify, seal
                    )
                continue
            at = 0
            for rec in lay.records:  # each record read once; its rows take their slices
                rec_rows = mine[at : at + len(rec.rows)]
                at += len(rec.rows)
                seal = SealContext(uid, lay.rank, rec_rows, keys)
                raw = read_chunk(fds[name], rec, rec_rows[0], name, verify, seal)
                for r in rec_rows:
                    lo = r["record_byte_offset"]
                    raw_by_row[row_ids[id(r)]] = (
                        None if raw is None else raw[lo : lo + r["raw_len"]]
                    )
    finally:
        for fd in fds.values():
            os.close(fd)
    by_id = _assemble(body, rows, raw_by_row, keys)
    return Checkpoint(
        path=ckpt_dir,
        manifest=body,
        tree=tree,
        rank_trees=rank_trees,
        tensors={t.key: t for t in by_id},
        by_id=by_id,
        rows=rows,
        files=layouts,
        unreadable={
            k.scope: k.reason
            for k in keys.values()
            if k.dk is None and any(r["key_id"] == k.key_id for r in rows)
        },
    )


LINKED_FIELDS = ("rank", "offset", "stored_len", "codec", "elem_size", "raw_len", "hash", "key_id")


def check_linked_rows(
    body: dict[str, Any], name: str, lay: DataFileLayout, mine: list[dict[str, Any]]
) -> None:
    """Section 4.3: each row of this checkpoint in linked file ``name`` is the one footer row
    at its offset and agrees with it on the record's fields (and the digest under digests)."""
    recs = {rec.offset: rec for rec in lay.records}
    digests = "digests" in body.get("features", [])
    for r in mine:
        where = f"{name}: row key={r['key']!r} chunk={r['chunk']} at {r['offset']}"
        rec = recs.get(r["offset"])
        _need(rec is not None and len(rec.rows) == 1, f"{where}: not one footer row there")
        held = rec.rows[0]
        for k in LINKED_FIELDS:
            want = r[k].hex() if k == "hash" else r[k]
            _need(type(held[k]) is type(want) and held[k] == want, f"{where}: {k} != footer row")
        if digests:
            _need(held.get("digest") == r["digest"].hex(), f"{where}: digest != footer row")


def _assemble(
    body: dict[str, Any],
    rows: list[dict[str, Any]],
    raw_by_row: dict[int, bytes | None],
    keys: dict[str, ScopeKey],
) -> list[TensorData]:
    shards: dict[tuple[int, tuple, tuple], list[tuple[int, bytes | None]]] = (
        collections.defaultdict(list)
    )
    scope_of: dict[int, ScopeKey] = {}  # tensor id -> the scope of its (first) sealed row
    missing: dict[int, ScopeKey] = {}  # tensor id -> a scope whose key a row of it lacks
    for i, r in enumerate(rows):
        shards[(r["tensor"], tuple(r["shard_offsets"]), tuple(r["shard_lengths"]))].append(
            (r["chunk"], raw_by_row[i])
        )
        if r["key_id"] is not None:
            scope_of.setdefault(r["tensor"], keys[r["key_id"]])
            if raw_by_row[i] is None:
                missing.setdefault(r["tensor"], keys[r["key_id"]])
    out = []
    for t, te in enumerate(body["tensors"]):
        es = DTYPE_SIZES[te["dtype"]]
        shape = tuple(te["shape"])
        full = np.zeros((*shape, es), dtype=np.uint8)
        for (tid, so, sl), chunks in shards.items():
            if tid != t or t in missing:
                continue
            data = b"".join(b for _, b in sorted(chunks, key=lambda c: c[0]))  # type: ignore[misc]
            part = np.frombuffer(data, dtype=np.uint8).reshape((*sl, es))
            full[tuple(slice(o, o + n) for o, n in zip(so, sl, strict=True))] = part
        sk = missing.get(t, scope_of.get(t))
        out.append(
            TensorData(
                key=te["key"],
                dtype=te["dtype"],
                shape=shape,
                kind=te["kind"],
                device=te["device"],
                requires_grad=te["requires_grad"],
                parameter=te["parameter"],
                data=None if t in missing else full.tobytes(),
                per_rank=te.get("per_rank", False),
                scope=sk.scope if sk else None,
                unreadable=missing[t].reason if t in missing else None,
            )
        )
    for t, te in enumerate(body["tensors"]):  # views, from their storages' bytes
        if "view" in te:
            storage = out[te["view"]["storage"]]
            out[t].view = dict(te["view"])
            out[t].scope, out[t].unreadable = storage.scope, storage.unreadable
            out[t].data = None if storage.data is None else view_bytes(storage.data, te)
    return out


# ---------------------------------------------------------------- section 10: one file


@dataclass(frozen=True)
class Member:
    """One member of a one-file checkpoint's TOC."""

    name: str
    offset: int
    size: int
    xxh3_128: str | None


def read_container(fd: int, size: int) -> list[Member]:
    """Check a one-file checkpoint's trailer, TOC, layout and padding (section 10, steps 2-4);
    return the TOC's members (data file, index, manifest)."""
    _need(size >= HEADER_SIZE + TRAILER_SIZE + CONTAINER_TRAILER, f"one file: {size} bytes")
    tr = _pread_exact(fd, CONTAINER_TRAILER, size - CONTAINER_TRAILER, "one-file trailer")
    _need(tr[48:] == CONTAINER_MAGIC, "one file: no CKGFILE1 magic at the end")
    (version,) = struct.unpack("<I", tr[32:36])
    if version > CONTAINER_VERSION:
        raise VersionViolation(f"one file: container version {version} is newer than 1")
    toc_off, toc_len, toc_hash, version, zero, h = struct.unpack("<QQ16sIIQ", tr[:48])
    _need(h == xxh3_64(tr[:40]), "one file: trailer hash mismatch")
    _need(version == CONTAINER_VERSION and zero == 0, "one file: trailer version/zero field")
    _need(toc_off % ALIGN == 0 and 0 < toc_len <= MAX_TOC, "one file: TOC offset/length")
    _need(toc_off + toc_len + CONTAINER_TRAILER == size, "one file: TOC does not end at trailer")
    raw = _pread_exact(fd, toc_len, toc_off, "one-file TOC")
    _need(xxhash.xxh3_128(raw).digest() == toc_hash, "one file: TOC hash mismatch")
    toc = strict_json(raw, "one-file TOC")
    _need(isinstance(toc, dict) and set(toc) == {"members"}, "one file: TOC members")
    ms = toc["members"]
    _need(isinstance(ms, list) and len(ms) == 3, "one file: TOC must list three members")
    members = []
    for m in ms:
        _need(isinstance(m, dict) and set(m) == TOC_MEMBER_KEYS, "one file: TOC member keys")
        _need(isinstance(m["name"], str), "one file: TOC member name")
        _need(all(_is_int(m[k]) and m[k] >= 0 for k in ("offset", "size")), "one file: ints")
        h = m["xxh3_128"]
        _need(h is None or (isinstance(h, str) and bool(HEX32_RE.fullmatch(h))), "one file: hash")
        members.append(Member(m["name"], m["offset"], m["size"], h))
    data, idx, man = members
    _need(bool(DATAFILE_RE.fullmatch(data.name)) and data.xxh3_128 is None, "one file: data")
    _need(idx.name == INDEX and idx.xxh3_128 is not None, "one file: second member")
    _need(man.name == MANIFEST and man.xxh3_128 is not None, "one file: third member")
    _need(data.size >= HEADER_SIZE + TRAILER_SIZE and idx.size >= 1, "one file: sizes")
    _need(0 < man.size <= MAX_MANIFEST, "one file: manifest size")
    want = [0, align(data.size), align(idx.offset + idx.size), align(man.offset + man.size)]
    _need([data.offset, idx.offset, man.offset, toc_off] == want, "one file: not the one layout")
    for m, nxt in ((data, idx.offset), (idx, man.offset), (man, toc_off)):
        pad = _pread_exact(fd, nxt - m.offset - m.size, m.offset + m.size, "one-file padding")
        _need(pad.count(0) == len(pad), f"one file: non-zero padding after {m.name}")
    return members


def read_member(fd: int, m: Member) -> bytes:
    """A member's bytes, checked against its TOC hash (where it has one)."""
    data = _pread_exact(fd, m.size, m.offset, m.name)
    _need(m.xxh3_128 is None or xxh3_128_hex(data) == m.xxh3_128, f"{m.name}: TOC hash mismatch")
    return data


def read_onefile(path: str, verify: bool = True, kek: bytes | None = None) -> Checkpoint:
    """Read a one-file checkpoint (section 10), checking every rule of sections 3-8 and 10.
    format.md names no keyring for a one-file checkpoint: its sealed tensors are unreadable."""
    fd, size = _open_regular(path, os.path.basename(path))  # no link, a regular file (step 1)
    try:
        data, idx, man = read_container(fd, size)
        body = parse_manifest(read_member(fd, man))
        files = body["files"]
        _need(
            len(files) == 1 and files[0]["name"] == data.name and files[0]["size"] == data.size,
            "one file: the manifest's files are not exactly the data member",
        )
        _need(body["index"]["size"] == idx.size, "one file: index size != manifest")
        rows = parse_index(read_member(fd, idx), body)

        def open_data(name: str) -> tuple[int, int]:
            _need(name == data.name, f"one file: no data file {name}")
            return os.dup(fd), data.size

        return _read_data(path, body, rows, open_data, verify, data_keys(body, None, kek))
    finally:
        os.close(fd)


def list_store(root: str) -> list[str]:
    """Directory names of the checkpoints of a store per section 1: non-dot entries holding a
    valid manifest."""
    out = []
    for entry in sorted(os.listdir(root)):
        if entry.startswith(".") or not is_name(entry):
            continue
        d = os.path.join(root, entry)
        if not os.path.isdir(d) or os.path.islink(d):
            continue
        try:
            parse_manifest(read_manifest_bytes(d))
        except SpecViolation:
            continue
        out.append(entry)
    return out
