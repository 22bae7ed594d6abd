"""Packed records: many small tensors of one element size share one record (feature
``packed-records``, docs/format.md section 4.1).

A record costs a 64-byte header, a hash and padding to 4096 bytes: for a 4 KiB tensor alone that
doubles what is stored, and the per-record work dominates its save and load. The save plan here
groups the small tensors of a rank (each at most ``PACK_MAX_TENSOR`` bytes and a quarter of the
chunk size) by element size, in the order they come, into packs of at most ``chunk_size`` bytes;
each pack is written as one record whose raw bytes are its members' bytes back to back. A group of
one is an ordinary record in its ordinary place, so a state without two small tensors of one
element size is written exactly as without packing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .format.dtypes import SIZES
from .tree import TensorRef
from .writer import RankWriter

PACK_MAX_TENSOR = 64 << 10
"""The largest tensor (bytes) that is packed: alone, its record would waste at most ~6% on its
header and padding."""


def nbytes(ref: TensorRef) -> int:
    """The bytes of this rank's piece of ``ref``."""
    return math.prod(ref.shape) * SIZES[ref.dtype]


def plan(todo: Sequence[tuple[int, TensorRef]], chunk_size: int) -> list[list[int]]:
    """Groups of positions in ``todo``, in the order their records are written: a group of one
    is a tensor written alone; a larger one is a pack. A pack takes the place of its first
    member and holds small tensors of one element size, at most ``chunk_size`` bytes in all."""
    limit = min(PACK_MAX_TENSOR, chunk_size // 4)
    groups: list[list[int]] = []
    open_: dict[int, tuple[list[int], int]] = {}  # element size -> its pack being filled, bytes
    for i, (_, ref) in enumerate(todo):
        n = nbytes(ref)
        if not 0 < n <= limit:
            groups.append([i])
            continue
        elem = SIZES[ref.dtype]
        group, used = open_.get(elem, (None, 0))
        if group is None or used + n > chunk_size:
            group, used = [], 0
            groups.append(group)
        group.append(i)
        open_[elem] = (group, used + n)
    return groups


class Packer:
    """Feeds one rank's tensors to its writer, small ones in packs. ``values()`` is the order in
    which ``add`` wants their bytes (each value's bytes whole, or in parts in order)."""

    def __init__(
        self,
        writer: RankWriter,
        todo: Sequence[tuple[int, TensorRef]],
        codec: int,
        level: int = 0,
    ) -> None:
        self.writer, self.codec, self.level = writer, codec, level
        self.todo = todo
        self.groups = plan(todo, writer.chunk_size)
        self.order = [i for g in self.groups for i in g]
        self._group_of = [0] * len(todo)
        for gi, g in enumerate(self.groups):
            for i in g:
                self._group_of[i] = gi
        self._buf: np.ndarray | None = None  # the pack being filled: its own copy of the bytes
        self._fill = 0
        self._members: list[tuple[int, TensorRef, int]] = []

    def values(self) -> list[Any]:
        """The tensors' values in write order."""
        return [self.todo[i][1].value for i in self.order]

    def add(self, k: int, raw: Any) -> None:
        """The next bytes of the ``k``-th value of ``values()``."""
        i = self.order[k]
        tid, ref = self.todo[i]
        group = self.groups[self._group_of[i]]
        if len(group) == 1:
            self.writer.add(tid, ref, self.codec, raw, self.level)
            return
        view = memoryview(raw).cast("B")
        if self._buf is None:
            self._buf = np.empty(sum(nbytes(self.todo[j][1]) for j in group), dtype=np.uint8)
        if not self._members or self._members[-1][0] != tid:
            self._members.append((tid, ref, self._fill))
        self._buf[self._fill : self._fill + len(view)] = np.frombuffer(view, dtype=np.uint8)
        self._fill += len(view)
        if self._fill == len(self._buf) and len(self._members) == len(group):
            self.writer.add_packed(self._members, self._buf, self.codec, self.level)
            self._buf, self._fill, self._members = None, 0, []

    def flush(self) -> None:
        """Check that every pack was completed (each value's bytes arrived whole)."""
        if self._buf is not None:
            raise ValueError("a packed tensor's bytes did not all arrive")
