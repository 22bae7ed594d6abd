"""Signed checkpoints: the statement that binds one, its signature file, and the reader's check.

A save with ``sign_key`` gets SIGNATURE.json beside MANIFEST.json, written into the staging
directory before the rename, so a checkpoint never appears unsigned when signing was asked for.
The file holds a statement (type, checkpoint name, uuid, SHA-256 of the exact MANIFEST.json
bytes, key id, signing time) and the Ed25519 signature of a fixed prefix followed by the
statement's canonical JSON. The manifest binds the index by its SHA-256, the index every chunk
by its digest (feature ``digests``), so the signature covers every byte. Under trusted keys a
reader refuses (``SignatureError``) a checkpoint without the file, signed by another key,
whose signature does not verify, whose statement names another manifest, or without digests
(docs/format.md section 2.1, docs/security.md).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .audit import canon
from .errors import KeyFileError, SignatureError
from .failpoints import failpoint
from .format.index import DIGESTS  # the feature without which a signature misses the chunks
from .format.layout import SIGNATURE, is_name, is_uuid
from .fsutil import UnsafeFileError, read_regular, write_new_file
from .keys import (
    PUBLIC_SUFFIX,
    SIGNATURE_BYTES,
    PrivateKey,
    PublicKey,
    load_private,
    load_public,
)

__all__ = [
    "DIGESTS",
    "PREFIX",
    "STATEMENT_TYPE",
    "Signed",
    "TrustSet",
    "check",
    "signer",
    "trust_set",
    "write_signature",
]

STATEMENT_TYPE = "ckptguard-checkpoint-signature-v1"
PREFIX = b"ckptguard-checkpoint-signature-v1\n"
"""What every signed message starts with: an audit tree head's signature (whose prefix is
``ckptguard-audit-tree-head-v1``) can never pass for a checkpoint's, nor the reverse."""
MAX_SIGNATURE_BYTES = 4096  # a signature file is about 500 bytes

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
_STATEMENT = ("checkpoint", "key_id", "manifest_sha256", "signed_at", "type", "uuid")

SignKey = str | os.PathLike | PrivateKey
"""What ``sign_key`` may be: a private key file's path, or a key already loaded."""


@dataclass(frozen=True)
class Signed:
    """A signature that verified: who signed (``key_id``) which checkpoint, when."""

    key_id: str
    signed_at: str
    checkpoint: str
    uuid: str


def signer(sign_key: SignKey | None) -> PrivateKey | None:
    """The private key ``sign_key`` names, loaded and checked (``keys.load_private``:
    KeyFileError for a missing, unreadable, group- or world-accessible or non-Ed25519 file)."""
    if sign_key is None or isinstance(sign_key, PrivateKey):
        return sign_key
    if isinstance(sign_key, (str, os.PathLike)):
        return load_private(sign_key)
    raise TypeError(f"sign_key must be a key file's path or a keys.PrivateKey, not {sign_key!r}")


def check_sign_key(sign_key: object) -> None:
    """TypeError unless ``sign_key`` is None, a path or a PrivateKey (nothing is read)."""
    if sign_key is not None and not isinstance(sign_key, (str, os.PathLike, PrivateKey)):
        raise TypeError(
            f"sign_key must be a key file's path or a keys.PrivateKey, not {sign_key!r}"
        )


def key_path(sign_key: SignKey | None) -> str | None:
    """``sign_key`` as the path of its key file, for a process that loads it itself (the
    agent): TypeError for a key that was not loaded from a file."""
    if isinstance(sign_key, PrivateKey):
        if not sign_key.path:
            raise TypeError("sign_key: a key not loaded from a file cannot be handed to the agent")
        return sign_key.path
    return None if sign_key is None else os.fspath(sign_key)


def statement(manifest_raw: bytes, body: dict, key_id: str) -> dict:
    """The statement, signed now, that binds the checkpoint whose MANIFEST.json bytes are
    ``manifest_raw`` (``body`` their decoded body)."""
    return {
        "checkpoint": body["name"],
        "key_id": key_id,
        "manifest_sha256": hashlib.sha256(manifest_raw).hexdigest(),
        "signed_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "type": STATEMENT_TYPE,
        "uuid": body["uuid"],
    }


def signed_message(stmt: dict) -> bytes:
    """The bytes the signature covers: PREFIX, then the statement's canonical JSON."""
    return PREFIX + canon.encode(stmt)


def signature_file(key: PrivateKey, stmt: dict) -> bytes:
    """The bytes of SIGNATURE.json for statement ``stmt``: canonical JSON of
    ``{"sig": hex, "statement": {...}}`` and a newline."""
    sig = key.sign(signed_message(stmt)).hex()
    return canon.encode({"sig": sig, "statement": stmt}) + b"\n"


