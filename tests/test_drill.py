"""Restore drills (ckptguard/drill.py): a checkpoint restored as a resume would, timed, recorded;
a damaged one fails the drill and is recorded as failed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from clikit import flip_payload_byte

import ckptguard
from ckptguard import events
from ckptguard.drill import choose, drill


@pytest.fixture
def two(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    for i in (1, 2):
        state = {"w": torch.full((3000,), float(i)), "step": i}
        ckptguard.save(state, str(store / f"step-{i}"), step=i, chunk_size=4096)
    return store


def test_a_whole_checkpoint_drills_ok_with_a_scratch_copy(two: Path, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = drill(two, name="step-1", device="cpu", scratch=scratch)
    assert out.ok and out.problems == [] and out.checkpoint == "step-1"
    assert out.bytes > 0 and out.scratch_bytes > out.bytes and out.scratch_s is not None
    assert list(scratch.iterdir()) == []  # the copy is removed
    (ev,) = events.read(two).of("drill")
    want = ("step-1", "ok", "cpu", 0)
    assert (ev["checkpoint"], ev["result"], ev["device"], ev["problems"]) == want
    assert ev["uuid"] == out.uuid and ev["scratch"] == str(scratch) and ev["bytes"] == out.bytes


def test_a_damaged_checkpoint_fails_the_drill(two: Path) -> None:
    flip_payload_byte(two / "step-2", "w")
    out = drill(two, name="step-2", device="cpu")
    assert not out.ok and out.error == "CorruptCheckpointError"
    assert "chunk hash mismatch" in out.problems[0] and "step-2" in out.problems[0]
    (ev,) = events.read(two).of("drill")
    assert (ev["result"], ev["error"], ev["problems"]) == ("failed", "CorruptCheckpointError", 1)


def test_a_failed_load_leaves_no_scratch_copy(two: Path, tmp_path: Path) -> None:
    flip_payload_byte(two / "step-1", "w")
    out = drill(two, name="step-1", device="cpu", scratch=tmp_path)
    assert not out.ok and out.scratch_s is None  # the load failed first: no copy was made
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ckptguard-drill-")]


@pytest.mark.backend_independent  # the choice only
def test_the_random_choice_is_among_committed_and_repeatable(two: Path) -> None:
    os.makedirs(two / "not-committed")
    picks = {choose(two, seed=s).name for s in range(20)}
    assert picks == {"step-1", "step-2"}
    assert choose(two, seed=7).name == choose(two, seed=7).name
    with pytest.raises(ckptguard.CheckpointNotFoundError):
        choose(two, "not-committed")


@pytest.mark.backend_independent
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_cuda_without_a_device_is_refused_before_any_work(two: Path) -> None:
    with pytest.raises(ValueError, match="no CUDA device"):
        drill(two, device="cuda")
    assert events.read(two).of("drill") == []
