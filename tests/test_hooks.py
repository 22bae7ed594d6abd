"""Commit hooks: run on every commit, never after a failed save, and never undo a commit."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
import torch

import ckptguard
from ckptguard import hooks
from ckptguard.format.manifest import CheckpointInfo


@pytest.fixture
def seen() -> list[CheckpointInfo]:
    got: list[CheckpointInfo] = []
    hooks.add_commit_hook(got.append)
    yield got
    hooks.remove_commit_hook(got.append)


def test_hook_runs_after_a_commit(tmp_path: Path, seen: list[CheckpointInfo]) -> None:
    info = ckptguard.save({"x": torch.ones(3)}, tmp_path / "s" / "a", step=7)
    assert seen == [info]
    assert seen[0].step == 7 and os.path.isdir(seen[0].path)


def test_hook_does_not_run_after_a_failed_save(tmp_path: Path, seen: list[CheckpointInfo]) -> None:
    ckptguard.save({"x": torch.ones(3)}, tmp_path / "s" / "a")
    seen.clear()
    with pytest.raises(ckptguard.CheckpointExistsError):
        ckptguard.save({"x": torch.ones(3)}, tmp_path / "s" / "a")
    with pytest.raises(ckptguard.UnsupportedObjectError):
        ckptguard.save({"x": object()}, tmp_path / "s" / "b")
    assert seen == []


def test_failing_hook_warns_and_the_commit_stands(
    tmp_path: Path, seen: list[CheckpointInfo]
) -> None:
    def broken(info: CheckpointInfo) -> None:
        raise RuntimeError("listener down")

    hooks.add_commit_hook(broken)
    try:
        with pytest.warns(ckptguard.CheckpointWarning, match="listener down"):
            info = ckptguard.save({"x": torch.ones(3)}, tmp_path / "s" / "a")
    finally:
        hooks.remove_commit_hook(broken)
    assert seen == [info]  # a later hook still ran
    assert ckptguard.load(info.path)["x"].tolist() == [1.0, 1.0, 1.0]


def test_hook_added_once(seen: list[CheckpointInfo]) -> None:
    hooks.add_commit_hook(seen.append)  # the same function again
    hooks.run_commit_hooks(_info())
    assert len(seen) == 1


def test_agent_client_registers_its_hook() -> None:
    from ckptguard.agent import client

    client.register_commit_hook()  # idempotent: it was registered when the client was imported
    assert hooks.registered().count(client.notify_agent_of_commit) == 1


def _info() -> CheckpointInfo:
    now = dt.datetime.now(dt.timezone.utc)
    return CheckpointInfo("a", "/x/a", "0" * 32, None, now, 1, 0, 0, 0, 0, 1)
