"""Batched writes: RankWriter queues stretches and writes many tensors' chunks in one call
(``io.write_segments``), with the records, rows and bytes of one call per stretch."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptguard
from ckptguard import backend, io
from ckptguard.adapt import FIRST_TRIAL, PROBE, Controller, Measured
from ckptguard.encode import RAW, SHUFFLE_LZ4, SHUFFLE_ZSTD
from ckptguard.pack import Packer
from ckptguard.tree import TensorRef
from ckptguard.writer import RankWriter

UUID = "cd" * 16
BACKENDS = ["python", *(["native"] if backend.available() else [])]


def _ref(key: str, t: torch.Tensor) -> TensorRef:
    shape = tuple(t.shape)
    dtype = str(t.dtype).removeprefix("torch.")
    return TensorRef(key, dtype, shape, "torch", "cpu", False, False, t, shape, (0,) * len(shape))


def _tensors(n: int = 40) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = [torch.randn(int(k), generator=g) for k in np.linspace(10, 9000, n)]
    out[3] = torch.zeros(5000, dtype=torch.bfloat16)  # compresses: another codec in the batch
    out[7] = torch.empty(0)  # no records at all
    return out


def _write(path: Path, be: str, batch: bool, codecs: list[int], **kw) -> RankWriter:
    path.mkdir()
    with backend.use(be):
        w = RankWriter(str(path), 0, UUID, chunk_size=4096)
        w._batching = batch
        for i, t in enumerate(_tensors()):
            w.add(i, _ref(f"t{i}", t), codecs[i % len(codecs)], **kw)
        w.finish()
    return w


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("codecs", [[RAW], [SHUFFLE_LZ4], [SHUFFLE_LZ4, RAW, SHUFFLE_ZSTD]])
def test_a_batch_of_many_tensors_writes_what_one_call_each_writes(tmp_path, be, codecs):
    one = _write(tmp_path / "one", be, False, codecs)
    many = _write(tmp_path / "many", be, True, codecs)
    assert one.calls == len(_tensors())  # the empty tensor's call writes nothing
    assert many.calls == 1
    assert one.rows == many.rows
    assert Path(one.path).read_bytes() == Path(many.path).read_bytes()
    assert one.control.used == many.control.used


def test_both_backends_write_the_same_batch(tmp_path):
    if not backend.available():
        pytest.skip(backend.reason())
    a = _write(tmp_path / "a", "python", True, [SHUFFLE_LZ4, RAW])
    b = _write(tmp_path / "b", "native", True, [SHUFFLE_LZ4, RAW])
    assert Path(a.path).read_bytes() == Path(b.path).read_bytes()


@pytest.mark.parametrize("be", BACKENDS)
def test_a_piece_that_does_not_last_is_written_before_add_returns(tmp_path, be):
    """A reused buffer (a streaming source's slot) is written before it is refilled; one that
    lasts may wait for the batch."""
    data = [np.full(3000, i, dtype=np.float32) for i in range(6)]
    buf = np.empty(3000, dtype=np.float32)
    with backend.use(be):
        w = RankWriter(str(tmp_path), 0, UUID, chunk_size=4096)
        w.add(0, _ref("kept", torch.ones(100)), SHUFFLE_LZ4)  # lasting: queued
        assert w.calls == 0
        for i, d in enumerate(data):
            buf[:] = d
            w.add(i + 1, _ref(f"r{i}", torch.from_numpy(d)), SHUFFLE_LZ4, buf, lasting=False)
            assert w.calls == i + 1 and not w._queue
        w.finish()
    path = tmp_path / "c"
    ckptguard.save({f"r{i}": torch.from_numpy(d) for i, d in enumerate(data)}, path)
    got = ckptguard.load(path)
    assert all(torch.equal(got[f"r{i}"], torch.from_numpy(d)) for i, d in enumerate(data))


class _ReusingSource:
    """Every piece in one buffer, refilled for the next (a source whose pieces do not last)."""

    lasting = False

    def __init__(self) -> None:
        self.buf = np.empty(1 << 16, dtype=np.uint8)

    def stream(self, values):
        for i, v in enumerate(values):
            raw = v.contiguous().view(torch.uint8).numpy()
            self.buf[: len(raw)] = raw
            yield i, memoryview(self.buf[: len(raw)])


@pytest.mark.parametrize("be", BACKENDS)
def test_a_source_that_reuses_its_buffer_saves_every_tensor(tmp_path, be):
    state = {f"w{i}": torch.full((1000 + i,), float(i)) for i in range(12)}
    refs = [(i, _ref(k, v)) for i, (k, v) in enumerate(state.items())]
    with backend.use(be):
        w = RankWriter(str(tmp_path), 0, UUID, chunk_size=4096)
        Packer(w, refs, SHUFFLE_LZ4).write(_ReusingSource())
        w.finish()
    by_key = {r.key: r for r in w.rows}
    assert len(by_key) == len(state) and w.calls == len(state)


@pytest.mark.parametrize("be", BACKENDS)
def test_abort_discards_queued_work(tmp_path, be):
    with backend.use(be):
        w = RankWriter(str(tmp_path), 0, UUID, chunk_size=4096)
        header = os.path.getsize(w.path)
        for i, t in enumerate(_tensors(10)):
            w.add(i, _ref(f"t{i}", t), SHUFFLE_LZ4)
        assert w._queue and w.calls == 0
        w.abort()
    assert not w._queue and w.fd == -1 and w.calls == 0
    assert os.path.getsize(w.path) == header  # nothing queued reached the file


def _failing_writes(monkeypatch, after: int, err: int) -> None:
    """Make the (after+1)-th record write of either backend fail with ``err``."""
    if backend.name() == backend.NATIVE:
        n = backend.native()
        n._inject_io_error(err, after)  # cleared by the fixture no_injection
        return
    count = [0]
    real = os.pwritev

    def pwritev(fd, views, offset):
        count[0] += 1
        if count[0] > after:
            raise OSError(err, os.strerror(err))
        return real(fd, views, offset)

    monkeypatch.setattr(io.os, "pwritev", pwritev)


@pytest.fixture
def no_injection():
    yield
    if backend.available():
        backend.native()._inject_io_error(0)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_an_error_in_the_middle_of_a_batch_is_the_typed_error(
    tmp_path, monkeypatch, no_injection, be, err
):
    """A write that fails in the middle of a batched save raises the typed error of an
    unbatched one, and leaves no checkpoint behind."""
    state = {f"t{i}": t for i, t in enumerate(_tensors(30))}
    store = tmp_path / "store"
    store.mkdir()
    with backend.use(be):
        _failing_writes(monkeypatch, 5, err)
        want = ckptguard.StoreFullError if err == errno.ENOSPC else ckptguard.StoreError
        with pytest.raises(want) as e:
            ckptguard.save(state, store / "a", chunk_size=4096, compress="lz4")
    assert e.value.errno == err and "rank-00000.ckg" in str(e.value)
    assert not (store / "a").exists()
    assert not list(store.rglob("*.ckg"))  # the staged data file went with its staging


def test_the_controller_is_steady_between_trials_and_within_a_trial_stretch():
    c = Controller(2, None, True, probe=lambda b, e, c_, lv: (len(b), 1000))
    assert c.steady(FIRST_TRIAL - 1) and not c.steady(FIRST_TRIAL)
    m = Measured(FIRST_TRIAL, FIRST_TRIAL, FIRST_TRIAL, 10**6, 10**6, False, 10**6)
    c.record(c.choose(memoryview(b""), 1, False), m)  # reaches the first trial
    assert c.mode.trying
    assert c.steady(PROBE - 1) and not c.steady(PROBE)
    choice = c.choose(memoryview(b""), 1, False)
    c.record(choice, m._replace(written=PROBE // 2, direct=choice.direct))
    assert c.steady(PROBE // 2 - 1) and not c.steady(PROBE // 2)
    fixed = Controller(2, False, True)
    assert fixed.steady(1 << 50)


@pytest.mark.parametrize("be", BACKENDS)
def test_write_segments_is_write_records_of_each_segment(tmp_path, be):
    rng = np.random.default_rng(3)
    bufs = [rng.integers(0, 4, n, dtype=np.uint8).tobytes() for n in (20000, 0, 8192, 96, 50000)]
    codecs = [SHUFFLE_LZ4, RAW, SHUFFLE_ZSTD, SHUFFLE_LZ4, RAW]
    segs = [io.Segment(memoryview(b), 4, c) for b, c in zip(bufs, codecs, strict=True)]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    fa, fb = (os.open(p, os.O_RDWR | os.O_CREAT, 0o644) for p in (a, b))
    try:
        done = io.write_segments(fa, a, 4096, 5, segs, 8192, threads=3, backend=be)
        pos, seq, recs = 4096, 5, []
        for s in segs:
            one = io.write_records(fb, b, pos, seq, s.buf, 4, 8192, s.codec, 3, False, be)
            pos, seq, recs = one.end, seq + len(one.records), recs + one.records
    finally:
        os.close(fa)
        os.close(fb)
    assert done.records() == recs and done.end == pos
    assert done.nrecords.tolist() == [3, 0, 1, 1, 7]
    assert done.written.sum() == pos - 4096
    assert Path(a).read_bytes() == Path(b).read_bytes()


@pytest.mark.parametrize("be", BACKENDS)
def test_the_controller_hears_each_run_of_one_choice_in_a_batch(tmp_path, be):
    """Every queued byte is fed back once, as runs of stretches of one choice, in order."""
    heard: list[tuple[tuple, int]] = []
    with backend.use(be):
        w = RankWriter(str(tmp_path), 0, UUID, chunk_size=4096)
        real = w.control.record
        w.control.record = lambda c, m, d=None: (heard.append((c[:3], m.raw_bytes)), real(c, m))
        tensors = _tensors(12)
        for i, t in enumerate(tensors):
            w.add(i, _ref(f"t{i}", t), [SHUFFLE_LZ4, SHUFFLE_LZ4, RAW][i % 3])
        w.finish()
    assert w.calls == 1
    assert sum(n for _, n in heard) == sum(t.numel() * t.element_size() for t in tensors)
    keys = [k for k, _ in heard]
    assert all(a != b for a, b in zip(keys, keys[1:], strict=False))  # runs, not stretches
    assert [k[0] for k in keys] == [SHUFFLE_LZ4, RAW] * 4
