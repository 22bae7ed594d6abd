"""``ckptguard mlflow restore``: a backup made a tracking server's store and artifacts again.

The backup is loaded (every byte checked against its hash; under ``trusted_keys`` its signature
too) and its tree checked as hostile input before anything is written: the layout, every
relative path (no absolute path, no ``..``, no empty or ``.`` step, no NUL), every value's type.
The targets must be fresh: a SQLite file that does not exist yet, a PostgreSQL database without
tables, artifact roots that are absent or empty. Then the artifacts are written (each file
created exclusively, never through a link, fsynced), then the database: SQLite through a
temporary file renamed into place, PostgreSQL by ``pg_restore`` in one transaction. Artifact
URIs that name a local root by its path are rewritten to the root it is restored to (``root_map``);
``mlflow-artifacts:`` URIs name the server's artifacts destination, so they stay as they are.
A failure removes the files the restore wrote and a SQLite database it placed; a PostgreSQL
database whose ``pg_restore`` completed stays restored (the URI rewrite failed after it). The
backup is never changed.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import MlflowRestoreError
from .backup import LAYOUT
from .refs import Roots
from .snapshot import Backend, parse_backend_uri

URI_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
    ("logged_models", "artifact_location"),
)
"""The columns whose values are artifact URIs (rewritten where a local root moves)."""


@dataclass(frozen=True)
class RestoreResult:
    """What ``restore`` wrote: the database, the roots (old -> new), files and bytes."""

    backend_uri: str
    roots: dict[str, str]
    files: int
    artifact_bytes: int
    rewritten: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def restore(
    backup: str,
    backend_uri: str,
    roots: Roots,
    *,
    root_map: Mapping[str, str] | None = None,
    timeout: float = 3600.0,
    **load_options: Any,
) -> RestoreResult:
    """Restore the backup at ``backup`` (a checkpoint, or a store: its LATEST) into the fresh
    backend store ``backend_uri`` and artifact ``roots``: the backup's artifacts destination to
    ``roots.artifacts_destination``, each other root to ``root_map[old]`` (every root must be
    placed: ``{old: old}`` restores one where it was).
    ``load_options`` go to ``ckptguard.load`` (``trusted_keys``, ``kek``)."""
    import ckptguard

    tree = ckptguard.load(backup, **load_options)
    parsed = parse_tree(tree, backup)
    target = parse_backend_uri(backend_uri)
    if target.kind != parsed.kind:
        raise MlflowRestoreError(
            f"{backup} is a backup of a {parsed.kind} store; it restores into one, not into "
            f"{target.display}"
        )
    moves = root_moves(parsed.old_roots, parsed.destination, roots, root_map or {})
    _check_fresh(target, moves.values())
    written: list[str] = []
    try:
        files, nbytes = write_artifacts(parsed, moves, written)
        rewrites = {o: n for o, n in moves.items() if o != n and o != parsed.destination}
        if target.kind == "sqlite":
            count = _restore_sqlite(parsed.database, target, rewrites, written)
        else:
            count = _restore_postgres(parsed.database, target, rewrites, timeout)
    except BaseException:
        _undo(written)
        raise
    return RestoreResult(target.display, dict(moves), files, nbytes, count)


@dataclass(frozen=True)
class Parsed:
    kind: str
    database: Any  # numpy uint8 array
    destination: str | None
    old_roots: tuple[str, ...]
    artifacts: tuple[dict[str, Any], ...]


def parse_tree(tree: Any, where: str) -> Parsed:
    """The backup's tree, checked (MlflowRestoreError naming what is wrong)."""
    import numpy as np

    def bad(what: str) -> MlflowRestoreError:
        return MlflowRestoreError(f"{where} is not an MLflow backup ckptguard can restore: {what}")

    if not isinstance(tree, dict) or tree.get("mlflow_backup") != LAYOUT:
        raise bad(f"its tree has no 'mlflow_backup': {LAYOUT}")
    snap, roots = tree.get("snapshot"), tree.get("roots")
    if not isinstance(snap, dict) or snap.get("kind") not in ("sqlite", "postgresql"):
        raise bad("snapshot.kind is neither sqlite nor postgresql")
    if not isinstance(roots, dict) or not isinstance(roots.get("local"), list):
        raise bad("'roots' is not {destination, local}")
    dest = roots.get("destination")
    locals_ = roots["local"]
    if dest is not None and not _abs_path(dest) or not all(_abs_path(p) for p in locals_):
        raise bad("a root is not an absolute, normal path")
    old = tuple(dict.fromkeys(([dest] if dest else []) + locals_))
    arts, db = tree.get("artifacts"), tree.get("database")
    if not isinstance(db, np.ndarray) or db.dtype != np.uint8 or db.ndim != 1:
        raise bad("'database' is not a byte array")
    if not isinstance(arts, list) or len(arts) != len(old):
        raise bad(f"'artifacts' is not a list of {len(old)} file maps, one per root")
    for files in arts:
        if not isinstance(files, dict):
            raise bad("an artifact root's files are not a map")
        for rel, data in files.items():
            if not _safe_relpath(rel):
                raise bad(f"artifact path {rel!r} is not a plain relative path")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
                raise bad(f"artifact {rel!r} is not a byte array")
    return Parsed(snap["kind"], db, dest, old, tuple(arts))


