"""A store rolled back to an older signed checkpoint, though the log says a newer one was
committed (issue 17): each signature still verifies (a signature binds bytes, not time), and the
audit log and its witness are what detect it (docs/security.md)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import independent_reader as ir
import pytest
import torch
from click.testing import CliRunner, Result

import ckptguard
from ckptguard import keys
from ckptguard.cli import cli


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """An audited store (witness beside it) with two signed checkpoints; step-2 is LATEST."""
    s = tmp_path / "store"
    assert run("key", "generate", "--out", tmp_path / "k").exit_code == 0
    r = run("audit", "init", s, "--key", tmp_path / "k.key", "--witness", tmp_path / "w")
    assert r.exit_code == 0, r.output
    for step in (1, 2):
        ckptguard.save(
            {"w": torch.full((64,), float(step))}, s / f"step-{step}", sign_key=tmp_path / "k.key"
        )
    assert run("audit", "check", s).exit_code == 0
    return s


def _trusted(store: Path, name: str) -> Result:
    return run("verify", store / name, "--trust", store.parent / "k.pub")


def test_newest_removed_and_latest_moved_back(store: Path) -> None:
    shutil.rmtree(store / "step-2")
    (store / "LATEST").write_text("step-1\n")
    assert _trusted(store, "step-1").exit_code == 0  # a signature says who, not when
    assert ckptguard.load(str(store))["w"][0].item() == 1.0  # LATEST now names the old one
    r = run("audit", "check", store)
    assert r.exit_code == 1
    assert "gap  delete step-2" in r.output


def test_older_checkpoint_put_in_place_of_the_newer(store: Path) -> None:
    shutil.rmtree(store / "step-2")
    shutil.copytree(store / "step-1", store / "step-2")
    r = _trusted(store, "step-2")  # its signed statement names step-1
    assert r.exit_code != 0 and "signed as 'step-1'" in r.output
    pub = keys.load_public(store.parent / "k.pub")
    with pytest.raises(ir.SpecViolation, match="signed as 'step-1'"):
        ir.read_checkpoint(str(store / "step-2"), trusted={pub.key_id: pub.raw})
    r = run("audit", "check", store)
    assert r.exit_code == 1 and "gap  delete step-2" in r.output


def test_whole_store_restored_from_an_older_snapshot(store: Path, tmp_path: Path) -> None:
    snap = tmp_path / "snapshot"
    shutil.copytree(store, snap, symlinks=True)
    ckptguard.save({"w": torch.full((64,), 3.0)}, store / "step-3", sign_key=tmp_path / "k.key")
    assert run("audit", "verify", store, "--witness", tmp_path / "w").exit_code == 0
    shutil.rmtree(store)
    os.rename(snap, store)  # log, heads and checkpoints all from before step-3
    assert run("audit", "check", store).exit_code == 0  # consistent with itself
    assert _trusted(store, "step-2").exit_code == 0
    r = run("audit", "verify", store, "--witness", tmp_path / "w")
    assert r.exit_code == 1, r.output
    assert "roll" in r.output.lower()
