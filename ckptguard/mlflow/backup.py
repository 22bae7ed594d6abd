"""``ckptguard mlflow backup``: a tracking server's database and artifacts as one checkpoint.

The steps, in order: a point-in-time copy of the backend store (``snapshot.take_snapshot``,
into a private temporary directory); the live consistency check of that snapshot's references
(``check.check_consistency``); every regular file under each reference that answers for its
path (a run's, a model version's or a logged model's directory), read after the snapshot, so
the copy holds at least what the snapshot references; then one ``ckptguard.save`` of all of it:
atomic (the backup is whole or absent, the previous one untouched), every byte hashed,
compressed where it pays, incremental against the store's newest backup, signed and audited as
the store and the options say. The checkpoint's tree is ``BackupTree`` (below); its metadata
``mlflow_backup`` holds the summary that ``ckptguard ls``/``info`` show.

Files are read whole into memory (``max_memory`` bounds the total); links, FIFOs, devices and
sockets under an artifact directory are never followed or opened, only listed as skipped. A
file that vanishes between the listing and its read (``mlflow gc`` removing a deleted run's
artifacts) is listed too, and its reference counted as dangling: the backup still commits,
and its consistency says what it lacks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    ArtifactReferenceError,
    CheckpointExistsError,
    MlflowBackupError,
    from_oserror,
)
from ..failpoints import failpoint
from ..fsutil import UnsafeFileError, open_regular
from ..io import pread_exact
from ..temps import remove_stale_temps, temp_name
from .check import Dangling, Report, check_consistency
from .refs import Ref, Resolver, Roots
from .snapshot import Snapshot, take_snapshot

LAYOUT = 1
SCRATCH = "mlflow-backup"
"""What the backup's scratch directory is a temporary of (``temps.temp_name``)."""
"""The version of the backup's tree layout (``mlflow_backup`` in the tree and metadata)."""


