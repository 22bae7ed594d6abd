"""Sealed records (docs/format.md section 4.4, feature ``encryption``): a chunk record's payload
encrypted with AES-256-GCM under a key derived from its scope's data key.

What is bound and how (format.md has the byte layouts): each data file has its own record key,
derived with HKDF-SHA256 from the data key, the file's checkpoint uuid and rank, so a scope's
key never meets the same nonce twice however many checkpoints it encrypts; each record's
96-bit nonce is its sequence number (at most 2^32 records per file); the associated data names
the record's place (uuid, rank, sequence number), its key, its header fields and every index
row it holds (tensor key, shard, chunk, byte ranges), so a record moved, swapped or replayed
from another checkpoint fails authentication. The index's ``hash`` of a sealed row is the
xxh3-128 of the raw bytes enciphered with a second key derived from the data key
(``Scope.fingerprint``): equal chunks have equal hashes within a scope and unrelated ones
across scopes. The record header's
hash covers the stored ciphertext instead, so a checker without the key still checks every
stored byte (``check_stored``).

Both backends write the same bytes: the native one seals inside its write pipeline
(native/seal.c: the system's OpenSSL, ``io.write_segments`` with seals) and opens sealed records
in its read pipeline; the pure-Python one (``write_sealed``, ``read_sealed``) uses the
``cryptography`` package. The keys (HKDF) and the associated data are derived here for both.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import backend as _backend
from .encode import codec_pool, decode, encode_record, split_chunks
from .format.datafile import (
    RECORD_HEADER_SIZE,
    SEALED,
    FormatError,
    RecordHeader,
    check_sealed_record,
    pack_record_header,
)
from .format.encryption import is_scope
from .format.layout import align
from .io import Batch, Segment, pwrite_all, write_segments

FEATURE = "encryption"
AEAD = "aes-256-gcm"
TAG = 16
NONCE = 12
KEY_BYTES = 32
_AAD_MAGIC = b"CKGSEAL1"
_RECORD_INFO = b"ckptguard record key v1\0"
_FINGERPRINT_INFO = b"ckptguard fingerprint v1"
_ZERO_PAGE = bytes(4096)
_AAD_HEAD = struct.Struct("<8s16sII16sBBQI")  # magic uuid rank seq key_id codec elem raw nrows


def record_nonce(seq: int) -> bytes:
    """The nonce of the record with sequence number ``seq``: unique under its file's record key
    (a writer never writes two records of one sequence number into one data file)."""
    return struct.pack("<I8x", seq)


def _hkdf(key: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), KEY_BYTES, salt, info).derive(key)


class RowId(NamedTuple):
    """What the associated data names of one index row of a record."""

    record_byte_offset: int
    raw_len: int
    chunk: int
    shard_byte_offset: int
    shard_offsets: Sequence[int]
    key: str


def record_aad(
    uuid_hex: str,
    rank: int,
    seq: int,
    key_id: str,
    codec: int,
    elem_size: int,
    record_raw_len: int,
    rows: Sequence[RowId],
) -> bytes:
    """The associated data of a sealed record (format.md section 4.4): its place (file and
    sequence number), key, header fields and rows, the rows in ``record_byte_offset`` order."""
    parts = [
        _AAD_HEAD.pack(
            _AAD_MAGIC,
            bytes.fromhex(uuid_hex),
            rank,
            seq,
            bytes.fromhex(key_id),
            codec,
            elem_size,
            record_raw_len,
            len(rows),
        )
    ]
    parts.extend(row_bytes(r) for r in sorted(rows, key=lambda r: r.record_byte_offset))
    return b"".join(parts)


def row_tail(shard_offsets: Sequence[int], key: str) -> bytes:
    """A row's associated data after its shard_byte_offset: its shard offsets and key."""
    k = key.encode()
    n = len(shard_offsets)
    return struct.pack(f"<I{n}qI", n, *shard_offsets, len(k)) + k


def row_bytes(r: RowId) -> bytes:
    """One row's associated data (format.md section 4.4)."""
    head = struct.pack("<QQIQ", r.record_byte_offset, r.raw_len, r.chunk, r.shard_byte_offset)
    return head + row_tail(r.shard_offsets, r.key)


