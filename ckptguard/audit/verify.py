"""Reading and verifying an audit log (docs/audit.md section 5), and its Merkle proofs.

``verify`` checks every entry (canonical, well-formed, numbered in order), every tree head
(form, log, key, signature, root over the entries it covers), that the last head covers every
entry, and that the log extends each head held elsewhere (the witness's, heads the user kept):
an edited, removed, inserted, reordered or torn entry, a head of another key, a rolled-back or
truncated log each raise a typed error naming the entry or head. Nothing here writes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..errors import (
    AuditError,
    AuditRollbackError,
    AuditSignatureError,
    AuditTamperedError,
    KeyFileError,
    SignatureError,
)
from ..fsutil import UnsafeFileError, read_regular
from ..keys import PublicKey, key_id, public_from_raw
from . import canon, entry, merkle
from .append import read_witness
from .files import (
    HEADS,
    LOCK,
    LOG,
    Config,
    audit_dir,
    locked,
    open_dir,
    read_config,
    read_lines,
    read_log,
)


@dataclass
class AuditLog:
    """An audit log read and checked entry by entry (not yet against its heads)."""

    path: str  # the .audit directory
    config: Config
    entries: list[dict]
    leaves: list[bytes]
    heads: list[dict]


@dataclass
class AuditReport:
    """What ``verify`` established: the log's size and root, the heads checked, the key they
    are signed with (None: unsigned), each witness and the size of the head it holds (None:
    none), and notes (what was not checked, and why)."""

    path: str
    log_id: str
    size: int
    root: str
    heads: int
    key_id: str | None
    witnesses: list[tuple[str, int | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _reading(dfd: int, where: str) -> Iterator[list[str]]:
    """A shared lock for the reads, so that no append is half done under them; where the lock
    file cannot be opened (a read-only copy of the store), the reads go on and a note says so."""
    notes: list[str] = []
    try:
        ctx = locked(dfd, where, 0, shared=True)
        ctx.__enter__()
    except (OSError, AuditError, UnsafeFileError) as e:
        notes.append(f"read without the lock ({LOCK}: {e}); a concurrent append may show")
        yield notes
        return
    try:
        yield notes
    finally:
        ctx.__exit__(None, None, None)


def read(store: str | os.PathLike) -> tuple[AuditLog, list[str]]:
    """``store``'s audit log read under the shared lock, each entry and head checked on its
    own; typed errors (AuditTamperedError naming the entry) for anything malformed."""
    where = audit_dir(os.path.abspath(os.fspath(store)))
    dfd = open_dir(where)
    try:
        cfg = read_config(dfd, where)
        with _reading(dfd, where) as notes:
            log = read_log(dfd, where)
            raw_heads = read_lines(dfd, HEADS, where, 1 << 30, entry.MAX_HEAD_BYTES)
    finally:
        os.close(dfd)
    lpath, hpath = os.path.join(where, LOG), os.path.join(where, HEADS)
    if log.torn:
        raise AuditTamperedError(
            f"the last line is torn ({len(log.torn)} bytes without a newline)",
            lpath,
            len(log.lines),
        )
    if raw_heads.torn:
        raise AuditTamperedError(f"the last tree head is torn (head {len(raw_heads.lines)})", hpath)
    entries = []
    for i, line in enumerate(log.lines):
        try:
            obj = canon.decode(line, entry.MAX_ENTRY_BYTES)
            entry.check_entry(obj, i)
        except (canon.CanonicalError, entry.SchemaError) as e:
            raise AuditTamperedError(f"entry is damaged: {e}", lpath, i) from None
        entries.append(obj)
    heads = []
    for i, line in enumerate(raw_heads.lines):
        try:
            head = entry.parse_head(line)
        except (canon.CanonicalError, entry.SchemaError) as e:
            raise AuditTamperedError(f"tree head {i} is damaged: {e}", hpath) from None
        if head["log_id"] != cfg.log_id:
            raise AuditTamperedError(f"tree head {i} is of another log", hpath)
        heads.append(head)
    leaves = [merkle.leaf_hash(line) for line in log.lines]
    return AuditLog(where, cfg, entries, leaves, heads), notes


def _trusted(
    cfg: Config, trusted: PublicKey | None, where: str, notes: list[str]
) -> PublicKey | None:
    """The key every head must be signed with: ``trusted`` if given (and the config must name
    it), else the config's own (noted: whoever can write the store can change it)."""
    if trusted is not None:
        if cfg.key_id != trusted.key_id:
            named = cfg.key_id[:16] if cfg.key_id else "no key"
            raise AuditSignatureError(
                f"the log's config names {named}, not the trusted key {trusted.key_id[:16]}",
                os.path.join(where, "config.json"),
            )
        return trusted
    if cfg.public_key is None:
        notes.append("the log is not signed: its heads prove order and content, not who wrote")
        return None
    try:
        key = public_from_raw(bytes.fromhex(cfg.public_key))
    except KeyFileError as e:
        raise AuditTamperedError(f"damaged config: {e}", where) from None
    if key_id(key.raw) != cfg.key_id:
        raise AuditTamperedError("damaged config: key_id is not the key's", where)
    notes.append("the signing key was taken from the store's own config (pin one with --key)")
    return key


