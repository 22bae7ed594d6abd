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
from .seal import scope_name
from .sources import ByteSource, gather, gatherable
from .tree import TensorRef
from .writer import RankWriter

PACK_MAX_TENSOR = 64 << 10
"""The largest tensor (bytes) that is packed: alone, its record would waste at most ~6% on its
header and padding."""


def nbytes(ref: TensorRef) -> int:
    """The bytes of this rank's piece of ``ref``."""
    return math.prod(ref.shape) * SIZES[ref.dtype]


def sizes(refs: Sequence[TensorRef]) -> tuple[np.ndarray, np.ndarray]:
    """(bytes of this rank's piece, element size) of each ref, as int64 arrays."""
    elem = np.fromiter((SIZES[r.dtype] for r in refs), np.int64, len(refs))
    numel = np.fromiter((math.prod(r.shape) for r in refs), np.int64, len(refs))
    return numel * elem, elem


def groups_of(size: np.ndarray, elem: np.ndarray, chunk_size: int) -> list[list[int]]:
    """``plan`` on arrays: the bytes and element size of each tensor, in order.

    Each element size's small tensors fill packs in order, a new pack starting where the next
    would overflow ``chunk_size`` (found by a search in the running sum: one step per pack, not
    per tensor); groups are ordered by their first member."""
    limit = min(PACK_MAX_TENSOR, chunk_size // 4)
    n = len(size)
    head = np.arange(n)  # each tensor's group, named by the group's first member
    small = (size > 0) & (size <= limit)
    for e in np.unique(elem[small]):
        pos = np.flatnonzero(small & (elem == e))
        ends = np.cumsum(size[pos])
        start = 0
        while start < len(pos):
            base = int(ends[start - 1]) if start else 0
            stop = int(np.searchsorted(ends, base + chunk_size, side="right"))
            head[pos[start:stop]] = pos[start]
            start = stop
    order = np.argsort(head, kind="stable")
    cuts = (np.flatnonzero(np.diff(head[order])) + 1).tolist()
    flat = order.tolist()
    return [flat[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True)] if n else []


def plan(todo: Sequence[tuple[int, TensorRef]], chunk_size: int) -> list[list[int]]:
    """Groups of positions in ``todo``, in the order their records are written: a group of one
    is a tensor written alone; a larger one is a pack. A pack takes the place of its first
    member and holds small tensors of one element size, at most ``chunk_size`` bytes in all."""
    return groups_of(*sizes([ref for _, ref in todo]), chunk_size)


class Packer:
    """Feeds one rank's tensors to its writer, small ones in packs (``write``)."""

    def __init__(
        self,
        writer: RankWriter,
        todo: Sequence[tuple[int, TensorRef]],
        codec: int,
        level: int = 0,
    ) -> None:
        self.writer, self.codec, self.level = writer, codec, level
        self.todo = todo
        self.size, elem = sizes([ref for _, ref in todo])
        seal = writer.seal
        if seal is not None:  # a pack is sealed under one key: packs never mix scopes
            names: dict[str | None, int] = {}
            scope = [
                names.setdefault(scope_name(seal.rule, ref.key), len(names)) for _, ref in todo
            ]
            elem = elem + 256 * np.asarray(scope, np.int64)
        self.groups = groups_of(self.size, elem, writer.chunk_size)
        self._buf: np.ndarray | None = None  # a streamed pack being filled: its own copy
        self._fill = 0
        self._starts: list[int] = []
        self.lasting = False  # whether the source's pieces stay valid (set by ``write``)

    def write(self, source: ByteSource) -> None:
        """Write every group's record(s) in order. A pack whose members are all in host memory
        (``sources.gatherable``) is gathered into its buffer in bulk; the other values (tensors
        alone, packs with a device tensor) go through ``source``, in one stream, so that its
        copies overlap the writes as without packs. Every byte is written when it returns (the
        values may change afterwards); pieces of a source whose pieces do not last
        (``ByteSource.lasting``) are written before the next is read."""
        self.lasting = getattr(source, "lasting", False)
        values = [ref.value for _, ref in self.todo]
        bulk = [len(g) > 1 and all(gatherable(values[i]) for i in g) for g in self.groups]
        streamed = [(gi, i) for gi, g in enumerate(self.groups) if not bulk[gi] for i in g]
        done = 0  # groups before this one are written (or streaming)
        for k, raw in source.stream([values[i] for _, i in streamed]):
            gi, i = streamed[k]
            for before in range(done, gi):
                if bulk[before]:
                    self._gathered(self.groups[before], values)
            done = max(done, gi)
            self._streamed(self.groups[gi], i, raw)
        for gi in range(done, len(self.groups)):
            if bulk[gi]:
                self._gathered(self.groups[gi], values)
        if self._buf is not None:
            raise ValueError("a packed tensor's bytes did not all arrive")
        self.writer.flush()

    def _gathered(self, group: list[int], values: list[Any]) -> None:
        size = self.size[group]
        buf = np.empty(int(size.sum()), dtype=np.uint8)
        gather([values[i] for i in group], buf)
        starts = (np.cumsum(size) - size).tolist()
        self._packed(group, starts, buf)

    def _packed(self, group: list[int], starts: list[int], buf: np.ndarray) -> None:
        tids = [self.todo[i][0] for i in group]
        refs = [self.todo[i][1] for i in group]
        self.writer.add_packed(tids, refs, starts, buf, self.codec, self.level)

    def _streamed(self, group: list[int], i: int, raw: Any) -> None:
        """The next bytes of ``todo[i]``, a member of ``group`` (alone: written as they come)."""
        tid, ref = self.todo[i]
        if len(group) == 1:
            self.writer.add(tid, ref, self.codec, raw, self.level, self.lasting)
            return
        view = memoryview(raw).cast("B")
        if self._buf is None:
            self._buf = np.empty(int(self.size[group].sum()), dtype=np.uint8)
        if len(self._starts) < len(group) and group[len(self._starts)] == i:
            self._starts.append(self._fill)  # the first bytes of the next member
        self._buf[self._fill : self._fill + len(view)] = np.frombuffer(view, dtype=np.uint8)
        self._fill += len(view)
        if self._fill == len(self._buf) and len(self._starts) == len(group):
            self._packed(group, self._starts, self._buf)
            self._buf, self._fill, self._starts = None, 0, []
