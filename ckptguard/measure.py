"""The figures of one save or load, for its event in the store (``events``): when it started,
what only its caller knows (an async save's stall), what the load opened and reads; and the
``save``, ``save_failed`` and ``load`` events written from them (docs/operations.md)."""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import (
    CheckpointAbortedError,
    CheckpointError,
    CheckpointReplacedError,
    CorruptCheckpointError,
    FormatVersionError,
    HostPoolPrepareError,
    KeyUnavailableError,
    OutOfMemoryError,
    SignatureError,
    StoreError,
)
from .events import note, record
from .format.layout import is_name, is_uuid
from .format.manifest import CheckpointInfo
from .fsutil import read_manifest

T = TypeVar("T")


@dataclass
class Clock:
    """The timing of one save or load, kept in a context variable for the code that records its
    event: who started it (``mode``), when (monotonic), and what only its caller knows."""

    mode: str = "sync"
    started: float = field(default_factory=time.monotonic)
    stall_s: float | None = None
    """A save: how long its caller was blocked; None: the whole save (a sync save), or unknown."""
    opened: float | None = None
    """A load: when the checkpoint was open and checked, before its first tensor's bytes."""
    bytes_read: int | None = None
    """A load: the raw bytes of the chunks it reads."""
    path: str | None = None
    """A load: the checkpoint it opened (its uuid and step below)."""
    uuid: str | None = None
    step: int | None = None

    def elapsed(self) -> float:
        return max(0.0, time.monotonic() - self.started)


_clock: contextvars.ContextVar[Clock | None] = contextvars.ContextVar(
    "ckptguard_clock", default=None
)


@contextlib.contextmanager
def clocked(clock: Clock) -> Iterator[Clock]:
    """Run a save or load under ``clock`` (its event then says ``clock.mode`` and its times)."""
    token = _clock.set(clock)
    try:
        yield clock
    finally:
        _clock.reset(token)


_quiet: contextvars.ContextVar[bool] = contextvars.ContextVar("ckptguard_unrecorded", default=False)


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """Loads and verifies under this record no event: a drill's load is the drill's event, not
    a resume's (it would count as one in the recovery times)."""
    token = _quiet.set(True)
    try:
        yield
    finally:
        _quiet.reset(token)


def clock() -> Clock | None:
    """The clock of the save or load this code runs under, if any."""
    return _clock.get()


_pending: list[tuple[str, str, dict[str, Any]]] = []
_pending_lock = threading.Lock()
_MAX_PENDING = 10_000  # a process that loads in a loop and never saves: the oldest are kept


def _defer(store: str, kind: str, **kw: Any) -> None:
    """Keep a read's event (``load``, ``verify``) for ``flush``: a read opens nothing outside
    the checkpoint it reads (I6), so its event is written later, stamped with its own time."""
    kw.setdefault("at", time.time())
    with _pending_lock:
        if not _pending:
            atexit.register(flush)
        if len(_pending) < _MAX_PENDING:
            _pending.append((store, kind, kw))


def flush() -> None:
    """Write the reads' events kept so far (best effort, silent). Called by the next save of the
    process, by ``training_step`` and at exit."""
    with _pending_lock:
        items = list(_pending)
        _pending.clear()
        atexit.unregister(flush)
    for store, kind, kw in items:
        record(store, kind, **kw)


def timed_load(run: Callable[[Callable[[str], None]], T], noted: bool, verified: bool) -> T:
    """``run(opening)`` under a load's clock, where ``run`` calls ``opening(path)`` with the
    checkpoint it is about to open; its ``load`` event kept only if ``noted`` (rank 0 of the
    job: not every rank of a restart)."""
    clock = Clock("load")

    def opening(p: str) -> None:
        if os.path.isdir(p):  # a store's checkpoint: named in its event even if it won't open
            clock.path = p

    try:
        with clocked(clock):
            out = run(opening)
    except BaseException as e:
        if noted:
            record_load(clock, 0, verified, e)
        raise
    if noted:
        record_load(clock, 0, verified, None)
    return out


def load_opened(path: str, uuid: str, step: int | None, bytes_read: int) -> None:
    """The load under way has opened checkpoint ``path`` and will read ``bytes_read`` raw bytes."""
    c = _clock.get()
    if c is not None:
        c.opened, c.bytes_read = time.monotonic(), bytes_read
        c.path, c.uuid, c.step = path, uuid, step


