"""Who writes the audit log: a save's commit (one process, async, 4 MPI ranks), delete, prune,
gc, verify (API and CLI), restore, drain (both stores); the rule for an append that fails after
an operation's commit point; a writer killed between a commit and its entry. A store without an
audit log is untouched."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import run_command
from mpikit import need_mpi

import ckptguard
from ckptguard import AuditTamperedError, CheckpointWarning, audit, auditcheck, keys
from ckptguard.cli import cli
from ckptguard.drain import drain

HERE = Path(__file__).parent
SCENARIOS = HERE / "dist" / "scenarios.py"


def state(seed: int) -> dict:
    return {"w": torch.arange(1000, dtype=torch.float32) + seed, "step": seed}


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, keys.PublicKey]:
    priv, pub, _ = keys.generate(tmp_path / "k")
    store = tmp_path / "store"
    audit.init(store, priv, witness=str(tmp_path / "witness"))
    return store, keys.load_public(pub)


def entries(store: Path) -> list[dict]:
    return audit.read(store)[0].entries


def digest(ckpt: Path) -> str:
    return hashlib.sha256((ckpt / "MANIFEST.json").read_bytes()).hexdigest()


def test_commit_delete_prune_gc_verify(signed: tuple[Path, keys.PublicKey]) -> None:
    store, pub = signed
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        infos = [ckptguard.save(state(i), store / f"step-{i}") for i in range(3)]
        again = ckptguard.save(state(9), store / "step-0", overwrite=True)
        assert ckptguard.verify(store / "step-1").ok
        st = ckptguard.Store(store)
        st.delete("step-1")
        st.delete("step-2", prune=True)
        (store / ".staging" / "junk.x").mkdir()
        assert st.gc(older_than=0)
    es = entries(store)
    assert [e["op"] for e in es] == ["init"] + ["commit"] * 4 + ["verify", "delete", "prune", "gc"]
    for e, info in zip(es[1:4], infos, strict=True):
        assert (e["checkpoint"], e["uuid"], e["actor"]["rank"]) == (info.name, info.uuid, 0)
        assert e["detail"] == {"overwrite": False}
    assert es[4]["uuid"] == again.uuid and es[4]["detail"] == {"overwrite": True}
    assert es[4]["manifest_sha256"] == digest(store / "step-0")
    assert es[5]["detail"] == {"result": "ok", "problems": 0}
    assert (es[6]["uuid"], es[7]["uuid"]) == (infos[1].uuid, infos[2].uuid)
    assert es[8]["detail"]["removed"] == [".staging/junk.x"]
    audit.verify(store, key=pub)
    out = auditcheck.check(store)
    assert (out.fraction, out.total, out.gaps) == (1.0, 4, [])
    assert ckptguard.Store(store).scan().skipped == []  # .audit is never a checkpoint


def test_async_save_is_recorded(signed: tuple[Path, keys.PublicKey]) -> None:
    store, pub = signed
    with ckptguard.Checkpointer(store) as cp:
        info = cp.save_async(state(1), "a").result()
    info2 = ckptguard.save_async(state(2), store / "b").result()
    assert [(e["op"], e["uuid"]) for e in entries(store)[1:]] == [
        ("commit", info.uuid),
        ("commit", info2.uuid),
    ]
    audit.verify(store, key=pub)


def test_a_store_without_a_log_is_untouched(tmp_path: Path) -> None:
    store = tmp_path / "s"
    ckptguard.save(state(1), store / "a")
    ckptguard.verify(store / "a")
    ckptguard.Store(store).delete("a")
    ckptguard.Store(store).gc(older_than=0)
    ckptguard.save(state(1), store / "b")
    drain(store, tmp_path / "d")
    assert not (store / ".audit").exists() and not (tmp_path / "d" / ".audit").exists()


def test_failed_verify_is_recorded(signed: tuple[Path, keys.PublicKey]) -> None:
    store, _ = signed
    ckptguard.save(state(1), store / "a")
    data = store / "a" / "rank-00000.ckg"
    raw = bytearray(data.read_bytes())
    raw[8192] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert not ckptguard.verify(store / "a").ok
    assert entries(store)[-1]["detail"]["result"] == "failed"


def test_cli_verify_and_restore_are_recorded(
    signed: tuple[Path, keys.PublicKey], tmp_path: Path
) -> None:
    store, pub = signed
    ckptguard.save(state(1), store / "a")
    assert CliRunner().invoke(cli, ["verify", str(store)]).exit_code == 0
    out = tmp_path / "a.pt"
    r = CliRunner().invoke(cli, ["restore", str(store), "--torch-out", str(out)])
    assert r.exit_code == 0, r.output
    es = entries(store)
    assert [e["op"] for e in es[-2:]] == ["verify", "restore"]
    assert es[-1]["detail"] == {"out": str(out)}
    audit.verify(store, key=pub)


def test_drain_records_both_sides_and_witnesses(
    signed: tuple[Path, keys.PublicKey], tmp_path: Path
) -> None:
    store, pub = signed
    dst = tmp_path / "dst"
    audit.init(dst)
    a = ckptguard.save(state(1), store / "a")
    drain(store, dst)
    src_last = entries(store)[-1]
    assert (src_last["op"], src_last["uuid"]) == ("drain", a.uuid)
    assert src_last["detail"] == {"dest": str(dst / "a")}
    dst_last = entries(dst)[-1]
    assert (dst_last["op"], dst_last["uuid"]) == ("commit", a.uuid)
    assert dst_last["detail"] == {"source": str(store / "a"), "overwrite": False}
    assert dst_last["manifest_sha256"] == src_last["manifest_sha256"]
    witness = dst / ".audit" / "witness"
    rep = audit.verify(store, key=pub, witnesses=[str(witness)])
    assert rep.witnesses[-1] == (str(witness), rep.size)
    assert ckptguard.Store(dst).list()[0].name == "a"  # the witness directory is not listed
    assert auditcheck.check(dst).fraction == 1.0


def test_an_append_failing_after_the_commit_is_a_warning_and_a_gap(
    signed: tuple[Path, keys.PublicKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, pub = signed
    monkeypatch.setenv("CKPTGUARD_FAILPOINT", "audit.before_append:*:enospc")
    with pytest.warns(CheckpointWarning, match="audit log .* no entry for the commit of a"):
        info = ckptguard.save(state(1), store / "a")
    assert info.warnings and [i.name for i in ckptguard.Store(store).list()] == ["a"]
    monkeypatch.delenv("CKPTGUARD_FAILPOINT")
    ckptguard.save(state(2), store / "b")
    monkeypatch.setenv("CKPTGUARD_FAILPOINT", "audit.before_append:*:eio")
    with pytest.warns(CheckpointWarning, match="no entry for the delete of b"):
        ckptguard.Store(store).delete("b")
    monkeypatch.delenv("CKPTGUARD_FAILPOINT")
    ckptguard.save(state(3), store / "c")
    out = auditcheck.check(store)
    assert [(g.kind, g.name) for g in out.gaps] == [("commit", "a"), ("delete", "b")]
    assert (out.complete, out.total) == (1, 3)
    audit.verify(store, key=pub)


KILLED = """
import sys, torch, ckptguard
ckptguard.save({"w": torch.ones(100)}, sys.argv[1])
"""


@pytest.mark.parametrize("point", ["audit.before_append", "audit.appended", "audit.head_written"])
def test_a_writer_killed_after_the_commit(signed: tuple[Path, keys.PublicKey], point: str) -> None:
    store, pub = signed
    env = {**os.environ, "CKPTGUARD_FAILPOINT": f"{point}:0:kill"}
    p = subprocess.run([sys.executable, "-c", KILLED, str(store / "a")], env=env, timeout=300)
    assert p.returncode == -9
    assert [i.name for i in ckptguard.Store(store).list()] == ["a"]  # past the commit point
    gaps = auditcheck.check(store).gaps
    if point == "audit.before_append":
        assert [(g.kind, g.name) for g in gaps] == [("commit", "a")]
    else:
        assert gaps == []
    if point == "audit.appended":  # the entry is there, its head is not
        with pytest.raises(AuditTamperedError, match="covered by no tree head"):
            audit.verify(store, key=pub)
    ckptguard.save(state(2), store / "b")  # a later append seals what was left
    rep = audit.verify(store, key=pub)
    ops = [e["op"] for e in entries(store)]
    assert ("recover" in ops) == (point == "audit.appended")
    assert rep.witnesses[0][1] == rep.size


@pytest.mark.rank_job
def test_four_ranks_record_one_commit(signed: tuple[Path, keys.PublicKey], tmp_path: Path) -> None:
    store, pub = signed
    cmd = [need_mpi(), "-n", "4", sys.executable, SCENARIOS, "mpi", "save", store, "step-10"]
    assert run_command(cmd, 180).returncode == 0
    outs = [json.loads((store.parent / "out" / f"rank-{r}.json").read_text()) for r in range(4)]
    assert all(o["ok"] for o in outs), outs
    commits = [e for e in entries(store) if e["op"] == "commit"]
    assert len(commits) == 1
    assert (commits[0]["checkpoint"], commits[0]["uuid"]) == ("step-10", outs[0]["uuid"])
    assert commits[0]["actor"]["rank"] == 0
    audit.verify(store, key=pub)
    assert auditcheck.check(store).fraction == 1.0
