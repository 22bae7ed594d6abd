"""Read and verify records: the one path from a data file's bytes to checked raw chunk bytes.

A load (``read_into``), verify (``verify_checkpoint``), the parallel verify and the drain (which
verifies its copy) all check each record with ``format.datafile.check_record`` against its index
row and its sequence number in the file, decode it, and compare the xxh3-128 of its raw bytes
(and their SHA-256, where the index has digests).
Bad bytes raise CorruptCheckpointError naming file, tensor, chunk and offset; a failed read the
StoreError naming the file. Verify collects every problem into a VerifyReport instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import backend as _backend
from . import encode, seal
from .errors import (
    CheckpointError,
    CorruptCheckpointError,
    KeyUnavailableError,
    StoreError,
    location,
)
from .format.datafile import CODECS, FormatError, check_record
from .format.index import Row
from .format.layout import MANIFEST
from .format.ranktrees import RANK_TREE_DIFFS, apply_diff, diff_anchor
from .format.treeids import TREE_TYPES
from .io import pread_exact, read_records
from .open import CheckpointReader, Members
from .sign import TrustSet
from .treeload import TreeError, check_tree

HASH_MISMATCH = "chunk hash mismatch (data corrupted)"
DIGEST_MISMATCH = "chunk digest mismatch (SHA-256: data altered)"


def _what(e: encode.ChunkError) -> str:
    if isinstance(e, encode.ChunkDigestError):
        return DIGEST_MISMATCH
    return HASH_MISMATCH if isinstance(e, encode.ChunkHashError) else e.reason


def _where(r: Row) -> dict[str, Any]:
    return {"file": r.file, "key": r.key, "chunk": r.chunk, "offset": r.offset}


def read_record(rd: CheckpointReader, fd: int, r: Row, verify: bool = True) -> bytes:
    """The raw bytes of row ``r``'s record in open data file ``fd``, checked (record header,
    padding, decode, and with ``verify`` the hash and digest) before they are returned: all of
    them, also where the record is packed and ``r`` is one slice of it."""
    if r.key_id is not None and _backend.name() == _backend.NATIVE:
        out = bytearray(r.record_raw_len)  # opened by the native read pipeline
        read_whole_records(rd, fd, [r], [out], verify)
        return bytes(out)
    try:
        buf = pread_exact(fd, r.extent - r.offset, r.offset)
    except OSError as e:
        raise rd.io_error(e, r.file) from None
    codec_id = CODECS[r.codec]
    if r.key_id is not None:
        return _read_sealed(rd, r, buf, verify)
    try:
        if len(buf) != r.extent - r.offset:
            raise FormatError("record is truncated")
        payload = check_record(
            buf, codec_id, r.elem_size, r.record_raw_len, r.stored_len, r.hash, rd.seq(r)
        )
        raw = encode.decode(codec_id, payload, r.record_raw_len, r.elem_size)
    except FormatError as e:
        raise rd.corrupt(str(e), **_where(r)) from None
    if verify and encode.digest(raw) != r.hash:
        raise rd.corrupt(HASH_MISMATCH, **_where(r))
    if verify and r.digest is not None and encode.sha256(raw) != r.digest:
        raise rd.corrupt(DIGEST_MISMATCH, **_where(r))
    return raw


def _read_sealed(rd: CheckpointReader, r: Row, buf: bytes, verify: bool) -> bytes:
    """``read_record`` of a sealed record (format.md 4.4): checked as stored, decrypted,
    decoded and (with ``verify``) its fingerprint compared. KeyUnavailableError (naming the
    scope) where its data key cannot be had."""
    scope = rd.scope(r.key_id)  # type: ignore[arg-type]
    uuid, rank = rd.owner(r.file)
    try:
        if len(buf) != r.extent - r.offset:
            raise FormatError("record is truncated")
        return seal.read_sealed(
            buf,
            scope,
            uuid,
            rank,
            CODECS[r.codec],
            r.elem_size,
            r.record_raw_len,
            r.stored_len,
            r.hash,
            rd.seq(r),
            rd.record_rows(r),
            verify,
            r.digest,
        )
    except FormatError as e:
        raise rd.corrupt(str(e), **_where(r)) from None


def check_stored(rd: CheckpointReader, fd: int, r: Row) -> None:
    """What can be checked of row ``r``'s sealed record without its data key (its header, its
    padding, its stored bytes' xxh3-128 and, under ``digests``, their SHA-256); raises
    CorruptCheckpointError."""
    try:
        buf = pread_exact(fd, r.extent - r.offset, r.offset)
    except OSError as e:
        raise rd.io_error(e, r.file) from None
    try:
        if len(buf) != r.extent - r.offset:
            raise FormatError("record is truncated")
        seal.check_stored(
            buf, CODECS[r.codec], r.elem_size, r.record_raw_len, r.stored_len, rd.seq(r), r.digest
        )
    except FormatError as e:
        raise rd.corrupt(str(e), **_where(r)) from None


def _read_each(
    rd: CheckpointReader,
    fd: int,
    rows: Sequence[Row],
    dests: Sequence[Any],
    dest_offsets: Sequence[int],
    verify: bool,
) -> None:
    """Rows read one record at a time (``read_record``, which decrypts sealed ones), in
    parallel, each whole record's bytes into its ``dests`` entry at its ``dest_offsets``."""

    def one(i: int) -> None:
        raw = read_record(rd, fd, rows[i], verify)
        view, off = encode.as_buffer(dests[i], writable=True), dest_offsets[i]
        view[off : off + len(raw)] = raw

    encode.parallel_map(one, range(len(rows)), _backend.default_threads())


