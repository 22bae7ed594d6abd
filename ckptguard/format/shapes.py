"""A manifest's tensor shapes as flat int64 arrays, for the vectorized index checks.

Strides and element counts come from numpy where int64 holds them, and from Python ints for the
(rare) tensors where it might not, so that they are exact, as a per-tensor loop would compute them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shapes:
    """The manifest's tensor shapes, flat: tensor ``i`` has ``nd[i]`` dimensions at
    ``flat[start[i] : start[i] + nd[i]]``."""

    nd: np.ndarray
    flat: np.ndarray
    start: np.ndarray

    @classmethod
    def of(cls, tensors: list[dict]) -> Shapes:
        shapes = [t["shape"] for t in tensors]
        nd = np.fromiter(map(len, shapes), dtype=np.int64, count=len(shapes))
        flat = np.array(list(itertools.chain.from_iterable(shapes)), dtype=np.int64)
        return cls(nd, flat, np.cumsum(nd) - nd)

    def matrix(self, ids: np.ndarray, t_nd: int) -> np.ndarray:
        """The shapes of tensors ``ids`` (each of ``t_nd`` dimensions), one row each."""
        return self.flat[self.start[ids][:, None] + np.arange(t_nd)]

    def strides(self, ids: np.ndarray, t_nd: int) -> np.ndarray:
        """The C-order element strides of tensors ``ids`` (each of ``t_nd`` dimensions), one row
        each; computed with Python ints where int64 could overflow (OverflowError past it)."""
        m = self.matrix(ids, t_nd)
        out = np.ones_like(m)
        approx = np.ones(m.shape)
        if t_nd > 1:
            out[:, :-1] = np.cumprod(m[:, :0:-1], axis=1)[:, ::-1]
            approx[:, :-1] = np.cumprod(m[:, :0:-1].astype(np.float64), axis=1)[:, ::-1]
        for i in np.flatnonzero(~(approx < 2.0**61).all(axis=1)).tolist():
            step = 1
            for d, n in reversed(list(enumerate(m[i].tolist()))):
                out[i, d] = step
                step *= n
        return out

    def volumes(self) -> tuple[np.ndarray, np.ndarray]:
        """Each tensor's number of elements capped at 2**62, and whether it reaches 2**62 (sums
        of such are not exact in int64); computed with Python ints where int64 could overflow."""
        elems = np.ones(len(self.nd), dtype=np.int64)
        big = np.zeros(len(self.nd), dtype=bool)
        for t_nd in np.unique(self.nd).tolist():
            ids = np.flatnonzero(self.nd == t_nd)
            m = self.matrix(ids, t_nd)
            elems[ids] = m.prod(axis=1)
            hard = ids[~(m.astype(np.float64).prod(axis=1) < 2.0**61)]
            for t in hard.tolist():
                total = math.prod(self.flat[self.start[t] : self.start[t] + t_nd].tolist())
                elems[t], big[t] = min(total, 1 << 62), total >= 1 << 62
        return elems, big
