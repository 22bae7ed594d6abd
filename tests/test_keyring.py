"""The store keyring (ckptguard.keyring): data keys per scope wrapped under a KEK, read as
hostile input; rotation; crypto-shredding across copies; KEK sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckptguard import audit, holds, keyring, keys
from ckptguard.audit.canon import encode
from ckptguard.errors import (
    CheckpointHeldError,
    KeyUnavailableError,
    ScopeShreddedError,
    StoreError,
)
from ckptguard.keyring import Kek, kek_from_env, resolve_kek

K1 = Kek(bytes(range(32)))
K2 = Kek(bytes(range(32, 64)))

pytestmark = pytest.mark.backend_independent  # the keyring never encodes a chunk


def entry_path(store: Path, scope: str) -> Path:
    return store / ".keys" / f"{keyring.scope_id(scope)}.json"


def test_obtain_creates_once_and_unwrap_gives_the_same_key(tmp_path: Path) -> None:
    store = str(tmp_path)
    k = keyring.obtain(store, "tenant-a", K1)
    assert len(k.key) == 32 and len(k.key_id) == 32 and k.scope == "tenant-a"
    assert keyring.obtain(store, "tenant-a", K1) == k
    assert keyring.unwrap(store, "tenant-a", k.key_id, K1) == k
    other = keyring.obtain(store, "tenant-b", K1)
    assert other.key != k.key and other.key_id != k.key_id
    assert k.key.hex() not in repr(k) and K1.key.hex() not in repr(K1)
    doc = json.loads(entry_path(tmp_path, "tenant-a").read_bytes())
    assert set(doc) == {"scope", "key_id", "created", "kek_id", "nonce", "wrapped"}
    assert doc["kek_id"] == K1.kek_id and len(doc["wrapped"]) == 96
    assert k.key.hex() not in entry_path(tmp_path, "tenant-a").read_text()
    listed = keyring.entries(store)
    assert [(e.scope, e.key_id, e.kek_id, e.live) for e in listed] == sorted(
        [("tenant-a", k.key_id, K1.kek_id, True), ("tenant-b", other.key_id, K1.kek_id, True)]
    )


def test_scope_names_are_checked() -> None:
    for bad in ("", "x" * 257, "a\nb", "a\x7fb", "a\x85b", "   "):
        with pytest.raises(ValueError):
            keyring.check_scope(bad)
    keyring.check_scope("Jöhn Dœ / subject 42")
    assert keyring.scope_id("a") != keyring.scope_id("b") and len(keyring.scope_id("a")) == 32


def test_unwrap_refuses_missing_other_key_wrong_kek_and_damage(tmp_path: Path) -> None:
    store = str(tmp_path)
    with pytest.raises(KeyUnavailableError, match="no key for scope 's'") as e:
        keyring.unwrap(store, "s", "0" * 32, K1)
    assert e.value.scope == "s"
    k = keyring.obtain(store, "s", K1)
    with pytest.raises(KeyUnavailableError, match="not " + "1" * 32):
        keyring.unwrap(store, "s", "1" * 32, K1)
    with pytest.raises(KeyUnavailableError, match=f"{K1.kek_id}.*{K2.kek_id}.*rotate"):
        keyring.unwrap(store, "s", k.key_id, K2)
    p = entry_path(tmp_path, "s")
    doc = json.loads(p.read_bytes())
    doc["wrapped"] = ("0" if doc["wrapped"][0] != "0" else "1") + doc["wrapped"][1:]
    p.write_bytes(encode(doc) + b"\n")
    with pytest.raises(KeyUnavailableError, match="damaged or altered"):
        keyring.unwrap(store, "s", k.key_id, K1)


def test_hostile_entries_fail_closed(tmp_path: Path) -> None:
    store = str(tmp_path)
    k = keyring.obtain(store, "s", K1)
    p = entry_path(tmp_path, "s")
    good = p.read_bytes()
    doc = json.loads(good)
    cases = {
        "pretty": json.dumps(doc, indent=1).encode() + b"\n",
        "no newline": good[:-1],
        "extra": encode({**doc, "x": "y"}) + b"\n",
        "other scope": encode({**doc, "scope": "t"}) + b"\n",
        "upper hex": encode({**doc, "nonce": doc["nonce"].upper()}) + b"\n",
        "big": good[:-1] + b" " * 5000 + b"\n",
    }
    for name, raw in cases.items():
        p.write_bytes(raw)
        with pytest.raises(KeyUnavailableError, match="damaged") as e:
            keyring.unwrap(store, "s", k.key_id, K1)
        assert str(p) in str(e.value), name
    p.unlink()
    (tmp_path / "elsewhere").write_bytes(good)
    p.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(KeyUnavailableError, match="symbolic link"):
        keyring.unwrap(store, "s", k.key_id, K1)
    with pytest.raises(KeyUnavailableError, match="symbolic link"):
        keyring.obtain(store, "s", K1)  # never replaced by a new key either
    p.unlink()
    os.mkfifo(p)  # opened non-blocking: no hang
    with pytest.raises(KeyUnavailableError, match="FIFO"):
        keyring.unwrap(store, "s", k.key_id, K1)
    assert [e.problem != "" for e in keyring.entries(store)] == [True]


def _create_in_child(store: str, out: Path) -> subprocess.Popen:
    code = (
        "import sys; from ckptguard import keyring; "
        "k = keyring.obtain(sys.argv[1], 'shared', keyring.Kek(bytes(range(32)))); "
        "open(sys.argv[2], 'w').write(k.key_id + k.key.hex())"
    )
    return subprocess.Popen([sys.executable, "-c", code, store, str(out)])


def test_concurrent_creators_get_one_key(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    procs = [_create_in_child(str(store), tmp_path / f"out{i}") for i in range(4)]
    assert all(p.wait(60) == 0 for p in procs)
    got = {(tmp_path / f"out{i}").read_text() for i in range(4)}
    assert len(got) == 1
    k = keyring.obtain(str(store), "shared", K1)
    assert got == {k.key_id + k.key.hex()}
    assert [n for n in os.listdir(store / ".keys") if not n.startswith(".lock")] == [
        f"{keyring.scope_id('shared')}.json"
    ]


def test_rotate_rewraps_and_a_stopped_rotation_is_finished(tmp_path: Path) -> None:
    store = str(tmp_path)
    ks = [keyring.obtain(store, f"s{i}", K1) for i in range(3)]
    keyring.shred(store, "gone")
    before = entry_path(tmp_path, "s0").read_bytes()
    doc = json.loads(before)
    assert keyring.rotate(store, K1, K2) == (3, 0)
    assert all(keyring.unwrap(store, k.scope, k.key_id, K2) == k for k in ks)
    assert json.loads(entry_path(tmp_path, "s0").read_bytes())["nonce"] != doc["nonce"]
    with pytest.raises(KeyUnavailableError, match="rotate"):
        keyring.unwrap(store, "s0", ks[0].key_id, K1)
    assert keyring.rotate(store, K1, K2) == (0, 3)  # a re-run: nothing left to do
    entry_path(tmp_path, "s1").write_bytes(before.replace(b'"s0"', b'"s1"'))  # damaged
    k3 = Kek(bytes(range(64, 96)))
    with pytest.raises(KeyUnavailableError, match="not 1") as e:
        keyring.rotate(store, K2, k3)
    assert "s1" in str(e.value)
    assert keyring.unwrap(store, "s2", ks[2].key_id, k3) == ks[2]


def test_rotation_killed_between_entries_is_completed(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ks = [keyring.obtain(str(store), f"s{i}", K1) for i in range(3)]
    code = (
        "import sys; from ckptguard import keyring; "
        "keyring.rotate(sys.argv[1], keyring.Kek(bytes(range(32))), "
        "keyring.Kek(bytes(range(32, 64))))"
    )
    env = {**os.environ, "CKPTGUARD_FAILPOINT": "keyring.rotate_one:*:kill"}
    assert subprocess.run([sys.executable, "-c", code, str(store)], env=env).returncode == -9
    under = {e.scope: e.kek_id for e in keyring.entries(str(store))}
    assert sorted(under.values()) == sorted([K2.kek_id, K1.kek_id, K1.kek_id])
    for k in ks:
        kek = K1 if under[k.scope] == K1.kek_id else K2
        assert keyring.unwrap(str(store), k.scope, k.key_id, kek) == k
    assert keyring.rotate(str(store), K1, K2) == (2, 1)


def test_shred_leaves_a_tombstone_removes_temps_and_refuses_keys(tmp_path: Path) -> None:
    store = str(tmp_path)
    k = keyring.obtain(store, "subject-7", K1)
    kept = keyring.obtain(store, "other", K1)
    temp = tmp_path / ".keys" / f".{keyring.scope_id('subject-7')}.json.ckptguard-tmp.x"
    temp.write_bytes(entry_path(tmp_path, "subject-7").read_bytes())
    assert keyring.shred(store, "subject-7", reason="GDPR request 12") == [str(tmp_path)]
    doc = json.loads(entry_path(tmp_path, "subject-7").read_bytes())
    assert set(doc) == {"scope", "key_id", "shredded", "reason", "user", "host"}
    assert doc["key_id"] == k.key_id and doc["reason"] == "GDPR request 12"
    assert not temp.exists()
    with pytest.raises(ScopeShreddedError, match="GDPR request 12") as e:
        keyring.unwrap(store, "subject-7", k.key_id, K1)
    assert e.value.scope == "subject-7" and e.value.key_id == k.key_id
    with pytest.raises(ScopeShreddedError):
        keyring.obtain(store, "subject-7", K1)
    assert keyring.unwrap(store, "other", kept.key_id, K1) == kept
    assert keyring.shred(store, "subject-7") == [str(tmp_path)]  # idempotent
    keyring.shred(store, "never-keyed")  # a later save must not key it
    with pytest.raises(ScopeShreddedError):
        keyring.obtain(store, "never-keyed", K1)
    states = {e.scope: e.live for e in keyring.entries(store)}
    assert states == {"subject-7": False, "never-keyed": False, "other": True}


def test_shred_is_audited(tmp_path: Path) -> None:
    priv, _, _ = keys.generate(tmp_path / "k")
    store = tmp_path / "store"
    audit.init(store, priv)
    k = keyring.obtain(str(store), "s", K1)
    keyring.shred(str(store), "s")
    last = audit.read(store)[0].entries[-1]
    assert last["op"] == "shred" and last["detail"] == {"scope": "s", "key_id": k.key_id}


def test_shred_reaches_every_copy_and_a_rerun_completes(tmp_path: Path) -> None:
    a, b, c = (str(tmp_path / n) for n in "abc")
    k = keyring.obtain(a, "s", K1)
    keyring.copy_to(a, b, {"s": k.key_id})
    keyring.copy_to(b, c, {"s": k.key_id})  # a chain: a knows b, b knows c
    assert keyring.unwrap(c, "s", k.key_id, K1) == k
    os.rename(c, c + ".away")  # unreachable
    with pytest.raises(StoreError, match="not yet in " + c) as e:
        keyring.shred(a, "s")
    assert a in str(e.value) and b in str(e.value)
    for s in (a, b):
        with pytest.raises(ScopeShreddedError):
            keyring.unwrap(s, "s", k.key_id, K1)
    os.rename(c + ".away", c)
    assert keyring.unwrap(c, "s", k.key_id, K1) == k
    assert sorted(keyring.shred(b, "s")) == sorted([a, b, c])  # from any of them
    with pytest.raises(ScopeShreddedError):
        keyring.unwrap(c, "s", k.key_id, K1)


def test_copy_to_never_resurrects_and_detects_conflicts(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    k = keyring.obtain(a, "s", K1)
    with pytest.raises(StoreError, match="not a directory"):
        keyring.shred(b, "s")  # a typo is not a store
    os.mkdir(b)
    keyring.shred(b, "s")
    with pytest.raises(ScopeShreddedError):
        keyring.copy_to(a, b, {"s": k.key_id})
    other = keyring.obtain(b, "t", K1)
    mine = keyring.obtain(a, "t", K1)
    with pytest.raises(KeyUnavailableError, match="conflict"):
        keyring.copy_to(a, b, {"t": mine.key_id})
    assert keyring.unwrap(b, "t", other.key_id, K1) == other
    keyring.shred(a, "t")  # a knows b now (copy_to recorded it): b's "t" is shredded too
    keyring.copy_to(a, b, {"t": mine.key_id})  # a shredded key: its tombstone, no error
    with pytest.raises(ScopeShreddedError):
        keyring.unwrap(b, "t", other.key_id, K1)


def test_copy_to_carries_a_shred_both_ways(tmp_path: Path) -> None:
    """A drain of a checkpoint whose scope was shredded still succeeds: the shred wins in both
    stores, whichever heard of it first."""
    a, b, c = (str(tmp_path / n) for n in "abc")
    k = keyring.obtain(a, "s", K1)
    keyring.shred(a, "s")  # before any copy: b has never heard of it
    keyring.copy_to(a, b, {"s": k.key_id})
    with pytest.raises(ScopeShreddedError):
        keyring.obtain(b, "s", K1)
    k2 = keyring.obtain(a, "u", K1)
    keyring.copy_to(a, c, {"u": k2.key_id})
    os.unlink(os.path.join(c, ".keys", "COPIES"))  # c's shred cannot reach a
    keyring.shred(c, "u")
    assert keyring.unwrap(a, "u", k2.key_id, K1) == k2  # a has not heard of it yet
    keyring.copy_to(a, c, {"u": k2.key_id})  # the shred in c reaches a through the drain
    with pytest.raises(ScopeShreddedError):
        keyring.unwrap(a, "u", k2.key_id, K1)


def test_shred_refuses_a_held_checkpoint_using_the_scope(tmp_path, monkeypatch) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    k = keyring.obtain(a, "s", K1)
    keyring.copy_to(a, b, {"s": k.key_id})
    (tmp_path / "b" / "ck").mkdir()
    holds.write(b, "ck", "0" * 32, "litigation")
    uses = {os.path.join(b, "ck"): {"s"}}
    monkeypatch.setattr(keyring, "checkpoint_scopes", lambda p: uses.get(p, set()))
    with pytest.raises(CheckpointHeldError, match="litigation") as e:
        keyring.shred(a, "s")
    assert e.value.name == "ck"
    assert keyring.unwrap(a, "s", k.key_id, K1) == k  # nothing shredded anywhere
    uses.clear()
    keyring.shred(a, "s")


def test_gc_temps_removes_only_old_temporaries(tmp_path: Path) -> None:
    store = str(tmp_path)
    keyring.obtain(store, "s", K1)
    d = tmp_path / ".keys"
    (d / ".x.json.ckptguard-tmp.1").write_text("w")
    assert keyring.gc_temps(store, 3600) == []
    assert keyring.gc_temps(store, 0) == [str(d / ".x.json.ckptguard-tmp.1")]
    assert {e.scope for e in keyring.entries(store)} == {"s"}


def test_kek_sources(tmp_path: Path) -> None:
    hexkey = K1.key.hex()
    f = tmp_path / "kek"
    f.write_text(hexkey + "\n")
    f.chmod(0o600)
    assert Kek.from_file(f) == K1 and resolve_kek(str(f)) == K1 and resolve_kek(K1) is K1
    raw = tmp_path / "raw"
    raw.write_bytes(K1.key)
    raw.chmod(0o400)
    assert Kek.from_file(raw) == K1
    f.chmod(0o640)
    with pytest.raises(KeyUnavailableError, match="group or others"):
        Kek.from_file(f)
    link = tmp_path / "link"
    link.symlink_to(raw)
    with pytest.raises(KeyUnavailableError, match="symbolic link"):
        Kek.from_file(link)
    big = tmp_path / "big"
    big.write_bytes(b"0" * 5000)
    big.chmod(0o600)
    with pytest.raises(KeyUnavailableError, match="5000 bytes"):
        Kek.from_file(big)
    assert kek_from_env({}) is None
    assert kek_from_env({"CKPTGUARD_KEK": hexkey}) == K1
    assert kek_from_env({"CKPTGUARD_KEK_FILE": str(raw)}) == K1
    cmd = f"{sys.executable} -c 'print(\"{hexkey}\")'"
    assert kek_from_env({"CKPTGUARD_KEK_COMMAND": cmd}) == K1
    with pytest.raises(KeyUnavailableError, match="CKPTGUARD_KEK_FILE, CKPTGUARD_KEK"):
        kek_from_env({"CKPTGUARD_KEK": hexkey, "CKPTGUARD_KEK_FILE": str(raw)})
    with pytest.raises(KeyUnavailableError, match="64 hex"):
        kek_from_env({"CKPTGUARD_KEK": "abc"})
    leak = f'{sys.executable} -c \'import sys; print("SEC" + "RET"); sys.exit(3)\''
    with pytest.raises(KeyUnavailableError, match="exit status 3") as e:
        Kek.from_command(leak)
    assert "SECRET" not in str(e.value) and "sys.exit" in str(e.value)
    with pytest.raises(KeyUnavailableError, match="64 hex"):
        Kek.from_command(f'{sys.executable} -c \'print("SEC" + "RET")\'')
    with pytest.raises(KeyUnavailableError, match="cannot be run"):
        Kek.from_command(str(tmp_path / "no-such-command"))


def test_kek_command_timeout(monkeypatch) -> None:
    from ckptguard import kek

    monkeypatch.setattr(kek, "COMMAND_TIMEOUT", 0.5)
    with pytest.raises(KeyUnavailableError, match="did not finish within"):
        Kek.from_command(f"{sys.executable} -c 'import time; time.sleep(30)'")


def test_resolve_kek_without_any(monkeypatch) -> None:
    for v in ("CKPTGUARD_KEK", "CKPTGUARD_KEK_FILE", "CKPTGUARD_KEK_COMMAND"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(KeyUnavailableError, match="no key-encryption key"):
        resolve_kek(None)
    monkeypatch.setenv("CKPTGUARD_KEK", K2.key.hex())
    assert resolve_kek(None) == K2
