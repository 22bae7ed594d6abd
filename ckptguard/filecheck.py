"""Checks of a data file that read no payload: the one a writer makes of the file it wrote
(restic's pack check), and the one a writer and a reader make of a linked data file (format.md
section 4.3)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .format.datafile import (
    CODECS,
    HEADER_SIZE,
    RECORD_HEADER_SIZE,
    TRAILER_SIZE,
    FormatError,
    check_file_header,
    check_footer,
    check_footer_hash,
    check_record_header,
    check_sealed_header,
    unpack_trailer,
)
from .format.index import Row, has_digests, is_packed, names_of, row_from_json
from .format.index import footer as index_footer
from .format.layout import align
from .fsutil import UnsafeFileError, open_regular
from .io import pread_exact


def recheck_written(
    path: str, size: int, rank: int, uuid_hex: str, footer: bytes, table: pa.Table
) -> None:
    """Re-read the header, every record header and the footer of the data file just written
    at ``path`` (``size`` bytes, index rows ``table`` in file order); FormatError if any
    reads back differently."""
    try:
        fd, _ = open_regular(path, size=size)
    except UnsafeFileError as e:
        raise FormatError(f"{path}: after the write it {e.reason}") from None
    try:
        check_file_header(pread_exact(fd, HEADER_SIZE, 0), rank, uuid_hex)
        offsets = table.column("offset").to_numpy()
        # The first row of each record (the rows of a packed record are consecutive).
        firsts = pa.array(np.flatnonzero(np.diff(offsets, prepend=-1) != 0))
        whole = "record_raw_len" if is_packed(table) else "raw_len"  # a record's raw bytes
        names = ("offset", "codec", "elem_size", whole, "stored_len", "hash", "key_id")
        heads = [table.column(name).take(firsts).to_pylist() for name in names]
        for seq, (off, codec, elem, raw_len, stored, digest, key_id) in enumerate(
            zip(*heads, strict=True)
        ):
            head = pread_exact(fd, RECORD_HEADER_SIZE, off)
            try:
                if key_id is not None:
                    check_sealed_header(head, CODECS[codec], elem, raw_len, stored, seq)
                else:
                    check_record_header(head, CODECS[codec], elem, raw_len, stored, digest, seq)
            except FormatError as e:
                raise FormatError(f"{path}: record at {off} reads back differently ({e})") from None
        off, length, digest = unpack_trailer(
            pread_exact(fd, TRAILER_SIZE, size - TRAILER_SIZE), size
        )
        back = pread_exact(fd, length, off)
        check_footer_hash(back, digest)
        if back != footer:
            raise FormatError(f"{path}: footer reads back differently")
    finally:
        os.close(fd)


@dataclass(frozen=True)
class LinkedFooter:
    """A linked data file's footer, checked: the record of each offset that holds one row
    (``alone``), and every record's sequence number by offset (``seq``)."""

    alone: dict[int, Row]
    seq: dict[int, int]


def check_linked(fd: int, size: int, rank: int, uuid_hex: str) -> LinkedFooter:
    """The footer of a data file that rank ``rank`` wrote for the checkpoint ``uuid_hex`` (open
    as ``fd``, ``size`` bytes), after the checks of format.md section 4.3: header, trailer,
    footer hash and rows, and its records following each other from the header to the footer
    (the rows of one record next to each other, agreeing on its stored length). Raises
    FormatError."""
    if size < HEADER_SIZE + TRAILER_SIZE:
        raise FormatError("data file is too short")
    check_file_header(pread_exact(fd, HEADER_SIZE, 0), rank, uuid_hex)
    off, length, digest = unpack_trailer(pread_exact(fd, TRAILER_SIZE, size - TRAILER_SIZE), size)
    footer = check_footer(pread_exact(fd, length, off), digest, rank, uuid_hex)
    seq: dict[int, int] = {}
    count: dict[int, int] = {}
    first: dict[int, Row] = {}
    end, prev, stored = HEADER_SIZE, -1, -1
    for x in map(row_from_json, footer):
        if type(x.offset) is not int or type(x.stored_len) is not int or x.stored_len < 0:
            raise FormatError("footer row with an invalid offset or stored_len")
        if x.offset in seq:  # another row of the record before (rows come in offset order)
            if x.offset != prev or x.stored_len != stored:
                raise FormatError(f"footer rows at {x.offset} are not one record")
            count[x.offset] += 1
            continue
        if x.offset != end:
            raise FormatError(
                f"footer record at {x.offset} does not follow the previous one at {end}"
            )
        prev, stored = x.offset, x.stored_len
        seq[x.offset], count[x.offset], first[x.offset] = len(seq), 1, x
        end = align(x.offset + RECORD_HEADER_SIZE + x.stored_len)
    if off != end:
        raise FormatError("the footer does not follow the last record")
    return LinkedFooter({o: r for o, r in first.items() if count[o] == 1}, seq)


