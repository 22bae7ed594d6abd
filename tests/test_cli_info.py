"""``ckptguard info`` (ckptguard/cli/info.py)."""

from __future__ import annotations

from pathlib import Path

from clikit import cli_state, run

import ckptguard


def test_info_lists_tensors(filled: Path) -> None:
    res = run("info", filled / "step-2")
    assert res.exit_code == 0, res.output
    for text in (
        "step-2",
        "model/w",
        "model/b",
        "ids",
        "float32",
        "int64",
        "[64, 32]",
        "3 tensors",
        "ratio",
    ):
        assert text in res.output
    assert "shuffle-lz4" in res.output  # ids (0..999 as int64) compress; its codec is shown
    assert run("info", filled).exit_code == 0  # a store means its LATEST


def test_info_of_a_one_file_checkpoint(tmp_path: Path) -> None:
    ckptguard.save(cli_state(1), tmp_path / "model.pt", step=1)
    res = run("info", tmp_path / "model.pt")
    assert res.exit_code == 0, res.output
    assert "model.pt" in res.output and "model/w" in res.output and "3 tensors" in res.output
    link = tmp_path / "link.pt"
    link.symlink_to(tmp_path / "model.pt")
    res = run("info", link)
    assert res.exit_code == 2 and "symbolic link" in res.stderr


def test_info_shows_a_hold(tmp_path: Path) -> None:
    ckptguard.save(cli_state(1), tmp_path / "s" / "a")
    assert "held" not in run("info", tmp_path / "s" / "a").output
    ckptguard.Store(tmp_path / "s").hold("a", "case 7")
    res = run("info", tmp_path / "s" / "a")
    assert res.exit_code == 0 and "held" in res.output and "case 7" in res.output
