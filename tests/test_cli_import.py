"""``ckptguard import`` (ckptguard/cli/import_.py); what it reads is tests/test_import.py's."""

from __future__ import annotations

from pathlib import Path

import torch
from clikit import run
from safetensors.torch import save_file

import ckptguard


class Custom:
    """A class torch's weights-only unpickler does not know."""

    def __init__(self, value: int) -> None:
        self.value = value


def test_import_prints_what_it_wrote(tmp_path: Path) -> None:
    src = tmp_path / "model.pt"
    state = {"w": torch.randn(64, 32), "ids": torch.arange(100), "step": 3}
    torch.save(state, src)
    dest = tmp_path / "store" / "step-3"
    res = run("import", src, dest, "--step", 3, "--compress", "lz4")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == f"imported {src} (torch.save (zip)) as {dest}"
    assert lines[1].startswith("  2 tensors, ") and "verified: 2 chunks" in lines[2]
    out = ckptguard.load(dest)
    assert torch.equal(out["w"], state["w"]) and out["step"] == 3
    assert ckptguard.Store(tmp_path / "store").latest().step == 3


def test_import_of_a_safetensors_file(tmp_path: Path) -> None:
    src = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4)}, src, metadata={"format": "pt"})
    res = run("import", src, tmp_path / "store" / "m")
    assert res.exit_code == 0, res.output
    assert "(safetensors)" in res.stdout
    assert ckptguard.describe(tmp_path / "store" / "m").info.metadata == {"format": "pt"}


def test_a_refused_pickle_is_one_error_line_and_allow_pickle_warns(tmp_path: Path) -> None:
    src = tmp_path / "c.pt"
    torch.save({"extra": Custom(1)}, src)
    dest = tmp_path / "store" / "c"
    res = run("import", src, dest)
    assert res.exit_code == 2 and not dest.exists()
    assert res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1
    assert "Custom" in res.stderr and "--allow-pickle" in res.stderr
    res = run("import", src, dest, "--allow-pickle")
    assert res.exit_code == 0, res.output
    assert res.stderr.startswith("warning: --allow-pickle") and "arbitrary code" in res.stderr
    assert ckptguard.load(dest, allow_pickle=True)["extra"].value == 1


def test_import_errors_exit_2(tmp_path: Path) -> None:
    src = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, src)
    res = run("import", src, tmp_path / "store" / "m", "--compress", "brotli")
    assert res.exit_code == 2 and "--compress" in res.output
    assert run("import", src, tmp_path / "store" / "m").exit_code == 0
    res = run("import", src, tmp_path / "store" / "m")  # an existing name is not replaced
    assert res.exit_code == 2 and res.stderr.startswith("error: ")
    res = run("import", tmp_path / "missing.pt", tmp_path / "store" / "n")
    assert res.exit_code == 2 and "nothing to import" in res.stderr


def test_verify_refuses_another_format_and_suggests_import(tmp_path: Path) -> None:
    src = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, src)
    res = run("verify", src)
    assert res.exit_code == 2
    assert "not a ckptguard checkpoint" in res.stderr and "ckptguard import" in res.stderr
