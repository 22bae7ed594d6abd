"""The writer's controller (ckptguard/adapt.py): its choices from given rates, and saves with
compress="auto" / CKPTGUARD_ODIRECT=auto that stay valid checkpoints on both backends."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest
import torch

import ckptguard
from ckptguard import adapt, backend, writer
from ckptguard.adapt import (
    FIRST_TRIAL,
    JUDGE,
    PROBE,
    RESAMPLE,
    ROUNDS,
    Choice,
    Controller,
    Measured,
    Memory,
)
from ckptguard.encode import RAW, SHUFFLE_LZ4

GB = 1e9
MiB = 1 << 20
BIG = memoryview(bytes(64 * MiB))  # a tensor large enough to be sampled
TRIAL = 2 * ROUNDS * PROBE  # bytes of one trial of the I/O modes


def fake_probe(frac: float, rate: float) -> adapt.Probe:
    """A sample that stores ``frac`` of its bytes at ``rate`` bytes/s per thread."""
    return lambda block, elem, codec, level: (int(len(block) * frac), int(len(block) / rate * 1e9))


def wrote(
    c: Controller,
    choice: Choice,
    n: int,
    write_rate: float,
    enc_rate: float,
    frac: float = 1.0,
    wall_rate: float | None = None,
) -> None:
    """Tell ``c`` that ``n`` raw bytes were written with ``choice`` at the given rates (the pool's
    encode rate per thread; ``wall_rate``: raw bytes per second of the whole stretch)."""
    stored = int(n * frac) if choice.codec != RAW else n
    wall = int(n / wall_rate * 1e9) if wall_rate else 0
    enc_ns, write_ns = int(n / enc_rate * 1e9), int(stored / write_rate * 1e9)
    c.record(choice, Measured(n, stored, stored, enc_ns, write_ns, choice.direct, wall))


def controller(frac=0.5, enc=1 * GB, direct=False, direct_ok=False, **kw) -> Controller:
    kw.setdefault("memory", Memory())
    return Controller(2, direct, direct_ok, probe=fake_probe(frac, enc), **kw)


def test_raw_before_anything_is_measured() -> None:
    assert controller().choose(BIG, 2, True).codec == RAW


def test_quiet_disk_raw() -> None:
    c = controller(frac=0.5, enc=1 * GB)  # 2 threads encode 2 GB/s: slower than the disk
    wrote(c, c.choose(BIG, 2, True), 64 * MiB, write_rate=3 * GB, enc_rate=8 * GB)
    assert c.choose(BIG, 2, True).codec == RAW


def test_slow_disk_free_cores_compressible_codec() -> None:
    c = controller(frac=0.5, enc=1 * GB)
    wrote(c, c.choose(BIG, 2, True), 64 * MiB, write_rate=0.3 * GB, enc_rate=8 * GB)
    assert c.choose(BIG, 2, True)[:2] == (SHUFFLE_LZ4, 0)


def test_slow_disk_incompressible_raw() -> None:
    c = controller(frac=0.97, enc=1 * GB)
    wrote(c, c.choose(BIG, 2, True), 64 * MiB, write_rate=0.3 * GB, enc_rate=8 * GB)
    assert c.choose(BIG, 2, True).codec == RAW


def test_slow_disk_busy_cores_raw() -> None:
    c = controller(frac=0.9, enc=0.15 * GB)  # the training process holds the cores
    wrote(c, c.choose(BIG, 2, True), 64 * MiB, write_rate=0.3 * GB, enc_rate=8 * GB)
    assert c.choose(BIG, 2, True).codec == RAW


def test_mind_changes_when_the_disk_does() -> None:
    c = controller(frac=0.5, enc=1 * GB)
    wrote(c, c.choose(BIG, 2, True), 64 * MiB, write_rate=0.3 * GB, enc_rate=8 * GB)
    ch = c.choose(BIG, 2, True)
    assert ch.codec == SHUFFLE_LZ4
    for _ in range(8):  # the disk got fast: the compressed records' writes show it
        wrote(c, ch, 64 * MiB, write_rate=4 * GB, enc_rate=1 * GB, frac=0.5)
    ch = c.choose(BIG, 2, True)
    assert ch.codec == RAW
    for _ in range(8):  # and slow again
        wrote(c, ch, 64 * MiB, write_rate=0.2 * GB, enc_rate=8 * GB)
    assert c.choose(BIG, 2, True).codec == SHUFFLE_LZ4


def test_small_tensors_use_the_running_fraction() -> None:
    calls: list[int] = []

    def probe(block, elem, codec, level):
        calls.append(len(block))
        return len(block) // 2, len(block)  # 1 GB/s

    c = Controller(2, False, False, probe=probe, memory=Memory())
    wrote(c, c.choose(BIG, 2, True), 64 * MiB, write_rate=0.3 * GB, enc_rate=8 * GB)
    assert c.choose(BIG, 2, True).codec == SHUFFLE_LZ4
    sampled = len(calls)
    assert c.choose(memoryview(bytes(4096)), 2, True).codec == SHUFFLE_LZ4
    assert len(calls) == sampled  # no sample of a small tensor


def test_fixed_codec_never_samples() -> None:
    c = Controller(2, False, False, probe=lambda *a: pytest.fail("sampled"), memory=Memory())
    wrote(c, c.choose(BIG, 2, False), 64 * MiB, write_rate=0.3 * GB, enc_rate=8 * GB)
    assert c.choose(BIG, 2, False).codec == RAW


def test_writing_holds_the_pool_threads() -> None:
    """Each pool thread writes the records it encoded: at 1.5 GB/s, two threads that encode
    1 GB/s each and halve the bytes are no faster than raw (encoding alone would say 25%)."""
    c = controller(frac=0.5, enc=1 * GB)
    wrote(c, c.choose(BIG, 2, True), 64 * MiB, write_rate=1.5 * GB, enc_rate=8 * GB)
    assert c.choose(BIG, 2, True).codec == RAW


def test_pool_rate_below_the_sample_means_raw() -> None:
    """One idle thread's sample says 1 GB/s; the pool, encoding while it writes, shows 0.1 GB/s
    per thread: raw from then on, and from the start of the process's next data file."""
    mem = Memory()
    c = controller(frac=0.5, enc=1 * GB, memory=mem)
    wrote(c, c.choose(BIG, 2, True), 64 * MiB, write_rate=0.3 * GB, enc_rate=8 * GB)
    ch = c.choose(BIG, 2, True)
    assert ch.codec == SHUFFLE_LZ4  # the sample alone
    wrote(c, ch, 64 * MiB, write_rate=0.3 * GB, enc_rate=0.1 * GB, frac=0.5)
    assert c.choose(BIG, 2, True).codec == RAW
    for memory in (mem, Memory()):  # the next file: only samples of lz4, scaled as learnt
        nxt = controller(frac=0.5, enc=1 * GB, memory=memory)
        wrote(nxt, nxt.choose(BIG, 2, True), 64 * MiB, write_rate=0.3 * GB, enc_rate=8 * GB)
        assert nxt.choose(BIG, 2, True).codec == (RAW if memory is mem else SHUFFLE_LZ4)


