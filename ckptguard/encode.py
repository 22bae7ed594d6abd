"""Chunk encode/decode (docs/format.md section 7): xxh3-128 (and, under the feature ``digests``,
SHA-256), byte-plane shuffle, LZ4 block or zstd frame.

Pure bytes <-> chunks: nothing here touches a file descriptor (record I/O is ckptguard.io). Two
backends produce the same bytes: the native pipeline (ckptguard._native, C, multi-threaded, GIL
released) and the pure-Python one here (numpy, python-lz4, zstandard, xxhash, a thread pool;
zstd bytes are the same where both link the same libzstd version). Functions take
``backend=None`` (the active one, see ckptguard.backend), ``"native"`` or ``"python"``.

Single chunks: ``digest``, ``sha256``, ``shuffle``/``unshuffle``, ``keeps_compressed``,
``encode``, ``encode_record``, ``decode``. Whole buffers: ``encode_buffer`` (a tensor's bytes ->
chunks) and ``decode_into`` (chunks straight into a destination buffer). The checks every caller
shares: ``check_chunk_size`` (a checkpoint's chunk size), ``check_chunking`` (a buffer and its
chunking), ``check_dest``.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

import lz4.block
import numpy as np
import xxhash
import zstandard

from . import backend as _backend
from .format.datafile import CODECS, ZSTD_MAGIC, FormatError, lz4_max_raw_len, zstd_exceeds

RAW = CODECS["raw"]
SHUFFLE_LZ4 = CODECS["shuffle-lz4"]
SHUFFLE_ZSTD = CODECS["shuffle-zstd"]
WRITABLE = frozenset({RAW, SHUFFLE_LZ4, SHUFFLE_ZSTD})  # codec ids ``encode`` accepts (RAW: none)
ZSTD_DEFAULT_LEVEL = 1  # what level 0 asks for: the measured best trade for model state
ZSTD_MIN_LEVEL = -(1 << 17)  # ZSTD_minCLevel() of libzstd 1.4-1.5
ZSTD_MAX_LEVEL = 22  # ZSTD_maxCLevel()
MIN_COMPRESS = 64  # chunks shorter than this are stored raw
LZ4_MAX_INPUT = 0x7E000000  # LZ4_MAX_INPUT_SIZE: longer chunks are stored raw
MIN_CHUNK_SIZE = 64  # a checkpoint's chunks: at least MIN_COMPRESS bytes, so they can compress
CHUNK_MULTIPLE = 16  # the widest element (complex128): chunks of every dtype hold whole elements

_T = TypeVar("_T")
_R = TypeVar("_R")


class ChunkError(FormatError):
    """A chunk of a buffer-level call cannot be decoded; ``index`` is its position in the call."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(f"{message} (chunk {index} of this call)")
        self.reason = message
        self.index = index


class ChunkHashError(ChunkError):
    """A chunk decoded, but its bytes do not match its xxh3-128 (data corrupted)."""


class ChunkDigestError(ChunkHashError):
    """A chunk decoded and matches its xxh3-128, but not its SHA-256 digest: the bytes were
    altered along with the checksums anyone can recompute."""


class Record(NamedTuple):
    """One chunk as written: codec id, payload length, hash, record offset, raw length, and its
    SHA-256 digest where one was asked for."""

    codec: int
    stored_len: int
    hash: bytes
    offset: int
    raw_len: int
    digest: bytes | None = None


class DecodeItem(NamedTuple):
    """One payload for ``decode_into``: decoded to ``raw_len`` bytes at ``dest_offset``."""

    codec: int
    payload: Any  # a buffer
    raw_len: int
    elem_size: int
    hash: bytes | None  # None: do not verify
    dest_offset: int


class ReadItem(NamedTuple):
    """One record for ``io.read_records``: where it lies, what the index says it holds."""

    offset: int  # of the record in the file
    extent: int  # align(offset + 64 + stored_len) - offset
    codec: int
    elem_size: int
    raw_len: int
    stored_len: int
    hash: bytes
    dest_offset: int
    seq: int = -1  # the record's sequence number in its file; < 0: not checked
    digest: bytes | None = None  # the SHA-256 its raw bytes must have (when verifying)
    seal: tuple | None = None  # a sealed record's (record key, fingerprint key, AAD): native


