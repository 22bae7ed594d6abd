"""Every read and write of the data path on a file descriptor.

The loops ``write_all``, ``pwrite_all`` and ``pread_exact`` handle short writes and reads in one
place for the writer, the reader and the drain. On them: ``write_records`` (encode a buffer and
write its aligned chunk records), ``write_segments`` (the same for many buffers in one call, the
writer's batches) and ``read_records`` (read, check and decode records into a destination), on
either backend. The native path adds O_DIRECT and early writeback inside the extension
(native/pipeline.c); the pure-Python path writes buffered and advises readahead. Both report
what a write took (``WriteResult``, ``Batch``: encode and write nanoseconds, bytes written),
which the writer's controller (``adapt``) uses to choose the codec and the I/O mode.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from . import backend as _backend
from .encode import (
    SHUFFLE_LZ4,
    ChunkDigestError,
    ChunkError,
    ChunkHashError,
    ReadItem,
    Record,
    as_buffer,
    check_chunking,
    check_dest,
    chunk_error,
    decode,
    digest,
    encode_record,
    first_error,
    parallel_map,
    sha256,
    split_chunks,
)
from .format.datafile import (
    RECORD_HEADER_SIZE,
    FormatError,
    RecordHeader,
    check_record,
    pack_record_header,
)
from .format.layout import ALIGN, align

MAX_EXTENT = 1 << 40  # a record longer than this is refused before reading (as the native path)
MAX_SEQ = 0xFFFFFFFF  # record sequence numbers are 32 bits
_ZERO_PAGE = bytes(ALIGN)


class WriteResult(NamedTuple):
    """What ``write_records`` wrote."""

    records: list[Record]
    end: int  # offset after the last record's padding; the descriptor is positioned there
    direct: bool  # every record was written with O_DIRECT
    enc_ns: int = 0  # copying, hashing and encoding the chunks, summed over the threads
    write_ns: int = 0  # writing the records (for buffered ones: and awaiting their writeback)
    written: int = 0  # bytes of records written (headers, payloads, padding)


def open_direct(path: str) -> int:
    """An O_DIRECT write descriptor of ``path`` (an existing file), or -1 where the system or
    the file system refuses O_DIRECT (tmpfs: EINVAL): records are then written buffered."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, os.O_WRONLY | flag | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return -1
        raise OSError(e.errno, e.strerror, path) from None


def _views(parts: Sequence[Any]) -> list[memoryview]:
    return [memoryview(p).cast("B") for p in parts if len(p)]