@pytest.mark.parametrize("wall_rate, kept", [(0.25 * GB, False), (0.5 * GB, True)])
def test_codec_kept_only_while_its_stretches_beat_raw(wall_rate: float, kept: bool) -> None:
    c = controller(frac=0.5, enc=1 * GB)
    ch = c.choose(BIG, 2, True)  # raw, taking the time predicted for it
    wrote(c, ch, 64 * MiB, write_rate=0.3 * GB, enc_rate=8 * GB, wall_rate=0.3 * GB)
    ch = c.choose(BIG, 2, True)
    assert ch.codec == SHUFFLE_LZ4
    wrote(c, ch, JUDGE, write_rate=0.3 * GB, enc_rate=1 * GB, frac=0.5, wall_rate=wall_rate)
    assert (c.choose(BIG, 2, True).codec == SHUFFLE_LZ4) is kept
    if kept:
        return
    for _ in range(RESAMPLE // JUDGE - 1):  # not tried again for a while
        ch = c.choose(BIG, 2, True)
        assert ch.codec == RAW
        wrote(c, ch, JUDGE, write_rate=0.3 * GB, enc_rate=8 * GB, wall_rate=0.3 * GB)
    ch = c.choose(BIG, 2, True)
    wrote(c, ch, JUDGE, write_rate=0.3 * GB, enc_rate=8 * GB, wall_rate=0.3 * GB)
    assert c.choose(BIG, 2, True).codec == SHUFFLE_LZ4  # then reconsidered


Rates = Callable[[], float]


def _rate(r: float | Rates) -> Rates:
    return r if callable(r) else lambda: r


def _fill(
    c: Controller,
    n: int,
    buffered: float | Rates,
    direct: float | Rates,
    cache: float | None = None,
    auto_codec: bool = False,
) -> list[tuple[Choice, int]]:
    """Write ``n`` bytes in stretches as ``c`` chooses, each mode at its disk rate (a number or
    one per stretch). ``cache``: buffered writes return at this rate, their writeback is paid
    at a drain."""
    buf, dio = _rate(buffered), _rate(direct)
    seen: list[tuple[Choice, int]] = []
    done = 0
    dirty = [0]

    def drain() -> int:
        ns = int(dirty[0] / buf() * 1e9)
        dirty[0] = 0
        return ns

    while done < n:
        ch = c.choose(BIG, 2, auto_codec)
        size = min(ch.limit, 64 * MiB)
        rate = dio() if ch.direct else (cache or buf())
        if cache and not ch.direct:
            dirty[0] += size
        m = Measured(size, size, size, int(size / 8), int(size / rate * 1e9), ch.direct)
        c.record(ch, m, drain)
        seen.append((ch, size))
        done += size
    return seen


def _direct_bytes(seen: list[tuple[Choice, int]]) -> int:
    return sum(n for ch, n in seen if ch.direct)


def test_quiet_disk_direct_faster_switches_early() -> None:
    c = controller(direct=None, direct_ok=True)
    seen = _fill(c, FIRST_TRIAL + TRIAL, buffered=1.0 * GB, direct=1.3 * GB)
    assert not seen[0][0].direct  # buffered first
    assert c.mode.direct  # decided after 128 MiB
    assert all(ch.direct for ch, _ in _fill(c, 128 * MiB, buffered=1.0 * GB, direct=1.3 * GB))


def test_congested_buffered_switches_to_direct() -> None:
    c = controller(direct=None, direct_ok=True)
    seen = _fill(c, FIRST_TRIAL + TRIAL + 256 * MiB, buffered=0.3 * GB, direct=1.5 * GB)
    assert not seen[0][0].direct and seen[-1][0].direct and c.mode.direct


def test_quiet_disk_buffered_faster_stays_and_tries_less_often() -> None:
    c = controller(direct=None, direct_ok=True)
    seen = _fill(c, 2048 * MiB, buffered=3 * GB, direct=1.7 * GB)
    assert not c.mode.direct and not seen[-1][0].direct
    # trials after 32 MiB, then 256 MiB later, then 512: half of each in the other mode
    assert _direct_bytes(seen) == 3 * ROUNDS * PROBE


def test_buffered_stretches_pay_for_their_writeback() -> None:
    """Buffered writes return at page-cache speed; the drains of a trial charge them the disk's
    time, at which O_DIRECT is faster."""
    c = controller(direct=None, direct_ok=True)
    _fill(c, FIRST_TRIAL + TRIAL, buffered=1.0 * GB, direct=1.3 * GB, cache=8 * GB)
    assert c.mode.direct


def test_one_fast_stretch_does_not_decide() -> None:
    direct = iter([4 * GB] + [1.0 * GB] * 1000).__next__  # one burst, then slower than buffered
    c = controller(direct=None, direct_ok=True)
    _fill(c, FIRST_TRIAL + TRIAL, buffered=1.5 * GB, direct=direct)
    assert not c.mode.direct


def test_a_trial_keeps_the_codec() -> None:
    c = controller(frac=0.5, enc=1 * GB, direct=None, direct_ok=True)
    seen = _fill(c, FIRST_TRIAL + TRIAL, 0.3 * GB, 0.2 * GB, auto_codec=True)
    assert {ch.codec for ch, _ in seen} == {RAW}  # the first stretch and the whole trial
    assert c.choose(BIG, 2, True).codec == SHUFFLE_LZ4  # a slow disk: compress after it


def test_next_file_on_the_file_system_starts_in_the_mode_chosen() -> None:
    mem = Memory()
    c = controller(direct=None, direct_ok=True, fs=7, memory=mem)
    _fill(c, FIRST_TRIAL + TRIAL, buffered=1.0 * GB, direct=1.3 * GB)
    assert c.mode.direct
    c.finish()
    nxt = controller(direct=None, direct_ok=True, fs=7, memory=mem)
    seen = _fill(nxt, 1024 * MiB, buffered=1.0 * GB, direct=1.3 * GB)
    assert seen[0][0].direct  # no stretch in buffered mode first
    assert 0 < len(seen) - sum(ch.direct for ch, _ in seen) <= 2 * ROUNDS  # tried again, once
    assert nxt.mode.direct
    other = controller(direct=None, direct_ok=True, fs=8, memory=mem)
    assert not other.choose(BIG, 2, False).direct  # another file system


def test_small_file_leaves_the_schedule_to_the_next() -> None:
    mem = Memory()
    c = controller(direct=None, direct_ok=True, fs=7, memory=mem)
    assert not _direct_bytes(_fill(c, 16 * MiB, buffered=1.0 * GB, direct=1.3 * GB))
    c.finish()
    nxt = controller(direct=None, direct_ok=True, fs=7, memory=mem)
    _fill(nxt, FIRST_TRIAL - 16 * MiB + TRIAL, buffered=1.0 * GB, direct=1.3 * GB)
    assert nxt.mode.direct


def test_forced_mode_never_tries() -> None:
    mem = Memory()
    for forced in (True, False):
        c = controller(direct=forced, direct_ok=True, fs=7, memory=mem)
        seen = _fill(c, 1024 * MiB, buffered=0.3 * GB, direct=3 * GB)
        assert {ch.direct for ch, _ in seen} == {forced}
        c.finish()
    assert mem.mode(7) is None  # and leaves nothing for the automatic mode


def test_refused_direct_goes_buffered_for_good() -> None:
    mem = Memory()
    c = controller(direct=True, direct_ok=True)
    ch = c.choose(BIG, 2, False)
    assert ch.direct
    c.record(ch, Measured(MiB, MiB, MiB, 1000, 1000, False))
    assert not _direct_bytes(_fill(c, 512 * MiB, 0.3 * GB, 3 * GB))
    auto = controller(direct=None, direct_ok=True, fs=7, memory=mem)
    ch = auto.choose(BIG, 2, False)
    auto.record(ch._replace(direct=True), Measured(MiB, MiB, MiB, 1000, 1000, False))
    auto.finish()
    nxt = controller(direct=None, direct_ok=True, fs=7, memory=mem)
    assert not _direct_bytes(_fill(nxt, 512 * MiB, 0.3 * GB, 3 * GB))


def test_merge_stats() -> None:
    a = {"codec": {"raw": 5}, "io": {"buffered": 5}, "encode_s": 1.0, "write_s": 2.0}
    b = {"codec": {"raw": 1, "shuffle-lz4": 2}, "io": {"direct": 3}, "encode_s": 0.5, "write_s": 1}
    assert adapt.merge_stats([a, b]) == {
        "codec": {"raw": 6, "shuffle-lz4": 2},
        "io": {"buffered": 5, "direct": 3},
        "encode_s": 1.5,
        "write_s": 3.0,
    }


# ---- saves ---------------------------------------------------------------------------------


def _state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(300_000, generator=g).to(torch.bfloat16),
        "ids": torch.arange(200_000, dtype=torch.int64),
        "noise": torch.randint(0, 255, (70_000,), dtype=torch.uint8, generator=g),
        "tiny": torch.zeros(3),
        "empty": torch.zeros(0),
    }


