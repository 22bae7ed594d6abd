"""``ckptguard latest`` (ckptguard/cli/latest.py)."""

from __future__ import annotations

from pathlib import Path

from clikit import run


def test_latest(filled: Path, tmp_path: Path) -> None:
    res = run("latest", filled)
    assert res.exit_code == 0
    assert res.stdout.strip() == str((filled / "step-2").resolve())
    empty = run("latest", tmp_path / "nothing-here")
    assert empty.exit_code == 1 and "no committed checkpoint" in empty.stderr
    assert empty.stdout == ""
