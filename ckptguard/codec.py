"""Chunk encode/decode (docs/format.md section 7): xxh3-128, byte-plane shuffle, LZ4 block.

Two backends produce the same bytes: the native pipeline (ckptguard._native, C, multi-threaded,
GIL released) and the pure-Python one here (numpy, python-lz4, xxhash, a thread pool). Functions
take ``backend=None`` (the active one, see ckptguard.backend), ``"native"`` or ``"python"``.

Single-chunk helpers: ``digest``, ``shuffle``/``unshuffle``, ``keeps_compressed``, ``encode``,
``decode``. Buffer-level: ``encode_buffer`` (a whole tensor's bytes -> chunk records),
``write_records`` (encode and write aligned records at increasing offsets), ``decode_into`` and
``read_into`` (decode/read chunks straight into a destination buffer).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import lz4.block
import numpy as np
import xxhash

from . import backend as _backend
from .format.datafile import (
    CODECS,
    RECORD_HEADER_SIZE,
    FormatError,
    RecordHeader,
    check_record,
    lz4_max_raw_len,
    pack_record_header,
)
from .format.layout import ALIGN, align
from .io import pwrite_all

RAW = CODECS["raw"]
SHUFFLE_LZ4 = CODECS["shuffle-lz4"]
MIN_COMPRESS = 64  # chunks shorter than this are stored raw
LZ4_MAX_INPUT = 0x7E000000  # LZ4_MAX_INPUT_SIZE: longer chunks are stored raw
MAX_EXTENT = 1 << 40  # a record longer than this is refused before reading (as the native path)
_ZERO_PAGE = bytes(ALIGN)


class ChunkError(FormatError):
    """A chunk of a buffer-level call cannot be decoded; ``index`` is its position in the call."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(f"{message} (chunk {index} of this call)")
        self.reason = message
        self.index = index


class ChunkHashError(ChunkError):
    """A chunk decoded, but its bytes do not match its xxh3-128 (data corrupted)."""


class Record(NamedTuple):
    """One chunk as written: codec id, payload length, hash, record offset, raw length."""

    codec: int
    stored_len: int
    hash: bytes
    offset: int
    raw_len: int


class WriteResult(NamedTuple):
    records: list[Record]
    end: int  # offset after the last record's padding; the descriptor is positioned there
    direct: bool  # every record was written with O_DIRECT


class DecodeItem(NamedTuple):
    codec: int
    payload: Any  # a buffer
    raw_len: int
    elem_size: int
    hash: bytes | None  # None: do not verify
    dest_offset: int


class ReadItem(NamedTuple):
    offset: int  # of the record in the file
    extent: int  # align(offset + 64 + stored_len) - offset
    codec: int
    elem_size: int
    raw_len: int
    stored_len: int
    hash: bytes
    dest_offset: int
    seq: int = -1  # the record's sequence number in its file; < 0: not checked


# ---- single chunks (pure Python; the reference for the native path) ------------------------


def digest(raw: memoryview | bytes) -> bytes:
    """xxh3-128 of the raw bytes, canonical (big-endian) form."""
    return xxhash.xxh3_128_digest(raw)


def shuffle(raw: memoryview | bytes, width: int) -> bytes:
    """Byte-plane shuffle: all first bytes of the elements, then all second bytes, ..."""
    if width == 1:
        return bytes(raw)
    a = np.frombuffer(raw, dtype=np.uint8)
    return a.reshape(-1, width).T.tobytes()


def unshuffle(data: bytes, width: int) -> bytes:
    """Inverse of ``shuffle``."""
    if width == 1:
        return data
    a = np.frombuffer(data, dtype=np.uint8)
    return a.reshape(width, -1).T.tobytes()


def keeps_compressed(stored_len: int, raw_len: int) -> bool:
    """The keep-raw rule: compression must save at least 5%."""
    return stored_len * 20 <= raw_len * 19


