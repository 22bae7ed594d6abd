"""The audit log on its own: every kind of tampering detected with a typed error naming the
entry or head; recovery from a crash mid-append; proofs; hostile files in .audit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ckptguard import (
    AuditError,
    AuditLockTimeoutError,
    AuditRollbackError,
    AuditSignatureError,
    AuditTamperedError,
    audit,
    keys,
)
from ckptguard.audit import canon, entry, merkle

pytestmark = pytest.mark.backend_independent  # the log is written and read without a checkpoint

N = 6  # commit entries after init


@pytest.fixture
def key(tmp_path: Path) -> keys.PrivateKey:
    return keys.load_private(keys.generate(tmp_path / "k")[0])


@pytest.fixture
def store(tmp_path: Path, key: keys.PrivateKey) -> Path:
    s = tmp_path / "store"
    audit.init(s, key.path, witness=str(tmp_path / "witness"))
    for i in range(N):
        audit.append(s, [("commit", {"checkpoint": f"c{i}", "uuid": f"{i:032x}"})])
    return s


def log_path(s: Path) -> Path:
    return s / ".audit" / "log.jsonl"


def heads_path(s: Path) -> Path:
    return s / ".audit" / "heads.jsonl"


def lines(p: Path) -> list[bytes]:
    return p.read_bytes().splitlines()


def put(p: Path, ls: list[bytes]) -> None:
    p.write_bytes(b"".join(x + b"\n" for x in ls))


def test_a_whole_log_verifies(store: Path, key: keys.PrivateKey, tmp_path: Path) -> None:
    rep = audit.verify(store, key=key.public)
    assert (rep.size, rep.heads, rep.key_id) == (N + 1, N + 1, key.key_id)
    assert rep.witnesses == [(str(tmp_path / "witness"), N + 1)]
    assert rep.root == json.loads(lines(heads_path(store))[-1])["root"]
    ops = [e["op"] for e in audit.read(store)[0].entries]
    assert ops == ["init"] + ["commit"] * N


def test_edited_entry_is_named(store: Path) -> None:
    ls = lines(log_path(store))
    obj = json.loads(ls[3])
    obj["checkpoint"] = "forged"
    ls[3] = canon.encode(obj)
    put(log_path(store), ls)
    with pytest.raises(AuditTamperedError, match="entry 3 do not match") as e:
        audit.verify(store)
    assert e.value.entry == 3 and e.value.path.endswith("log.jsonl")


def test_non_canonical_entry_is_named(store: Path) -> None:
    ls = lines(log_path(store))
    ls[2] = ls[2].replace(b'"op":', b'"op": ')
    put(log_path(store), ls)
    with pytest.raises(AuditTamperedError, match="canonical") as e:
        audit.verify(store)
    assert e.value.entry == 2


def test_deleted_entry_is_named(store: Path) -> None:
    ls = lines(log_path(store))
    put(log_path(store), ls[:2] + ls[3:])
    with pytest.raises(AuditTamperedError, match="seq 3 where 2 belongs") as e:
        audit.verify(store)
    assert e.value.entry == 2


def test_reordered_entries_are_named(store: Path) -> None:
    ls = lines(log_path(store))
    ls[4], ls[5] = ls[5], ls[4]
    put(log_path(store), ls)
    with pytest.raises(AuditTamperedError, match="reordered") as e:
        audit.verify(store)
    assert e.value.entry == 4


def test_entries_cut_from_the_end_are_found_by_the_heads(store: Path) -> None:
    put(log_path(store), lines(log_path(store))[:-2])
    with pytest.raises(AuditTamperedError, match="removed from its end") as e:
        audit.verify(store)
    assert e.value.entry == N - 1


def test_torn_last_line(store: Path) -> None:
    data = log_path(store).read_bytes()
    log_path(store).write_bytes(data[:-10])
    with pytest.raises(AuditTamperedError, match="torn") as e:
        audit.verify(store)
    assert e.value.entry == N


def test_rollback_is_caught_by_the_witness(store: Path, tmp_path: Path) -> None:
    """Entries and heads cut back consistently (a store restored from an older snapshot): the
    log verifies on its own, the witness's head proves it was longer."""
    put(log_path(store), lines(log_path(store))[:-2])
    put(heads_path(store), lines(heads_path(store))[:-2])
    with pytest.raises(AuditRollbackError, match="rolled back") as e:
        audit.verify(store)
    assert e.value.entry == N - 1
    shutil.rmtree(tmp_path / "witness")  # the witness gone: only a head the user kept tells
    rep = audit.verify(store)
    assert any("not reachable" in n for n in rep.notes)


