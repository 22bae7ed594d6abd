"""A node's files read as one payload, and a lost node's files written back from one.

A member's payload is its files, in the order given, one after the other. Reading opens each
file as every reader of ckptguard does (no link followed, never blocking, a regular file of
exactly the size expected), so a parity or a rebuild never reads what the checkpoint does not
name. Writing makes the files appear together and whole (``fsutil.NewFiles``), fsynced.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence

import numpy as np

from ..errors import RebuildError, RedundancyError, from_oserror
from ..fsutil import NewFiles, UnsafeFileError, open_regular
from ..io import pread_exact, pwrite_all


def check_names(files: Sequence[tuple[str, int]]) -> None:
    """RedundancyError unless every file is a plain name in its directory with a byte count."""
    seen = set()
    for name, size in files:
        if (
            not isinstance(name, str)
            or name in ("", ".", "..")
            or "/" in name
            or "\0" in name
            or name in seen
        ):
            raise RedundancyError(f"{name!r} is not a plain, distinct file name of a payload")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise RedundancyError(f"file {name!r} has size {size!r}, not a byte count")
        seen.add(name)


class Payload:
    """The files ``files`` ((name, size) pairs) of ``directory``, read as one byte string."""

    def __init__(self, directory: str, files: Sequence[tuple[str, int]]) -> None:
        check_names(files)
        self.directory = directory
        self.names = [n for n, _ in files]
        self.starts = [0]
        for _, size in files:
            self.starts.append(self.starts[-1] + size)
        self.fds: list[int] = []
        try:
            for name, size in files:
                self.fds.append(self._open(name, size))
        except BaseException:
            self.close()
            raise

    def _open(self, name: str, size: int) -> int:
        path = os.path.join(self.directory, name)
        try:
            return open_regular(path, size=size)[0]
        except UnsafeFileError as e:
            raise RebuildError(f"{path} {e.reason}: it cannot be protected or used") from None
        except OSError as e:
            raise from_oserror(e, path, "cannot read") from None

    @property
    def length(self) -> int:
        return self.starts[-1]

    def read(self, pos: int, size: int) -> np.ndarray:
        """``size`` bytes from position ``pos``; zeros past the payload's end."""
        out = np.zeros(size, dtype=np.uint8)
        first, end = pos, min(pos + size, self.length)
        k = bisect.bisect_right(self.starts, pos) - 1
        while pos < end:
            lo, hi = self.starts[k], self.starts[k + 1]
            n = min(end, hi) - pos
            if n > 0:
                data = pread_exact(self.fds[k], n, pos - lo)
                if len(data) != n:
                    path = os.path.join(self.directory, self.names[k])
                    raise RebuildError(f"{path} became shorter while it was read")
                out[pos - first : pos - first + n] = np.frombuffer(data, dtype=np.uint8)
                pos += n
            k += 1
        return out

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> Payload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Rebuilt:
    """A lost member's files ((name, size) pairs) written back into ``directory`` from its
    payload: ``write`` places bytes at a payload position, ``commit`` fsyncs the files and names
    them all (none appears before every one is whole), ``discard`` removes what is not named.
    A file of the same name already there is an error: a rebuild never overwrites."""

    def __init__(self, directory: str, files: Sequence[tuple[str, int]]) -> None:
        check_names(files)
        self.directory = directory
        self.names = [n for n, _ in files]
        self.starts = [0]
        for _, size in files:
            self.starts.append(self.starts[-1] + size)
        self.files = NewFiles(directory)
        self.fds: list[int] = []
        try:
            for name, size in files:
                tmp = self.files.new(name)
                fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
                self.fds.append(fd)
                os.ftruncate(fd, size)
        except OSError as e:
            self.discard()
            raise from_oserror(e, directory, "cannot write rebuilt files in") from None
        except BaseException:
            self.discard()
            raise

    def write(self, pos: int, data: np.ndarray) -> None:
        """Place ``data`` at payload position ``pos`` (within the payload)."""
        if pos < 0 or pos + len(data) > self.starts[-1]:
            raise RebuildError(
                f"a rebuilt block at {pos}+{len(data)} lies outside the payload of "
                f"{self.starts[-1]} bytes"
            )
        view = memoryview(np.ascontiguousarray(data, dtype=np.uint8).data).cast("B")
        first, end = pos, pos + len(data)
        k = bisect.bisect_right(self.starts, pos) - 1
        while pos < end:
            lo, hi = self.starts[k], self.starts[k + 1]
            n = min(end, hi) - pos
            if n > 0:
                path = os.path.join(self.directory, self.names[k])
                try:
                    pwrite_all(self.fds[k], [view[pos - first : pos - first + n]], pos - lo, path)
                except OSError as e:
                    raise from_oserror(e, path, "cannot write rebuilt file") from None
                pos += n
            k += 1

    def commit(self, replace: bool = False) -> list[str]:
        """Fsync and name every file; their paths."""
        self._close()
        self.files.replace = replace
        try:
            try:
                return self.files.commit()
            finally:
                self.files.discard()
        except FileExistsError as e:
            raise RebuildError(
                f"{e.filename} already exists: a rebuild writes only files that are missing"
            ) from None
        except OSError as e:
            raise from_oserror(e, self.directory, "cannot name rebuilt files in") from None

    def _close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def discard(self) -> None:
        self._close()
        self.files.discard()
