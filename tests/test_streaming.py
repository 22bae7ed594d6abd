"""Streaming a state larger than the host pool through it, CPU paths.

GPU tensors take the same code with CUDA copies on a side stream; the GPU check covers those
(tests/test_async.py's CUDA tests skip here).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptguard
from ckptguard import HostPoolTooSmallError
from ckptguard import commit as commit_mod
from ckptguard.capture import state_bytes
from ckptguard.sources import (
    DIRECT,
    BufferedSource,
    copy_range,
    gather,
    gatherable,
    tensor_bytes,
)

CHUNK = 64 << 10
POOL = 4 * CHUNK  # two 128 KiB buffers


def big_state(seed: int = 0) -> dict[str, Any]:
    """About 1 MiB: larger than POOL, with values that must be copied and values read in place."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(256, 384, generator=g)
    return {
        "w": w,  # contiguous: read in place
        "tied": w,
        "wt": torch.randn(300, 200, generator=g).t(),  # strided: a view, its storage in place
        "every_other": torch.randn(64, 1000, generator=g)[:, ::2],
        "half": torch.randn(999, 33, generator=g).to(torch.bfloat16).t(),
        "flags": torch.rand(77, 5, generator=g).gt(0.5).t(),
        "cplx": torch.randn(20, 30, dtype=torch.complex64, generator=g).t().conj(),  # copied
        "empty": torch.zeros(0, 5).t(),
        "scalar": torch.tensor(3.5),
        "np_strided": np.arange(40000, dtype=np.float64).reshape(200, 200)[:, ::-2],
        "np": np.arange(100, dtype=np.int16),
        "shard": ckptguard.Shard(torch.randn(10, 4, generator=g).t(), (4, 10), (0, 0)),
        "step": seed,
    }


def clone(state: dict) -> dict:
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.clone()
        elif isinstance(v, np.ndarray):
            out[k] = v.copy()
        elif isinstance(v, ckptguard.Shard):
            out[k] = ckptguard.Shard(v.local.clone(), v.global_shape, v.offsets)
        else:
            out[k] = v
    out["tied"] = out["w"]
    return out


def mutate(state: dict) -> None:
    for k in ("w", "wt", "every_other", "half", "cplx", "scalar"):
        state[k].fill_(-1)
    state["flags"].fill_(False)
    state["np_strided"][...] = 0
    state["np"][...] = 0
    state["shard"].local.fill_(0)


def check(out: dict, want: dict) -> None:
    for k in ("w", "wt", "every_other", "half", "flags", "cplx", "empty", "scalar"):
        assert out[k].dtype == want[k].dtype and torch.equal(out[k], want[k]), k
    assert out["tied"] is out["w"]
    assert np.array_equal(out["np_strided"], want["np_strided"])
    assert np.array_equal(out["np"], want["np"])
    assert torch.equal(out["shard"], want["shard"].local)
    assert out["step"] == want["step"]


def chunk_hashes(path: str) -> list[tuple]:
    t = pq.read_table(os.path.join(path, "index.parquet"), columns=["key", "chunk", "hash"])
    return sorted(zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True))


# -- the staging source on its own --------------------------------------------------------------


@st.composite
def strided(draw: Any) -> torch.Tensor:
    dims = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(0, 6), min_size=dims, max_size=dims))
    dtype = draw(st.sampled_from([torch.float32, torch.int8, torch.bfloat16, torch.float64]))
    t = torch.arange(int(np.prod(shape)) if shape else 1).reshape(shape).to(dtype)
    t = t.permute(*draw(st.permutations(range(dims))))
    step = draw(st.integers(1, 3))
    return t[..., ::step]


@settings(max_examples=300, deadline=None)
@given(strided(), st.data())
def test_copy_range_is_c_order_slice(t: torch.Tensor, data: Any) -> None:
    flat = t.contiguous().reshape(-1)
    start = data.draw(st.integers(0, flat.numel()))
    count = data.draw(st.integers(0, flat.numel() - start))
    dst = torch.full((count,), 99, dtype=t.dtype)
    copy_range(dst, t, start, count, False)
    assert torch.equal(dst, flat[start : start + count])


