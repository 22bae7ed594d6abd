"""A one-file checkpoint opened for reading (docs/format.md section 10), from a path or from a
file object: its trailer, TOC and padding checked on open, its members read by name.

The path is opened once with ``fsutil.open_regular`` (no link followed, no blocking open, a
regular file), so a FIFO, a device or a link at the path is refused before a byte is read, and
every later read goes through that one descriptor: an overwrite of the path meanwhile (a rename
of a new file over it) changes nothing of what is read. The data file is the container's first
member, at offset 0, so the descriptor is also the data file's: every offset in the data file and
the index is an offset in the container.
"""

from __future__ import annotations

import io as _pyio
import os
from collections.abc import Callable
from typing import Any, Protocol

from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    NotACheckpointError,
    from_oserror,
)
from .format import container
from .format.container import Member, Toc
from .format.datafile import FILE_MAGIC, TRAILER_MAGIC, FormatError
from .format.layout import INDEX, MANIFEST
from .fsutil import UnsafeFileError, check_regular, decode_manifest, open_regular
from .io import pread_exact, write_all

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format (a zip archive)
_COPY = 16 << 20  # bytes per read when a file object is copied into a private file


class Members(Protocol):
    """The files of a checkpoint that is not a directory, by name: a one-file checkpoint
    (``OneFile``) or a checkpoint in an object store (``objstore.ObjectCheckpoint``). ``kind``
    names it in messages; ``manifest_raw`` is the manifest's bytes once ``manifest`` read them
    (empty where no signature can cover them); ``signature`` fetches SIGNATURE.json's bytes
    (None: a one-file checkpoint, which cannot be signed). Neither has a keyring."""

    path: str
    kind: str
    manifest_raw: bytes

    @property
    def signature(self) -> Callable[[], bytes | None] | None: ...
    def manifest(self) -> dict: ...
    def index(self, size: int) -> bytes: ...
    def member_size(self, name: str) -> int | None: ...
    def data_fd(self, name: str, size: int, what: str) -> int: ...
    def close(self) -> None: ...


