"""Checks of a data file that read no payload: the one a writer makes of the file it wrote
(restic's pack check), and the one a writer and a reader make of a linked data file (format.md
section 4.3)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

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
    unpack_trailer,
)
from .format.index import Row, is_packed, row_from_json
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
        names = ("offset", "codec", "elem_size", whole, "stored_len", "hash")
        heads = [table.column(name).take(firsts).to_pylist() for name in names]
        for seq, (off, codec, elem, raw_len, stored, digest) in enumerate(zip(*heads, strict=True)):
            head = pread_exact(fd, RECORD_HEADER_SIZE, off)
            try:
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


def check_linked(fd: int, size: int, rank: int, uuid_hex: str) -> list[Row]:
    """The footer rows of a data file that rank ``rank`` wrote for the checkpoint ``uuid_hex``
    (open as ``fd``, ``size`` bytes), after the checks a reader makes of a linked data file:
    header, trailer, footer hash and rows, and records that follow each other from the header
    to the footer (by the footer's offsets). Raises FormatError."""
    if size < HEADER_SIZE + TRAILER_SIZE:
        raise FormatError("data file is too short")
    check_file_header(pread_exact(fd, HEADER_SIZE, 0), rank, uuid_hex)
    off, length, digest = unpack_trailer(pread_exact(fd, TRAILER_SIZE, size - TRAILER_SIZE), size)
    footer = check_footer(pread_exact(fd, length, off), digest, rank, uuid_hex)
    rows = [row_from_json(x) for x in footer]
    at = HEADER_SIZE
    for r in sorted({r.offset: r for r in rows}.values(), key=lambda r: r.offset):
        if r.offset != at or r.codec not in CODECS or r.stored_len < 0:
            raise FormatError(f"record at {r.offset} does not follow the previous one at {at}")
        at = align(r.offset + RECORD_HEADER_SIZE + r.stored_len)
    if at != off:
        raise FormatError("the footer does not follow the last record")
    return rows
