"""Byte layout of data files ``rank-NNNNN.ckg`` (docs/format.md section 7): pack and check."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import xxhash

from . import FORMAT_VERSION, strict_json
from .layout import ALIGN

if TYPE_CHECKING:
    import numpy as np

FILE_MAGIC = b"CKGDATA1"
RECORD_MAGIC = b"CKGR"
TRAILER_MAGIC = b"CKGFOOT1"
HEADER_SIZE = ALIGN
RECORD_HEADER_SIZE = 64
TRAILER_SIZE = 32
MAX_FOOTER_BYTES = 1 << 30

CODECS = {"raw": 0, "shuffle-lz4": 1, "shuffle-zstd": 2}
# An LZ4 block expands at most ~255x: a shuffle-lz4 payload of stored_len bytes cannot decode to
# more raw bytes than this. Readers refuse larger raw_len claims before allocating anything.
LZ4_MAX_RATIO = 256
LZ4_SLACK = 64
# A zstd block decodes to at most 128 KiB and takes at least 4 bytes (an RLE block: 3 bytes of
# header, 1 of content): a shuffle-zstd payload decodes to at most 32768x its length.
ZSTD_MAX_RATIO = 32768
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # the first 4 bytes of a zstd frame (RFC 8878)
ZSTD_FEATURE = "zstd"
"""The manifest feature a checkpoint with ``shuffle-zstd`` chunks declares (format.md s. 3)."""


_Len = TypeVar("_Len", int, "np.ndarray")


def lz4_max_raw_len(stored_len: _Len) -> _Len:
    """The most raw bytes a shuffle-lz4 payload of ``stored_len`` bytes can decode to (for one
    length, or elementwise for an index column of them)."""
    return stored_len * LZ4_MAX_RATIO + LZ4_SLACK


def zstd_exceeds(raw_len: _Len, stored_len: _Len) -> _Len:
    """Whether ``raw_len`` (> 0) is more than a shuffle-zstd payload of ``stored_len`` bytes can
    decode to (for one length, or elementwise for index columns; never overflows)."""
    return (raw_len - 1) // ZSTD_MAX_RATIO >= stored_len


CODEC_NAMES = {v: k for k, v in CODECS.items()}

_HEADER = struct.Struct("<8sII16sII")  # magic, version, rank, uuid, align, zero
# magic, codec, elem, flags, zero, raw, stored, hash, seq, nonce (zero unless sealed)
_RECORD = struct.Struct("<4sBBBBQQ16sI12s")
SEALED = 1
"""The record header's flag of a sealed record (feature ``encryption``, format.md 4.4)."""
NONCE_BYTES = 12
_TRAILER = struct.Struct("<QQQ8s")


class FormatError(ValueError):
    """A structural problem in a data file; the reader turns it into CorruptCheckpointError."""


def _h64(b: bytes) -> int:
    return xxhash.xxh3_64_intdigest(b)


def pack_file_header(rank: int, uuid_hex: str) -> bytes:
    head = _HEADER.pack(FILE_MAGIC, FORMAT_VERSION, rank, bytes.fromhex(uuid_hex), ALIGN, 0)
    head += struct.pack("<Q", _h64(head))
    return head + bytes(HEADER_SIZE - len(head))


def check_file_header(buf: bytes, rank: int, uuid_hex: str) -> None:
    if len(buf) != HEADER_SIZE:
        raise FormatError("file header truncated")
    magic, version, r, uuid, align, zero = _HEADER.unpack_from(buf)
    if magic != FILE_MAGIC:
        raise FormatError("bad data file magic")
    (stored,) = struct.unpack_from("<Q", buf, 40)
    if stored != _h64(buf[:40]):
        raise FormatError("data file header hash mismatch")
    if version != FORMAT_VERSION:
        raise FormatError(f"data file format version {version}, expected {FORMAT_VERSION}")
    if r != rank:
        raise FormatError(f"data file header names rank {r}, expected {rank}")
    if uuid.hex() != uuid_hex:
        raise FormatError("data file belongs to another checkpoint (uuid mismatch)")
    if align != ALIGN or zero != 0 or any(buf[48:]):
        raise FormatError("data file header has bad alignment or non-zero reserved bytes")


@dataclass(frozen=True)
class RecordHeader:
    codec: int
    elem_size: int
    raw_len: int
    stored_len: int
    hash: bytes  # sealed: the xxh3-128 of the stored payload, not of the raw bytes
    seq: int
    flags: int = 0  # SEALED or 0
    nonce: bytes = bytes(NONCE_BYTES)  # sealed: the AEAD nonce; else zero


def pack_record_header(h: RecordHeader) -> bytes:
    head = _RECORD.pack(
        RECORD_MAGIC,
        h.codec,
        h.elem_size,
        h.flags,
        0,
        h.raw_len,
        h.stored_len,
        h.hash,
        h.seq,
        h.nonce,
    )
    return head + struct.pack("<Q", _h64(head))


