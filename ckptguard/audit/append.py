"""Writing the audit log: ``init`` creates it, ``append`` adds entries under the lock and seals
them with a new (signed) tree head, also written to the witness; ``note`` is ``append`` for a
step after an operation's commit point, turning a failure into a warning (docs/audit.md
section 6 gives the rule per operation).

One append, under the lock: read the log and the heads; refuse to write over a log that does
not match its last head or the witness's (tampered or rolled back: an honest writer never signs
over it); cut a line torn by a crash and seal entries a dead writer left without a head, saying
so in a ``recover`` entry; write the entries, fsync; the head, fsync; the witness's copy.
"""

from __future__ import annotations

import contextlib
import os
import uuid as uuidlib
from dataclasses import dataclass, field

from ..errors import (
    AuditError,
    AuditRollbackError,
    AuditTamperedError,
    CheckpointError,
    KeyFileError,
    brief,
)
from ..failpoints import failpoint
from ..fsutil import (
    NewFiles,
    UnsafeFileError,
    fsync_dir,
    group_shared,
    makedirs_durably,
    read_regular,
    write_file_durably,
)
from ..io import pwrite_all
from ..keys import PrivateKey, load_private
from . import canon, entry, merkle
from .files import (
    AUDIT_DIR,
    CONFIG,
    HEADS,
    LOG,
    Config,
    Lines,
    audit_dir,
    enabled,
    locked,
    open_append,
    open_dir,
    read_config,
    read_lines,
    read_log,
    witness_name,
)

KEY_ENV = "CKPTGUARD_AUDIT_KEY"  # the signing key's path where it differs from the config's


@dataclass
class Appended:
    """What one append wrote: the entries' numbers, the new tree head, and what failed after
    the entries were durable (the witness's copy)."""

    seqs: list[int]
    head: dict
    warnings: list[str] = field(default_factory=list)


def _modes(store: str) -> tuple[int, int]:
    return (0o770, 0o660) if group_shared(store) else (0o700, 0o600)


def init(
    store: str | os.PathLike, key: str | os.PathLike | None = None, witness: str | None = None
) -> Appended:
    """Give ``store`` an audit log: ``.audit/config.json`` (log id, public key, where the
    signing key ``key`` and the ``witness`` directory are) and the first entry (``init``),
    sealed by a head signed with ``key`` where given. AuditError if it has one already."""
    root = os.path.abspath(os.fspath(store))
    makedirs_durably(root)
    dmode, fmode = _modes(root)
    where = audit_dir(root)
    with contextlib.suppress(FileExistsError):
        os.mkdir(where, dmode)
        os.chmod(where, dmode)
        fsync_dir(root)
    if enabled(root):
        raise AuditError("the store has an audit log already", where)
    signer = load_private(key) if key is not None else None
    wdir = os.path.abspath(witness) if witness is not None else None
    if wdir is not None:
        makedirs_durably(wdir, 0o755)
    cfg = Config(
        log_id=uuidlib.uuid4().hex,
        created=entry.utc_now(),
        public_key=signer.public.raw.hex() if signer else None,
        key_id=signer.key_id if signer else None,
        signing_key=signer.path and os.path.abspath(signer.path) if signer else None,
        witness=wdir,
    )
    files = NewFiles(where)
    try:
        tmp = files.new(CONFIG)
        with open(tmp, "wb") as f:
            f.write(cfg.to_json())
        os.chmod(tmp, fmode)
        files.commit()
    except FileExistsError:
        raise AuditError("the store has an audit log already", where) from None
    finally:
        files.discard()
    detail = {"key_id": cfg.key_id, "witness": wdir, "log_id": cfg.log_id}
    return append(root, [("init", {"detail": detail})], signer=signer)


