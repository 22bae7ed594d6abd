"""``ckptguard key generate``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptguard import keys
from ckptguard.cli import cli

pytestmark = pytest.mark.backend_independent  # no checkpoint is saved or read


def test_generate_prints_the_key_id_and_refuses_to_overwrite(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["key", "generate", "--out", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    kid = keys.load_private(tmp_path / "k.key").key_id
    assert kid in r.output
    assert stat.S_IMODE(os.stat(tmp_path / "k.key").st_mode) == 0o600
    again = CliRunner().invoke(cli, ["key", "generate", "--out", str(tmp_path / "k")])
    assert again.exit_code == 2 and "never replaced" in again.output
    assert keys.load_private(tmp_path / "k.key").key_id == kid
