"""Writing sealed records (docs/format.md section 4.4): a writer's batch with its sealed
stretches, through the native pipeline (which seals in C) or, on the pure-Python backend, here,
chunk by chunk on the codec pool ahead of the in-order writes: the same bytes either way."""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple

import numpy as np
import xxhash

from . import backend as _backend
from .encode import codec_pool, encode_record, split_chunks
from .format.datafile import RECORD_HEADER_SIZE, SEALED, RecordHeader, pack_record_header
from .format.layout import align
from .io import Batch, Segment, pwrite_all, write_segments
from .seal import (
    RowId,
    Scope,
    Sealing,
    record_aad,
    record_nonce,
    row_bytes,
    row_tail,
    seal_payload,
)

_ZERO_PAGE = bytes(4096)


class SealedChunk(NamedTuple):
    """One chunk of a sealed write: where its bytes are, whose key, and what its AAD names."""

    seg: int  # index of its segment in the batch
    raw: memoryview
    scope: Scope | None  # None: written as an ordinary record
    rows: Sequence[RowId]


class _Done(NamedTuple):
    """One chunk made into a record by ``_make``: its bytes and its index columns."""

    head: bytes
    payload: Any
    codec: int
    hash: bytes  # the index's: the xxh3-128 of the raw bytes, or their fingerprint
    digest: bytes | None
    ns: int


def _make(
    c: SealedChunk,
    seg: Segment,
    seq: int,
    where: tuple[str, int, int, str, bool],
) -> _Done:
    """Encode chunk ``c`` from one private copy (``backend``) and seal it if it has a scope:
    the record of sequence number ``seq`` (``where``: uuid, rank, chunk size, backend, and
    whether digests are kept). Runs on a pool thread; the heavy steps release the GIL."""
    uuid_hex, rank, chunk_size, backend, digested = where
    t0 = time.perf_counter_ns()
    copy = bytes(c.raw)
    plain_digest = digested and c.scope is None
    if backend == _backend.NATIVE:
        ((cid, payload, h),) = _backend.native().encode(
            memoryview(copy), seg.elem_size, chunk_size, seg.codec, seg.level, 1
        )
        d = hashlib.sha256(copy).digest() if plain_digest else None
    else:
        cid, payload, h, d = encode_record(copy, seg.elem_size, seg.codec, seg.level, plain_digest)
    if c.scope is None:
        head = RecordHeader(cid, seg.elem_size, len(copy), len(payload), h, seq)
        return _Done(pack_record_header(head), payload, cid, h, d, time.perf_counter_ns() - t0)
    nonce = record_nonce(seq)
    aad = record_aad(uuid_hex, rank, seq, c.scope.key_id, cid, seg.elem_size, len(copy), c.rows)
    stored = seal_payload(c.scope.aead(uuid_hex, rank), nonce, payload, aad)
    if digested:
        d = hashlib.sha256(stored).digest()
    stored_hash = xxhash.xxh3_128(stored).digest()
    head = RecordHeader(cid, seg.elem_size, len(copy), len(stored), stored_hash, seq, SEALED, nonce)
    fp = c.scope.fingerprint(h)
    return _Done(pack_record_header(head), stored, cid, fp, d, time.perf_counter_ns() - t0)


def write_sealed(
    fd: int,
    path: str,
    pos: int,
    seq0: int,
    uuid_hex: str,
    rank: int,
    segments: Sequence[Segment],
    chunks: Sequence[SealedChunk],
    chunk_size: int,
    threads: int,
    backend: str | None = None,
    digested: bool = False,
) -> Batch:
    """Write ``chunks`` (the chunks of ``segments``, in order) as records from ``pos``: those
    with a scope sealed, the others as ordinary records, each encoded by ``backend`` from one
    private copy. The pool encodes and seals up to ``2 * threads`` chunks ahead of the
    (buffered) writes, in order. Returns the ``io.Batch`` of ``io.write_segments``, with the
    fingerprints as hashes and, where ``digested``, the digests of the stored bytes of sealed
    records and of the raw bytes of the others."""
    cols: list[list[Any]] = [[], [], [], [], []]  # codec, stored_len, hash, offset, raw_len
    digests: list[bytes] = []
    per = np.zeros((3, len(segments)), dtype=np.int64)  # enc_ns, write_ns, written
    where = (uuid_hex, rank, chunk_size, _backend.resolve(backend), digested)

    def make(i: int) -> _Done:
        return _make(chunks[i], segments[chunks[i].seg], seq0 + i, where)

    ahead: deque[Future[_Done]] = deque()
    pool = codec_pool(max(threads, 1))
    try:
        for i, c in enumerate(chunks):
            while len(ahead) < 2 * max(threads, 1) and i + len(ahead) < len(chunks):
                ahead.append(pool.submit(make, i + len(ahead)))
            done = ahead.popleft().result()
            if done.digest is not None:
                digests.append(done.digest)
            used = RECORD_HEADER_SIZE + len(done.payload)
            t0 = time.perf_counter_ns()
            pwrite_all(fd, [done.head, done.payload, _ZERO_PAGE[: align(used) - used]], pos, path)
            per[:, c.seg] += (done.ns, time.perf_counter_ns() - t0, align(used))
            row = (done.codec, len(done.payload), done.hash, pos, len(c.raw))
            for col, v in zip(cols, row, strict=True):
                col.append(v)
            pos += align(used)
    finally:
        for f in ahead:  # an error: nothing of this batch is written after it
            f.cancel()
    os.lseek(fd, pos, os.SEEK_SET)
    codec, stored, hashes_, offset, raw_len = cols
    count = np.bincount([c.seg for c in chunks], minlength=len(segments)).astype(np.int64)
    return Batch(
        pos,
        np.array(codec, np.uint8),
        np.array(stored, np.int64),
        b"".join(hashes_),
        np.array(offset, np.int64),
        np.array(raw_len, np.int64),
        count,
        np.zeros(len(segments), dtype=bool),
        per[0],
        per[1],
        per[2],
        digest=b"".join(digests),
    )