# ---- checks shared by every caller -------------------------------------------------------


def check_chunk_size(chunk_size: int) -> None:
    """Refuse a checkpoint chunk size that is not a multiple of 16 of at least 64 bytes."""
    if chunk_size < MIN_CHUNK_SIZE or chunk_size % CHUNK_MULTIPLE:
        raise ValueError(
            f"chunk_size must be a multiple of {CHUNK_MULTIPLE} and at least {MIN_CHUNK_SIZE}"
        )


def check_codec(codec: int, level: int = 0) -> None:
    """Refuse a codec id this build cannot write, or a level it does not have (LZ4 and raw have
    one and ignore ``level``; zstd: 0 for ZSTD_DEFAULT_LEVEL, or ZSTD_MIN_LEVEL..ZSTD_MAX_LEVEL)."""
    if codec not in WRITABLE:
        raise ValueError(f"unknown codec id {codec!r}; writable: {sorted(WRITABLE)}")
    if codec == SHUFFLE_ZSTD and not ZSTD_MIN_LEVEL <= level <= ZSTD_MAX_LEVEL:
        raise ValueError(
            f"zstd level must be 0 (level {ZSTD_DEFAULT_LEVEL}) or in "
            f"{ZSTD_MIN_LEVEL}..{ZSTD_MAX_LEVEL}, not {level!r}"
        )


def parse_compress(value: object, names: Mapping[str, int]) -> tuple[int, int]:
    """(codec id, level) of a ``compress=`` value: a name in ``names`` (its codec at level 0, the
    codec's default), or ``"<name>:N"`` for a codec with levels (zstd) at level N. ValueError
    naming the value otherwise."""
    name, sep, level = value.partition(":") if isinstance(value, str) else ("", "", "")
    codec = names.get(name)
    if codec is None or (sep and (codec != SHUFFLE_ZSTD or not re.fullmatch(r"-?[0-9]+", level))):
        zstd = [n for n, c in names.items() if c == SHUFFLE_ZSTD]
        raise ValueError(
            f"compress must be one of {sorted(names)}"
            + "".join(f' or "{n}:N" (N a level)' for n in zstd)
            + f", not {value!r}"
        )
    try:
        check_codec(codec, int(level or 0))
    except ValueError as e:
        raise ValueError(f"compress={value!r}: {e}") from None
    return codec, int(level or 0)


def check_chunking(
    length: int, elem_size: int, chunk_size: int, codec: int, level: int = 0
) -> None:
    """Refuse a codec this build cannot write (at ``level``), or a buffer of ``length`` bytes that
    cannot be cut into ``chunk_size`` chunks of whole ``elem_size``-byte elements (needed to
    shuffle them for every codec but raw)."""
    check_codec(codec, level)
    if not 1 <= elem_size <= 255:
        raise ValueError("elem_size must be in 1..255")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if codec != RAW and (length % elem_size or chunk_size % elem_size):
        raise ValueError("buffer length and chunk_size must be multiples of elem_size")


def check_lengths(codec: int, stored_len: int, raw_len: int, elem_size: int) -> None:
    """Refuse lengths no payload can have, before allocating anything."""
    if raw_len < 0 or stored_len < 0:
        raise FormatError("negative chunk length")
    if not 0 <= elem_size <= 0xFF:  # one byte in a record header
        raise FormatError("elem_size out of range")
    if codec == RAW:
        if stored_len != raw_len:
            raise FormatError("raw payload length mismatch")
    elif codec in (SHUFFLE_LZ4, SHUFFLE_ZSTD):
        if elem_size < 1 or raw_len % elem_size:
            raise FormatError("elem_size does not divide raw_len")
        if codec == SHUFFLE_LZ4 and raw_len > lz4_max_raw_len(stored_len):  # at most ~255x
            raise FormatError("raw_len is impossible for an LZ4 payload of this length")
        if codec == SHUFFLE_ZSTD and zstd_exceeds(raw_len, stored_len):  # at most 32768x
            raise FormatError("raw_len is impossible for a zstd payload of this length")
    else:
        raise FormatError(f"unknown codec id {codec}")


