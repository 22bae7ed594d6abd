"""``ckptguard audit init|show|verify|check|prove``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

import ckptguard
from ckptguard import keys
from ckptguard.audit import merkle
from ckptguard.cli import cli


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store with one checkpoint saved before its log began, one after."""
    s = tmp_path / "store"
    ckptguard.save({"w": torch.ones(10)}, s / "old")
    assert run("key", "generate", "--out", tmp_path / "k").exit_code == 0
    r = run("audit", "init", s, "--key", tmp_path / "k.key", "--witness", tmp_path / "w")
    assert r.exit_code == 0, r.output
    assert "1 existing checkpoint(s) recorded as adopted" in r.output
    ckptguard.save({"w": torch.zeros(10)}, s / "new")
    return s


def test_verify_show_check(store: Path, tmp_path: Path) -> None:
    r = run("audit", "verify", store, "--key", tmp_path / "k.pub")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("ok   3 entries, 3 tree heads, signed by key")
    assert "head of size 3" in r.output
    j = json.loads(run("audit", "verify", store, "--json").output)
    assert j["ok"] and j["size"] == 3
    shown = run("audit", "show", store).output.splitlines()
    assert [line.split()[2] for line in shown] == ["init", "commit", "commit"]
    assert '"adopted": true' in shown[1] and "rank 0" in shown[2]
    last = json.loads(run("audit", "show", store, "--json", "--last", "1").output)
    assert last["checkpoint"] == "new"
    r = run("audit", "check", store)
    assert r.exit_code == 0 and "audit completeness 2/2 (100.0%)" in r.output


def test_verify_fails_with_exit_1_naming_the_entry(store: Path) -> None:
    log = store / ".audit" / "log.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:1] + lines[2:]))
    r = run("audit", "verify", store)
    assert r.exit_code == 1
    assert r.output.startswith("FAIL ") and "[entry 1]" in r.output
    j = json.loads(run("audit", "verify", store, "--json").output)
    assert j["ok"] is False and "[entry 1]" in j["error"]


def test_check_lists_gaps(store: Path) -> None:
    ckptguard.save({"w": torch.ones(1)}, store / "unrecorded")
    log = store / ".audit" / "log.jsonl"
    # its commit entry cut off (as a writer killed before its append leaves it): a gap
    lines = log.read_bytes().splitlines(keepends=True)
    assert b'"unrecorded"' in lines[-1]
    (store / ".audit" / "log.jsonl").write_bytes(b"".join(lines[:-1]))
    r = run("audit", "check", store)
    assert r.exit_code == 1
    assert "audit completeness 2/3 (66.7%)" in r.output
    assert "gap  commit unrecorded" in r.output
    j = json.loads(run("audit", "check", store, "--json").output)
    assert j["fraction"] == pytest.approx(2 / 3)
    assert [(g["kind"], g["name"]) for g in j["gaps"]] == [("commit", "unrecorded")]


def test_prove(store: Path) -> None:
    p = json.loads(run("audit", "prove", store, "--entry", "1").output)
    merkle.verify_inclusion(
        1,
        p["tree_size"],
        bytes.fromhex(p["leaf_hash"]),
        [bytes.fromhex(x) for x in p["path"]],
        bytes.fromhex(p["root"]),
    )
    c = json.loads(run("audit", "prove", store, "--since", "1").output)
    assert c["new_size"] == 3
    assert run("audit", "prove", store).exit_code == 2


def test_errors(tmp_path: Path, store: Path) -> None:
    r = run("audit", "verify", tmp_path / "nostore")
    assert r.exit_code == 2
    ckptguard.save({"w": torch.ones(1)}, tmp_path / "plain" / "a")
    r = run("audit", "verify", tmp_path / "plain")
    assert r.exit_code == 2 and "no audit log" in r.output
    r = run("audit", "init", store)
    assert r.exit_code == 2 and "already" in r.output
    other = keys.generate(tmp_path / "other")[1]
    r = run("audit", "verify", store, "--key", other)
    assert r.exit_code == 1 and "not the trusted key" in r.output
