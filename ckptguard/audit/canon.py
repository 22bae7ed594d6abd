"""Canonical JSON (the bytes that are hashed and signed) and its strict, bounded parser.

Canonical: keys sorted, no whitespace, ASCII only (every other character as ``\\uXXXX``), no
floats; so one value has one encoding and a verifier can re-encode what it parsed and compare
bytes (docs/audit.md section 2). The parser treats its input as hostile: a size cap, no
duplicate keys, no NaN or Infinity, no floats, and the input must be canonical.
"""

from __future__ import annotations

import json
from typing import Any


class CanonicalError(ValueError):
    """Bytes that are not one canonical JSON object within the caps; ``reason`` says how."""


def encode(obj: dict) -> bytes:
    """The canonical bytes of ``obj`` (no trailing newline)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise CanonicalError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_float(text: str) -> Any:
    raise CanonicalError(f"a float ({text[:20]}) where only integers are allowed")


def _no_constant(text: str) -> Any:
    raise CanonicalError(f"{text} is not JSON")


def decode(raw: bytes, max_bytes: int) -> dict:
    """The object that the canonical bytes ``raw`` encode; CanonicalError for anything else
    (too long, not UTF-8/ASCII, not JSON, not an object, a float, a duplicate key, or a
    spelling other than the canonical one)."""
    if len(raw) > max_bytes:
        raise CanonicalError(f"{len(raw)} bytes, more than the {max_bytes} allowed")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise CanonicalError("not ASCII (canonical JSON escapes every other character)") from None
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_float=_no_float,
            parse_constant=_no_constant,
        )
    except RecursionError:
        raise CanonicalError("nested too deeply") from None
    except json.JSONDecodeError as e:
        raise CanonicalError(f"not JSON ({e.msg} at byte {e.pos})") from None
    if not isinstance(obj, dict):
        raise CanonicalError("not a JSON object")
    if encode(obj) != raw:
        raise CanonicalError("not in canonical form (sorted keys, no spaces, ASCII)")
    return obj
