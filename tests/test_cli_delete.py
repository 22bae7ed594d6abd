"""``ckptguard delete`` (ckptguard/cli/delete.py)."""

from __future__ import annotations

from pathlib import Path

from clikit import run

import ckptguard


def test_delete_moves_latest(filled: Path) -> None:
    res = run("delete", filled, "step-2")
    assert res.exit_code == 0, res.output
    assert not (filled / "step-2").exists()
    assert ckptguard.Store(str(filled)).latest().name == "step-1"
    assert run("delete", filled, "step-2").exit_code == 2