def encode(raw: memoryview | bytes, elem_size: int, compress: bool) -> tuple[int, bytes, bytes]:
    """Return (codec id, payload, xxh3-128 of the payload's raw bytes) for one chunk.

    ``raw`` is read exactly once, into a private copy that the hash, the shuffle and the payload
    all come from: another thread writing to ``raw`` meanwhile cannot make them disagree (I9).
    """
    copy = raw if isinstance(raw, bytes) else bytes(raw)
    h = digest(copy)
    if compress and MIN_COMPRESS <= len(copy) <= LZ4_MAX_INPUT:
        packed = lz4.block.compress(shuffle(copy, elem_size), mode="default", store_size=False)
        if keeps_compressed(len(packed), len(copy)):
            return SHUFFLE_LZ4, packed, h
    return RAW, copy, h


def _check_lengths(codec: int, stored_len: int, raw_len: int, elem_size: int) -> None:
    """Refuse lengths no payload can have, before allocating anything."""
    if raw_len < 0 or stored_len < 0:
        raise FormatError("negative chunk length")
    if not 0 <= elem_size <= 0xFF:  # one byte in a record header
        raise FormatError("elem_size out of range")
    if codec == RAW:
        if stored_len != raw_len:
            raise FormatError("raw payload length mismatch")
    elif codec == SHUFFLE_LZ4:
        if elem_size < 1 or raw_len % elem_size:
            raise FormatError("elem_size does not divide raw_len")
        if raw_len > lz4_max_raw_len(stored_len):  # an LZ4 block expands at most ~255x
            raise FormatError("raw_len is impossible for an LZ4 payload of this length")
    else:
        raise FormatError(f"unknown codec id {codec}")


def _decode_py(codec: int, payload: Any, raw_len: int, elem_size: int) -> bytes:
    _check_lengths(codec, len(payload), raw_len, elem_size)
    if codec == RAW:
        return payload if isinstance(payload, bytes) else bytes(payload)
    try:
        data = lz4.block.decompress(payload, uncompressed_size=raw_len)
    except lz4.block.LZ4BlockError as e:
        raise FormatError(f"LZ4 payload cannot be decoded: {e}") from None
    if len(data) != raw_len:
        raise FormatError("decoded length mismatch")
    return unshuffle(data, elem_size)


def decode(
    codec: int, payload: bytes, raw_len: int, elem_size: int, backend: str | None = None
) -> bytes:
    """Return the raw bytes of a chunk; raises FormatError if the payload cannot be decoded."""
    if _backend.resolve(backend) == _backend.PYTHON:
        return _decode_py(codec, payload, raw_len, elem_size)
    _check_lengths(codec, len(payload), raw_len, elem_size)
    n = _backend.native()
    try:
        return n.decode(codec, payload, raw_len, elem_size)
    except n.DecodeError as e:
        raise FormatError(e.args[0]) from None


# ---- whole buffers -------------------------------------------------------------------------


def as_buffer(obj: Any, writable: bool = False) -> memoryview:
    """A flat byte view of a buffer-protocol object or a CPU torch tensor (no copy)."""
    if type(obj).__module__.startswith("torch"):
        import torch

        if isinstance(obj, torch.Tensor):
            if obj.device.type != "cpu":
                raise ValueError("tensor must be on the CPU (copy it to a pinned host buffer)")
            if not obj.is_contiguous():
                if writable:
                    raise ValueError("destination tensor must be contiguous")
                obj = obj.contiguous()
            obj = obj.detach().reshape(-1).view(torch.uint8).numpy()
    view = memoryview(obj)
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if writable and view.readonly:
        raise ValueError("destination buffer is read-only")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    ex = _pools.get(threads)
    if ex is None:
        ex = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="ckptguard-codec")
    return ex


def _map(fn: Any, items: Sequence[Any], threads: int) -> list[Any]:
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    return list(_pool(threads).map(fn, items))


def _check_chunking(length: int, elem_size: int, chunk_size: int, compress: bool) -> None:
    if not 1 <= elem_size <= 255:
        raise ValueError("elem_size must be in 1..255")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if compress and (length % elem_size or chunk_size % elem_size):
        raise ValueError("buffer length and chunk_size must be multiples of elem_size")


def _pieces(view: memoryview, chunk_size: int) -> list[memoryview]:
    return [view[i : i + chunk_size] for i in range(0, len(view), chunk_size)]