def _advance(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes written from ``views`` (a short write leaves the rest)."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views.pop(0)
    if views and n:
        views[0] = views[0][n:]


def write_all(fd: int, *parts: bytes | memoryview) -> int:
    """Write every byte of ``parts`` at the file position (handling short writes); return the
    count."""
    total = 0
    views = _views(parts)
    while views:
        n = os.writev(fd, views)
        total += n
        _advance(views, n)
    return total


def pwrite_all(fd: int, parts: Sequence[Any], offset: int, path: str | None = None) -> int:
    """Write every byte of ``parts`` at ``offset`` (handling short writes); return the count.
    An OSError names ``path`` when given (the caller's file, not the descriptor)."""
    total = 0
    views = _views(parts)
    while views:
        try:
            n = os.pwritev(fd, views, offset + total)
        except OSError as e:
            if path is None:
                raise
            raise OSError(e.errno, e.strerror, path) from None
        total += n
        _advance(views, n)
    return total


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Read exactly ``length`` bytes at ``offset`` or return fewer only at end of file."""
    chunks = []
    while length > 0:
        b = os.pread(fd, length, offset)
        if not b:
            break
        chunks.append(b)
        length -= len(b)
        offset += len(b)
    return b"".join(chunks)


def write_records(
    fd: int,
    path: str,
    pos: int,
    seq0: int,
    buf: Any,
    elem_size: int,
    chunk_size: int,
    codec: int = SHUFFLE_LZ4,
    threads: int | None = None,
    direct: bool | None = None,
    backend: str | None = None,
    level: int = 0,
    dfd: int = -1,
) -> WriteResult:
    """Encode ``buf`` and write its chunk records (docs/format.md section 7) at ``pos``.

    ``codec`` is tried on every chunk at ``level`` (``encode.encode``). Records get sequence
    numbers from ``seq0`` and lie back to back, each padded to 4096 bytes.
    ``fd`` is left positioned at the returned ``end``. Nothing is fsynced (one fsync per file is
    the caller's). ``direct`` (default: CKPTGUARD_ODIRECT=1) writes the native path's records
    through ``dfd``, an O_DIRECT descriptor of the same file (``open_direct``; one is opened for
    this call if none is given), where the file system allows it. I/O errors raise OSError with
    errno and ``path``.
    """
    view = as_buffer(buf)
    check_chunking(len(view), elem_size, chunk_size, codec)
    if pos % ALIGN or pos < 0:
        raise ValueError("pos must be a non-negative multiple of 4096")
    if seq0 < 0 or seq0 + -(-len(view) // chunk_size) > MAX_SEQ:
        raise ValueError("record sequence numbers must fit in 32 bits")
    threads = threads or _backend.default_threads()
    direct = _backend.direct_io() is True if direct is None else direct
    if _backend.resolve(backend) == _backend.NATIVE:
        own = open_direct(path) if direct and dfd < 0 and len(view) else -1
        try:
            recs, end, used, (enc_ns, write_ns, written) = _backend.native().write_records(
                fd,
                path,
                pos,
                seq0,
                view,
                elem_size,
                chunk_size,
                codec,
                level,
                threads,
                (own if own >= 0 else dfd) if direct else -1,
            )
        finally:
            if own >= 0:
                os.close(own)
        return WriteResult([Record(*r) for r in recs], end, used, enc_ns, write_ns, written)
    seg = Segment(view, elem_size, codec, level)
    done = _write_segments_py(fd, path, pos, seq0, [seg], chunk_size, threads, np.array([0]))
    recs = done.records()
    return WriteResult(
        recs, done.end, False, int(done.enc_ns[0]), int(done.write_ns[0]), int(done.written[0])
    )


def wait_written(fd: int, path: str, backend: str | None = None) -> int:
    """Write back what the buffered writes of ``fd`` left in the page cache and wait for it
    (no cache flush of the device, unlike fsync); the nanoseconds it took. The writer's
    controller adds them to a stretch's write time, so a buffered stretch is charged for its
    whole trip to the disk. The pure-Python path, which never compares I/O modes, does
    nothing. A writeback error raises OSError naming ``path``."""
    if _backend.resolve(backend) != _backend.NATIVE:
        return 0
    t0 = time.perf_counter_ns()
    _backend.native().wait_written(fd, path, 0, 0)
    return time.perf_counter_ns() - t0


class Segment(NamedTuple):
    """One buffer of a ``write_segments`` batch: its chunks are tried with ``codec`` at
    ``level``; ``direct``: its records go through the O_DIRECT descriptor (native path)."""

    buf: memoryview
    elem_size: int
    codec: int
    level: int = 0
    direct: bool = False


class Batch(NamedTuple):
    """What ``write_segments`` wrote: its records as columns, in file order (the ``Record``
    fields), and per segment how many records it has and what they measured."""

    end: int  # offset after the last record's padding; the descriptor is positioned there
    codec: np.ndarray  # uint8 per record
    stored_len: np.ndarray  # int64 per record
    hash: bytes  # 16 bytes per record
    offset: np.ndarray  # int64 per record
    raw_len: np.ndarray  # int64 per record
    nrecords: np.ndarray  # int64 per segment: its records
    direct: np.ndarray  # bool per segment: every record went through O_DIRECT
    enc_ns: np.ndarray  # int64 per segment, as ``WriteResult``
    write_ns: np.ndarray
    written: np.ndarray
    digest: bytes = b""  # 32 bytes (SHA-256) per record where asked for, else empty

    def records(self) -> list[Record]:
        """The records as ``Record`` tuples (for tests and the one-buffer ``write_records``)."""
        cols = (self.codec, self.stored_len, self.offset, self.raw_len)
        h, d = self.hash, self.digest
        return [
            Record(
                int(c),
                int(st),
                h[16 * i : 16 * i + 16],
                int(o),
                int(r),
                d[32 * i : 32 * i + 32] or None,
            )
            for i, (c, st, o, r) in enumerate(zip(*cols, strict=True))
        ]


def write_segments(
    fd: int,
    path: str,
    pos: int,
    seq0: int,
    segments: Sequence[Segment],
    chunk_size: int,
    threads: int | None = None,
    backend: str | None = None,
    dfd: int = -1,
    digest: bool = False,
    seals: Sequence[tuple | None] | None = None,
    file_id: tuple[bytes, int] | None = None,
) -> Batch:
    """``write_records`` of every segment, in order, in one call: the same records (sequence
    numbers from ``seq0``, back to back from ``pos``) and bytes as one call per segment, but the
    chunks of all of them share the pool (one native call with the GIL released). ``dfd``: an
    O_DIRECT descriptor of the file for the segments that ask for it (-1: none). ``digest``:
    each record's SHA-256 too, from the same private copy as its hash (``Batch.digest``).
    ``seals`` (native path only): per segment, how its records are sealed (``seal``'s
    ``native_seal``) or None, in the data file ``file_id`` (uuid bytes, rank)."""
    for seg in segments:
        check_chunking(len(seg.buf), seg.elem_size, chunk_size, seg.codec, seg.level)
    count = np.array([-(-len(seg.buf) // chunk_size) for seg in segments], dtype=np.int64)
    if pos % ALIGN or pos < 0:
        raise ValueError("pos must be a non-negative multiple of 4096")
    if seq0 < 0 or seq0 + int(count.sum()) > MAX_SEQ:
        raise ValueError("record sequence numbers must fit in 32 bits")
    threads = threads or _backend.default_threads()
    if _backend.resolve(backend) == _backend.PYTHON:
        if seals is not None:
            raise ValueError("sealed segments go through seal.write_sealed on this backend")
        return _write_segments_py(fd, path, pos, seq0, segments, chunk_size, threads, count, digest)
    items: list[tuple] = [tuple(seg) for seg in segments]
    uuid, rank = file_id if file_id is not None else (None, 0)
    if seals is not None:
        items = [(*it, sl) for it, sl in zip(items, seals, strict=True)]
    end, recs, per = _backend.native().write_segments(
        fd, path, pos, seq0, items, chunk_size, threads, dfd, digest, uuid, rank
    )
    codecs, stored, hashes, offsets, raw, digests = recs
    i64 = [np.frombuffer(c, dtype=np.int64) for c in (stored, offsets, raw, *per[1:])]
    direct = np.frombuffer(per[0], dtype=np.uint8).astype(bool)
    return Batch(
        end,
        np.frombuffer(codecs, np.uint8),
        i64[0],
        hashes,
        i64[1],
        i64[2],
        count,
        direct,
        i64[3],
        i64[4],
        i64[5],
        digest=digests,
    )


def _write_segments_py(
    fd: int,
    path: str,
    pos: int,
    seq0: int,
    segments: Sequence[Segment],
    chunk_size: int,
    threads: int,
    count: np.ndarray,
    digested: bool = False,
) -> Batch:
    """``write_segments`` on the pure-Python path: buffered writes, the same bytes."""
    pieces = [(s, p) for s, seg in enumerate(segments) for p in split_chunks(seg.buf, chunk_size)]
    step = max(2 * threads, 1)  # bounded memory: a few chunks in flight, as on the native path
    cols: list[list[Any]] = [[], [], [], [], []]  # codec, stored_len, hash, offset, raw_len
    digests: list[bytes] = []
    per = np.zeros((3, len(segments)), dtype=np.int64)  # enc_ns, write_ns, written

    def timed(item: tuple[int, memoryview]) -> tuple[tuple[int, bytes, bytes, Any], int]:
        seg = segments[item[0]]
        t0 = time.perf_counter_ns()
        done = encode_record(item[1], seg.elem_size, seg.codec, seg.level, digested)
        return done, time.perf_counter_ns() - t0

    for b in range(0, len(pieces), step):
        chunks = parallel_map(timed, pieces[b : b + step], threads)
        for n, ((cid, payload, h, d), ns) in enumerate(chunks, start=b):
            if d is not None:
                digests.append(d)
            s, raw = pieces[n]
            hdr = RecordHeader(cid, segments[s].elem_size, len(raw), len(payload), h, seq0 + n)
            used = RECORD_HEADER_SIZE + len(payload)
            parts = [pack_record_header(hdr), payload, _ZERO_PAGE[: align(used) - used]]
            t0 = time.perf_counter_ns()
            pwrite_all(fd, parts, pos, path)
            per[:, s] += (ns, time.perf_counter_ns() - t0, align(used))
            for col, v in zip(cols, (cid, len(payload), h, pos, len(raw)), strict=True):
                col.append(v)
            pos += align(used)
    os.lseek(fd, pos, os.SEEK_SET)
    codec, stored, hashes, offset, raw_len = cols
    i64 = [np.array(c, dtype=np.int64) for c in (stored, offset, raw_len)]
    direct = np.zeros(len(segments), dtype=bool)
    return Batch(
        pos,
        np.array(codec, np.uint8),
        i64[0],
        b"".join(hashes),
        i64[1],
        i64[2],
        count,
        direct,
        per[0],
        per[1],
        per[2],
        digest=b"".join(digests),
    )


def _check_read_item(it: ReadItem, i: int) -> None:
    """Refuse an item no record could match (both backends), before reading anything."""
    bad = it.offset % ALIGN or it.extent % ALIGN or it.extent < RECORD_HEADER_SIZE
    bad = bad or it.offset < 0 or it.offset + it.extent > 2**63 - 1 or it.extent > MAX_EXTENT
    bad = bad or not 0 <= it.stored_len <= it.extent - RECORD_HEADER_SIZE
    bad = bad or not (0 <= it.codec <= 0xFF and 0 <= it.elem_size <= 0xFF)
    if bad or it.seq > MAX_SEQ:
        raise ChunkError("record header disagrees with the index", i)


def fadvise_sequential(fd: int, items: Sequence[ReadItem]) -> None:
    """Advise the kernel that the span of ``items`` is about to be read in order (readahead)."""
    if items and hasattr(os, "posix_fadvise"):
        lo = min(it.offset for it in items)
        hi = max(it.offset + it.extent for it in items)
        os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_SEQUENTIAL)


def read_records(
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
    padding is zero, that it decodes, and (if ``verify``) its hash and its item's digest. Problems
    raise ChunkError / ChunkHashError / ChunkDigestError with the item's index; I/O errors raise
    OSError with ``path``.
    """
    view = as_buffer(dest, writable=True)
    threads = threads or _backend.default_threads()
    todo = [ReadItem(*it) for it in items]
    for i, it in enumerate(todo):
        check_dest(view, it.dest_offset, it.raw_len, i)
        _check_read_item(it, i)
    if _backend.resolve(backend) == _backend.NATIVE:
        n = _backend.native()
        try:
            n.read_into(fd, path, view, todo, threads, verify)
        except n.DecodeError as e:
            raise chunk_error(e) from None
        return
    fadvise_sequential(fd, todo)

    def one(i: int) -> None:
        it = todo[i]
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
            raw = decode(it.codec, payload, it.raw_len, it.elem_size, _backend.PYTHON)
        except FormatError as e:
            raise ChunkError(str(e), i) from None
        if verify and digest(raw) != it.hash:
            raise ChunkHashError("chunk hash mismatch (data corrupted)", i)
        if verify and it.digest is not None and sha256(raw) != it.digest:
            raise ChunkDigestError("chunk digest mismatch (SHA-256: data altered)", i)
        view[it.dest_offset : it.dest_offset + it.raw_len] = raw

    first_error(one, len(todo), threads)