def record_load(c: Clock, rank: int, verified: bool, error: BaseException | None) -> None:
    """The ``load`` event of a load of a checkpoint in a store (one-file checkpoints record
    nothing), kept for ``flush``. Best effort and silent: loads often read stores they cannot
    write (a read-only mount of drained checkpoints), and a restart must not warn about its
    metrics."""
    if c.path is None or _quiet.get() or (error is not None and not operational(error)):
        return
    store, name = os.path.split(os.path.normpath(c.path))
    if not is_name(name):
        return
    failed = {"error": type(error).__name__} if error is not None else {}
    _defer(
        store,
        "load",
        checkpoint=name,
        uuid=c.uuid if c.uuid and is_uuid(c.uuid) else None,
        rank=rank,
        step=c.step,
        result="ok" if error is None else "failed",
        open_s=None if c.opened is None else max(0.0, c.opened - c.started),
        total_s=c.elapsed(),
        bytes_read=c.bytes_read,
        verified=verified,
        **failed,
    )


def record_save(store: str, info: CheckpointInfo, c: Clock, **extra: Any) -> str | None:
    """The ``save`` event of a committed save (by its committer, rank 0), after the events of
    the reads before it (``flush``)."""
    flush()
    durable = c.elapsed()
    stats: dict[str, Any] = dict(info.write_stats or {})
    return note(
        store,
        "save",
        checkpoint=info.name,
        uuid=info.uuid,
        rank=0,
        step=info.step,
        world_size=info.world_size,
        stall_s=durable if c.mode == "sync" else c.stall_s,
        durable_s=durable,
        raw_bytes=info.raw_bytes,
        stored_bytes=info.stored_bytes,
        files=info.files,
        mode=c.mode,
        codec=stats.get("codec"),
        io=stats.get("io"),
        encode_s=stats.get("encode_s"),
        write_s=stats.get("write_s"),
        incremental=info.base is not None,
        warnings=len(info.warnings),
        **extra,
    )


_OPERATIONAL = (
    OSError,
    StoreError,
    CorruptCheckpointError,
    FormatVersionError,
    CheckpointAbortedError,
    CheckpointReplacedError,
    OutOfMemoryError,
    KeyUnavailableError,
    SignatureError,
    HostPoolPrepareError,
)
_CALLERS = (ValueError, TypeError, FileExistsError, FileNotFoundError)


def operational(error: BaseException) -> bool:
    """Whether ``error`` is a failure of the system (storage, a rank, a timeout, memory, keys,
    damaged bytes) that an operator's metrics count, not the caller's bad input (an existing
    name, an option, an object that cannot be saved, a missing checkpoint): bad input changes
    nothing, its event included."""
    return isinstance(error, _OPERATIONAL) and not isinstance(error, _CALLERS)


def record_save_failure(store: str, name: str, error: BaseException, c: Clock) -> None:
    """The ``save_failed`` event of a save that failed (``operational``), in a store that exists
    (a save into a path that is not a store leaves nothing behind, not even an event)."""
    if operational(error) and os.path.isdir(store):
        record(
            store,
            "save_failed",
            checkpoint=name if is_name(name) else None,
            rank=0,
            error=type(error).__name__,
            message=str(error),
            elapsed_s=c.elapsed(),
            mode=c.mode,
        )


def record_verify(path: str, c: Clock, report: Any, error: BaseException | None) -> None:
    """The ``verify`` event of a verify of a store's checkpoint (``report``: its VerifyReport,
    None when it raised ``error``), kept for ``flush`` as a load's."""
    store, name = os.path.split(os.path.normpath(path))
    if not is_name(name) or not os.path.isdir(path) or _quiet.get():
        return
    problems = len(report.problems) if report is not None else 1
    failed = {"error": type(error).__name__} if error is not None else {}
    try:  # the uuid names which checkpoint of that name was verified
        uid = read_manifest(path)[1]["uuid"]
    except (OSError, CheckpointError, KeyError, TypeError):
        uid = None
    if report is not None:
        failed["bytes"] = report.bytes_checked
    _defer(
        store,
        "verify",
        checkpoint=name,
        uuid=uid if isinstance(uid, str) and is_uuid(uid) else None,
        result="ok" if report is not None and report.ok else "failed",
        seconds=c.elapsed(),
        problems=problems,
        **failed,
    )


__all__ = [
    "Clock",
    "clock",
    "clocked",
    "flush",
    "load_opened",
    "operational",
    "record_load",
    "record_save",
    "record_save_failure",
    "record_verify",
    "unrecorded",
]