def unpack_record_header(buf: bytes) -> RecordHeader:
    if len(buf) != RECORD_HEADER_SIZE:
        raise FormatError("record header truncated")
    magic, codec, elem, flags, zero, raw, stored, digest, seq, nonce = _RECORD.unpack_from(buf)
    if magic != RECORD_MAGIC:
        raise FormatError("bad record magic")
    (check,) = struct.unpack_from("<Q", buf, 56)
    if check != _h64(buf[:56]):
        raise FormatError("record header hash mismatch")
    if zero or flags not in (0, SEALED) or (flags == 0 and any(nonce)):
        raise FormatError("record header has non-zero reserved bytes")
    return RecordHeader(codec, elem, raw, stored, digest, seq, flags, nonce)


def check_record_header(
    buf: bytes, codec: int, elem_size: int, raw_len: int, stored_len: int, hash: bytes, seq: int
) -> None:
    """Check a record header read from a data file against what the index says of it (``seq``
    -1: not known to the caller, not compared). Raises FormatError naming what disagrees."""
    h = unpack_record_header(buf)
    if h.flags:
        raise FormatError("record is sealed but its index row has no key_id")
    if (h.codec, h.elem_size, h.raw_len, h.stored_len, h.hash) != (
        codec,
        elem_size,
        raw_len,
        stored_len,
        hash,
    ) or (seq >= 0 and h.seq != seq):
        raise FormatError("record header disagrees with the index")


def check_record(
    buf: bytes, codec: int, elem_size: int, raw_len: int, stored_len: int, hash: bytes, seq: int
) -> memoryview:
    """Check one whole record (header, payload, zero padding to its extent) read from a data
    file against the index's row; return its stored payload. Raises FormatError."""
    if len(buf) < RECORD_HEADER_SIZE + stored_len:
        raise FormatError("record is truncated")
    check_record_header(buf[:RECORD_HEADER_SIZE], codec, elem_size, raw_len, stored_len, hash, seq)
    end = RECORD_HEADER_SIZE + stored_len
    if buf.count(0, end) != len(buf) - end:
        raise FormatError("non-zero bytes in record padding")
    return memoryview(buf)[RECORD_HEADER_SIZE:end]


def check_sealed_header(
    buf: bytes, codec: int, elem_size: int, raw_len: int, stored_len: int, seq: int
) -> RecordHeader:
    """Check a sealed record's header against its index row (its hash, of the stored bytes, is
    not the row's); return it. Raises FormatError."""
    h = unpack_record_header(buf)
    if h.flags != SEALED:
        raise FormatError("index row has a key_id but its record is not sealed")
    if (h.codec, h.elem_size, h.raw_len, h.stored_len) != (codec, elem_size, raw_len, stored_len):
        raise FormatError("record header disagrees with the index")
    if seq >= 0 and h.seq != seq:
        raise FormatError("record header disagrees with the index")
    return h


def check_sealed_record(
    buf: bytes, codec: int, elem_size: int, raw_len: int, stored_len: int, seq: int
) -> tuple[RecordHeader, memoryview]:
    """Check one whole sealed record (feature ``encryption``) against its index row as far as
    it can be without the key: header fields and flag, the xxh3-128 of the stored payload, the
    zero padding. Returns the header and the stored payload. Raises FormatError."""
    if len(buf) < RECORD_HEADER_SIZE + stored_len:
        raise FormatError("record is truncated")
    h = check_sealed_header(buf[:RECORD_HEADER_SIZE], codec, elem_size, raw_len, stored_len, seq)
    end = RECORD_HEADER_SIZE + stored_len
    if buf.count(0, end) != len(buf) - end:
        raise FormatError("non-zero bytes in record padding")
    payload = memoryview(buf)[RECORD_HEADER_SIZE:end]
    if xxhash.xxh3_128(payload).digest() != h.hash:
        raise FormatError("sealed chunk's stored bytes do not match their hash (data corrupted)")
    return h, payload


def pack_footer(rank: int, uuid_hex: str, rows: list[dict]) -> bytes:
    doc = {"rank": rank, "uuid": uuid_hex, "rows": rows}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def pack_trailer(footer_offset: int, footer: bytes) -> bytes:
    return _TRAILER.pack(footer_offset, len(footer), _h64(footer), TRAILER_MAGIC)


def unpack_trailer(buf: bytes, file_size: int) -> tuple[int, int, int]:
    """Return (footer_offset, footer_len, footer_hash) after checking them against the file size."""
    if len(buf) != TRAILER_SIZE:
        raise FormatError("trailer truncated")
    off, length, digest, magic = _TRAILER.unpack(buf)
    if magic != TRAILER_MAGIC:
        raise FormatError("bad trailer magic (file truncated or overwritten?)")
    if off % ALIGN or off < HEADER_SIZE or length > MAX_FOOTER_BYTES:
        raise FormatError("trailer has an invalid footer offset or length")
    if off + length + TRAILER_SIZE != file_size:
        raise FormatError("trailer does not match the file size")
    return off, length, digest


def check_footer_hash(buf: bytes, digest: int) -> None:
    if _h64(buf) != digest:
        raise FormatError("footer hash mismatch")


def check_footer(buf: bytes, digest: int, rank: int, uuid_hex: str) -> list[dict]:
    check_footer_hash(buf, digest)
    try:
        doc = strict_json(buf)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"footer is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"rank", "uuid", "rows"}:
        raise FormatError("footer has unexpected members")
    if doc["rank"] != rank or doc["uuid"] != uuid_hex or not isinstance(doc["rows"], list):
        raise FormatError("footer names another rank or checkpoint")
    return doc["rows"]
