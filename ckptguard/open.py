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
import hashlib
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from . import keyring, sign
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    CorruptCheckpointError,
    KeyUnavailableError,
    StoreError,
)
from .filecheck import check_linked
from .format import index, manifest
from .format.datafile import (
    HEADER_SIZE,
    RECORD_HEADER_SIZE,
    TRAILER_SIZE,
    FormatError,
    check_file_header,
    check_footer,
    check_footer_hash,
    unpack_trailer,
)
from .format.encryption import key_scopes
from .format.index import Row, row_from_json
from .format.layout import INDEX, MANIFEST, align, datafile_rank, linked_file
from .format.validate import check_table
from .fsutil import (
    UnsafeFileError,
    check_regular,
    member_error,
    open_regular,
    read_manifest,
    read_member,
)
from .io import pread_exact
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


class CheckpointReader:
    """An open checkpoint: manifest and index validated on open; data files opened and checked
    whole (header, trailer, footer against the index) on demand.

    ``path`` is a checkpoint directory or a one-file checkpoint (docs/format.md section 10), or
    ``Members`` already open (a file object's ``OneFile``, a checkpoint in an object store);
    ``one`` is those members, if it is not a directory: they stand in for its files. Under
    ``trust`` (trusted public keys) the signature is checked against the manifest bytes read
    (``sign.check``) before the index is read: ``signed`` says who signed; SignatureError if
    it does not verify."""

    def __init__(self, path: str | os.PathLike | Members, trust: TrustSet | None = None) -> None:
        self.one: Members | None = None
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
            self.table = _read_index(self)
            _check_totals(self)
        except BaseException:
            self.close()
            raise

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

    def open_file(self, name: str) -> int:
        """Open and check one data file (header, trailer, footer vs index); return its fd."""
        fd = self.open_member(name, self.files[name], "data file")
        try:
            _check_data_file(self, fd, name)
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

    def close(self) -> None:
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


def _read_index(rd: CheckpointReader) -> pa.Table:
    """The index table, checked against its hash in the manifest and validated."""
    m = rd.manifest
    try:
        if rd.one is not None:
            data = rd.one.index(m["index"]["size"])
        else:
            data = read_member(rd.path, INDEX, dir_fd=rd.dir_fd, size=m["index"]["size"])
    except FileNotFoundError:
        raise rd.missing("index.parquet is missing", INDEX) from None
    if xxhash.xxh3_128_hexdigest(data) != m["index"]["xxh3_128"]:
        raise rd.corrupt("index.parquet does not match the hash in the manifest", file=INDEX)
    if "sha256" in m["index"] and hashlib.sha256(data).hexdigest() != m["index"]["sha256"]:
        raise rd.corrupt("index.parquet does not match the SHA-256 in the manifest", file=INDEX)
    try:
        table = index.read_table(data)
        check_table(table, rd.tensors, rd.files, rd.features)
        used = set(pc.unique(table.column("key_id")).to_pylist()) - {None}
        if not used <= set(key_scopes(m)):
            raise FormatError("index: a key_id that the manifest's encryption member lacks")
    except FormatError as e:
        raise rd.corrupt(str(e), file=INDEX) from None
    return table


def _check_totals(rd: CheckpointReader) -> None:
    """The manifest's totals and file entries agree with the index."""
    m, t = rd.manifest, rd.table
    if manifest.totals(t, len(rd.tensors), len(rd.files)) != m["totals"]:
        raise rd.corrupt("manifest totals disagree with the index", file=MANIFEST)
    counts = dict.fromkeys(rd.files, 0)
    for item in pc.value_counts(t.column("file").combine_chunks()).to_pylist():
        counts[item["values"]] = item["counts"]
    for f in m["files"]:  # validation already tied every row's file to its rank
        if counts[f["name"]] != f["chunks"]:
            raise rd.corrupt("manifest file entry disagrees with the index", file=f["name"])
        if f["rank"] >= m["world_size"]:
            raise rd.corrupt("data file of a rank beyond world_size", file=f["name"])


