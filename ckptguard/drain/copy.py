"""The parallel copy of one committed checkpoint into a staging directory of another store.

Exactly the files the manifest names are copied, read relative to the opened checkpoint
directory with O_NOFOLLOW; each data file's header, trailer and footer are checked against the
index before its bytes are copied. Files larger than ``PIECE_BYTES`` are copied as several pieces
by up to ``jobs`` threads; every file is fsynced, and MANIFEST.json comes last, byte for byte,
after SIGNATURE.json where the checkpoint is signed (so the signature stays valid in the copy).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

from ..errors import CheckpointReplacedError, from_oserror
from ..failpoints import failpoint
from ..format.layout import INDEX, MANIFEST, SIGNATURE, file_rank, linked_file
from ..fsutil import UnsafeFileError, fsync_dir, open_regular, read_manifest, write_file_durably
from ..io import pwrite_all
from ..keys import PrivateKey
from ..open import CheckpointReader
from ..sign import copy_signature, write_signature
from .lustre import set_stripe

__all__ = [
    "BLOCK_BYTES",
    "PIECE_BYTES",
    "CheckpointCopier",
    "SourceFile",
    "copy_checkpoint",
    "copy_files",
    "held_files",
]


PIECE_BYTES = 64 << 20
"""A file larger than this is copied as several pieces, in parallel."""
BLOCK_BYTES = 8 << 20
"""One read and one write of a piece (each thread holds one such buffer)."""

_WFLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC

T = TypeVar("T")

Held = dict[tuple[str, int], str]
"""The data files of a store by who wrote them, (writer's checkpoint uuid, rank) -> a path."""


def data_file_identity(name: str, uuid_hex: str) -> tuple[int, str]:
    """(rank, uuid of the checkpoint whose save wrote it) of data file ``name`` of the
    checkpoint ``uuid_hex``: its own file, or a linked one (format.md section 4.3)."""
    linked = linked_file(name)
    return linked if linked is not None else (int(name[5:-4]), uuid_hex)


def held_files(infos: Iterable[tuple[str, str]]) -> Held:
    """``Held`` of the checkpoints ``(path, uuid)`` of a store, from their directories."""
    out: Held = {}
    for path, uuid_hex in infos:
        try:
            names = os.listdir(path)
        except OSError:
            continue
        for name in names:
            if file_rank(name) is not None:
                rank, holder = data_file_identity(name, uuid_hex)
                out.setdefault((holder, rank), os.path.join(path, name))
    return out


@dataclass(frozen=True)
class SourceFile:
    """A file of the source checkpoint, as its manifest names it."""

    name: str
    size: int
    data: bool  # a data file (rank-NNNNN.ckg): checked before copying, striped on Lustre


@dataclass(frozen=True)
class Piece:
    """A byte range of a file that one thread copies."""

    file: SourceFile
    offset: int
    length: int


def pieces(files: Iterable[SourceFile]) -> list[Piece]:
    """Every file cut into pieces of at most ``PIECE_BYTES`` (an empty file has none)."""
    step = PIECE_BYTES
    return [Piece(f, off, min(step, f.size - off)) for f in files for off in range(0, f.size, step)]


def parallel(fn: Callable[[T], None], items: Sequence[T], jobs: int) -> None:
    """``fn`` on every item with up to ``jobs`` threads; the first error stops the rest."""
    if jobs <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    stop = threading.Event()

    def one(item: T) -> None:
        if not stop.is_set():
            fn(item)

    pool = ThreadPoolExecutor(min(jobs, len(items)), thread_name_prefix="ckptguard-drain")
    futures: list[Future[None]] = []
    try:
        futures = [pool.submit(one, item) for item in items]
        wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and not f.cancelled():
                error = f.exception()
                if error is not None:
                    raise error
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


class CheckpointCopier:
    """Copies the files of one open source checkpoint into one staging directory."""

    def __init__(self, rd: CheckpointReader, staging: str, lfs: str | None) -> None:
        self.rd = rd
        self.staging = staging
        self.lfs = lfs
        self.staging_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.copied = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        if self.staging_fd >= 0:
            os.close(self.staging_fd)
            self.staging_fd = -1

    def _open_source(self, f: SourceFile) -> int:
        """Open a source file safely: in the directory, no link, a regular file of its size."""
        return self.rd.open_member(f.name, f.size, f.name)

    def _open_copy(self, name: str) -> int:
        try:
            return os.open(name, _WFLAGS, dir_fd=self.staging_fd)
        except OSError as e:
            raise from_oserror(e, os.path.join(self.staging, name), "cannot open") from None

    def link_held(self, f: SourceFile, held: Held) -> bool:
        """Link the copy of data file ``f`` to the file of the destination store that holds
        the same bytes (the same writer's data file: ``held``), instead of copying it; False
        where there is none, or it cannot be linked or is not a regular file of the size. The
        copy's verification then reads it like every copied file."""
        rank, holder = data_file_identity(f.name, self.rd.manifest["uuid"])
        where = held.get((holder, rank))
        if where is None:
            return False
        fd = self.rd.open_file(f.name)  # the source is checked as when it is copied
        os.close(fd)
        try:
            os.link(where, os.path.join(self.staging, f.name), follow_symlinks=False)
        except OSError:
            return False  # deleted meanwhile, another file system, no hard links: copy it
        try:
            fd, _ = open_regular(f.name, dir_fd=self.staging_fd, size=f.size)
            os.close(fd)
        except (OSError, UnsafeFileError):
            with contextlib.suppress(OSError):
                os.unlink(f.name, dir_fd=self.staging_fd)
            return False
        return True

    def prepare(self, f: SourceFile) -> None:
        """Check the source file, create its empty copy (striped on Lustre)."""
        fd = self.rd.open_file(f.name) if f.data else self._open_source(f)
        os.close(fd)  # open_file checked header, trailer and footer against the index
        dest = os.path.join(self.staging, f.name)
        try:
            flags = _WFLAGS | os.O_CREAT | os.O_EXCL
            if self.lfs is not None and f.data:
                set_stripe(self.lfs, dest, f.size)  # creates the file with its layout
                flags = _WFLAGS | os.O_CREAT  # (or the default layout if setstripe failed)
            os.close(os.open(f.name, flags, 0o644, dir_fd=self.staging_fd))
        except OSError as e:
            raise from_oserror(e, dest, "cannot create") from None

    def copy(self, p: Piece) -> None:
        """Copy one piece, a block at a time, at the same offsets in the copy."""
        src = self._open_source(p.file)
        try:
            dst = self._open_copy(p.file.name)
            try:
                self._copy_range(src, dst, p)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        with self._lock:
            self.copied += p.length
        failpoint("drain.piece_copied")

    def _copy_range(self, src: int, dst: int, p: Piece) -> None:
        buf = memoryview(bytearray(min(BLOCK_BYTES, p.length)))
        pos, end = p.offset, p.offset + p.length
        while pos < end:
            want = buf[: min(len(buf), end - pos)]
            try:
                n = os.preadv(src, [want], pos)
            except OSError as e:
                raise self.rd.io_error(e, p.file.name) from None
            if n == 0:
                raise self.rd.corrupt("file shrank while draining", file=p.file.name)
            try:
                pwrite_all(dst, [want[:n]], pos)
            except OSError as e:
                where = os.path.join(self.staging, p.file.name)
                raise from_oserror(e, where, "cannot write") from None
            pos += n

    def fsync(self, f: SourceFile) -> None:
        try:
            fd = os.open(f.name, _WFLAGS, dir_fd=self.staging_fd)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise from_oserror(e, os.path.join(self.staging, f.name), "cannot fsync") from None

    def copy_signature(self) -> bool:
        """Copy SIGNATURE.json byte for byte, if there is one (whether there was): it must be a
        well-formed signature of the manifest opened (whose key is not checked here)."""
        where = os.path.join(self.staging, SIGNATURE)
        try:
            n = copy_signature(self.rd.dir_fd, self.staging, self.rd.manifest_raw)
            self.copied += n
            return n > 0
        except (ValueError, UnsafeFileError) as e:
            raise self.rd.corrupt(
                f"{SIGNATURE} is not a signature of this checkpoint: {e}", file=SIGNATURE
            ) from None
        except OSError as e:
            raise from_oserror(e, where, "cannot copy") from None

    def copy_manifest(self, uuid: str) -> None:
        """Copy MANIFEST.json byte for byte, last, after checking it is the one opened."""
        try:
            raw, body = read_manifest(self.rd.path, dir_fd=self.rd.dir_fd)
        except FileNotFoundError:
            raise self.rd.missing("MANIFEST.json is missing", MANIFEST) from None
        if body["uuid"] != uuid or body != self.rd.manifest:
            raise CheckpointReplacedError(
                f"{self.rd.path} was replaced while being drained (its manifest changed)",
                self.rd.path,
            )
        try:
            write_file_durably(os.path.join(self.staging, MANIFEST), raw)
        except OSError as e:
            raise from_oserror(e, os.path.join(self.staging, MANIFEST), "cannot write") from None
        self.copied += len(raw)


def copy_files(copier: CheckpointCopier, files: list[SourceFile], jobs: int) -> None:
    """Copy ``files`` of the copier's checkpoint into its staging directory with ``jobs``
    threads: each checked and created, copied in pieces, fsynced."""
    parallel(copier.prepare, files, jobs)
    parallel(copier.copy, pieces(files), jobs)
    parallel(copier.fsync, files, jobs)


def copy_checkpoint(
    rd: CheckpointReader,
    staging: str,
    lfs: str | None,
    jobs: int,
    signer: PrivateKey | None = None,
    held: Held | None = None,
) -> int:
    """Copy every file of the open checkpoint ``rd`` into ``staging`` and make them durable,
    MANIFEST.json last; return the bytes copied. ``lfs``: stripe data files with it (Lustre).
    ``signer``: sign the copy where the checkpoint is not signed already (a signed one keeps
    the signature it has). ``held``: the data files the destination store holds already
    (``held_files``), linked instead of copied (an incremental checkpoint's shared data)."""
    m = rd.manifest
    files = [SourceFile(f["name"], f["size"], True) for f in m["files"]]
    copier = CheckpointCopier(rd, staging, lfs)
    try:
        if held:
            files = [f for f in files if not copier.link_held(f, held)]
        files.append(SourceFile(INDEX, m["index"]["size"], False))
        copy_files(copier, files, jobs)
        if not copier.copy_signature() and signer is not None:
            write_signature(staging, signer, rd.manifest_raw, m)
        copier.copy_manifest(m["uuid"])
        fsync_dir(staging)
    finally:
        copier.close()
    return copier.copied
