"""Where index rows put their records (docs/format.md sections 4, 4.1 and 4.3), checked over whole
columns: each row's file is a listed data file of its rank, its record lies inside that file
and after the header, records of a checkpoint's own file follow each other without gaps, those
of a linked data file do not overlap, and the rows of a packed record agree and tile it.

Arrays are sized by rows and by the number of listed files, never by a value a (hostile) row or
file name claims.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .datafile import HEADER_SIZE, RECORD_HEADER_SIZE, FormatError
from .index import DIGEST, PACKED_RECORDS, has_digests, is_packed, one_array
from .layout import ALIGN, datafile_rank, linked_file


def col(table: pa.Table, name: str) -> np.ndarray:
    """An integer column as numpy of its own type (int32 or int64): a view of its buffer, not
    a copy (at ten million rows every widened column would be 80 MB of fresh memory). Checks
    mix them with int64 arrays, which numpy widens as it goes."""
    return one_array(table.column(name)).to_numpy()


BLOCK = 1 << 20


def blocks(n: int) -> list[slice]:
    """Slices of ``BLOCK`` rows covering ``n`` rows. Row-local checks run a block at a time:
    their temporaries (8 MB) come back from the allocator warm, where whole-column ones (80 MB
    at ten million rows) are fresh memory every time, which costs more than the check."""
    return [slice(at, at + BLOCK) for at in range(0, n, BLOCK)]


def per_block(n: int, test: Callable[[slice], np.ndarray]) -> np.ndarray:
    """``test`` (a row-local mask of the rows of a slice) over ``n`` rows, a block at a time."""
    out = np.empty(n, dtype=bool)
    for b in blocks(n):
        out[b] = test(b)
    return out


class Rows:
    """Column arrays plus a way to name the first bad row in an error."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.n = table.num_rows

    def fail(self, mask: np.ndarray, what: str) -> None:
        bad = np.flatnonzero(mask)
        if len(bad):
            i = int(bad[0])
            key = self.table.column("key")[i].as_py()
            chunk = self.table.column("chunk")[i].as_py()
            raise FormatError(f"index row {i} ({key!r} chunk {chunk}): {what}")


class Records:
    """Each row's record fields: its raw length (the row's own unless packed), where the row's
    bytes start in it, its stored length and codec; ``packed``: the index has the
    ``packed-records`` columns."""

    def __init__(self, packed: bool, raw_len: np.ndarray, slice_at: np.ndarray, stored: np.ndarray):
        self.packed, self.raw_len, self.slice_at, self.stored = packed, raw_len, slice_at, stored
        self.codec = np.zeros(0, dtype=np.int64)

    @classmethod
    def of(cls, table: pa.Table, rows: Rows, raw: np.ndarray, features: set) -> Records:
        packed = is_packed(table)
        if packed != (PACKED_RECORDS in features):
            raise FormatError(
                f"index {'has' if packed else 'lacks'} the record_byte_offset and record_raw_len "
                f"columns but the {PACKED_RECORDS} feature is {'not ' if packed else ''}declared"
            )
        stored = col(table, "stored_len")
        if not packed:
            return cls(False, raw, np.zeros(rows.n, dtype=np.int64), stored)
        rlen, at = col(table, "record_raw_len"), col(table, "record_byte_offset")
        rows.fail(
            (at < 0) | (rlen <= 0) | (at > rlen - raw),
            "slice lies outside its record's raw bytes (record_byte_offset, record_raw_len)",
        )
        return cls(True, rlen, at, stored)


def hash_words(table: pa.Table, name: str = "hash") -> np.ndarray:
    """A fixed-size binary column (``hash`` or ``digest``) as uint64 words per row (nulls were
    refused before)."""
    arr = one_array(table.column(name))
    k = arr.type.byte_width // 8
    words = np.frombuffer(arr.buffers()[1], dtype=np.uint64)
    return words[k * arr.offset : k * (arr.offset + len(arr))].reshape(-1, k)


def _packed(keys: tuple[np.ndarray, ...]) -> np.ndarray | None:
    """``keys`` (major first) packed into one int64 per row that sorts as they do, when they
    are not negative and fit in 62 bits together; None otherwise."""
    bits = [max(int(k.max()), 0).bit_length() for k in keys]
    if min(int(k.min()) for k in keys) < 0 or sum(bits) > 62:
        return None
    packed = np.zeros(len(keys[0]), dtype=np.int64)
    for k, b in zip(keys, bits, strict=True):
        packed <<= b  # in place: no fresh array per key
        packed |= k
    return packed


def sort_order(*keys: np.ndarray) -> np.ndarray:
    """Row order by ``keys`` (major first): one stable argsort of a packed key when it fits."""
    packed = _packed(keys)
    if packed is None:
        return np.lexsort(tuple(reversed(keys)))
    return np.argsort(packed, kind="stable")


def order_or_as_is(*keys: np.ndarray) -> np.ndarray | slice:
    """``sort_order``, or ``slice(None)`` (indexes as the identity, gathering nothing) where
    the rows are in that order already, as a save's rows are by file and offset."""
    packed = _packed(keys)
    if packed is not None and not (packed[1:] < packed[:-1]).any():
        return slice(None)
    return sort_order(*keys)


