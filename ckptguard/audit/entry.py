"""What one audit entry and one tree head hold, built and checked (docs/audit.md sections 3-4).

An entry says who (``actor``: user, host, pid, Slurm job and step, rank) did what (``op``) to
which checkpoint (name, uuid, SHA-256 of its MANIFEST.json bytes) when (UTC, to the
microsecond). A tree head says how many entries the log had and the Merkle root over them, when,
and under which key it was signed. Both are canonical JSON (``canon``); the check of each treats
it as untrusted input.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import re
import socket
from typing import Any

from . import canon

VERSION = 1
MAX_ENTRY_BYTES = 64 * 1024  # one line of the log, newline excluded
MAX_HEAD_BYTES = 4096
HEAD_DOMAIN = b"ckptguard-audit-tree-head-v1\n"  # prefixes the signed bytes of a head

# Each op, and whether its entry must name a checkpoint.
OPS = {
    "init": False,  # the log was created (key id and witness in detail): a key event
    "commit": True,  # a checkpoint became visible: a save, or a drain into this store
    "delete": True,  # a checkpoint was removed (Store.delete, `ckptguard delete`)
    "prune": True,  # removed by a retention rule (a framework's save_total_limit)
    "gc": False,  # staging leftovers removed (detail: removed, count)
    "verify": True,  # a checkpoint was verified (detail: result ok/failed, problems)
    "restore": True,  # a checkpoint was read out whole (`ckptguard restore`)
    "load": True,  # a checkpoint was loaded (when asked for: reads are not recorded by default)
    "drain": True,  # a checkpoint of this store was drained into another (detail: dest)
    "hold": True,  # a legal hold was placed on a checkpoint (detail: reason, immutable)
    "release": True,  # a legal hold was released
    "shred": False,  # an encryption scope's data key was destroyed (detail: scope, key_id)
    "rotate": False,  # the keyring's keys were re-wrapped under a new KEK (detail: kek ids)
    "recover": False,  # entries found unsealed or a torn line, sealed by the next append
}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
_ACTOR = {"user", "uid", "host", "pid", "rank", "slurm_job_id", "slurm_step_id"}
_ENTRY = {"v", "seq", "op", "time", "actor", "checkpoint", "uuid", "manifest_sha256", "detail"}
_HEAD = {"v", "log_id", "size", "root", "time", "key_id", "sig"}
_RANK_VARS = ("SLURM_PROCID", "RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


class SchemaError(ValueError):
    """An entry or head with a member missing, unknown or of the wrong type."""


def utc_now() -> str:
    """The time as entries and heads spell it: ``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _env_int(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n, "")
        if v.isdigit():
            return int(v)
    return None


