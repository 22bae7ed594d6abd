"""Signed checkpoints (docs/format.md section 2.1, docs/security.md): a save with ``sign_key``
commits SIGNATURE.json with the manifest; ``load``/``verify`` with ``trusted_keys`` refuse
(SignatureError, naming the checkpoint and the reason) anything that is not signed by a trusted
key over exactly this manifest; the independent reader agrees."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import independent_reader as ir
import pytest
import torch
from click.testing import CliRunner
from conftest import resign_manifest, rewrite_rows, run_command
from mpikit import need_mpi

import ckptguard
from ckptguard import (
    CorruptCheckpointError,
    KeyFileError,
    OneFileError,
    SignatureError,
    audit,
    auditcheck,
    cli,
    keys,
    sign,
)
from ckptguard.audit import canon
from ckptguard.format.layout import SIGNATURE, STAGING

HERE = Path(__file__).parent
SCENARIOS = HERE / "dist" / "scenarios.py"


def state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 40, generator=g), "i": torch.arange(3000) * seed, "s": seed}


@pytest.fixture
def kp(tmp_path: Path) -> tuple[str, str, str]:
    """A key pair in a directory of its own: (private, public, key id)."""
    (tmp_path / "keys").mkdir()
    return keys.generate(tmp_path / "keys" / "k1")


@pytest.fixture
def signed(tmp_path: Path, kp: tuple[str, str, str]) -> Path:
    ckptguard.save(state(1), tmp_path / "store" / "a", sign_key=kp[0])
    return tmp_path / "store" / "a"


def _raw_pub(pub: str) -> bytes:
    return ir.raw_public_key(Path(pub).read_bytes())


def test_round_trip(signed: Path, kp: tuple[str, str, str]) -> None:
    priv, pub, kid = kp
    assert sorted(os.listdir(signed)) == [
        "MANIFEST.json",
        SIGNATURE,
        "index.parquet",
        "rank-00000.ckg",
    ]
    for trusted in (pub, Path(pub).parent, keys.load_public(pub), [pub], keys.load_private(priv)):
        out = ckptguard.load(signed, trusted_keys=trusted)
        assert torch.equal(out["w"], state(1)["w"])
    report = ckptguard.verify(signed.parent, trusted_keys=pub)  # the store: its LATEST
    assert report.ok and report.signed_by == kid
    doc = json.loads((signed / SIGNATURE).read_bytes())
    assert doc["statement"]["checkpoint"] == "a" and doc["statement"]["key_id"] == kid
    ir.read_checkpoint(str(signed), trusted={kid: _raw_pub(pub)})
    assert ckptguard.load(signed)["s"] == 1  # without trusted keys: as any checkpoint


def _refused(path: Path, pub: str, match: str) -> None:
    with pytest.raises(SignatureError, match=match) as e:
        ckptguard.verify(path, trusted_keys=pub)
    assert str(path) in str(e.value)
    with pytest.raises(SignatureError, match=match):
        ckptguard.load(path, trusted_keys=pub)


def test_unsigned_and_untrusted(tmp_path: Path, signed: Path, kp: tuple[str, str, str]) -> None:
    ckptguard.save(state(2), tmp_path / "store" / "plain")
    _refused(tmp_path / "store" / "plain", kp[1], "is not signed")
    _, other, _ = keys.generate(tmp_path / "k2")
    _refused(signed, other, "which is not trusted")
    with pytest.raises(ir.SpecViolation, match="not trusted"):
        ir.read_checkpoint(str(signed), trusted={"0" * 64: _raw_pub(other)})


def _edit_signature(path: Path, edit: object) -> None:
    doc = json.loads((path / SIGNATURE).read_bytes())
    assert callable(edit)
    edit(doc)
    (path / SIGNATURE).write_bytes(canon.encode(doc) + b"\n")


def test_tampered_signature_file(signed: Path, kp: tuple[str, str, str]) -> None:
    pristine = (signed / SIGNATURE).read_bytes()
    flip = lambda d: d.update(sig=("0" if d["sig"][0] != "0" else "1") + d["sig"][1:])  # noqa: E731
    _edit_signature(signed, flip)
    _refused(signed, kp[1], "does not verify")
    (signed / SIGNATURE).write_bytes(pristine)
    _edit_signature(
        signed, lambda d: d["statement"].update(signed_at="2000-01-01T00:00:00.000000Z")
    )
    _refused(signed, kp[1], "does not verify")
    for bad in (b"", b"{}\n", pristine[:-1], pristine.replace(b'"sig"', b'"sig" '), b"x" * 5000):
        (signed / SIGNATURE).write_bytes(bad)
        _refused(signed, kp[1], "SIGNATURE.json")
    (signed / SIGNATURE).unlink()
    os.symlink(signed / "MANIFEST.json", signed / SIGNATURE)
    _refused(signed, kp[1], "SIGNATURE.json")
    (signed / SIGNATURE).unlink()
    os.mkfifo(signed / SIGNATURE)  # never opened blocking
    _refused(signed, kp[1], "SIGNATURE.json")


def test_audit_head_signature_is_not_a_checkpoint_signature(
    signed: Path, kp: tuple[str, str, str]
) -> None:
    """Domain separation: the same key's signature of the same statement under the audit log's
    prefix does not verify as a checkpoint's."""
    key = keys.load_private(kp[0])
    doc = json.loads((signed / SIGNATURE).read_bytes())
    forged = key.sign(b"ckptguard-audit-tree-head-v1\n" + canon.encode(doc["statement"]))
    _edit_signature(signed, lambda d: d.update(sig=forged.hex()))
    _refused(signed, kp[1], "does not verify")


