"""Encryption at rest (docs/format.md section 4.4): sealed chunks per scope, what a reader does
without the key, tampering (a swapped, replayed, altered or truncated record), shredding and
rotation as a load sees them, incremental saves within a scope, and the option's misuse."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch
import xxhash

import ckptguard
from ckptguard import keyring
from ckptguard.errors import (
    CheckpointHeldError,
    CorruptCheckpointError,
    KeyUnavailableError,
    OneFileError,
    ScopeShreddedError,
)
from ckptguard.format import index
from ckptguard.format.layout import align
from ckptguard.kek import Kek

KEK_A = "a1" * 32
KEK_B = "b2" * 32
RULE = {"model/*": "tenant-a", "opt/*": "tenant-b"}


@pytest.fixture(autouse=True)
def _kek(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CKPTGUARD_KEK_FILE", "CKPTGUARD_KEK_COMMAND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CKPTGUARD_KEK", KEK_A)


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(256, 300, generator=g), "b": torch.randn(300, generator=g)},
        "opt": {"m": torch.randn(4096, generator=g), "n": torch.arange(7)},
        "plain": {"x": torch.full((512,), 3.5)},
        "step": 5,
    }


def _equal(a: dict, b: dict, groups: tuple[str, ...] = ("model", "opt", "plain")) -> None:
    for g in groups:
        for k, v in a[g].items():
            assert torch.equal(b[g][k], v), (g, k)


def _rows(path: Path) -> list[index.Row]:
    return index.rows_from_table(index.read_table((path / "index.parquet").read_bytes()))


def _manifest(path: Path) -> dict:
    raw = (path / "MANIFEST.json").read_bytes()
    return json.loads(raw[len(b'{"checksum":"') + 32 + len(b'","manifest":') : -2])


def test_round_trip_per_scope(tmp_path: Path) -> None:
    state = _state()
    info = ckptguard.save(state, tmp_path / "c", encrypt=RULE, chunk_size=1 << 16)
    out = ckptguard.load(tmp_path / "c")
    _equal(state, out)
    assert out["step"] == 5
    m = _manifest(tmp_path / "c")
    assert "encryption" in m["features"]
    scopes = {k["scope"]: k["key_id"] for k in m["encryption"]["keys"]}
    assert set(scopes) == {"tenant-a", "tenant-b"}
    for r in _rows(tmp_path / "c"):
        group = r.key.split("/")[0]
        assert r.key_id == {"model": scopes["tenant-a"], "opt": scopes["tenant-b"]}.get(group)
    report = ckptguard.verify(tmp_path / "c")
    assert report.ok and not report.keyless and report.chunks_checked == info.chunks


def test_no_plaintext_on_disk(tmp_path: Path) -> None:
    marker = torch.frombuffer(bytearray(b"SECRET-PLAINTEXT" * 4096), dtype=torch.uint8)
    ckptguard.save({"s": marker}, tmp_path / "c", encrypt="vault", compress="none")
    data = (tmp_path / "c" / "rank-00000.ckg").read_bytes()
    assert b"SECRET-PLAINTEXT" not in data
    assert torch.equal(ckptguard.load(tmp_path / "c")["s"], marker)
    ckptguard.save({"s": marker}, tmp_path / "clear", compress="none")
    assert b"SECRET-PLAINTEXT" in (tmp_path / "clear" / "rank-00000.ckg").read_bytes()


def test_hashes_do_not_link_scopes(tmp_path: Path) -> None:
    """The index hash of a sealed chunk is a keyed fingerprint: equal bytes, equal hash within a
    scope, unrelated hashes across scopes and against the plain xxh3-128."""
    t = torch.randn(1000)
    state = {"a": t, "b": t.clone(), "c": t.clone()}
    ckptguard.save(state, tmp_path / "c", encrypt={"a": "s1", "b": "s1", "c": "s2"})
    by_key = {r.key: r.hash for r in _rows(tmp_path / "c")}
    assert by_key["a"] == by_key["b"] != by_key["c"]
    assert by_key["a"] != xxhash.xxh3_128(t.numpy().tobytes()).digest()


def test_wrong_or_missing_kek_names_the_scope(tmp_path: Path, monkeypatch) -> None:
    state = _state()
    ckptguard.save(state, tmp_path / "c", encrypt=RULE)
    with pytest.raises(KeyUnavailableError) as e:
        ckptguard.load(tmp_path / "c", kek=Kek.from_hex(KEK_B))
    assert e.value.scope in ("tenant-a", "tenant-b") and e.value.scope in str(e.value)
    monkeypatch.delenv("CKPTGUARD_KEK")
    with pytest.raises(KeyUnavailableError, match="key-encryption key"):
        ckptguard.load(tmp_path / "c")
    _equal(state, ckptguard.load(tmp_path / "c", kek=Kek.from_hex(KEK_A)))


def test_verify_without_key_checks_stored_bytes(tmp_path: Path, monkeypatch) -> None:
    ckptguard.save(_state(), tmp_path / "c", encrypt=RULE, digests=True)
    monkeypatch.setenv("CKPTGUARD_KEK", KEK_B)
    report = ckptguard.verify(tmp_path / "c")
    assert report.ok
    assert set(report.keyless) == {"tenant-a", "tenant-b"}
    assert all("tenant" in why for why in report.key_errors.values())
    # A flipped ciphertext byte is found without the key.
    rows = [r for r in _rows(tmp_path / "c") if r.key_id is not None]
    _flip(tmp_path / "c" / rows[0].file, rows[0].offset + 64 + 5)
    report = ckptguard.verify(tmp_path / "c")
    assert not report.ok and rows[0].key in str(report.problems[0])


def _flip(path: Path, at: int) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def _rewrite_header(data: bytearray, at: int, **fields: object) -> None:
    """Set fields of the record header at ``at`` and fix its xxh3-64, as a forger would."""
    if "seq" in fields:
        struct.pack_into("<I", data, at + 40, fields["seq"])
    if "hash" in fields:
        data[at + 24 : at + 40] = fields["hash"]  # type: ignore[index]
    struct.pack_into("<Q", data, at + 56, xxhash.xxh3_64_intdigest(bytes(data[at : at + 56])))


def _forge(ckpt: Path, mutate) -> None:
    """Mutate the data file of rank 0 in place (the checkpoint is read-only)."""
    path = ckpt / "rank-00000.ckg"
    os.chmod(ckpt, 0o755)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    mutate(data)
    path.write_bytes(bytes(data))


def test_swapped_records_fail_authentication(tmp_path: Path) -> None:
    """Two sealed records of equal length swapped, their headers fixed so that every check a
    forger without the key can satisfy passes: the associated data catches it."""
    state = {"a": torch.randn(20000), "b": torch.randn(20000)}  # not packed
    ckptguard.save(state, tmp_path / "c", encrypt="s", compress="none")
    ra, rb = sorted(_rows(tmp_path / "c"), key=lambda r: r.offset)
    assert ra.stored_len == rb.stored_len

    def swap(data: bytearray) -> None:
        n = align(64 + ra.stored_len)
        a, b = bytes(data[ra.offset : ra.offset + n]), bytes(data[rb.offset : rb.offset + n])
        data[ra.offset : ra.offset + n], data[rb.offset : rb.offset + n] = b, a
        _rewrite_header(data, ra.offset, seq=0)
        _rewrite_header(data, rb.offset, seq=1)

    _forge(tmp_path / "c", swap)
    with pytest.raises(CorruptCheckpointError, match="authenticate"):
        ckptguard.load(tmp_path / "c")
    assert not ckptguard.verify(tmp_path / "c").ok


def test_replayed_record_from_another_checkpoint(tmp_path: Path) -> None:
    """A record of another checkpoint of the same scope, key and place: refused (its uuid)."""
    ckptguard.save({"a": torch.randn(4096)}, tmp_path / "c1", encrypt="s", compress="none")
    ckptguard.save({"a": torch.randn(4096)}, tmp_path / "c2", encrypt="s", compress="none")
    (r1,), (r2,) = _rows(tmp_path / "c1"), _rows(tmp_path / "c2")
    assert (r1.offset, r1.stored_len, r1.key_id) == (r2.offset, r2.stored_len, r2.key_id)
    other = (tmp_path / "c2" / "rank-00000.ckg").read_bytes()
    n = align(64 + r1.stored_len)

    def replay(data: bytearray) -> None:
        data[r1.offset : r1.offset + n] = other[r2.offset : r2.offset + n]

    _forge(tmp_path / "c1", replay)
    with pytest.raises(CorruptCheckpointError, match="authenticate"):
        ckptguard.load(tmp_path / "c1")


@pytest.mark.parametrize("where", ["tag", "ciphertext"])
def test_altered_ciphertext_with_a_recomputed_header(tmp_path: Path, where: str) -> None:
    ckptguard.save({"a": torch.randn(4096)}, tmp_path / "c", encrypt="s", compress="none")
    (r,) = _rows(tmp_path / "c")

    def alter(data: bytearray) -> None:
        at = r.offset + 64 + (r.stored_len - 1 if where == "tag" else 10)
        data[at] ^= 0x01
        payload = bytes(data[r.offset + 64 : r.offset + 64 + r.stored_len])
        _rewrite_header(data, r.offset, hash=xxhash.xxh3_128(payload).digest())

    _forge(tmp_path / "c", alter)
    with pytest.raises(CorruptCheckpointError, match="authenticate"):
        ckptguard.load(tmp_path / "c")


def test_truncated_ciphertext(tmp_path: Path) -> None:
    """A payload cut short (its tail zeroed, as a torn write leaves it): found as stored."""
    ckptguard.save({"a": torch.randn(4096)}, tmp_path / "c", encrypt="s", compress="none")
    (r,) = _rows(tmp_path / "c")

    def cut(data: bytearray) -> None:
        end = r.offset + 64 + r.stored_len
        data[end - 100 : end] = bytes(100)

    _forge(tmp_path / "c", cut)
    with pytest.raises(CorruptCheckpointError, match="stored bytes"):
        ckptguard.load(tmp_path / "c")


def test_shredded_scope_refuses_and_others_load(tmp_path: Path) -> None:
    state = _state()
    ckptguard.save(state, tmp_path / "c", encrypt=RULE)
    keyring.shred(str(tmp_path), "tenant-a", reason="erasure request 17")
    with pytest.raises(ScopeShreddedError) as e:
        ckptguard.load(tmp_path / "c")
    assert e.value.scope == "tenant-a"
    out = ckptguard.load(tmp_path / "c", shredded="meta")
    _equal(state, out, ("opt", "plain"))
    w = out["model"]["w"]
    assert w.is_meta and w.shape == state["model"]["w"].shape and w.dtype == torch.float32
    template = {"model": {"b": torch.zeros(300)}}  # a template tensor of it cannot be filled
    with pytest.raises(ScopeShreddedError):
        ckptguard.load(tmp_path / "c", template=template, shredded="meta")
    report = ckptguard.verify(tmp_path / "c")
    assert report.ok and set(report.keyless) == {"tenant-a"}
    with pytest.raises(ScopeShreddedError):  # never keyed again
        ckptguard.save(state, tmp_path / "d", encrypt=RULE)
    assert not (tmp_path / "d").exists()


def test_held_checkpoint_blocks_shredding(tmp_path: Path) -> None:
    ckptguard.save(_state(), tmp_path / "c", encrypt=RULE)
    store = ckptguard.Store(tmp_path)
    store.hold("c", reason="litigation")
    with pytest.raises(CheckpointHeldError):
        keyring.shred(str(tmp_path), "tenant-a")
    _equal(_state(), ckptguard.load(tmp_path / "c"))
    store.release("c")
    keyring.shred(str(tmp_path), "tenant-a")
    with pytest.raises(ScopeShreddedError):
        ckptguard.load(tmp_path / "c")


def test_rotation_rewraps_without_rewriting_data(tmp_path: Path) -> None:
    state = _state()
    ckptguard.save(state, tmp_path / "c", encrypt=RULE)
    before = (tmp_path / "c" / "rank-00000.ckg").read_bytes()
    done = keyring.rotate(str(tmp_path), Kek.from_hex(KEK_A), Kek.from_hex(KEK_B))
    assert done == (2, 0)
    assert (tmp_path / "c" / "rank-00000.ckg").read_bytes() == before
    with pytest.raises(KeyUnavailableError):
        ckptguard.load(tmp_path / "c")  # the environment's KEK is the old one
    _equal(state, ckptguard.load(tmp_path / "c", kek=Kek.from_hex(KEK_B)))


def test_incremental_within_a_scope(tmp_path: Path) -> None:
    state = _state()
    ckptguard.save(state, tmp_path / "c1", encrypt=RULE, chunk_size=1 << 16)
    state["opt"]["m"] += 1
    ckptguard.save(state, tmp_path / "c2", encrypt=RULE, chunk_size=1 << 16, base="c1")
    rows = _rows(tmp_path / "c2")
    linked = [r for r in rows if r.base is not None]
    assert {r.key for r in linked} == {"model/w", "model/b", "opt/n", "plain/x"}
    assert all(r.key_id is not None for r in linked if r.key.startswith("model"))
    _equal(state, ckptguard.load(tmp_path / "c2"))
    assert ckptguard.verify(tmp_path / "c2").ok
    # Another scope for the model: nothing of it is linked across scopes.
    other = {**RULE, "model/*": "tenant-c"}
    ckptguard.save(state, tmp_path / "c3", encrypt=other, chunk_size=1 << 16, base="c2")
    assert not [r for r in _rows(tmp_path / "c3") if r.base and r.key.startswith("model")]
    _equal(state, ckptguard.load(tmp_path / "c3"))


def test_packed_records_never_mix_scopes(tmp_path: Path) -> None:
    state = {f"t{i}": torch.full((8,), float(i)) for i in range(12)}
    rule = {f"t{i}": ("even" if i % 2 == 0 else None) for i in range(12)}
    ckptguard.save(state, tmp_path / "c", encrypt=rule)
    by_record: dict[int, set] = {}
    for r in _rows(tmp_path / "c"):
        by_record.setdefault(r.offset, set()).add(r.key_id)
    assert len(by_record) >= 2 and all(len(ids) == 1 for ids in by_record.values())
    out = ckptguard.load(tmp_path / "c")
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_signed_encrypted_checkpoint(tmp_path: Path) -> None:
    from ckptguard import keys

    priv, pub, _ = keys.generate(str(tmp_path / "signer"))
    ckptguard.save(_state(), tmp_path / "s" / "c", encrypt=RULE, sign_key=priv)
    report = ckptguard.verify(tmp_path / "s" / "c", trusted_keys=pub, kek=Kek.from_hex(KEK_B))
    assert report.ok and report.signed_by and set(report.keyless) == {"tenant-a", "tenant-b"}


def test_async_save_and_checkpointer(tmp_path: Path) -> None:
    state = _state()
    handle = ckptguard.save_async(state, tmp_path / "a", encrypt=RULE)
    handle.result()
    _equal(state, ckptguard.load(tmp_path / "a"))
    with ckptguard.Checkpointer(tmp_path / "store", encrypt="run-7") as ck:
        ck.save(state, "s1", step=1)
    _equal(state, ckptguard.load(tmp_path / "store"))


def test_option_misuse(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scope"):
        ckptguard.save({"a": torch.ones(3)}, tmp_path / "c", encrypt="bad\nscope")
    with pytest.raises(TypeError):
        ckptguard.save({"a": torch.ones(3)}, tmp_path / "c", encrypt=42)
    with pytest.raises(OneFileError, match="encrypt"):
        ckptguard.save({"a": torch.ones(3)}, tmp_path / "one.pt", encrypt="s")
    assert not list(tmp_path.iterdir())


def test_encrypt_matching_no_tensor_is_a_plain_save(tmp_path: Path) -> None:
    ckptguard.save({"a": torch.ones(3)}, tmp_path / "c", encrypt={"zzz*": "s"})
    assert "encryption" not in _manifest(tmp_path / "c")["features"]
    assert not (tmp_path / ".keys").exists()


def test_drain_copies_keys_and_shred_reaches_the_copy(tmp_path: Path, monkeypatch) -> None:
    from ckptguard.drain import drain

    state = _state()
    src, dst = tmp_path / "fast", tmp_path / "pfs"
    ckptguard.save(state, src / "c", encrypt=RULE)
    monkeypatch.delenv("CKPTGUARD_KEK")  # the drain needs no key: it copies ciphertext
    drain(str(src), str(dst))
    monkeypatch.setenv("CKPTGUARD_KEK", KEK_A)
    _equal(state, ckptguard.load(dst / "c"))
    assert ckptguard.verify(dst / "c").ok
    keyring.shred(str(src), "tenant-b")  # reaches the drained copy's keyring too
    with pytest.raises(ScopeShreddedError):
        ckptguard.load(dst / "c")
    _equal(state, ckptguard.load(dst / "c", shredded="meta"), ("model", "plain"))
    # A destination where the scope is shredded refuses it: a drain never revives a key.
    other = tmp_path / "other"
    ckptguard.save({"z": torch.ones(3)}, other / "z", encrypt="tenant-a")
    keyring.shred(str(other), "tenant-a")
    with pytest.raises(ScopeShreddedError):
        drain(str(src), str(other))
    assert not (other / "c").exists()


def test_export_of_an_encrypted_checkpoint(tmp_path: Path) -> None:
    state = _state()
    ckptguard.save(state, tmp_path / "c", encrypt=RULE)
    res = ckptguard.export(tmp_path / "c", to="safetensors", dest=tmp_path / "out", select="model")
    from safetensors.torch import load_file

    (path,) = [p for p in (tmp_path / "out").iterdir() if p.suffix == ".safetensors"]
    got = load_file(str(path))
    assert torch.equal(got["w"], state["model"]["w"]) and res is not None


@pytest.mark.backend_independent  # the sealing of both backends is compared byte for byte below
def test_four_ranks_under_mpiexec_and_a_resharding_load(tmp_path: Path) -> None:
    """4 MPI ranks save with two scopes (the committer alone resolves the keys), 2 and 4 ranks
    load with templates of another sharding, and the data files hold no row in the clear."""
    from conftest import run_command
    from mpikit import need_mpi

    scenarios = str(Path(__file__).parent / "dist" / "scenarios.py")
    store = tmp_path / "store"
    env = {
        **os.environ,
        "CKPTGUARD_KEK": KEK_A,
        "SCENARIO_ENCRYPT": json.dumps({"model/*": "tenant-a", "optim/*": "tenant-b"}),
    }

    def mpirun(n: int, *args: str) -> list[dict]:
        cmd = [need_mpi(), "-n", str(n), sys.executable, scenarios, "mpi", *args]
        assert run_command(cmd, 180, env=env).returncode == 0
        outs = []
        for r in range(n):
            outs.append(json.loads((tmp_path / "out" / f"rank-{r}.json").read_text()))
            (tmp_path / "out" / f"rank-{r}.json").unlink()
        return outs

    saved = mpirun(4, "save", str(store), "step-10")
    assert all(r["ok"] for r in saved), saved
    rows = _rows(store / "step-10")
    assert {r.rank for r in rows} == {0, 1, 2, 3}  # replicas are spread over the ranks
    sealed = {r.key for r in rows if r.key_id is not None}
    assert sealed == {r.key for r in rows if r.key.startswith(("model/", "optim/"))}
    for n in (2, 4):
        loaded = mpirun(n, "load", str(store), "4")
        assert all(r["ok"] for r in loaded), loaded
    assert ckptguard.verify(store / "step-10").ok


@pytest.mark.parametrize("codec", ["raw", "shuffle-lz4", "shuffle-zstd"])
@pytest.mark.parametrize("digested", [False, True])
def test_both_backends_write_the_same_sealed_bytes(
    tmp_path: Path, codec: str, digested: bool
) -> None:
    """The native pipeline (sealing in C, OpenSSL) and the pure-Python path (``cryptography``)
    write the same records byte for byte, index hashes and digests too: a stretch of several
    chunks, a pack of three tensors, and a stretch in the clear."""
    from types import SimpleNamespace

    from ckptguard import backend
    from ckptguard.format.datafile import CODECS
    from ckptguard.io import Segment
    from ckptguard.seal import Scope, Sealing
    from ckptguard.sealwrite import Stretch, write_stretches

    if not backend.available():
        pytest.skip("the native extension is not built")
    big = (torch.arange(70_000, dtype=torch.float32) % 13).numpy().tobytes()
    small = torch.arange(300, dtype=torch.float32).numpy().tobytes()
    c = CODECS[codec]
    refs = [SimpleNamespace(key=k, offsets=(0,)) for k in ("big", "p0", "p1", "p2", "clear")]
    stretches = [
        Stretch(Segment(memoryview(big), 4, c, 0), 2, [refs[0]], False, [0]),
        Stretch(Segment(memoryview(small), 4, c, 0), 0, refs[1:4], True, [0, 400, 800]),
        Stretch(Segment(memoryview(big)[: 1 << 16], 4, c, 0), 0, [refs[4]], False, [0]),
    ]
    rule = {"big": "s", "p*": "s", "clear": None}
    sealing = Sealing(rule, {"s": Scope("ab" * 16, "s", bytes(range(32)))})
    out = {}
    for name in (backend.NATIVE, backend.PYTHON):
        path = tmp_path / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        try:
            at = (fd, str(path), 4096, 5, "cd" * 16, 3, -1)
            done, keys = write_stretches(at, stretches, sealing, 1 << 16, 2, name, digested)
        finally:
            os.close(fd)
        out[name] = (path.read_bytes(), done.hash, done.digest, keys, done.stored_len.tolist())
    assert out[backend.NATIVE] == out[backend.PYTHON]
    assert out[backend.NATIVE][3][-1] is None and out[backend.NATIVE][3][0] == "ab" * 16


def test_a_kek_command_runs_once_per_load(tmp_path: Path, monkeypatch) -> None:
    """A load of a checkpoint of two scopes asks the KMS (the KEK command) once, not per scope."""
    ckptguard.save(_state(), tmp_path / "c", encrypt=RULE)
    calls = tmp_path / "calls"
    script = tmp_path / "kms.sh"
    script.write_text(f"#!/bin/sh\necho x >> {calls}\necho {KEK_A}\n")
    script.chmod(0o755)
    monkeypatch.delenv("CKPTGUARD_KEK")
    monkeypatch.setenv("CKPTGUARD_KEK_COMMAND", str(script))
    _equal(_state(), ckptguard.load(tmp_path / "c"))
    assert calls.read_text().count("x") == 1
