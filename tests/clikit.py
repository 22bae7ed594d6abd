"""Helpers for the tests of the ``ckptguard`` command (tests/test_cli*.py): the command run
in-process (CliRunner) and as the installed console script, a filled store, and a payload byte
flipped through index.parquet. Loaded as a plugin by conftest.py, so ``filled`` is a fixture."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner, Result

import ckptguard
from ckptguard.cli import cli

SCRIPT = Path(sys.executable).parent / "ckptguard"


def cli_state(seed: int) -> dict[str, Any]:
    """Two tensors of the model (model/w spans two 4 KiB chunks), an int64 range that
    compresses, and plain values."""
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
    ckptguard.save(cli_state(1), str(root / "step-1"), step=1, chunk_size=4096, compress="lz4")
    ckptguard.save(
        cli_state(2),
        str(root / "step-2"),
        step=2,
        chunk_size=4096,
        metadata={"a": [1]},
        compress="lz4",
    )
    return root


def run(*args: object) -> Result:
    """``ckptguard ARGS`` in this process."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def script(*args: object) -> subprocess.CompletedProcess[str]:
    """``ckptguard ARGS`` through the installed console script (skips if it is not installed)."""
    if not SCRIPT.exists():
        pytest.skip(f"console script not installed at {SCRIPT}")
    cmd = [str(SCRIPT), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def flip_payload_byte(ckpt: Path, key: str) -> None:
    """Flip one byte inside a payload of tensor ``key`` (its middle chunk), found through
    index.parquet."""
    table = pq.read_table(ckpt / "index.parquet", use_threads=False)
    rows = [r for r in table.to_pylist() if r["key"] == key]
    row = rows[len(rows) // 2]
    pos = row["offset"] + 64 + row["stored_len"] // 2
    with open(ckpt / row["file"], "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0xFF]))