class _Alternate(Controller):
    """Chooses SHUFFLE_LZ4 and raw by turns and O_DIRECT every third stretch."""

    n = 0

    def choose(self, view, elem_size, auto_codec):
        _Alternate.n += 1
        codec = SHUFFLE_LZ4 if _Alternate.n % 2 else RAW
        return Choice(
            codec if auto_codec else RAW, 0, self.mode.direct or _Alternate.n % 3 == 0, 1 << 16
        )


@pytest.mark.parametrize("be", ["native", "python"])
def test_auto_save_mixes_codecs_and_modes_and_loads(tmp_path, monkeypatch, be: str) -> None:
    if be == "native" and not backend.available():
        pytest.skip(backend.reason())
    monkeypatch.setattr(writer, "Controller", _Alternate)
    opened: list[str] = []
    real = writer.open_direct
    monkeypatch.setattr(writer, "open_direct", lambda p: opened.append(p) or real(p))
    state = _state()
    path = str(tmp_path / "c")
    with backend.use(be):
        info = ckptguard.save(state, path, chunk_size=16384)
        back = ckptguard.load(path)
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    stats = info.write_stats
    assert stats is not None and set(stats["codec"]) == {"raw", "shuffle-lz4"}
    raw = sum(v.numel() * v.element_size() for v in state.values())
    assert sum(stats["codec"].values()) == sum(stats["io"].values()) == raw
    assert stats["encode_s"] > 0 and stats["write_s"] > 0
    assert len(opened) == (1 if be == "native" else 0)  # one O_DIRECT descriptor per file
    assert ckptguard.verify(path).ok