def test_changed_manifest_and_index(tmp_path: Path, signed: Path, kp: tuple[str, str, str]) -> None:
    """The old attack: bytes changed and every hash recomputed (index row, index hash, manifest
    checksum) verify without keys, but not under them: the manifest is not the one signed."""
    forged = tmp_path / "forged"
    shutil.copytree(signed, forged)
    resign_manifest(forged, lambda b: b.update(metadata={"evil": True}))
    assert ckptguard.verify(forged).ok
    _refused(forged, kp[1], "another MANIFEST.json")
    with pytest.raises(ir.SpecViolation, match="another MANIFEST"):
        ir.read_checkpoint(str(forged), trusted={kp[2]: _raw_pub(kp[1])})
    shutil.rmtree(forged)
    shutil.copytree(signed, forged)
    rewrite_rows(forged, lambda rows: rows[0].update(hash=bytes(16)))
    _refused(forged, kp[1], "another MANIFEST.json")


def test_resigned_statement_of_another_checkpoint(
    tmp_path: Path, signed: Path, kp: tuple[str, str, str]
) -> None:
    """A valid signature by the trusted key, of another checkpoint (or of another manifest
    under this one's name and uuid), does not pass for this one's."""
    ckptguard.save(state(3), tmp_path / "store" / "b", sign_key=kp[0])
    other = (tmp_path / "store" / "b" / SIGNATURE).read_bytes()
    (signed / SIGNATURE).write_bytes(other)
    _refused(signed, kp[1], "another MANIFEST.json")
    key = keys.load_private(kp[0])
    raw = (signed / "MANIFEST.json").read_bytes()
    body = json.loads(raw)["manifest"]
    stmt = sign.statement(raw + b" ", body, key.key_id)  # a statement of other manifest bytes
    (signed / SIGNATURE).write_bytes(sign.signature_file(key, stmt))
    _refused(signed, kp[1], "another MANIFEST.json")
    stmt = sign.statement(raw, {**body, "uuid": "0" * 32}, key.key_id)
    (signed / SIGNATURE).write_bytes(sign.signature_file(key, stmt))
    _refused(signed, kp[1], "names another checkpoint")


