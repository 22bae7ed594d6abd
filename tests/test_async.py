"""Async saves: snapshot semantics, the reused host pool, background errors, close/cancel, and
memory, threads and file descriptors flat across 100 saves, DTensor/Shard saves across 2 gloo
ranks. CUDA paths skip without a GPU."""

from __future__ import annotations

import gc
import io
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptguard
from ckptguard import CheckpointerClosedError, SaveCancelledError
from ckptguard import checkpointer as ckpt_mod
from ckptguard.capture import state_bytes
from ckptguard.coord.base import LocalCoordinator
from ckptguard.tree import MAX_DEPTH, flatten

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 32, generator=g)
    return {
        "model": {
            "w": w,
            "tied": w,
            "p": torch.nn.Parameter(torch.randn(16, generator=g)),
            "i": torch.arange(100, dtype=torch.int64),
            "half": torch.randn(7, 3, generator=g).to(torch.bfloat16),
            "cols": torch.randn(8, 8, generator=g).t(),  # non-contiguous
        },
        "shard": ckptguard.Shard(torch.randn(4, 5, generator=g), (4, 5), (0, 0)),
        "np": np.arange(12, dtype=np.float32).reshape(3, 4),
        "extra": [1, 2.5, "x", (3, None)],
        "step": seed,
    }


def clone(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: clone(v) for k, v in state.items()}
    if isinstance(state, list):
        return [clone(v) for v in state]
    if isinstance(state, tuple):
        return tuple(clone(v) for v in state)
    if isinstance(state, ckptguard.Shard):
        return ckptguard.Shard(state.local.detach().clone(), state.global_shape, state.offsets)
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, np.ndarray):
        return state.copy()
    return state


def mutate(state: dict) -> None:
    with torch.no_grad():
        state["model"]["w"].add_(1)
        state["model"]["p"].mul_(-1)
        state["model"]["i"].zero_()
        state["model"]["half"].fill_(3)
        state["model"]["cols"].fill_(7)
        state["shard"].local.fill_(9)
    state["np"][:] = -1
    state["extra"][3] = "changed"


