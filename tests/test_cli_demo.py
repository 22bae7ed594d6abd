"""``ckptguard demo`` (ckptguard/cli/demo.py, running ckptguard/demo.py)."""

from __future__ import annotations

from pathlib import Path

import ckptguard


def test_demo_runs(tmp_path: Path) -> None:
    from ckptguard.demo import run_demo

    store = tmp_path / "ckpts"
    assert run_demo(str(store), steps=3) == 0
    assert [i.name for i in ckptguard.Store(str(store)).list()] == ["step-3"]
    assert run_demo(str(store), steps=3) == 0  # again: overwrite works