def test_swapped_data_is_refused(tmp_path: Path, signed: Path, kp: tuple[str, str, str]) -> None:
    """A data file of another checkpoint in place of this one's: its bytes are not those the
    signed manifest binds (the header's uuid, the records' hashes): typed errors, never data."""
    ckptguard.save(state(4), tmp_path / "store" / "b", sign_key=kp[0])
    shutil.copy(tmp_path / "store" / "b" / "rank-00000.ckg", signed / "rank-00000.ckg")
    with pytest.raises(CorruptCheckpointError):
        ckptguard.load(signed, trusted_keys=kp[1])
    assert not ckptguard.verify(signed, trusted_keys=kp[1]).ok


def test_without_digests_refused(tmp_path: Path, kp: tuple[str, str, str]) -> None:
    """A checkpoint without chunk digests is refused under trusted keys even with a signature
    that verifies: only the digests tie the chunks to the signed index."""
    path = tmp_path / "store" / "nodig"
    ckptguard.save(state(5), path)
    key = keys.load_private(kp[0])
    raw = (path / "MANIFEST.json").read_bytes()
    body = json.loads(raw)["manifest"]
    assert "digests" not in body["features"]
    (path / SIGNATURE).write_bytes(sign.signature_file(key, sign.statement(raw, body, key.key_id)))
    trust = sign.trust_set(kp[1])
    assert trust is not None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(SignatureError, match="no chunk digests"):
            sign.check(str(path), fd, raw, body, trust)
    finally:
        os.close(fd)


def test_bad_keys_write_nothing(tmp_path: Path, kp: tuple[str, str, str]) -> None:
    store = tmp_path / "s"
    with pytest.raises(KeyFileError, match="no key file"):
        ckptguard.save(state(), store / "a", sign_key=tmp_path / "typo.key")
    os.chmod(kp[0], 0o644)
    with pytest.raises(KeyFileError, match="group or others"):
        ckptguard.save(state(), store / "a", sign_key=kp[0])
    with pytest.raises(KeyFileError):
        ckptguard.save(state(), store / "a", sign_key=kp[1])  # a public key cannot sign
    assert not (store / "a").exists()
    assert not (store / STAGING).exists() or not os.listdir(store / STAGING)
    with pytest.raises(TypeError, match="sign_key"):
        ckptguard.save(state(), store / "a", sign_key=42)
    with pytest.raises(KeyFileError, match="no key file"):
        ckptguard.load(store, trusted_keys=tmp_path / "nope.pub")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyFileError, match="without any"):
        ckptguard.verify(store, trusted_keys=tmp_path / "empty")
    with pytest.raises(KeyFileError, match="no trusted keys"):
        ckptguard.verify(store, trusted_keys=[])


def test_key_rotation(tmp_path: Path, kp: tuple[str, str, str]) -> None:
    """Checkpoints signed before a rotation verify with the old public key beside the new."""
    store, trust = tmp_path / "store", tmp_path / "trust"
    ckptguard.save(state(1), store / "old", sign_key=kp[0])
    priv2, pub2, kid2 = keys.generate(tmp_path / "k2")
    ckptguard.save(state(2), store / "new", sign_key=keys.load_private(priv2))
    trust.mkdir()
    shutil.copy(kp[1], trust / "2024.pub")
    shutil.copy(pub2, trust / "2025.pub")
    assert ckptguard.verify(store / "old", trusted_keys=trust).signed_by == kp[2]
    assert ckptguard.verify(store / "new", trusted_keys=[kp[1], pub2]).signed_by == kid2
    _refused(store / "old", pub2, "not trusted")  # the old key retired: its checkpoints refused


