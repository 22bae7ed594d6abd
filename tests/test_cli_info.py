"""``ckptguard info`` (ckptguard/cli/info.py)."""

from __future__ import annotations

from pathlib import Path

from clikit import run


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
