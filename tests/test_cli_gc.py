"""``ckptguard gc`` (ckptguard/cli/gc.py)."""

from __future__ import annotations

from pathlib import Path

from clikit import run

import ckptguard


def test_gc_removes_staging_leftovers(filled: Path) -> None:
    junk = filled / ".staging" / f"step-9.{'a' * 32}"
    junk.mkdir(parents=True, exist_ok=True)
    (junk / "rank-00000.ckg").write_bytes(b"partial")
    res = run("gc", filled, "--older-than", "1h")
    assert res.exit_code == 0 and junk.exists()
    res = run("gc", filled, "--older-than", "0")
    assert res.exit_code == 0, res.output
    assert not junk.exists() and "step-9" in res.output
    assert [i.name for i in ckptguard.Store(str(filled)).list()] == ["step-1", "step-2"]


def test_gc_rejects_bad_duration(filled: Path) -> None:
    res = run("gc", filled, "--older-than", "soon")
    assert res.exit_code == 2 and "Traceback" not in res.output