def _item(rd: CheckpointReader, r: Row, dest_offset: int) -> encode.ReadItem:
    """Row ``r``'s record as ``io.read_records`` reads it (whole: ``record_raw_len`` bytes) to
    ``dest_offset``; a sealed one with its keys and associated data (the native path opens it;
    KeyUnavailableError where its data key cannot be had)."""
    sealed = None
    if r.key_id is not None:
        scope = rd.scope(r.key_id)
        uuid, rank = rd.owner(r.file)
        seq, rows = rd.seq(r), rd.record_rows(r)
        aad = seal.record_aad(
            uuid, rank, seq, r.key_id, CODECS[r.codec], r.elem_size, r.record_raw_len, rows
        )
        sealed = (scope.record_key(uuid, rank), scope.fingerprint_key, aad)
    return encode.ReadItem(
        r.offset,
        r.extent - r.offset,
        CODECS[r.codec],
        r.elem_size,
        r.record_raw_len,
        r.stored_len,
        r.hash,
        dest_offset,
        rd.seq(r),
        r.digest,
        sealed,
    )


def read_into(
    rd: CheckpointReader,
    fd: int,
    rows: Sequence[Row],
    dest: Any,
    dest_offsets: Sequence[int],
    verify: bool = True,
) -> None:
    """Read, check and decode ``rows`` of one open data file straight into ``dest`` (in parallel
    on the native path); each row's raw bytes land at its ``dest_offsets`` entry. No row may be
    a slice of a packed record (``read_packed`` reads those)."""
    native = _backend.name() == _backend.NATIVE
    if rows and not native and any(r.key_id is not None for r in rows):
        _read_each(rd, fd, rows, [dest] * len(rows), dest_offsets, verify)
        return
    items = [_item(rd, r, off) for r, off in zip(rows, dest_offsets, strict=True)]
    path = os.path.join(rd.path, rows[0].file) if rows else rd.path
    try:
        read_records(fd, path, dest, items, verify=verify)
    except encode.ChunkError as e:
        r = rows[e.index]
        raise rd.corrupt(_what(e), **_where(r)) from None
    except OSError as e:  # native and Python paths alike: errno and the file's path
        raise rd.io_error(e, rows[0].file) from None


def read_packed(
    rd: CheckpointReader,
    fd: int,
    rows: Sequence[Row],
    dests: Sequence[Any],
    dest_offsets: Sequence[int],
    verify: bool = True,
) -> None:
    """Read rows that are slices of packed records, in offset order, from open data file ``fd``:
    each record once (and checked whole: its hash covers every slice), then each row's slice
    copied into its ``dests`` entry (a uint8 array) at its ``dest_offsets`` entry."""
    raw: Any = None
    for i, r in enumerate(rows):
        if i == 0 or r.offset != rows[i - 1].offset:
            raw = memoryview(read_record(rd, fd, r, verify))
        at, off = r.record_byte_offset, dest_offsets[i]
        dests[i][off : off + r.raw_len] = raw[at : at + r.raw_len]