def check_dest(dest: memoryview, offset: int, length: int, index: int) -> None:
    """Refuse a chunk that would not lie inside ``dest`` (C would wrap a negative offset)."""
    if offset < 0 or length < 0 or offset + length > len(dest):
        raise ChunkError("chunk does not fit in the destination", index)


def chunk_error(e: Exception) -> ChunkError:
    """The ChunkError (or ChunkHashError) for a native DecodeError(message, index, kind)."""
    message, index, kind = e.args
    cls = {"hash": ChunkHashError, "digest": ChunkDigestError}.get(kind, ChunkError)
    return cls(message, index)


# ---- the thread pool of the pure-Python path -----------------------------------------------

_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    ex = _pools.get(threads)
    if ex is None:
        ex = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="ckptguard-codec")
    return ex


def codec_pool(threads: int) -> ThreadPoolExecutor:
    """The pool of ``threads`` threads that ``parallel_map`` uses (one per count, kept)."""
    return _pool(threads)


def parallel_map(fn: Callable[[_T], _R], items: Sequence[_T], threads: int) -> list[_R]:
    """``[fn(x) for x in items]``, on up to ``threads`` threads of a pool kept per count."""
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    return list(_pool(threads).map(fn, items))


def first_error(fn: Callable[[int], None], n: int, threads: int) -> None:
    """Run fn(i) for i in range(n); raise the ChunkError or OSError of the lowest failing index
    (the same one the native path reports, whatever the threads' order)."""
    errors: list[tuple[int, BaseException]] = []

    def guarded(i: int) -> None:
        try:
            fn(i)
        except (ChunkError, OSError) as e:
            errors.append((i, e))

    parallel_map(guarded, range(n), threads)
    if errors:
        raise min(errors, key=lambda x: x[0])[1]


# ---- single chunks (pure Python; the reference for the native path) ------------------------


def digest(raw: memoryview | bytes) -> bytes:
    """xxh3-128 of the raw bytes, canonical (big-endian) form."""
    return xxhash.xxh3_128_digest(raw)


def sha256(raw: memoryview | bytes) -> bytes:
    """The chunk digest (feature ``digests``): SHA-256 of the raw bytes."""
    return hashlib.sha256(raw).digest()


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


def encode(
    raw: memoryview | bytes, elem_size: int, codec: int, level: int = 0
) -> tuple[int, bytes, bytes]:
    """Return (codec id, payload, xxh3-128 of the payload's raw bytes) for one chunk.

    ``codec`` is the codec to try (RAW: none) at ``level`` (0: its default); the chunk is stored
    raw where compression saves less than 5% (``keeps_compressed``). ``raw`` is read exactly
    once, into a private copy that the hash, the shuffle and the payload all come from: another
    thread writing to ``raw`` meanwhile cannot make them disagree (I9).
    """
    cid, payload, h, _ = encode_record(raw, elem_size, codec, level)
    return cid, payload, h


def encode_record(
    raw: memoryview | bytes, elem_size: int, codec: int, level: int = 0, digested: bool = False
) -> tuple[int, bytes, bytes, bytes | None]:
    """``encode``, and the SHA-256 digest of the same private copy where ``digested`` (None
    otherwise): (codec id, payload, xxh3-128, digest)."""
    check_codec(codec, level)
    copy = raw if isinstance(raw, bytes) else bytes(raw)
    h = digest(copy)
    d = sha256(copy) if digested else None
    packed = None
    if codec == SHUFFLE_LZ4 and MIN_COMPRESS <= len(copy) <= LZ4_MAX_INPUT:
        packed = lz4.block.compress(shuffle(copy, elem_size), mode="default", store_size=False)
    elif codec == SHUFFLE_ZSTD and len(copy) >= MIN_COMPRESS:
        packed = _zstd_compressor(level or ZSTD_DEFAULT_LEVEL).compress(shuffle(copy, elem_size))
    if packed is not None and keeps_compressed(len(packed), len(copy)):
        return codec, packed, h, d
    return RAW, copy, h, d