def signer_for(cfg: Config, where: str) -> PrivateKey | None:
    """The private key that signs this log's heads (``$CKPTGUARD_AUDIT_KEY``, else the
    config's path), checked to be the log's key; None for a log without one."""
    if cfg.key_id is None:
        return None
    path = os.environ.get(KEY_ENV) or cfg.signing_key
    if not path:
        raise KeyFileError(f"the audit log is signed but no signing key is set (${KEY_ENV})", where)
    key = load_private(path)
    if key.key_id != cfg.key_id:
        raise KeyFileError(
            f"{path} (key {key.key_id[:16]}) is not the audit log's key ({cfg.key_id[:16]})", path
        )
    return key


Item = tuple[str, dict]  # (op, entry.build's keywords)


def append(
    store: str | os.PathLike,
    items: list[Item],
    *,
    signer: PrivateKey | None = None,
    witnesses: tuple[str, ...] = (),
    timeout: float | None = None,
) -> Appended:
    """Append ``items`` (each an op and ``entry.build``'s keywords) to ``store``'s audit log
    and seal them with a new tree head; write the head to the config's witness and to each of
    ``witnesses`` too. Raises AuditError (and its kinds), KeyFileError or OSError; nothing is
    appended then, or the entries are appended but unsealed (the next append seals them)."""
    root = os.path.abspath(os.fspath(store))
    where = audit_dir(root)
    dfd = open_dir(where)
    try:
        cfg = read_config(dfd, where)
        if signer is None:
            signer = signer_for(cfg, where)
        _, fmode = _modes(root)
        with locked(dfd, where, fmode, timeout):
            return _append_locked(dfd, where, cfg, items, signer, witnesses, fmode)
    finally:
        os.close(dfd)


def _last_head(heads: Lines, where: str, cfg: Config) -> dict | None:
    if not heads.lines:
        return None
    try:
        head = entry.parse_head(heads.lines[-1])
    except (canon.CanonicalError, entry.SchemaError) as e:
        raise AuditTamperedError(
            f"the last tree head is damaged ({e})", os.path.join(where, HEADS)
        ) from None
    if head["log_id"] != cfg.log_id:
        raise AuditTamperedError("the last tree head is of another log", where)
    return head


def _check_prefix(leaves: list[bytes], head: dict | None, what: str, where: str) -> None:
    """Refuse to append over a log that is shorter than, or differs from, ``head``."""
    if head is None:
        return
    size = head["size"]
    if size > len(leaves):
        raise AuditRollbackError(
            f"{what} covers {size} entries, the log has {len(leaves)}: entries were removed; "
            "not appending over it",
            where,
            len(leaves),
        )
    if merkle.root(leaves[:size]).hex() != head["root"]:
        raise AuditTamperedError(
            f"the log's first {size} entries do not match {what}: not appending over them "
            "(`ckptguard audit verify` says where)",
            where,
            size,
        )