@pytest.mark.parametrize("be", ["native", "python"])
@pytest.mark.parametrize("mode", ["0", "1", "auto"])
def test_auto_save_real_controller(tmp_path, monkeypatch, be: str, mode: str) -> None:
    if be == "native" and not backend.available():
        pytest.skip(backend.reason())
    monkeypatch.setenv(backend.DIRECT_ENV, mode)
    state = {"x": torch.from_numpy(np.arange(3_000_000, dtype=np.float32))}
    path = str(tmp_path / "c")
    with backend.use(be):
        info = ckptguard.save(state, path, chunk_size=1 << 18)
    assert torch.equal(ckptguard.load(path)["x"], state["x"])
    assert info.write_stats is not None
    io_modes = set(info.write_stats["io"])
    if be == "python" or mode == "0":
        assert io_modes == {"buffered"}
    assert os.path.isdir(path)


def test_bad_odirect_value(monkeypatch) -> None:
    monkeypatch.setenv(backend.DIRECT_ENV, "yes")
    with pytest.raises(ValueError, match="CKPTGUARD_ODIRECT"):
        backend.direct_io()
    monkeypatch.setenv(backend.DIRECT_ENV, "auto")
    assert backend.direct_mode() == "auto" and backend.info()["o_direct"] == "auto"