def default_max_memory() -> int:
    """Half of this machine's physical memory: the default bound on a backup's bytes."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (OSError, ValueError):
        return 8 << 30


@dataclass
class Collected:
    """The files a backup copies: ``files[root][relpath]`` their bytes; ``skipped`` the paths
    that are not regular files (with why); ``vanished`` those gone before their read."""

    files: list[dict[str, bytes]]
    skipped: dict[str, str] = field(default_factory=dict)
    vanished: list[str] = field(default_factory=list)
    nbytes: int = 0


@dataclass(frozen=True)
class BackupResult:
    """What ``backup`` committed: the checkpoint, the snapshot, the consistency of the backup
    (references against the files it holds), the files and bytes copied, what was skipped."""

    info: Any  # ckptguard.CheckpointInfo
    snapshot: Snapshot
    report: Report
    files: int
    artifact_bytes: int
    skipped: dict[str, str]
    vanished: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": self.info.path,
            "name": self.info.name,
            "kind": self.snapshot.kind,
            "backend_uri": self.snapshot.backend_uri,
            "alembic_revision": self.snapshot.alembic_revision,
            "mlflow_version": self.snapshot.mlflow_version,
            "taken_at": self.snapshot.taken_at,
            "files": self.files,
            "artifact_bytes": self.artifact_bytes,
            "skipped": self.skipped,
            "vanished": list(self.vanished),
            "consistency": self.report.to_json(),
        }


def backup(
    backend_uri: str,
    store: str,
    roots: Roots,
    *,
    name: str | None = None,
    max_memory: int | None = None,
    timeout: float = 3600.0,
    scratch: str | None = None,
    **save_options: Any,
) -> BackupResult:
    """Back up the tracking server whose backend store is ``backend_uri`` and whose artifacts
    lie under ``roots`` as checkpoint ``<store>/<name>`` (default ``mlflow-<UTC time>``).
    ``save_options`` go to ``ckptguard.save`` (``sign_key``, ``digests``, ``keep``,
    ``encrypt``...); ``base`` defaults to "auto" (chunks the newest backup holds are linked).
    ``scratch``: the directory in which the database copy is made before it is saved (TMPDIR
    by default), in a temporary directory of this process that the next backup removes if
    this one was killed."""
    import ckptguard

    from ..format.layout import check_name

    name = check_name(name or default_name())
    target = os.path.join(store, name)
    if os.path.lexists(target) and not save_options.get("overwrite"):  # before the work
        raise CheckpointExistsError(f"{target} exists (pass overwrite=True to replace it)")
    limit = default_max_memory() if max_memory is None else max_memory
    parent = scratch or tempfile.gettempdir()
    try:
        remove_stale_temps(parent, SCRATCH, dirs=True)
        tmp = os.path.join(parent, temp_name(SCRATCH))
        os.mkdir(tmp, 0o700)  # the database copy: readable by this user only
    except OSError as e:
        raise from_oserror(e, parent, "cannot make the backup's scratch directory in") from None
    try:
        snap = take_snapshot(backend_uri, tmp, timeout=timeout)
        live = check_consistency(snap.references, roots)
        try:
            failpoint("mlflow.snapshot_taken")
            database = _read_database(os.path.join(tmp, snap.database), limit)
            collected = collect(snap.references, roots, limit - len(database))
            failpoint("mlflow.artifacts_read")
        except OSError as e:
            raise from_oserror(e, tmp, "cannot read the backup's files in") from None
        report = backup_report(snap.references, roots, live, collected.vanished)
        tree = backup_tree(snap, roots, database, collected, report)
        meta = {"mlflow_backup": summary(snap, collected, report)}
        options = {"base": "auto", **save_options}
        info = ckptguard.save(tree, target, metadata=meta, **options)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sum(len(f) for f in collected.files)
    return BackupResult(
        info, snap, report, files, collected.nbytes, collected.skipped, tuple(collected.vanished)
    )


def default_name() -> str:
    """``mlflow-YYYYmmddTHHMMSS.ffffffZ``: sortable, and unique at one backup per microsecond."""
    return "mlflow-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def _read_database(path: str, limit: int) -> bytes:
    try:
        return _read(path, None, limit)
    except UnsafeFileError as e:
        raise MlflowBackupError(f"the database copy {path} {e.reason}") from None


def covered_paths(refs: tuple[Ref, ...], roots: Roots) -> list[tuple[int, str]]:
    """(root index, absolute path) of each reference that answers for everything under its
    path, each path once; references that do not resolve are left to the consistency check."""
    resolver = Resolver(refs, roots)
    all_roots = roots.all()
    out: dict[str, int] = {}
    for ref in refs:
        if not ref.covers:
            continue
        try:
            path = resolver.resolve(ref.uri)
        except ArtifactReferenceError:
            continue
        for i, root in enumerate(all_roots):
            if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
                out.setdefault(path, i)
                break
    # a path inside another covered path is read with it
    paths = sorted(out)
    kept = [p for j, p in enumerate(paths) if not _under_any(p, paths[:j])]
    return [(out[p], p) for p in kept]


def _under_any(path: str, parents: list[str]) -> bool:
    return any(path.startswith(p.rstrip(os.sep) + os.sep) for p in parents)


def collect(refs: tuple[Ref, ...], roots: Roots, limit: int) -> Collected:
    """Read every regular file under the covered paths of ``refs`` (``limit``: the most bytes
    in all; MlflowBackupError beyond it, before the first byte past it is read)."""
    all_roots = roots.all()
    out = Collected(files=[{} for _ in all_roots])
    for i, top in covered_paths(refs, roots):
        for path, read in _files_under(top, out):
            data = read(limit - out.nbytes)
            if data is None:  # vanished or not a regular file: listed in ``out``
                continue
            out.files[i][os.path.relpath(path, all_roots[i])] = data
            out.nbytes += len(data)
    return out


def _files_under(top: str, out: Collected) -> Iterator[tuple[str, Any]]:
    """(path, read) for each regular file under ``top`` (itself, if a file); ``read(room)``
    gives its bytes, or None if it vanished. Directories are opened one level at a time and
    never through a link (``os.fwalk``), so a link swapped in mid-walk is not followed."""
    try:
        st = os.lstat(top)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode):
        parent, base = os.path.split(top)
        yield top, lambda room: _read_or_none(base, parent, None, room, out, top)
        return
    if not stat.S_ISDIR(st.st_mode):
        out.skipped[top] = _kind(st.st_mode)
        return
    for dirpath, dirnames, filenames, dirfd in os.fwalk(top, follow_symlinks=False):
        for d in dirnames:  # fwalk lists links to directories among the directories
            p = os.path.join(dirpath, d)
            if os.path.islink(p):
                out.skipped[p] = "a symbolic link"
        for f in sorted(filenames):
            p = os.path.join(dirpath, f)
            yield p, lambda room, f=f, fd=dirfd, p=p: _read_or_none(f, None, fd, room, out, p)


def _read_or_none(
    name: str, parent: str | None, dir_fd: int | None, room: int, out: Collected, path: str
) -> bytes | None:
    try:
        return _read(name if parent is None else os.path.join(parent, name), dir_fd, room, path)
    except FileNotFoundError:
        out.vanished.append(path)
    except UnsafeFileError as e:  # a link, FIFO, socket or device: never opened for reading
        out.skipped[path] = e.reason
    except OSError as e:
        raise MlflowBackupError(f"artifact {path} cannot be read: {e.strerror}") from None
    return None


def _read(name: str, dir_fd: int | None, room: int, shown: str | None = None) -> bytes:
    """A regular file's bytes, whole; MlflowBackupError (naming it as ``shown``) if it has
    more than ``room``."""
    fd, st = open_regular(name, dir_fd=dir_fd)
    shown = shown or name
    try:
        if st.st_size > room:
            raise MlflowBackupError(
                f"{shown}: the backup would hold more than max_memory allows ({st.st_size} "
                f"more bytes, {room} left); raise --max-memory"
            )
        data = pread_exact(fd, st.st_size, 0)
        if len(data) != st.st_size or pread_exact(fd, 1, st.st_size):
            raise MlflowBackupError(f"{shown} changed size while it was read; run it again")
        return data
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device or other special file"


def backup_report(refs: tuple[Ref, ...], roots: Roots, live: Report, vanished: list[str]) -> Report:
    """The backup's consistency: the live check's, with each consistent reference some of
    whose files vanished before they were read moved to the dangling ones."""
    if not vanished:
        return live
    report = dataclasses.replace(live, dangling=list(live.dangling))
    dangling = {d.ref for d in live.dangling}
    resolver = Resolver(refs, roots)
    for ref in refs:
        if ref in dangling:
            continue
        try:
            path = resolver.resolve(ref.uri)
        except ArtifactReferenceError:
            continue
        if any(g == path or g.startswith(path.rstrip(os.sep) + os.sep) for g in vanished):
            report.consistent -= 1
            report.dangling.append(Dangling(ref, path, "files vanished before they were read"))
    return report


def backup_tree(
    snap: Snapshot, roots: Roots, database: bytes, collected: Collected, report: Report
) -> dict[str, Any]:
    """The checkpoint's tree (docs/mlflow.md): the snapshot's record, the roots, the database
    file, the artifacts by root and relative path, the consistency at the backup."""
    import numpy as np

    def array(b: bytes) -> Any:
        return np.frombuffer(b, dtype=np.uint8) if b else np.zeros(0, dtype=np.uint8)

    return {
        "mlflow_backup": LAYOUT,
        "snapshot": snap.to_json(),
        "roots": {"destination": roots.artifacts_destination, "local": list(roots.local)},
        "database": array(database),
        "artifacts": [{rel: array(b) for rel, b in files.items()} for files in collected.files],
        "consistency": report.to_json(),
        "skipped": dict(collected.skipped),
        "vanished": list(collected.vanished),
    }


def summary(snap: Snapshot, collected: Collected, report: Report) -> dict[str, Any]:
    """The backup's metadata: what ``ckptguard info`` shows of it."""
    return {
        "layout": LAYOUT,
        "kind": snap.kind,
        "backend_uri": snap.backend_uri,
        "alembic_revision": snap.alembic_revision,
        "mlflow_version": snap.mlflow_version,
        "taken_at": snap.taken_at,
        "references": report.references,
        "fraction_consistent": report.fraction_consistent,
        "files": sum(len(f) for f in collected.files),
        "artifact_bytes": collected.nbytes,
    }
