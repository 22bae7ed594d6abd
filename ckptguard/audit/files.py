"""The audit log's files in ``STORE/.audit`` (docs/audit.md section 1): names, the config,
bounded reads of the append-only files, the lock that serializes writers.

Every file is read as untrusted input: opened relative to the ``.audit`` directory (itself
opened without following a link), without blocking or following a link, as a regular file of
bounded size, line by line under a cap.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import AuditError, AuditLockTimeoutError, AuditTamperedError
from ..fsutil import UnsafeFileError, lockf_until, open_regular, read_regular
from ..io import pread_exact
from . import canon
from .entry import MAX_ENTRY_BYTES, SchemaError

AUDIT_DIR = ".audit"
CONFIG, LOG, HEADS, LOCK = "config.json", "log.jsonl", "heads.jsonl", "lock"
WITNESS_SUBDIR = "witness"  # STORE/.audit/witness: heads of other stores drained into this one
MAX_CONFIG_BYTES = 64 * 1024
MAX_LOG_BYTES = 1 << 30
MAX_HEADS_BYTES = 1 << 30
LOCK_TIMEOUT = 60.0  # seconds a writer waits for the lock (CKPTGUARD_AUDIT_LOCK_TIMEOUT)
_CONFIG = {"v", "format", "log_id", "created", "public_key", "key_id", "signing_key", "witness"}
_HEX = re.compile(r"^[0-9a-f]+$")
_THREADS = threading.Lock()


def audit_dir(store: str) -> str:
    return os.path.join(store, AUDIT_DIR)


def enabled(store: str) -> bool:
    """Whether ``store`` keeps an audit log (``audit init`` made ``.audit/config.json``): one
    lstat, so a store without one pays nothing more."""
    return os.path.lexists(os.path.join(store, AUDIT_DIR, CONFIG))


def witness_name(log_id: str) -> str:
    """The file a witness directory keeps log ``log_id``'s latest tree head in."""
    return f"{log_id}.head.json"


def open_dir(path: str) -> int:
    """A descriptor of directory ``path`` opened without following a link; AuditError if it
    is missing, a link or not a directory."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AuditError("no audit log (`ckptguard audit init` creates one)", path) from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise AuditTamperedError("is a link or not a directory", path) from None
        raise AuditError(f"cannot open: {e.strerror or e}", path) from None


@dataclass(frozen=True)
class Config:
    """``config.json``: the log's id, its public key (hex) and key id, where the signing key
    lives, and the witness directory (each None where not configured)."""

    log_id: str
    created: str
    public_key: str | None
    key_id: str | None
    signing_key: str | None
    witness: str | None

    def to_json(self) -> bytes:
        return canon.encode({"v": 1, "format": "ckptguard-audit", **self.__dict__}) + b"\n"


def read_config(dir_fd: int, where: str) -> Config:
    """The checked config of the ``.audit`` directory open as ``dir_fd`` (``where``: its path)."""
    path = os.path.join(where, CONFIG)
    try:
        raw = read_regular(CONFIG, dir_fd=dir_fd, max_size=MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise AuditError("no audit log (`ckptguard audit init` creates one)", path) from None
    except UnsafeFileError as e:
        raise AuditTamperedError(f"{CONFIG} {e.reason}", path) from None
    except OSError as e:
        raise AuditError(f"cannot read: {e.strerror or e}", path) from None
    try:
        obj = canon.decode(raw.removesuffix(b"\n"), MAX_CONFIG_BYTES)
        if set(obj) != _CONFIG or obj["v"] != 1 or obj["format"] != "ckptguard-audit":
            raise SchemaError("not an audit config of version 1")
        for k in _CONFIG - {"v"}:
            if obj[k] is not None and not isinstance(obj[k], str):
                raise SchemaError(f"{k} is not a string")
        for k, n in (("log_id", 32), ("public_key", 64), ("key_id", 64)):
            if obj[k] is not None and (len(obj[k]) != n or not _HEX.match(obj[k])):
                raise SchemaError(f"{k} is not {n} hex digits")
        if obj["log_id"] is None or (obj["public_key"] is None) != (obj["key_id"] is None):
            raise SchemaError("log_id missing, or a key id without a key")
    except (canon.CanonicalError, SchemaError) as e:
        raise AuditTamperedError(f"damaged config: {e}", path) from None
    del obj["v"], obj["format"]
    return Config(**obj)


@dataclass
class Lines:
    """A file of lines: each complete line (newline excluded), in order, and the bytes after
    the last newline (a line torn by a crash, or damage)."""

    lines: list[bytes]
    torn: bytes
    size: int  # bytes in the file


def read_lines(dir_fd: int, name: str, where: str, max_bytes: int, max_line: int) -> Lines:
    """Every line of file ``name`` of the ``.audit`` directory ``dir_fd`` (missing: none).
    AuditTamperedError for a special file, a link, a file over ``max_bytes`` or a line over
    ``max_line`` (naming its 0-based number); AuditError for an I/O error."""
    path = os.path.join(where, name)
    try:
        fd, st = open_regular(name, dir_fd=dir_fd, max_size=max_bytes)
    except FileNotFoundError:
        return Lines([], b"", 0)
    except UnsafeFileError as e:
        raise AuditTamperedError(f"{name} {e.reason}", path) from None
    except OSError as e:
        raise AuditError(f"cannot read: {e.strerror or e}", path) from None
    try:
        data = pread_exact(fd, st.st_size, 0)
    except OSError as e:
        raise AuditError(f"cannot read: {e.strerror or e}", path) from None
    finally:
        os.close(fd)
    *lines, torn = data.split(b"\n")
    for i, line in enumerate(lines):
        if len(line) > max_line:
            raise AuditTamperedError(f"a line of {len(line)} bytes (at most {max_line})", path, i)
    if len(torn) > max_line:
        raise AuditTamperedError(
            f"a last line of {len(torn)} bytes (at most {max_line})", path, len(lines)
        )
    return Lines(lines, torn, len(data))


def read_log(dir_fd: int, where: str) -> Lines:
    return read_lines(dir_fd, LOG, where, MAX_LOG_BYTES, MAX_ENTRY_BYTES)


def open_append(dir_fd: int, name: str, where: str, mode: int) -> int:
    """``name`` opened for writing (created with ``mode`` if missing), never through a link or
    into a special file; the writer writes at the offset it read under the lock."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):
            raise AuditTamperedError(f"{name} is a link or special file", where) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AuditTamperedError(f"{name} is not a regular file", os.path.join(where, name))
    return fd