def test_rollback_is_caught_by_a_kept_head(store: Path, tmp_path: Path) -> None:
    kept = tmp_path / "kept.json"
    kept.write_bytes(lines(heads_path(store))[-1] + b"\n")
    put(log_path(store), lines(log_path(store))[:-1])
    put(heads_path(store), lines(heads_path(store))[:-1])
    (tmp_path / "witness" / audit.witness_name(audit.read(store)[0].config.log_id)).unlink()
    with pytest.raises(AuditRollbackError):
        audit.verify(store, heads=[audit.head_from_file(str(kept))])


def test_stolen_key_rewrite_is_caught_by_the_witness(store: Path, key: keys.PrivateKey) -> None:
    """Whoever holds the key can rewrite the log and re-sign every head: it then verifies on
    its own, and only the witness's older head shows the history changed."""
    log, _ = audit.read(store)
    entries = [canon.encode(e) for e in log.entries]
    forged = json.loads(entries[2])
    forged["checkpoint"] = "forged"
    entries[2] = canon.encode(forged)
    put(log_path(store), entries)
    leaves = [merkle.leaf_hash(e) for e in entries]
    heads = []
    for size in range(1, len(entries) + 1):
        h = entry.head_body(log.config.log_id, size, merkle.root(leaves[:size]), key.key_id)
        heads.append(canon.encode({**h, "sig": key.sign(entry.signed_bytes(h)).hex()}))
    put(heads_path(store), heads)
    with pytest.raises(AuditRollbackError, match="rewritten"):
        audit.verify(store)


def test_head_signed_by_another_key(store: Path, tmp_path: Path) -> None:
    other = keys.load_private(keys.generate(tmp_path / "other")[0])
    hs = lines(heads_path(store))
    h = json.loads(hs[-1])
    h["key_id"] = other.key_id
    h["sig"] = other.sign(entry.signed_bytes(h)).hex()
    hs[-1] = canon.encode(h)
    put(heads_path(store), hs)
    with pytest.raises(AuditSignatureError, match=f"tree head {N}.*signed by key") as e:
        audit.verify(store)
    assert e.value.path.endswith("heads.jsonl")


def test_forged_signature(store: Path) -> None:
    hs = lines(heads_path(store))
    h = json.loads(hs[1])
    h["sig"] = "0" * 128
    hs[1] = canon.encode(h)
    put(heads_path(store), hs)
    with pytest.raises(AuditSignatureError, match="tree head 1 .*does not verify"):
        audit.verify(store)


def test_an_untrusted_key_in_the_config(store: Path, tmp_path: Path) -> None:
    other = keys.load_private(keys.generate(tmp_path / "other")[0])
    with pytest.raises(AuditSignatureError, match="not the trusted key"):
        audit.verify(store, key=other.public)


def test_unsigned_log_still_detects_edits(tmp_path: Path) -> None:
    s = tmp_path / "s"
    audit.init(s)
    audit.append(s, [("gc", {"detail": {"count": 1}})])
    rep = audit.verify(s)
    assert rep.key_id is None and any("not signed" in n for n in rep.notes)
    ls = lines(log_path(s))
    ls[1] = ls[1].replace(b'"count":1', b'"count":2')
    put(log_path(s), ls)
    with pytest.raises(AuditTamperedError, match="entry 1"):
        audit.verify(s)


def test_an_honest_writer_never_seals_over_tampering(store: Path) -> None:
    ls = lines(log_path(store))
    put(log_path(store), ls[:2] + ls[3:])
    with pytest.raises(AuditTamperedError, match="not appending"):
        audit.append(store, [("gc", {})])
    msgs = audit.note(store, "gc")
    assert msgs and "no entry for the gc" in msgs[0]
    assert len(lines(log_path(store))) == N  # nothing was added


def test_a_rolled_back_log_is_not_appended_to(store: Path) -> None:
    put(log_path(store), lines(log_path(store))[:-1])
    put(heads_path(store), lines(heads_path(store))[:-1])
    with pytest.raises(AuditRollbackError, match="witness"):
        audit.append(store, [("gc", {})])


def test_a_torn_tail_and_unsealed_entries_are_sealed_with_a_recover_entry(store: Path) -> None:
    """What a writer killed mid-append leaves: an entry without its head, a torn line."""
    unsealed = entry.build(N + 1, "gc", detail={})
    with open(log_path(store), "ab") as f:
        f.write(unsealed + b"\n" + b'{"v":1,"se')
    with pytest.raises(AuditTamperedError, match="torn"):
        audit.verify(store)
    audit.append(store, [("gc", {})])
    log, _ = audit.read(store)
    rec = log.entries[N + 2]
    assert rec["op"] == "recover"
    assert rec["detail"] == {
        "unsealed_from": N + 1,
        "unsealed": 1,
        "torn_log_bytes": 10,
        "torn_head_bytes": 0,
    }
    assert [e["op"] for e in log.entries[-3:]] == ["gc", "recover", "gc"]
    audit.verify(store)


