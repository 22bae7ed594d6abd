"""Open one committed checkpoint: every size, offset and hash checked before use (I5, I6).

Files are opened relative to the checkpoint directory opened once (``dir_fd``), by names the
format allows, with ``fsutil.open_regular`` (no link followed, no blocking open, a regular file of
a plausible size), so nothing outside the directory is ever read. Bytes that are wrong raise
CorruptCheckpointError; bytes that cannot be read (permission denied, EIO, ...) raise the
StoreError of ``errors.from_oserror`` with the file's path (and its name as ``file``): the
checkpoint may well be intact. A file missing from a directory that is no longer the one at the
path (an overwrite or delete of the name raced the read) raises CheckpointReplacedError: that is
not damage either.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import keyring, sign
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    CorruptCheckpointError,
    KeyUnavailableError,
    StoreError,
)
from .filecheck import check_data_file, check_linked_rows, check_reopened
from .format import index
from .format.datafile import (
    FormatError,
)
from .format.encryption import key_scopes
from .format.index import Row
from .format.layout import MANIFEST, datafile_rank, linked_file
from .format.locator import LOCATOR, Cells, check_footer, locatable, wanted
from .fsutil import (
    UnsafeFileError,
    check_regular,
    decode_manifest,
    member_error,
    open_regular,
    read_manifest,
)
from .indexread import (
    check_cells,
    check_totals,
    decode_index,
    empty_table,
    located_rows,
    read_index,
)
from .kek import Kek, resolve_kek
from .onefile import Members, OneFile
from .seal import RowId, Scope
from .sign import Signed, TrustSet

_KEK: contextvars.ContextVar[Kek | str | os.PathLike | None] = contextvars.ContextVar(
    "ckptguard_kek", default=None
)


@contextlib.contextmanager
def using_kek(kek: Kek | str | os.PathLike | None) -> Iterator[None]:
    """Readers opened inside take ``kek`` (a ``Kek`` or a key file's path) to unwrap the data
    keys of sealed chunks, instead of the environment's (``load(kek=...)``)."""
    token = _KEK.set(kek)
    try:
        yield
    finally:
        _KEK.reset(token)


KEPT_OPEN = 64
"""Data files a located reader keeps open between reading their footers and their records."""


@dataclass(frozen=True)
class Shared:
    """A checkpoint's MANIFEST.json and index.parquet bytes, read and checked by rank 0 of a
    job (``sharedopen``), and the inode number of its directory there (the same on every node
    of a parallel file system)."""

    manifest_raw: bytes
    index_raw: bytes
    ino: int
    located: bool = False
    """Rank 0 opened it to use the locator (``index_raw`` empty): so does this rank."""


class CheckpointReader:
    """An open checkpoint: manifest and index validated on open; data files opened and checked
    whole (header, trailer, footer against the index) on demand.

    ``path`` is a checkpoint directory or a one-file checkpoint (docs/format.md section 10), or
    ``Members`` already open (a file object's ``OneFile``, a checkpoint in an object store);
    ``one`` is those members, if it is not a directory: they stand in for its files. Under
    ``trust`` (trusted public keys) the signature is checked against the manifest bytes read
    (``sign.check``) before the index is read: ``signed`` says who signed; SignatureError if
    it does not verify."""

    def __init__(
        self,
        path: str | os.PathLike | Members,
        trust: TrustSet | None = None,
        *,
        shared: Shared | None = None,
        keep_bytes: bool = False,
        located: bool = False,
    ) -> None:
        self.one: Members | None = None
        self.index_raw: bytes | None = None
        """index.parquet's bytes, kept only with ``keep_bytes`` (to send them to other ranks)."""
        self.located = False
        """Whether rows come from the footers of the files ``locate`` names, not the index
        (format.md 4.5; asked for with ``located`` where every tensor with rows has a grid)."""
        self.trailers: dict[str, bytes] = {}
        """The trailer of each data file whose rows came from its footer (``indexread``)."""
        self._kept: dict[str, int] = {}  # descriptors of files ``locate`` opened (``keep_open``)
        self.dir_fd = -1
        if not isinstance(path, (str, os.PathLike)):
            self.one, self.path = path, path.path
        else:
            self.path = os.path.abspath(os.fspath(path))
            self._open_dir()
        self._by_file: dict[str, list[Row]] = {}
        self._file_tables: dict[str, pa.Table] = {}  # each file's index rows, in footer order
        self._seq: dict[str, dict[int, int]] = {}  # file -> record offset -> sequence number
        self._all: list[Row] | None = None
        self.signed: Signed | None = None
        self.kek: Kek | str | os.PathLike | None = _KEK.get()
        """The key-encryption key that unwraps sealed chunks' data keys (None: from the
        environment, on first need); set it before reading."""
        self._scopes: dict[str, Scope | KeyUnavailableError] = {}
        self._records: dict[str, dict[int, list[Row]]] = {}  # packed records' rows
        try:
            if shared is not None:
                self._from_shared(shared)
                return
            self.manifest_raw, self.manifest = _read_manifest(self)
            self.features = set(self.manifest["features"])
            if self.one is not None and "encryption" in self.features:
                raise self.corrupt(f"{self.one.kind} has no keyring for sealed chunks")
            if trust is not None:
                fd = None if self.one is not None else self.dir_fd
                fetch = None if self.one is None else self.one.signature
                self.signed = sign.check(
                    self.path, fd, self.manifest_raw, self.manifest, trust, fetch
                )
            self.tensors: list[dict] = self.manifest["tensors"]
            self.files: dict[str, int] = {f["name"]: f["size"] for f in self.manifest["files"]}
            if located and self.one is None and locatable(self.manifest):
                self._start_located()
                return
            self.table = read_index(self, keep_bytes)
            check_totals(self)
        except BaseException:
            self.close()
            raise

    def _from_shared(self, shared: Shared) -> None:
        """Take the manifest and index another rank of the job read and checked whole
        (``sharedopen``), for the directory opened here if it is the one that rank read. Their
        hashes are checked again, so bytes damaged in transit are caught; the rules of section
        4 are not (that rank checked them on the same bytes)."""
        if self.one is not None or self._identity[1] != shared.ino:
            raise CheckpointReplacedError(
                f"{self.path} is not the checkpoint directory rank 0 read: it was replaced or "
                "removed meanwhile; load it again",
                self.path,
            )
        self.manifest_raw = shared.manifest_raw
        self.manifest = decode_manifest(shared.manifest_raw, self.path)
        self.features = set(self.manifest["features"])
        self.tensors = self.manifest["tensors"]
        self.files = {f["name"]: f["size"] for f in self.manifest["files"]}
        if shared.located:
            if not locatable(self.manifest):
                raise self.corrupt("rank 0 sent a manifest without a locator", file=MANIFEST)
            self._start_located()
            return
        self.table = decode_index(self, shared.index_raw)

    def _start_located(self) -> None:
        self.located = True
        self._cells = Cells(self.manifest["locator"])
        self._read: set[str] = set()
        self.table = empty_table(self.features)

    def locate(self, boxes: Mapping[int, tuple[Sequence[int], Sequence[int]]]) -> None:
        """Where the reader is ``located``: add the rows of every data file holding a part of
        these boxes (tensor id: offsets, lengths), each file read and checked once, and check
        that they hold every part (``indexread``). A load calls it before it selects."""
        if not self.located:
            return
        files, cells = wanted(self._cells, self.tensors, boxes)
        names = [self.manifest["files"][i]["name"] for i in sorted(files)]
        new = [n for n in names if n not in self._read]
        if new:
            self.table = pa.concat_tables([self.table, located_rows(self, self._cells, new)])
            self._read.update(new)
            self._all = None
        check_cells(self, cells)

    def _open_dir(self) -> None:
        """Open the checkpoint directory, or the one-file checkpoint at the path."""
        try:
            self.dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except NotADirectoryError:  # a file (or a link, FIFO, ...): OneFile says what it is
            self.one = OneFile.open(self.path)
            return
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no checkpoint at {self.path}") from None
        except OSError as e:  # EACCES on the directory: the checkpoint cannot be read
            raise StoreError(
                f"cannot open checkpoint {self.path}: {e.strerror}", self.path, e.errno
            ) from None
        st = os.fstat(self.dir_fd)
        self._identity = (st.st_dev, st.st_ino)

    @property
    def rows(self) -> list[Row]:
        """Every chunk row (built on first use; loads select theirs with ``select.rows_for``)."""
        if self._all is None:
            self._all = index.rows_from_table(self.table)
        return self._all

    def rows_of_tensors(self, ids: list[int]) -> list[Row]:
        """The rows of these tensors only."""
        mask = pc.is_in(self.table.column("tensor"), value_set=pa.array(ids, pa.int32()))
        return index.rows_from_table(self.table.filter(mask))

    def file_table(self, name: str) -> pa.Table:
        """One data file's index rows in offset order (the rows of a packed record by where
        their bytes start in it), as a table; in a checkpoint's own file the distinct offsets in
        that order are the records' sequence numbers (a linked file's come from its footer,
        read by ``open_file``)."""
        if name not in self._file_tables:
            sub = self.table.filter(pc.equal(self.table.column("file"), name))
            order = [("offset", "ascending")]
            if index.is_packed(sub):
                order.append(("record_byte_offset", "ascending"))
            sub = sub.sort_by(order)
            self._file_tables[name] = sub
            if linked_file(name) is None:
                starts = np.unique(sub.column("offset").to_numpy())
                self._seq[name] = dict(zip(starts.tolist(), range(len(starts)), strict=True))
        return self._file_tables[name]

    def rows_of_file(self, name: str) -> list[Row]:
        """``file_table(name)`` as rows (built on first use: a load reads the table)."""
        if name not in self._by_file:
            self._by_file[name] = index.rows_from_table(self.file_table(name))
        return self._by_file[name]

    def seq(self, r: Row) -> int:
        """The record sequence number of row ``r`` in its file (of a linked data file, its
        position among the file's footer records: the file is opened and checked for it)."""
        if r.file not in self._seq:
            if linked_file(r.file) is not None:
                os.close(self.open_file(r.file))
            else:
                self.file_table(r.file)
        return self._seq[r.file][r.offset]

    @property
    def key_scopes(self) -> dict[str, str]:
        """The scope of each data key that seals chunks of this checkpoint (format.md 4.4)."""
        return key_scopes(self.manifest)

    def scope(self, key_id: str) -> Scope:
        """Data key ``key_id``, unwrapped from the keyring of the store holding this checkpoint
        (once; a failure is remembered too). KeyUnavailableError or ScopeShreddedError names the
        scope."""
        got = self._scopes.get(key_id)
        if got is None:
            name = self.key_scopes[key_id]
            try:
                if self.one is not None:
                    raise KeyUnavailableError(f"{self.one.kind} has no keyring", name, key_id)
                store = os.path.dirname(self.path)
                if not isinstance(self.kek, Kek):  # once per reader: a KEK command runs once
                    self.kek = resolve_kek(self.kek)
                dk = keyring.unwrap(store, name, key_id, self.kek)
                got = Scope(dk.key_id, name, dk.key)
            except KeyUnavailableError as e:
                got = e
            self._scopes[key_id] = got
        if isinstance(got, KeyUnavailableError):
            raise got
        return got

    def owner(self, name: str) -> tuple[str, int]:
        """The checkpoint uuid and rank in data file ``name``'s header (a linked file's are its
        holder's)."""
        linked = linked_file(name)
        if linked is not None:
            return linked[1], linked[0]
        return self.manifest["uuid"], datafile_rank(name) or 0

    def record_rows(self, r: Row) -> list[RowId]:
        """Every row of row ``r``'s record, as a sealed record's associated data names them."""
        if r.record_byte_offset == 0 and r.record_raw_len == r.raw_len:
            rows = [r]
        else:
            by_offset = self._records.get(r.file)
            if by_offset is None:
                by_offset = self._records[r.file] = {}
                for x in self.rows_of_file(r.file):
                    by_offset.setdefault(x.offset, []).append(x)
            rows = by_offset[r.offset]
        return [
            RowId(
                x.record_byte_offset,
                x.raw_len,
                x.chunk,
                x.shard_byte_offset,
                x.shard_offsets,
                x.key,
            )
            for x in rows
        ]

    def corrupt(self, msg: str, **where: object) -> CorruptCheckpointError:
        return CorruptCheckpointError(msg, path=self.path, **where)  # type: ignore[arg-type]

    def io_error(self, e: OSError, name: str, action: str = "cannot read") -> StoreError:
        """The typed error of an OSError on file ``name`` of this checkpoint (not corruption:
        its bytes could not be read); ``path`` is the file's, ``file`` its name."""
        return member_error(e, self.path, name, action)

    def replaced(self) -> bool:
        """Whether the path no longer leads to the directory this reader opened (an overwrite
        renamed another into place, or the checkpoint was deleted). A one-file checkpoint is
        read through the one descriptor opened: never."""
        if self.one is not None:
            return False
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:
            return False  # cannot tell: the missing file is taken at its word
        return (st.st_dev, st.st_ino) != self._identity

    def missing(self, msg: str, name: str) -> CheckpointError:
        """The error for file ``name`` not found in the directory opened: CheckpointReplacedError
        if that directory was replaced or removed meanwhile (its files go with it), else the
        corruption ``msg``."""
        if self.replaced():
            return CheckpointReplacedError(
                f"{self.path} was replaced or removed while being read ({name} went away with "
                "the directory opened): not damage; read it again",
                self.path,
            )
        return self.corrupt(msg, file=name)

    def check_sizes(self, names: set[str] | list[str]) -> None:
        """Check that these data files exist as regular files of the manifest's size (one stat
        each, no open): a load calls it before allocating what the files are to fill, so that a
        manifest cannot make it allocate more than the files on disk can back."""
        if self.one is not None:  # a one-file checkpoint's were checked against it on open
            for name in sorted(names):
                got, want = self.one.member_size(name), self.files[name]
                if got is None:
                    raise self.corrupt(f"data file is not in {self.one.kind}", file=name)
                if got != want:
                    raise self.corrupt(
                        f"data file has {got} bytes in {self.one.kind}, {want} expected", file=name
                    )
            return
        for name in sorted(names):
            try:
                st = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise self.missing("data file is missing", name) from None
            except OSError as e:
                raise self.io_error(e, name, "cannot stat") from None
            try:
                check_regular(st, size=self.files[name])
            except UnsafeFileError as e:
                raise self.corrupt(f"data file {e.reason}", file=name) from None

    def open_member(self, name: str, size: int, what: str) -> int:
        """Open file ``name`` of this checkpoint, a regular file of ``size`` bytes, with
        ``fsutil.open_regular``; return its fd. ``what`` names the file in the errors: missing
        (``missing``), not a regular file of that size (corrupt), unreadable (``io_error``)."""
        if self.one is not None:
            return self.one.data_fd(name, size, what)
        try:
            fd, _ = open_regular(name, dir_fd=self.dir_fd, size=size)
        except FileNotFoundError:
            raise self.missing(f"{what} is missing", name) from None
        except UnsafeFileError as e:  # a link, FIFO, device, directory, or the wrong size
            raise self.corrupt(f"{what} {e.reason}", file=name) from None
        except OSError as e:
            raise self.io_error(e, name, "cannot open") from None
        return fd

    def keep_open(self, name: str, fd: int) -> bool:
        """Keep ``fd``, data file ``name`` opened and checked by ``locate``, for ``open_file``
        to hand out (one open per file and load); False past ``KEPT_OPEN`` of them (the
        caller closes it: a tensor loaded whole from 10,000 files must not hold 10,000
        descriptors)."""
        if len(self._kept) >= KEPT_OPEN:
            return False
        self._kept[name] = fd
        return True

    def open_file(self, name: str) -> int:
        """Open and check one data file (header, trailer, footer vs index); return its fd."""
        kept = self._kept.pop(name, None)
        if kept is not None:
            return kept
        fd = self.open_member(name, self.files[name], "data file")
        try:
            self._check_data_file(fd, name)
        except FormatError as e:
            os.close(fd)
            raise self.corrupt(str(e), file=name) from None
        except OSError as e:
            os.close(fd)
            raise self.io_error(e, name) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_data_file(self, fd: int, name: str) -> None:
        """``filecheck.check_data_file`` against this checkpoint's index rows of ``name``; a
        linked file's footer (format.md 4.3) also gives its records' sequence numbers; a file
        whose footer ``locate`` read and checked, only its header and that trailer again."""
        link = linked_file(name)
        uuid = self.manifest["uuid"]
        if name in self.trailers:  # footer and rows checked by ``locate``
            check_reopened(fd, self.files[name], int(name[5:-4]), uuid, self.trailers[name])
        elif link is None:
            check_data_file(
                fd,
                self.files[name],
                int(name[5:-4]),
                uuid,
                self.file_table(name),
                lambda: self.rows_of_file(name),
                self._footer_check(name),
            )
        else:
            digests = index.DIGESTS in self.features
            rows = self.rows_of_file(name)
            self._seq[name] = check_linked_rows(fd, self.files[name], *link, rows, digests)

    def _footer_check(self, name: str) -> Callable[[bytes], None] | None:
        """The check of data file ``name``'s footer against the locator's hashes, if the
        checkpoint has one (section 4.5)."""
        if LOCATOR not in self.features:
            return None
        return functools.partial(check_footer, self.manifest["locator"], self.positions[name])

    @functools.cached_property
    def positions(self) -> dict[str, int]:
        """Each data file's position in the manifest's ``files``."""
        return {f["name"]: i for i, f in enumerate(self.manifest["files"])}

    def close(self) -> None:
        for fd in self._kept.values():
            os.close(fd)
        self._kept.clear()
        if self.one is not None:
            self.one.close()
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_manifest(rd: CheckpointReader) -> tuple[bytes, dict]:
    """MANIFEST.json's bytes (empty for a one-file checkpoint's) and its checked body."""
    if rd.one is not None:
        body = rd.one.manifest()
        return rd.one.manifest_raw, body
    try:
        return read_manifest(rd.path, dir_fd=rd.dir_fd)
    except FileNotFoundError:
        raise rd.missing("MANIFEST.json is missing: not a committed checkpoint", MANIFEST) from None
