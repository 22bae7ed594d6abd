"""A store: a directory of committed checkpoints, LATEST, and the staging area."""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import errno
import os
import stat
import time
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import audit, failmarks, holds, keyring
from .commit import (
    INTENT_SUFFIX,
    OLD_SUFFIX,
    clear_intent,
    is_latest_tmp,
    manifest_sha256,
    read_info,
    staging_area,
    write_latest,
)
from .errors import (
    CheckpointError,
    CheckpointHeldError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    RetentionPolicyError,
    brief,
    from_oserror,
    warn_after_commit,
)
from .failpoints import failpoint
from .format.layout import (
    LATEST,
    MANIFEST,
    MAX_LATEST_BYTES,
    REDUNDANCY,
    STAGING,
    check_name,
    is_name,
    is_uuid,
)
from .format.manifest import CheckpointInfo
from .fsutil import UnsafeFileError, fsync_dir, read_regular
from .readonly import remove_tree, seal_dir, unseal
from .retention import POLICY_FILE, Decision, Policy, as_policy, plan, read_policy

__all__ = ["Skipped", "Store", "StoreScan", "note_read"]


def prune_after_commit(store: str, policy: Policy | Mapping[str, Any]) -> None:
    """``Store(store).prune(policy)`` after a commit (the ``keep`` option): what fails is a
    ``CheckpointWarning``; the commit stands."""
    try:
        _, failed = Store(store).prune(as_policy(policy))
    except (OSError, CheckpointError) as e:
        warn_after_commit(f"pruning {store} after the commit failed: {brief(e)}", stacklevel=3)
        return
    for name, err in failed:
        warn_after_commit(f"pruning {store}: {name} was not removed: {brief(err)}", stacklevel=3)


@dataclass(frozen=True)
class Skipped:
    """An entry of a store that looks like a checkpoint but is not listed, and why."""

    name: str
    path: str
    reason: str
    link: bool = False  # a symbolic link: never followed, so not a checkpoint to verify


@dataclass
class StoreScan:
    """What ``Store.scan`` found: the committed checkpoints (as ``Store.list``) and the
    entries with a checkpoint's name that were skipped as damaged, unreadable or links."""

    listed: list[CheckpointInfo] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


