"""``ckptguard verify`` (ckptguard/cli/verify.py) in one process; the parallel verify under
mpiexec and srun is in test_pverify.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from clikit import cli_state, flip_payload_byte, run

import ckptguard


def test_verify_good_checkpoint_store_and_latest(filled: Path) -> None:
    for args in ([filled / "step-1"], [filled], [filled, "--latest"]):
        res = run("verify", *args)
        assert res.exit_code == 0, res.output
        assert "FAIL" not in res.output
    assert "2 of 2 checkpoints ok" in run("verify", filled).output
    latest_only = run("verify", filled, "--latest").output
    assert "step-2" in latest_only and "step-1" not in latest_only


@pytest.mark.parametrize("damage", ["names_a_husk", "garbled"])
def test_broken_latest_fails_verify_but_ls_still_lists(filled: Path, damage: str) -> None:
    """A LATEST that names no committed checkpoint is damage (format.md section 1): verify of
    the store exits 1 and says so, with or without --latest; ls still lists what is there."""
    if damage == "names_a_husk":
        (filled / "step-2" / "MANIFEST.json").unlink()
    else:
        (filled / "LATEST").write_bytes(b"\x00garbage")
    for args in ([filled], ["--latest", filled]):
        r = run("verify", *args)
        assert r.exit_code == 1, r.output
        assert "FAIL" in r.output and "LATEST" in r.output, r.output
    r = run("ls", filled)
    assert r.exit_code == 0, r.output
    assert "step-1" in r.output and "warning" in r.output and "LATEST" in r.output


def test_verify_reports_flipped_byte(filled: Path) -> None:
    flip_payload_byte(filled / "step-1", "model/w")
    res = run("verify", filled / "step-1")
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.output
    assert any("problem" in ln and "model/w" in ln for ln in res.output.splitlines())
    res = run("verify", filled)
    assert res.exit_code == 1 and "1 of 2 checkpoints ok" in res.output
    assert run("verify", filled, "--latest").exit_code == 0  # step-2 is untouched


def test_verify_a_one_file_checkpoint(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    ckptguard.save(cli_state(1), p, chunk_size=4096)
    res = run("verify", p)
    assert res.exit_code == 0 and res.output.startswith("ok"), res.output
    with open(p, "r+b") as f:  # a payload byte of the second record
        f.seek(2 * 4096 + 64 + 10)
        byte = f.read(1)[0]
        f.seek(2 * 4096 + 64 + 10)
        f.write(bytes([byte ^ 0xFF]))
    res = run("verify", p)
    assert res.exit_code == 1 and "FAIL" in res.output and "problem" in res.output, res.output