def _abs_path(p: Any) -> bool:
    return isinstance(p, str) and "\0" not in p and os.path.isabs(p) and os.path.normpath(p) == p


def _safe_relpath(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or "\0" in rel or rel.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def root_moves(
    old: tuple[str, ...], destination: str | None, roots: Roots, root_map: Mapping[str, str]
) -> dict[str, str]:
    """Where each of the backup's roots goes: ``root_map[root]``, else the backup's artifacts
    destination (``destination``) to ``roots.artifacts_destination``. A root the caller did not
    place is refused: the backup's own paths are never written to unless asked for (a backup
    from an untrusted store could name any directory)."""
    if roots.artifacts_destination is not None and destination is None:
        raise MlflowRestoreError(
            "the backup has no artifacts destination (its server did not proxy artifacts): "
            f"place its roots {list(old)} with --map OLD=NEW instead"
        )
    moves: dict[str, str] = {}
    for root in old:
        new = root_map.get(root)
        if new is None and root == destination:
            new = roots.artifacts_destination
        if new is None:
            how = " or --artifacts-destination" if root == destination else ""
            raise MlflowRestoreError(
                f"the backup's artifact root {root} has no place to go: give --map {root}=NEW "
                f"(--map {root}={root} to restore it where it was){how}"
            )
        moves[root] = os.path.normpath(os.path.abspath(new))
    unknown = set(root_map) - set(old)
    if unknown:
        raise MlflowRestoreError(
            f"root_map names {sorted(unknown)}, which are not roots of the backup ({list(old)})"
        )
    if len(set(moves.values())) != len(moves):
        raise MlflowRestoreError(f"two roots of the backup would be restored into one: {moves}")
    return moves


def _check_fresh(target: Backend, new_roots: Any) -> None:
    for root in new_roots:
        if os.path.islink(root) or os.path.lexists(root) and not os.path.isdir(root):
            raise MlflowRestoreError(f"artifact root {root} exists and is not a directory")
        if os.path.isdir(root) and os.listdir(root):
            raise MlflowRestoreError(f"artifact root {root} is not empty; restore into a new one")
    if target.kind == "sqlite" and os.path.lexists(target.path):
        raise MlflowRestoreError(f"{target.path} exists; restore into a new database file")
    if target.kind == "postgresql":
        _pg_check_empty(target)


def write_artifacts(parsed: Parsed, moves: dict[str, str], written: list[str]) -> tuple[int, int]:
    """Write every artifact under its new root; ``written`` collects what was created."""
    files = nbytes = 0
    for old, arts in zip(parsed.old_roots, parsed.artifacts, strict=True):
        root = moves[old]
        if not os.path.isdir(root):
            os.makedirs(root)
            written.append(root)
        for rel in sorted(arts):
            _write_file(root, rel, arts[rel], written)
            files += 1
            nbytes += len(arts[rel])
    return files, nbytes


def _write_file(root: str, rel: str, data: Any, written: list[str]) -> None:
    parts = rel.split("/")
    d = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                os.mkdir(part, dir_fd=d)
                written.append(os.path.join(root, *parts[: i + 1]))
            except FileExistsError:
                pass
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=d)
            os.close(d)
            d = nxt
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(parts[-1], flags, 0o644, dir_fd=d)
        written.append(os.path.join(root, rel))
        try:
            view = memoryview(data.tobytes() if not data.flags.c_contiguous else data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        os.close(d)


def _undo(written: list[str]) -> None:
    """Remove what a failed restore created, newest first (files, then their directories)."""
    for path in reversed(written):
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass


def _restore_sqlite(db: Any, target: Backend, rewrites: dict[str, str], written: list[str]) -> int:
    """The SQLite file written beside its target, URIs rewritten, fsynced, linked into place
    (never over a file that appeared meanwhile)."""
    parent = os.path.dirname(target.path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".ckptguard-restore-", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(db))
            f.flush()
            os.fsync(f.fileno())
        conn = sqlite3.connect(tmp)
        conn.execute("PRAGMA trusted_schema = OFF")  # the backup's schema runs no functions
        try:
            with conn:
                count = _rewrite(conn, "?", rewrites)
        finally:
            conn.close()
        os.link(tmp, target.path)
        written.append(target.path)
    except FileExistsError:
        raise MlflowRestoreError(f"{target.path} appeared during the restore") from None
    finally:
        os.unlink(tmp)
    dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return count


def _rewrite(conn: Any, mark: str, rewrites: dict[str, str]) -> int:
    """Rewrite each URI column's values that name an old root (as a path or a file: URI)."""
    count = 0
    cur = conn.cursor()
    tables = _tables(cur, mark)
    for table, column in URI_COLUMNS:
        if table not in tables:
            continue
        for old, new in rewrites.items():
            for prefix_old, prefix_new in ((old, new), ("file://" + old, "file://" + new)):
                sql = (
                    f"UPDATE {table} SET {column} = {mark} || substr({column}, {mark}) "
                    f"WHERE {column} = {mark} OR substr({column}, 1, {mark}) = {mark}"
                )
                n = len(prefix_old)
                cur.execute(sql, (prefix_new, n + 1, prefix_old, n + 1, prefix_old + "/"))
                count += max(cur.rowcount, 0)
    cur.close()
    return count


def _tables(cur: Any, mark: str) -> set[str]:
    if mark == "?":
        cur.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    return {str(r[0]) for r in cur.fetchall()}


def _pg_connect(target: Backend) -> Any:
    try:
        import psycopg2
    except ImportError:
        raise MlflowRestoreError(
            "PostgreSQL needs psycopg2 (pip install 'ckptguard[mlflow]')"
        ) from None
    try:
        return psycopg2.connect(connect_timeout=30, **dict(target.params))
    except psycopg2.Error as e:
        raise MlflowRestoreError(
            f"{target.display}: cannot connect ({' '.join(str(e).split())})"
        ) from None


def _pg_check_empty(target: Backend) -> None:
    conn = _pg_connect(target)
    try:
        cur = conn.cursor()
        tables = _tables(cur, "%s")
    finally:
        conn.close()
    if tables:
        raise MlflowRestoreError(
            f"{target.display} has tables ({', '.join(sorted(tables)[:5])}...); restore into an "
            "empty database"
        )


def _restore_postgres(db: Any, target: Backend, rewrites: dict[str, str], timeout: float) -> int:
    """``pg_restore`` of the dump in one transaction, then the URI rewrite in another."""
    from psycopg2.extensions import make_dsn

    exe = os.environ.get("CKPTGUARD_PG_RESTORE") or shutil.which("pg_restore")
    if not exe:
        raise MlflowRestoreError("pg_restore not found (PATH, CKPTGUARD_PG_RESTORE)")
    params = dict(target.params)
    env = dict(os.environ)
    password = params.pop("password", None)
    if password is not None:
        env["PGPASSWORD"] = password
    with tempfile.NamedTemporaryFile(prefix="ckptguard-restore-", suffix=".pgdump") as f:
        f.write(memoryview(db))
        f.flush()
        args = [exe, "--single-transaction", "--exit-on-error", "--no-owner", "--no-privileges"]
        args += ["--no-password", f"--dbname={make_dsn(**params)}", f.name]
        try:
            proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MlflowRestoreError(f"{exe} did not finish in {timeout:.0f} s") from None
        if proc.returncode != 0:
            tail = (proc.stderr or "").strip()[-2000:] or "(no output)"
            raise MlflowRestoreError(f"{exe} exited {proc.returncode}: {tail}")
    conn = _pg_connect(target)
    try:
        with conn:
            return _rewrite(conn, "%s", rewrites)
    finally:
        conn.close()
