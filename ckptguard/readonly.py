"""Committed checkpoints read-only (docs/operations.md, "Legal hold and read-only checkpoints").

Once committed a checkpoint's files are 0444 and its directory 0555 (``seal_dir``, after the
rename: a directory moved into another one must be writable by its owner, unless the mover is
root). The files are sealed before the rename. A save's data files are made 0444 by their
writers, each before its own fsync (``target.Target.data_mode``), so that rank 0 seals only its
own files (``seal_own``) and never lists the staging directory; a drain, whose copier reopens
its copies piece by piece, seals every file of its staging directory (``seal_files``). A held
checkpoint may also carry the immutable attribute (``set_immutable``). ``unseal`` undoes the
modes, and an immutable attribute left behind, before a directory is renamed out of the store
or removed; ``remove_tree`` removes any tree so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import struct
from collections.abc import Callable
from types import TracebackType

from .failpoints import failpoint
from .format.layout import INDEX, MANIFEST, SIGNATURE
from .fsutil import fsync_dir, group_shared

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "OWN_FILES",
    "remove_tree",
    "seal_dir",
    "seal_files",
    "seal_own",
    "set_immutable",
]

FILE_MODE = 0o444
DIR_MODE = 0o555
# Linux's FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (an int of FS_*_FL bits) and FS_IMMUTABLE_FL.
_GETFLAGS, _SETFLAGS, _IMMUTABLE = 0x80086601, 0x40086602, 0x00000010
# A checkpoint's own files: never hard links shared with another checkpoint (data files may be).
OWN_FILES = (MANIFEST, INDEX, SIGNATURE)


def seal_files(staging: str) -> None:
    """Make every regular file of a staging directory 0444 (before its rename). A data file
    hard-linked from a base (an incremental save) shares its inode, which is 0444 already."""
    with os.scandir(staging) as it:
        for e in it:
            if e.is_file(follow_symlinks=False):
                os.chmod(e.path, FILE_MODE)


def seal_own(staging: str, signed: bool) -> None:
    """Make the checkpoint's own files in a staging directory 0444 (``OWN_FILES``; SIGNATURE.json
    only where ``signed``: a chmod of a missing name is a round trip too), and nothing else: no
    listing. For a staging directory whose data files their writers made 0444 already."""
    for n in OWN_FILES if signed else (MANIFEST, INDEX):
        os.chmod(os.path.join(staging, n), FILE_MODE)


def seal_dir(path: str) -> None:
    """Make a committed checkpoint directory 0555. In a store shared with its group it stays
    group-writable (0775): its group deletes and prunes checkpoints other members wrote."""
    if not group_shared(os.path.dirname(path)):
        os.chmod(path, DIR_MODE)


def unseal(path: str) -> None:
    """Make the directory ``path`` writable by its owner again, clearing an immutable attribute
    left on it or its own files, so that it can be renamed into another directory and emptied.
    What this process may not change (another user's directory) is left as it is: the rename or
    unlink that follows fails with its own error."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            return
        for n in (".", *OWN_FILES):
            with contextlib.suppress(OSError):
                _flag(os.path.join(path, n), False)
        if not st.st_mode & stat.S_IWUSR:
            os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IWUSR)


def set_immutable(path: str, on: bool) -> None:
    """Set (or clear) the immutable attribute (``FS_IMMUTABLE_FL``) of a checkpoint directory
    and its own files (MANIFEST.json, index.parquet, SIGNATURE.json), never its data files: an
    incremental save's hard links share them with other checkpoints, whose removal it would
    block. OSError where the file system has no such attribute or the process lacks
    CAP_LINUX_IMMUTABLE; a set that fails part-way clears what it set."""
    files = [os.path.join(path, n) for n in OWN_FILES if os.path.lexists(os.path.join(path, n))]
    order = [*files, path] if on else [path, *files]
    done: list[str] = []
    try:
        for p in order:
            _flag(p, on)
            done.append(p)
    except OSError:
        if on:
            for p in reversed(done):
                with contextlib.suppress(OSError):
                    _flag(p, False)
        raise


def immutable(path: str) -> bool:
    """Whether ``path`` carries the immutable attribute (False where it cannot be read)."""
    try:
        return bool(_get(path) & _IMMUTABLE)
    except OSError:
        return False


def _get(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, _GETFLAGS, struct.pack("i", 0)))[0])
    finally:
        os.close(fd)


def _flag(path: str, on: bool) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        (flags,) = struct.unpack("i", fcntl.ioctl(fd, _GETFLAGS, struct.pack("i", 0)))
        new = flags | _IMMUTABLE if on else flags & ~_IMMUTABLE
        if new != flags:
            fcntl.ioctl(fd, _SETFLAGS, struct.pack("i", new))
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL):  # no such attribute on this file system
            raise OSError(errno.EOPNOTSUPP, "no immutable attribute on this file system") from e
        raise
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    """Remove a directory tree (never following symlinks), ignoring a missing path.

    A checkpoint stops being one first: its MANIFEST.json is removed, durably, before any data
    file, so that a tree whose removal was interrupted never reads as a committed checkpoint.
    A read-only (or immutable) checkpoint is made writable first (``unseal``).
    """
    if not os.path.islink(path):  # rmtree refuses a link; never reach through one
        unseal(path)
        try:
            os.unlink(os.path.join(path, MANIFEST))
        except (FileNotFoundError, NotADirectoryError):
            pass
        else:
            fsync_dir(path)
            failpoint("remove.manifest_removed")
    shutil.rmtree(path, ignore_errors=False, onerror=_writable_or_missing)


def _writable_or_missing(
    func: Callable[..., object],
    path: str,
    exc_info: tuple[type[BaseException], BaseException, TracebackType],
) -> None:
    """rmtree's error handler: a missing entry is fine; an entry of a read-only directory is
    removed once its directory is made writable (a tree holding a copy of a checkpoint)."""
    e = exc_info[1]
    if isinstance(e, FileNotFoundError):
        return
    parent = os.path.dirname(path)
    if isinstance(e, PermissionError) and func in (os.unlink, os.rmdir) and parent:
        unseal(parent)
        with contextlib.suppress(FileNotFoundError):
            func(path)
        return
    raise e