def _check_signature(head: dict, key: PublicKey | None, what: str, path: str) -> None:
    if key is None:
        if head["key_id"] is not None:
            raise AuditTamperedError(f"{what} is signed, but the log has no key", path)
        return
    if head["key_id"] is None:
        raise AuditSignatureError(f"{what} is not signed", path)
    if head["key_id"] != key.key_id:
        raise AuditSignatureError(
            f"{what} is signed by key {head['key_id'][:16]}, not the log's key {key.key_id[:16]}",
            path,
        )
    try:
        key.verify(bytes.fromhex(head["sig"]), entry.signed_bytes(head), path)
    except SignatureError:
        raise AuditSignatureError(f"{what}: the signature does not verify", path) from None


def roots_at(leaves: list[bytes], sizes: Iterable[int]) -> dict[int, str]:
    """The root (hex) of each prefix of ``leaves`` whose size is in ``sizes``, in one pass."""
    want = {s for s in sizes if 0 <= s <= len(leaves)}
    f = merkle.Frontier()
    out = {0: merkle.EMPTY_ROOT.hex()} if 0 in want else {}
    for leaf in leaves:
        f.add(leaf)
        if f.size in want:
            out[f.size] = f.root().hex()
    return out


def _check_heads(log: AuditLog, key: PublicKey | None, roots: dict[int, str]) -> None:
    hpath = os.path.join(log.path, HEADS)
    n, prev = len(log.leaves), 0
    for i, head in enumerate(log.heads):
        what = f"tree head {i} (size {head['size']}, {head['time']})"
        _check_signature(head, key, what, hpath)
        size = head["size"]
        if size < prev:
            raise AuditTamperedError(f"{what} is smaller than the head before it", hpath)
        if size > n:
            raise AuditTamperedError(
                f"{what} covers {size} entries, the log has {n}: entries were removed from its end",
                os.path.join(log.path, LOG),
                n,
            )
        if roots[size] != head["root"]:
            span = f"entry {prev}" if size - prev <= 1 else f"entries {prev}..{size - 1}"
            raise AuditTamperedError(
                f"{span} do not match {what}: edited, replaced or reordered",
                os.path.join(log.path, LOG),
                prev,
            )
        prev = size
    if prev < n:
        raise AuditTamperedError(
            f"entries {prev}..{n - 1} are covered by no tree head: appended by someone "
            "without the key, or left by a writer that died before sealing them (the next "
            "append seals them, with a recover entry)",
            os.path.join(log.path, LOG),
            prev,
        )


def _check_outside(
    log: AuditLog, key: PublicKey | None, roots: dict[int, str], held: list[tuple[str, dict]]
) -> None:
    """Each head held elsewhere (``held``: where, head) must be one of this log's prefixes."""
    n = len(log.leaves)
    for where, head in held:
        what = f"the tree head held by {where} (size {head['size']}, {head['time']})"
        _check_signature(head, key, what, where)
        if head["log_id"] != log.config.log_id:
            raise AuditTamperedError(f"{what} is of another log", where)
        if head["size"] > n:
            raise AuditRollbackError(
                f"{what} covers {head['size']} entries, the log has {n}: the store was rolled "
                "back or its log truncated",
                os.path.join(log.path, LOG),
                n,
            )
        if roots[head["size"]] != head["root"]:
            raise AuditRollbackError(
                f"the log's first {head['size']} entries differ from {what}: the log was rewritten",
                os.path.join(log.path, LOG),
                head["size"],
            )


