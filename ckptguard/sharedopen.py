"""A checkpoint opened once for a whole job: rank 0 reads and checks, the other ranks are sent it.

When every rank of a job restarts from one checkpoint, each opening it alone reads its
MANIFEST.json and index.parquet (and resolves the store's LATEST) once per rank: at 10,000 ranks,
10,000 reads of the same metadata from the parallel file system at once, the storm its
administrators forbid, and ranks that may resolve LATEST to different checkpoints if it moves
meanwhile. A collective load (``load(..., collective=True)``) instead has rank 0 resolve the
path, read and check MANIFEST.json and broadcast its bytes over the job's coordinator. Where the
manifest's locator gives every tensor's grid (docs/format.md section 4.5, every save without a
linked file), that is all: each rank, rank 0 too, then reads the rows of just the data files
its boxes lie in, from their footers, checked against the manifest; at 10,000 ranks a rank
parses a few thousand rows instead of ten million, and nobody reads index.parquet. Otherwise
rank 0 also reads index.parquet, checks it whole (every rule of section 4) and broadcasts it,
and the other ranks check the bytes against the manifest's hashes and parse them, without
reading the file or repeating the rules. Every rank opens the same directory for the data files
it needs. Then all ranks say whether they opened it,
so the open succeeds on every rank or fails on every rank.

A one-file checkpoint is opened by each rank itself (it is a single file, read by offsets).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import Any, TypeVar

from . import errors, measure
from .coord import Coordinator
from .coord import auto as coord_auto
from .errors import CheckpointAbortedError, CheckpointError, OptionsMismatchError
from .onefile import is_file_object
from .open import CheckpointReader, Shared
from .sign import TrustSet

__all__ = ["job_coordinator", "load_for_job", "open_for_job"]

T = TypeVar("T")

_PIECE = 1 << 30
"""Bytes per broadcast: the collectives' counts are 32-bit on some MPI libraries."""
_HEAD = struct.Struct("<Q")


def job_coordinator(
    collective: bool, coordinator: Coordinator | str | None, timeout: float, path: object
) -> Coordinator | None:
    """The job's coordinator of a collective load of ``path`` (None: each rank opens alone:
    not ``collective``, or a job of one process)."""
    if not collective:
        return None
    if is_file_object(path):
        raise ValueError("collective=True loads a path (a checkpoint or store), not a file")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, not {timeout!r}")
    coord = coord_auto(coordinator, timeout)
    return coord if coord.size > 1 else None


def load_for_job(
    coord: Coordinator,
    where: str,
    locate: Callable[[], str],
    read: Callable[[Any], T],
    how: tuple[TrustSet | None, float, bool],
) -> T:
    """``read`` of the checkpoint ``open_for_job`` opens (``how``: its trust, the collectives'
    timeout, whether the load verifies); its load event by rank 0 alone."""
    trust, timeout, verified = how

    def run(opening: Callable[[str], None]) -> T:
        def located() -> str:
            p = locate()
            opening(p)
            return p

        return read(open_for_job(coord, where, located, trust, timeout))

    return measure.timed_load(run, coord.rank == 0, verified)


def open_for_job(
    coord: Coordinator,
    where: str,
    locate: Callable[[], str],
    trust: TrustSet | None,
    timeout: float,
) -> CheckpointReader:
    """The checkpoint ``locate()`` names on rank 0, open on this rank; every rank of ``coord``
    must call it (``where``: what this rank asked for, compared across ranks). Rank 0's error
    is raised on every rank (its type where it can be rebuilt); a rank that fails to open what
    rank 0 read makes every rank raise CheckpointAbortedError naming it."""
    if coord.rank == 0:
        rd, head, body = _lead(locate, trust)
        _send(coord, head, body, timeout)
    else:
        head, body = _receive(coord, timeout)
        rd = _follow(head, body)
    return _agree(coord, where, rd, timeout)


def _lead(
    locate: Callable[[], str], trust: TrustSet | None
) -> tuple[CheckpointReader | BaseException, dict, list[bytes]]:
    """Rank 0: open and check; the message for the others (or the error they are to raise)."""
    try:
        path = locate()
        rd = CheckpointReader(path, trust, keep_bytes=True, located=True)
    except BaseException as e:  # every rank is to raise it, not wait for bytes
        return e, _failure(e), []
    if rd.one is not None or (rd.index_raw is None and not rd.located):
        return rd, {"ok": True, "path": rd.path, "each": True}, []
    body = [rd.manifest_raw] if rd.located else [rd.manifest_raw, rd.index_raw or b""]
    rd.index_raw = None
    ino = os.fstat(rd.dir_fd).st_ino
    head = {"ok": True, "path": rd.path, "ino": ino, "sizes": [len(b) for b in body]}
    return rd, {**head, "located": rd.located}, body


