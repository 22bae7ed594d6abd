"""Whether shard boxes tile a tensor (format.md section 4: no two shards overlap, together
they cover every element): one tensor at a time, in n log n for pieces along one dimension,
by painting the grid of cut points for other layouts, pairwise where that grid would be too
large. ``validate`` checks the usual layouts of all tensors at once and comes here for the
rest; the planner checks its replicas' layouts here too."""

from __future__ import annotations

import itertools
import math

import numpy as np

from .datafile import FormatError

MAX_GRID_CELLS = 1 << 22


def check_cover(key: str, shape: list[int], offs: np.ndarray, lens: np.ndarray) -> None:
    """Boxes (one row per shard) must not overlap and must cover ``shape`` exactly."""
    total = math.prod(shape)
    offs, lens = np.asarray(offs, dtype=np.int64), np.asarray(lens, dtype=np.int64)
    if offs.ndim != 2:  # no shards at all
        offs = lens = np.zeros((0, len(shape)), dtype=np.int64)
    vols = lens.prod(axis=1)
    keep = vols > 0 if len(shape) else np.ones(len(offs), dtype=bool)
    offs, lens = offs[keep], lens[keep]
    covered = int(vols[keep].sum()) if len(shape) else len(offs)
    if covered != total:
        raise FormatError(
            f"tensor {key!r}: shards cover {covered} of {total} elements (a gap or an overlap)"
        )
    if len(offs) <= 1:
        return
    split = [
        d for d in range(len(shape)) if (offs[:, d] != 0).any() or (lens[:, d] != shape[d]).any()
    ]
    if len(split) == 1:  # the usual layout: pieces of one dimension, checked in n log n
        d = split[0]
        order = np.argsort(offs[:, d], kind="stable")
        o, n = offs[order, d], lens[order, d]
        if o[0] != 0 or (o[1:] != o[:-1] + n[:-1]).any():
            raise FormatError(f"tensor {key!r}: shards overlap or leave a gap")
        return
    cuts = [
        np.unique(np.concatenate([offs[:, d], offs[:, d] + lens[:, d]])) for d in range(len(shape))
    ]
    cells = math.prod(len(c) - 1 for c in cuts)
    if cells <= MAX_GRID_CELLS and len(shape) <= 8:
        _paint(key, cuts, offs, lens)
    else:
        _pairwise(key, offs, lens)


def _paint(key: str, cuts: list, offs: np.ndarray, lens: np.ndarray) -> None:
    """Count coverage of every grid cell with an n-d difference array: each must be 1."""
    lo = [np.searchsorted(c, offs[:, d]) for d, c in enumerate(cuts)]
    hi = [np.searchsorted(c, offs[:, d] + lens[:, d]) for d, c in enumerate(cuts)]
    diff = np.zeros(tuple(len(c) for c in cuts), dtype=np.int64)
    for corner in itertools.product((0, 1), repeat=len(cuts)):
        idx = tuple(hi[d] if bit else lo[d] for d, bit in enumerate(corner))
        np.add.at(diff, idx, -1 if sum(corner) % 2 else 1)
    for d in range(len(cuts)):
        diff = np.cumsum(diff, axis=d)
    inner = diff[tuple(slice(0, len(c) - 1) for c in cuts)]
    if (inner != 1).any():
        raise FormatError(f"tensor {key!r}: shards overlap")


def _pairwise(key: str, offs: np.ndarray, lens: np.ndarray) -> None:
    ends = offs + lens
    for i in range(len(offs) - 1):
        hit = np.all((offs[i] < ends[i + 1 :]) & (offs[i + 1 :] < ends[i]), axis=1)
        if hit.any():
            raise FormatError(f"tensor {key!r}: shards overlap")