@dataclass
class Scope:
    """One data key in use: its id, scope name, and the keys derived from it (per file, and the
    fingerprint key). Holds key material: never logged, never pickled into a message."""

    key_id: str
    scope: str
    key: bytes = field(repr=False)
    _files: dict[tuple[str, int], tuple[bytes, AESGCM]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ValueError("a data key is 32 bytes")
        self.fingerprint_key = _hkdf(self.key, None, _FINGERPRINT_INFO)
        self._fp = Cipher(algorithms.AES(self.fingerprint_key), modes.ECB())

    def fingerprint(self, xxh: bytes) -> bytes:
        """The index hash of a sealed row whose raw bytes have xxh3-128 ``xxh``."""
        enc = self._fp.encryptor()
        return enc.update(xxh) + enc.finalize()

    def fingerprints(self, xxhs: bytes) -> bytes:
        """``fingerprint`` of each 16-byte hash in ``xxhs``, concatenated (one call)."""
        enc = self._fp.encryptor()
        return enc.update(xxhs) + enc.finalize()

    def record_key(self, uuid_hex: str, rank: int) -> bytes:
        """The record key of data file (``uuid_hex``, ``rank``), as bytes (the native path's)."""
        return self._file(uuid_hex, rank)[0]

    def aead(self, uuid_hex: str, rank: int) -> AESGCM:
        """The record key of data file (``uuid_hex``, ``rank``)."""
        return self._file(uuid_hex, rank)[1]

    def _file(self, uuid_hex: str, rank: int) -> tuple[bytes, AESGCM]:
        k = (uuid_hex, rank)
        with self._lock:
            got = self._files.get(k)
            if got is None:
                info = _RECORD_INFO + struct.pack("<I", rank)
                key = _hkdf(self.key, bytes.fromhex(uuid_hex), info)
                got = self._files[k] = (key, AESGCM(key))
            return got


def seal_payload(aead: AESGCM, nonce: bytes, payload: Any, aad: bytes) -> bytearray:
    """``payload`` encrypted: ciphertext followed by the 16-byte tag."""
    out = bytearray(len(payload) + TAG)
    aead.encrypt_into(nonce, payload, aad, out)
    return out


def open_payload(aead: AESGCM, nonce: bytes, stored: Any, aad: bytes) -> bytearray:
    """The plaintext of a sealed payload; FormatError if it does not authenticate."""
    if len(stored) < TAG:
        raise FormatError("sealed payload is shorter than its tag")
    out = bytearray(len(stored) - TAG)
    try:
        aead.decrypt_into(nonce, stored, aad, out)
    except InvalidTag:
        raise FormatError(
            "sealed chunk does not authenticate: altered, moved or replayed from another "
            "checkpoint, or encrypted under another key"
        ) from None
    return out


class Opened(NamedTuple):
    """A sealed record checked and decrypted: its raw bytes and the header's nonce."""

    raw: bytes
    nonce: bytes


def read_sealed(
    buf: bytes,
    scope: Scope,
    uuid_hex: str,
    rank: int,
    codec: int,
    elem_size: int,
    record_raw_len: int,
    stored_len: int,
    row_hash: bytes,
    seq: int,
    rows: Sequence[RowId],
    verify: bool = True,
    digest: bytes | None = None,
    backend: str | None = None,
) -> bytes:
    """Check a whole sealed record read from a data file (``check_stored``), decrypt and decode
    it, and (with ``verify``) compare its fingerprint with the row's hash: its raw bytes.
    FormatError names what is wrong."""
    header, payload = check_stored(
        buf, codec, elem_size, record_raw_len, stored_len, seq, digest if verify else None
    )
    aad = record_aad(uuid_hex, rank, seq, scope.key_id, codec, elem_size, record_raw_len, rows)
    plain = open_payload(scope.aead(uuid_hex, rank), header.nonce, payload, aad)
    raw = decode(codec, plain, record_raw_len, elem_size, backend)
    if verify and scope.fingerprint(xxhash.xxh3_128(raw).digest()) != row_hash:
        raise FormatError("chunk hash mismatch (data corrupted)")
    return raw


def check_stored(
    buf: bytes,
    codec: int,
    elem_size: int,
    record_raw_len: int,
    stored_len: int,
    seq: int,
    digest: bytes | None = None,
) -> tuple[RecordHeader, memoryview]:
    """What can be checked of a sealed record without its key: the header against the row, the
    padding, the xxh3-128 of the stored bytes (in the header) and, under ``digests``, their
    SHA-256. Returns the header and the stored payload; FormatError names what is wrong."""
    header, payload = check_sealed_record(buf, codec, elem_size, record_raw_len, stored_len, seq)
    if digest is not None and hashlib.sha256(payload).digest() != digest:
        raise FormatError("chunk digest mismatch (SHA-256: data altered)")
    return header, payload


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


__all__ = [
    "AEAD",
    "FEATURE",
    "Rule",
    "Sealing",
    "check_rule",
    "scope_name",
    "RowId",
    "Scope",
    "check_stored",
    "chunks_of",
    "record_nonce",
    "open_payload",
    "read_sealed",
    "record_aad",
    "seal_payload",
    "write_sealed",
]


# ---- which tensors a save seals, under which scope ----------------------------------------

Rule = str | Mapping[str, str | None]
"""The ``encrypt`` option: one scope for every tensor, or ``{pattern: scope or None}`` where
the first pattern (``fnmatch``, case-sensitive) that matches a tensor's key decides (None, or
no match: stored in the clear)."""


def check_rule(rule: Any) -> None:
    """Refuse an ``encrypt`` option that is not a scope name or a mapping of patterns to scope
    names (or None), naming what is wrong."""
    if isinstance(rule, str):
        if not is_scope(rule):
            raise ValueError(
                f"encrypt: {rule!r} is not a valid scope name (1..256 characters, "
                "no control characters)"
            )
        return
    if not isinstance(rule, Mapping):
        raise TypeError(f"encrypt must be a scope name or a mapping, not {type(rule).__name__}")
    for pattern, scope in rule.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"encrypt: pattern {pattern!r} is not a non-empty string")
        if scope is not None and not is_scope(scope):
            raise ValueError(f"encrypt: {scope!r} (for {pattern!r}) is not a valid scope name")


