"""``ckptguard verify --trust`` (signed checkpoints, docs/security.md) and ``ckptguard run
--sign-key`` (the agent signs what it commits)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from clikit import run
from conftest import resign_manifest, run_command
from mpikit import need_mpi

import ckptguard
from ckptguard import keys


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, str, str, str]:
    priv, pub, kid = keys.generate(tmp_path / "k")
    s = tmp_path / "store"
    ckptguard.save({"w": torch.ones(10)}, s / "a", sign_key=priv)
    ckptguard.save({"w": torch.zeros(10)}, s / "b", sign_key=priv)
    return s, priv, pub, kid


def test_verify_trust(store: tuple[Path, str, str, str], tmp_path: Path) -> None:
    s, _, pub, kid = store
    r = run("verify", s, "--trust", pub)
    assert r.exit_code == 0, r.output
    assert r.output.count(f"signed by key {kid[:16]}") == 2 and "2 of 2 checkpoints ok" in r.output
    _, other, _ = keys.generate(tmp_path / "other")
    r = run("verify", s / "a", "--trust", other)
    assert r.exit_code == 1 and "FAIL" in r.output and "not trusted" in r.output, r.output
    r = run("verify", s / "a", "--trust", other, "--trust", pub)  # rotation: either key
    assert r.exit_code == 0, r.output
    ckptguard.save({"w": torch.ones(1)}, s / "plain")
    r = run("verify", s, "--trust", pub)
    assert r.exit_code == 1 and "is not signed" in r.output and "2 of 3" in r.output, r.output
    assert run("verify", s).exit_code == 0  # without --trust: hashes only


def test_verify_trust_forged_manifest(store: tuple[Path, str, str, str], tmp_path: Path) -> None:
    s, _, pub, _ = store
    forged = tmp_path / "forged"
    shutil.copytree(s / "a", forged)
    resign_manifest(forged, lambda b: b.update(step=99))
    assert run("verify", forged).exit_code == 0
    r = run("verify", forged, "--trust", pub)
    assert r.exit_code == 1 and "another MANIFEST.json" in r.output, r.output


def test_verify_bad_trust_path(store: tuple[Path, str, str, str], tmp_path: Path) -> None:
    r = run("verify", store[0], "--trust", tmp_path / "typo.pub")
    assert r.exit_code != 0 and "no key file" in r.output, r.output


# The wiring of an option through ranks or agents: its save path runs on both backends elsewhere.
@pytest.mark.backend_independent
def test_agent_sign_key(tmp_path: Path) -> None:
    """``ckptguard run --sign-key`` signs what the agent commits; a bad key stops the agents
    before the trainer starts (exit 2)."""
    priv, pub, kid = keys.generate(tmp_path / "k")
    trainer = tmp_path / "train.py"
    s = tmp_path / "store"
    trainer.write_text(
        "import torch, ckptguard\n"
        f"with ckptguard.Checkpointer({str(s)!r}) as ck:\n"
        "    ck.save_async({'w': torch.ones(4)}, 'h0').result()\n"
    )
    cli = [need_mpi(), "-n", "2", sys.executable, "-m", "ckptguard.cli", "run"]
    done = run_command([*cli, "--sign-key", priv, "--", sys.executable, trainer], 180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ckptguard.verify(s / "h0", trusted_keys=pub).signed_by == kid
    bad = run_command([*cli, "--sign-key", tmp_path / "typo.key", "--", "true"], 120)
    assert bad.returncode == 2 and "--sign-key" in bad.stdout + bad.stderr
