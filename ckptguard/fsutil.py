"""Small durable-file helpers: full writes, fsync of files and directories, atomic replace."""

from __future__ import annotations

import os


def write_all(fd: int, *parts: bytes | memoryview) -> int:
    """Write every byte of ``parts`` (handling short writes); return the count."""
    total = 0
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        n = os.writev(fd, views)
        total += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Read exactly ``length`` bytes at ``offset`` or return fewer only at end of file."""
    chunks = []
    while length > 0:
        b = os.pread(fd, length, offset)
        if not b:
            break
        chunks.append(b)
        length -= len(b)
        offset += len(b)
    return b"".join(chunks)


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