def scope_name(rule: Rule | None, key: str) -> str | None:
    """The scope a tensor with key ``key`` is sealed under by ``rule`` (None: in the clear)."""
    if rule is None:
        return None
    if isinstance(rule, str):
        return rule
    for pattern, scope in rule.items():
        if fnmatch.fnmatchcase(key, pattern):
            return scope
    return None


class Sealing:
    """A save's sealing on one rank: the rule and the data keys of its scopes (``scopes``:
    scope name -> Scope). ``for_key`` gives a tensor's Scope (None: in the clear)."""

    def __init__(self, rule: Rule, scopes: Mapping[str, Scope]) -> None:
        self.rule, self.scopes = rule, dict(scopes)
        self._memo: dict[str, Scope | None] = {}

    def for_key(self, key: str) -> Scope | None:
        got = self._memo.get(key, False)
        if got is False:
            name = scope_name(self.rule, key)
            got = self._memo[key] = self.scopes[name] if name is not None else None
        return got  # type: ignore[return-value]

    def to_plan(self) -> dict[str, list[str]]:
        """The keys as a save's plan carries them to the ranks: scope -> [key_id, key hex]."""
        return {s: [k.key_id, k.key.hex()] for s, k in self.scopes.items()}

    @classmethod
    def from_plan(cls, rule: Rule, plan: Mapping[str, Sequence[str]]) -> Sealing:
        return cls(rule, {s: Scope(kid, s, bytes.fromhex(k)) for s, (kid, k) in plan.items()})

    def key_scopes(self) -> dict[str, str]:
        """``{key_id: scope}`` of every data key (the manifest's ``encryption`` member)."""
        return {k.key_id: s for s, k in self.scopes.items()}
