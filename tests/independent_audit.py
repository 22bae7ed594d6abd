"""An audit log verifier written from docs/audit.md alone: no ckptguard import. hashlib for
SHA-256, the ``cryptography`` package for Ed25519, json for parsing. tests/test_independent_audit.py
runs it against logs the package writes, whole and tampered.

``verify(store, public_key_raw=None, witness_heads=())`` returns (size, root hex) or raises
``Invalid`` with the reason."""

from __future__ import annotations

import hashlib
import json
import os
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

DOMAIN = b"ckptguard-audit-tree-head-v1\n"
OPS = {
    "init": False,
    "commit": True,
    "delete": True,
    "prune": True,
    "gc": False,
    "verify": True,
    "restore": True,
    "load": True,
    "drain": True,
    "hold": True,
    "release": True,
    "shred": False,
    "rotate": False,
    "recover": False,
}
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


class Invalid(Exception):
    pass


def canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def parse(raw: bytes, cap: int) -> dict:
    if len(raw) > cap:
        raise Invalid("line too long")

    def pairs(ps: list) -> dict:
        keys = [k for k, _ in ps]
        if len(set(keys)) != len(keys):
            raise Invalid("duplicate key")
        return dict(ps)

    def bad(x: str) -> None:
        raise Invalid(f"not allowed: {x}")

    try:
        obj = json.loads(
            raw.decode("ascii"), object_pairs_hook=pairs, parse_float=bad, parse_constant=bad
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise Invalid(f"not canonical JSON: {e}") from None
    if not isinstance(obj, dict) or canonical(obj) != raw:
        raise Invalid("not canonical")
    return obj


def mth(leaves: list[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def lines(path: str) -> list[bytes]:
    if os.path.islink(path):
        raise Invalid(f"{path} is a link")
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        raise Invalid(f"{path}: torn last line")
    return data.split(b"\n")[:-1] if data else []


def check_sig(head: dict, key: bytes | None) -> None:
    if key is None:
        if head["sig"] is not None:
            raise Invalid("signed head in an unsigned log")
        return
    if head["key_id"] != hashlib.sha256(key).hexdigest() or head["sig"] is None:
        raise Invalid(f"head of size {head['size']} not signed by the key")
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(
            bytes.fromhex(head["sig"]), DOMAIN + canonical({**head, "sig": None})
        )
    except InvalidSignature:
        raise Invalid(f"head of size {head['size']}: bad signature") from None


def verify(
    store: str, public_key_raw: bytes | None = None, witness_heads: tuple[dict, ...] = ()
) -> tuple[int, str]:
    d = os.path.join(store, ".audit")
    with open(os.path.join(d, "config.json"), "rb") as f:
        cfg = parse(f.read().rstrip(b"\n"), 65536)
    key = public_key_raw
    if key is None and cfg["public_key"] is not None:
        key = bytes.fromhex(cfg["public_key"])
    if key is not None and hashlib.sha256(key).hexdigest() != cfg["key_id"]:
        raise Invalid("config names another key")
    leaves = []
    for i, raw in enumerate(lines(os.path.join(d, "log.jsonl"))):
        e = parse(raw, 65536)
        members = {
            "v",
            "seq",
            "op",
            "time",
            "actor",
            "checkpoint",
            "uuid",
            "manifest_sha256",
            "detail",
        }
        if set(e) != members or e["v"] != 1 or e["seq"] != i or e["op"] not in OPS:
            raise Invalid(f"entry {i} malformed or out of place")
        if not TIME.match(e["time"]) or (OPS[e["op"]] and e["checkpoint"] is None):
            raise Invalid(f"entry {i} malformed")
        leaves.append(hashlib.sha256(b"\x00" + raw).digest())
    prev = 0
    for raw in lines(os.path.join(d, "heads.jsonl")):
        h = parse(raw, 4096)
        if h["log_id"] != cfg["log_id"] or h["v"] != 1:
            raise Invalid("head of another log")
        check_sig(h, key)
        if not prev <= h["size"] <= len(leaves):
            raise Invalid(f"head of size {h['size']} out of order or beyond the log")
        if mth(leaves[: h["size"]]).hex() != h["root"]:
            raise Invalid(f"entries {prev}..{h['size'] - 1} do not match their head")
        prev = h["size"]
    if prev != len(leaves):
        raise Invalid(f"entries from {prev} are unsealed")
    for h in witness_heads:
        check_sig(h, key)
        if h["log_id"] != cfg["log_id"] or h["size"] > len(leaves):
            raise Invalid("rolled back: the witness saw a longer log")
        if mth(leaves[: h["size"]]).hex() != h["root"]:
            raise Invalid("rewritten: the witness saw another log")
    return len(leaves), mth(leaves).hex()
