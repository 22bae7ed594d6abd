"""A tensor that another thread writes to while it is saved (a misuse): the save may hold a mix
of old and new values per chunk, but whatever it commits verifies and loads (invariant I9)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import ckptguard
from ckptguard import backend

CHUNK = 1 << 20  # 1 MiB chunks: several per tensor, so records and hashes interleave with writes


@contextmanager
def scribbler(t: torch.Tensor) -> Iterator[None]:
    """Overwrite ``t`` in place, as fast as torch allows, until the block ends."""
    stop = threading.Event()

    def run() -> None:
        g = torch.Generator().manual_seed(1)
        while not stop.is_set():
            t.uniform_(generator=g)  # releases the GIL: runs alongside the encoder threads

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.rand(4 << 20), "h": torch.rand(4 << 20).to(torch.bfloat16)}


@pytest.fixture(params=[backend.NATIVE, backend.PYTHON])
def which_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == backend.NATIVE and not backend.available():
        pytest.skip("native extension not built")
    with backend.use(request.param):
        yield request.param


def _check(path: str) -> None:
    report = ckptguard.verify(path)
    assert report.ok, report.problems
    back = ckptguard.load(path)
    assert set(back) == {"w", "h"}


@pytest.mark.parametrize("compress", ["none", "lz4", "zstd"])
def test_save_while_another_thread_writes_commits_a_verifiable_checkpoint(
    tmp_path, which_backend: str, compress: str
) -> None:
    state = _state()
    for i in range(4):
        with scribbler(state["w"]), scribbler(state["h"]):
            ckptguard.save(state, tmp_path / "s" / f"c{i}", compress=compress, chunk_size=CHUNK)
        _check(str(tmp_path / "s" / f"c{i}"))


@pytest.mark.parametrize("compress", ["none", "lz4"])
def test_streamed_async_save_while_another_thread_writes_commits_a_verifiable_checkpoint(
    tmp_path, which_backend: str, compress: str
) -> None:
    state = _state()
    # A pool smaller than the state: the save streams, reading the source tensors in place.
    with ckptguard.Checkpointer(tmp_path / "s", max_host_bytes=4 * CHUNK) as ck:
        for i in range(3):
            with scribbler(state["w"]), scribbler(state["h"]):
                handle = ck.save_async(state, f"c{i}", compress=compress, chunk_size=CHUNK)
                handle.result(timeout=120)
            _check(str(tmp_path / "s" / f"c{i}"))
