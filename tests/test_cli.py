"""The ``ckptguard`` command, in-process (CliRunner) and as the installed console script."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner, Result

import ckptguard
from ckptguard.cli import cli, parse_duration

SCRIPT = Path(sys.executable).parent / "ckptguard"


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(64, 32, generator=g), "b": torch.zeros(32)},
        "ids": torch.arange(1000, dtype=torch.int64),
        "step": seed,
        "lr": 0.5,
    }


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """A store with two committed checkpoints; step-2 is LATEST."""
    root = tmp_path / "store"
    ckptguard.save(_state(1), str(root / "step-1"), step=1, chunk_size=4096)
    ckptguard.save(_state(2), str(root / "step-2"), step=2, chunk_size=4096, metadata={"a": [1]})
    return root


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def script(*args: object) -> subprocess.CompletedProcess[str]:
    if not SCRIPT.exists():
        pytest.skip(f"console script not installed at {SCRIPT}")
    cmd = [str(SCRIPT), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def flip_payload_byte(ckpt: Path, key: str) -> None:
    """Flip one byte inside a payload of tensor ``key``, found through index.parquet."""
    table = pq.read_table(ckpt / "index.parquet", use_threads=False)
    rows = [r for r in table.to_pylist() if r["key"] == key]
    row = rows[len(rows) // 2]
    pos = row["offset"] + 64 + row["stored_len"] // 2
    with open(ckpt / row["file"], "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0xFF]))


def test_help_and_version() -> None:
    res = run("--help")
    assert res.exit_code == 0
    for name in ("ls", "info", "verify", "latest", "gc", "delete", "restore", "demo", "bench"):
        assert name in res.output
    res = run("--version")
    assert res.exit_code == 0 and ckptguard.__version__ in res.output


def test_ls_marks_latest(filled: Path) -> None:
    res = run("ls", filled)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    (line1,) = [ln for ln in lines if "step-1" in ln]
    (line2,) = [ln for ln in lines if "step-2" in ln]
    assert "LATEST" in line2 and "LATEST" not in line1


def test_ls_empty_store(tmp_path: Path) -> None:
    res = run("ls", tmp_path)
    assert res.exit_code == 0 and "no committed checkpoints" in res.output


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


def test_latest(filled: Path, tmp_path: Path) -> None:
    res = run("latest", filled)
    assert res.exit_code == 0
    assert res.stdout.strip() == str((filled / "step-2").resolve())
    empty = run("latest", tmp_path / "nothing-here")
    assert empty.exit_code == 1 and "no committed checkpoint" in empty.stderr
    assert empty.stdout == ""


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


def test_parse_duration() -> None:
    assert parse_duration("0") == 0
    assert parse_duration("90s") == 90
    assert parse_duration("30m") == 1800
    assert parse_duration("1h30m") == 5400
    assert parse_duration("2d") == 172800


def test_delete_moves_latest(filled: Path) -> None:
    res = run("delete", filled, "step-2")
    assert res.exit_code == 0, res.output
    assert not (filled / "step-2").exists()
    assert ckptguard.Store(str(filled)).latest().name == "step-1"
    assert run("delete", filled, "step-2").exit_code == 2


def test_restore_writes_torch_file(filled: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    res = run("restore", filled / "step-2", "--torch-out", out)
    assert res.exit_code == 0, res.output
    got = torch.load(out, weights_only=True)
    want = _state(2)
    assert torch.equal(got["model"]["w"], want["model"]["w"])
    assert torch.equal(got["model"]["b"], want["model"]["b"])
    assert torch.equal(got["ids"], want["ids"])
    assert got["step"] == 2 and got["lr"] == 0.5


def test_restore_refuses_corrupt(filled: Path, tmp_path: Path) -> None:
    flip_payload_byte(filled / "step-2", "ids")
    out = tmp_path / "out.pt"
    res = run("restore", filled / "step-2", "--torch-out", out)
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and "ids" in res.stderr
    assert not out.exists()


@pytest.mark.parametrize("cmd", ["ls", "info", "verify", "gc"])
def test_missing_path_is_error(cmd: str, tmp_path: Path) -> None:
    res = run(cmd, tmp_path / "missing")
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.output


def test_script_end_to_end(filled: Path, tmp_path: Path) -> None:
    res = script("ls", filled)
    assert res.returncode == 0 and "step-2" in res.stdout and "LATEST" in res.stdout
    res = script("latest", filled)
    assert res.returncode == 0 and res.stdout.strip() == str((filled / "step-2").resolve())
    assert script("verify", filled).returncode == 0
    bad = tmp_path / "copy" / "step-2"
    shutil.copytree(filled / "step-2", bad)
    flip_payload_byte(bad, "model/w")
    res = script("verify", bad)
    assert res.returncode == 1 and "model/w" in res.stdout
    res = script("info", tmp_path / "missing")
    assert res.returncode == 2 and res.stderr.startswith("error: ")
    assert "Traceback" not in res.stderr


def test_bench_listed_even_if_unavailable() -> None:
    res = run("bench", "--help")
    assert res.exit_code in (0, 2)
    if res.exit_code == 2:
        assert res.stderr.startswith("error: ") and "bench" in res.stderr


def test_demo_runs(tmp_path: Path) -> None:
    from ckptguard.demo import run_demo

    store = tmp_path / "ckpts"
    assert run_demo(str(store), steps=3) == 0
    assert [i.name for i in ckptguard.Store(str(store)).list()] == ["step-3"]
    assert run_demo(str(store), steps=3) == 0  # again: overwrite works


HOSTILE = ["\x1b[2J", "\x07", "\r", "\u202e", "\x9b", "\u2028", "\n"]
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def test_output_escapes_control_characters(tmp_path: Path) -> None:
    """Keys, names and paths from a checkpoint or store never reach the terminal raw: info,
    verify (a damaged chunk of a hostile key), ls and the error line escape them."""
    store = tmp_path / "s\x1b]0;title\x07"
    keys = {f"k{i}{c}x": torch.full((300,), float(i)) for i, c in enumerate(HOSTILE)}
    ckptguard.save(keys, str(store / "c1"), chunk_size=256)
    ckptguard.save(keys, str(store / "c2"), chunk_size=256)
    flip_payload_byte(store / "c2", "k0\x1b[2Jx")
    odd = store / "odd\x1b[31mname"  # a name the store does not list, with a manifest
    shutil.copytree(store / "c1", odd)
    outputs = [
        run("info", store / "c1"),
        run("verify", store / "c2"),
        run("verify", store),
        run("ls", store),
        run("info", tmp_path / "missing\x1b[2J\u202e"),
    ]
    for res in outputs:
        assert not UNSAFE.search(res.output), repr(res.output)
    info, bad = outputs[0].output, outputs[1].output
    assert "k0\\x1b[2Jx" in info and "k3\\u202ex" in info and "k2\\x0dx" in info
    assert "k6\\x0ax" in info  # a newline in a key is shown, not obeyed
    assert outputs[1].exit_code == 1 and "tensor=k0\\x1b[2Jx" in bad
    assert "odd\\x1b[31mname" in outputs[2].output and "odd\\x1b[31mname" in outputs[3].output
    assert outputs[4].exit_code == 2 and "missing\\x1b[2J\\u202e" in outputs[4].output


def test_ls_names_damaged_checkpoints(filled: Path) -> None:
    (filled / "step-1" / "MANIFEST.json").write_text("{broken")
    (filled / "step-2" / "MANIFEST.json").write_text("{broken")
    res = run("ls", filled)
    assert res.exit_code == 0
    assert "no committed checkpoints" in res.output and "2 skipped" in res.output
    for name in ("step-1", "step-2"):
        assert f"skipped {name}: " in res.output
