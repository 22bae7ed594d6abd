"""A store's keyring (docs/format.md section 1.1; docs/security.md): one data key per encryption
scope, kept only wrapped under a key-encryption key (``Kek``) in ``<store>/.keys/<sid>.json``.

``obtain`` gives a save its scope's key (created on first use), ``unwrap`` gives a load the key
its index names; ``rotate`` re-wraps every key under a new KEK without touching data;
``shred`` destroys a scope's key in this store and every store that holds a copy of it
(``copy_to``, the drain, records those in ``.keys/COPIES``), leaving a tombstone so the scope is
never keyed again. Writers that replace an entry (rotate, shred) hold the keyring's lock
(``.keys/.lock``), so a rotation never writes a shredded key back. Entries: ``keyfile``.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
from collections.abc import Mapping

from . import audit, holds
from .errors import (
    CheckpointError,
    CheckpointHeldError,
    CorruptCheckpointError,
    KeyUnavailableError,
    ScopeShreddedError,
    StoreError,
    brief,
    from_oserror,
    warn_after_commit,
)
from .failpoints import failpoint
from .fsutil import UnsafeFileError, fsync_dir, read_manifest, read_regular
from .kek import Kek, kek_from_env, resolve_kek
from .keyfile import (
    COPIES,
    KEYS,
    MAX_COPIES_BYTES,
    MAX_REASON,
    NO_KEY,
    DataKey,
    Entry,
    check_live,
    check_scope,
    locked,
    make_dir,
    open_entry,
    put_entry,
    read_entry,
    remove_temps,
    scope_id,
    sids,
    utc_now,
    wrap,
)

__all__ = [
    "COPIES",
    "KEYS",
    "DataKey",
    "Entry",
    "Kek",
    "check_scope",
    "checkpoint_scopes",
    "copy_to",
    "entries",
    "gc_temps",
    "kek_from_env",
    "obtain",
    "resolve_kek",
    "rotate",
    "scope_id",
    "shred",
    "unwrap",
]


def obtain(store: str, scope: str, kek: Kek) -> DataKey:
    """``scope``'s data key in ``store``'s keyring, created there if it has none (a concurrent
    creator's key wins: both get the same). ScopeShreddedError for a shredded scope: it is
    never keyed again."""
    check_scope(scope)
    sid = scope_id(scope)
    doc = read_entry(store, sid)
    if doc is None:
        new = wrap(scope, os.urandom(16).hex(), os.urandom(32), kek, utc_now())
        with contextlib.suppress(FileExistsError):  # another creator, or a shred, came first
            put_entry(store, new, False, lambda: failpoint("keyring.created"))
        doc = read_entry(store, sid)
        if doc is None:
            raise KeyUnavailableError(f"the key of scope {scope!r} vanished from {store}", scope)
    return open_entry(doc, kek, store, None)


def unwrap(store: str, scope: str, key_id: str, kek: Kek) -> DataKey:
    """The data key ``key_id`` of ``scope`` in ``store``'s keyring, unwrapped under ``kek``.
    KeyUnavailableError if it is missing, another key, under another KEK or damaged;
    ScopeShreddedError if the scope was shredded."""
    check_scope(scope)
    doc = read_entry(store, scope_id(scope))
    if doc is None:
        raise KeyUnavailableError(
            f"no key for scope {scope!r} in the keyring of {store}", scope, key_id
        )
    return open_entry(doc, kek, store, key_id)


def entries(store: str) -> list[Entry]:
    """Every entry of ``store``'s keyring, no keys: live ones, tombstones, and damaged ones
    (``problem`` says why), by scope."""
    out = []
    for sid in sids(store):
        try:
            doc = read_entry(store, sid)
        except (KeyUnavailableError, StoreError) as e:
            out.append(Entry(sid, problem=str(e)))
            continue
        if doc is not None:  # else shredded and removed meanwhile: not a keyring writer's doing
            fields = {k: v for k, v in doc.items() if k not in ("nonce", "wrapped")}
            out.append(Entry(sid, **fields))
    return sorted(out, key=lambda e: (e.scope, e.sid))


def rotate(store: str, old: Kek, new: Kek) -> tuple[int, int]:
    """Re-wrap every live key of ``store`` from ``old`` to ``new`` (fresh nonce, rename over,
    fsync); (re-wrapped, already under ``new``). Data is not touched. Entries already under
    ``new`` are skipped, so a rotation that was stopped is finished by running it again. An
    entry under neither KEK, or damaged, does not stop the others: they are rotated, then a
    KeyUnavailableError names those left (they still need the KEK they are under)."""
    done, already, left = 0, 0, []
    for sid in sids(store):
        with locked(store):  # a shred waits at most one entry; never a key written back
            try:
                doc = read_entry(store, sid)
                if doc is None or "shredded" in doc:
                    continue
                if doc["kek_id"] == new.kek_id:
                    open_entry(doc, new, store, None)  # damage shows here, not at the next load
                    already += 1
                    continue
                key = open_entry(doc, old, store, None)
            except KeyUnavailableError as e:
                left.append(str(e))
                continue
            rewrapped = wrap(key.scope, key.key_id, key.key, new, doc["created"])
            put_entry(store, rewrapped, True, lambda: None)
        done += 1
        try:
            failpoint("keyring.rotate_one")
        except OSError as e:
            raise from_oserror(e, store, f"re-wrapped {done} key(s), then stopped in") from None
    if done:
        detail = {"old_kek_id": old.kek_id, "new_kek_id": new.kek_id, "rewrapped": done}
        for late in audit.note(store, "rotate", detail=detail):
            warn_after_commit(late, stacklevel=2)
    if left:
        raise KeyUnavailableError(
            f"rotated {done} key(s) of {store} to KEK {new.kek_id} ({already} already were), "
            f"but not {len(left)}: " + "; ".join(left)
        )
    return done, already


def checkpoint_scopes(path: str) -> set[str]:
    """The encryption scopes checkpoint ``path`` uses (its manifest's ``encryption.keys``);
    FileNotFoundError if it is gone, CheckpointError if its manifest cannot be trusted."""
    _, doc = read_manifest(path)
    enc = doc.get("encryption")
    if enc is None:
        return set()
    keys = enc.get("keys") if isinstance(enc, dict) else None
    if not isinstance(keys, list) or not all(
        isinstance(k, dict) and isinstance(k.get("scope"), str) for k in keys
    ):
        raise CorruptCheckpointError("the manifest's encryption.keys is malformed", path=path)
    return {k["scope"] for k in keys}


def _refuse_if_held(store: str, scope: str) -> None:
    """CheckpointHeldError if a held checkpoint of ``store`` uses ``scope``, or might: one
    whose manifest cannot be read counts (fail closed)."""
    for name, hold, _ in holds.listing(store):
        why = hold.describe() if hold is not None else "its hold marker cannot be read"
        try:
            uses = scope in checkpoint_scopes(os.path.join(store, name))
        except FileNotFoundError:
            continue  # a stale hold: its checkpoint is gone
        except (OSError, CheckpointError) as e:
            raise CheckpointHeldError(
                f"{name} in {store} is held ({why}) and its manifest cannot be read "
                f"({brief(e)}), so it may use scope {scope!r}: nothing shredded",
                name,
                hold.reason if hold else "",
            ) from None
        if uses:
            raise CheckpointHeldError(
                f"{name} in {store} uses scope {scope!r} and is under a legal hold ({why}): "
                "nothing shredded; release the hold first (`ckptguard release`)",
                name,
                hold.reason if hold else "",
            )


def _copies(store: str) -> list[str]:
    """The stores ``.keys/COPIES`` of ``store`` names (absolute paths, one a line)."""
    where = os.path.join(store, KEYS, COPIES)
    try:
        raw = read_regular(where, max_size=MAX_COPIES_BYTES)
    except FileNotFoundError:
        return []
    except UnsafeFileError as e:
        raise StoreError(f"{where} {e.reason}: its copies are unknown", where) from None
    except OSError as e:
        raise from_oserror(e, where, "cannot read the keyring's copies") from None
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise StoreError(f"{where} is not UTF-8 text: its copies are unknown", where) from None
    if not all(os.path.isabs(p) for p in lines if p):
        raise StoreError(f"{where} holds a path that is not absolute", where)
    return [p for p in lines if p]


def _gather(store: str) -> tuple[list[str], list[tuple[str, str]]]:
    """``store`` and every store its COPIES name, transitively (realpaths, each once): those
    reachable, and those not with why."""
    first = os.path.realpath(store)
    if not os.path.isdir(first):
        raise StoreError(f"{store} is not a directory", store)
    order, seen, unreachable = [first], {first}, []
    for s in order:
        try:
            found = _copies(s)
        except StoreError as e:
            if s == first:
                raise
            order.remove(s)
            unreachable.append((s, str(e)))
            continue
        for p in map(os.path.realpath, found):
            if p not in seen:
                seen.add(p)
                if os.path.isdir(p):
                    order.append(p)
                else:
                    unreachable.append((p, "not a directory or not reachable"))
    return order, unreachable


def shred(store: str, scope: str, reason: str = "") -> list[str]:
    """Destroy ``scope``'s data key in ``store`` and in every store holding a copy of it
    (``.keys/COPIES``, transitively): each gets a tombstone (also where the scope was never
    keyed, so no later save keys it), that scope's temporaries are removed, and the shred is
    audited. Refused everywhere (CheckpointHeldError) if a held checkpoint in any of them
    uses the scope. Returns the stores shredded; a store that could not be reached or written
    is a StoreError naming what is not done, after the others (re-running completes it)."""
    check_scope(scope)
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise ValueError(f"a shred's reason is text of at most {MAX_REASON} characters")
    stores, failed = _gather(store)
    for s in stores:
        _refuse_if_held(s, scope)
    _shred_one(stores[0], scope, reason)
    try:
        failpoint("keyring.copies")
    except OSError as e:
        rest = ", ".join(stores[1:] + [p for p, _ in failed]) or "none"
        what = f"the copies ({rest}) are not shredded, after shredding {scope!r} in"
        raise from_oserror(e, stores[0], what) from None
    for s in stores[1:]:
        try:
            _shred_one(s, scope, reason)
        except (OSError, CheckpointError) as e:
            failed.append((s, brief(e)))
    done = [s for s in stores if s not in {p for p, _ in failed}]
    if failed:
        raise StoreError(
            f"scope {scope!r} is shredded in {', '.join(done)} but not yet in "
            + "; ".join(f"{p} ({why})" for p, why in failed)
            + ": run the shred again once they can be reached",
            failed[0][0],
        )
    return done


def _shred_one(store: str, scope: str, reason: str) -> None:
    sid = scope_id(scope)
    with locked(store):
        try:
            doc = read_entry(store, sid)
        except KeyUnavailableError:  # damaged: what is there may still hold the key
            doc = None
        key_id = doc["key_id"] if doc is not None else NO_KEY
        if doc is None or "shredded" not in doc:
            try:
                user = getpass.getuser()
            except (KeyError, OSError):
                user = str(os.getuid())
            dead = {
                "scope": scope,
                "key_id": key_id,
                "shredded": utc_now(),
                "reason": reason,
                "user": user[:256],
                "host": socket.gethostname()[:256],
            }
            put_entry(store, dead, True, lambda: failpoint("keyring.tombstone"))
        remove_temps(store, lambda n: n.startswith(f".{sid}."), 0.0)
    for late in audit.note(store, "shred", detail={"scope": scope, "key_id": key_id}):
        warn_after_commit(late, stacklevel=3)


def gc_temps(store: str, older_than: float) -> list[str]:
    """Remove the keyring's temporaries (``.keys/.*`` but its lock) older than ``older_than``
    seconds: those a killed writer left (they may hold wrapped keys). Entries are never
    touched. The paths removed."""
    try:
        return remove_temps(store, lambda n: True, older_than)
    except OSError as e:
        raise from_oserror(e, os.path.join(store, KEYS), "cannot remove a temporary of") from None


def copy_to(src_store: str, dst_store: str, scopes: Mapping[str, str]) -> None:
    """Copy the entries of ``scopes`` (scope -> key_id) from ``src_store``'s keyring into
    ``dst_store``'s, for a drain. Each store is first recorded in the other's COPIES, so that
    a shred in either reaches both. A shred of the key in either store wins: a key shredded in
    the source leaves a tombstone in the destination (the drained copy's chunks of that scope
    are as unreadable as the source's), one shredded in the destination is shredded in the
    source too, and neither raises. A scope that the destination shredded under another key
    (or never keyed) is a ScopeShreddedError: a shredded scope is never keyed again there; a
    different live key for it in the destination a KeyUnavailableError (a conflict)."""
    for scope in scopes:
        check_scope(scope)
    src, dst = os.path.realpath(src_store), os.path.realpath(dst_store)
    if scopes and src != dst:
        _add_copy(src, dst)
        _add_copy(dst, src)
    for scope, key_id in scopes.items():
        _copy_one(src, dst, scope, key_id)


def _copy_one(src: str, dst: str, scope: str, key_id: str) -> None:
    sid = scope_id(scope)
    doc = read_entry(src, sid)
    if doc is None:
        raise KeyUnavailableError(f"no key for scope {scope!r} in the keyring of {src}", scope)
    if doc["key_id"] != key_id:
        check_live(doc, src, key_id)  # another key than the checkpoint's: a conflict
    there = read_entry(dst, sid)
    if "shredded" in doc:
        if there is None or "shredded" not in there:
            _shred_one(dst, scope, doc["reason"])
        return
    if there is None:
        with contextlib.suppress(FileExistsError):
            put_entry(dst, doc, False, lambda: None)
        there = read_entry(dst, sid)
    if there is not None and "shredded" in there and there["key_id"] == key_id:
        _shred_one(src, scope, there["reason"])  # the shred had not reached the source
        return
    if there is None or "shredded" in there:
        raise ScopeShreddedError(
            f"scope {scope!r} was shredded in {dst}: it is not keyed there again", scope, key_id
        )
    if there["key_id"] != key_id:
        raise KeyUnavailableError(
            f"the keyring of {dst} holds another key ({there['key_id']}) for scope "
            f"{scope!r} than {src} ({key_id}): the two stores' keys conflict",
            scope,
            key_id,
        )
    again = read_entry(src, sid)
    if again is None or "shredded" in again:  # shredded while being copied: finish it
        _shred_one(dst, scope, again["reason"] if again else "")


def _add_copy(store: str, other: str) -> None:
    """Record ``other`` in ``store``'s ``.keys/COPIES`` (appended, fsynced; once)."""
    if "\n" in other:
        raise StoreError(f"a store path holds a newline: {other!r}", other)
    if other in _copies(store):
        return
    d = make_dir(store)
    where = os.path.join(d, COPIES)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(where, flags, 0o600)
        try:
            os.write(fd, other.encode("utf-8") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(d)
    except OSError as e:
        raise from_oserror(e, where, "cannot record a copy in") from None
