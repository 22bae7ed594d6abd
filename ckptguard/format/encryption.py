"""The manifest's ``encryption`` member and scope names (docs/format.md section 4.4)."""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

from .datafile import FormatError
from .layout import is_key_id

ENCRYPTION = "encryption"
"""Feature: sealed chunks, whose rows have a ``key_id`` (format.md 4.4)."""
AEAD = "aes-256-gcm"
MAX_SCOPE_CHARS = 256
TAG_BYTES = 16
"""The AES-GCM tag after a sealed record's ciphertext."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def is_scope(scope: Any) -> bool:
    """An encryption scope's name: 1..256 Unicode scalar values (no surrogates), no control
    characters, not only white space."""
    return (
        isinstance(scope, str)
        and 0 < len(scope) <= MAX_SCOPE_CHARS
        and not _CONTROL.search(scope)
        and not _SURROGATE.search(scope)
        and bool(scope.strip())
    )


def encryption_member(scopes: dict[str, str]) -> dict:
    """The member for data keys ``{key_id: scope}``: the keys sorted by key_id."""
    return {"aead": AEAD, "keys": [{"key_id": k, "scope": scopes[k]} for k in sorted(scopes)]}


def check_encryption(member: Any) -> None:
    """Check ``manifest.encryption``: exactly ``aead`` and ``keys``, the AEAD named, at least
    one key, each exactly ``key_id`` and ``scope``, valid, sorted by key_id, none twice."""
    if not isinstance(member, dict) or set(member) != {"aead", "keys"}:
        raise FormatError("manifest.encryption must have exactly the members aead and keys")
    if member["aead"] != AEAD or not isinstance(member["keys"], list) or not member["keys"]:
        raise FormatError(f"manifest.encryption: aead must be {AEAD!r}, keys a non-empty list")
    ids, scopes = [], set()
    for k in member["keys"]:
        if not isinstance(k, dict) or set(k) != {"key_id", "scope"}:
            raise FormatError("manifest.encryption.keys[] must have exactly key_id and scope")
        if not is_key_id(k["key_id"]) or not is_scope(k["scope"]):
            raise FormatError("manifest.encryption.keys has an invalid key_id or scope")
        ids.append(k["key_id"])
        scopes.add(k["scope"])
    if ids != sorted(set(ids)) or len(scopes) != len(ids):
        raise FormatError("manifest.encryption.keys is unsorted or repeats a key_id or scope")


def has_key_id(table: pa.Table) -> bool:
    """Whether some row of an index table has a ``key_id``: a sealed chunk."""
    return table.column("key_id").null_count < table.num_rows


def key_scopes(doc: dict) -> dict[str, str]:
    """The scope of each data key a checkpoint's manifest lists, ``{key_id: scope}``."""
    member = doc.get("encryption") or {"keys": []}
    return {k["key_id"]: k["scope"] for k in member["keys"]}
