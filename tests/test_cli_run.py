"""``ckptguard run`` (ckptguard/cli/run.py): its arguments. The agent it starts is tested in
test_agent.py (and under Slurm in test_slurm.py)."""

from __future__ import annotations

import pytest
from clikit import run


@pytest.mark.parametrize("option", ["--grace", "--time-margin", "--term-timeout", "--peer-timeout"])
def test_run_rejects_a_bad_duration_before_starting(option: str) -> None:
    res = run("run", option, "soon", "--", "true")
    assert res.exit_code == 2, res.output
    assert "'soon' is not a duration" in res.output and "Traceback" not in res.output


def test_run_needs_a_command() -> None:
    res = run("run", "--grace", "90")
    assert res.exit_code == 2 and "Traceback" not in res.output
