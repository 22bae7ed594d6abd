"""Checks of a data file that read no payload: the one a writer makes of the file it wrote
(restic's pack check), and the one a writer and a reader make of a linked data file (format.md
section 4.3)."""

from __future__ import annotations

import os
from dataclasses import dataclass

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
    check_sealed_header,
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
