"""format/shapes.py: strides and element counts of many shapes at once, exact as a per-tensor
loop over Python ints computes them, also where int64 would overflow."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from ckptguard.format.shapes import Shapes

pytestmark = pytest.mark.backend_independent


def _strides(shape: list[int]) -> list[int]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return out[::-1]


def _shapes(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    dims = [0, 1, 2, 3, 7, 1 << 20, 1 << 31, (1 << 62) - 1]
    return [[rng.choice(dims) for _ in range(rng.randrange(5))] for _ in range(200)]


@pytest.mark.parametrize("seed", range(5))
def test_volumes_are_the_python_products_capped(seed: int) -> None:
    shapes = _shapes(seed)
    elems, big = Shapes.of([{"shape": s} for s in shapes]).volumes()
    total = [math.prod(s) for s in shapes]
    assert elems.tolist() == [min(x, 1 << 62) for x in total]
    assert big.tolist() == [x >= 1 << 62 for x in total]


@pytest.mark.parametrize("seed", range(5))
def test_strides_are_the_python_strides(seed: int) -> None:
    shapes = [s for s in _shapes(seed) if max(_strides(s), default=0) < 1 << 63]
    sh = Shapes.of([{"shape": s} for s in shapes])
    for nd in range(5):
        ids = np.array([i for i, s in enumerate(shapes) if len(s) == nd], dtype=np.int64)
        got = sh.strides(ids, nd).tolist()
        assert got == [_strides(shapes[i]) for i in ids.tolist()]


def test_a_stride_past_int64_raises_overflow_as_the_loop_did() -> None:
    sh = Shapes.of([{"shape": [0, 1 << 40, 1 << 40]}])
    with pytest.raises(OverflowError):
        sh.strides(np.array([0]), 3)
