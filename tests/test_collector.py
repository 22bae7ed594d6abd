"""A save or a load pauses Python's cyclic garbage collector while it builds its objects (never
while a save waits for other ranks), and leaves the collector as it found it: enabled or
disabled, after a good call, a refused one, and calls running in several threads at once."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator

import pytest
import torch

import ckptguard
from ckptguard import collector, loader, saver
from ckptguard.coord.base import LocalCoordinator
from ckptguard.errors import CorruptCheckpointError


@pytest.fixture
def saved(tmp_path) -> Iterator[tuple[str, dict]]:
    state = {f"t{i}": torch.full((8,), float(i)) for i in range(50)}
    path = os.path.join(tmp_path, "c")
    ckptguard.save(state, path, compress="none")
    was = gc.isenabled()
    yield path, state
    gc.enable() if was else gc.disable()


def test_collector_is_paused_during_a_load_and_enabled_after(saved, monkeypatch) -> None:
    path, state = saved
    seen = []
    real = loader.unflatten
    monkeypatch.setattr(
        loader, "unflatten", lambda *a, **k: seen.append(gc.isenabled()) or real(*a, **k)
    )
    gc.enable()
    out = ckptguard.load(path)
    assert seen == [False] and gc.isenabled()
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_a_disabled_collector_stays_disabled(saved) -> None:
    gc.disable()
    ckptguard.load(saved[0])
    assert not gc.isenabled()


def test_a_refused_load_restores_the_collector(saved) -> None:
    path, _ = saved
    os.remove(os.path.join(path, "index.parquet"))
    gc.enable()
    with pytest.raises(CorruptCheckpointError):
        ckptguard.load(path)
    assert gc.isenabled()


def test_concurrent_loads_restore_the_collector_when_the_last_ends(saved) -> None:
    path, state = saved
    gc.enable()
    inside = threading.Barrier(3)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            with collector.paused():
                inside.wait(timeout=30)  # all three paused at once
                assert not gc.isenabled()
                inside.wait(timeout=30)
            ckptguard.load(path)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and gc.isenabled()


def test_a_save_pauses_its_cpu_phases_and_never_its_waits(tmp_path, monkeypatch) -> None:
    state = {f"t{i}": torch.full((8,), float(i)) for i in range(50)}
    phases: list[tuple[str, bool]] = []
    for name in ("describe", "write", "commit"):
        real = getattr(saver._Save, name)

        def spy(self, *a, _real=real, _name=name, **k):
            phases.append((_name, gc.isenabled()))
            return _real(self, *a, **k)

        monkeypatch.setattr(saver._Save, name, spy)
    real_gather = LocalCoordinator.gather

    def gather(self, data: bytes, timeout: float):
        phases.append(("gather", gc.isenabled()))
        return real_gather(self, data, timeout)

    monkeypatch.setattr(LocalCoordinator, "gather", gather)
    was = gc.isenabled()
    gc.enable()
    try:
        ckptguard.save(state, os.path.join(tmp_path, "c"), compress="none")
        assert gc.isenabled()
    finally:
        gc.enable() if was else gc.disable()
    assert phases == [
        ("describe", False),
        ("gather", True),
        ("write", False),
        ("gather", True),
        ("commit", False),
    ]
    out = ckptguard.load(os.path.join(tmp_path, "c"))
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_a_failed_save_restores_the_collector(tmp_path) -> None:
    was = gc.isenabled()
    gc.enable()
    try:
        with pytest.raises(ckptguard.UnsupportedObjectError):
            ckptguard.save({"x": object()}, os.path.join(tmp_path, "c"))
        assert gc.isenabled()
    finally:
        gc.enable() if was else gc.disable()
