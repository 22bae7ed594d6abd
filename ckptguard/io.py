"""Positioned and sequential I/O on file descriptors: every full write and exact read.

The data path's writer, reader and drain reach the file system through these loops, so that
short writes and reads are handled in one place. Higher-level record I/O (write_records,
read_into) builds on them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def _views(parts: Sequence[Any]) -> list[memoryview]:
    return [memoryview(p).cast("B") for p in parts if len(p)]


def _advance(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes written from ``views`` (a short write leaves the rest)."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views.pop(0)
    if views and n:
        views[0] = views[0][n:]


def write_all(fd: int, *parts: bytes | memoryview) -> int:
    """Write every byte of ``parts`` at the file position (handling short writes); return the
    count."""
    total = 0
    views = _views(parts)
    while views:
        n = os.writev(fd, views)
        total += n
        _advance(views, n)
    return total


def pwrite_all(fd: int, parts: Sequence[Any], offset: int, path: str | None = None) -> int:
    """Write every byte of ``parts`` at ``offset`` (handling short writes); return the count.
    An OSError names ``path`` when given (the caller's file, not the descriptor)."""
    total = 0
    views = _views(parts)
    while views:
        try:
            n = os.pwritev(fd, views, offset + total)
        except OSError as e:
            if path is None:
                raise
            raise OSError(e.errno, e.strerror, path) from None
        total += n
        _advance(views, n)
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