class Store:
    """A directory of checkpoints. Lists only committed ones (I1); never edits them (I2)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.path.abspath(os.fspath(root))

    def path(self, name: str) -> str:
        return os.path.join(self.root, check_name(name))

    def list(self) -> builtins.list[CheckpointInfo]:
        """Committed checkpoints with a valid manifest, oldest first (by commit time)."""
        return self.scan().listed

    def scan(self) -> StoreScan:
        """``list``'s checkpoints, and the entries it skipped with the reason: directories
        with a manifest that is damaged or cannot be read, and links to directories. A
        directory without a manifest is not a checkpoint and not reported."""
        out = StoreScan()
        for name in self._entries():
            p = os.path.join(self.root, name)
            if not is_name(name):
                if (
                    not name.startswith(".")
                    and _real_dir(p)
                    and os.path.lexists(os.path.join(p, MANIFEST))
                ):
                    out.skipped.append(Skipped(name, p, "not a valid checkpoint name"))
                continue
            if os.path.islink(p):
                if os.path.isdir(p):
                    out.skipped.append(
                        Skipped(name, p, "a symbolic link: never a checkpoint of the store", True)
                    )
                continue
            if not os.path.isdir(p):
                continue
            try:
                out.listed.append(read_info(p))
            except CheckpointNotFoundError:
                continue  # not committed
            except CheckpointError as e:  # damaged or unreadable: never listed, but named
                out.skipped.append(Skipped(name, p, str(e)))
        out.listed.sort(key=lambda i: (i.created, i.name))
        return out

    def _entries(self) -> builtins.list[str]:
        """The store directory's names, sorted; typed errors for a missing or unusable store."""
        try:
            return sorted(os.listdir(self.root))
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"store {self.root} does not exist") from None
        except NotADirectoryError:
            raise CheckpointNotFoundError(f"store {self.root} is not a directory") from None
        except OSError as e:
            raise from_oserror(e, self.root, "cannot list the store") from None

    def latest_name(self) -> str | None:
        """The name LATEST holds; None when there is none, also when the store directory does
        not exist yet (a job's first run: nothing to resume from)."""
        where = os.path.join(self.root, LATEST)
        try:
            raw = read_regular(where, max_size=MAX_LATEST_BYTES)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            raise CheckpointNotFoundError(f"store {self.root} is not a directory") from None
        except UnsafeFileError as e:  # a link, FIFO, device or oversized file is never read
            raise CorruptCheckpointError(
                f"LATEST {e.reason}", path=self.root, file=LATEST
            ) from None
        except OSError as e:
            raise from_oserror(e, where, "cannot read") from None
        name = raw.decode("utf-8", "replace").removesuffix("\n")
        if not raw.endswith(b"\n") or not is_name(name):
            raise CorruptCheckpointError("LATEST is damaged", path=self.root, file=LATEST)
        return name

    def latest(self) -> CheckpointInfo | None:
        """The checkpoint LATEST names, or None if the store has none."""
        name = self.latest_name()
        if name is None:
            return None
        if os.path.islink(os.path.join(self.root, name)):  # Store.list never follows one either
            raise CorruptCheckpointError(
                f"LATEST names {name!r}, a symbolic link: not a checkpoint of this store",
                path=self.root,
                file=LATEST,
            )
        try:
            return read_info(os.path.join(self.root, name))
        except CheckpointNotFoundError:
            hint = ""
            with contextlib.suppress(OSError):
                if any(
                    n.startswith(name + ".") and n.endswith(INTENT_SUFFIX)
                    for n in os.listdir(os.path.join(self.root, STAGING))
                ):
                    hint = " (an overwrite of it was interrupted: `ckptguard gc` completes it)"
            raise CorruptCheckpointError(
                f"LATEST names {name!r}, which is not a committed checkpoint{hint}",
                path=self.root,
                file=LATEST,
            ) from None

    def delete(self, name: str, *, prune: bool = False) -> None:
        """Remove a checkpoint; LATEST moves to the newest remaining one first (I3).

        The rename out of the store is the commit point: an error before it leaves the
        checkpoint, and LATEST, as they were; a failure after it is a ``CheckpointWarning`` (the
        checkpoint is gone; its files wait in ``.staging/`` for ``gc``). A store with an audit
        log records a ``delete`` entry (``prune``: a ``prune`` entry, for a retention rule's
        removal) after the commit point; a failure there is a ``CheckpointWarning`` too.
        """
        path = self.path(name)
        info = read_info(path)  # raises CheckpointNotFoundError if not a committed checkpoint
        holds.check(self.root, name)
        digest = _digest_if_audited(self.root, path)
        moved = False
        try:
            failpoint("delete.start")
            if self.latest_name() == name:
                rest = [i for i in self.list() if i.name != name]
                write_latest(self.root, rest[-1].name if rest else None)
                moved = True
                failpoint("delete.after_latest")
            trash = os.path.join(staging_area(self.root), f"{name}.{uuidlib.uuid4().hex}.deleted")
            unseal(path)  # moved into .staging: its owner must be able to write it (its "..")
            os.rename(path, trash)
        except OSError as e:
            with contextlib.suppress(OSError):
                seal_dir(path)
            if e.errno == errno.ENOENT and not os.path.lexists(path):  # deleted meanwhile
                raise CheckpointNotFoundError(f"{path} was deleted meanwhile") from None
            if moved:  # put LATEST back: the checkpoint is still there
                with contextlib.suppress(OSError):
                    write_latest(self.root, name)
            raise from_oserror(e, path, "cannot delete") from None
        holds.undo_if_held(self.root, name, lambda: self._undelete(name, trash, moved), "deleted")
        for late in audit.note(
            self.root,
            "prune" if prune else "delete",
            checkpoint=name,
            uuid=info.uuid,
            manifest_sha256=digest,
        ):
            warn_after_commit(late, stacklevel=2)
        with contextlib.suppress(OSError):  # its validation marker is stale now: readers skip it
            failmarks.remove(self.root, name, info.uuid)
        try:
            failpoint("delete.after_rename")
            fsync_dir(self.root)
        except OSError as e:  # not durable: keep the files, so a crash cannot bring back a husk
            warn_after_commit(
                f"{path} is deleted, but fsync of {self.root} failed ({brief(e)}); its files "
                f"remain at {trash} for gc",
                stacklevel=2,
            )
            return
        try:
            remove_tree(trash)
            failpoint("delete.after_remove")
        except OSError as e:
            warn_after_commit(
                f"{path} is deleted, but removing its files failed ({brief(e)}); "
                f"gc removes {trash}",
                stacklevel=2,
            )

    def _undelete(self, name: str, trash: str, latest: bool) -> None:
        """Put a checkpoint that ``delete`` moved to ``trash`` back (a hold appeared), and
        LATEST where it was (``latest``: it named the checkpoint)."""
        path = self.path(name)
        try:
            os.rename(trash, path)
            fsync_dir(self.root)
            if latest:
                write_latest(self.root, name)
            seal_dir(path)
        except OSError as e:
            raise from_oserror(e, trash, f"{name} was held meanwhile, but cannot restore") from None

    def hold(self, name: str, reason: str = "", *, immutable: bool = False) -> holds.Hold:
        """Place a legal hold on checkpoint ``name`` (``holds``): until ``release``, delete,
        prune and overwrite leave it alone, also ones already under way (each checks again
        after its commit point and undoes itself). CheckpointNotFoundError (and no hold) for a
        checkpoint that is not there or is removed meanwhile; CheckpointHeldError if already
        held. ``immutable``: the directory and its own files also get the immutable attribute
        (docs/operations.md); where that fails, a CheckpointWarning. Audited as ``hold``."""
        path = self.path(name)
        hold = holds.place(
            self.root, name, reason, lambda: read_info(path).uuid, path if immutable else None
        )
        self._note("hold", name, path, hold.uuid, {"reason": reason, "immutable": immutable})
        return hold

    def release(self, name: str) -> holds.Hold | None:
        """Release the hold on ``name`` (also a stale one, on a checkpoint gone or replaced,
        or one whose marker cannot be read: None then); audited as ``release``.
        CheckpointNotFoundError if it is not held."""
        hold = holds.release(self.root, name, self.path(name))
        self._note("release", name, self.path(name), hold.uuid if hold else None, {})
        return hold

    def holds(self) -> builtins.list[tuple[str, holds.Hold | None, str]]:
        """The store's holds, by name: (name, the hold or None, why its marker is unreadable)."""
        return holds.listing(self.root)

    def _note(self, op: str, name: str, path: str, uuid: str | None, detail: dict) -> None:
        digest = _digest_if_audited(self.root, path) if os.path.isdir(path) else None
        for late in audit.note(
            self.root, op, checkpoint=name, uuid=uuid, manifest_sha256=digest, detail=detail
        ):
            warn_after_commit(late, stacklevel=3)

    def prune(
        self,
        policy: Policy | Mapping[str, Any] | None = None,
        now: dt.datetime | None = None,
        dry_run: bool = False,
    ) -> tuple[builtins.list[Decision], builtins.list[tuple[str, CheckpointError]]]:
        """Delete every checkpoint that ``policy`` does not keep (default: the store's own
        policy file, ``retention.POLICY_FILE``; a dict of rules is a ``Policy``), oldest first,
        each as ``delete(prune=True)``; (the plan, newest first, and the removals that failed
        with their errors; one removed meanwhile by another process is not a failure).
        ``dry_run``: the plan only. No policy, or one without rules, is a
        RetentionPolicyError: nothing would say what to keep."""
        policy = as_policy(policy) if policy is not None else read_policy(self.root)
        if policy is None or policy.empty:
            raise RetentionPolicyError(
                f"no retention rule for {self.root}: give one, or write {POLICY_FILE} in it"
            )
        held = {n for n, _, _ in holds.listing(self.root)}
        decisions = [
            Decision(d.info, True, (*d.reasons, "hold")) if d.info.name in held else d
            for d in plan(self.list(), policy, now, self.latest_name())
        ]
        failed: builtins.list[tuple[str, CheckpointError]] = []
        for d in reversed(decisions) if not dry_run else ():
            if not d.keep:
                try:
                    self.delete(d.info.name, prune=True)
                except CheckpointNotFoundError:
                    continue  # removed meanwhile (another prune): what the plan wanted
                except CheckpointHeldError:
                    continue  # held meanwhile: kept, as a hold asks
                except CheckpointError as e:
                    failed.append((d.info.name, e))
        return decisions, failed

    def gc(self, older_than: float | dt.timedelta = 3600.0) -> builtins.list[str]:
        """Remove staging leftovers, keyring temporaries and the protection records of deleted
        checkpoints untouched for ``older_than``; never a committed checkpoint or a keyring
        entry.

        First completes an overwrite that a crash interrupted (``_finish_overwrites``)."""
        if isinstance(older_than, dt.timedelta):
            older_than = older_than.total_seconds()
        cutoff = time.time() - older_than
        removed = []
        staging = os.path.join(self.root, STAGING)
        top = self._entries()
        keep = self._finish_overwrites(min(older_than, 60.0))
        try:
            victims = [os.path.join(staging, n) for n in sorted(os.listdir(staging))]
        except FileNotFoundError:
            victims = []
        except OSError as e:
            raise from_oserror(e, staging, "cannot list") from None
        victims += [os.path.join(self.root, n) for n in top if is_latest_tmp(n)]
        victims += self._orphan_records()
        held = holds.held_uuids(self.root) if victims else set()
        for p in victims:
            if held and os.path.isdir(p) and holds.tree_uuid(p) in held:
                continue  # a held checkpoint that a delete or overwrite could not put back
            if p not in keep and _newest_mtime(p) <= cutoff:
                try:
                    failpoint("gc.before_remove")
                    if os.path.isdir(p) and not os.path.islink(p):
                        remove_tree(p)
                    else:
                        os.unlink(p)
                    failpoint("gc.after_remove")
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise from_oserror(e, p, "cannot remove") from None
                removed.append(p)
        removed += keyring.gc_temps(self.root, older_than)
        if removed:
            names = [os.path.relpath(p, self.root) for p in removed]
            detail = {
                "count": len(names),
                "removed": names[:_MAX_NAMED],
                "older_than_s": int(older_than),
            }
            for late in audit.note(self.root, "gc", detail=detail):
                warn_after_commit(late, stacklevel=2)
        return removed

    def _orphan_records(self) -> builtins.list[str]:
        """A node-local store's protection records (format.md section 12) whose checkpoint is
        gone or now another (its uuid), and records a protection left half-built (``.tmp-``)."""
        root = os.path.join(self.root, REDUNDANCY)
        try:
            names = sorted(os.listdir(root))
        except OSError:
            return []
        live = {(i.name, i.uuid) for i in self.list()} if names else set()
        out = []
        for n in names:
            name, _, uid = n.rpartition(".")
            if n.startswith(".") or (name, uid) not in live:
                out.append(os.path.join(root, n))
        return out

    def _finish_overwrites(self, settle: float) -> set[str]:
        """Resolve each intent record of the overwrite without renameat2 (format.md section 2).

        ``.staging/<name>.<uuid>.overwrite`` is written before the overwrite's first rename
        (``<name>`` to ``.staging/<name>.<uuid>.old``) and removed once its second (the new
        ``.staging/<name>.<uuid>`` to ``<name>``) is durable. Where ``<name>`` is absent and both
        the new and the old are still in ``.staging``, the save stopped between its renames: the
        new one goes into place if whole, else the old one back. Otherwise the second rename
        happened (and the name may have been deleted since) or the first never did: the old one
        is garbage, never put back. Each resolved record is removed. Records younger than
        ``settle`` seconds are left to a save that may still be at it; they, their new and their
        old are returned (gc must not remove them)."""
        staging = os.path.join(self.root, STAGING)
        keep: set[str] = set()
        try:
            names = os.listdir(staging)
        except OSError:
            return keep  # nothing to finish; gc reports an unreadable .staging itself
        for n in sorted(names):
            intent = os.path.join(staging, n)
            new = intent[: -len(INTENT_SUFFIX)]
            name, _, uid = os.path.basename(new).rpartition(".")
            if not n.endswith(INTENT_SUFFIX) or not is_name(name) or not is_uuid(uid):
                continue  # not an intent record: gc removes it as any other leftover
            old, final = new + OLD_SUFFIX, os.path.join(self.root, name)
            try:
                st = os.lstat(intent)
                if not stat.S_ISREG(st.st_mode):
                    continue  # not one the overwrite wrote: gc removes it as a leftover
                if time.time() - st.st_mtime < settle:
                    keep.update((intent, new, old))
                    continue
                if not os.path.lexists(final) and _real_dir(new) and _real_dir(old):
                    os.rename(new if _whole(new) else old, final)
                fsync_dir(self.root)  # <name> durable before the record that explains it goes
                clear_intent(new)
            except OSError as e:
                raise from_oserror(e, final, "cannot finish the interrupted overwrite of") from None
        return keep