def verify(
    store: str | os.PathLike,
    *,
    key: PublicKey | None = None,
    witnesses: Iterable[str] = (),
    heads: Iterable[tuple[str, dict]] = (),
) -> AuditReport:
    """Verify ``store``'s audit log (module docstring); return what was established.

    ``key``: the trusted public key (else the config's, noted). ``witnesses``: directories
    holding tree heads, besides the config's witness. ``heads``: (where, head) pairs the user
    kept (``head_from_file``). Raises AuditTamperedError, AuditRollbackError or
    AuditSignatureError naming the entry or head, AuditError if the log cannot be read."""
    log, notes = read(store)
    cfg = log.config
    signer = _trusted(cfg, key, log.path, notes)
    dirs = list(dict.fromkeys(([cfg.witness] if cfg.witness else []) + list(witnesses)))
    held = list(heads)
    seen: list[tuple[str, int | None]] = []
    for d in dirs:
        if not os.path.isdir(d):
            notes.append(f"the witness {d} is not reachable: not checked against it")
            seen.append((d, None))
            continue
        h = read_witness(d, cfg.log_id)
        seen.append((d, None if h is None else h["size"]))
        if h is None:
            notes.append(f"the witness {d} holds no head of this log")
        else:
            held.append((d, h))
    sizes = [h["size"] for h in log.heads] + [h["size"] for _, h in held]
    roots = roots_at(log.leaves, sizes)
    _check_heads(log, signer, roots)
    _check_outside(log, signer, roots, held)
    last = log.heads[-1] if log.heads else None
    return AuditReport(
        path=log.path,
        log_id=cfg.log_id,
        size=len(log.leaves),
        root=last["root"] if last else merkle.EMPTY_ROOT.hex(),
        heads=len(log.heads),
        key_id=signer.key_id if signer else None,
        witnesses=seen,
        notes=notes,
    )


def head_from_file(path: str) -> tuple[str, dict]:
    """A tree head the user kept (a copy of ``heads.jsonl``'s last line, or of a witness's
    file): (path, head). AuditError if it is not one."""
    try:
        raw = read_regular(path, max_size=entry.MAX_HEAD_BYTES + 1)
        return path, entry.parse_head(raw.removesuffix(b"\n"))
    except (OSError, UnsafeFileError, canon.CanonicalError, entry.SchemaError) as e:
        raise AuditError(f"not a tree head: {e}", path) from None


def inclusion(store: str | os.PathLike, index: int, size: int | None = None) -> dict:
    """The inclusion proof of entry ``index`` in the tree of the first ``size`` entries (the
    last head's size by default): the entry's leaf hash, the root and the audit path (hex)."""
    log, _ = read(store)
    size = log.heads[-1]["size"] if size is None and log.heads else size or len(log.leaves)
    if size > len(log.leaves):
        raise merkle.ProofError(f"the log has {len(log.leaves)} entries, not {size}")
    leaves = log.leaves[:size]
    path = merkle.inclusion_proof(index, leaves)
    return {
        "index": index,
        "tree_size": size,
        "leaf_hash": leaves[index].hex(),
        "root": merkle.root(leaves).hex(),
        "path": [p.hex() for p in path],
    }


def consistency(store: str | os.PathLike, old: int, new: int | None = None) -> dict:
    """The consistency proof that the tree of ``old`` entries is a prefix of the tree of
    ``new`` (the last head's size by default): both roots and the proof (hex)."""
    log, _ = read(store)
    new = log.heads[-1]["size"] if new is None and log.heads else new or len(log.leaves)
    if new > len(log.leaves):
        raise merkle.ProofError(f"the log has {len(log.leaves)} entries, not {new}")
    leaves = log.leaves[:new]
    return {
        "old_size": old,
        "new_size": new,
        "old_root": merkle.root(leaves[:old]).hex(),
        "new_root": merkle.root(leaves).hex(),
        "proof": [p.hex() for p in merkle.consistency_proof(old, leaves)],
    }
