"""Safe reader of one committed checkpoint: every size, offset and hash checked before use (I5, I6).

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

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from . import encode
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    CorruptCheckpointError,
    FormatVersionError,
    StoreError,
    from_oserror,
)
from .format import index, manifest
from .format.datafile import (
    CODECS,
    HEADER_SIZE,
    TRAILER_SIZE,
    FormatError,
    check_file_header,
    check_footer,
    check_footer_hash,
    check_record,
    pack_footer,
    unpack_trailer,
)
from .format.index import Row, int_lists, row_from_json
from .format.layout import INDEX, MANIFEST
from .format.validate import check_table
from .fsutil import UnsafeFileError, check_regular, open_regular, read_regular
from .io import pread_exact, read_into


class CheckpointReader:
    """Opens a checkpoint: validates manifest and index; reads and checks data files on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.path.abspath(os.fspath(path))
        try:
            self.dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise CheckpointNotFoundError(f"no checkpoint at {self.path}") from None
        except OSError as e:  # EACCES on the directory: the checkpoint cannot be read
            raise StoreError(
                f"cannot open checkpoint {self.path}: {e.strerror}", self.path, e.errno
            ) from None
        st = os.fstat(self.dir_fd)
        self._identity = (st.st_dev, st.st_ino)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        try:
            raw = self._read_whole(MANIFEST, manifest.MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise self.missing(
                "MANIFEST.json is missing: not a committed checkpoint", MANIFEST
            ) from None
        try:
            self.manifest = manifest.decode(raw)
        except manifest.FormatVersionProblem as e:
            raise FormatVersionError(f"{e} ({self.path})") from None
        except FormatError as e:
            raise self.corrupt(str(e), file=MANIFEST) from None
        m = self.manifest
        self.features = set(m["features"])
        self.tensors: list[dict] = m["tensors"]
        self.files = {f["name"]: f["size"] for f in m["files"]}
        try:
            data = self._read_whole(INDEX, m["index"]["size"], exact=True)
        except FileNotFoundError:
            raise self.missing("index.parquet is missing", INDEX) from None
        if xxhash.xxh3_128_hexdigest(data) != m["index"]["xxh3_128"]:
            raise self.corrupt("index.parquet does not match the hash in the manifest", file=INDEX)
        try:
            self.table = index.read_table(data)
            check_table(self.table, self.tensors, self.files, self.features)
        except FormatError as e:
            raise self.corrupt(str(e), file=INDEX) from None
        t = self.table
        totals = {
            "tensors": len(self.tensors),
            "chunks": t.num_rows,
            "raw_bytes": int(pc.sum(t.column("raw_len")).as_py() or 0),
            "stored_bytes": int(pc.sum(t.column("stored_len")).as_py() or 0),
            "files": len(self.files),
        }
        if totals != m["totals"]:
            raise self.corrupt("manifest totals disagree with the index", file=MANIFEST)
        counts = dict.fromkeys(self.files, 0)
        for item in pc.value_counts(t.column("file").combine_chunks()).to_pylist():
            counts[item["values"]] = item["counts"]
        for f in m["files"]:  # validation already tied every row's file to its rank
            if counts[f["name"]] != f["chunks"]:
                raise self.corrupt("manifest file entry disagrees with the index", file=f["name"])
            if f["rank"] >= m["world_size"]:
                raise self.corrupt("data file of a rank beyond world_size", file=f["name"])
        self._by_file: dict[str, list[Row]] = {}
        self._seq_of: dict[tuple[str, int], int] = {}
        self._all: list[Row] | None = None

    @property
    def rows(self) -> list[Row]:
        """Every chunk row (built on first use; loads use ``rows_of_tensors`` instead)."""
        if self._all is None:
            self._all = index.rows_from_table(self.table)
        return self._all

    def rows_of_tensors(self, ids: list[int]) -> list[Row]:
        """The rows of these tensors only: a rank of a large job builds what it reads."""
        mask = pc.is_in(self.table.column("tensor"), value_set=pa.array(ids, pa.int32()))
        return index.rows_from_table(self.table.filter(mask))

    def rows_for(self, boxes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]) -> list[Row]:
        """The rows a load of ``boxes`` (tensor id -> (offsets, lengths) of the part wanted)
        reads: of each saved shard that meets its tensor's box, the chunks overlapping the bytes
        of the shard's first-dimension rows that the box needs (what ``reshard.plan_reads``
        keeps; a 0-d tensor's chunks always). Selected on the index table, so a rank that wants
        1/N of every tensor builds about 1/N of the rows."""
        if not boxes:
            return []
        t = self.table
        tid = t.column("tensor").to_numpy().astype(np.int64)
        wanted = np.zeros(len(self.tensors), dtype=bool)
        ids = np.fromiter(boxes, dtype=np.int64, count=len(boxes))
        wanted[ids] = True  # ids come from the manifest's tensors (restore checks the range)
        sel = np.flatnonzero(wanted[tid])
        if len(sel) < t.num_rows:
            t = t.take(pa.array(sel))
            tid = tid[sel]
        # Each row's shard box and its tensor's wanted box, as flat per-dimension arrays.
        offs, nd = int_lists(t.column("shard_offsets"))
        lens, _ = int_lists(t.column("shard_lengths"))
        nd_t = np.array([len(self.tensors[i]["shape"]) for i in range(len(self.tensors))])
        w_start = np.zeros(len(self.tensors), dtype=np.int64)
        w_off, w_len = [], []
        pos = 0
        for gid in sorted(boxes):
            o, n = boxes[gid]
            if len(o) != nd_t[gid] or len(n) != nd_t[gid]:
                raise ValueError(f"box of tensor {gid} has the wrong number of dimensions")
            w_start[gid] = pos
            w_off += o
            w_len += n
            pos += len(o)
        starts = np.cumsum(nd) - nd
        within = np.arange(len(offs)) - np.repeat(starts, nd)
        w_idx = np.repeat(w_start[tid], nd) + within
        wo = np.array(w_off, dtype=np.int64)[w_idx]
        wl = np.array(w_len, dtype=np.int64)[w_idx]
        lo = np.maximum(offs, wo)
        hi = np.minimum(offs + lens, wo + wl)
        row_of = np.repeat(np.arange(t.num_rows), nd)
        misses = np.bincount(row_of, weights=hi <= lo, minlength=t.num_rows)
        keep = misses == 0  # every dimension overlaps (a 0-d shard always)
        # The overlap's first-dimension rows are one byte range of the C-ordered shard; keep
        # the chunks that meet it.
        multi = np.flatnonzero(keep & (nd > 0))
        if len(multi):
            first = starts[multi]
            factor = lens.copy()
            factor[starts[nd > 0]] = 1
            row_elems = np.multiply.reduceat(factor, starts[nd > 0]) if len(factor) else factor
            row_elems = row_elems[np.searchsorted(np.flatnonzero(nd > 0), multi)]
            row_bytes = row_elems * t.column("elem_size").to_numpy()[multi].astype(np.int64)
            b_lo = (lo[first] - offs[first]) * row_bytes
            b_hi = (hi[first] - offs[first]) * row_bytes
            sbo = t.column("shard_byte_offset").to_numpy()[multi]
            raw = t.column("raw_len").to_numpy()[multi]
            keep[multi] = (sbo < b_hi) & (sbo + raw > b_lo)
        return index.rows_from_table(t.filter(pa.array(keep)))

    def rows_of_file(self, name: str) -> list[Row]:
        """One data file's rows in offset order (their position is the record sequence number)."""
        if name not in self._by_file:
            sub = self.table.filter(pc.equal(self.table.column("file"), name))
            self._by_file[name] = sorted(index.rows_from_table(sub), key=lambda r: r.offset)
            self._seq_of.update({(name, r.offset): i for i, r in enumerate(self._by_file[name])})
        return self._by_file[name]

    def corrupt(self, msg: str, **where) -> CorruptCheckpointError:
        return CorruptCheckpointError(msg, path=self.path, **where)

    def io_error(self, e: OSError, name: str, action: str = "cannot read") -> StoreError:
        """The typed error of an OSError on file ``name`` of this checkpoint (not corruption:
        its bytes could not be read); ``path`` is the file's, ``file`` its name."""
        err = from_oserror(e, os.path.join(self.path, name), action)
        err.file = name  # type: ignore[attr-defined]  # named like CorruptCheckpointError.file
        return err

    def replaced(self) -> bool:
        """Whether the path no longer leads to the directory this reader opened (an overwrite
        renamed another into place, or the checkpoint was deleted)."""
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

    def _open_checked(self, name: str, what: str, size: int) -> int:
        """Open file ``name`` of the checkpoint with ``open_regular`` (a regular file of exactly
        ``size`` bytes); FileNotFoundError is left to the caller."""
        try:
            fd, _ = open_regular(name, dir_fd=self.dir_fd, size=size)
        except FileNotFoundError:
            raise
        except UnsafeFileError as e:  # a link, FIFO, device, directory, or the wrong size
            raise self.corrupt(f"{what}{e.reason}", file=name) from None
        except OSError as e:
            raise self.io_error(e, name, "cannot open") from None
        return fd

    def _read_whole(self, name: str, limit: int, exact: bool = False) -> bytes:
        """The bytes of file ``name``: at most ``limit`` of them, or exactly with ``exact``."""
        try:
            return read_regular(
                name,
                dir_fd=self.dir_fd,
                max_size=None if exact else limit,
                size=limit if exact else None,
            )
        except FileNotFoundError:
            raise
        except UnsafeFileError as e:
            raise self.corrupt(f"{name} {e.reason}", file=name) from None
        except OSError as e:
            raise self.io_error(e, name) from None

    def check_sizes(self, names: set[str] | list[str]) -> None:
        """Check that these data files exist as regular files of the manifest's size (one stat
        each, no open): a load calls it before allocating what the files are to fill, so that a
        manifest cannot make it allocate more than the files on disk can back."""
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

    def open_file(self, name: str) -> int:
        """Open and check one data file (header, trailer, footer vs index); return its fd."""
        try:
            fd = self._open_checked(name, "data file ", self.files[name])
        except FileNotFoundError:
            raise self.missing("data file is missing", name) from None
        try:
            self._check_file(fd, name)
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

    def _check_file(self, fd: int, name: str) -> None:
        size = self.files[name]  # open_regular checked it is a regular file of this size
        if size < HEADER_SIZE + TRAILER_SIZE:
            raise FormatError("data file is too short")
        rank = int(name[5:-4])
        check_file_header(pread_exact(fd, HEADER_SIZE, 0), rank, self.manifest["uuid"])
        off, length, digest = unpack_trailer(
            pread_exact(fd, TRAILER_SIZE, size - TRAILER_SIZE), size
        )
        footer = pread_exact(fd, length, off)
        mine = self.rows_of_file(name)
        # The footer this writer makes of the index's rows: equal bytes (with the hash below)
        # settle it without parsing 10,000s of JSON rows; any other footer is parsed and compared.
        if footer != pack_footer(rank, self.manifest["uuid"], [r.to_json() for r in mine]):
            rows = check_footer(footer, digest, rank, self.manifest["uuid"])
            if [row_from_json(x) for x in rows] != mine:
                raise FormatError("footer rows disagree with the index")
        else:
            check_footer_hash(footer, digest)
        pos = HEADER_SIZE
        for r in mine:  # records follow each other from the header to the footer, no gaps
            if r.offset != pos:
                raise FormatError(f"record at {r.offset} does not follow the previous one at {pos}")
            pos = r.extent
        if off != pos:
            raise FormatError("the footer does not follow the last record")

    def read_chunks(self, rows: list[Row], verify: bool = True) -> Iterator[tuple[Row, bytes]]:
        """Yield (row, raw bytes) for ``rows`` in file order, each checked before it is yielded."""
        by_file: dict[str, list[Row]] = {}
        for r in rows:
            by_file.setdefault(r.file, []).append(r)
        for name in sorted(by_file):
            fd = self.open_file(name)
            try:
                for r in sorted(by_file[name], key=lambda r: r.offset):
                    yield r, self.read_chunk(fd, r, verify)
            finally:
                os.close(fd)

    def read_into(
        self, fd: int, rows: list[Row], dest: Any, dest_offsets: list[int], verify: bool = True
    ) -> None:
        """Read, check and decode ``rows`` of one open file straight into ``dest`` (in parallel on
        the native path); each row's raw bytes land at its ``dest_offsets`` entry. Bad bytes raise
        CorruptCheckpointError, a failed read (EIO, ...) the StoreError naming the file."""
        items = [
            encode.ReadItem(
                r.offset,
                r.extent - r.offset,
                CODECS[r.codec],
                r.elem_size,
                r.raw_len,
                r.stored_len,
                r.hash,
                off,
                self._seq_of[(r.file, r.offset)],
            )
            for r, off in zip(rows, dest_offsets, strict=True)
        ]
        try:
            read_into(
                fd,
                os.path.join(self.path, rows[0].file) if rows else self.path,
                dest,
                items,
                verify=verify,
            )
        except encode.ChunkError as e:
            r = rows[e.index]
            what = (
                "chunk hash mismatch (data corrupted)"
                if isinstance(e, encode.ChunkHashError)
                else e.reason
            )
            raise self.corrupt(
                what, file=r.file, key=r.key, chunk=r.chunk, offset=r.offset
            ) from None
        except OSError as e:  # native and Python paths alike: errno and the file's path
            raise self.io_error(e, rows[0].file) from None

    def read_chunk(self, fd: int, r: Row, verify: bool = True) -> bytes:
        where = {"file": r.file, "key": r.key, "chunk": r.chunk, "offset": r.offset}
        try:
            buf = pread_exact(fd, r.extent - r.offset, r.offset)
        except OSError as e:
            raise self.io_error(e, r.file) from None
        try:
            if len(buf) != r.extent - r.offset:
                raise FormatError("record is truncated")
            payload = check_record(
                buf,
                CODECS[r.codec],
                r.elem_size,
                r.raw_len,
                r.stored_len,
                r.hash,
                self._seq_of[(r.file, r.offset)],
            )
            raw = encode.decode(CODECS[r.codec], payload, r.raw_len, r.elem_size)
        except FormatError as e:
            raise self.corrupt(str(e), **where) from None
        if verify and encode.digest(raw) != r.hash:
            raise self.corrupt("chunk hash mismatch (data corrupted)", **where)
        return raw

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
