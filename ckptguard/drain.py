"""Drain: copy committed checkpoints from fast staging storage to durable storage (issue #7).

A multi-level setup saves to a fast, nearby store (node-local NVMe, a burst buffer) and drains
to the durable one (the parallel file system) in the background, as SCR's flush does. A drained
checkpoint follows the commit protocol of docs/format.md section 2 on the destination:

1. only committed checkpoints of SRC are candidates (``Store.list``: a valid manifest);
2. their files (exactly those the manifest names: data files, index.parquet, MANIFEST.json) are
   read relative to the checkpoint directory with O_NOFOLLOW, so a symbolic link or anything
   outside the directory is refused; each data file's header, trailer and footer are checked
   against the index before its bytes are copied;
3. they are written into ``DST/.staging/<name>.<uuid>/`` (``commit.new_staging``: ``gc``
   reclaims a torn drain), in pieces by up to ``jobs`` threads, and each file is fsynced;
   MANIFEST.json comes last, byte for byte (the uuid and ``created`` are the source's);
4. every chunk of the staged copy is verified (``read.verify_checkpoint``). If it fails, the
   source is verified too, to name the side that is damaged: a damaged source raises
   CorruptCheckpointError naming the source file, tensor and chunk; nothing becomes visible;
5. the staging directory is renamed to ``DST/<name>`` and DST fsynced (``commit``'s helper,
   which also does the atomic exchange of ``overwrite``);
6. LATEST of DST moves to the drained checkpoint only if it is newer than the one LATEST names.

"Newer" is a later ``created`` (the commit time in the manifest, which the copy keeps), ties
broken by name: the order of ``Store.list`` and of ``Store.delete``'s LATEST rule. ``step`` is
not used: it may be null, and a restarted or forked run can reuse steps.

Run one drain per destination at a time (LATEST is read, compared and then written).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import TypeVar

from .commit import _rename_into_place, discard_staging, new_staging, remove_replaced, write_latest
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    CheckpointWarning,
    CorruptCheckpointError,
    StoreError,
    brief,
    from_oserror,
)
from .failpoints import failpoint
from .format import manifest
from .format.datafile import FormatError
from .format.layout import INDEX, MANIFEST, check_name
from .format.manifest import CheckpointInfo
from .fsutil import (
    UnsafeFileError,
    fsync_dir,
    makedirs_durably,
    open_regular,
    read_regular,
    write_file_durably,
)
from .io import pwrite_all
from .open import CheckpointReader
from .read import verify_checkpoint
from .store import Store, read_info

__all__ = [
    "DEFAULT_JOBS",
    "MAX_JOBS",
    "DrainConflictError",
    "drain",
    "lustre_tool",
    "on_lustre",
    "stripe_count",
]

log = logging.getLogger(__name__)

DEFAULT_JOBS = 4
"""Files (pieces of files) copied at once by default: like SCR's flush width, enough to keep a
parallel file system busy without overloading it from one node."""
MAX_JOBS = 32
"""``jobs`` is capped here."""
PIECE_BYTES = 64 << 20
"""A file larger than this is copied as several pieces, in parallel."""
BLOCK_BYTES = 8 << 20
"""One read and one write of a piece (each thread holds one such buffer)."""

LUSTRE_SUPER_MAGIC = 0x0BD00BD0
STRIPE_UNIT = 1 << 30
"""One Lustre stripe per started GiB of a data file ..."""
MAX_STRIPES = 16
"""... capped at 16 stripes."""

DrainedCallback = Callable[[CheckpointInfo, int, float], None]
"""Called after each checkpoint is committed in DST: (its info in DST, bytes copied, seconds)."""

_WFLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC

T = TypeVar("T")


class DrainConflictError(CheckpointExistsError):
    """DST already has a checkpoint of that name with another uuid (a different checkpoint)."""

    def __init__(
        self, name: str, src_path: str, src_uuid: str, dst_path: str, dst_uuid: str, more: int = 0
    ) -> None:
        also = f" (and {more} more conflicting name(s))" if more else ""
        super().__init__(
            f"checkpoint {name!r} differs between the stores: {src_path} has uuid {src_uuid}, "
            f"{dst_path} has uuid {dst_uuid}{also}; pass overwrite=True (--overwrite) to replace "
            "the one in the destination"
        )
        self.name = name
        self.src_path = src_path
        self.src_uuid = src_uuid
        self.dst_path = dst_path
        self.dst_uuid = dst_uuid


# ---- Lustre striping -------------------------------------------------------------------------


def stripe_count(size: int) -> int:
    """The stripe count for a data file of ``size`` bytes: one per started GiB, 1 to 16."""
    return max(1, min(MAX_STRIPES, -(-size // STRIPE_UNIT)))


def _statfs_type(path: str) -> int | None:
    """``f_type`` of statfs(2) for ``path``, or None where it cannot be asked."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).statfs
    except (OSError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(512)  # struct statfs is 120 bytes on 64-bit Linux
    if fn(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF  # f_type is the first member


def on_lustre(path: str, lfs: str) -> bool:
    """Whether ``path`` is on Lustre: the statfs magic, else ``lfs getstripe -d PATH`` works."""
    kind = _statfs_type(path)
    if kind is not None:
        return kind == LUSTRE_SUPER_MAGIC
    try:
        done = subprocess.run(
            [lfs, "getstripe", "-d", path],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def lustre_tool(path: str) -> str | None:
    """The ``lfs`` to stripe files under ``path`` with, or None (no lfs, or not Lustre)."""
    lfs = shutil.which("lfs")
    if lfs is None or not on_lustre(path, lfs):
        return None
    return lfs


def _set_stripe(lfs: str, path: str, size: int) -> None:
    """Create ``path`` with a layout for ``size`` bytes; on failure the directory's default."""
    cmd = [lfs, "setstripe", "-c", str(stripe_count(size)), path]
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("%s failed (%s); the directory's default layout is used", " ".join(cmd), e)
        return
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        log.warning("%s failed (%s); the default layout is used", " ".join(cmd), err)


# ---- copying one checkpoint --------------------------------------------------------------------


@dataclass(frozen=True)
class _File:
    name: str
    size: int
    data: bool  # a data file (rank-NNNNN.ckg): checked before copying, striped on Lustre


@dataclass(frozen=True)
class _Piece:
    file: _File
    offset: int
    length: int


def _pieces(files: Iterable[_File]) -> list[_Piece]:
    step = PIECE_BYTES
    return [
        _Piece(f, off, min(step, f.size - off)) for f in files for off in range(0, f.size, step)
    ]


def _parallel(fn: Callable[[T], None], items: Sequence[T], jobs: int) -> None:
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
    futures: list[Future] = []
    try:
        futures = [pool.submit(one, item) for item in items]
        wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


class _Copier:
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

    def _corrupt(self, msg: str, name: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(msg, path=self.rd.path, file=name)

    def _open_source(self, f: _File) -> int:
        """Open a source file safely: in the directory, no link, a regular file of its size."""
        try:
            fd, _ = open_regular(f.name, dir_fd=self.rd.dir_fd, size=f.size)
        except FileNotFoundError:
            raise self.rd.missing("file is missing", f.name) from None
        except UnsafeFileError as e:
            raise self._corrupt(f"{f.name} {e.reason}", f.name) from None
        except OSError as e:
            raise from_oserror(e, os.path.join(self.rd.path, f.name), "cannot read") from None
        return fd

    def prepare(self, f: _File) -> None:
        """Check the source file, create its empty copy (striped on Lustre)."""
        fd = self.rd.open_file(f.name) if f.data else self._open_source(f)
        os.close(fd)  # open_file checked header, trailer and footer against the index
        dest = os.path.join(self.staging, f.name)
        try:
            flags = _WFLAGS | os.O_CREAT | os.O_EXCL
            if self.lfs is not None and f.data:
                _set_stripe(self.lfs, dest, f.size)  # creates the file with its layout
                flags = _WFLAGS | os.O_CREAT  # (or the default layout if setstripe failed)
            os.close(os.open(f.name, flags, 0o644, dir_fd=self.staging_fd))
        except OSError as e:
            raise from_oserror(e, dest, "cannot create") from None

    def copy(self, p: _Piece) -> None:
        src = self._open_source(p.file)
        try:
            try:
                dst = os.open(p.file.name, _WFLAGS, dir_fd=self.staging_fd)
            except OSError as e:
                where = os.path.join(self.staging, p.file.name)
                raise from_oserror(e, where, "cannot open") from None
            try:
                buf = memoryview(bytearray(min(BLOCK_BYTES, p.length)))
                pos, end = p.offset, p.offset + p.length
                while pos < end:
                    want = buf[: min(len(buf), end - pos)]
                    try:
                        n = os.preadv(src, [want], pos)
                    except OSError as e:
                        where = os.path.join(self.rd.path, p.file.name)
                        raise from_oserror(e, where, "cannot read") from None
                    if n == 0:
                        raise self._corrupt("file shrank while draining", p.file.name)
                    try:
                        pwrite_all(dst, [want[:n]], pos)
                    except OSError as e:
                        where = os.path.join(self.staging, p.file.name)
                        raise from_oserror(e, where, "cannot write") from None
                    pos += n
            finally:
                os.close(dst)
        finally:
            os.close(src)
        with self._lock:
            self.copied += p.length
        failpoint("drain.piece_copied")

    def fsync(self, f: _File) -> None:
        path = os.path.join(self.staging, f.name)
        try:
            fd = os.open(f.name, _WFLAGS, dir_fd=self.staging_fd)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise from_oserror(e, path, "cannot fsync") from None

    def copy_manifest(self, uuid: str) -> None:
        """Copy MANIFEST.json byte for byte, last, after checking it is the one opened."""
        try:
            raw = read_regular(
                MANIFEST, dir_fd=self.rd.dir_fd, max_size=manifest.MAX_MANIFEST_BYTES
            )
        except FileNotFoundError:
            raise self.rd.missing("MANIFEST.json is missing", MANIFEST) from None
        except UnsafeFileError as e:
            raise self._corrupt(f"{MANIFEST} {e.reason}", MANIFEST) from None
        except OSError as e:
            raise from_oserror(e, os.path.join(self.rd.path, MANIFEST), "cannot read") from None
        try:
            body = manifest.decode(raw)
        except FormatError as e:
            raise self._corrupt(str(e), MANIFEST) from None
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


def _check_copy(src_path: str, staging: str) -> None:
    """Verify every chunk of the staged copy; on failure, say which side is damaged."""
    report = verify_checkpoint(staging)
    if report.ok:
        return
    source = verify_checkpoint(src_path)
    if not source.ok:
        p = source.problems[0]
        more = f" (and {len(source.problems) - 1} more)" if len(source.problems) > 1 else ""
        raise CorruptCheckpointError(
            f"source checkpoint is damaged, not drained: {p.message}{more}",
            path=src_path,
            file=p.file,
            key=p.key,
            chunk=p.chunk,
            offset=p.offset,
        )
    raise StoreError(
        f"the copy in {staging} does not verify although the source does ({report.problems[0]}): "
        "the destination returned other bytes than were written",
        staging,
    )


def _drain_one(
    info: CheckpointInfo, dst_root: str, jobs: int, overwrite: bool, lfs: str | None
) -> tuple[CheckpointInfo, int]:
    """Copy, verify and commit one checkpoint; return its info in DST and the bytes copied."""
    with CheckpointReader(info.path) as rd:  # manifest and index checked, O_NOFOLLOW
        if rd.manifest["uuid"] != info.uuid:
            raise CheckpointReplacedError(
                f"{info.path} was replaced while being drained", info.path
            )
        files = [_File(f["name"], f["size"], True) for f in rd.manifest["files"]]
        files.append(_File(INDEX, rd.manifest["index"]["size"], False))
        try:
            _, staging = new_staging(dst_root, info.name)
        except OSError as e:
            raise from_oserror(e, dst_root, "cannot create a staging directory in") from None
        committed = False
        try:
            copier = _Copier(rd, staging, lfs)
            try:
                _parallel(copier.prepare, files, jobs)
                _parallel(copier.copy, _pieces(files), jobs)
                _parallel(copier.fsync, files, jobs)
                copier.copy_manifest(info.uuid)
                fsync_dir(staging)
            finally:
                copier.close()
            _check_copy(info.path, staging)
            failpoint("drain.verified")
            final = os.path.join(dst_root, info.name)
            replaced = _rename_into_place(staging, final, overwrite)
            committed = True
        except CheckpointError:
            raise
        except OSError as e:
            raise from_oserror(e, dst_root, "cannot drain into") from None
        finally:
            if not committed:
                with contextlib.suppress(OSError):  # else gc reclaims it; DST is unchanged
                    discard_staging(staging)
    return _after_commit(final, dst_root, replaced), copier.copied


def _after_commit(final: str, dst_root: str, replaced: str | None) -> CheckpointInfo:
    """Make the rename durable, move LATEST, drop a replaced copy. The copy is committed: what
    fails here is a ``CheckpointWarning`` and in the returned info's ``warnings``."""
    late = []
    durable = False
    try:
        fsync_dir(dst_root)
        durable = True
        failpoint("drain.after_rename")
    except OSError as e:
        late.append(
            f"{final} is committed, but fsync of {dst_root} failed ({brief(e)}): "
            "LATEST was not moved"
        )
    out = read_info(final)
    if not late:
        try:
            _advance_latest(Store(dst_root), out)
        except (OSError, CheckpointError) as e:
            late.append(f"{final} is committed, but LATEST was not moved to it ({brief(e)})")
    if replaced is not None:  # the replaced checkpoint now lives in .staging
        late += remove_replaced(replaced, durable)
    for w in late:
        warnings.warn(CheckpointWarning(w), stacklevel=4)
    return replace(out, warnings=tuple(late))


def _advance_latest(dst: Store, info: CheckpointInfo) -> None:
    """Point DST's LATEST at ``info`` if it is newer than what LATEST names (or there is none)."""
    current = dst.latest()
    if current is None or (info.created, info.name) > (current.created, current.name):
        write_latest(dst.root, info.name)


# ---- the API -----------------------------------------------------------------------------------


def _select(
    available: list[CheckpointInfo], names: Sequence[str] | None, root: str
) -> list[CheckpointInfo]:
    if names is None:
        return available
    by_name = {i.name: i for i in available}
    out = []
    for name in dict.fromkeys(names):
        check_name(name)
        if name not in by_name:
            raise CheckpointNotFoundError(f"no committed checkpoint {name!r} in {root}")
        out.append(by_name[name])
    return sorted(out, key=lambda i: (i.created, i.name))


def _in_dst(dst: Store, name: str, overwrite: bool) -> CheckpointInfo | None:
    try:
        return read_info(dst.path(name))
    except CheckpointNotFoundError:
        return None
    except CorruptCheckpointError:
        if overwrite:  # a damaged directory in the way: the drained copy replaces it
            return None
        raise


def drain(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    names: Sequence[str] | None = None,
    jobs: int = DEFAULT_JOBS,
    overwrite: bool = False,
    *,
    stripe: bool = True,
    on_drained: DrainedCallback | None = None,
) -> list[CheckpointInfo]:
    """Copy committed checkpoints of store ``src`` into store ``dst``; return those copied.

    ``names``: the checkpoints to drain (each must be committed in ``src``); None means every
    committed checkpoint of ``src``. Those ``dst`` already holds (same name and uuid) are skipped;
    one with the same name and another uuid is a DrainConflictError (nothing is copied) unless
    ``overwrite``, which replaces it atomically. Checkpoints are drained oldest first, each
    verified chunk by chunk in ``dst`` before it becomes visible; LATEST of ``dst`` moves to the
    newest of them if it is newer (later ``created``) than the one it names, also for a skipped
    one (so a drain interrupted after its rename is completed by the next). ``jobs`` threads
    (capped at MAX_JOBS) copy files; on Lustre each data file is striped first (``stripe_count``)
    unless ``stripe`` is False. ``dst`` is created if missing.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, not {jobs!r}")
    jobs = min(jobs, MAX_JOBS)
    if isinstance(names, str):
        names = [names]
    src_store = Store(src)
    dst_root = os.path.abspath(os.fspath(dst))
    if os.path.realpath(src_store.root) == os.path.realpath(dst_root):
        raise StoreError(f"source and destination are the same store: {dst_root}", dst_root)
    todo = _select(src_store.list(), names, src_store.root)
    try:
        makedirs_durably(dst_root)
    except OSError as e:
        raise from_oserror(e, dst_root, "cannot create the store") from None
    dst_store = Store(dst_root)
    dst_store.latest()  # a damaged LATEST: say so before copying anything

    plan: list[tuple[CheckpointInfo, CheckpointInfo | None]] = []  # (source, already in DST)
    conflicts = []
    for info in todo:
        have = _in_dst(dst_store, info.name, overwrite)
        if have is not None and have.uuid != info.uuid:
            if not overwrite:
                conflicts.append((info, have))
                continue
            have = None
        plan.append((info, have))
    if conflicts:
        info, have = conflicts[0]
        raise DrainConflictError(
            info.name, info.path, info.uuid, have.path, have.uuid, more=len(conflicts) - 1
        )

    lfs = lustre_tool(dst_root) if stripe and any(h is None for _, h in plan) else None
    drained = []
    for info, have in plan:
        if have is not None:
            _advance_latest(dst_store, have)
            continue
        t0 = time.monotonic()
        out, nbytes = _drain_one(info, dst_root, jobs, overwrite, lfs)
        drained.append(out)
        if on_drained is not None:
            on_drained(out, nbytes, time.monotonic() - t0)
    return drained