_local = threading.local()  # zstandard's (de)compressors are not thread-safe: one per thread


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor at ``level``: one zstd frame with its content size, no checksum,
    no dictionary id (native/chunk.c sets the same parameters)."""
    mine = _local.__dict__.setdefault("zstd", {})
    c = mine.get(level)
    if c is None:
        c = mine[level] = zstandard.ZstdCompressor(
            level=level, write_content_size=True, write_checksum=False, write_dict_id=False
        )
    return c


def _zstd_decode(payload: Any, raw_len: int) -> bytes:
    """Check a shuffle-zstd payload (format.md section 7) before decoding it: one frame, the zstd
    magic, no checksum or dictionary flags, content size raw_len, no trailing bytes."""
    head = bytes(payload[:6])
    if len(head) < 6 or head[:4] != ZSTD_MAGIC or head[4] & 0x07:
        raise FormatError("zstd payload is not one plain zstd frame")
    try:
        if zstandard.frame_content_size(payload) != raw_len:
            raise FormatError("zstd frame content size is not raw_len")
        d = _local.__dict__.get("zstd_d")
        if d is None:
            d = _local.zstd_d = zstandard.ZstdDecompressor()
        data = d.decompress(payload, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise FormatError(f"zstd payload cannot be decoded: {e}") from None
    if len(data) != raw_len:
        raise FormatError("decoded length mismatch")
    return data


def _decode_py(codec: int, payload: Any, raw_len: int, elem_size: int) -> bytes:
    check_lengths(codec, len(payload), raw_len, elem_size)
    if codec == RAW:
        return payload if isinstance(payload, bytes) else bytes(payload)
    if codec == SHUFFLE_ZSTD:
        return unshuffle(_zstd_decode(payload, raw_len), elem_size)
    try:
        data = lz4.block.decompress(payload, uncompressed_size=raw_len)
    except lz4.block.LZ4BlockError as e:
        raise FormatError(f"LZ4 payload cannot be decoded: {e}") from None
    if len(data) != raw_len:
        raise FormatError("decoded length mismatch")
    return unshuffle(data, elem_size)


def decode(
    codec: int, payload: Any, raw_len: int, elem_size: int, backend: str | None = None
) -> bytes:
    """Return the raw bytes of a chunk; raises FormatError if the payload cannot be decoded."""
    if _backend.resolve(backend) == _backend.PYTHON:
        return _decode_py(codec, payload, raw_len, elem_size)
    check_lengths(codec, len(payload), raw_len, elem_size)
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


def split_chunks(view: memoryview, chunk_size: int) -> list[memoryview]:
    """``view`` cut into ``chunk_size``-byte pieces (the last may be shorter)."""
    return [view[i : i + chunk_size] for i in range(0, len(view), chunk_size)]


def encode_buffer(
    buf: Any,
    elem_size: int,
    chunk_size: int,
    codec: int = SHUFFLE_LZ4,
    threads: int | None = None,
    backend: str | None = None,
    level: int = 0,
) -> list[tuple[int, bytes, bytes]]:
    """Split ``buf`` into chunks of ``chunk_size`` bytes; return (codec, payload, hash) each."""
    view = as_buffer(buf)
    check_chunking(len(view), elem_size, chunk_size, codec, level)
    threads = threads or _backend.default_threads()
    if _backend.resolve(backend) == _backend.NATIVE:
        return _backend.native().encode(view, elem_size, chunk_size, codec, level, threads)
    return parallel_map(
        lambda p: encode(p, elem_size, codec, level), split_chunks(view, chunk_size), threads
    )


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
    todo = [DecodeItem(*it) for it in items]
    for i, it in enumerate(todo):  # both backends
        check_dest(view, it.dest_offset, it.raw_len, i)
        if not (0 <= it.codec <= 0xFF and 0 <= it.elem_size <= 0xFF):
            raise ChunkError("unknown codec or elem_size out of range", i)
    if _backend.resolve(backend) == _backend.NATIVE:
        n = _backend.native()
        try:
            n.decode_into(view, [tuple(it) for it in todo], threads)
        except n.DecodeError as e:
            raise chunk_error(e) from None
        return

    def one(i: int) -> None:
        it = todo[i]
        try:
            raw = _decode_py(it.codec, it.payload, it.raw_len, it.elem_size)
        except FormatError as e:
            raise ChunkError(str(e), i) from None
        if it.hash is not None and digest(raw) != it.hash:
            raise ChunkHashError("chunk hash mismatch (data corrupted)", i)
        view[it.dest_offset : it.dest_offset + it.raw_len] = raw

    first_error(one, len(todo), threads)
