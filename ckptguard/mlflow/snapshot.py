"""A point-in-time copy of an MLflow tracking server's backend store, and its references.

SQLite: the online backup API (``sqlite3.Connection.backup`` in one step, which holds a read
lock for the copy, so writers wait and the copy is one state of the database), then the
references and the schema revision read from the copy. PostgreSQL: a REPEATABLE READ
transaction exports its snapshot (``pg_export_snapshot``); the references and the revision are
read in that transaction and ``pg_dump --snapshot`` dumps the same snapshot while it stays
open, so the dump and the references describe one state however the server is written to
meanwhile.

The dump is pg_dump's custom format, uncompressed: one file that ``pg_restore`` checks
(``--list``) and restores into another database, selectively, without owners; uncompressed so
that ckptguard's own compression (where it pays) and an incremental backup's chunk reuse see
the raw bytes, which zlib would scramble on every small change.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from ..errors import MlflowStoreError
from .refs import Kind, Ref, read_refs

SQLITE_FILE = "mlflow.db"
PG_DUMP_FILE = "mlflow.pgdump"
PG_SCHEMES = ("postgresql", "postgres")
# alembic revision ids are short hex strings; anything else is not MLflow's table.
_REVISION = re.compile(r"[0-9A-Za-z_]{1,64}")
_STDERR_TAIL = 2000


@dataclass(frozen=True)
class Backend:
    """A parsed backend store URI: ``kind``, the SQLite file (``path``) or PostgreSQL's libpq
    parameters (``params``, password included), and ``display``: the URI without its password,
    for messages and records."""

    kind: Kind
    display: str
    path: str = ""
    params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """What ``take_snapshot`` copied: the database file in the destination (``database``, a
    name), how it was written (``dump_format``), the schema's alembic revision, the MLflow
    version installed here (None without MLflow; the revision is what the data needs), the
    references held at the snapshot's moment, and when taking it began (UTC, ISO 8601)."""

    kind: Kind
    backend_uri: str
    database: str
    dump_format: str
    alembic_revision: str
    mlflow_version: str | None
    references: tuple[Ref, ...]
    taken_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "backend_uri": self.backend_uri,
            "database": self.database,
            "dump_format": self.dump_format,
            "alembic_revision": self.alembic_revision,
            "mlflow_version": self.mlflow_version,
            "taken_at": self.taken_at,
            "references": [r.to_json() for r in self.references],
        }


def parse_backend_uri(uri: str) -> Backend:
    """``uri`` (a SQLAlchemy URL as ``mlflow server --backend-store-uri`` takes it) as a
    ``Backend``; ``MlflowStoreError`` for another kind of store or a malformed URI."""
    scheme, sep, rest = uri.partition(":")
    dialect = scheme.split("+", 1)[0].lower()
    if not sep or not scheme:
        raise MlflowStoreError(
            f"{uri!r}: a file store or a path, not a database URI (sqlite:/// or postgresql://)"
        )
    if dialect == "sqlite":
        return _parse_sqlite(uri, rest)
    if dialect in PG_SCHEMES:
        return _parse_postgres(uri)
    raise MlflowStoreError(
        f"{_mask(uri)}: an unsupported backend store ({dialect}); ckptguard snapshots SQLite"
        " and PostgreSQL"
    )


def _parse_sqlite(uri: str, rest: str) -> Backend:
    if not rest.startswith("///") or "?" in rest:
        raise MlflowStoreError(
            f"{uri!r}: a SQLite URI is sqlite:///relative/path or sqlite:////absolute/path,"
            " without options"
        )
    path = unquote(rest[3:])
    if path in ("", ":memory:"):
        raise MlflowStoreError(f"{uri!r}: an in-memory SQLite database cannot be snapshot")
    return Backend("sqlite", uri, path=os.path.abspath(path))


