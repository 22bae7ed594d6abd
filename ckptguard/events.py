"""A store's events: what each save, load, verify, drill, validation and agent did, and when.

The measurements behind the operations metrics (docs/operations.md, "Events and metrics"): one
JSON object per line in ``<store>/.events/events.jsonl`` (format.md section 1), appended by
whichever process did the work, without a lock: each line is one ``write`` of at most
``MAX_LINE`` bytes to a file opened ``O_APPEND``, so concurrent writers never interleave on a
local or parallel file system, and a line torn by a crash is skipped by readers. The file is
rotated to ``events.1.jsonl`` past ``ROTATE_AT`` bytes, so a store keeps at most two.

Events are figures, not evidence: the audit log (docs/audit.md) is the tamper-evident record of
what changed a store; this file is what the metrics are computed from, written also for reads,
which the audit log leaves out (thousands of ranks must not take its lock on a restart).
Writing an event never fails the operation it describes: ``record`` returns what went wrong.
Reading treats the file as hostile: no links, bounded size, every member type-checked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any

from .errors import warn_after_commit
from .format.layout import is_name, is_uuid
from .fsutil import UnsafeFileError, check_regular, group_shared, open_regular
from .io import pread_exact

EVENTS_DIR = ".events"
CURRENT = "events.jsonl"
PREVIOUS = "events.1.jsonl"
MAX_LINE = 4096  # one write: never interleaved with another process's line
ROTATE_AT = 32 << 20
READ_CAP = 2 * ROTATE_AT
ENV = "CKPTGUARD_EVENTS"  # "0": record nothing
VERSION = 1
_TEXT_CAP = 512  # a message longer than this is cut, so the line stays under MAX_LINE

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))
_BOOL = (bool,)
_DICT = (dict,)

# Each kind's members beyond the common ones, with the types a reader accepts. A member a
# reader does not know is kept, unchecked; a kind it does not know is kept as it is.
KINDS: dict[str, dict[str, tuple[type, ...]]] = {
    "save": {
        "step": _OPT_INT,
        "world_size": (int,),
        "stall_s": _OPT_NUM,
        "durable_s": _NUM,
        "raw_bytes": (int,),
        "stored_bytes": (int,),
        "files": (int,),
        "mode": (str,),
    },
    "save_failed": {"error": (str,), "message": (str,), "elapsed_s": _NUM, "mode": (str,)},
    "load": {
        "step": _OPT_INT,
        "result": (str,),
        "open_s": _OPT_NUM,
        "total_s": _NUM,
        "bytes_read": _OPT_INT,
        "verified": _BOOL,
    },
    "verify": {"result": (str,), "seconds": _NUM, "problems": (int,)},
    "drill": {"result": (str,), "seconds": _NUM},
    "validation": {"result": (str,), "seconds": _NUM},
    "start": {"world_size": (int,)},
    "preempt": {"reason": (str,)},
    "exit": {"outcome": (str,), "status": (int,)},
    "first_step": {"step": _OPT_INT},
}
_COMMON: dict[str, tuple[type, ...]] = {
    "v": (int,),
    "kind": (str,),
    "time": _NUM,
    "host": (str,),
    "pid": (int,),
    "rank": _OPT_INT,
    "job": _OPT_STR,
    "restart": _OPT_INT,
    "checkpoint": _OPT_STR,
    "uuid": _OPT_STR,
}

_lock = threading.Lock()
_warned: set[tuple[str, str]] = set()


def enabled() -> bool:
    """False where ``CKPTGUARD_EVENTS=0`` turns recording off (reading still works)."""
    return os.environ.get(ENV, "1").strip() != "0"


def job_facts(env: dict[str, str] | os._Environ[str] | None = None) -> dict[str, Any]:
    """This process's job: Slurm's job id and its restart count (after a requeue), else None."""
    e = os.environ if env is None else env
    restart = e.get("SLURM_RESTART_COUNT", "")
    return {
        "job": e.get("SLURM_JOB_ID") or None,
        "restart": int(restart) if restart.isdigit() else None,
    }


def env_rank(env: dict[str, str] | os._Environ[str] | None = None) -> int:
    """This process's rank as its launcher set it (torchrun, Slurm, Open MPI, MPICH), else 0:
    who records a job's reads when no collective says who rank 0 is."""
    e = os.environ if env is None else env
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        value = e.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def build(
    kind: str,
    *,
    checkpoint: str | None = None,
    uuid: str | None = None,
    rank: int | None = None,
    at: float | None = None,
    **fields: Any,
) -> bytes:
    """One event's line (newline included); ValueError if it cannot be one (a float that is
    not finite, a line over ``MAX_LINE`` after long texts are cut)."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    event: dict[str, Any] = {
        "v": VERSION,
        "kind": kind,
        "time": time.time() if at is None else at,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "rank": rank,
        **job_facts(),
        "checkpoint": checkpoint,
        "uuid": uuid,
    }
    for k, v in fields.items():
        event[k] = v[:_TEXT_CAP] if isinstance(v, str) else v
    line = json.dumps(event, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"
    data = line.encode()
    if len(data) > MAX_LINE:
        raise ValueError(f"a {kind} event of {len(data)} bytes is over {MAX_LINE}")
    return data


def record(store: str | os.PathLike[str], kind: str, **kw: Any) -> str | None:
    """Append one event (``build``'s arguments) to ``store``'s events file, durably.

    Returns None, or what went wrong as a sentence (the store is missing or read-only, the
    events directory or file is a link or not a regular file, ENOSPC): the caller's operation
    stands, and the caller reports the sentence as it sees fit (``note`` warns)."""
    if not enabled():
        return None
    root = os.fspath(store)
    try:
        line = build(kind, **kw)
    except (ValueError, TypeError) as e:
        return f"the {kind} event was not recorded: {e}"
    try:
        with _lock:
            _append(root, line)
    except (OSError, UnsafeFileError) as e:
        return f"{root}/{EVENTS_DIR}/{CURRENT}: the {kind} event was not recorded: {_why(e)}"
    return None


def note(store: str | os.PathLike[str], kind: str, **kw: Any) -> str | None:
    """``record``, and a CheckpointWarning when it fails (once per store and reason in a
    process: a read-only store warns on its first load, not on every one)."""
    problem = record(store, kind, **kw)
    if problem is not None:
        key = (os.fspath(store), problem.split(": ", 1)[-1])
        if key not in _warned:
            _warned.add(key)
            warn_after_commit(problem, stacklevel=2)
    return problem


def _why(e: BaseException) -> str:
    if isinstance(e, UnsafeFileError):
        return e.reason
    if isinstance(e, OSError) and e.errno in (errno.ELOOP, errno.ENOTDIR):
        return f"{EVENTS_DIR} or {CURRENT} is a symbolic link or not what it must be"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def _append(root: str, line: bytes) -> None:
    shared = group_shared(root)
    store_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        dir_fd = _events_dir(store_fd, 0o770 if shared else 0o700)
    finally:
        os.close(store_fd)
    try:
        fd = _open_current(dir_fd, 0o660 if shared else 0o600)
        try:
            if os.fstat(fd).st_size >= ROTATE_AT and _rotate(dir_fd, fd):
                os.close(fd)
                fd = _open_current(dir_fd, 0o660 if shared else 0o600)
            written = os.write(fd, line)
            if written != len(line):  # a full disk part-way: the torn line is skipped on read
                raise OSError(errno.ENOSPC, "the line was written only in part")
            os.fdatasync(fd)
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)


def _events_dir(store_fd: int, mode: int) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(EVENTS_DIR, flags, dir_fd=store_fd)
    except FileNotFoundError:
        pass
    with contextlib.suppress(FileExistsError):
        os.mkdir(EVENTS_DIR, mode, dir_fd=store_fd)
        os.fsync(store_fd)
    return os.open(EVENTS_DIR, flags, dir_fd=store_fd)


def _open_current(dir_fd: int, mode: int) -> int:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(CURRENT, flags, mode, dir_fd=dir_fd)
    try:
        check_regular(os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _rotate(dir_fd: int, fd: int) -> bool:
    """Move the full file to ``PREVIOUS`` once: under a lock on the directory, and only if the
    name still holds the file this process opened (another writer may have rotated it)."""
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # another writer is rotating: append to the file we have
    try:
        st = os.fstat(fd)
        try:
            now = os.stat(CURRENT, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return True
        if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
            return True
        os.rename(CURRENT, PREVIOUS, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return True
    finally:
        fcntl.flock(dir_fd, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Events:
    """A store's events, oldest first (by time; file order among equal times)."""

    records: tuple[dict[str, Any], ...]
    skipped: int = 0
    """Lines that are not an event: torn by a crash, too long, or not what this page allows."""
    truncated: bool = False
    """Older lines beyond the cap of what is read were left out."""

    def of(self, *kinds: str) -> list[dict[str, Any]]:
        """The records of these kinds, oldest first."""
        return [r for r in self.records if r["kind"] in kinds]


def read(store: str | os.PathLike[str], *, max_bytes: int = READ_CAP) -> Events:
    """Every event of ``store`` (both files, at most ``max_bytes`` of their newest lines).

    A missing events directory is no events. A link, FIFO or other non-file in place of the
    directory or a file raises UnsafeFileError; other OSErrors propagate."""
    root = os.fspath(store)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        dir_fd = os.open(os.path.join(root, EVENTS_DIR), flags)
    except FileNotFoundError:
        return Events(())
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeFileError(f"{EVENTS_DIR} is not a directory") from None
        raise
    try:
        left, chunks, truncated = max_bytes, [], False
        for name in (CURRENT, PREVIOUS):
            data, cut = _tail(dir_fd, name, left)
            chunks.append(data)
            left -= len(data)
            truncated = truncated or cut
            if cut:
                break
    finally:
        os.close(dir_fd)
    records, skipped = [], 0
    for data in reversed(chunks):
        for raw in data.split(b"\n"):
            if not raw:
                continue
            event = parse_line(raw)
            if event is None:
                skipped += 1
            else:
                records.append(event)
    records.sort(key=lambda r: r["time"])
    return Events(tuple(records), skipped, truncated)


def _tail(dir_fd: int, name: str, cap: int) -> tuple[bytes, bool]:
    """The last ``cap`` bytes of ``name`` from its first whole line; whether any was left out."""
    try:
        fd, st = open_regular(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return b"", False
    try:
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{name} is not a regular file")
        start = max(0, st.st_size - max(cap, 0))
        data = pread_exact(fd, st.st_size - start, start)
    finally:
        os.close(fd)
    if start > 0:
        cut = data.find(b"\n")
        data = b"" if cut < 0 else data[cut + 1 :]
    return data, start > 0


def parse_line(raw: bytes) -> dict[str, Any] | None:
    """One line as an event, or None if it is not one this version accepts."""
    if len(raw) >= MAX_LINE:
        return None
    try:
        event = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, dict) or event.get("v") != VERSION:
        return None
    if not _typed(event, _COMMON) or not _typed(event, KINDS.get(event["kind"], {})):
        return None
    if event["checkpoint"] is not None and not is_name(event["checkpoint"]):
        return None
    if event["uuid"] is not None and not is_uuid(event["uuid"]):
        return None
    return event


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _typed(event: dict[str, Any], spec: dict[str, tuple[type, ...]]) -> bool:
    for key, types in spec.items():
        if key not in event:
            return False
        v = event[key]
        if isinstance(v, bool) and bool not in types:
            return False
        if not isinstance(v, types):
            return False
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            return False
    return True


__all__ = [
    "CURRENT",
    "ENV",
    "EVENTS_DIR",
    "KINDS",
    "MAX_LINE",
    "PREVIOUS",
    "ROTATE_AT",
    "Events",
    "build",
    "enabled",
    "env_rank",
    "job_facts",
    "note",
    "parse_line",
    "read",
    "record",
]
