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
(native/seal.c: the system's OpenSSL; ``sealwrite``) and opens sealed records in its read
pipeline; the pure-Python one (``sealwrite.write_sealed``, ``read_sealed`` here) uses the
``cryptography`` package. The keys (HKDF) and the associated data are derived here for both,
with the rule of which tensors a save seals (``Sealing``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .encode import decode
from .format.datafile import (
    FormatError,
    RecordHeader,
    check_sealed_record,
)
from .format.encryption import is_scope

FEATURE = "encryption"
AEAD = "aes-256-gcm"
TAG = 16
NONCE = 12
KEY_BYTES = 32
_AAD_MAGIC = b"CKGSEAL1"
_RECORD_INFO = b"ckptguard record key v1\0"
_FINGERPRINT_INFO = b"ckptguard fingerprint v1"
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