def check_loaded(out: dict, want: dict) -> None:
    m, wm = out["model"], want["model"]
    for k in ("w", "p", "i", "half", "cols"):
        assert torch.equal(m[k].detach(), wm[k].detach()), k
    assert m["w"] is m["tied"]  # tied weights stay tied through the snapshot
    assert isinstance(m["p"], torch.nn.Parameter)
    assert torch.equal(out["shard"], want["shard"].local)
    assert np.array_equal(out["np"], want["np"])
    assert out["extra"] == want["extra"]
    assert out["step"] == want["step"]


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Holds every background persist until the test sets it."""
    ev = threading.Event()
    ev.entered = threading.Event()  # type: ignore[attr-defined] # a persist reached the gate
    real = ckpt_mod.api.save

    def gated(*a: Any, **k: Any) -> Any:
        ev.entered.set()  # type: ignore[attr-defined]
        assert ev.wait(30), "test gate never opened"
        return real(*a, **k)

    monkeypatch.setattr(ckpt_mod.api, "save", gated)
    yield ev
    ev.set()


def ckpt_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ckptguard-")]


def test_snapshot_then_caller_mutates(store: str) -> None:
    state = make_state(1)
    want = clone(state)
    with ckptguard.Checkpointer(store) as c:
        h = c.save_async(state, "a")
        mutate(state)  # allowed: save_async returned after the snapshot
        info = h.result()
        assert h.done() and info.name == "a"
        check_loaded(c.load("a"), want)
        check_loaded(c.load(), want)  # the store's LATEST


def test_mutation_while_persist_is_held(store: str, gate: threading.Event) -> None:
    state = make_state(2)
    want = clone(state)
    with ckptguard.Checkpointer(store) as c:
        h = c.save_async(state, "a")
        assert not h.done()  # the persist is held: the caller did not wait for it
        mutate(state)
        gate.set()
        h.result()
        check_loaded(ckptguard.load(os.path.join(store, "a")), want)


def test_lazy_snapshot(store: str) -> None:
    state = make_state(3)
    want = clone(state)
    with ckptguard.Checkpointer(store) as c:
        h = c.save_async(state, "lazy", lazy=True)
        h.wait_snapshot()
        mutate(state)
        assert h.result().name == "lazy"
        check_loaded(c.load("lazy"), want)


def test_next_save_waits_for_snapshot_not_commit(store: str, gate: threading.Event) -> None:
    with ckptguard.Checkpointer(store, max_inflight=1) as c:
        s1, s2, s3 = make_state(1), make_state(2), make_state(3)
        w1, w2, w3 = clone(s1), clone(s2), clone(s3)
        h1 = c.save_async(s1, "one")
        h2 = c.save_async(s2, "two")  # captured into the second pool region
        assert not h1.done() and not h2.done()
        mutate(s1)
        mutate(s2)
        h3 = c.save_async(s3, "three", lazy=True)  # both regions are held: it must wait
        with pytest.raises(TimeoutError):
            h3.wait_snapshot(timeout=0.2)
        gate.set()
        h3.wait_snapshot()
        mutate(s3)
        assert [h.result().name for h in (h1, h2, h3)] == ["one", "two", "three"]
        for name, want in (("one", w1), ("two", w2), ("three", w3)):
            check_loaded(c.load(name), want)
        assert len(c.pool.regions) == 2


def test_background_error_reaches_result(store: str) -> None:
    with ckptguard.Checkpointer(store) as c:
        h = c.save_async({"bad": object()}, "bad")
        with pytest.raises(ckptguard.UnsupportedObjectError) as e0:
            h.wait_snapshot()  # the state cannot be captured
        with pytest.raises(ckptguard.UnsupportedObjectError) as e1:
            h.result()
        with pytest.raises(ckptguard.UnsupportedObjectError) as e2:
            h.result()
        assert e0.value is e1.value is e2.value is h.exception()
        assert e1.value.key_path == "bad"
        c.save({"x": torch.ones(3)}, "ok")  # the checkpointer is still usable
        with pytest.raises(ckptguard.CheckpointExistsError):
            c.save_async({"x": torch.zeros(3)}, "ok").result()
        assert torch.equal(c.load("ok")["x"], torch.ones(3))
        assert c.save({"x": torch.zeros(3)}, "ok", overwrite=True).name == "ok"
        assert not os.path.exists(os.path.join(store, "bad"))


def _views(x: torch.Tensor) -> dict[str, Any]:
    """Tensors that share ``x``'s storage but not (all of) its values or shape."""
    return {
        "x": x,
        "again": x,  # the same tensor twice: one tensor
        "conj": x.conj(),  # a conjugate view: same storage, other values
        "neg": torch._neg_view(x),  # a negative view: same storage, other values
        "conj_neg": torch._neg_view(x.conj()),
        "part": x[1:3],  # a view of part of the storage
        "t": x.view(2, 3).t(),  # same storage, other shape and strides
        "same_view": x.view(2, 3),
    }