@pytest.mark.parametrize("size", [1, 2, 3, 5, N + 1])
def test_proofs(store: Path, size: int) -> None:
    for i in range(size):
        p = audit.inclusion(store, i, size)
        merkle.verify_inclusion(
            i,
            size,
            bytes.fromhex(p["leaf_hash"]),
            [bytes.fromhex(x) for x in p["path"]],
            bytes.fromhex(p["root"]),
        )
    heads = {json.loads(h)["size"]: json.loads(h)["root"] for h in lines(heads_path(store))}
    assert audit.inclusion(store, 0, size)["root"] == heads[size]
    for old in range(size + 1):
        c = audit.consistency(store, old, size)
        merkle.verify_consistency(
            old,
            size,
            bytes.fromhex(c["old_root"]),
            bytes.fromhex(c["new_root"]),
            [bytes.fromhex(x) for x in c["proof"]],
        )
        if 0 < old < size:
            with pytest.raises(merkle.ProofError):
                merkle.verify_consistency(
                    old,
                    size,
                    merkle.leaf_hash(b"x"),
                    bytes.fromhex(c["new_root"]),
                    [bytes.fromhex(x) for x in c["proof"]],
                )


def test_rfc6962_empty_and_single_roots() -> None:
    # RFC 6962's definitions: MTH({}) = SHA-256(), MTH({d0}) = SHA-256(0x00 || d0).
    assert merkle.root([]).hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert merkle.root([merkle.leaf_hash(b"")]).hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )


# ---- hostile files in .audit -------------------------------------------------------------------


def test_a_link_as_the_log_is_refused(store: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.copy(log_path(store), elsewhere)
    log_path(store).unlink()
    os.symlink(elsewhere, log_path(store))
    with pytest.raises(AuditTamperedError, match="symbolic link"):
        audit.verify(store)
    with pytest.raises(AuditTamperedError):
        audit.append(store, [("gc", {})])
    assert elsewhere.read_bytes() == log_path(store).read_bytes()  # never written through


def test_a_link_as_the_audit_directory_is_refused(store: Path, tmp_path: Path) -> None:
    shutil.move(store / ".audit", tmp_path / "real")
    os.symlink(tmp_path / "real", store / ".audit")
    with pytest.raises(AuditTamperedError, match="link"):
        audit.verify(store)
    assert audit.note(store, "gc")  # a warning, never a write through the link


@pytest.mark.parametrize("name", ["log.jsonl", "heads.jsonl", "config.json", "lock"])
def test_a_fifo_never_blocks(store: Path, name: str) -> None:
    p = store / ".audit" / name
    p.unlink()
    os.mkfifo(p)
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            audit.append(store, [("gc", {})])
            out.append(None)
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), f"a FIFO as {name} blocked the append"
    assert isinstance(out[0], AuditError), out


def test_a_huge_line_is_refused(store: Path) -> None:
    with open(log_path(store), "ab") as f:
        f.write(b"x" * (entry.MAX_ENTRY_BYTES + 1) + b"\n")
    with pytest.raises(AuditTamperedError, match="a line of") as e:
        audit.verify(store)
    assert e.value.entry == N + 1


@pytest.mark.parametrize(
    "bad",
    [
        b'{"a":1,"a":2}',
        b'{"a":1.5}',
        b'{"a":NaN}',
        b"[1]",
        b'{"a":"\xc3\xa9"}',
        b"{" * 100000,
    ],
    ids=["duplicate", "float", "nan", "array", "non-ascii", "deep"],
)
def test_strict_json(bad: bytes) -> None:
    with pytest.raises(canon.CanonicalError):
        canon.decode(bad, 1 << 20)


def test_audit_entries_ignore_nothing_unknown(store: Path) -> None:
    ls = lines(log_path(store))
    obj = json.loads(ls[1])
    obj["extra"] = 1
    ls[1] = canon.encode(obj)
    put(log_path(store), ls)
    with pytest.raises(AuditTamperedError, match="unknown") as e:
        audit.verify(store)
    assert e.value.entry == 1


def test_init_twice_is_refused(store: Path) -> None:
    with pytest.raises(AuditError, match="already"):
        audit.init(store)


def test_lock_timeout_is_typed(store: Path) -> None:
    """Another process holds the lock: the append waits a bounded time, then says so."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(store / '.audit' / 'lock')!r}, os.O_WRONLY)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(AuditLockTimeoutError, match="lock"):
            audit.append(store, [("gc", {})], timeout=0.3)
        os.environ["CKPTGUARD_AUDIT_LOCK_TIMEOUT"] = "0.3"
        try:
            msgs = audit.note(store, "gc")
        finally:
            del os.environ["CKPTGUARD_AUDIT_LOCK_TIMEOUT"]
    finally:
        holder.kill()
        holder.wait()
    assert len(msgs) == 1 and "lock" in msgs[0]
    assert len(audit.read(store)[0].entries) == N + 1
