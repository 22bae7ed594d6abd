"""``ckptguard ls`` (ckptguard/cli/ls.py)."""

from __future__ import annotations

from pathlib import Path

from clikit import cli_state, run

import ckptguard


def test_ls_marks_latest(filled: Path) -> None:
    res = run("ls", filled)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    (line1,) = [ln for ln in lines if "step-1" in ln]
    (line2,) = [ln for ln in lines if "step-2" in ln]
    assert "LATEST" in line2 and "LATEST" not in line1


def test_ls_empty_store(tmp_path: Path) -> None:
    res = run("ls", tmp_path)
    assert res.exit_code == 0 and "no committed checkpoints" in res.output


def test_ls_names_damaged_checkpoints(filled: Path) -> None:
    (filled / "step-1" / "MANIFEST.json").write_text("{broken")
    (filled / "step-2" / "MANIFEST.json").write_text("{broken")
    res = run("ls", filled)
    assert res.exit_code == 0
    assert "no committed checkpoints" in res.output and "2 skipped" in res.output
    for name in ("step-1", "step-2"):
        assert f"skipped {name}: " in res.output


def test_ls_of_a_one_file_checkpoint(tmp_path: Path) -> None:
    ckptguard.save(cli_state(1), tmp_path / "model.pt", step=5)
    res = run("ls", tmp_path / "model.pt")
    assert res.exit_code == 0, res.output
    assert "model.pt" in res.output and "5" in res.output
