"""A node's files read as one payload, and a lost node's files written back from one.

A member's payload is its files, in the order given, one after the other. Reading opens each
file as every reader of ckptguard does (no link followed, never blocking, a regular file of
exactly the size expected), so a parity or a rebuild never reads what the checkpoint does not
name. Writing makes the files appear together and whole (``fsutil.NewFiles``), fsynced.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence

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


class _Files:
    """Files ((name, size) pairs) of ``directory`` laid end to end as one payload."""

    def __init__(self, directory: str, files: Sequence[tuple[str, int]]) -> None:
        check_names(files)
        self.directory = directory
        self.names = [n for n, _ in files]
        self.starts = [0]
        for _, size in files:
            self.starts.append(self.starts[-1] + size)
        self.fds: list[int] = []

    @property
    def length(self) -> int:
        return self.starts[-1]

    def spans(self, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(file index, offset in that file, bytes) of payload bytes ``pos`` to ``end``."""
        k = bisect.bisect_right(self.starts, pos) - 1
        while pos < end:
            n = min(end, self.starts[k + 1]) - pos
            if n > 0:
                yield k, pos - self.starts[k], n
                pos += n
            k += 1


class Payload(_Files):
    """The files ``files`` ((name, size) pairs) of ``directory``, read as one byte string."""

    def __init__(self, directory: str, files: Sequence[tuple[str, int]]) -> None:
        super().__init__(directory, files)
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

    def read(self, pos: int, size: int) -> np.ndarray:
        """``size`` bytes from position ``pos``; zeros past the payload's end."""
        out = np.zeros(size, dtype=np.uint8)
        at = 0
        for k, offset, n in self.spans(pos, min(pos + size, self.length)):
            data = pread_exact(self.fds[k], n, offset)
            if len(data) != n:
                path = os.path.join(self.directory, self.names[k])
                raise RebuildError(f"{path} became shorter while it was read")
            out[at : at + n] = np.frombuffer(data, dtype=np.uint8)
            at += n
        return out

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> Payload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Rebuilt(_Files):
    """A lost member's files ((name, size) pairs) written back into ``directory`` from its
    payload: ``write`` places bytes at a payload position, ``commit`` fsyncs the files and names
    them all (none appears before every one is whole), ``discard`` removes what is not named.
    A file of the same name already there is an error: a rebuild never overwrites."""

    def __init__(self, directory: str, files: Sequence[tuple[str, int]]) -> None:
        super().__init__(directory, files)
        self.files = NewFiles(directory)
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
        at = 0
        for k, offset, n in self.spans(pos, pos + len(data)):
            path = os.path.join(self.directory, self.names[k])
            try:
                pwrite_all(self.fds[k], [view[at : at + n]], offset, path)
            except OSError as e:
                raise from_oserror(e, path, "cannot write rebuilt file") from None
            at += n

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