def lock_timeout() -> float:
    with contextlib.suppress(ValueError):
        return float(os.environ.get("CKPTGUARD_AUDIT_LOCK_TIMEOUT", LOCK_TIMEOUT))
    return LOCK_TIMEOUT


@contextlib.contextmanager
def locked(
    dir_fd: int, where: str, mode: int, timeout: float | None = None, shared: bool = False
) -> Iterator[None]:
    """Hold the POSIX record lock (``lockf``, fcntl F_SETLK: what Lustre mounted with ``-o
    flock`` and NFS lock across nodes) on ``.audit/lock`` for the block: exclusive for a writer,
    ``shared`` for a reader (the lock file must exist then). Polls with a growing pause up to
    ``timeout`` (``lock_timeout()``), then AuditLockTimeoutError: nobody waits unboundedly. The
    lock goes with the descriptor, also when the process dies."""
    wait = lock_timeout() if timeout is None else timeout
    deadline = time.monotonic() + wait
    # POSIX record locks belong to the process (threads share them, and closing any descriptor
    # of the file drops them): the threads of one process take turns on this lock first.
    if not _THREADS.acquire(timeout=wait):
        raise AuditLockTimeoutError(
            f"another thread held the audit log's lock longer than {wait:g} s",
            os.path.join(where, LOCK),
        )
    try:
        with _posix_lock(dir_fd, where, mode, shared, wait, deadline):
            yield
    finally:
        _THREADS.release()


@contextlib.contextmanager
def _posix_lock(
    dir_fd: int, where: str, mode: int, shared: bool, wait: float, deadline: float
) -> Iterator[None]:
    if shared:
        fd, _ = open_regular(LOCK, dir_fd=dir_fd)
    else:
        fd = open_append(dir_fd, LOCK, where, mode)
    try:
        try:
            got = lockf_until(fd, shared, deadline)
        except OSError as e:
            raise AuditError(f"cannot lock: {e.strerror or e}", where) from None
        if not got:
            raise AuditLockTimeoutError(
                f"another process held the audit log's lock longer than {wait:g} s",
                os.path.join(where, LOCK),
            )
        yield
    finally:
        os.close(fd)  # releases the lock