@settings(max_examples=100, deadline=None)
@given(st.lists(strided(), min_size=1, max_size=4), st.sampled_from([16, 32, 48, 64]))
def test_staged_pieces_are_the_direct_bytes(values: list, piece: int) -> None:
    bufs = [torch.empty(piece, dtype=torch.uint8), torch.empty(piece, dtype=torch.uint8)]
    src = BufferedSource(lambda: bufs)
    got: dict[int, list[bytes]] = {}
    for i, part in src.stream(values):
        got.setdefault(i, []).append(bytes(part))
    for i, v in enumerate(values):
        parts = got.get(i, [])
        assert b"".join(parts) == bytes(tensor_bytes(v)), i
        assert all(len(p) == piece for p in parts[:-1])  # whole pieces but the last
        assert src.digest(v) == DIRECT.digest(v)


@settings(max_examples=100, deadline=None)
@given(st.lists(strided(), min_size=1, max_size=6))
def test_gathered_values_are_their_direct_bytes_back_to_back(values: list) -> None:
    want = b"".join(bytes(tensor_bytes(v)) for v in values)
    out = np.full(len(want), 0xEE, dtype=np.uint8)
    gather(values, out)
    assert out.tobytes() == want


def test_gather_of_every_kind_of_host_value() -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 4, generator=g)
    values = [
        base.t(),  # strided
        base[:, 1],
        torch.tensor(1.5),  # 0-d
        torch.nn.Parameter(torch.randn(3, generator=g)),  # requires grad
        torch.randn(4, dtype=torch.complex64, generator=g).conj(),  # lazy conjugate bit
        torch.randn(3, dtype=torch.complex64, generator=g)._neg_view(),  # lazy negative bit
        torch.randn(5, generator=g).to(torch.bfloat16),
        torch.arange(6, dtype=torch.int32).view(2, 3),
        np.arange(10, dtype=np.float32)[::-3],  # negative strides
        np.arange(4, dtype=np.int32),
        torch.zeros(0),
    ]
    assert all(gatherable(v) for v in values)
    want = b"".join(bytes(tensor_bytes(v)) for v in values)
    out = np.empty(len(want), dtype=np.uint8)
    gather(values, out)
    assert out.tobytes() == want
    with pytest.raises(ValueError, match="exceed"):
        gather(values, np.empty(len(want) - 4, dtype=np.uint8))
    with pytest.raises(ValueError, match="into a buffer of"):
        gather(values, np.empty(len(want) + 4, dtype=np.uint8))


# -- streamed saves through a Checkpointer ------------------------------------------------------


def test_streamed_save_is_bitwise_the_sync_save(store: str) -> None:
    state = big_state(1)
    want = clone(state)
    assert state_bytes(state) > 3 * POOL
    ref = ckptguard.save(state, os.path.join(store, "sync"), chunk_size=CHUNK)
    with ckptguard.Checkpointer(store, max_host_bytes=POOL, chunk_size=CHUNK) as c:
        h = c.save_async(state, "streamed")
        assert h.streamed
        mutate(state)  # save_async returned: everything has been read
        info = h.result()
        assert c.pool.allocated <= POOL
        check(c.load("streamed"), want)
    assert info.raw_bytes == ref.raw_bytes
    assert chunk_hashes(info.path) == chunk_hashes(ref.path)  # same chunks, same bytes
    assert ckptguard.verify(info.path).ok


def test_lazy_streamed_save(store: str) -> None:
    state = big_state(2)
    want = clone(state)
    with ckptguard.Checkpointer(store, max_host_bytes=POOL, chunk_size=CHUNK) as c:
        h = c.save_async(state, "lazy", lazy=True)
        h.wait_snapshot()
        mutate(state)
        h.result()
        check(c.load("lazy"), want)


