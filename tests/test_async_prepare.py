"""A Checkpointer's host pool prepared before the first save (``prepare=``, ``prepare()``): the
first save takes the prepared regions instead of allocating, waits only for the region it needs,
survives a preparation that fails, and close() stops one that runs. Memory is plain host memory
here (pinned with CUDA: that path is the same code with ``pin=True``)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from typing import Any

import pytest
import torch
from test_async import check_loaded, ckpt_threads, clone, make_state, mutate

import ckptguard
from ckptguard import (
    CheckpointerClosedError,
    HostPoolPrepareError,
    HostPoolPrepareWarning,
)
from ckptguard import pool as pool_mod
from ckptguard.capture import state_bytes
from ckptguard.errors import CaptureCancelledError


class GatedAllocator:
    """The pool's allocation seam: counts allocations, can hold the n-th until released and fail
    the ones listed in ``fail`` (1-based)."""

    def __init__(self, hold: int | None = None, fail: tuple[int, ...] = ()) -> None:
        self.calls = 0
        self.hold, self.fail = hold, fail
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, nbytes: int, pin: bool) -> tuple[torch.Tensor, Any]:
        with self.lock:
            self.calls += 1
            n = self.calls
        if n == self.hold:
            self.entered.set()
            assert self.release.wait(30), "test gate never opened"
        if n in self.fail:
            raise MemoryError(f"allocation {n} refused")
        return torch.zeros(nbytes, dtype=torch.uint8), None


def gated(c: ckptguard.Checkpointer, alloc: GatedAllocator) -> ckptguard.Checkpointer:
    c.pool.allocator = alloc
    return c


def buffers(c: ckptguard.Checkpointer) -> list[int]:
    return sorted(r.buf.data_ptr() for r in c.pool.regions)


def test_first_save_takes_the_prepared_pool(store: str) -> None:
    state = make_state(1)
    need = state_bytes(state)
    with ckptguard.Checkpointer(store, prepare=state, overwrite=True) as c:
        assert c.preparation is not None
        c.preparation.wait(60)
        assert c.pool.allocations == 2 and len(c.pool.regions) == 2  # max_inflight + 1
        assert all(r.capacity >= need and not r.buf.is_pinned() for r in c.pool.regions)
        ptrs = buffers(c)
        want = clone(state)
        h = c.save_async(state, "first")
        mutate(state)
        assert h.result().name == "first"
        for i in range(3):
            c.save_async(state, f"s{i}")
        c.wait()
        assert c.pool.allocations == 2 and buffers(c) == ptrs  # no save allocated
        check_loaded(c.load("first"), want)
        check_loaded(c.load("s2"), state)


def test_prepare_by_byte_count_and_later_call(store: str) -> None:
    state = make_state(2)
    with ckptguard.Checkpointer(store, max_inflight=2) as c:
        assert c.preparation is None and c.pool.allocations == 0
        c.prepare(state_bytes(state) * 2).wait(60)  # larger than the state: taken as it is
        assert c.pool.allocations == 3
        c.save_async(state, "a").result()
        assert c.pool.allocations == 3
        c.prepare(state).wait(60)  # already prepared: nothing more
        assert c.pool.allocations == 3
        check_loaded(c.load("a"), state)


def test_prepare_touches_every_page(store: str) -> None:
    """The memory is resident once prepared (a copy into it takes no page fault)."""

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    size = 96 << 20
    before = rss()
    with ckptguard.Checkpointer(store, max_inflight=1, max_host_bytes=size) as c:
        c.prepare(size).wait(60)
        assert c.pool.allocated == size  # bounded by max_host_bytes: one region, not two
        assert rss() - before >= size * 0.9


def test_smaller_preparation_is_grown_by_the_save(store: str) -> None:
    state = make_state(3)
    need = state_bytes(state)
    with ckptguard.Checkpointer(store, prepare=128, max_host_bytes=need + 64) as c:
        c.preparation.wait(60)  # type: ignore[union-attr]
        assert c.pool.allocated <= 2 * 128
        c.save_async(state, "a").result()
        assert c.pool.allocated <= need + 64  # the bound holds across the growth
        check_loaded(c.load("a"), state)


def test_state_larger_than_the_bound_prepares_the_streaming_buffers(store: str) -> None:
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(64 << 10, generator=g), "b": torch.randn(8, 8, generator=g).t()}
    limit = 128 << 10  # less than the state: it is streamed through the pool
    with ckptguard.Checkpointer(store, max_host_bytes=limit, chunk_size=16 << 10) as c:
        c.prepare(state).wait(60)
        assert c.pool.allocations == 1 and c.pool.allocated == limit
        h = c.save_async(state, "big")
        assert h.streamed and h.result().name == "big"
        assert c.pool.allocations == 1  # the streamed save borrowed the prepared region
        out = c.load("big")
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"])


def test_first_save_waits_only_for_its_region(store: str) -> None:
    """The second region is still being allocated while the first save completes; a later save
    takes that region once it is ready; no save allocates."""
    state = make_state(4)
    alloc = GatedAllocator(hold=2)
    with gated(ckptguard.Checkpointer(store, max_inflight=1), alloc) as c:
        prep = c.prepare(state)
        assert alloc.entered.wait(30)  # region 1 ready, region 2 held
        assert c.save_async(state, "one").result().name == "one"
        assert not prep.done()
        h = c.save_async(state, "two", lazy=True)
        alloc.release.set()
        prep.wait(30)
        assert h.result().name == "two"
        assert alloc.calls == 2 and c.pool.allocations == 2
        check_loaded(c.load("two"), state)


def test_concurrent_saves_race_the_preparation(store: str) -> None:
    alloc = GatedAllocator(hold=1)
    states = [make_state(10 + i) for i in range(4)]
    with gated(ckptguard.Checkpointer(store, max_inflight=1), alloc) as c:
        c.prepare(states[0])
        assert alloc.entered.wait(30)  # no region yet: every save must wait for it
        handles: list[Any] = [None] * len(states)

        def save(i: int) -> None:
            handles[i] = c.save_async(states[i], f"s{i}", lazy=True)

        threads = [threading.Thread(target=save, args=(i,)) for i in range(len(states))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        alloc.release.set()
        assert sorted(h.result().name for h in handles) == ["s0", "s1", "s2", "s3"]
        assert alloc.calls == 2  # the preparation's two regions, nothing more
        for i, s in enumerate(states):
            check_loaded(c.load(f"s{i}"), s)


def wait_done(prep: Any) -> None:
    """Until ``prep`` is over, without ``wait()`` (which reports its failure)."""
    for _ in range(3000):
        if prep.done():
            return
        threading.Event().wait(0.01)
    raise AssertionError("preparation never finished")


def test_failed_preparation_warns_once_and_saves_allocate(store: str) -> None:
    state = make_state(5)
    alloc = GatedAllocator(fail=(1,))
    with gated(ckptguard.Checkpointer(store), alloc) as c:
        prep = c.prepare(state)
        wait_done(prep)
        assert isinstance(prep.error, HostPoolPrepareError)
        assert isinstance(prep.error.__cause__, MemoryError)
        assert c.pool.regions == []
        with pytest.warns(HostPoolPrepareWarning, match="allocation 1 refused"):
            h = c.save_async(state, "a")
        assert h.result().name == "a" and alloc.calls == 2  # the save allocated its region
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # reported once only
            c.save_async(state, "b").result()
        with pytest.raises(HostPoolPrepareError):
            prep.wait(0)
        check_loaded(c.load("b"), state)


def test_failure_seen_by_wait_is_not_warned_again(store: str) -> None:
    alloc = GatedAllocator(fail=(1,))
    with gated(ckptguard.Checkpointer(store), alloc) as c:
        with pytest.raises(HostPoolPrepareError, match="could not be prepared"):
            c.prepare(1 << 20).wait(30)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert c.save_async(make_state(), "a").result().name == "a"


def test_save_waiting_for_a_failing_preparation_allocates_itself(store: str) -> None:
    state = make_state(6)
    alloc = GatedAllocator(hold=1, fail=(1,))
    with gated(ckptguard.Checkpointer(store), alloc) as c:
        prep = c.prepare(state)
        assert alloc.entered.wait(30)
        h = c.save_async(state, "a", lazy=True)  # its capture waits for the region held
        alloc.release.set()
        assert h.result().name == "a"
        wait_done(prep)
        assert isinstance(prep.error, HostPoolPrepareError)
        with pytest.warns(HostPoolPrepareWarning):
            c.save_async(state, "b").result()
        check_loaded(c.load("a"), state)


def test_preparation_refused_by_a_memory_limit(tmp_path: Any) -> None:
    """A real refusal (RLIMIT_AS below the pool's size): the save still commits."""
    code = (
        "import resource, sys, warnings, torch, ckptguard\n"
        "from ckptguard import HostPoolPrepareError, HostPoolPrepareWarning\n"
        "with open('/proc/self/statm') as f:\n"
        "    vm = int(f.read().split()[0]) * 4096\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))\n"
        "c = ckptguard.Checkpointer(sys.argv[1], prepare=8 << 30)\n"
        "try:\n"
        "    c.preparation.wait(60)\n"
        "except HostPoolPrepareError as e:\n"
        "    print('refused', type(e.__cause__).__name__)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    c.save({'x': torch.arange(1000)}, 'a')\n"
        "print('warned', len(w), 'allocated', c.pool.allocated)\n"
        "c.close()\n"
    )
    store = str(tmp_path / "store")
    out = subprocess.run(
        [sys.executable, "-c", code, store], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0].startswith("refused ")
    assert lines[1].startswith("warned 0 allocated ")  # seen by wait(): not warned again
    assert torch.equal(ckptguard.load(os.path.join(store, "a"))["x"], torch.arange(1000))


def test_close_during_preparation(store: str) -> None:
    before = len(ckpt_threads())
    alloc = GatedAllocator(hold=1)
    c = gated(ckptguard.Checkpointer(store), alloc)
    prep = c.prepare(make_state())
    assert alloc.entered.wait(30)
    closer = threading.Thread(target=c.close)
    closer.start()
    threading.Event().wait(0.05)
    alloc.release.set()
    closer.join(30)
    assert not closer.is_alive() and prep.done() and prep.error is None
    assert alloc.calls == 1  # stopped before the second region
    assert c.pool.regions == [] and len(ckpt_threads()) == before
    with pytest.raises(CheckpointerClosedError):
        c.prepare(1 << 20)


def test_close_right_after_construction(store: str) -> None:
    before = len(ckpt_threads())
    c = ckptguard.Checkpointer(store, prepare=256 << 20)
    c.close()
    assert c.preparation is not None and c.preparation.done()
    assert c.pool.regions == [] and len(ckpt_threads()) == before


def test_touching_stops_between_slices() -> None:
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(CaptureCancelledError):
        pool_mod.Region(4 * pool_mod.TOUCH_SLICE, False, None, stop)
    assert len(asked) == 3  # two slices touched, then stopped


def test_bad_arguments(store: str) -> None:
    with ckptguard.Checkpointer(store) as c:
        with pytest.raises(ValueError, match="must be >= 0"):
            c.prepare(-1)
        assert c.preparation is None
        c.prepare(0).wait(10)  # nothing to prepare
        c.prepare({"step": 3}).wait(10)
        assert c.pool.allocations == 0
