"""A store: a directory of committed checkpoints, LATEST, and the staging area."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
import uuid as uuidlib

from .commit import remove_tree, write_latest
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, from_oserror
from .failpoints import failpoint
from .format import manifest
from .format.datafile import FormatError
from .format.layout import LATEST, MANIFEST, MAX_LATEST_BYTES, STAGING, check_name, is_name
from .format.manifest import CheckpointInfo
from .fsutil import fsync_dir


def read_info(path: str) -> CheckpointInfo:
    """The CheckpointInfo of a checkpoint directory, from its manifest (checked, not its data)."""
    try:
        fd = os.open(os.path.join(path, MANIFEST), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no committed checkpoint at {path}") from None
    except OSError as e:
        raise CorruptCheckpointError(
            f"MANIFEST.json cannot be opened: {e.strerror}", path=path, file=MANIFEST
        ) from None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(manifest.MAX_MANIFEST_BYTES + 1)
    try:
        return CheckpointInfo.from_manifest(manifest.decode(raw), path)
    except FormatError as e:
        raise CorruptCheckpointError(str(e), path=path, file=MANIFEST) from None


class Store:
    """A directory of checkpoints. Lists only committed ones (I1); never edits them (I2)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.path.abspath(os.fspath(root))

    def path(self, name: str) -> str:
        return os.path.join(self.root, check_name(name))

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints with a valid manifest, oldest first (by commit time)."""
        try:
            entries = sorted(os.listdir(self.root))
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"store {self.root} does not exist") from None
        out = []
        for name in entries:
            p = os.path.join(self.root, name)
            if not is_name(name) or os.path.islink(p) or not os.path.isdir(p):
                continue
            try:
                out.append(read_info(p))
            except CheckpointError:
                continue  # not committed, or damaged: never listed (verify reports damage)
        return sorted(out, key=lambda i: (i.created, i.name))

    def latest_name(self) -> str | None:
        """The name LATEST holds, or None when there is no LATEST."""
        try:
            fd = os.open(
                os.path.join(self.root, LATEST), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except FileNotFoundError:
            return None
        except OSError as e:  # ELOOP: a link where LATEST must be a file
            raise CorruptCheckpointError(
                f"LATEST cannot be opened safely: {e.strerror}", path=self.root, file=LATEST
            ) from None
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_LATEST_BYTES + 1)
        name = raw.decode("utf-8", "replace").removesuffix("\n")
        if len(raw) > MAX_LATEST_BYTES or not raw.endswith(b"\n") or not is_name(name):
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
            raise CorruptCheckpointError(
                f"LATEST names {name!r}, which is not a committed checkpoint",
                path=self.root,
                file=LATEST,
            ) from None

    def delete(self, name: str) -> None:
        """Remove a checkpoint; LATEST moves to the newest remaining one first (I3)."""
        path = self.path(name)
        read_info(path)  # raises CheckpointNotFoundError if it is not a committed checkpoint
        try:
            failpoint("delete.start")
            if self.latest_name() == name:
                rest = [i for i in self.list() if i.name != name]
                write_latest(self.root, rest[-1].name if rest else None)
                failpoint("delete.after_latest")
            trash = os.path.join(self.root, STAGING, f"{name}.{uuidlib.uuid4().hex}.deleted")
            os.makedirs(os.path.dirname(trash), exist_ok=True)
            os.rename(path, trash)
            failpoint("delete.after_rename")
            fsync_dir(self.root)
            remove_tree(trash)
            failpoint("delete.after_remove")
        except OSError as e:
            raise from_oserror(e, path, "cannot delete") from None

    def gc(self, older_than: float | dt.timedelta = 3600.0) -> list[str]:
        """Remove staging leftovers untouched for ``older_than``; never a committed checkpoint."""
        if isinstance(older_than, dt.timedelta):
            older_than = older_than.total_seconds()
        cutoff = time.time() - older_than
        removed = []
        staging = os.path.join(self.root, STAGING)
        try:
            victims = [os.path.join(staging, n) for n in sorted(os.listdir(staging))]
        except FileNotFoundError:
            victims = []
        victims += [
            os.path.join(self.root, n)
            for n in sorted(os.listdir(self.root))
            if n.startswith(".LATEST.") and n.endswith(".tmp")
        ]
        for p in victims:
            if _newest_mtime(p) <= cutoff:
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
        return removed


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