def _check_data_file(rd: CheckpointReader, fd: int, name: str) -> None:
    """Check an open data file's header, trailer and footer against the index, and that its
    records follow each other from the header to the footer. Raises FormatError."""
    size = rd.files[name]  # open_regular checked it is a regular file of this size
    if size < HEADER_SIZE + TRAILER_SIZE:
        raise FormatError("data file is too short")
    link = linked_file(name)
    if link is not None:
        _check_linked_file(rd, fd, name, *link)
        return
    rank, uuid = int(name[5:-4]), rd.manifest["uuid"]
    check_file_header(pread_exact(fd, HEADER_SIZE, 0), rank, uuid)
    off, length, digest = unpack_trailer(pread_exact(fd, TRAILER_SIZE, size - TRAILER_SIZE), size)
    footer = pread_exact(fd, length, off)
    sub = rd.file_table(name)
    offs = sub.column("offset").to_numpy()
    packed = index.is_packed(sub) and bool(
        pc.any(pc.not_equal(sub.column("record_raw_len"), sub.column("raw_len"))).as_py()
    )
    # The footer this writer makes of the index's rows: equal bytes (with the hash below)
    # settle it without parsing 10,000s of JSON rows; any other footer is parsed and compared.
    if footer != index.footer(rank, uuid, sub, packed):
        rows = check_footer(footer, digest, rank, uuid)
        if [row_from_json(x) for x in rows] != rd.rows_of_file(name):
            raise FormatError("footer rows disagree with the index")
        if any(len(x) != len(index.names_of(packed, index.has_digests(sub))) for x in rows):
            raise FormatError("footer rows have the packed-record members exactly if packed")
    else:
        check_footer_hash(footer, digest)
    # Records follow each other from the header to the footer (each record once: the other
    # slices of a packed record share its offset, and validation checked the slices).
    first = np.ones(len(offs), dtype=bool)
    first[1:] = offs[1:] != offs[:-1]
    starts = offs[first].astype(np.int64)
    ends = np.asarray(
        align(starts + RECORD_HEADER_SIZE + sub.column("stored_len").to_numpy()[first])
    )
    follows = np.concatenate([[HEADER_SIZE], ends])[:-1]
    bad = np.flatnonzero(starts != follows)
    if len(bad):
        k = int(bad[0])
        raise FormatError(
            f"record at {int(starts[k])} does not follow the previous one at {int(follows[k])}"
        )
    if off != (int(ends[-1]) if len(ends) else HEADER_SIZE):
        raise FormatError("the footer does not follow the last record")


def _check_linked_file(rd: CheckpointReader, fd: int, name: str, rank: int, holder: str) -> None:
    """Check an open linked data file (format.md section 4.3): the header and footer of the
    holder's file (``rank``, uuid ``holder``), its footer records following each other from the
    header to the footer, and each of this checkpoint's rows in it the only footer row at its
    offset, agreeing on the record's fields. Records the sequence numbers its footer gives.
    Raises FormatError."""
    linked = check_linked(fd, rd.files[name], rank, holder)
    digests = index.DIGESTS in rd.features
    for r in rd.rows_of_file(name):
        held = linked.alone.get(r.offset)
        where = f"index row {r.key!r} chunk {r.chunk} at offset {r.offset}"
        if held is None:
            raise FormatError(f"{where}: not the one footer row at its offset in the linked file")
        if not _same_record(r, held, digests):
            raise FormatError(f"{where}: disagrees with the linked file's footer row")
    rd._seq[name] = linked.seq


_RECORD_FIELDS = (
    "rank",
    "offset",
    "stored_len",
    "codec",
    "elem_size",
    "raw_len",
    "hash",
    "key_id",
)


def _same_record(r: Row, x: Row, digests: bool) -> bool:
    """Whether footer row ``x`` of a linked file describes row ``r``'s record: equal values of
    equal types on section 4.3's fields (and the digest under ``digests``)."""
    for f in _RECORD_FIELDS:
        a, b = getattr(r, f), getattr(x, f)
        if type(a) is not type(b) or a != b:
            return False
    return not digests or (type(x.digest) is bytes and x.digest == r.digest)