@dataclass(frozen=True)
class Located:
    """A data file whose rows a reader took from its footer (``footer_rows``): the rows, as
    JSON objects, and the trailer it had, which a later open of the file must find again
    (``check_reopened``) instead of reading and parsing the footer once more."""

    rows: list[dict]
    trailer: bytes


def footer_rows(
    fd: int, size: int, rank: int, uuid_hex: str, check: Callable[[bytes], None]
) -> Located:
    """The footer rows of a checkpoint's own data file (open as ``fd``, ``size`` bytes, written
    by ``rank``), after its header, trailer and footer hash are checked and ``check`` of the
    footer's bytes (against the manifest's locator) passes. Raises FormatError."""
    if size < HEADER_SIZE + TRAILER_SIZE:
        raise FormatError("data file is too short")
    check_file_header(pread_exact(fd, HEADER_SIZE, 0), rank, uuid_hex)
    trailer = pread_exact(fd, TRAILER_SIZE, size - TRAILER_SIZE)
    off, length, digest = unpack_trailer(trailer, size)
    footer = pread_exact(fd, length, off)
    check(footer)
    return Located(check_footer(footer, digest, rank, uuid_hex), trailer)


def footer_follows(rows: pa.Table, trailer: bytes, size: int) -> None:
    """That the footer of a data file starts where its last record (of ``rows``, its index
    rows, each record after the previous as validation checks) ends. Raises FormatError."""
    off, _, _ = unpack_trailer(trailer, size)
    end = HEADER_SIZE
    if rows.num_rows:
        ends = rows.column("offset").to_numpy() + rows.column("stored_len").to_numpy()
        end = align(int(ends.max()) + RECORD_HEADER_SIZE)
    if off != end:
        raise FormatError("the footer does not follow the last record")


def check_reopened(fd: int, size: int, rank: int, uuid_hex: str, trailer: bytes) -> None:
    """A data file opened again after ``footer_rows`` read it: its header, and the trailer it
    had then (so the footer whose rows were taken is still the one there). Raises FormatError."""
    check_file_header(pread_exact(fd, HEADER_SIZE, 0), rank, uuid_hex)
    if pread_exact(fd, TRAILER_SIZE, size - TRAILER_SIZE) != trailer:
        raise FormatError("the trailer changed since the footer was read")


def check_data_file(
    fd: int,
    size: int,
    rank: int,
    uuid_hex: str,
    sub: pa.Table,
    rows: Callable[[], list[Row]],
    footer_check: Callable[[bytes], None] | None = None,
) -> None:
    """Check a checkpoint's own data file (open as ``fd``, ``size`` bytes, written by ``rank``)
    against its index rows ``sub`` (in offset order; ``rows()`` the same as ``Row`` objects):
    header, trailer and footer (and ``footer_check`` of the footer's bytes), and its records
    following each other from the header to the footer. Raises FormatError."""
    if size < HEADER_SIZE + TRAILER_SIZE:
        raise FormatError("data file is too short")
    check_file_header(pread_exact(fd, HEADER_SIZE, 0), rank, uuid_hex)
    off, length, digest = unpack_trailer(pread_exact(fd, TRAILER_SIZE, size - TRAILER_SIZE), size)
    footer = pread_exact(fd, length, off)
    if footer_check is not None:
        footer_check(footer)
    offs = sub.column("offset").to_numpy()
    packed = is_packed(sub) and bool(
        pc.any(pc.not_equal(sub.column("record_raw_len"), sub.column("raw_len"))).as_py()
    )
    # The footer this writer makes of the index's rows: equal bytes (with the hash below)
    # settle it without parsing 10,000s of JSON rows; any other footer is parsed and compared.
    if footer != index_footer(rank, uuid_hex, sub, packed):
        parsed = check_footer(footer, digest, rank, uuid_hex)
        if [row_from_json(x) for x in parsed] != rows():
            raise FormatError("footer rows disagree with the index")
        if any(len(x) != len(names_of(packed, has_digests(sub))) for x in parsed):
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


def check_linked_rows(
    fd: int, size: int, rank: int, holder: str, rows: list[Row], digests: bool
) -> dict[int, int]:
    """Check an open linked data file (format.md section 4.3): the header and footer of the
    holder's file (``rank``, uuid ``holder``), its footer records following each other from the
    header to the footer, and each of this checkpoint's ``rows`` in it the only footer row at
    its offset, agreeing on the record's fields. Returns the sequence numbers its footer gives
    by offset. Raises FormatError."""
    linked = check_linked(fd, size, rank, holder)
    for r in rows:
        held = linked.alone.get(r.offset)
        where = f"index row {r.key!r} chunk {r.chunk} at offset {r.offset}"
        if held is None:
            raise FormatError(f"{where}: not the one footer row at its offset in the linked file")
        if not _same_record(r, held, digests):
            raise FormatError(f"{where}: disagrees with the linked file's footer row")
    return linked.seq


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
