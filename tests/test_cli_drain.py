"""``ckptguard drain`` (ckptguard/cli/drain.py): its arguments, lines and exit codes. The drain
itself (copy, verify, commit, LATEST, Lustre striping) is tested in test_drain.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from clikit import flip_payload_byte, run
from conftest import small_state

import ckptguard
from ckptguard.format.layout import LATEST


def save(root: Path, name: str, seed: int) -> None:
    ckptguard.save(small_state(seed), str(root / name), step=seed, chunk_size=4096)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A staging store with step-1 and step-2 (LATEST)."""
    root = tmp_path / "fast"
    save(root, "step-1", 1)
    save(root, "step-2", 2)
    return root


@pytest.fixture
def dst(tmp_path: Path) -> Path:
    return tmp_path / "durable"


def test_cli_drain(src: Path, dst: Path) -> None:
    res = run("drain", src, dst, "--latest")
    assert res.exit_code == 0, res.output
    (line,) = res.output.splitlines()
    assert line.startswith("drained step-2 -> ") and " bytes (" in line and " s (" in line
    res = run("drain", src, dst, "--all", "--jobs", "2")
    assert res.exit_code == 0, res.output
    assert [ln.split()[1] for ln in res.output.splitlines()] == ["step-1"]
    res = run("drain", src, dst)
    assert res.exit_code == 0 and "nothing to drain" in res.output
    assert run("verify", dst).exit_code == 0
    assert (dst / LATEST).read_text() == "step-2\n"


def test_cli_drain_errors(src: Path, dst: Path) -> None:
    res = run("drain", src, dst, "--name", "step-1", "--latest")
    assert res.exit_code == 2 and res.output.startswith("error: ")
    res = run("drain", src, dst, "--name", "nope")
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "error: " in res.output
    save(dst, "step-1", 42)
    res = run("drain", src, dst, "--name", "step-1")
    assert res.exit_code == 2 and "--overwrite" in res.output and res.output.count("\n") == 1
    res = run("drain", src, dst, "--name", "step-1", "--overwrite")
    assert res.exit_code == 0, res.output
    res = run("drain", src.parent / "missing", dst)
    assert res.exit_code == 2 and res.output.startswith("error: ")
    flip_payload_byte(src / "step-2", "model/w")
    res = run("drain", src, dst)
    assert res.exit_code == 2 and "model/w" in res.output and res.output.count("\n") == 1
