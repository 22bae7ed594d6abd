"""A load gives the tensors of a packed record (docs/format.md section 4.1) one buffer and each
tensor a view of it: every dtype, shape and stride as saved, views of one record only, every
record checked before a tensor of it is returned, templates filled in place, devices mapped."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import flip_byte

import ckptguard
from ckptguard import place
from ckptguard.errors import CorruptCheckpointError, UnsupportedObjectError
from ckptguard.open import CheckpointReader
from ckptguard.read import read_record
from ckptguard.shard import PerRank, Shard


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    return {
        "f32": [torch.randn(100, generator=g) for _ in range(30)],
        "i32": torch.arange(-20, 30, dtype=torch.int32),  # element size 4: packed with the fp32
        "m2d": torch.randn(6, 7, generator=g),
        "m3d": torch.randn(2, 3, 4, generator=g),
        "scalar": torch.tensor(2.5),
        "bf16": [torch.randn(33, generator=g).bfloat16() for _ in range(3)],
        "f16": [torch.randn(5, 4, generator=g).half() for _ in range(3)],
        "i16": torch.arange(9, dtype=torch.int16),
        "i8": [torch.arange(-5, 6, dtype=torch.int8), torch.arange(7, dtype=torch.int8)],
        "u8": torch.arange(10, dtype=torch.uint8),
        "flags": torch.tensor([True, False, True, True]),
        "f64": [torch.randn(3, generator=g, dtype=torch.float64) for _ in range(2)],
        "c64": [torch.randn(4, generator=g, dtype=torch.complex64) for _ in range(2)],
        "np32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "param": torch.nn.Parameter(torch.randn(8, generator=g)),
        "grad": torch.randn(8, generator=g).requires_grad_(),
        "frozen": torch.nn.Parameter(torch.randn(8, generator=g), requires_grad=False),
        "big": torch.randn(1 << 17, generator=g),  # 512 KiB: a record of its own
        "meta": {"step": 7},
    }


def _leaves(obj: Any, path: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, x in obj.items() for k, v in _leaves(x, f"{path}/{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, x in enumerate(obj) for k, v in _leaves(x, f"{path}/{i}").items()}
    return {path: obj}


def _same(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.strides == want.strides and np.array_equal(got, want)
        assert got.flags.writeable
        return
    if not isinstance(want, torch.Tensor):
        assert got == want
        return
    assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
    assert got.is_contiguous() and got.device == want.device
    assert got.requires_grad == want.requires_grad and got.is_leaf
    assert torch.equal(got.detach(), want.detach())


def _records(path: str) -> dict[str, tuple[str, int]]:
    """Each tensor key's record: its file and offset."""
    with CheckpointReader(path) as rd:
        t = rd.table
        keys, files = t.column("key").to_pylist(), t.column("file").to_pylist()
        offs = t.column("offset").to_pylist()
    return {k: (f, o) for k, f, o in zip(keys, files, offs, strict=True)}


