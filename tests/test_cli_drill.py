"""``ckptguard drill`` (ckptguard/cli/drill.py): exit codes and what it prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clikit import flip_payload_byte, run


def test_drill_ok_as_json(filled: Path) -> None:
    res = run("drill", filled, "--checkpoint", "step-1", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert (doc["ok"], doc["checkpoint"], doc["device"], doc["problems"]) == (
        True,
        "step-1",
        "cpu",
        [],
    )


def test_drill_of_a_damaged_checkpoint_exits_1_naming_it(filled: Path) -> None:
    flip_payload_byte(filled / "step-2", "model/w")
    res = run("drill", filled, "--checkpoint", "step-2", "--device", "cpu")
    assert res.exit_code == 1, res.output
    assert f"FAIL drill of {filled / 'step-2'}" in res.output
    assert "chunk hash mismatch" in res.output


@pytest.mark.backend_independent  # refused before any load
@pytest.mark.parametrize(
    "args",
    [
        ["--checkpoint", "step-1", "--random"],
        ["--checkpoint", "no-such"],
        ["--device", "tpu"],
    ],
)
def test_drill_usage_errors_exit_2(filled: Path, args: list[str]) -> None:
    res = run("drill", filled, *args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output


@pytest.mark.backend_independent
def test_drill_of_an_empty_store_exits_2(tmp_path: Path) -> None:
    res = run("drill", tmp_path)
    assert res.exit_code == 2 and "no committed checkpoint" in res.output