def _resolved(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().resolve_neg().clone()


def test_save_async_of_conjugate_and_negative_views(store: str) -> None:
    x = torch.randn(6, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    state = _views(x)
    want = {k: _resolved(v) for k, v in state.items()}
    with ckptguard.Checkpointer(store) as c:
        c.save_async(state, "a").result()
        got = c.load("a")
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert got["again"] is got["x"]  # the same tensor stays one tensor
    assert not torch.equal(got["conj"], got["x"]) and not torch.equal(got["neg"], got["x"])


def _nest(depth: int) -> Any:
    """A tensor at nesting depth ``depth`` (each list adds one)."""
    obj: Any = torch.arange(3)
    for _ in range(depth):
        obj = [obj]
    return obj


def _leaves(obj: Any) -> list:
    """The loaded state's leaves in order, with which earlier leaf each one *is* (sharing)."""
    out: list = []
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(reversed(list(v.values())))
        elif isinstance(v, (list, tuple)):
            stack.extend(reversed(v))
        else:
            out.append(v)
    return [(v, next(i for i, w in enumerate(out) if w is v)) for v in out]


def _outcome(save: Any, load: Any) -> Any:
    """("ok", leaves) or ("error", type, message, key path) of one way of saving."""
    try:
        save()
    except ckptguard.CheckpointError as e:
        return ("error", type(e).__name__, str(e), getattr(e, "key_path", None))
    return ("ok", _leaves(load()))


@pytest.mark.parametrize("depth", [MAX_DEPTH, MAX_DEPTH + 1])
def test_capture_and_flatten_agree(store: str, depth: int) -> None:
    """The async path and ``save`` see one tree: the same tensors, shared and kept apart alike,
    and at the depth limit the same result or error."""
    x = torch.randn(6, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    base = torch.arange(10.0)
    state = {
        **_views(x),
        "base": base,
        "slices": [base[2:5], base[2:5], base[::2]],
        "tied": (base, base),
        "deep": _nest(depth - 1),  # the tensor at nesting depth `depth`
    }
    sync_path = os.path.join(store, "sync")
    with ckptguard.Checkpointer(store) as c:
        a = _outcome(lambda: c.save_async(state, "async").result(), lambda: c.load("async"))
    s = _outcome(lambda: ckptguard.save(state, sync_path), lambda: ckptguard.load(sync_path))
    if depth > MAX_DEPTH:
        assert s[:2] == ("error", "UnsupportedObjectError") and "nesting deeper" in s[2]
        assert a == s
        return
    assert a[0] == s[0] == "ok"
    assert [i for _, i in a[1]] == [i for _, i in s[1]]  # the same sharing
    for (va, _), (vs, _) in zip(a[1], s[1], strict=True):
        assert torch.equal(va, vs)
    got = ckptguard.load(os.path.join(store, "async"))
    for k, v in _views(x).items():
        assert torch.equal(got[k], _resolved(v)), k
    assert got["again"] is got["x"] and got["tied"][0] is got["tied"][1] is got["base"]
    first, second = got["slices"][:2]  # two objects of one view: two, sharing memory
    assert first is not second and first is not got["base"]
    assert first.data_ptr() == second.data_ptr() == got["base"].data_ptr() + 2 * 4
    assert flatten(state)[1][-1].key == "deep" + "/0" * (depth - 1)


def test_bad_option_raises_at_once(store: str) -> None:
    with ckptguard.Checkpointer(store) as c:
        with pytest.raises(TypeError):
            c.save_async({"x": torch.ones(1)}, "a", compresss="none")
        with pytest.raises(ValueError):
            ckptguard.Checkpointer(store, max_inflight=0)


def test_pool_allocated_once_and_reused(store: str) -> None:
    state = make_state(4)
    need = state_bytes(state)
    with ckptguard.Checkpointer(store, host_bytes=need, overwrite=True) as c:
        assert len(c.pool.regions) == 2  # allocated at construction
        ptrs = sorted(r.buf.data_ptr() for r in c.pool.regions)
        for i in range(6):
            state["step"] = i
            c.save_async(state, "s")
        c.wait()
        assert sorted(r.buf.data_ptr() for r in c.pool.regions) == ptrs
        assert c.load("s")["step"] == 5


def test_pool_bound_of_one_snapshot(store: str) -> None:
    state = make_state(5)
    need = state_bytes(state)
    with ckptguard.Checkpointer(store, max_host_bytes=need + 64) as c:
        hs = [c.save_async(state, f"s{i}") for i in range(4)]
        assert [h.result().name for h in hs] == ["s0", "s1", "s2", "s3"]
        assert len(c.pool.regions) == 1 and c.pool.allocated <= need + 64
        check_loaded(c.load("s3"), state)


def test_close_waits_for_saves_in_flight(store: str) -> None:
    before = len(ckpt_threads())
    c = ckptguard.Checkpointer(store)
    hs = [c.save_async(make_state(i), f"s{i}", lazy=True) for i in range(4)]
    c.close()
    assert all(h.done() for h in hs)
    assert [h.result().name for h in hs] == ["s0", "s1", "s2", "s3"]
    assert len(ckpt_threads()) == before
    c.close()  # idempotent
    with pytest.raises(CheckpointerClosedError):
        c.save_async(make_state(), "x")
    with pytest.raises(CheckpointerClosedError):
        c.save(make_state(), "x")
    with pytest.raises(CheckpointerClosedError):
        c.load("s0")
    assert ckptguard.Store(store).latest().name == "s3"


def test_close_cancel_abandons_queued_saves(store: str, gate: threading.Event) -> None:
    before = len(ckpt_threads())
    c = ckptguard.Checkpointer(store)
    h1 = c.save_async(make_state(1), "one")  # persisting (held by the gate)
    assert gate.entered.wait(30)  # type: ignore[attr-defined] # its persist has begun
    h2 = c.save_async(make_state(2), "two")  # captured, queued behind it
    h3 = c.save_async(make_state(3), "three", lazy=True)  # waiting for a pool region
    closer = threading.Thread(target=c.close, kwargs={"cancel": True})
    closer.start()
    for _ in range(1000):
        if c._cancel:
            break
        threading.Event().wait(0.01)
    gate.set()
    closer.join(30)
    assert not closer.is_alive()
    assert h1.result().name == "one"  # a persist already running finishes
    for h in (h2, h3):
        with pytest.raises(SaveCancelledError):
            h.result()
    assert [i.name for i in ckptguard.Store(store).list()] == ["one"]
    assert len(ckpt_threads()) == before


def test_module_level_save_async(store: str) -> None:
    state = make_state(6)
    want = clone(state)
    h = ckptguard.save_async(state, os.path.join(store, "m"))
    mutate(state)
    assert h.result().name == "m"
    check_loaded(ckptguard.load(store), want)
    assert isinstance(h, ckptguard.SaveHandle)


@pytest.mark.parametrize("pool", [{}, {"max_host_bytes": 256, "chunk_size": 64}])
def test_one_file_saves_in_the_background(store: str, pool: dict) -> None:
    """A .pt name or one_file=True: one file, written in the background (snapshot or streamed
    through a pool too small for it), renamed over the one there; nothing else in the store."""
    state = make_state(7)
    want = clone(state)
    with ckptguard.Checkpointer(store, **pool) as c:
        h = c.save_async(state, "model.pt")
        h.wait_snapshot()
        mutate(state)
        assert h.result().path == os.path.join(store, "model.pt")
        assert h.streamed == bool(pool)
        check_loaded(c.load("model.pt"), want)
        assert os.path.isfile(os.path.join(store, "model.pt"))
        assert ckptguard.verify(os.path.join(store, "model.pt")).ok
        old = state["step"] = 8
        c.save_async(state, "model.pt").result()  # replaced, overwrite or not
        c.save_async(state, "plain", one_file=True).result()
        c.save_async(state, "dir.pt", one_file=False).result()
    assert ckptguard.load(os.path.join(store, "model.pt"))["step"] == old
    assert os.path.isfile(os.path.join(store, "plain"))
    assert sorted(os.listdir(store)) == [
        ".events",
        ".staging",
        "LATEST",
        "dir.pt",
        "model.pt",
        "plain",
    ]
    assert [i.name for i in ckptguard.Store(store).list()] == ["dir.pt"]


def test_one_file_async_refusals_and_failures(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    class TwoRanks(LocalCoordinator):
        size = 2

    with ckptguard.Checkpointer(store) as c:
        with pytest.raises(ckptguard.OneFileError, match="2 ranks"):  # before any snapshot
            c.save_async({"x": torch.ones(1)}, "m.pt", coordinator=TwoRanks())
        with pytest.raises(TypeError, match="file object"):
            c.save_async({"x": torch.ones(1)}, io.BytesIO())
        assert not os.path.exists(store)
        c.save({"x": torch.ones(2)}, "m.pt")
        before = Path(store, "m.pt").read_bytes()
        monkeypatch.setenv("CKPTGUARD_FAILPOINT", "onefile.appended:0:eio")
        h = c.save_async({"x": torch.zeros(2)}, "m.pt")
        with pytest.raises(ckptguard.StoreError, match="injected"):
            h.result()
    assert Path(store, "m.pt").read_bytes() == before
    assert os.listdir(store) == ["m.pt"]  # the failed save's temporary is gone


def test_module_level_save_async_of_a_one_file_path(store: str) -> None:
    state = make_state(9)
    path = os.path.join(store, "sub", "m.pth")
    ckptguard.save_async(state, path).result()
    check_loaded(ckptguard.load(path), state)
    assert os.listdir(os.path.dirname(path)) == ["m.pth"]


def test_exit_finishes_saves_in_flight(store: str) -> None:
    code = (
        "import sys, torch, ckptguard\n"
        "ckptguard.save_async({'x': torch.arange(1000)}, sys.argv[1], lazy=True)\n"
    )
    path = os.path.join(store, "atexit")
    subprocess.run([sys.executable, "-c", code, path], check=True, timeout=120)
    assert torch.equal(ckptguard.load(path)["x"], torch.arange(1000))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_threads_fds_flat_over_100_saves(store: str) -> None:
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(1024, 1024, generator=g), "b": torch.randn(1 << 20, generator=g)}
    with ckptguard.Checkpointer(store, compress="none", overwrite=True) as c:
        for i in range(10):
            c.save_async(state, "m", lazy=i % 2 == 1)
        c.wait()
        gc.collect()
        rss0, fds0, threads0 = _rss(), len(os.listdir("/proc/self/fd")), threading.active_count()
        pool0 = c.pool.allocated
        handles = []
        for i in range(100):
            state["b"][0] = i
            handles.append(c.save_async(state, "m", lazy=i % 2 == 1))
            handles[-1].wait_snapshot()
        c.wait()
        assert all(h.exception() is None for h in handles)
        gc.collect()
        growth = _rss() - rss0
        assert growth < 16 << 20, f"RSS grew by {growth / 2**20:.1f} MiB over 100 saves"
        assert len(os.listdir("/proc/self/fd")) <= fds0
        assert threading.active_count() <= threads0
        assert c.pool.allocated == pool0
        assert c.load("m")["b"][0].item() == 99


@needs_cuda
def test_cuda_snapshot(store: str) -> None:
    state = {"w": torch.randn(256, 256, device="cuda"), "b": torch.arange(10, device="cuda")}
    want = {k: v.cpu() for k, v in state.items()}
    with ckptguard.Checkpointer(store) as c:
        h = c.save_async(state, "gpu", lazy=True)
        h.wait_snapshot()
        state["w"].add_(1)
        state["b"].zero_()
        h.result()
        out = c.load("gpu")
        assert all(torch.equal(out[k], want[k]) for k in want)
        assert all(r.buf.is_pinned() for r in c.pool.regions)


@needs_cuda
def test_cuda_snapshot_ordered_after_caller_stream(store: str) -> None:
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = torch.zeros(1 << 20, device="cuda")
        x.add_(5)  # queued on the caller's stream; the snapshot must see it
        with ckptguard.Checkpointer(store) as c:
            c.save_async({"x": x}, "ordered").result()
            assert torch.equal(c.load("ordered")["x"], torch.full((1 << 20,), 5.0))


RANK_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
import ckptguard
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, distribute_tensor, Shard as DShard

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
store = sys.argv[1]
pool = {} if sys.argv[2] == "snapshot" else {"max_host_bytes": 256, "chunk_size": 64}
mesh = init_device_mesh("cpu", (world,))
full = torch.arange(40.0).reshape(8, 5)
a, b = rank * 4, rank * 4 + 4
st = {
    "w": distribute_tensor(full.clone(), mesh, [DShard(0)]),
    "b": distribute_tensor(torch.arange(3.0), mesh, [Replicate()]),
    "s": ckptguard.Shard(full[a:b].clone(), (8, 5), (a, 0)),
    "bt": torch.arange(12.0).reshape(3, 4).t(),  # replicated, strided: hashed through staging
    "rank": rank,
}
with ckptguard.Checkpointer(store, coordinator="torch", timeout=60, **pool) as c:
    handles = []
    for i in range(3):
        handles.append(c.save_async(st, f"s{i}", step=i, lazy=i == 1))
        handles[-1].wait_snapshot()
        assert handles[-1].streamed == bool(pool)
        with torch.no_grad():  # the next step changes the state while the save persists
            st["w"].to_local().add_(100)
            st["s"].local.add_(100)
    names = [h.result().name for h in handles]
assert names == ["s0", "s1", "s2"], names
for i in range(3):
    out = ckptguard.load(os.path.join(store, f"s{i}"))
    assert torch.equal(out["w"], full + 100 * i), (i, out["w"])
    assert torch.equal(out["s"], full + 100 * i), i
    assert torch.equal(out["b"], torch.arange(3.0))
    assert torch.equal(out["bt"], torch.arange(12.0).reshape(3, 4).t())
    assert out["rank"] == rank
dist.barrier()
dist.destroy_process_group()
print("rank", rank, "ok")
"""


@pytest.mark.parametrize("mode", ["snapshot", "streamed"])
@pytest.mark.rank_job
def test_async_saves_across_gloo_ranks(tmp_path, mode: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    procs = []
    for r in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(r),
            "WORLD_SIZE": "2",
        }
        cmd = [sys.executable, str(script), str(tmp_path / "store"), mode]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    outs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"rank {r}:\n{out[-3000:]}"
        assert f"rank {r} ok" in out