@pytest.fixture(params=["none", "lz4"])
def saved(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    state = _state()
    path = str(tmp_path / "s" / "c")
    ckptguard.save(state, path, compress=request.param, chunk_size=4096)
    return path, state


def test_every_small_tensor_loads_as_saved(saved: tuple[str, dict]) -> None:
    path, state = saved
    rec = _records(path)
    assert len(set(rec.values())) < len(rec) / 3  # most tensors share records
    got, want = _leaves(ckptguard.load(path)), _leaves(state)
    assert got.keys() == want.keys()
    for k in want:
        _same(got[k], want[k])


def test_views_share_a_buffer_with_their_record_only(saved: tuple[str, dict]) -> None:
    path, state = saved
    rec = _records(path)
    out = ckptguard.load(path)
    tensors = {k[1:]: v for k, v in _leaves(out).items() if isinstance(v, torch.Tensor)}
    ptr = {k: t.untyped_storage().data_ptr() for k, t in tensors.items()}
    for a in tensors:
        for b in tensors:
            assert (ptr[a] == ptr[b]) == (a == b or rec[a] == rec[b]), (a, b)
    # Views do not overlap: writing every tensor of one record leaves all the others as saved.
    first = rec["f32/0"]
    with torch.no_grad():
        for k, t in tensors.items():
            if rec[k] == first:
                t.zero_()
    want = _leaves(state)
    for k in tensors:
        if rec[k] != first:
            _same(_leaves(out)["/" + k], want["/" + k])
    # A kept tensor holds its record's raw bytes (at most the chunk size), no more.
    with CheckpointReader(path) as rd:
        row = next(r for r in rd.rows if r.key == "f32/1")
    assert row.packed and tensors["f32/1"].untyped_storage().nbytes() == row.record_raw_len <= 4096


def test_a_damaged_pack_fails_every_load_before_any_tensor_returns(tmp_path: Path) -> None:
    path = str(tmp_path / "s" / "c")
    ckptguard.save(
        {f"t{i}": torch.full((100,), float(i)) for i in range(40)},
        path,
        chunk_size=4096,
        compress="none",
    )
    with CheckpointReader(path) as rd:
        (r,) = [r for r in rd.rows if r.key == "t25"]
        first = next(x for x in rd.rows_of_file(r.file) if x.offset == r.offset)
    assert r.packed and first.record_byte_offset == 0
    flip_byte(os.path.join(path, r.file), r.offset + 64 + r.record_byte_offset + 3)
    with pytest.raises(CorruptCheckpointError, match="hash mismatch") as ei:
        ckptguard.load(path)
    e = ei.value
    assert (e.file, e.offset, e.key, e.chunk) == (r.file, r.offset, first.key, first.chunk)
    # Without the hash check the bytes load as they are (the caller opted out).
    assert not torch.equal(ckptguard.load(path, verify=False)["t25"], torch.full((100,), 25.0))


def test_a_damaged_pack_header_gives_the_record_checks_own_error(tmp_path: Path) -> None:
    path = str(tmp_path / "s" / "c")
    ckptguard.save(
        {f"t{i}": torch.full((100,), float(i)) for i in range(40)},
        path,
        chunk_size=4096,
        compress="none",
    )
    with CheckpointReader(path) as rd:
        r = next(r for r in rd.rows if r.key == "t3")
        r = next(x for x in rd.rows_of_file(r.file) if x.offset == r.offset)  # its first row
    flip_byte(os.path.join(path, r.file), r.offset)  # the record magic
    with CheckpointReader(path) as rd:
        fd = rd.open_file(r.file)
        try:
            with pytest.raises(CorruptCheckpointError) as ref:
                read_record(rd, fd, r)
        finally:
            os.close(fd)
    with pytest.raises(CorruptCheckpointError) as ei:
        ckptguard.load(path)
    assert str(ei.value) == str(ref.value) and "magic" in ei.value.reason


def test_a_template_is_filled_in_place_and_the_rest_loads_whole(saved: tuple[str, dict]) -> None:
    path, state = saved
    mine = torch.zeros(100)
    part = torch.zeros(30)
    template = {"f32": [mine, Shard(part, (100,), (50,))]}
    before = (mine.data_ptr(), part.data_ptr())
    out = ckptguard.load(path, template=template)
    assert out["f32"][0] is mine and (mine.data_ptr(), part.data_ptr()) == before
    assert torch.equal(mine, state["f32"][0])
    assert out["f32"][1] is template["f32"][1]
    assert torch.equal(part, state["f32"][1][50:80])
    _same(out["f32"][2], state["f32"][2])  # not in the template: a view of its record
    _same(out["bf16"][1], state["bf16"][1])


def test_map_location_moves_each_pack_once_per_device(saved: tuple[str, dict]) -> None:
    path, state = saved
    asked: list[str] = []

    def where(saved_on: str) -> str:
        asked.append(saved_on)
        return "meta"

    for loc in ("meta", {"cpu": "meta"}, where):
        out = ckptguard.load(path, map_location=loc)
        for k, want in _leaves(state).items():
            got = _leaves(out)[k]
            if isinstance(want, torch.Tensor):
                assert got.device.type == "meta", k
                assert (got.dtype, got.shape, got.stride()) == (
                    want.dtype,
                    want.shape,
                    want.stride(),
                )
                assert type(got) is type(want) and got.requires_grad == want.requires_grad
            elif isinstance(want, np.ndarray):
                assert np.array_equal(got, want)
    assert asked and set(asked) == {"cpu"}
    _same(ckptguard.load(path, map_location="cpu")["f16"][2], state["f16"][2])


def test_per_rank_small_tensors_load_as_their_rank(tmp_path: Path) -> None:
    path = str(tmp_path / "s" / "c")
    state = {
        "rng": PerRank(torch.arange(8, dtype=torch.uint8)),
        "u": torch.ones(8, dtype=torch.uint8),
    }
    ckptguard.save(state, path)
    out = ckptguard.load(path, rank=0)
    assert torch.equal(out["rng"], torch.arange(8, dtype=torch.uint8)) and out["rng"].shape == (8,)
    assert torch.equal(out["u"], torch.ones(8, dtype=torch.uint8))


def test_a_dtype_this_torch_lacks_is_refused_before_reading(
    saved: tuple[str, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = saved
    lacking = {k: v for k, v in place.TORCH_BY_NAME.items() if k != "bfloat16"}
    monkeypatch.setattr(place, "TORCH_BY_NAME", lacking)
    with pytest.raises(UnsupportedObjectError, match="no dtype 'bfloat16' .*'bf16/0'"):
        ckptguard.load(path)