def actor(rank: int | None = None) -> dict:
    """Who is acting: this process's user, host, pid, Slurm job and step, and rank (``rank``,
    else the launcher's rank variable, else null)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (a container)
        user = ""
    return {
        "user": user[:256],
        "uid": os.getuid(),
        "host": socket.gethostname()[:256],
        "pid": os.getpid(),
        "rank": rank if rank is not None else _env_int(*_RANK_VARS),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")[:64] or None,
        "slurm_step_id": os.environ.get("SLURM_STEP_ID", "")[:64] or None,
    }


def build(
    seq: int,
    op: str,
    *,
    checkpoint: str | None = None,
    uuid: str | None = None,
    manifest_sha256: str | None = None,
    detail: dict | None = None,
    rank: int | None = None,
) -> bytes:
    """The canonical bytes of entry number ``seq`` (checked as a reader would check them)."""
    obj = {
        "v": VERSION,
        "seq": seq,
        "op": op,
        "time": utc_now(),
        "actor": actor(rank),
        "checkpoint": checkpoint,
        "uuid": uuid,
        "manifest_sha256": manifest_sha256,
        "detail": detail or {},
    }
    raw = canon.encode(obj)
    check_entry(obj, seq)
    if len(raw) > MAX_ENTRY_BYTES:
        raise SchemaError(f"the entry has {len(raw)} bytes, more than {MAX_ENTRY_BYTES}")
    return raw


def _opt(obj: dict, key: str, kind: type | tuple, pattern: re.Pattern | None = None) -> None:
    v = obj[key]
    if v is None:
        return
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise SchemaError(f"{key} is a {type(v).__name__}")
    if pattern is not None and not pattern.match(v):
        raise SchemaError(f"{key} is not of the required form")


def _members(obj: dict, want: set[str], what: str) -> None:
    if set(obj) != want:
        missing, extra = sorted(want - set(obj)), sorted(set(obj) - want)
        raise SchemaError(f"{what} members differ (missing {missing}, unknown {extra})")


def check_entry(obj: dict, seq: int) -> None:
    """SchemaError unless ``obj`` is a well-formed entry whose ``seq`` is ``seq``."""
    _members(obj, _ENTRY, "entry")
    if obj["v"] != VERSION:
        raise SchemaError(f"entry version {obj['v']!r}, this reader knows {VERSION}")
    if type(obj["seq"]) is not int or obj["seq"] != seq:
        raise SchemaError(
            f"entry has seq {obj['seq']!r} where {seq} belongs: an entry before it was removed "
            "or inserted, or the entries were reordered"
        )
    if obj["op"] not in OPS:
        raise SchemaError(f"unknown op {obj['op']!r}")
    if not isinstance(obj["time"], str) or not _TIME.match(obj["time"]):
        raise SchemaError("time is not a UTC time of the required form")
    _opt(obj, "checkpoint", str)
    _opt(obj, "uuid", str, _HEX32)
    _opt(obj, "manifest_sha256", str, _HEX64)
    if OPS[obj["op"]] and obj["checkpoint"] is None:
        raise SchemaError(f"a {obj['op']} entry names no checkpoint")
    if not isinstance(obj["detail"], dict):
        raise SchemaError("detail is not an object")
    a = obj["actor"]
    if not isinstance(a, dict):
        raise SchemaError("actor is not an object")
    _members(a, _ACTOR, "actor")
    for k in ("uid", "pid", "rank"):
        _opt(a, k, int)
    for k in ("user", "host", "slurm_job_id", "slurm_step_id"):
        _opt(a, k, str)


def head_body(log_id: str, size: int, root: bytes, key_id: str | None) -> dict:
    """A tree head without its signature."""
    return {
        "v": VERSION,
        "log_id": log_id,
        "size": size,
        "root": root.hex(),
        "time": utc_now(),
        "key_id": key_id,
        "sig": None,
    }


def signed_bytes(head: dict) -> bytes:
    """What a head's signature covers: HEAD_DOMAIN, then the head's canonical JSON with
    ``sig`` null."""
    return HEAD_DOMAIN + canon.encode({**head, "sig": None})


def check_head(obj: dict) -> None:
    """SchemaError unless ``obj`` is a well-formed tree head (its signature unchecked)."""
    _members(obj, _HEAD, "tree head")
    if obj["v"] != VERSION:
        raise SchemaError(f"tree head version {obj['v']!r}, this reader knows {VERSION}")
    if not isinstance(obj["log_id"], str) or not _HEX32.match(obj["log_id"]):
        raise SchemaError("log_id is not 32 hex digits")
    if type(obj["size"]) is not int or obj["size"] < 0:
        raise SchemaError("size is not a count")
    if not isinstance(obj["root"], str) or not _HEX64.match(obj["root"]):
        raise SchemaError("root is not 64 hex digits")
    if not isinstance(obj["time"], str) or not _TIME.match(obj["time"]):
        raise SchemaError("time is not a UTC time of the required form")
    _opt(obj, "key_id", str, _HEX64)
    _opt(obj, "sig", str, re.compile(r"^[0-9a-f]{128}$"))
    if (obj["key_id"] is None) != (obj["sig"] is None):
        raise SchemaError("a tree head has a key id without a signature, or the reverse")


def parse_head(raw: bytes) -> dict[str, Any]:
    """The checked tree head that ``raw`` (one line, no newline) encodes; CanonicalError or
    SchemaError."""
    obj = canon.decode(raw, MAX_HEAD_BYTES)
    check_head(obj)
    return obj
