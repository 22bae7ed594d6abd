"""``ckptguard export`` (ckptguard/cli/export.py); the formats themselves: tests/test_export.py."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import torch
from clikit import cli_state, flip_payload_byte, run
from safetensors.torch import load_file


def test_export_safetensors_names_what_it_left_out(filled: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    res = run("export", filled, dest, "--to", "safetensors")  # a store: its LATEST
    assert res.exit_code == 0, res.output
    assert f"wrote {dest / 'model.safetensors'}" in res.stdout
    assert "3 tensors" in res.stdout and str(filled / "step-2") in res.stdout
    assert res.stderr.splitlines() == [
        "left out of the safetensors export (2):",
        "  step (not a tensor)",
        "  lr (not a tensor)",
    ]
    got, want = load_file(dest / "model.safetensors"), cli_state(2)
    assert torch.equal(got["model.w"], want["model"]["w"]) and torch.equal(got["ids"], want["ids"])


def test_export_select_strict_and_shards(filled: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    res = run(
        "export", filled / "step-1", dest, "--to", "safetensors", "--select", "model",
        "--strict", "--max-shard-size", "4KiB",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "b": "model-00002-of-00002.safetensors",
        "w": "model-00001-of-00002.safetensors",
    }
    res = run("export", filled, tmp_path / "strict", "--to", "safetensors", "--strict")
    assert res.exit_code == 2 and res.stderr.startswith("error: safetensors cannot hold 2 value")
    assert not (tmp_path / "strict").exists()


def test_export_hdf5_and_torch(filled: Path, tmp_path: Path) -> None:
    assert run("export", filled, tmp_path / "h", "--to", "hdf5").exit_code == 0
    with h5py.File(tmp_path / "h" / "checkpoint.h5") as f:
        assert f.attrs["step"] == 2 and f["model/w"].shape == (64, 32)
    assert run("export", filled, tmp_path / "t", "--to", "torch").exit_code == 0
    got = torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=True)
    assert got["lr"] == 0.5 and torch.equal(got["ids"], cli_state(2)["ids"])


def test_export_errors_are_one_line_and_exit_2(filled: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    for args, message in (
        (["--to", "onnx"], "error: cannot export to 'onnx'"),
        (["--to", "torch", "--select", "nope"], "error: select 'nope': no key 'nope'"),
        (["--to", "hdf5", "--rank", "3"], "error: rank must be a saved rank"),
    ):
        res = run("export", filled, dest, *args)
        assert res.exit_code == 2 and res.stderr.startswith(message), res.output
        assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.output
    res = run("export", filled, dest, "--to", "safetensors", "--max-shard-size", "big")
    assert res.exit_code == 2 and "is not a size" in res.stderr
    res = run("export", tmp_path / "missing", dest, "--to", "torch")
    assert res.exit_code == 2 and res.stderr.startswith("error: no such checkpoint or store")


def test_export_refuses_to_replace_and_corruption(filled: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    assert run("export", filled, dest, "--to", "torch").exit_code == 0
    res = run("export", filled, dest, "--to", "torch")
    assert res.exit_code == 2 and "already exists: pass force=True (--force)" in res.stderr
    assert run("export", filled, dest, "--to", "torch", "--force").exit_code == 0
    flip_payload_byte(filled / "step-2", "model/w")
    res = run("export", filled, tmp_path / "bad", "--to", "hdf5")
    assert res.exit_code == 2 and "chunk hash mismatch" in res.stderr and "model/w" in res.stderr
    assert not (tmp_path / "bad").exists()


def test_export_of_a_one_file_checkpoint(tmp_path: Path) -> None:
    import ckptguard

    ckptguard.save(cli_state(3), tmp_path / "model.pt")
    res = run("export", tmp_path / "model.pt", tmp_path / "out", "--to", "safetensors")
    assert res.exit_code == 0, res.output
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(got["model.w"], cli_state(3)["model"]["w"])


def test_a_killed_export_leaves_temporaries_the_next_one_removes(
    filled: Path, tmp_path: Path
) -> None:
    """``ckptguard export`` killed with its files whole but not yet named (failpoint
    export.written): nothing under a final name, its temporaries named for it and its
    process; the next export to that DEST removes them."""
    import sys

    from conftest import run_command

    from ckptguard.temps import TEMP_MARK

    dest = tmp_path / "out"
    args = [sys.executable, "-m", "ckptguard.cli", "export", filled, dest, "--to", "safetensors"]
    args += ["--max-shard-size", "4KiB"]  # several files
    env = {"CKPTGUARD_FAILPOINT": "export.written:0:kill"}
    proc = run_command(args, 120, env=env)
    assert proc.returncode == -9, proc.stderr
    left = sorted(p.name for p in dest.iterdir())
    assert len(left) == 4 and all(n.startswith(".model") and TEMP_MARK in n for n in left), left
    other = dest / ".notes.txt.tmp"  # not an export's temporary: never touched
    other.write_text("mine")
    res = run("export", filled, dest, "--to", "safetensors", "--max-shard-size", "4KiB")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in dest.iterdir()) == [
        ".notes.txt.tmp",
        *(f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)),
        "model.safetensors.index.json",
    ]