def read_whole_records(
    rd: CheckpointReader, fd: int, rows: Sequence[Row], dests: Sequence[Any], verify: bool = True
) -> None:
    """Read the packed records of ``rows`` (one row of each, which names it in errors) from open
    data file ``fd``, each whole into its ``dests`` entry (a writable buffer of the record's raw
    length), straight from the file on the native path. Each record is checked as
    ``read_record`` checks it (header, padding, decode, with ``verify`` the hash: every slice),
    and damage raises the error ``read_record`` raises for it."""
    path = os.path.join(rd.path, rows[0].file) if rows else rd.path
    native = _backend.name() == _backend.NATIVE
    for r, dest in zip(rows, dests, strict=True):
        if r.key_id is not None and not native:
            _read_each(rd, fd, [r], [dest], [0], verify)
            continue
        item = _item(rd, r, 0)
        try:
            read_records(fd, path, dest, [item], verify=verify)
        except encode.ChunkError as e:
            if r.key_id is None:  # the reference check names this damage (a sealed one: C's)
                read_record(rd, fd, r, verify)
            raise rd.corrupt(_what(e), **_where(r)) from None
        except OSError as e:
            raise rd.io_error(e, r.file) from None


@dataclass(frozen=True)
class Problem:
    """One thing verify found wrong, with where it is."""

    message: str
    file: str | None = None
    key: str | None = None
    chunk: int | None = None
    offset: int | None = None

    def __str__(self) -> str:
        return self.message + location(self.file, self.key, self.chunk, self.offset)


@dataclass
class VerifyReport:
    """Outcome of checking every byte of a checkpoint."""

    path: str
    problems: list[Problem] = field(default_factory=list)
    chunks_checked: int = 0
    bytes_checked: int = 0
    signed_by: str | None = None
    """The key id whose signature verified, when checked under trusted keys."""
    keyless: dict[str, int] = field(default_factory=dict)
    """Sealed records checked without their data key, by scope: their stored bytes (header,
    padding, the xxh3-128 of the ciphertext and, under ``digests``, its SHA-256) were checked,
    their plaintext (authentication tag, decoding, hash) was not (docs/security.md)."""
    key_errors: dict[str, str] = field(default_factory=dict)
    """Why each scope of ``keyless`` had no key (KEK missing or wrong, scope shredded)."""

    @property
    def ok(self) -> bool:
        return not self.problems


def problem_of(e: CorruptCheckpointError) -> Problem:
    """The problem a corruption error reports."""
    return Problem(e.reason, e.file, e.key, e.chunk, e.offset)


def damaged_side(
    copy: VerifyReport, source: VerifyReport, copied: str, why: str
) -> CheckpointError:
    """The error of a copy whose verify (``copy``) found problems, given a verify of its source
    (``source``): where the source is damaged, a CorruptCheckpointError naming its first
    problem; else a StoreError of the destination: ``copied`` (what the copy is) does not
    verify although the source does, and ``why``."""
    if not source.ok:
        p = source.problems[0]
        more = f" (and {len(source.problems) - 1} more)" if len(source.problems) > 1 else ""
        return CorruptCheckpointError(
            f"source checkpoint is damaged, not drained: {p.message}{more}",
            path=source.path,
            file=p.file,
            key=p.key,
            chunk=p.chunk,
            offset=p.offset,
        )
    return StoreError(
        f"{copied} does not verify although the source does ({copy.problems[0]}): {why}",
        copy.path,
    )


def verify_checkpoint(
    path: str | Callable[[], Members],
    progress: Callable[[int, int], None] | None = None,
    trust: TrustSet | None = None,
) -> VerifyReport:
    """Check manifest, index and every chunk; collect all problems rather than stop at one.
    ``path``: a checkpoint's path, or what opens the members of one that is not a directory
    (a file object's one-file checkpoint, a checkpoint in an object store).
    Under ``trust`` the signature too: a SignatureError is raised, not reported."""
    try:
        rd = CheckpointReader(path if isinstance(path, str) else path(), trust)
    except CorruptCheckpointError as e:
        return VerifyReport(path if isinstance(path, str) else e.path or "", [problem_of(e)])
    report = VerifyReport(path if isinstance(path, str) else rd.path)
    report.signed_by = rd.signed.key_id if rd.signed else None
    with rd:
        verify_rows(
            rd, [(name, rd.rows_of_file(name)) for name in sorted(rd.files)], report, progress
        )
        check_trees(rd, report)
    return report