def _append_locked(
    dfd: int,
    where: str,
    cfg: Config,
    items: list[Item],
    signer: PrivateKey | None,
    witnesses: tuple[str, ...],
    fmode: int,
) -> Appended:
    log = read_log(dfd, where)
    heads = read_lines(dfd, HEADS, where, 1 << 30, entry.MAX_HEAD_BYTES)
    leaves = [merkle.leaf_hash(line) for line in log.lines]
    last = _last_head(heads, where, cfg)
    _check_prefix(leaves, last, "the last tree head", where)
    dirs = tuple(dict.fromkeys(((cfg.witness,) if cfg.witness else ()) + witnesses))
    late: list[str] = []
    for d in dirs:
        try:
            seen = read_witness(d, cfg.log_id)
        except (OSError, AuditError) as e:
            late.append(f"the witness {d} could not be read ({brief(e)})")
            continue
        _check_prefix(leaves, seen, f"the tree head held by the witness {d}", where)
    sealed = last["size"] if last else 0
    new: list[bytes] = []
    if log.torn or heads.torn or sealed < len(leaves):
        detail = {
            "unsealed_from": sealed,
            "unsealed": len(leaves) - sealed,
            "torn_log_bytes": len(log.torn),
            "torn_head_bytes": len(heads.torn),
        }
        new.append(entry.build(len(leaves), "recover", detail=detail))
    for op, kw in items:
        new.append(entry.build(len(leaves) + len(new), op, **kw))
    lfd = open_append(dfd, LOG, where, fmode)
    try:
        failpoint("audit.before_append")
        os.ftruncate(lfd, log.size - len(log.torn))
        pwrite_all(lfd, [b"".join(e + b"\n" for e in new)], log.size - len(log.torn), LOG)
        os.fsync(lfd)
    finally:
        os.close(lfd)
    failpoint("audit.appended")
    leaves += [merkle.leaf_hash(e) for e in new]
    head = _sign(entry.head_body(cfg.log_id, len(leaves), merkle.root(leaves), cfg.key_id), signer)
    hfd = open_append(dfd, HEADS, where, fmode)
    try:
        os.ftruncate(hfd, heads.size - len(heads.torn))
        pwrite_all(hfd, [canon.encode(head) + b"\n"], heads.size - len(heads.torn), HEADS)
        os.fsync(hfd)
    finally:
        os.close(hfd)
    failpoint("audit.head_written")
    for d in dirs:
        try:
            write_witness(d, head)
        except OSError as e:
            late.append(f"the new tree head was not written to the witness {d} ({brief(e)})")
    seqs = list(range(len(leaves) - len(items), len(leaves)))
    return Appended(seqs, head, late)


def _sign(head: dict, signer: PrivateKey | None) -> dict:
    if signer is None:
        return head
    return {**head, "sig": signer.sign(entry.signed_bytes(head)).hex()}


def read_witness(directory: str, log_id: str) -> dict | None:
    """The tree head that witness ``directory`` holds for log ``log_id`` (None if none), its
    form checked (its signature is the verifier's to check). AuditTamperedError if damaged."""
    path = os.path.join(directory, witness_name(log_id))
    try:
        raw = read_regular(path, max_size=entry.MAX_HEAD_BYTES + 1)
    except FileNotFoundError:
        return None
    except UnsafeFileError as e:
        raise AuditTamperedError(f"the witness's head {e.reason}", path) from None
    try:
        head = entry.parse_head(raw.removesuffix(b"\n"))
    except (canon.CanonicalError, entry.SchemaError) as e:
        raise AuditTamperedError(f"the witness's head is damaged ({e})", path) from None
    if head["log_id"] != log_id:
        raise AuditTamperedError("the witness's head is of another log", path)
    return head


def write_witness(directory: str, head: dict) -> None:
    """Replace witness ``directory``'s copy of the head of ``head``'s log with ``head``,
    durably (a temporary, fsync, rename, fsync of the directory). The directory must exist."""
    path = os.path.join(directory, witness_name(head["log_id"]))
    write_file_durably(path, canon.encode(head) + b"\n", tmp_suffix=f".{uuidlib.uuid4().hex}.tmp")
    fsync_dir(directory)


def note(
    store: str | os.PathLike,
    op: str,
    *,
    witnesses: tuple[str, ...] = (),
    **kw: object,
) -> list[str]:
    """``append`` of one entry for a step after an operation's commit point: a store without
    an audit log is left alone; a failure (lock timeout, ENOSPC, EIO, a tampered log, a key
    that cannot be loaded) is returned as a message for a CheckpointWarning, never raised,
    since the operation stands. What was written is fine: the witness's copy failing is in the
    messages too."""
    root = os.fspath(store)
    if not enabled(root):
        return []
    try:
        return append(root, [(op, dict(kw))], witnesses=witnesses).warnings
    except (OSError, CheckpointError, ValueError) as e:
        name = kw.get("checkpoint")
        what = f"{op} of {name}" if name else op
        return [f"the audit log of {root} has no entry for the {what}: {brief(e)}"]


__all__ = ["AUDIT_DIR", "KEY_ENV", "Appended", "append", "init", "note", "signer_for"]
