"""Read planning for resharding: which chunks of which saved shards a wanted box needs.

A saved shard's bytes are C-ordered, so the rows [a, b) of its first dimension that meet the
wanted box are one contiguous byte range; only chunks overlapping that range are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .format.index import Row

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, lengths)


def intersect(a: Box, b: Box) -> Box | None:
    """The overlap of two boxes, or None if they do not meet (or either is empty)."""
    offs, lens = [], []
    for oa, na, ob, nb in zip(a[0], a[1], b[0], b[1], strict=True):
        lo, hi = max(oa, ob), min(oa + na, ob + nb)
        if hi <= lo:
            return None
        offs.append(lo)
        lens.append(hi - lo)
    return tuple(offs), tuple(lens)


@dataclass
class Piece:
    """Part of one saved shard that a wanted box needs: its rows [row0, row1) as one buffer."""

    shard: Box
    overlap: Box
    elem_size: int
    row0: int
    row1: int
    rows: list[Row] = field(default_factory=list)
    buf: np.ndarray | None = None
    buf_lo: int = 0  # shard byte offset of buf[0]: whole chunks land in buf

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shard[1][1:]) * self.elem_size

    @property
    def span(self) -> tuple[int, int]:
        """Byte range of the needed rows within the saved shard."""
        if not self.shard[1]:  # 0-d tensor: the single element
            return 0, self.elem_size
        return self.row0 * self.row_bytes, self.row1 * self.row_bytes

    @property
    def buffer_bytes(self) -> int:
        """The size of ``allocate``'s buffer: the first needed chunk's start to the last's end."""
        lo = min(r.shard_byte_offset for r in self.rows)
        return max(r.shard_byte_offset + r.raw_len for r in self.rows) - lo

    def allocate(self) -> None:
        """A buffer from the first needed chunk's start to the last one's end."""
        self.buf_lo = min(r.shard_byte_offset for r in self.rows)
        self.buf = np.empty(self.buffer_bytes, dtype=np.uint8)

    def dest_offset(self, r: Row) -> int:
        """Where a chunk's raw bytes go in ``buf``."""
        return r.shard_byte_offset - self.buf_lo

    def block(self) -> np.ndarray:
        """The overlap as an array of shape (*overlap lengths, elem_size) of bytes."""
        lo, hi = self.span
        needed = self.buf[lo - self.buf_lo : hi - self.buf_lo]
        if not self.shard[1]:
            return needed.reshape(self.elem_size)
        rows = needed.reshape(self.row1 - self.row0, *self.shard[1][1:], self.elem_size)
        sl = [slice(0, self.row1 - self.row0)]
        sl += [
            slice(o - so, o - so + n)
            for o, n, so in zip(
                self.overlap[0][1:], self.overlap[1][1:], self.shard[0][1:], strict=True
            )
        ]
        return rows[tuple(sl)]


def plan_reads(rows: list[Row], want: Box) -> list[Piece]:
    """Pieces (with the chunks each needs) covering ``want`` from one tensor's saved rows."""
    shards: dict[Box, list[Row]] = {}
    for r in rows:
        shards.setdefault((r.shard_offsets, r.shard_lengths), []).append(r)
    pieces = []
    for shard, srows in shards.items():
        if not shard[1]:
            pieces.append(Piece(shard, shard, srows[0].elem_size, 0, 1, srows))
            continue
        ov = intersect(shard, want)
        if ov is None:
            continue
        row0 = ov[0][0] - shard[0][0]
        p = Piece(shard, ov, srows[0].elem_size, row0, row0 + ov[1][0])
        lo, hi = p.span
        p.rows = [
            r for r in srows if r.shard_byte_offset < hi and r.shard_byte_offset + r.raw_len > lo
        ]
        pieces.append(p)
    return pieces
