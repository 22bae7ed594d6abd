"""ckptguard.place: allocation (one typed OutOfMemoryError), byte views, copying pieces into
their targets, and the device a tensor loads onto."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckptguard import place
from ckptguard.errors import CheckpointError, OutOfMemoryError
from ckptguard.format.index import Row
from ckptguard.select import Piece, Target


def test_allocate_names_tensor_and_bytes_on_memory_errors_only() -> None:
    def no_memory() -> None:
        raise MemoryError()

    with pytest.raises(OutOfMemoryError) as info:
        place.allocate("model.w", 3 << 20, "host", no_memory)
    assert "3145728 bytes (3.0 MiB) of host memory for tensor 'model.w'" in str(info.value)

    def torch_cpu() -> None:
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    with pytest.raises(OutOfMemoryError):
        place.allocate("k", 1, "host", torch_cpu)

    def other() -> None:
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        place.allocate("k", 1, "host", other)
    assert place.allocate("k", 1, "host", lambda: 7) == 7


def test_host_empty_shapes() -> None:
    t = place.host_empty({"key": "w", "kind": "torch", "dtype": "float16", "shape": [3, 2]})
    assert isinstance(t, torch.Tensor) and t.shape == (3, 2) and t.dtype == torch.float16
    entry = {"key": "r", "kind": "numpy", "dtype": "int32", "shape": [4, 5], "per_rank": True}
    a = place.host_empty(entry)
    assert isinstance(a, np.ndarray) and a.shape == (5,) and a.dtype == np.int32
    tg = place.fresh_target(entry, ((1, 0), (1, 5)))
    assert tg.fresh and tg.fill.shape == (1, 5) and tg.result.shape == (5,)


def test_byte_view() -> None:
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    v = place.byte_view(a)
    assert v is not None and v.dtype == np.uint8 and len(v) == 12
    assert place.byte_view(a.T) is None  # not contiguous
    assert place.byte_view(torch.zeros(2, requires_grad=True)) is None
    assert len(place.byte_view(torch.zeros(3))) == 12


def _row(sbo: int, raw: int) -> Row:
    r = Row.__new__(Row)
    r.shard_byte_offset, r.raw_len = sbo, raw
    return r


def test_a_piece_lands_in_a_buffer_and_is_copied_into_its_part_of_the_target() -> None:
    # Saved shard: rows 4..7 of an 8x3 int32 tensor; the target wants rows 3..5, columns 1..2.
    piece = Piece(((4, 0), (4, 3)), ((4, 1), (2, 2)), 4, 0, 2, [_row(0, 12), _row(12, 12)])
    target = Target(None, torch.zeros(3, 2, dtype=torch.int32), ((3, 1), (3, 2)), False)
    landing, copy = place.land("w", piece, target)
    assert copy and landing.lo == 0 and len(landing.buf) == 24
    saved = np.arange(4 * 3, dtype=np.int32).reshape(4, 3) + 100
    landing.buf[:] = saved.reshape(-1).view(np.uint8)[:24]
    place.copy_block(target, {"dtype": "int32"}, landing)
    assert target.fill.tolist() == [[0, 0], [101, 102], [104, 105]]


def test_a_whole_piece_lands_straight_in_its_target() -> None:
    piece = Piece(((0,), (4,)), ((0,), (4,)), 4, 0, 4, [_row(0, 16)])
    fill = np.zeros(4, dtype=np.float32)
    landing, copy = place.land("w", piece, Target(fill, fill, ((0,), (4,)), True))
    assert not copy
    landing.buf[:] = np.arange(4, dtype=np.float32).view(np.uint8)
    assert fill.tolist() == [0, 1, 2, 3]


def test_device_follows_map_location() -> None:
    e = {"key": "w", "device": "cpu"}
    assert place.device(e, None) == torch.device("cpu")
    assert place.device({**e, "device": "meta"}, {"meta": "cpu"}) == torch.device("cpu")
    assert place.device({**e, "device": "meta"}, lambda d: "cpu") == torch.device("cpu")
    with pytest.raises(CheckpointError, match="not a device this torch knows"):
        place.device({**e, "device": "warp:9"}, None)
