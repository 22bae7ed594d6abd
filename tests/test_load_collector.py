"""A load pauses Python's cyclic garbage collector while it builds its objects, and leaves the
collector as it found it: enabled or disabled, after a good load, a refused one, and loads
running in several threads at once."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator

import pytest
import torch

import ckptguard
from ckptguard import loader
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
            with loader.collector_paused():
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