def write_signature(staging: str, key: PrivateKey, manifest_raw: bytes, body: dict) -> None:
    """Write SIGNATURE.json for ``manifest_raw`` into the staging directory, fsynced (the
    directory's fsync and the rename that follow make it part of the commit). A manifest
    without chunk digests is never signed: the signature would not cover the chunks."""
    if DIGESTS not in body["features"]:
        raise SignatureError(f"refusing to sign {body['name']!r}: it has no chunk digests")
    data = signature_file(key, statement(manifest_raw, body, key.key_id))
    write_new_file(os.path.join(staging, SIGNATURE), data)
    failpoint("commit.signature_written")


# ---- the trusted keys ----------------------------------------------------------------------------


class TrustSet:
    """The public keys a reader trusts, by key id: several, so that checkpoints signed before a
    key rotation stay verifiable with the old key beside the new one."""

    def __init__(self, keys: Iterable[PublicKey]) -> None:
        self.keys = {k.key_id: k for k in keys}
        if not self.keys:
            raise KeyFileError("no trusted keys given: nothing could verify a signature")

    def __contains__(self, key_id: str) -> bool:
        return key_id in self.keys

    def __repr__(self) -> str:
        return f"TrustSet({', '.join(k[:16] for k in sorted(self.keys))})"


Trusted = TrustSet | PublicKey | PrivateKey | str | os.PathLike | Iterable
"""What ``trusted_keys`` may be: a key file (``.pub``, or a private key: its public half), a
directory (its ``*.pub`` files), a key, or a list of these."""


def _from_path(path: str | os.PathLike) -> list[PublicKey]:
    """The key in file ``path``, or every ``*.pub`` key of directory ``path``."""
    p = os.fspath(path)
    if not os.path.isdir(p) or os.path.islink(p):
        return [load_public(p)]
    try:
        names = sorted(n for n in os.listdir(p) if n.endswith(PUBLIC_SUFFIX))
    except OSError as e:
        raise KeyFileError(f"cannot list {p}: {e.strerror or e}", p) from None
    if not names:
        raise KeyFileError(f"{p} is a directory without any *{PUBLIC_SUFFIX} key file", p)
    return [load_public(os.path.join(p, n)) for n in names]


def trust_set(trusted: Trusted | None) -> TrustSet | None:
    """``trusted_keys`` as a TrustSet (None: no signature is checked). KeyFileError for a key
    file that cannot be used, or for none at all."""
    if trusted is None or isinstance(trusted, TrustSet):
        return trusted
    items = [trusted] if isinstance(trusted, (str, os.PathLike, PublicKey, PrivateKey)) else trusted
    keys: list[PublicKey] = []
    for item in items:
        if isinstance(item, PublicKey):
            keys.append(item)
        elif isinstance(item, PrivateKey):
            keys.append(item.public)
        elif isinstance(item, (str, os.PathLike)):
            keys += _from_path(item)
        else:
            raise TypeError(f"a trusted key is a path, a PublicKey or a PrivateKey, not {item!r}")
    return TrustSet(keys)


# ---- the reader's check --------------------------------------------------------------------------


def check(
    path: str,
    dir_fd: int | None,
    manifest_raw: bytes,
    body: dict,
    trust: TrustSet,
    fetch: Callable[[], bytes | None] | None = None,
) -> Signed:
    """Check the signature of the checkpoint at ``path`` (its directory open as ``dir_fd``;
    None: not a directory, whose SIGNATURE.json bytes ``fetch`` returns, None if it has none;
    without ``fetch`` a one-file checkpoint, which carries none) under ``trust``, against the
    MANIFEST.json bytes that were read and parsed (``manifest_raw``, ``body``): read once, so
    the bytes hashed are the bytes used. SignatureError naming the checkpoint and the reason."""

    def refuse(reason: str) -> SignatureError:
        return SignatureError(f"checkpoint {path} {reason}", path)

    if dir_fd is None:
        if fetch is None:
            raise refuse("is a one-file checkpoint, which cannot be signed")
        got = fetch()
        if got is None:
            raise refuse(f"is not signed (no {SIGNATURE})")
        raw = got
    else:
        raw = _read(dir_fd, refuse)
    try:
        stmt, sig = parse(raw)
    except ValueError as e:
        raise refuse(f"has a malformed {SIGNATURE} ({e})") from None
    key = trust.keys.get(stmt["key_id"])
    if key is None:
        raise refuse(f"is signed by key {stmt['key_id'][:16]}, which is not trusted")
    try:
        key.verify(sig, signed_message(stmt), path)
    except SignatureError:
        raise refuse(
            f"has a signature that does not verify under key {key.key_id[:16]}: it or the "
            "statement was changed"
        ) from None
    if stmt["manifest_sha256"] != hashlib.sha256(manifest_raw).hexdigest():
        raise refuse("has a signature of another MANIFEST.json: the manifest was changed")
    if (stmt["uuid"], stmt["checkpoint"]) != (body["uuid"], body["name"]):
        raise refuse("has a signature that names another checkpoint (uuid or name)")
    if os.path.basename(os.path.normpath(path)) != stmt["checkpoint"]:
        raise refuse(
            f"was signed as {stmt['checkpoint']!r}: another checkpoint put in this one's place "
            "(a copy or a rollback under another name)"
        )
    if DIGESTS not in body["features"]:
        raise refuse(
            f"has no chunk digests (feature {DIGESTS!r}): a signature would not cover its data"
        )
    return Signed(key.key_id, stmt["signed_at"], stmt["checkpoint"], stmt["uuid"])


