"""Per-rank data file writer: chunk, encode, append aligned records (tensors queued and written a
batch per call), footer, fsync, re-check."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from . import backend as _backend
from .adapt import AUTO, Choice, Controller, Measured, stretch_bytes
from .encode import as_buffer, check_chunk_size, check_chunking
from .filecheck import recheck_written
from .format import dtypes
from .format.datafile import CODEC_NAMES, TRAILER_SIZE, pack_file_header, pack_trailer
from .format.index import Row, int_list_array, is_packed, rows_from_table, table_of, to_table
from .format.index import footer as index_footer
from .format.layout import ALIGN, datafile_name
from .format.manifest import WriteStats
from .io import Batch, Segment, open_direct, wait_written, write_all, write_segments
from .reuse import Reuse, spans
from .sealwrite import Sealing, Stretch, write_stretches
from .sources import tensor_bytes
from .tree import TensorRef

DEFAULT_CHUNK = 4 << 20
BATCH_BYTES = 16 << 20
"""Raw bytes of queued stretches that make the writer write them (one native call for all)."""
BATCH_CHUNKS = 1024
"""Chunks of queued stretches that do the same (many small stretches: bounded per call)."""
BATCH_ENV = "CKPTGUARD_BATCH"
"""``0``: every stretch is written by its own call, as it is added (for comparisons)."""

# The index columns the writer appends per record, with their numpy types; the others come
# from the rows' refs.
_APPENDED = {
    "tensor": np.int32,
    "chunk": np.int32,
    "shard_byte_offset": np.int64,
    "raw_len": np.int64,
    "offset": np.int64,
    "stored_len": np.int64,
    "codec": np.uint8,
    "record_byte_offset": np.int64,
    "record_raw_len": np.int64,
}
_KEY, _DTYPE = attrgetter("key"), attrgetter("dtype")
_GLOBAL, _OFFSETS, _SHAPE = attrgetter("global_shape"), attrgetter("offsets"), attrgetter("shape")
_CODEC_TEXT = pa.array([CODEC_NAMES.get(i, "") for i in range(256)], pa.string())
_DIGEST = pa.binary(32)
_HASH = pa.binary(16)


def batching() -> bool:
    """Whether writers queue stretches into batches (``BATCH_ENV`` unset or ``1``)."""
    mode = os.environ.get(BATCH_ENV, "").strip()
    if mode not in ("", "0", "1"):
        raise ValueError(f"{BATCH_ENV} must be 0 or 1, not {mode!r}")
    return mode != "0"


class Queued(NamedTuple):
    """A stretch waiting for ``flush``: its bytes and choice, and whose rows its records hold."""

    seg: Segment
    choice: Choice
    tid: int  # a stretch of one shard: its tensor id and the number of its first chunk
    ref: TensorRef | None
    first: int
    pack: tuple[Sequence[int], Sequence[TensorRef], Sequence[int]] | None  # tids, refs, starts


class RankWriter:
    """Writes one rank's data file into a staging directory.

    ``add`` and ``add_packed`` queue stretches; ``flush`` writes the queued ones in one call
    (``io.write_segments``), which happens by itself once ``BATCH_BYTES`` or ``BATCH_CHUNKS``
    are queued, when a stretch's buffer does not last beyond its ``add``, and in ``finish``. The
    records and rows are those of one call per stretch, in the same order."""

    def __init__(
        self,
        directory: str,
        rank: int,
        uuid_hex: str,
        chunk_size: int = DEFAULT_CHUNK,
        path: str | None = None,
        digests: bool = False,
        reuse: Reuse | None = None,
        seal: Sealing | None = None,
    ):
        """Create the data file of ``rank`` in ``directory`` (or at ``path``, where given: a
        one-file checkpoint's temporary). ``digests``: every record's SHA-256 goes into its
        index rows too (feature ``digests``). ``reuse``: an incremental save's linked base files
        (``reuse.Reuse``): a chunk one of their records holds becomes a row of it, unwritten.
        ``seal``: the save's scopes; a tensor in one is written in sealed records (feature
        ``encryption``, ``seal.write_sealed``)."""
        check_chunk_size(chunk_size)
        self.rank = rank
        self.uuid = uuid_hex
        self.name = datafile_name(rank)
        self.path = path if path is not None else os.path.join(directory, self.name)
        self.chunk_size = chunk_size
        # The index rows so far as columns: arrays per flush, and runs of rows of one ref.
        self._cols: dict[str, list[np.ndarray]] = {name: [] for name in _APPENDED}
        self._hashes: list[bytes] = []
        self.digests = digests
        self._digests: list[bytes] = []
        self._run_refs: list[TensorRef] = []
        self._run_lens: list[int] = []
        self._queue: list[Queued] = []
        self.reuse = reuse
        self.seal = seal
        self._key_ids: list[list[str | None]] = []  # per flush, per row: its data key or None
        self._record_keys: list[str | None] = []  # the last sealed flush's, per record
        self._reused: list[Row] = []  # rows of chunks a linked file holds (``reuse``)
        self._queued = [0, 0]  # raw bytes and chunks in the queue
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
        self._batching = batching()
        self.calls = 0  # write calls made (one per flush)
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

    def add(
        self,
        tid: int,
        ref: TensorRef,
        codec: int,
        raw: Any = None,
        level: int = 0,
        lasting: bool = True,
    ) -> None:
        """Queue the chunks of this rank's piece of one tensor (the whole tensor if unsharded),
        each tried with ``codec`` at ``level`` (``encode.encode``); ``adapt.AUTO``: the codec
        the file's controller chooses per stretch (``adapt``), which also chooses the I/O mode.

        ``raw``: the tensor's bytes (default: read from ``ref.value``), or the next part of them
        when the tensor arrives in parts; every part but the last must be a whole number of
        chunks, so the chunks are those of the tensor in one piece. ``lasting``: ``raw`` stays
        valid and unchanged until ``finish`` (else it is written before this call returns, as
        a reused buffer must be).
        """
        view = as_buffer(tensor_bytes(ref.value) if raw is None else raw)
        step = self.chunk_size
        first, done_bytes = 0, 0
        shard = (tid, tuple(ref.offsets))
        if self._open is not None and self._open[0] == shard:
            _, first, done_bytes = self._open
            if done_bytes % step:
                raise ValueError(f"{ref.key}: a part before the last is not whole chunks")
        self._open = (shard, first + -(-len(view) // step), done_bytes + len(view))
        if self.reuse is None:
            self._stretches(tid, ref, view, first, codec, level, lasting)
            return
        scope = self.seal.for_key(ref.key) if self.seal is not None else None
        matched = self.reuse.match(tid, ref, view, first, step, self._threads, scope)
        self._reused.extend(r for r in matched if r is not None)
        for i, a, b in spans(matched, len(view), step):
            self._stretches(tid, ref, view[a:b], first + i, codec, level, lasting or b < len(view))
        if not lasting:
            self.flush()  # a reused buffer: whatever was queued of it is written now

    def _stretches(
        self,
        tid: int,
        ref: TensorRef,
        view: memoryview,
        n: int,
        codec: int,
        level: int,
        lasting: bool,
    ) -> None:
        """Queue ``view``, whole chunks of ``ref`` from chunk ``n``, in stretches each written
        as the controller chooses."""
        size = dtypes.SIZES[ref.dtype]
        step, at = self.chunk_size, 0
        while True:
            rest = view[at:]
            self._settle(len(rest))
            choice = self._choose(rest, size, codec, level)
            part = rest[: max(step, choice.limit // step * step)]
            self._queue_one(Queued(self._segment(part, size, choice), choice, tid, ref, n, None))
            n += -(-len(part) // step)
            at += len(part)
            # A tensor of several stretches: the choice of the next one sees this one's measure.
            self._may_wait(lasting and at >= len(view))
            if at >= len(view):
                break

    def _segment(self, part: memoryview, size: int, choice: Choice) -> Segment:
        """The segment of ``part`` written as ``choice`` says (refused here, as it is added,
        if it cannot be chunked so)."""
        check_chunking(len(part), size, self.chunk_size, choice.codec, choice.level)
        return Segment(part, size, choice.codec, choice.level, choice.direct)

    def _queue_one(self, q: Queued) -> None:
        self._queue.append(q)
        self._queued[0] += len(q.seg.buf)
        self._queued[1] += -(-len(q.seg.buf) // self.chunk_size)

    def _ahead(self, more: int = 0) -> int:
        """At most the record bytes of the queue and ``more`` raw bytes (headers, padding)."""
        raw, chunks = self._queued
        return raw + more + (chunks + 1 + more // self.chunk_size) * 2 * ALIGN

    def _settle(self, more: int) -> None:
        """Flush the queue before a choice for ``more`` bytes that needs its measurements."""
        if self._queue and not self.control.steady(self._ahead(more)):
            self.flush()

    def _may_wait(self, may: bool) -> None:
        """Flush the queue unless it ``may`` wait: full, batching off, or the controller's next
        choices need what it measures (``Controller.steady``)."""
        raw, chunks = self._queued
        wait = may and self._batching and raw < BATCH_BYTES and chunks < BATCH_CHUNKS
        if not (wait and self.control.steady(self._ahead())):
            self.flush()

    def flush(self) -> None:
        """Write every queued stretch's records in one call, in order; add their index rows and
        tell the controller what they measured."""
        q, self._queue, self._queued = self._queue, [], [0, 0]
        if not q:
            return
        t0 = time.perf_counter_ns()
        if self.seal is not None:
            done = self._write_sealed(q)
        else:
            done = write_segments(
                self.fd,
                self.path,
                self.pos,
                self._records,
                [e.seg for e in q],
                self.chunk_size,
                threads=self._threads,
                backend=self._backend,
                dfd=self._dfd,
                digest=self.digests,
            )
        wall = time.perf_counter_ns() - t0
        self.calls += 1
        self.pos = done.end
        self._records += len(done.codec)
        self._add_rows(q, done)
        self._measured(q, done, wall)

    def _write_sealed(self, q: list[Queued]) -> Batch:
        """``flush``'s write when the save seals (``seal.write_stretches``)."""
        assert self.seal is not None
        stretches = [
            Stretch(
                e.seg,
                e.first,
                [e.ref] if e.pack is None else e.pack[1],
                e.pack is not None,
                e.pack[2] if e.pack else [0],
            )
            for e in q
        ]
        at = (self.fd, self.path, self.pos, self._records, self.uuid, self.rank, self._dfd)
        done, self._record_keys = write_stretches(
            at, stretches, self.seal, self.chunk_size, self._threads, self._backend, self.digests
        )
        return done

    def _measured(self, q: list[Queued], done: Batch, wall: int) -> None:
        """Tell the controller what each run of stretches of one choice measured (the batch's
        wall time shared by raw bytes), and count what was used."""
        seg = np.repeat(np.arange(len(q)), done.nrecords)
        raw = np.fromiter((len(e.seg.buf) for e in q), np.int64, len(q))
        stored = np.bincount(seg, weights=done.stored_len, minlength=len(q)).astype(np.int64)
        whole = max(int(raw.sum()), 1)
        start = 0
        for end in _run_ends([e.choice[:3] for e in q]):
            sl = slice(start, end)
            nbytes, has = int(raw[sl].sum()), done.nrecords[sl] > 0
            m = Measured(
                nbytes,
                int(stored[sl].sum()),
                int(done.written[sl].sum()),
                int(done.enc_ns[sl].sum()),
                int(done.write_ns[sl].sum()),
                bool(has.any() and done.direct[sl][has].all()),
                wall * nbytes // whole,
            )
            self.control.record(q[start].choice, m, self._drain)
            start = end
        key = done.codec.astype(np.int64) * 2 + done.direct[seg]
        used = np.bincount(key, weights=done.raw_len, minlength=2)
        for k in np.flatnonzero(used).tolist():
            self.control.note_use(CODEC_NAMES[k // 2], bool(k % 2), int(used[k]))

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
        choice = self.control.choose(data[: stretch_bytes(self.chunk_size)], size, codec == AUTO)
        return choice if codec == AUTO else choice._replace(codec=codec, level=level)

    def _add_rows(self, q: list[Queued], done: Batch) -> None:
        """The index rows of the records ``done`` wrote for the stretches ``q``, as columns: a
        record of a shard's stretch holds one row (chunk ``first``, ...); a packed record one per
        member tensor (feature ``packed-records``)."""
        nrec = len(done.codec)
        seg = np.repeat(np.arange(len(q)), done.nrecords)
        begin = np.cumsum(done.nrecords) - done.nrecords  # each segment's first record
        chunk = np.fromiter((e.first for e in q), np.int64, len(q))[seg] + np.arange(nrec)
        chunk -= begin[seg]
        per = {
            "tensor": np.fromiter((e.tid for e in q), np.int64, len(q))[seg],
            "chunk": chunk,
            "shard_byte_offset": chunk * self.chunk_size,
            "raw_len": done.raw_len,
            "record_byte_offset": np.zeros(nrec, np.int64),
        }
        rows = np.ones(nrec, np.int64)  # rows per record
        packs = [(i, e.pack) for i, e in enumerate(q) if e.pack is not None]
        for i, (tids, _, _) in packs:
            rows[begin[i]] = len(tids)
        of = np.repeat(np.arange(nrec), rows) if packs else slice(None)
        cols = {k: v[of] for k, v in per.items()}
        cols.update(
            offset=done.offset[of],
            stored_len=done.stored_len[of],
            codec=done.codec[of],
            record_raw_len=done.raw_len[of],
        )
        at = np.cumsum(rows) - rows  # each record's first row
        for i, (tids, _, starts) in packs:
            r, k = int(at[begin[i]]), len(tids)
            lens = np.diff(np.append(np.asarray(starts, np.int64), int(done.raw_len[begin[i]])))
            for name, v in (("tensor", tids), ("chunk", 0), ("shard_byte_offset", 0)):
                cols[name][r : r + k] = v
            cols["raw_len"][r : r + k] = lens
            cols["record_byte_offset"][r : r + k] = starts
        for name, col in cols.items():
            self._cols[name].append(col)
        self._hashes.append(np.frombuffer(done.hash, np.uint8).reshape(-1, 16)[of].tobytes())
        if self.seal is not None:
            keys = np.array(self._record_keys, dtype=object)
            self._key_ids.append(list(keys[of]) if nrec else [])
        if self.digests:
            self._digests.append(np.frombuffer(done.digest, np.uint8).reshape(-1, 32)[of].tobytes())
        for e, n in zip(q, done.nrecords.tolist(), strict=True):
            if e.pack is not None:
                self._run_refs.extend(e.pack[1])
                self._run_lens.extend([1] * len(e.pack[1]))
            elif n:
                self._run_refs.append(e.ref)  # type: ignore[arg-type]
                self._run_lens.append(n)

    def add_packed(
        self,
        tids: Sequence[int],
        refs: Sequence[TensorRef],
        starts: Sequence[int],
        buf: Any,
        codec: int,
        level: int = 0,
    ) -> None:
        """Queue one record whose raw bytes ``buf`` are the bytes of several whole small tensors
        of one element size back to back (feature ``packed-records``): tensor ``tids[j]``
        (``refs[j]``) starts at byte ``starts[j]`` of ``buf``, in that order. ``buf`` (at most
        ``chunk_size`` bytes) is the writer's own copy: hashed and encoded from it alone, and
        left unchanged until it is written. ``codec`` as for ``add``."""
        size = dtypes.SIZES[refs[0].dtype]
        view = as_buffer(buf)
        if len(view) > self.chunk_size:
            raise ValueError(f"a pack of {len(view)} bytes exceeds the chunk size")
        self._settle(len(view))
        choice = self._choose(view, size, codec, level)
        seg = self._segment(view, size, choice)
        self._queue_one(Queued(seg, choice, tids[0], None, 0, (tids, refs, starts)))
        self._may_wait(True)

    def table(self) -> pa.Table:
        """The index rows written so far (not those still queued), in file order, as an index
        table: the refs' columns repeated over their runs of rows."""
        c, refs = self._cols, self._run_refs
        run = pa.array(np.repeat(np.arange(len(refs)), self._run_lens))
        n = len(run)
        cols: dict[str, Any] = {
            name: np.concatenate(c[name]) if c[name] else np.zeros(0, t)
            for name, t in _APPENDED.items()
        }
        cols["codec"] = _CODEC_TEXT.take(pa.array(cols["codec"]))
        hashes = pa.py_buffer(b"".join(self._hashes))
        cols["hash"] = pa.FixedSizeBinaryArray.from_buffers(_HASH, n, [None, hashes])
        if self.digests:
            sha = pa.py_buffer(b"".join(self._digests))
            cols["digest"] = pa.FixedSizeBinaryArray.from_buffers(_DIGEST, n, [None, sha])
        dtype = pa.array(list(map(_DTYPE, refs)), pa.string())
        sizes = [dtypes.SIZES[d] for d in map(_DTYPE, refs)]
        cols.update(
            key=pa.array(list(map(_KEY, refs)), pa.string()).take(run),
            dtype=dtype.take(run),
            global_shape=int_list_array(list(map(_GLOBAL, refs))).take(run),
            shard_offsets=int_list_array(list(map(_OFFSETS, refs))).take(run),
            shard_lengths=int_list_array(list(map(_SHAPE, refs))).take(run),
            rank=np.full(n, self.rank, np.int32),
            file=[self.name] * n,
            elem_size=pa.array(sizes, pa.int32()).take(run),
            base=[None] * n,
            key_id=pa.array(
                [k for f in self._key_ids for k in f] if self.seal else [None] * n, pa.string()
            ),
        )
        return table_of(cols)

    def reused_table(self) -> pa.Table | None:
        """The index rows of the chunks linked files hold (``reuse``), None if there are none."""
        return to_table(self._reused) if self._reused else None

    @property
    def rows(self) -> list[Row]:
        """The index rows of everything added so far as ``Row`` objects (the queue is written
        first; for tests and diagnosis)."""
        self.flush()
        return rows_from_table(self.table())

    def finish(self, mode: int | None = None) -> pa.Table:
        """Write what is queued, footer and trailer, fsync, close, and re-check what was
        written; return the index rows of the file. ``mode``: the permission bits it gets before
        the fsync (durable with it, from every rank's writer at once); None: as created."""
        self.flush()
        table = self.table()
        footer = self.footer = index_footer(self.rank, self.uuid, table, is_packed(table))
        write_all(self.fd, footer, pack_trailer(self.pos, footer))
        self.size = self.pos + len(footer) + TRAILER_SIZE
        self._close_direct()
        if mode is not None:  # not at creation: open_direct reopens the file by path to write
            os.fchmod(self.fd, mode)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        recheck_written(self.path, self.size, self.rank, self.uuid, footer, table)
        self.stats = self.control.finish()
        return table

    def abort(self) -> None:
        """Drop what is queued (never written) and close the file."""
        self._queue, self._queued = [], [0, 0]
        self._close_direct()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _close_direct(self) -> None:
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1


def _run_ends(keys: Sequence[Any]) -> list[int]:
    """The end of each run of equal consecutive ``keys``."""
    return [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]] + [len(keys)] if keys else []
