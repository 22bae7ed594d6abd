"""Small file helpers: the one safe open for reading, full writes, fsync of files and
directories, atomic replace."""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from .io import pread_exact, write_all

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


def fsync_dir(path: str) -> None:
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