@pytest.mark.parametrize("be", ["native", "python"])
def test_write_stats_from_every_front_end(tmp_path, be: str) -> None:
    if be == "native" and not backend.available():
        pytest.skip(backend.reason())
    state = {"x": torch.arange(100_000, dtype=torch.float32), "y": torch.ones(7)}
    raw = 400_028
    with backend.use(be):
        with ckptguard.Checkpointer(str(tmp_path / "s"), handoff=False) as ck:
            infos = [ck.save(state, "a"), ck.save_async(state, "b").result()]
        infos.append(ckptguard.save(state, str(tmp_path / "c"), compress="lz4"))
    for info in infos:
        assert info.write_stats is not None
        assert sum(info.write_stats["codec"].values()) == sum(info.write_stats["io"].values())
        assert sum(info.write_stats["codec"].values()) == raw
    assert "shuffle-lz4" in infos[-1].write_stats["codec"]
    assert ckptguard.Store(str(tmp_path / "s")).latest().write_stats is None  # from a manifest


def test_write_stats_sum_the_ranks(tmp_path) -> None:
    from threadcoord import ThreadCoordinator, run_ranks

    out: dict[int, ckptguard.CheckpointInfo] = {}

    def rank_main(coord: ThreadCoordinator) -> None:
        state = {"mine": ckptguard.PerRank(torch.full((1000,), float(coord.rank)))}
        out[coord.rank] = ckptguard.save(state, str(tmp_path / "c"), coordinator=coord, timeout=60)

    run_ranks(2, rank_main)
    stats = out[0].write_stats
    assert stats is not None and stats == out[1].write_stats  # every rank: the whole save's
    assert sum(stats["codec"].values()) == 2 * 4000
