"""Small file helpers: the one safe open for reading, full writes, fsync of files and
directories, atomic replace, new files that appear together; the one whole read of a
checkpoint's file and of its manifest, with the typed errors every reader of a checkpoint
raises."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable

from .errors import CorruptCheckpointError, FormatVersionError, StoreError, from_oserror
from .format import manifest
from .format.datafile import FormatError
from .format.layout import MANIFEST
from .io import pread_exact, write_all
from .temps import remove_stale_temps, temp_name

# No open for reading may block (a FIFO waits for a writer), follow a final symbolic link, or
# outlive an exec.
READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


class UnsafeFileError(Exception):
    """A name that must be a regular file of bounded size is something else: a symbolic link,
    a FIFO, a device, a socket, a directory, or a file larger than its kind may be. The caller
    knows which file of what it is and raises its own typed error with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def open_regular(
    name: str,
    *,
    dir_fd: int | None = None,
    max_size: int | None = None,
    size: int | None = None,
) -> tuple[int, os.stat_result]:
    """Open ``name`` for reading, safely; return (fd, its fstat).

    Never blocks and never follows a final link (``READ_FLAGS``); the open file must be a
    regular file, of at most ``max_size`` bytes and of exactly ``size`` bytes where given, or
    UnsafeFileError is raised before a byte is read. FileNotFoundError and other OSErrors
    (permission, EIO) propagate unchanged: they say nothing about the file's bytes."""
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFileError("is a symbolic link, not a regular file") from None
        if e.errno == errno.ENXIO:  # a socket (or a device with no driver) cannot be opened
            raise UnsafeFileError("is a socket or device, not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        check_regular(st, max_size=max_size, size=size)
        # Reads of a regular file never block; clear the flag so nothing later depends on it.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def check_regular(
    st: os.stat_result, *, max_size: int | None = None, size: int | None = None
) -> None:
    """Raise UnsafeFileError unless ``st`` is a regular file's, of at most ``max_size`` and of
    exactly ``size`` bytes where given (``open_regular``'s checks, for an lstat too)."""
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "a special file")
        raise UnsafeFileError(f"is {kind}, not a regular file")
    if max_size is not None and st.st_size > max_size:
        raise UnsafeFileError(f"has {st.st_size} bytes, more than the {max_size} allowed")
    if size is not None and st.st_size != size:
        raise UnsafeFileError(f"has {st.st_size} bytes, {size} were expected")


def read_regular(
    name: str,
    *,
    dir_fd: int | None = None,
    max_size: int | None = None,
    size: int | None = None,
) -> bytes:
    """The whole content of a regular file opened by ``open_regular`` (same checks, same
    errors); UnsafeFileError too when it changes size while being read."""
    fd, st = open_regular(name, dir_fd=dir_fd, max_size=max_size, size=size)
    try:
        data = pread_exact(fd, st.st_size, 0)
        if len(data) != st.st_size or pread_exact(fd, 1, st.st_size):
            raise UnsafeFileError("changed size while being read")
        return data
    finally:
        os.close(fd)


def read_member(
    checkpoint: str,
    name: str,
    *,
    dir_fd: int | None = None,
    max_size: int | None = None,
    size: int | None = None,
) -> bytes:
    """File ``name`` of the checkpoint directory ``checkpoint`` read whole by ``read_regular``
    (relative to ``dir_fd``, that directory opened, where given). What ``read_regular`` refuses
    (a link, FIFO, device, the wrong size) is a CorruptCheckpointError; what cannot be read is
    the StoreError of ``from_oserror`` with the file's path and ``file=name``: the checkpoint
    may be intact. FileNotFoundError is the caller's to map: a missing file means "not
    committed" to one caller and "replaced meanwhile" to another."""
    where = os.path.join(checkpoint, name)
    try:
        return read_regular(
            name if dir_fd is not None else where, dir_fd=dir_fd, max_size=max_size, size=size
        )
    except FileNotFoundError:
        raise
    except UnsafeFileError as e:
        raise CorruptCheckpointError(f"{name} {e.reason}", path=checkpoint, file=name) from None
    except OSError as e:
        raise member_error(e, checkpoint, name) from None


def member_error(e: OSError, checkpoint: str, name: str, action: str = "cannot read") -> StoreError:
    """The typed error of an OSError on file ``name`` of ``checkpoint`` (not corruption: its
    bytes could not be read); ``path`` is the file's, ``file`` its name."""
    err = from_oserror(e, os.path.join(checkpoint, name), action)
    err.file = name  # type: ignore[attr-defined]  # named like CorruptCheckpointError.file
    return err


