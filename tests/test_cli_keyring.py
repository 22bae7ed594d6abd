"""``ckptguard keyring list|create|rotate`` and ``ckptguard shred``: keys listed without their
bytes, a rotation from the command line, a shred that refuses without --yes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptguard import keyring
from ckptguard.cli import cli
from ckptguard.errors import ScopeShreddedError

OLD, NEW = bytes(range(32)), bytes(range(32, 64))


def kek_file(path: Path, key: bytes) -> str:
    path.write_text(key.hex() + "\n")
    path.chmod(0o600)
    return str(path)


def test_create_list_rotate_shred(tmp_path: Path, monkeypatch) -> None:
    for v in ("CKPTGUARD_KEK", "CKPTGUARD_KEK_FILE", "CKPTGUARD_KEK_COMMAND"):
        monkeypatch.delenv(v, raising=False)
    store = tmp_path / "store"
    store.mkdir()
    old, new = kek_file(tmp_path / "old", OLD), kek_file(tmp_path / "new", NEW)
    run = CliRunner().invoke
    r = run(cli, ["keyring", "create", str(store), "tenant-a"])
    assert r.exit_code == 2 and "no key-encryption key" in r.output, r.output
    r = run(cli, ["keyring", "create", str(store), "tenant-a", "--kek-file", old])
    assert r.exit_code == 0, r.output
    key_id = r.output.strip()
    monkeypatch.setenv("CKPTGUARD_KEK_FILE", old)
    r = run(cli, ["keyring", "create", str(store), "tenant-b"])
    assert r.exit_code == 0 and r.output.strip() != key_id, r.output
    r = run(cli, ["keyring", "rotate", str(store), "--new-kek-file", new])
    assert r.exit_code == 0 and "re-wrapped 2 key(s)" in r.output, r.output
    k = keyring.unwrap(str(store), "tenant-a", key_id, keyring.Kek(NEW))
    r = run(cli, ["shred", str(store), "tenant-a", "--reason", "contract ended"])
    assert r.exit_code == 2 and "--yes" in r.output and "irreversibly" in r.output, r.output
    assert keyring.unwrap(str(store), "tenant-a", key_id, keyring.Kek(NEW)) == k
    r = run(cli, ["shred", str(store), "tenant-a", "--reason", "contract ended", "--yes"])
    assert r.exit_code == 0 and f"shredded 'tenant-a' in {store.resolve()}" in r.output, r.output
    with pytest.raises(ScopeShreddedError):
        keyring.unwrap(str(store), "tenant-a", key_id, keyring.Kek(NEW))
    r = run(cli, ["keyring", "list", str(store), "--json"])
    assert r.exit_code == 0, r.output
    doc = {d["scope"]: d for d in json.loads(r.output)}
    assert doc["tenant-a"]["shredded"] and doc["tenant-a"]["reason"] == "contract ended"
    assert doc["tenant-b"]["kek_id"] == keyring.Kek(NEW).kek_id
    r = run(cli, ["keyring", "list", str(store)])
    assert "2 scopes" in r.output and "shredded" in r.output and NEW.hex() not in r.output
    r = run(cli, ["shred", str(store), "bad\nscope", "--yes"])
    assert r.exit_code == 2 and "control character" in r.output, r.output


def test_info_and_verify_of_an_encrypted_checkpoint(tmp_path, monkeypatch) -> None:
    """``info`` names the scopes; ``verify`` without the key says what it checked and what it
    could not; a shredded scope fails nothing, as its bytes still verify as stored."""
    import torch
    from clikit import run

    import ckptguard

    monkeypatch.setenv("CKPTGUARD_KEK", "c3" * 32)
    for var in ("CKPTGUARD_KEK_FILE", "CKPTGUARD_KEK_COMMAND"):
        monkeypatch.delenv(var, raising=False)
    state = {"m": {"w": torch.randn(300)}, "o": {"s": torch.randn(20)}}
    ckptguard.save(state, tmp_path / "c", encrypt={"m/*": "tenant-a", "o/*": "tenant-b"})
    out = run("info", tmp_path / "c")
    assert out.exit_code == 0, out.output
    assert "tenant-a (1 tensors)" in out.output and "sealed (tenant-b)" in out.output
    out = run("verify", tmp_path / "c")
    assert out.exit_code == 0 and "checked as stored only" not in out.output
    monkeypatch.setenv("CKPTGUARD_KEK", "d4" * 32)
    out = run("verify", tmp_path / "c")
    assert out.exit_code == 0, out.output
    assert "scope 'tenant-a' checked as stored only" in out.output
    monkeypatch.setenv("CKPTGUARD_KEK", "c3" * 32)
    assert run("shred", tmp_path, "tenant-a", "--yes").exit_code == 0
    out = run("verify", tmp_path / "c")
    assert out.exit_code == 0 and "shredded" in out.output
