"""The agent's control protocol (version 1): JSON lines on a Unix stream socket; no pickle.

Every message is one JSON object on one line (UTF-8, ``\\n``-terminated, at most ``MAX_LINE``
bytes) with ``"v"`` (the protocol version) and ``"op"``. docs/agent.md lists the operations.
The exit codes of ``ckptguard run`` live here too: they are part of the same outside contract.
"""

from __future__ import annotations

import json
from typing import Any

VERSION = 1
ENV_ADDRESS = "CKPTGUARD_AGENT"  # the control socket's path, set in the trainer's environment
MAX_LINE = 64 << 20  # a "save" carries a snapshot's tree and tensor table

EXIT_CHECKPOINTED = 85  # a checkpoint request was answered by a commit on every rank: requeue
EXIT_NO_CHECKPOINT = 86  # a checkpoint request got no commit on every rank within the grace
EXIT_PEERS_LOST = 87  # another agent stopped answering: the trainer was stopped, the job aborted
EXIT_VALIDATION_FAILED = 88  # run --validate: a committed checkpoint failed its validation


class HandoffError(ValueError):
    """A handover message that cannot be saved as it is (bad pool, offsets or fields)."""


class ProtocolError(ValueError):
    """A line that is not a version-1 message."""


def encode(op: str, **fields: Any) -> bytes:
    """One message as a line of bytes."""
    line = json.dumps({"v": VERSION, "op": op, **fields}, separators=(",", ":"))
    data = line.encode() + b"\n"
    if len(data) > MAX_LINE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_LINE}")
    return data


def decode(line: bytes) -> dict[str, Any]:
    """A received line (without or with its newline) as a message dict, checked."""
    try:
        msg = json.loads(line.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"not a JSON line: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("a message is a JSON object with a string 'op'")
    if msg.get("v") != VERSION:
        raise ProtocolError(f"protocol version {msg.get('v')!r} is not supported (want {VERSION})")
    return msg


class LineReader:
    """Splits a byte stream into lines; refuses lines longer than ``MAX_LINE``."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        *lines, rest = self._buf.split(b"\n")
        if len(rest) > MAX_LINE:
            raise ProtocolError(f"line longer than {MAX_LINE} bytes")
        self._buf = bytearray(rest)
        return [bytes(x) for x in lines]
