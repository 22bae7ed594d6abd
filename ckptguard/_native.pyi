"""Types of the native chunk pipeline (native/module.c; docs/native.md).

Checked against the built extension by ``python -m mypy.stubtest ckptguard._native``
(tests/test_native.py::test_stub_matches). Callers go through ckptguard.encode and ckptguard.io,
which check arguments first and turn DecodeError into ChunkError.
"""

import os
from collections.abc import Sequence
from typing import Final

from typing_extensions import Buffer

_Path = str | bytes | os.PathLike[str] | os.PathLike[bytes]
# (codec, payload, raw_len, elem_size, hash or None: not verified, dest_offset)
_DecodeItem = tuple[int, Buffer, int, int, bytes | None, int]
# (offset, extent, codec, elem_size, raw_len, stored_len, hash, dest_offset, seq; < 0: unchecked)
# and optionally the SHA-256 digest (None: unchecked)
_ReadItem = (
    tuple[int, int, int, int, int, int, bytes, int, int]
    | tuple[int, int, int, int, int, int, bytes, int, int, bytes | None]
)
# (codec, stored_len, hash, offset, raw_len) of one record written
_RecordInfo = tuple[int, int, bytes, int, int]
# (buf, elem_size, codec, level, direct) of one segment of a batch
_Seal = tuple[bytes, bytes, bytes, bytes, int, int]  # rkey, fkey, key_id, rows, nrows, first
_Segment = tuple[Buffer, int, int, int, bool] | tuple[Buffer, int, int, int, bool, _Seal | None]
# the records of a batch as columns: codecs (a byte each), stored_lens, hashes (16 bytes each),
# offsets, raw_lens (native int64 each), digests (32 bytes each; empty unless asked for)
_RecordColumns = tuple[bytes, bytes, bytes, bytes, bytes, bytes]
# per segment: direct_used (a byte each), enc_ns, write_ns, bytes_written (native int64 each)
_SegmentColumns = tuple[bytes, bytes, bytes, bytes]

RAW: Final[int]
SHUFFLE_LZ4: Final[int]
SHUFFLE_ZSTD: Final[int]
ALIGN: Final[int]
REC_HDR: Final[int]
REC_MAGIC: Final[bytes]
MIN_COMPRESS: Final[int]
LZ4_MAX_RATIO: Final[int]
LZ4_SLACK: Final[int]
LZ4_MAX_INPUT: Final[int]
ZSTD_MAX_RATIO: Final[int]
ZSTD_MIN_LEVEL: Final[int]
ZSTD_MAX_LEVEL: Final[int]
MAX_EXTENT: Final[int]
MAX_SEQ: Final[int]

class DecodeError(ValueError):
    """A chunk cannot be decoded or fails its hash: args are (message, index, kind)."""

    args: tuple[str, int, str]

def hash128(buf: Buffer, /) -> bytes: ...
def shuffle(buf: Buffer, width: int, /) -> bytes: ...
def unshuffle(buf: Buffer, width: int, /) -> bytes: ...
def decode(
    codec: int, payload: Buffer, raw_len: int, elem_size: int, hash: bytes | None = None, /
) -> bytes: ...
def encode(
    buf: Buffer, elem_size: int, chunk_size: int, codec: int, level: int, threads: int, /
) -> list[tuple[int, bytes, bytes]]: ...
def write_records(
    fd: int,
    path: _Path,
    pos: int,
    seq0: int,
    buf: Buffer,
    elem_size: int,
    chunk_size: int,
    codec: int,
    level: int,
    threads: int,
    dfd: int,
    /,
) -> tuple[list[_RecordInfo], int, bool, tuple[int, int, int]]: ...
def write_segments(
    fd: int,
    path: _Path,
    pos: int,
    seq0: int,
    segments: Sequence[_Segment],
    chunk_size: int,
    threads: int,
    dfd: int,
    digest: bool = False,
    uuid: bytes | None = None,
    rank: int = 0,
    /,
) -> tuple[int, _RecordColumns, _SegmentColumns]: ...
def decode_into(dest: Buffer, items: Sequence[_DecodeItem], threads: int, /) -> None: ...
def read_into(
    fd: int,
    path: _Path,
    dest: Buffer,
    items: Sequence[_ReadItem],
    threads: int,
    verify: bool,
    /,
) -> None: ...
def wait_written(fd: int, path: _Path, offset: int, length: int, /) -> None: ...
def library_versions() -> dict[str, str]: ...
def _inject_io_error(err: int, after: int = 0, /) -> None: ...
