"""XOR parity spread over a set of nodes (RAID-5's rotation), and the rebuild of one lost member.

A set has ``n >= 2`` members, ``0 .. n-1``. Member ``i``'s payload (its files, one after the
other) has ``length[i]`` bytes. With ``S = ceil(max(length) / (n - 1))``, the payload padded with
zeros to ``(n - 1) * S`` bytes is cut into ``n - 1`` segments of ``S`` bytes:
``seg(i, s) = payload_i[s*S : (s+1)*S]``.

Member ``j`` keeps one parity segment of ``S`` bytes::

    parity(j) = XOR over i != j of seg(i, (j - i - 1) mod n)

Each segment of each member lies in exactly one parity segment, never in its own member's, so
the set keeps ``S`` bytes per member (``1 / (n - 1)`` of the largest payload) and survives the loss
of any one member: segment ``s`` of a lost member ``m`` is in ``parity(j)`` with
``j = (m + s + 1) mod n``, and is that parity XOR the other segments it covers.

Everything runs in blocks of at most ``block`` bytes of a segment, so memory is
``n * block`` bytes whatever the payload. The functions here are pure: they say what each member
contributes to a block, and the caller reduces the contributions (an MPI ``BXOR`` reduction, or
a loop in one process) and stores the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

from ..errors import RebuildError, RedundancyError

BLOCK = 4 << 20

# read(position, size) -> that many bytes of a member's payload (zeros past its end)
Reader = Callable[[int, int], np.ndarray]


class Layout(NamedTuple):
    """The shape of a set's parity: members, their payload lengths, the segment size."""

    lengths: tuple[int, ...]
    segment: int

    @property
    def n(self) -> int:
        return len(self.lengths)


def layout(lengths: Sequence[int]) -> Layout:
    """The parity layout of a set whose member ``i`` has ``lengths[i]`` payload bytes."""
    if len(lengths) < 2:
        raise RedundancyError(f"an XOR set needs at least 2 members, not {len(lengths)}")
    for i, n in enumerate(lengths):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise RedundancyError(f"member {i}'s payload length {n!r} is not a byte count")
    longest = max(lengths)
    return Layout(tuple(lengths), -(-longest // (len(lengths) - 1)))


def covered_segment(j: int, i: int, n: int) -> int:
    """Which segment of member ``i`` lies in member ``j``'s parity (``i != j``)."""
    return (j - i - 1) % n


def parity_holder(m: int, s: int, n: int) -> int:
    """The member whose parity covers segment ``s`` of member ``m``."""
    return (m + s + 1) % n


def blocks(lay: Layout, block: int = BLOCK) -> Iterator[tuple[int, int]]:
    """(offset within a segment, size) of each block, in order."""
    if block < 1:
        raise RedundancyError(f"block size {block} is not positive")
    for o in range(0, lay.segment, block):
        yield o, min(block, lay.segment - o)


def encode_block(lay: Layout, i: int, read: Reader, offset: int, size: int) -> np.ndarray:
    """Member ``i``'s contribution to block (``offset``, ``size``) of every parity: an
    ``(n, size)`` array whose row ``j`` goes to member ``j`` (row ``i`` is zeros). XOR-reducing
    every member's array and keeping row ``j`` on member ``j`` (a reduce-scatter) gives each its
    parity block."""
    out = np.zeros((lay.n, size), dtype=np.uint8)
    for j in range(lay.n):
        if j != i:
            out[j] = read(covered_segment(j, i, lay.n) * lay.segment + offset, size)
    return out


def rebuild_block(
    lay: Layout, m: int, i: int, read: Reader, parity: Reader, offset: int, size: int
) -> np.ndarray:
    """Survivor ``i``'s contribution to rebuilding block (``offset``, ``size``) of every segment
    of lost member ``m``: an ``(n - 1, size)`` array whose row ``s`` is the parity block if
    ``i`` holds segment ``s``'s parity, else the block of ``i``'s own segment that parity also
    covers (zeros if it covers none of ``i``'s). XOR-reducing every survivor's array gives the
    lost member's segments; ``parity(offset, size)`` reads ``i``'s parity segment."""
    if i == m:
        raise RebuildError(f"member {m} is the one lost; it contributes nothing to its rebuild")
    out = np.zeros((lay.n - 1, size), dtype=np.uint8)
    for s in range(lay.n - 1):
        j = parity_holder(m, s, lay.n)
        if j == i:
            out[s] = parity(offset, size)
        else:
            out[s] = read(covered_segment(j, i, lay.n) * lay.segment + offset, size)
    return out


def placed(lay: Layout, m: int, s: int, offset: int, size: int) -> tuple[int, int]:
    """(position in member ``m``'s payload, bytes to keep) of block (``offset``, ``size``) of
    rebuilt segment ``s``: the padding past the payload's end is dropped."""
    pos = s * lay.segment + offset
    return pos, max(0, min(size, lay.lengths[m] - pos))
