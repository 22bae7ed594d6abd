"""``ckptguard validate`` (ckptguard/cli/validate.py) and ``latest --skip-failed-validation``."""

from __future__ import annotations

from pathlib import Path

import pytest
from clikit import flip_payload_byte, run


def test_validate_ok_then_failed_then_skipped(filled: Path) -> None:
    res = run("validate", filled)
    assert res.exit_code == 0 and f"ok   {filled / 'step-2'}" in res.output, res.output
    flip_payload_byte(filled / "step-2", "model/w")
    res = run("validate", filled / "step-2")
    assert res.exit_code == 1, res.output
    assert f"validation FAILED: {filled / 'step-2'}" in res.output
    assert f"marked failed: {filled / '.validation' / 'step-2.json'}" in res.output
    assert run("latest", filled).output.strip() == str(filled / "step-2")
    res = run("latest", filled, "--skip-failed-validation")
    assert res.exit_code == 0 and res.output.splitlines()[-1] == str(filled / "step-1")
    assert "warning: " in res.output and "failed validation: step-2; loading step-1" in res.output


def test_latest_exits_1_when_every_checkpoint_failed(filled: Path) -> None:
    for name in ("step-1", "step-2"):
        flip_payload_byte(filled / name, "model/w")
        assert run("validate", filled / name).exit_code == 1
    res = run("latest", filled, "--skip-failed-validation")
    assert res.exit_code == 1 and "step-2, step-1" in res.output


@pytest.mark.backend_independent  # refused before any read
def test_validate_of_nothing_exits_2(tmp_path: Path) -> None:
    res = run("validate", tmp_path / "none")
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output