def test_other_paths(tmp_path: Path, signed: Path, kp: tuple[str, str, str]) -> None:
    with pytest.raises(ValueError, match="verify=True"):
        ckptguard.load(signed, trusted_keys=kp[1], verify=False)
    with pytest.raises(OneFileError, match="cannot be signed"):
        ckptguard.save(state(), tmp_path / "m.pt", sign_key=kp[0])
    ckptguard.save(state(), tmp_path / "m.pt")
    with pytest.raises(SignatureError, match="one-file"):
        ckptguard.load(tmp_path / "m.pt", trusted_keys=kp[1])
    torch.save(state(), tmp_path / "t.pt")
    with pytest.raises(SignatureError, match="carries no signature"):
        ckptguard.load(tmp_path / "t.pt", trusted_keys=kp[1])


def test_drain_keeps_the_signature(tmp_path: Path, signed: Path, kp: tuple[str, str, str]) -> None:
    from ckptguard.drain import drain

    drain(signed.parent, tmp_path / "dst")
    copy = tmp_path / "dst" / "a"
    assert (copy / SIGNATURE).read_bytes() == (signed / SIGNATURE).read_bytes()
    assert ckptguard.verify(copy, trusted_keys=kp[1]).signed_by == kp[2]
    (signed / SIGNATURE).write_bytes(b"{}\n")  # a damaged signature is not copied
    with pytest.raises(CorruptCheckpointError, match="SIGNATURE.json"):
        drain(signed.parent, tmp_path / "dst2")


def test_drain_signs_what_is_not_signed(
    tmp_path: Path, signed: Path, kp: tuple[str, str, str]
) -> None:
    """A drain with a key signs the copies of unsigned checkpoints that have digests; a signed
    one keeps its signature; one without digests is refused before its commit; a bad key
    copies nothing."""
    from ckptguard.drain import drain

    src = tmp_path / "staging"
    ckptguard.save(state(2), src / "d", digests=True)
    ckptguard.save(state(3), src / "plain")
    k2, p2, kid2 = keys.generate(tmp_path / "keys" / "k2")
    with pytest.raises(KeyFileError):
        drain(src, tmp_path / "dst", sign_key=tmp_path / "typo.key")
    assert not (tmp_path / "dst").exists()
    drain(src, tmp_path / "dst", names=["d"], sign_key=k2)
    assert ckptguard.verify(tmp_path / "dst" / "d", trusted_keys=p2).signed_by == kid2
    assert not (src / "d" / SIGNATURE).exists()  # the source is left as it was
    with pytest.raises(SignatureError, match="no chunk digests"):
        drain(src, tmp_path / "dst", names=["plain"], sign_key=k2)
    assert sorted(os.listdir(tmp_path / "dst")) in (["LATEST", "d"], [".staging", "LATEST", "d"])
    drain(signed.parent, tmp_path / "dst", sign_key=k2)  # signed by kp: kept as it is
    assert ckptguard.verify(tmp_path / "dst" / "a", trusted_keys=kp[1]).signed_by == kp[2]
    r = CliRunner().invoke(
        cli.cli, ["drain", str(src), str(tmp_path / "dst3"), "--name", "d", "--sign-key", k2]
    )
    assert r.exit_code == 0, r.output
    assert ckptguard.verify(tmp_path / "dst3" / "d", trusted_keys=p2).signed_by == kid2


def test_save_async_and_checkpointer(tmp_path: Path, kp: tuple[str, str, str]) -> None:
    with ckptguard.Checkpointer(tmp_path / "store", sign_key=kp[0], handoff=False) as ck:
        h = ck.save_async(state(6), "a")
        assert h.result().name == "a"
        with pytest.raises(KeyFileError):  # at the call, before any snapshot
            ck.save_async(state(7), "b", sign_key=tmp_path / "typo.key")
        out = ck.load("a", trusted_keys=kp[1])
    assert out["s"] == 6
    assert not (tmp_path / "store" / "b").exists()