class OneFile:
    """An open one-file checkpoint: ``path`` (for messages), its descriptor and checked TOC.
    As ``open.Members``: no signature, and no manifest bytes a signature could cover."""

    kind = "a one-file checkpoint"
    manifest_raw = b""
    signature = None

    def __init__(self, fd: int, path: str) -> None:
        """Check the container open on ``fd`` (owned from here on: closed on error and by
        ``close``), a regular file."""
        self.fd, self.path = fd, path
        try:
            self.size = os.fstat(fd).st_size
            self.toc = _read_toc(self)
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, path: str) -> OneFile:
        """Open the one-file checkpoint at ``path``; typed errors for anything else there."""
        try:
            fd, _ = open_regular(path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no checkpoint at {path}") from None
        except UnsafeFileError as e:
            raise NotACheckpointError(f"{path} {e.reason}{_link_hint(path)}", path) from None
        except OSError as e:
            raise from_oserror(e, path, "cannot open") from None
        return cls(fd, path)

    def corrupt(self, msg: str, file: str | None = None) -> CorruptCheckpointError:
        return CorruptCheckpointError(msg, path=self.path, file=file)

    def pread(self, length: int, offset: int, what: str) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (inside the file: the TOC was checked)."""
        try:
            data = pread_exact(self.fd, length, offset)
        except OSError as e:
            raise from_oserror(e, self.path, f"cannot read {what} of") from None
        if len(data) != length:
            raise self.corrupt(f"{what} is cut short (the file shrank while being read)")
        return data

    def read(self, member: Member) -> bytes:
        """A member's bytes, checked against its size and TOC hash."""
        data = self.pread(member.size, member.offset, member.name)
        try:
            container.check_member(member, data)
        except FormatError as e:
            raise self.corrupt(str(e), member.name) from None
        return data

    def manifest(self) -> dict:
        """The manifest's checked body, which must name exactly this container's data file and
        an index of the index member's size."""
        body = decode_manifest(self.read(self.toc.manifest), self.path)
        try:
            container.check_manifest(self.toc, body)
        except FormatError as e:
            raise self.corrupt(str(e), MANIFEST) from None
        return body

    def index(self, size: int) -> bytes:
        """index.parquet's bytes, of the ``size`` the manifest gives."""
        if size != self.toc.index.size:
            raise self.corrupt("index size differs from the one-file index member", INDEX)
        return self.read(self.toc.index)

    def member_size(self, name: str) -> int | None:
        """The size of the data file ``name`` in the container (None: it holds no such file)."""
        return self.toc.data.size if name == self.toc.data.name else None

    def data_fd(self, name: str, size: int, what: str) -> int:
        """A new descriptor of the container for reading data file ``name`` of ``size`` bytes
        (the caller closes it): the data file starts at offset 0."""
        got = self.member_size(name)
        if got is None:
            raise self.corrupt(f"{what} is not in the one-file checkpoint", name)
        if got != size:
            raise self.corrupt(f"{what} has {got} bytes, {size} were expected", name)
        return os.dup(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OneFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_toc(one: OneFile) -> Toc:
    """Trailer, TOC and the zero padding between members, checked; typed errors."""
    size = one.size
    last = one.pread(
        min(size, container.TRAILER_SIZE), max(size - container.TRAILER_SIZE, 0), "the end"
    )
    if not container.is_container(last):
        head = one.pread(min(size, len(FILE_MAGIC)), 0, "the first bytes")
        if head == FILE_MAGIC and last[-len(TRAILER_MAGIC) :] == TRAILER_MAGIC:
            raise CheckpointNotFoundError(
                f"{one.path} is a data file of a checkpoint directory: pass the directory"
            )
        if head == FILE_MAGIC:  # a one-file checkpoint cut short
            raise one.corrupt("no one-file trailer at the end: the file is truncated or damaged")
        hint = " (a zip archive, as torch.save writes: load it with torch.load)"
        raise CheckpointNotFoundError(
            f"{one.path} is not a ckptguard checkpoint{hint if head[:4] == _ZIP_MAGIC else ''}"
        )
    try:
        off, length, digest = container.unpack_trailer(last, size)
        toc = container.parse_toc(one.pread(length, off, "the TOC"), digest, off)
    except container.ContainerVersionProblem as e:
        raise FormatVersionError(f"{e} ({one.path})") from None
    except FormatError as e:
        raise one.corrupt(str(e)) from None
    for at, n in toc.gaps():
        if one.pread(n, at, "padding").count(0) != n:
            raise one.corrupt(f"non-zero padding between one-file members at offset {at}")
    return toc


def _link_hint(path: str) -> str:
    """For a link: where it leads, which is what to pass instead."""
    if not os.path.islink(path):
        return ""
    return (
        ": ckptguard opens a one-file checkpoint by its own path, never through a link "
        f"(the link leads to {os.path.realpath(path)})"
    )


# ---- file objects -------------------------------------------------------------------------------


def is_file_object(x: Any) -> bool:
    """Whether ``x`` is a file object (has ``read`` or ``write``) rather than a path."""
    if isinstance(x, (str, bytes, os.PathLike)):
        return False
    return callable(getattr(x, "read", None)) or callable(getattr(x, "write", None))


def regular_fd(f: Any) -> int | None:
    """The descriptor of file object ``f`` if it has one and it is a regular file, else None."""
    try:
        fd = f.fileno()
        check_regular(os.fstat(fd))
    except (AttributeError, OSError, ValueError, UnsafeFileError, _pyio.UnsupportedOperation):
        return None
    return fd if isinstance(fd, int) else None


def open_fileobj(f: Any) -> OneFile:
    """The one-file checkpoint a readable binary file object holds from its current position
    to its end. A regular file at position 0 is read through its own descriptor; anything else
    (a pipe, a BytesIO, a regular file read from further on) is first copied, from its position,
    into a private in-memory file. ``f`` is left at its end."""
    readable = getattr(f, "readable", None)
    if not callable(getattr(f, "read", None)) or (callable(readable) and not readable()):
        raise TypeError(f"load needs a path or a readable binary file object, not {f!r}")
    name = getattr(f, "name", None)
    where = name if isinstance(name, str) else f"<{type(f).__name__}>"
    fd = regular_fd(f) if _plain_file(f) else None
    if fd is not None and f.tell() == 0:
        one = OneFile(os.dup(fd), where)
        f.seek(0, os.SEEK_END)
        return one
    return OneFile(_copy_to_private(f), where)


def _plain_file(f: Any) -> bool:
    """Whether ``f`` reads its descriptor's bytes as they are (an open file, buffered or not),
    unlike e.g. a GzipFile, whose ``fileno`` is the compressed file's."""
    raw = f.raw if isinstance(f, (_pyio.BufferedReader, _pyio.BufferedRandom)) else f
    return isinstance(raw, _pyio.FileIO)


def _copy_to_private(f: Any) -> int:
    """A new private in-memory file (memfd) holding the rest of ``f``."""
    fd = os.memfd_create("ckptguard-load", os.MFD_CLOEXEC)
    try:
        if isinstance(f, _pyio.BytesIO):
            write_all(fd, f.getbuffer()[f.tell() :])
            f.seek(0, os.SEEK_END)
            return fd
        while True:
            chunk = f.read(_COPY)
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise TypeError(f"load needs a binary file object; {f!r} read {type(chunk)}")
            if not chunk:
                return fd
            write_all(fd, memoryview(chunk))
    except BaseException:
        os.close(fd)
        raise