def read_manifest(checkpoint: str, *, dir_fd: int | None = None) -> tuple[bytes, dict]:
    """MANIFEST.json of ``checkpoint`` (``read_member``'s reading and errors): its bytes and
    its checked body. FormatVersionError for a manifest this version cannot read,
    CorruptCheckpointError for one that is damaged; FileNotFoundError is the caller's."""
    raw = read_member(checkpoint, MANIFEST, dir_fd=dir_fd, max_size=manifest.MAX_MANIFEST_BYTES)
    return raw, decode_manifest(raw, checkpoint)


def decode_manifest(raw: bytes, checkpoint: str) -> dict:
    """The checked body of the MANIFEST.json bytes ``raw`` of ``checkpoint``, with
    ``read_manifest``'s typed errors."""
    try:
        return manifest.decode(raw)
    except manifest.FormatVersionProblem as e:
        raise FormatVersionError(f"{e} ({checkpoint})") from None
    except FormatError as e:
        raise CorruptCheckpointError(str(e), path=checkpoint, file=MANIFEST) from None


def group_shared(store: str) -> bool:
    """Whether ``store`` is shared with its group: its owner made it group-writable
    (docs/operations.md). Its private areas (``.staging``, ``.audit``) are then 0770, else 0700."""
    return bool(os.stat(store).st_mode & stat.S_IWGRP)


def fsync_dir(path: str) -> None:
    """fsync a directory: makes the names created, renamed or removed in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durably(path: str, mode: int = 0o755) -> list[str]:
    """``os.makedirs(path, exist_ok=True)`` that survives a crash: each directory it creates has
    its parent fsynced. ``mode`` never includes o+w (a world-writable directory would let any
    local user plant files in it), whatever the umask. Returns the directories created."""
    mode &= ~0o002
    missing = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    created = []
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:  # another process made it first; a file there is an error
            if not os.path.isdir(d):
                raise
            continue
        created.append(d)
    for d in created:
        fsync_dir(os.path.dirname(d))
    return created


def write_new_file(path: str, data: bytes) -> None:
    """Create ``path`` (it must not exist), write ``data`` and fsync it (not the directory)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: str, data: bytes, *, tmp_suffix: str = ".tmp") -> None:
    """Write ``data`` to ``path`` via a new temporary file, fsync, rename (not the directory)."""
    tmp = path + tmp_suffix
    write_new_file(tmp, data)
    os.rename(tmp, path)


class NewFiles:
    """A set of files that appear in directory ``dest`` together and whole, or not at all.

    ``new`` creates each under a hidden temporary name (``temps.temp_name``: a later run removes
    it if this process dies first, ``remove_stale``); ``commit`` fsyncs them all, then gives
    each its final name, in the order created, and fsyncs ``dest``. Without ``replace`` an
    existing final name raises FileExistsError (a hard link never replaces; a rename after a
    check where the file system has no links) and the files already named by this commit are
    removed again; with it, existing files are replaced. ``discard`` removes every temporary
    file not yet named (call it in a ``finally``)."""

    def __init__(self, dest: str, replace: bool = False) -> None:
        self.dest, self.replace = dest, replace
        self.pending: list[tuple[str, str]] = []

    def new(self, name: str) -> str:
        """A new empty temporary file in ``dest`` that ``commit`` names ``name``: its path."""
        tmp = os.path.join(self.dest, temp_name(name))
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        self.pending.append((tmp, os.path.join(self.dest, name)))
        return tmp

    def commit(self) -> list[str]:
        """Name every file (after fsyncing each); the final paths."""
        for tmp, _ in self.pending:
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        named: list[str] = []
        try:
            for tmp, final in self.pending:
                self._name(tmp, final)
                named.append(final)
        except BaseException:
            if not self.replace:  # each file named was new: take them back
                for final in named:
                    os.unlink(final)
            raise
        self.pending = []
        fsync_dir(self.dest)
        return named

    def _name(self, tmp: str, final: str) -> None:
        if self.replace:
            os.replace(tmp, final)
            return
        try:
            os.link(tmp, final)
        except OSError as e:  # EEXIST raised as is; no hard links here (some FUSE, SMB, vfat)
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if os.path.lexists(final):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), final) from None
            os.rename(tmp, final)
            return
        os.unlink(tmp)

    def remove_stale(self, names: Callable[[str], bool]) -> list[str]:
        """Remove the temporaries in ``dest`` of files that ``names`` accepts left by processes
        that are provably gone (``temps.remove_stale_temps``); those removed."""
        return remove_stale_temps(self.dest, names)

    def discard(self) -> None:
        for tmp, _ in self.pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.pending = []


def lockf_until(fd: int, shared: bool, deadline: float) -> bool:
    """Take the POSIX record lock on open file ``fd`` (``lockf``: what NFS and Lustre mounted
    with ``-o flock`` lock across nodes; it goes with the descriptor, also when the process
    dies), exclusive or ``shared``, polling with a growing pause until ``deadline``
    (``time.monotonic``): False if another process still held it then. Other errors raise."""
    pause = 0.001
    while True:
        try:
            fcntl.lockf(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
