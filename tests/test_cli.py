"""The ``ckptguard`` group (ckptguard/cli/__init__.py) and what every command shares
(cli/_output.py, cli/_args.py): registration, help and version, error lines and exit codes, the
console script, and escaping of everything printed. Each command has its own test_cli_<name>.py."""

from __future__ import annotations

import importlib
import keyword
import pkgutil
import re
import shutil
from pathlib import Path

import pytest
import torch
from clikit import flip_payload_byte, run, script

import ckptguard
import ckptguard.cli
from ckptguard.cli import cli
from ckptguard.cli._args import parse_duration


@pytest.mark.backend_independent  # starts no save or load
def test_every_command_module_is_registered() -> None:
    """One module per command: each public module of ckptguard/cli is a command of that name
    (``import_`` for ``import``, a Python keyword), and the group has no command without a
    module (bench, an optional part, is lazy)."""
    here = Path(ckptguard.cli.__file__).parent
    modules = {m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_")}
    commands = {m[:-1] if keyword.iskeyword(m[:-1]) else m: m for m in modules}
    assert set(commands) == set(cli.commands)
    for name, module in commands.items():
        assert cli.commands[name] is importlib.import_module(f"ckptguard.cli.{module}").command


@pytest.mark.backend_independent  # starts no save or load
def test_help_and_version() -> None:
    res = run("--help")
    assert res.exit_code == 0
    for name in ("ls", "info", "verify", "latest", "gc", "delete", "restore", "demo", "bench"):
        assert name in res.output
    res = run("--version")
    assert res.exit_code == 0 and ckptguard.__version__ in res.output


@pytest.mark.backend_independent  # starts no save or load
def test_parse_duration() -> None:
    assert parse_duration("0") == 0
    assert parse_duration("90s") == 90
    assert parse_duration("30m") == 1800
    assert parse_duration("1h30m") == 5400
    assert parse_duration("2d") == 172800


@pytest.mark.backend_independent  # starts no save or load
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


@pytest.mark.backend_independent  # starts no save or load
def test_bench_listed_even_if_unavailable() -> None:
    res = run("bench", "--help")
    assert res.exit_code in (0, 2)
    if res.exit_code == 2:
        assert res.stderr.startswith("error: ") and "bench" in res.stderr


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