def _read(dir_fd: int, refuse: Callable[[str], SignatureError]) -> bytes:
    """SIGNATURE.json of the directory open as ``dir_fd``: a regular file (no link, no FIFO)
    of at most MAX_SIGNATURE_BYTES; what cannot be read for I/O reasons raises the OSError."""
    try:
        return read_regular(SIGNATURE, dir_fd=dir_fd, max_size=MAX_SIGNATURE_BYTES)
    except FileNotFoundError:
        raise refuse(f"is not signed (no {SIGNATURE})") from None
    except UnsafeFileError as e:
        raise refuse(f"has a {SIGNATURE} that {e.reason}") from None


def parse(raw: bytes) -> tuple[dict, bytes]:
    """The statement and the signature in SIGNATURE.json bytes ``raw``, checked strictly
    (canonical JSON and a newline, exactly the members of format.md section 2.1, each of its
    form); ValueError saying what is wrong."""
    if not raw.endswith(b"\n"):
        raise ValueError("no final newline")
    doc = canon.decode(raw[:-1], MAX_SIGNATURE_BYTES)
    if sorted(doc) != ["sig", "statement"]:
        raise ValueError(f"members {sorted(doc)}, not ['sig', 'statement']")
    sig, stmt = doc["sig"], doc["statement"]
    if not isinstance(sig, str) or not _HEX128.fullmatch(sig):
        raise ValueError(f"sig is not {SIGNATURE_BYTES} bytes in lowercase hex")
    if not isinstance(stmt, dict) or sorted(stmt) != list(_STATEMENT):
        raise ValueError(f"the statement's members are not {list(_STATEMENT)}")
    if not all(isinstance(v, str) for v in stmt.values()):
        raise ValueError("a statement member is not a string")
    if stmt["type"] != STATEMENT_TYPE:
        raise ValueError(f"type {stmt['type'][:80]!r}, not {STATEMENT_TYPE!r}")
    for member, ok in (
        ("checkpoint", is_name(stmt["checkpoint"])),
        ("uuid", is_uuid(stmt["uuid"])),
        ("manifest_sha256", bool(_HEX64.fullmatch(stmt["manifest_sha256"]))),
        ("key_id", bool(_HEX64.fullmatch(stmt["key_id"]))),
        ("signed_at", bool(_TIME.fullmatch(stmt["signed_at"]))),
    ):
        if not ok:
            raise ValueError(f"the statement's {member} is malformed")
    return stmt, bytes.fromhex(sig)


def copy_signature(src_dir_fd: int, staging: str, manifest_raw: bytes) -> int:
    """Copy SIGNATURE.json (if the checkpoint open as ``src_dir_fd`` has one) into ``staging``
    byte for byte, fsynced (a drain: the signature travels with the manifest it signs); return
    the bytes copied. One that is not a well-formed signature of ``manifest_raw`` is refused
    (ValueError, or UnsafeFileError for a link, FIFO or oversized file)."""
    try:
        raw = read_regular(SIGNATURE, dir_fd=src_dir_fd, max_size=MAX_SIGNATURE_BYTES)
    except FileNotFoundError:
        return 0
    stmt, _ = parse(raw)
    if stmt["manifest_sha256"] != hashlib.sha256(manifest_raw).hexdigest():
        raise ValueError("it signs another MANIFEST.json")
    write_new_file(os.path.join(staging, SIGNATURE), raw)
    return len(raw)