# The wiring of an option through ranks or agents: its save path runs on both backends elsewhere.
@pytest.mark.backend_independent
def test_four_ranks_rank_zero_signs(tmp_path: Path, kp: tuple[str, str, str]) -> None:
    """4 MPI ranks save; only rank 0 names the key (the others pass none and need no file)."""
    store = tmp_path / "store"
    cmd = [need_mpi(), "-n", "4", sys.executable, SCENARIOS, "mpi", "save", store, "step-10"]
    env = {"SCENARIO_SIGN_KEY": kp[0]}
    assert run_command(cmd, 180, env=env).returncode == 0
    report = ckptguard.verify(store / "step-10", trusted_keys=kp[1])
    assert report.ok and report.signed_by == kp[2]


# The wiring of an option through ranks or agents: its save path runs on both backends elsewhere.
@pytest.mark.backend_independent
def test_four_ranks_sign_into_an_audited_store(tmp_path: Path, kp: tuple[str, str, str]) -> None:
    """The same 4-rank save into a store with an audit log: signed, its commit entry written by
    the committer (rank 0), the log complete and verifying."""
    store = tmp_path / "store"
    auditcheck.init(store, key=kp[0], witness=str(tmp_path / "w"))
    cmd = [need_mpi(), "-n", "4", sys.executable, SCENARIOS, "mpi", "save", store, "step-10"]
    assert run_command(cmd, 180, env={"SCENARIO_SIGN_KEY": kp[0]}).returncode == 0
    assert ckptguard.verify(store / "step-10", trusted_keys=kp[1]).signed_by == kp[2]
    done = auditcheck.check(store)
    assert (done.total, done.fraction) == (1, 1.0), done.gaps
    log, _ = audit.read(str(store))
    (entry,) = [e for e in log.entries if e["op"] == "commit"]
    assert entry["checkpoint"] == "step-10" and entry["actor"]["rank"] == 0


def test_signing_forces_digests(signed: Path, kp: tuple[str, str, str], tmp_path: Path) -> None:
    body = json.loads((signed / "MANIFEST.json").read_bytes())["manifest"]
    assert "digests" in body["features"] and "sha256" in body["index"]
    ckptguard.save(state(), tmp_path / "s" / "x", sign_key=kp[0], digests=False)
    assert ckptguard.verify(tmp_path / "s" / "x", trusted_keys=kp[1]).ok  # forced on
    key = keys.load_private(kp[0])
    with pytest.raises(SignatureError, match="no chunk digests"):
        sign.write_signature(str(tmp_path), key, b"", {"name": "n", "features": []})


def test_full_forgery_is_refused(tmp_path: Path, kp: tuple[str, str, str]) -> None:
    """The forger of tests/forgery.py (chunk bytes, record header, footer, index hash and
    digest columns, the manifest's index hashes and checksum) makes a checkpoint that verifies
    without keys; under the trusted key it is refused, and so is one whose two chunks swapped."""
    from forgery import forge_chunk, set_first_float

    path = tmp_path / "store" / "f"
    big = {"w": torch.randn(3, 1 << 20), "s": 1}
    ckptguard.save(big, path, sign_key=kp[0], compress="none")
    forge_chunk(str(path), "w", set_first_float(1e6), digests=True)
    assert ckptguard.verify(path).ok  # every hash anyone can recompute was recomputed
    _refused(path, kp[1], "another MANIFEST.json")
    with pytest.raises(ir.SpecViolation, match="another MANIFEST"):
        ir.read_checkpoint(str(path), trusted={kp[2]: _raw_pub(kp[1])})
    swapped = tmp_path / "store" / "g"
    ckptguard.save(big, swapped, sign_key=kp[0], compress="none")
    second = (swapped / "rank-00000.ckg").read_bytes()  # chunk 1 of "w" in place of chunk 0
    from ckptguard.format import index

    rows = index.rows_from_table(index.read_table((swapped / "index.parquet").read_bytes()))
    r1 = next(r for r in rows if r.key == "w" and r.chunk == 1)
    start = r1.offset + 64
    forge_chunk(str(swapped), "w", lambda _: second[start : start + r1.raw_len], digests=True)
    assert ckptguard.verify(swapped).ok
    _refused(swapped, kp[1], "another MANIFEST.json")
