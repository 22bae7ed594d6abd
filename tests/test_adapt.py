"""The writer's controller (ckptguard/adapt.py): its choices from given rates, and saves with
compress="auto" / CKPTGUARD_ODIRECT=auto that stay valid checkpoints on both backends."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import ckptguard
from ckptguard import adapt, backend, writer
from ckptguard.adapt import FIRST_PROBE, PROBE, Choice, Controller, Measured
from ckptguard.encode import RAW, SHUFFLE_LZ4

GB = 1e9
MiB = 1 << 20
BIG = memoryview(bytes(64 * MiB))  # a tensor large enough to be sampled


def fake_probe(frac: float, rate: float) -> adapt.Probe:
    """A sample that stores ``frac`` of its bytes at ``rate`` bytes/s per thread."""
    return lambda block, elem, codec, level: (int(len(block) * frac), int(len(block) / rate * 1e9))


def wrote(c: Controller, choice: Choice, n: int, write_rate: float, enc_rate: float, frac=1.0):
    """Tell ``c`` that ``n`` raw bytes were written with ``choice`` at the given rates."""
    stored = int(n * frac) if choice.codec != RAW else n
    m = Measured(
        n, stored, stored, int(n / enc_rate * 1e9), int(stored / write_rate * 1e9), choice.direct
    )
    c.record(choice, m)


def controller(frac=0.5, enc=1 * GB, direct=False, direct_ok=False) -> Controller:
    return Controller(2, direct, direct_ok, probe=fake_probe(frac, enc))


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

    c = Controller(2, False, False, probe=probe)
    wrote(c, c.choose(BIG, 2, True), 64 * MiB, write_rate=0.3 * GB, enc_rate=8 * GB)
    assert c.choose(BIG, 2, True).codec == SHUFFLE_LZ4
    sampled = len(calls)
    assert c.choose(memoryview(bytes(4096)), 2, True).codec == SHUFFLE_LZ4
    assert len(calls) == sampled  # no sample of a small tensor


def test_fixed_codec_never_samples() -> None:
    c = Controller(2, False, False, probe=lambda *a: pytest.fail("sampled"))
    wrote(c, c.choose(BIG, 2, False), 64 * MiB, write_rate=0.3 * GB, enc_rate=8 * GB)
    assert c.choose(BIG, 2, False).codec == RAW


def _fill(c: Controller, n: int, buffered: float, direct: float) -> list[Choice]:
    """Write ``n`` bytes in stretches as ``c`` chooses, each mode at its rate."""
    seen = []
    done = 0
    while done < n:
        ch = c.choose(BIG, 2, False)
        size = min(ch.limit, 64 * MiB)
        wrote(c, ch, size, write_rate=direct if ch.direct else buffered, enc_rate=8 * GB)
        seen.append(ch)
        done += size
    return seen


def test_congested_buffered_switches_to_direct() -> None:
    c = controller(direct=None, direct_ok=True)
    seen = _fill(c, FIRST_PROBE + PROBE + 256 * MiB, buffered=0.3 * GB, direct=1.5 * GB)
    assert not seen[0].direct  # buffered first
    assert seen[-1].direct and c.direct


def test_quiet_disk_stays_buffered_and_probes_less_often() -> None:
    c = controller(direct=None, direct_ok=True)
    seen = _fill(c, 2048 * MiB, buffered=3 * GB, direct=1.7 * GB)
    probes = sum(ch.direct for ch in seen)
    assert not c.direct and not seen[-1].direct
    assert 0 < probes * PROBE <= 4 * PROBE  # probes back off: 128 MiB, then 256, 512, 1024 ...


def test_forced_mode_never_probes() -> None:
    for forced in (True, False):
        c = controller(direct=forced, direct_ok=True)
        seen = _fill(c, 1024 * MiB, buffered=0.3 * GB, direct=3 * GB)
        assert {ch.direct for ch in seen} == {forced}


def test_refused_direct_goes_buffered_for_good() -> None:
    c = controller(direct=True, direct_ok=True)
    ch = c.choose(BIG, 2, False)
    assert ch.direct
    c.record(ch, Measured(MiB, MiB, MiB, 1000, 1000, False))
    assert not any(ch.direct for ch in _fill(c, 512 * MiB, 0.3 * GB, 3 * GB))


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
            codec if auto_codec else RAW, 0, self.direct or _Alternate.n % 3 == 0, 1 << 16
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
        ckptguard.save(state, path, chunk_size=16384)
        back = ckptguard.load(path)
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    assert set(writer.LAST_WRITE["codec"]) == {"raw", "shuffle-lz4"}
    assert sum(writer.LAST_WRITE["codec"].values()) == sum(
        v.numel() * v.element_size() for v in state.values()
    )
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
        ckptguard.save(state, path, chunk_size=1 << 18)
    assert torch.equal(ckptguard.load(path)["x"], state["x"])
    io_modes = set(writer.LAST_WRITE["io"])
    if be == "python" or mode == "0":
        assert io_modes == {"buffered"}
    assert os.path.isdir(path)


def test_bad_odirect_value(monkeypatch) -> None:
    monkeypatch.setenv(backend.DIRECT_ENV, "yes")
    with pytest.raises(ValueError, match="CKPTGUARD_ODIRECT"):
        backend.direct_io()
    monkeypatch.setenv(backend.DIRECT_ENV, "auto")
    assert backend.direct_mode() == "auto" and backend.info()["o_direct"] == "auto"