def _file_codes(
    table: pa.Table, rows: Rows, files: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's file as an index into the listed files (``len(files)`` where the row's file is
    not listed), and per code (the last one for no file) the file's size and whether it is a
    linked data file. Fails the rows whose file is not a listed file of the row's rank."""
    names = list(files)
    ranks = np.full(len(names) + 1, -1, dtype=np.int64)
    linked = np.zeros(len(names) + 1, dtype=bool)
    for i, name in enumerate(names):
        own, link = datafile_rank(name), linked_file(name)
        if link is not None:
            ranks[i], linked[i] = link[0], True
        elif own is not None:
            ranks[i] = own
        else:  # the manifest's checks admit only data file names
            raise FormatError(f"manifest.files: {name!r} is not a data file name")
    size = np.array([*files.values(), -1], dtype=np.int64)
    code = pc.index_in(table.column("file"), value_set=pa.array(names, pa.string()))
    file_code = code.fill_null(len(names)).to_numpy(zero_copy_only=False)
    rows.fail(
        ranks[file_code] != col(table, "rank"),
        "data file is not a listed data file of the row's rank",
    )
    return file_code, size, linked


def check_placement(
    table: pa.Table, rows: Rows, files: dict[str, int], rec: Records, elem: np.ndarray
) -> np.ndarray:
    """Every row's record lies in a listed data file of its rank, aligned, after the header and
    inside the file; in a checkpoint's own file each record follows the previous one; in a
    linked file (section 4.3) a row has a ``base``, is a record of its own and overlaps no
    other; a ``base`` nowhere else. ``files`` maps data file names to their sizes. Returns
    each row's file as its position in ``files``."""
    file_code, size, linked = _file_codes(table, rows, files)
    in_link = linked[file_code]
    has_base = table.column("base").is_valid().to_numpy(zero_copy_only=False)
    rows.fail(in_link & ~has_base, "a row of a linked data file without a base")
    rows.fail(~in_link & has_base, "a base on a row that is not in a linked data file")
    if rec.packed:
        rows.fail(
            in_link & ((rec.slice_at != 0) | (rec.raw_len != col(table, "raw_len"))),
            "a row of a linked data file that is a slice of a packed record",
        )
    off, n = col(table, "offset"), rows.n
    rows.fail(
        per_block(n, lambda b: (off[b] < HEADER_SIZE) | (off[b] % ALIGN != 0)),
        "record offset is not aligned data",
    )
    extent = np.empty(n, dtype=np.int64)
    for b in blocks(n):
        extent[b] = (off[b] + RECORD_HEADER_SIZE + rec.stored[b] + ALIGN - 1) // ALIGN * ALIGN
    rows.fail(
        per_block(n, lambda b: extent[b] > size[file_code[b]]),
        "record runs past the end of its file",
    )
    order = order_or_as_is(file_code, off, rec.slice_at)
    f, o, e, link = file_code[order], off[order], extent[order], in_link[order]
    first = np.ones(rows.n, dtype=bool)
    first[1:] = f[1:] != f[:-1]
    same = np.zeros(rows.n, dtype=bool)
    same[1:] = ~first[1:] & (o[1:] == o[:-1])
    bad = np.zeros(rows.n, dtype=bool)
    bad[order] = link & same
    rows.fail(bad, "two rows at one offset of a linked data file")
    # A row that shares the previous row's record (packed: same file and offset) continues it;
    # any other row starts a record, which must follow the previous record in its own file, and
    # may leave a gap (records no row uses) after it in a linked file.
    shares = same & ~link if rec.packed else np.zeros(rows.n, dtype=bool)
    prev_end = np.empty_like(e)
    prev_end[0] = HEADER_SIZE
    prev_end[1:] = e[:-1]
    prev_end[first] = HEADER_SIZE
    bad[order] = link & (o < prev_end)
    rows.fail(bad, "record overlaps the previous one in its linked data file")
    bad[order] = ~link & ~shares & (o != prev_end)
    rows.fail(bad, "record does not follow the previous one in its file (gap or overlap)")
    if rec.packed:
        check_slices(table, rows, rec, elem, order, shares)
    return file_code


def check_slices(
    table: pa.Table,
    rows: Rows,
    rec: Records,
    elem: np.ndarray,
    order: np.ndarray | slice,
    shares: np.ndarray,
) -> None:
    """Rows of one record (``order``: by file, offset, slice start; ``shares``: the row's record
    is the previous row's) agree on every record field, and their slices tile its raw bytes:
    from 0, each where the previous ends, the last at ``record_raw_len``."""
    words = hash_words(table)[order]
    differ = np.zeros(rows.n, dtype=bool)
    for c in (rec.raw_len, rec.stored, rec.codec, elem):
        c = c[order]
        differ[1:] |= c[1:] != c[:-1]
    differ[1:] |= (words[1:] != words[:-1]).any(axis=1)
    if has_digests(table):
        sha = hash_words(table, DIGEST)[order]
        differ[1:] |= (sha[1:] != sha[:-1]).any(axis=1)
    bad = np.zeros(rows.n, dtype=bool)
    bad[order] = shares & differ
    rows.fail(bad, "rows of one record disagree on its fields (lengths, codec, hash, digest)")
    at, end = rec.slice_at[order], (rec.slice_at + col(table, "raw_len"))[order]
    prev_end = np.zeros(rows.n, dtype=np.int64)
    prev_end[1:] = end[:-1]
    prev_end[~shares] = 0
    last = np.ones(rows.n, dtype=bool)
    last[:-1] = ~shares[1:]
    bad[order] = (at != prev_end) | (last & (end != rec.raw_len[order]))
    rows.fail(bad, "slices of one record overlap, leave a gap or do not end at its raw_len")