class Stretch(NamedTuple):
    """A writer's queued segment as ``write_stretches`` seals it: the tensor pieces its
    records hold (``refs``: objects with ``key`` and ``offsets``), its first chunk number, and
    for a pack (one record of several whole tensors) where each member's bytes start."""

    seg: Segment
    first: int
    refs: Sequence[Any]
    packed: bool
    starts: Sequence[int]

    def rows(self, i: int, raw_len: int, step: int) -> list[RowId]:
        """The rows of this stretch's ``i``-th chunk (``raw_len`` bytes)."""
        if not self.packed:
            ref, n = self.refs[0], self.first + i
            return [RowId(0, raw_len, n, n * step, tuple(ref.offsets), ref.key)]
        ends = [*self.starts[1:], raw_len]
        return [
            RowId(a, b - a, 0, 0, tuple(r.offsets), r.key)
            for r, a, b in zip(self.refs, self.starts, ends, strict=True)
        ]


def write_stretches(
    at: tuple[int, str, int, int, str, int, int],
    stretches: Sequence[Stretch],
    sealing: Sealing,
    step: int,
    threads: int,
    backend: str | None,
    digested: bool,
) -> tuple[Batch, list[str | None]]:
    """A writer's batch written at ``at`` (fd, path, position, first sequence number, uuid,
    rank, O_DIRECT descriptor or -1): each stretch sealed under the scope of its (first)
    tensor. The native path seals in its pipeline (``io.write_segments``), the pure-Python one
    with ``write_sealed``: the same bytes. Returns the batch and each record's key_id (None:
    in the clear)."""
    scopes = [sealing.for_key(st.refs[0].key) for st in stretches]
    segments = [st.seg for st in stretches]
    fd, path, pos, seq0, uuid_hex, rank, dfd = at
    if _backend.resolve(backend) == _backend.NATIVE:
        seals = [
            native_seal(st, sc, uuid_hex, rank) if sc is not None else None
            for st, sc in zip(stretches, scopes, strict=True)
        ]
        file_id = (bytes.fromhex(uuid_hex), rank)
        done = write_segments(
            fd, path, pos, seq0, segments, step, threads, backend, dfd, digested, seals, file_id
        )
        keys = [sc.key_id if sc else None for sc in scopes]
        return done, [
            k for k, n in zip(keys, done.nrecords.tolist(), strict=True) for _ in range(n)
        ]
    chunks = chunks_of(
        segments, step, scopes.__getitem__, lambda s, i, n: stretches[s].rows(i, n, step)
    )
    done = write_sealed(
        fd, path, pos, seq0, uuid_hex, rank, segments, chunks, step, threads, backend, digested
    )
    return done, [c.scope.key_id if c.scope else None for c in chunks]


def native_seal(st: Stretch, scope: Scope, uuid_hex: str, rank: int) -> tuple:
    """How the native pipeline seals stretch ``st`` (its ``ckg_seal_args``): the record and
    fingerprint keys, the key id, and a pack's rows or a stretch's row tail."""
    if st.packed:
        ends = [*st.starts[1:], len(st.seg.buf)]
        rows = b"".join(
            row_bytes(RowId(a, b - a, 0, 0, tuple(r.offsets), r.key))
            for r, a, b in zip(st.refs, st.starts, ends, strict=True)
        )
        nrows, first = len(st.refs), 0
    else:
        ref = st.refs[0]
        rows, nrows, first = row_tail(tuple(ref.offsets), ref.key), 0, st.first
    key_id = bytes.fromhex(scope.key_id)
    return (scope.record_key(uuid_hex, rank), scope.fingerprint_key, key_id, rows, nrows, first)


def chunks_of(
    segments: Sequence[Segment],
    chunk_size: int,
    scope_of: Callable[[int], Scope | None],
    rows_of: Callable[[int, int, int], Sequence[RowId]],
) -> list[SealedChunk]:
    """The chunks of ``segments`` for ``write_sealed``: ``scope_of(segment)`` is the scope of a
    segment's chunks (None: not sealed), ``rows_of(segment, chunk, raw_len)`` the rows of its
    ``chunk``-th chunk."""
    out = []
    for s, seg in enumerate(segments):
        scope = scope_of(s)
        for i, raw in enumerate(split_chunks(seg.buf, chunk_size)):
            out.append(SealedChunk(s, raw, scope, rows_of(s, i, len(raw)) if scope else ()))
    return out
