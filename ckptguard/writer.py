"""Per-rank data file writer: chunk, encode, append aligned records, footer, fsync, re-check."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import numpy as np
import pyarrow as pa

from . import backend as _backend
from .adapt import AUTO, STRETCH, Choice, Controller, Measured
from .encode import Record, as_buffer, check_chunk_size
from .format import dtypes
from .format.datafile import (
    CODEC_NAMES,
    CODECS,
    HEADER_SIZE,
    RECORD_HEADER_SIZE,
    TRAILER_SIZE,
    FormatError,
    check_file_header,
    check_footer_hash,
    check_record_header,
    pack_file_header,
    pack_trailer,
    unpack_trailer,
)
from .format.index import Row, int_list_array, is_packed, rows_from_table, table_of
from .format.index import footer as index_footer
from .format.layout import datafile_name
from .format.manifest import WriteStats
from .fsutil import UnsafeFileError, open_regular
from .io import WriteResult, open_direct, pread_exact, wait_written, write_all, write_records
from .sources import tensor_bytes
from .tree import TensorRef

DEFAULT_CHUNK = 4 << 20


# The index columns the writer appends per record; the others come from the rows' refs.
_APPENDED = (
    "tensor",
    "chunk",
    "shard_byte_offset",
    "raw_len",
    "offset",
    "stored_len",
    "codec",
    "hash",
    "record_byte_offset",
    "record_raw_len",
)
_KEY, _DTYPE = attrgetter("key"), attrgetter("dtype")
_GLOBAL, _OFFSETS, _SHAPE = attrgetter("global_shape"), attrgetter("offsets"), attrgetter("shape")


def adapt_stretch(chunk: int) -> int:
    """Bytes of a stretch the controller looks at: whole chunks, about ``adapt.STRETCH``."""
    return max(chunk, STRETCH // chunk * chunk)


class RankWriter:
    """Writes one rank's data file into a staging directory."""

    def __init__(
        self,
        directory: str,
        rank: int,
        uuid_hex: str,
        chunk_size: int = DEFAULT_CHUNK,
        path: str | None = None,
    ):
        """Create the data file of ``rank`` in ``directory`` (or at ``path``, where given: a
        one-file checkpoint's temporary)."""
        check_chunk_size(chunk_size)
        self.rank = rank
        self.uuid = uuid_hex
        self.name = datafile_name(rank)
        self.path = path if path is not None else os.path.join(directory, self.name)
        self.chunk_size = chunk_size
        # The index rows so far as columns (``_rows``): no object per row.
        self._refs: list[TensorRef] = []
        self._cols: dict[str, list] = {name: [] for name in _APPENDED}
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.pos = write_all(self.fd, pack_file_header(rank, uuid_hex))
        self.size = 0
        self._records = 0  # records written (several rows share a packed one)
        # The shard being written in parts: (tensor id, its offsets), chunks so far, bytes so far
        # (a rank may hold several shards of one tensor: each is its own, told by its offsets).
        self._open: tuple[tuple[int, tuple[int, ...]], int, int] | None = None
        # Settings read once per file, not once per tensor: environment look-ups and an affinity
        # syscall per tensor would cost a fifth of a save of 10,000 small tensors.
        self._threads = _backend.default_threads()
        self._backend = _backend.name()
        direct = _backend.direct_io()
        # One O_DIRECT descriptor for the whole file (-1: buffered only, as on the pure-Python
        # path and on file systems that refuse O_DIRECT).
        self._dfd = -1
        if direct is not False and self._backend == _backend.NATIVE:
            try:
                self._dfd = open_direct(self.path)
            except OSError:
                self.abort()
                raise
        self.control = Controller(
            self._threads,
            direct,
            self._dfd >= 0,
            fs=os.fstat(self.fd).st_dev,
            pipelined=self._backend == _backend.NATIVE,
        )
        self.stats: WriteStats | None = None  # what the file used, once finished

    def add(self, tid: int, ref: TensorRef, codec: int, raw: Any = None, level: int = 0) -> None:
        """Append the chunks of this rank's piece of one tensor (the whole tensor if unsharded),
        each tried with ``codec`` at ``level`` (``encode.encode``); ``adapt.AUTO``: the codec
        the file's controller chooses per stretch (``adapt``), which also chooses the I/O mode.

        ``raw``: the tensor's bytes (default: read from ``ref.value``), or the next part of them
        when the tensor arrives in parts; every part but the last must be a whole number of
        chunks, so the chunks are those of the tensor in one piece.
        """
        size = dtypes.SIZES[ref.dtype]
        view = as_buffer(tensor_bytes(ref.value) if raw is None else raw)
        step = self.chunk_size
        first, done_bytes = 0, 0
        shard = (tid, tuple(ref.offsets))
        if self._open is not None and self._open[0] == shard:
            _, first, done_bytes = self._open
            if done_bytes % step:
                raise ValueError(f"{ref.key}: a part before the last is not whole chunks")
        at, n = 0, first
        while True:  # stretches of whole chunks, each written as the controller chooses
            rest = view[at:]
            choice = self._choose(rest, size, codec, level)
            part = rest[: max(step, choice.limit // step * step)]
            n = self._chunk_rows(ref, tid, n, self._write(part, size, choice))
            at += len(part)
            if at >= len(view):
                break
        self._open = (shard, n, done_bytes + len(view))

    def _write(self, part: Any, size: int, choice: Choice) -> WriteResult:
        """Write the records of ``part`` as ``choice`` says, and tell the controller how it went."""
        t0 = time.perf_counter_ns()
        done = write_records(
            self.fd,
            self.path,
            self.pos,
            self._records,
            part,
            size,
            self.chunk_size,
            choice.codec,
            threads=self._threads,
            direct=choice.direct,
            backend=self._backend,
            level=choice.level,
            dfd=self._dfd,
        )
        wall = time.perf_counter_ns() - t0
        self.pos = done.end
        self._records += len(done.records)
        stored = sum(r.stored_len for r in done.records)
        m = Measured(len(part), stored, done.written, done.enc_ns, done.write_ns, done.direct, wall)
        self.control.record(choice, m, self._drain)
        for rec in done.records:
            self.control.note_use(CODEC_NAMES[rec.codec], done.direct, rec.raw_len)
        return done

    def _drain(self) -> int:
        """Put what the buffered writes left in the page cache on the disk (the controller
        asks for it to time both I/O modes alike); the nanoseconds it took."""
        return wait_written(self.fd, self.path, self._backend)

    def zstd_version(self) -> str | None:
        """The zstd library that encoded this file's zstd records, if it has any (the
        manifest's ``writer`` member names it)."""
        if not self.control.used["codec"].get("shuffle-zstd"):
            return None
        return _backend.zstd_version(self._backend)

    def _choose(self, data: memoryview, size: int, codec: int, level: int) -> Choice:
        """The controller's choice for ``data``; a fixed ``codec`` (not AUTO) replaces its own."""
        choice = self.control.choose(data[: adapt_stretch(self.chunk_size)], size, codec == AUTO)
        return choice if codec == AUTO else choice._replace(codec=codec, level=level)

    def _rows(
        self,
        tids: Sequence[int],
        refs: Sequence[TensorRef],
        chunks: Sequence[int],
        at: Sequence[int],
        raw_lens: Sequence[int],
        rec: Record,
        in_record: Sequence[int],
    ) -> None:
        """Append index rows held by record ``rec``: row j is ``raw_lens[j]`` bytes of the shard
        of ``refs[j]`` (tensor ``tids[j]``, chunk ``chunks[j]``) from byte ``at[j]`` of it, at
        byte ``in_record[j]`` of the record's raw bytes (several rows: a packed record)."""
        n = len(refs)
        c = self._cols
        self._refs.extend(refs)
        c["tensor"].extend(tids)
        c["chunk"].extend(chunks)
        c["shard_byte_offset"].extend(at)
        c["raw_len"].extend(raw_lens)
        c["record_byte_offset"].extend(in_record)
        for name, value in (
            ("offset", rec.offset),
            ("stored_len", rec.stored_len),
            ("codec", CODEC_NAMES[rec.codec]),
            ("hash", rec.hash),
            ("record_raw_len", rec.raw_len),
        ):
            c[name].extend([value] * n)

    def _chunk_rows(self, ref: TensorRef, tid: int, first: int, done: WriteResult) -> int:
        """Index rows for the chunks ``done`` wrote (chunks ``first``, ...); the next number."""
        for n, rec in enumerate(done.records, start=first):
            self._rows([tid], [ref], [n], [n * self.chunk_size], [rec.raw_len], rec, [0])
        return first + len(done.records)

    def add_packed(
        self,
        tids: Sequence[int],
        refs: Sequence[TensorRef],
        starts: Sequence[int],
        buf: Any,
        codec: int,
        level: int = 0,
    ) -> None:
        """Append one record whose raw bytes ``buf`` are the bytes of several whole small tensors
        of one element size back to back (feature ``packed-records``): tensor ``tids[j]``
        (``refs[j]``) starts at byte ``starts[j]`` of ``buf``, in that order. ``buf`` (at most
        ``chunk_size`` bytes) is the writer's own copy: hashed and encoded from it alone.
        ``codec`` as for ``add``."""
        size = dtypes.SIZES[refs[0].dtype]
        view = as_buffer(buf)
        if len(view) > self.chunk_size:
            raise ValueError(f"a pack of {len(view)} bytes exceeds the chunk size")
        done = self._write(view, size, self._choose(view, size, codec, level))
        (rec,) = done.records
        ends = np.append(np.asarray(starts[1:], dtype=np.int64), len(view))
        lens = (ends - np.asarray(starts, dtype=np.int64)).tolist()
        zeros = [0] * len(refs)
        self._rows(tids, refs, zeros, zeros, lens, rec, starts)

    def table(self) -> pa.Table:
        """The index rows written so far, in file order, as an index table."""
        refs, c, n = self._refs, self._cols, len(self._refs)
        dtype = list(map(_DTYPE, refs))
        cols: dict[str, Any] = {
            **c,
            "key": list(map(_KEY, refs)),
            "dtype": dtype,
            "global_shape": int_list_array(list(map(_GLOBAL, refs))),
            "shard_offsets": int_list_array(list(map(_OFFSETS, refs))),
            "shard_lengths": int_list_array(list(map(_SHAPE, refs))),
            "rank": [self.rank] * n,
            "file": [self.name] * n,
            "elem_size": [dtypes.SIZES[d] for d in dtype],
            "base": [None] * n,
            "key_id": [None] * n,
        }
        return table_of(cols)

    @property
    def rows(self) -> list[Row]:
        """The index rows written so far as ``Row`` objects (for tests and diagnosis)."""
        return rows_from_table(self.table())

    def finish(self) -> pa.Table:
        """Write footer and trailer, fsync, close, and re-check what was written; return the
        index rows of the file."""
        table = self.table()
        footer = index_footer(self.rank, self.uuid, table, is_packed(table))
        write_all(self.fd, footer, pack_trailer(self.pos, footer))
        self.size = self.pos + len(footer) + TRAILER_SIZE
        self._close_direct()
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        self._recheck(footer)
        self.stats = self.control.finish()
        return table

    def abort(self) -> None:
        self._close_direct()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _close_direct(self) -> None:
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1

    def _recheck(self, footer: bytes) -> None:
        """Re-read headers, record headers and footer (no payload), like restic's pack check."""
        try:
            fd, _ = open_regular(self.path, size=self.size)
        except UnsafeFileError as e:
            raise FormatError(f"{self.path}: after the write it {e.reason}") from None
        try:
            check_file_header(pread_exact(fd, HEADER_SIZE, 0), self.rank, self.uuid)
            c = self._cols
            offsets = np.asarray(c["offset"], dtype=np.int64)
            # The first row of each record (the rows of a packed record are consecutive).
            firsts = np.flatnonzero(np.diff(offsets, prepend=-1) != 0).tolist()
            for seq, i in enumerate(firsts):
                head = pread_exact(fd, RECORD_HEADER_SIZE, c["offset"][i])
                try:
                    check_record_header(
                        head,
                        CODECS[c["codec"][i]],
                        dtypes.SIZES[self._refs[i].dtype],
                        c["record_raw_len"][i],
                        c["stored_len"][i],
                        c["hash"][i],
                        seq,
                    )
                except FormatError as e:
                    raise FormatError(
                        f"{self.path}: record at {c['offset'][i]} reads back differently ({e})"
                    ) from None
            off, length, digest = unpack_trailer(
                pread_exact(fd, TRAILER_SIZE, self.size - TRAILER_SIZE), self.size
            )
            back = pread_exact(fd, length, off)
            check_footer_hash(back, digest)
            if back != footer:
                raise FormatError(f"{self.path}: footer reads back differently")
        finally:
            os.close(fd)
