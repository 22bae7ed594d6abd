"""``ckptguard restore`` (ckptguard/cli/restore.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from clikit import cli_state, flip_payload_byte, run

import ckptguard


def test_restore_writes_torch_file(filled: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    res = run("restore", filled / "step-2", "--torch-out", out)
    assert res.exit_code == 0, res.output
    got = torch.load(out, weights_only=True)
    want = cli_state(2)
    assert torch.equal(got["model"]["w"], want["model"]["w"])
    assert torch.equal(got["model"]["b"], want["model"]["b"])
    assert torch.equal(got["ids"], want["ids"])
    assert got["step"] == 2 and got["lr"] == 0.5


def test_restore_refuses_corrupt(filled: Path, tmp_path: Path) -> None:
    flip_payload_byte(filled / "step-2", "ids")
    out = tmp_path / "out.pt"
    res = run("restore", filled / "step-2", "--torch-out", out)
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and "ids" in res.stderr
    assert not out.exists()


def test_restore_a_one_file_checkpoint(tmp_path: Path) -> None:
    ckptguard.save(cli_state(3), tmp_path / "model.pt")
    out = tmp_path / "out.pt"
    res = run("restore", tmp_path / "model.pt", "--torch-out", out)
    assert res.exit_code == 0, res.output
    assert torch.equal(torch.load(out, weights_only=True)["ids"], cli_state(3)["ids"])