def encode_buffer(
    buf: Any,
    elem_size: int,
    chunk_size: int,
    compress: bool = True,
    threads: int | None = None,
    backend: str | None = None,
) -> list[tuple[int, bytes, bytes]]:
    """Split ``buf`` into chunks of ``chunk_size`` bytes; return (codec, payload, hash) each."""
    view = as_buffer(buf)
    _check_chunking(len(view), elem_size, chunk_size, compress)
    threads = threads or _backend.default_threads()
    if _backend.resolve(backend) == _backend.NATIVE:
        return _backend.native().encode(view, elem_size, chunk_size, compress, threads)
    return _map(lambda p: encode(p, elem_size, compress), _pieces(view, chunk_size), threads)


def write_records(
    fd: int,
    path: str,
    pos: int,
    seq0: int,
    buf: Any,
    elem_size: int,
    chunk_size: int,
    compress: bool = True,
    threads: int | None = None,
    direct: bool | None = None,
    backend: str | None = None,
) -> WriteResult:
    """Encode ``buf`` and write its chunk records (docs/format.md section 7) at ``pos``.

    Records get sequence numbers from ``seq0`` and lie back to back, each padded to 4096 bytes.
    ``fd`` is left positioned at the returned ``end``. Nothing is fsynced (one fsync per file is
    the caller's). ``direct`` (default: CKPTGUARD_ODIRECT) writes through O_DIRECT where the
    file system allows it. I/O errors raise OSError with errno and ``path``.
    """
    view = as_buffer(buf)
    _check_chunking(len(view), elem_size, chunk_size, compress)
    if pos % ALIGN or pos < 0:
        raise ValueError("pos must be a non-negative multiple of 4096")
    if seq0 < 0 or seq0 + -(-len(view) // chunk_size) > 0xFFFFFFFF:
        raise ValueError("record sequence numbers must fit in 32 bits")
    threads = threads or _backend.default_threads()
    direct = _backend.direct_io() if direct is None else direct
    if _backend.resolve(backend) == _backend.NATIVE:
        recs, end, used = _backend.native().write_records(
            fd, path, pos, seq0, view, elem_size, chunk_size, compress, threads, direct
        )
        return WriteResult([Record(*r) for r in recs], end, used)
    out: list[Record] = []
    pieces = _pieces(view, chunk_size)
    batch = max(2 * threads, 1)  # bounded memory: a few chunks in flight, as on the native path
    for b in range(0, len(pieces), batch):
        chunks = _map(lambda p: encode(p, elem_size, compress), pieces[b : b + batch], threads)
        for n, (cid, payload, h) in enumerate(chunks, start=b):
            raw_len = len(pieces[n])
            hdr = RecordHeader(cid, elem_size, raw_len, len(payload), h, seq0 + n)
            used = RECORD_HEADER_SIZE + len(payload)
            parts = [pack_record_header(hdr), payload, _ZERO_PAGE[: align(used) - used]]
            pwrite_all(fd, parts, pos, path)
            out.append(Record(cid, len(payload), h, pos, raw_len))
            pos += align(used)
    os.lseek(fd, pos, os.SEEK_SET)
    return WriteResult(out, pos, False)


def _raise_native(e: Exception) -> None:
    message, index, kind = e.args
    cls = ChunkHashError if kind == "hash" else ChunkError
    raise cls(message, index) from None


def _check_dest(dest: memoryview, offset: int, length: int, index: int) -> None:
    if offset < 0 or length < 0 or offset + length > len(dest):
        raise ChunkError("chunk does not fit in the destination", index)


def decode_into(
    dest: Any,
    items: Sequence[DecodeItem | tuple],
    threads: int | None = None,
    backend: str | None = None,
) -> None:
    """Decode chunk payloads straight into ``dest`` (e.g. a pinned tensor's storage), in parallel.

    Each item is a DecodeItem. Every chunk with a hash is verified; the first bad chunk (lowest
    index) raises ChunkHashError or ChunkError (both FormatError) with its ``index``.
    """
    view = as_buffer(dest, writable=True)
    threads = threads or _backend.default_threads()
    items = [DecodeItem(*it) for it in items]
    for i, it in enumerate(items):  # both backends (C would wrap a negative offset around)
        _check_dest(view, it.dest_offset, it.raw_len, i)
        if not (0 <= it.codec <= 0xFF and 0 <= it.elem_size <= 0xFF):
            raise ChunkError("unknown codec or elem_size out of range", i)
    if _backend.resolve(backend) == _backend.NATIVE:
        n = _backend.native()
        try:
            n.decode_into(view, [tuple(it) for it in items], threads)
        except n.DecodeError as e:
            _raise_native(e)
        return

    def one(i: int) -> None:
        it = items[i]
        try:
            raw = _decode_py(it.codec, it.payload, it.raw_len, it.elem_size)
        except FormatError as e:
            raise ChunkError(str(e), i) from None
        if it.hash is not None and digest(raw) != it.hash:
            raise ChunkHashError("chunk hash mismatch (data corrupted)", i)
        view[it.dest_offset : it.dest_offset + it.raw_len] = raw

    _first_error(one, len(items), threads)


def _first_error(fn: Any, n: int, threads: int) -> None:
    """Run fn(i) for i in range(n); raise the error of the lowest failing index."""
    errors: list[tuple[int, BaseException]] = []

    def guarded(i: int) -> None:
        try:
            fn(i)
        except (ChunkError, OSError) as e:
            errors.append((i, e))

    _map(guarded, range(n), threads)
    if errors:
        raise min(errors, key=lambda x: x[0])[1]


def read_into(
    fd: int,
    path: str,
    dest: Any,
    items: Sequence[ReadItem | tuple],
    threads: int | None = None,
    verify: bool = True,
    backend: str | None = None,
) -> None:
    """Read records from ``fd`` (readahead advised), check and decode them into ``dest``.

    Checks each record header against its item (codec, elem_size, lengths, hash, seq), that its
    padding is zero, that it decodes, and (if ``verify``) its hash. Problems raise ChunkError /
    ChunkHashError with the item's index; I/O errors raise OSError with ``path``.
    """
    view = as_buffer(dest, writable=True)
    threads = threads or _backend.default_threads()
    items = [ReadItem(*it) for it in items]
    for i, it in enumerate(items):  # both backends: no item a record could not match
        _check_dest(view, it.dest_offset, it.raw_len, i)
        bad = it.offset % ALIGN or it.extent % ALIGN or it.extent < RECORD_HEADER_SIZE
        bad = bad or it.offset < 0 or it.offset + it.extent > 2**63 - 1 or it.extent > MAX_EXTENT
        bad = bad or not 0 <= it.stored_len <= it.extent - RECORD_HEADER_SIZE
        bad = bad or not (0 <= it.codec <= 0xFF and 0 <= it.elem_size <= 0xFF)
        if bad or it.seq >= 1 << 32:
            raise ChunkError("record header disagrees with the index", i)
    if _backend.resolve(backend) == _backend.NATIVE:
        n = _backend.native()
        try:
            n.read_into(fd, path, view, items, threads, verify)
        except n.DecodeError as e:
            _raise_native(e)
        return
    if items and hasattr(os, "posix_fadvise"):
        lo = min(it.offset for it in items)
        hi = max(it.offset + it.extent for it in items)
        os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_SEQUENTIAL)

    def one(i: int) -> None:
        it = items[i]
        try:
            buf = os.pread(fd, it.extent, it.offset)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from None
        if len(buf) != it.extent:
            raise ChunkError("record is truncated", i)
        try:
            payload = check_record(
                buf, it.codec, it.elem_size, it.raw_len, it.stored_len, it.hash, it.seq
            )
            raw = _decode_py(it.codec, payload, it.raw_len, it.elem_size)
        except FormatError as e:
            raise ChunkError(str(e), i) from None
        if verify and digest(raw) != it.hash:
            raise ChunkHashError("chunk hash mismatch (data corrupted)", i)
        view[it.dest_offset : it.dest_offset + it.raw_len] = raw

    _first_error(one, len(items), threads)