def test_streamed_commit_runs_after_the_caller_is_released(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    real = commit_mod.publish

    def held(*a: Any, **k: Any) -> Any:
        assert gate.wait(30), "gate never opened"
        return real(*a, **k)

    monkeypatch.setattr(commit_mod, "publish", held)
    state = big_state(3)
    want = clone(state)
    with ckptguard.Checkpointer(store, max_host_bytes=POOL, chunk_size=CHUNK) as c:
        h = c.save_async(state, "bg")  # returns although the commit is held
        assert not h.done()
        assert not os.path.exists(os.path.join(store, "bg"))
        mutate(state)
        gate.set()
        h.result()
        check(c.load("bg"), want)


def test_pool_memory_reused_across_streamed_and_snapshot_saves(store: str) -> None:
    small = {"x": torch.arange(1000.0).reshape(10, 100).t()}  # fits: snapshotted
    with ckptguard.Checkpointer(store, max_host_bytes=POOL, chunk_size=CHUNK, overwrite=True) as c:
        ptrs = set()
        for i in range(6):
            state = big_state(i) if i % 2 else {**small, "i": i}
            c.save_async(state, "s").result()
            assert c.pool.allocated <= POOL
            ptrs |= {r.buf.data_ptr() for r in c.pool.regions}
        assert len(ptrs) <= 3  # regions are reshaped at most once each way, then reused
        check(c.load("s"), clone(big_state(5)))


def test_pool_too_small_for_two_chunks(store: str) -> None:
    state = {"t": torch.zeros(64, 64, dtype=torch.complex64).conj()}  # lazy conjugate: copied
    with ckptguard.Checkpointer(store, max_host_bytes=2048) as c:
        h = c.save_async(state, "t")
        with pytest.raises(HostPoolTooSmallError) as e:
            h.wait_snapshot()
        assert e.value is h.exception()
        assert e.value.needed == 2 * (4 << 20) and e.value.limit == 2048
        assert "max_host_bytes" in str(e.value) and "chunk_size" in str(e.value)
        # contiguous host tensors larger than the pool need no buffer: read in place
        info = c.save({"c": torch.ones(4096)}, "contiguous")
        assert c.pool.allocated == 0 and info.tensors == 1
    assert not os.path.exists(os.path.join(store, "t"))


def test_streamed_error_after_read_reaches_result(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ckptguard.Checkpointer(store, max_host_bytes=POOL, chunk_size=CHUNK) as c:
        c.save({"a": torch.ones(3)}, "good")
        monkeypatch.setenv("CKPTGUARD_FAILPOINT", "save.data_written::eio")
        h = c.save_async(big_state(4), "bad")
        h.wait_snapshot()  # the read completed; the failure came after it
        with pytest.raises(ckptguard.CheckpointError) as e:
            h.result()
        assert "Input/output error" in str(e.value) or "EIO" in str(e.value)
        monkeypatch.delenv("CKPTGUARD_FAILPOINT")
        assert c.load()["a"].tolist() == [1, 1, 1]  # LATEST still the previous checkpoint
    assert sorted(os.listdir(store)) == [".events", ".staging", "LATEST", "good"]  # its failure
    assert os.listdir(os.path.join(store, ".staging")) == []  # the failed save left nothing


def test_streamed_error_before_read_reaches_wait_snapshot(store: str) -> None:
    with ckptguard.Checkpointer(store, max_host_bytes=POOL, chunk_size=CHUNK) as c:
        state = {**big_state(5), "bad": object()}
        h = c.save_async(state, "bad")  # returns: the state could not be read
        with pytest.raises(ckptguard.UnsupportedObjectError) as e:
            h.wait_snapshot()
        assert h.exception() is e.value  # the save failed with it
    assert not os.path.exists(os.path.join(store, "bad"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by the GPU check)")
def test_cuda_state_streams_through_pinned_pool(store: str) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    state = {
        "w": torch.randn(512, 1024, device="cuda", generator=g),
        "wt": torch.randn(700, 300, device="cuda", generator=g).t(),
        "h": torch.randn(333, 77, device="cuda", generator=g).to(torch.bfloat16),
    }
    want = {k: v.cpu() for k, v in state.items()}
    with ckptguard.Checkpointer(store, max_host_bytes=POOL, chunk_size=CHUNK) as c:
        h = c.save_async(state, "gpu")
        assert h.streamed
        for v in state.values():
            v.fill_(0)  # after the caller is released: must not reach the checkpoint
        h.result()
        assert c.pool.allocated <= POOL and all(r.buf.is_pinned() for r in c.pool.regions)
        out = c.load("gpu", map_location="cuda")
    for k, v in want.items():
        assert out[k].is_cuda and torch.equal(out[k].cpu(), v), k