def verify_rows(
    rd: CheckpointReader,
    parts: Sequence[tuple[str, Sequence[Row]]],
    report: VerifyReport,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Check the data files named in ``parts`` (each opened and checked whole: header, footer
    against the index), then the given rows of each; add what is wrong to ``report``. A file that
    is missing or not a safe regular file gives one problem without a chunk, and its rows are
    skipped; one that cannot be read (permission denied, EIO) raises the reader's StoreError, as
    nothing is known of its bytes. ``progress`` counts the stored bytes of these rows."""
    total = sum(
        r.stored_len
        for _, rows in parts
        for i, r in enumerate(rows)
        if i == 0 or r.offset != rows[i - 1].offset
    )
    done = 0
    for name, rows in parts:
        try:
            fd = rd.open_file(name)
        except CorruptCheckpointError as e:
            report.problems.append(problem_of(e))
            continue
        ok = 0  # whether the record of the row before checked out
        try:
            for i, r in enumerate(rows):
                if i and r.offset == rows[i - 1].offset:  # a packed record read once, whole
                    report.chunks_checked += ok
                    report.bytes_checked += r.raw_len * ok
                    continue
                ok = 0
                try:
                    _verify_record(rd, fd, r, report)
                    ok = 1
                    report.chunks_checked += 1
                    report.bytes_checked += r.raw_len
                except CorruptCheckpointError as e:
                    report.problems.append(_packed_problem(problem_of(e), rows, i))
                done += r.stored_len
                if progress:
                    progress(done, total)
        finally:
            os.close(fd)


def _packed_problem(p: Problem, rows: Sequence[Row], i: int) -> Problem:
    """``p``, found in the record of ``rows[i]``; where that record is packed, its message also
    names the other tensors whose bytes it holds (the record's hash covers them all, so any of
    them may be the damaged one)."""
    j = i + 1
    while j < len(rows) and rows[j].offset == rows[i].offset:
        j += 1
    if j == i + 1:
        return p
    others = [r.key for r in rows[i + 1 : j]]
    more = f" and {len(others) - _SHOWN} more" if len(others) > _SHOWN else ""
    return replace(
        p, message=f"{p.message}; the record also holds {', '.join(others[:_SHOWN])}{more}"
    )


_SHOWN = 16


def _verify_record(rd: CheckpointReader, fd: int, r: Row, report: VerifyReport) -> None:
    """Check row ``r``'s record whole; a sealed one whose data key cannot be had is checked as
    stored (``check_stored``) and counted in ``report.keyless`` under its scope."""
    if r.key_id is not None:
        try:
            rd.scope(r.key_id)
        except KeyUnavailableError as e:
            check_stored(rd, fd, r)
            name = rd.key_scopes[r.key_id]
            report.keyless[name] = report.keyless.get(name, 0) + 1
            report.key_errors.setdefault(name, str(e))
            return
    read_record(rd, fd, r, verify=True)


def check_trees(rd: CheckpointReader, report: VerifyReport) -> None:
    """Check the manifest's object trees against the tensor list (once per checkpoint)."""
    m, n = rd.manifest, len(rd.tensors)
    types = TREE_TYPES in rd.features
    try:
        check_tree(m["tree"], n, types=types)
        for value in m["rank_trees"].values():
            if RANK_TREE_DIFFS not in rd.features:
                check_tree(value, n, types=types)
                continue
            # Only the values a diff replaces (or the tagged value around them) are new: each is
            # checked once, at its depth, in the rank's tree; the rest is rank 0's, checked above.
            tree = apply_diff(m["tree"], value)
            anchors = {}
            for path, _ in value:
                k, depth = diff_anchor(m["tree"], path)
                anchors[tuple(path[:k])] = depth
            for prefix, depth in anchors.items():
                node = tree
                for step in prefix:
                    node = node[step]
                check_tree(node, n, depth, types)
    except TreeError as e:
        report.problems.append(Problem(f"object tree is malformed: {e}", MANIFEST))