def _failure(e: BaseException) -> dict:
    return {
        "ok": False,
        "type": type(e).__name__,
        "message": str(e),
        "path": getattr(e, "path", "") or "",
    }


def _send(coord: Coordinator, head: dict, body: list[bytes], timeout: float) -> None:
    text = json.dumps(head).encode()
    first = _HEAD.pack(len(text)) + text
    data = b"".join(body)
    coord.broadcast(first + data[: _PIECE - len(first)], timeout)
    for at in range(_PIECE - len(first), len(data), _PIECE):
        coord.broadcast(data[at : at + _PIECE], timeout)


def _receive(coord: Coordinator, timeout: float) -> tuple[dict, list[bytes]]:
    first = coord.broadcast(None, timeout)
    (n,) = _HEAD.unpack_from(first)
    head = json.loads(first[_HEAD.size : _HEAD.size + n])
    parts = [first[_HEAD.size + n :]]
    total = sum(head.get("sizes", []))
    got = len(parts[0])
    while got < total:
        parts.append(coord.broadcast(None, timeout))
        got += len(parts[-1])
    data = b"".join(parts)
    body, at = [], 0
    for size in head.get("sizes", []):
        body.append(data[at : at + size])
        at += size
    return head, body


def _follow(head: dict, body: list[bytes]) -> CheckpointReader | BaseException:
    """Another rank: open the directory rank 0 read, with the bytes it sent."""
    if not head["ok"]:
        return _rebuilt(head)
    try:
        if head.get("each"):
            return CheckpointReader(head["path"])
        located = bool(head.get("located"))
        index_raw = b"" if located else body[1]
        shared = Shared(body[0], index_raw, head["ino"], located)
        return CheckpointReader(head["path"], shared=shared)
    except BaseException as e:
        return e


def _rebuilt(head: dict) -> BaseException:
    """Rank 0's error, as its own type where that takes a message alone (CheckpointAbortedError
    saying what it was otherwise)."""
    cls = getattr(errors, head["type"], None)
    msg = f"{head['message']} (on rank 0)"
    if isinstance(cls, type) and issubclass(cls, CheckpointError):
        try:
            e = cls(msg)
        except TypeError:
            pass
        else:
            if head["path"] and hasattr(e, "path"):
                e.path = head["path"]
            return e
    return CheckpointAbortedError(
        f"rank 0 could not open the checkpoint: {head['type']}: {head['message']}", rank=0
    )


def _agree(
    coord: Coordinator, where: str, rd: CheckpointReader | BaseException, timeout: float
) -> CheckpointReader:
    """Every rank opened the checkpoint, and all asked for the same path; else all raise."""
    mine = {"where": where, "error": None if isinstance(rd, CheckpointReader) else repr(rd)}
    try:
        got = coord.gather(json.dumps(mine).encode(), timeout)
        verdict = b""
        if got is not None:
            verdict = _verdict([json.loads(g) for g in got])
        verdict = coord.broadcast(verdict, timeout)
    except BaseException:
        if isinstance(rd, CheckpointReader):
            rd.close()
        raise
    if not isinstance(rd, CheckpointReader):
        raise rd
    if verdict:
        rd.close()
        problem = json.loads(verdict)
        if problem["kind"] == "where":
            raise OptionsMismatchError(problem["message"], option="path")
        raise CheckpointAbortedError(problem["message"], rank=problem["rank"])
    return rd


def _verdict(reports: list[dict]) -> bytes:
    """Rank 0: the first problem among the ranks' reports (b"" if none)."""
    differ = [r for r, x in enumerate(reports) if x["where"] != reports[0]["where"]]
    if differ:
        x = reports[differ[0]]
        return json.dumps(
            {
                "kind": "where",
                "message": f"a collective load needs the same path on every rank: rank 0 asked "
                f"for {reports[0]['where']!r}, rank {differ[0]} for {x['where']!r} "
                f"({len(differ)} rank(s) differ)",
            }
        ).encode()
    failed = [r for r, x in enumerate(reports) if x["error"] is not None and r != 0]
    if reports[0]["error"] is None and failed:
        r = failed[0]
        return json.dumps(
            {
                "kind": "rank",
                "rank": r,
                "message": f"rank {r} could not open the checkpoint rank 0 read: "
                f"{reports[r]['error']} ({len(failed)} rank(s) failed)",
            }
        ).encode()
    return b""