def _parse_postgres(uri: str) -> Backend:
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as e:
        raise MlflowStoreError(f"{_mask(uri)}: a malformed PostgreSQL URI ({e})") from None
    dbname = unquote(parts.path.lstrip("/"))
    if not dbname:
        raise MlflowStoreError(f"{_mask(uri)}: names no database")
    params: dict[str, str] = {"dbname": dbname}
    for key, value in (
        ("host", parts.hostname),
        ("port", str(port) if port else None),
        ("user", unquote(parts.username) if parts.username else None),
        ("password", unquote(parts.password) if parts.password is not None else None),
    ):
        if value:
            params[key] = value
    params.update(parse_qsl(parts.query, keep_blank_values=True))
    return Backend("postgresql", _mask(uri), params=tuple(sorted(params.items())))


def _mask(uri: str) -> str:
    """``uri`` with its password replaced by ``***``."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{netloc[1]}").geturl()


def mlflow_version() -> str | None:
    """The MLflow release installed here (mlflow or mlflow-skinny), or None."""
    for dist in ("mlflow", "mlflow-skinny"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def take_snapshot(
    backend_uri: str, dest_dir: str | os.PathLike[str], *, timeout: float = 3600.0
) -> Snapshot:
    """Copy the backend store ``backend_uri`` into the existing directory ``dest_dir``
    (``mlflow.db`` or ``mlflow.pgdump``, which must not exist yet) as one point in time, and
    read the references and schema revision of that same point. ``timeout`` bounds the copy
    (seconds). On failure the partial copy is removed and ``MlflowStoreError`` names the store
    and the cause."""
    backend = parse_backend_uri(backend_uri)
    dest = os.fspath(dest_dir)
    if not os.path.isdir(dest):
        raise MlflowStoreError(f"snapshot destination {dest!r} is not a directory")
    name = SQLITE_FILE if backend.kind == "sqlite" else PG_DUMP_FILE
    target = os.path.join(dest, name)
    if os.path.lexists(target):
        raise MlflowStoreError(f"{target} exists; a snapshot never replaces a file")
    taken_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    try:
        if backend.kind == "sqlite":
            revision, refs = _sqlite_snapshot(backend, target, timeout)
            dump_format = "sqlite"
        else:
            revision, refs = _postgres_snapshot(backend, target, timeout)
            dump_format = "pg_dump custom, uncompressed"
    except BaseException:
        if os.path.lexists(target):
            os.unlink(target)
        raise
    return Snapshot(
        backend.kind, backend.display, name, dump_format, revision, mlflow_version(), refs, taken_at
    )


def live_refs(backend_uri: str, *, timeout: float = 60.0) -> tuple[str, tuple[Ref, ...]]:
    """The alembic revision and references of a live store, read in one read-only transaction
    (what ``ckptguard mlflow check`` checks against a running server)."""
    backend = parse_backend_uri(backend_uri)
    if backend.kind == "sqlite":
        conn = _sqlite_source(backend, timeout)
        try:
            conn.execute("BEGIN")
            return _revision(conn, backend), read_refs(conn, "sqlite")
        finally:
            conn.close()
    conn = _pg_connect(backend, timeout)
    try:
        return _revision(conn, backend), read_refs(conn, "postgresql")
    finally:
        conn.close()


# ---- SQLite ---------------------------------------------------------------------------------


def _sqlite_source(backend: Backend, timeout: float) -> sqlite3.Connection:
    """The store opened read-only (a mistyped path never creates an empty database)."""
    if not os.path.isfile(backend.path):
        raise MlflowStoreError(f"{backend.display}: no database file at {backend.path}")
    try:
        conn = sqlite3.connect(
            f"file:{quote(backend.path)}?mode=ro", uri=True, timeout=timeout, isolation_level=None
        )
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as e:
        raise MlflowStoreError(f"{backend.display}: cannot open the database ({e})") from None
    return conn


def _sqlite_snapshot(backend: Backend, target: str, timeout: float) -> tuple[str, tuple[Ref, ...]]:
    src = _sqlite_source(backend, timeout)
    try:
        copy = sqlite3.connect(target, isolation_level=None)
        try:
            # One step (pages=-1): the whole database under one read lock, a single state.
            src.backup(copy)
            check = copy.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                raise MlflowStoreError(f"{backend.display}: the copy fails quick_check ({check})")
            return _revision(copy, backend), read_refs(copy, "sqlite")
        finally:
            copy.close()
    except sqlite3.Error as e:
        raise MlflowStoreError(f"{backend.display}: the online backup failed ({e})") from None
    finally:
        src.close()


# ---- PostgreSQL -----------------------------------------------------------------------------


def _pg_connect(backend: Backend, timeout: float) -> Any:
    """A psycopg2 connection in a read-only REPEATABLE READ transaction."""
    try:
        import psycopg2
    except ImportError:
        raise MlflowStoreError(
            f"{backend.display}: PostgreSQL needs psycopg2 (pip install 'ckptguard[mlflow]')"
        ) from None
    try:
        wait = max(1, int(min(timeout, 30)))
        conn = psycopg2.connect(connect_timeout=wait, **dict(backend.params))
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True, autocommit=False)
    except psycopg2.Error as e:
        raise MlflowStoreError(f"{backend.display}: cannot connect ({_pg_message(e)})") from None
    return conn


def _pg_message(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _postgres_snapshot(
    backend: Backend, target: str, timeout: float
) -> tuple[str, tuple[Ref, ...]]:
    import psycopg2

    conn = _pg_connect(backend, timeout)
    try:
        cur = conn.cursor()
        # The transaction's first statement fixes its snapshot; the export names it for pg_dump.
        cur.execute("SELECT pg_export_snapshot()")
        snapshot_id = str(cur.fetchone()[0])
        cur.close()
        revision = _revision(conn, backend)
        refs = read_refs(conn, "postgresql")
        _pg_dump(backend, snapshot_id, target, timeout)
        return revision, refs
    except psycopg2.Error as e:
        raise MlflowStoreError(f"{backend.display}: {_pg_message(e)}") from None
    finally:
        # Read only: nothing to keep; the end of the exported snapshot. On a broken connection
        # the rollback fails too, and the error above says why.
        with contextlib.suppress(psycopg2.Error):
            conn.rollback()
        conn.close()


def _pg_dump(backend: Backend, snapshot_id: str, target: str, timeout: float) -> None:
    """``pg_dump`` of the exported snapshot into ``target``. The password goes through the
    environment (PGPASSWORD), never the command line."""
    from psycopg2.extensions import make_dsn

    exe = os.environ.get("CKPTGUARD_PG_DUMP") or shutil.which("pg_dump")
    if not exe:
        raise MlflowStoreError(f"{backend.display}: pg_dump not found (PATH, CKPTGUARD_PG_DUMP)")
    params = dict(backend.params)
    env = {**os.environ}
    password = params.pop("password", None)
    if password is not None:
        env["PGPASSWORD"] = password
    args = [
        exe,
        f"--snapshot={snapshot_id}",
        "--format=custom",
        "--compress=0",
        "--no-password",
        f"--file={target}",
        f"--dbname={make_dsn(**params)}",
    ]
    start = time.monotonic()
    try:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise MlflowStoreError(
            f"{backend.display}: pg_dump did not finish in {timeout:.0f} s ({exe}):"
            f" {_tail(e.stderr)}"
        ) from None
    except OSError as e:
        raise MlflowStoreError(f"{backend.display}: cannot run {exe} ({e.strerror})") from None
    if proc.returncode != 0:
        raise MlflowStoreError(
            f"{backend.display}: {exe} exited {proc.returncode} after"
            f" {time.monotonic() - start:.1f} s: {_tail(proc.stderr)}"
        )


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "").strip()[-_STDERR_TAIL:] or "(no output)"


# ---- both -----------------------------------------------------------------------------------


def _revision(conn: Any, backend: Backend) -> str:
    """The schema's alembic revision (MLflow migrates with alembic: one row, one id)."""
    cur = conn.cursor()
    try:
        cur.execute("SELECT version_num FROM alembic_version")
        rows = cur.fetchall()
    except Exception as e:
        raise MlflowStoreError(
            f"{backend.display}: not an MLflow database (no alembic_version: {_pg_message(e)})"
        ) from None
    finally:
        cur.close()
    if len(rows) != 1 or not _REVISION.fullmatch(str(rows[0][0])):
        raise MlflowStoreError(f"{backend.display}: alembic_version holds {rows[:3]!r}")
    return str(rows[0][0])