def note_read(path: str, op: str, detail: dict) -> None:
    """Record a read of checkpoint directory ``path`` (``op``: verify, restore, load) in its
    store's audit log, if the store keeps one; a failure is a CheckpointWarning (the read's
    outcome stands). A one-file checkpoint belongs to no store: nothing is recorded."""
    store, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(path) or not audit.enabled(store):
        return
    uuid = None
    with contextlib.suppress(OSError, CheckpointError):
        uuid = read_info(path).uuid
    digest = _digest_if_audited(store, path)
    for late in audit.note(
        store, op, checkpoint=name, uuid=uuid, manifest_sha256=digest, detail=detail
    ):
        warn_after_commit(late, stacklevel=3)


_MAX_NAMED = 100  # removed entries a gc entry of the audit log names (all are counted)


def _digest_if_audited(store: str, path: str) -> str | None:
    """SHA-256 of ``path``'s MANIFEST.json where ``store`` keeps an audit log (None if not, or
    if it cannot be read: the entry is still written, without it)."""
    if not audit.enabled(store):
        return None
    with contextlib.suppress(OSError, CheckpointError):
        return manifest_sha256(path)
    return None


def _real_dir(path: str) -> bool:
    """A directory, not a link to one."""
    return not os.path.islink(path) and os.path.isdir(path)


def _whole(path: str) -> bool:
    try:
        read_info(path)
        return True
    except CheckpointError:
        return False


def _newest_mtime(path: str) -> float:
    """Newest mtime in a tree, so a long save that still writes is never collected."""
    try:
        newest = os.lstat(path).st_mtime
    except FileNotFoundError:
        return float("inf")
    if os.path.isdir(path) and not os.path.islink(path):
        for dirpath, dirnames, filenames in os.walk(path):
            for n in dirnames + filenames:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.lstat(os.path.join(dirpath, n)).st_mtime)
    return newest
