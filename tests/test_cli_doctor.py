"""``ckptguard doctor`` (ckptguard/cli/doctor.py)."""

from __future__ import annotations

from clikit import run

from ckptguard import backend


def test_doctor_reports_path() -> None:
    res = run("doctor")
    assert res.exit_code == 0, res.output
    assert f"codec path: {backend.name()}" in res.output
    assert backend.reason() in res.output
