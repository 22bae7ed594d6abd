"""The artifact references of an MLflow backend store, and the local path each one names.

MLflow keeps its metadata (a SQL database) apart from its artifacts (files) and links them only
by URI: ``experiments.artifact_location``, ``runs.artifact_uri``, ``model_versions.source`` and
``storage_location``, ``logged_models.artifact_location``. ``read_refs`` reads them from a
database connection (SQLite or PostgreSQL, DB-API); ``Resolver`` maps each to a path under the
artifact roots a backup covers.

Resolution never leaves the roots: a URI of another scheme (s3, gs, http), a relative path, a
``..`` step, a path outside every root (also through a link), or an indirect URI whose target
is not in the snapshot raises ``ArtifactReferenceError``. The consistency check (check.py)
reports such a reference as dangling, with the error's message as its reason: a backup holds
only files under its roots, so a reference that leads elsewhere is one it cannot keep.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from ..errors import ArtifactReferenceError, MlflowStoreError

Kind = Literal["sqlite", "postgresql"]

# The tables that hold artifact URIs, in report order. logged_models exists from MLflow 3.0.
TABLES = ("experiments", "runs", "model_versions", "logged_models")
_QUERIES = {
    "experiments": "SELECT experiment_id, artifact_location FROM experiments",
    "runs": "SELECT run_uuid, artifact_uri FROM runs",
    "model_versions": "SELECT name, version, source, storage_location, status FROM model_versions",
    "logged_models": "SELECT model_id, artifact_location, status FROM logged_models",
}
# logged_models.status: LoggedModelStatus's number (mlflow/protos/service.proto).
_LOGGED_MODEL_READY = 2
# runs:/ and models:/ may name each other; a longer chain is a loop.
_MAX_INDIRECTION = 4


@dataclass(frozen=True)
class Ref:
    """One artifact URI held by one row.

    ``row`` is the row's key (experiment id, run id, ``name/version``, logged model id).
    ``required``: the URI must name files (a ready model version or logged model); an
    experiment's or run's directory appears only once something is logged into it, so its
    absence means "nothing yet". ``covers``: everything under the path belongs to the row (not
    so for an experiment's directory, which holds its runs: each run answers for its own)."""

    table: str
    row: str
    column: str
    uri: str
    required: bool
    covers: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def table_names(conn: Any, kind: Kind) -> set[str]:
    """The tables of the connection's database (its current schema, for PostgreSQL)."""
    if kind == "sqlite":
        query = "SELECT name FROM sqlite_master WHERE type = 'table'"
    else:
        query = (
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
    cur = conn.cursor()
    try:
        cur.execute(query)
        return {str(r[0]) for r in cur.fetchall()}
    finally:
        cur.close()


def read_refs(conn: Any, kind: Kind) -> tuple[Ref, ...]:
    """Every artifact reference in the database of ``conn`` (a DB-API connection), sorted by
    table, row and column. Reads within the caller's transaction, so a caller that holds one
    snapshot gets the references of that snapshot. A schema without ``logged_models`` (MLflow
    before 3.0) has none of those; one without experiments or runs is not MLflow's."""
    tables = table_names(conn, kind)
    missing = {"experiments", "runs", "model_versions"} - tables
    if missing:
        raise MlflowStoreError(f"not an MLflow database: no table {', '.join(sorted(missing))}")
    refs: list[Ref] = []
    cur = conn.cursor()
    try:
        for table in TABLES:
            if table in tables:
                cur.execute(_QUERIES[table])
                refs.extend(_row_refs(table, cur.fetchall()))
    finally:
        cur.close()
    order = {t: i for i, t in enumerate(TABLES)}
    return tuple(sorted(refs, key=lambda r: (order[r.table], r.row, r.column)))


def _row_refs(table: str, rows: Iterable[tuple[Any, ...]]) -> Iterable[Ref]:
    """The references of ``table``'s rows (a NULL or empty URI is none)."""
    for row in rows:
        if table == "experiments" and row[1]:
            yield Ref(table, str(row[0]), "artifact_location", str(row[1]), False, False)
        elif table == "runs" and row[1]:
            yield Ref(table, str(row[0]), "artifact_uri", str(row[1]), False, True)
        elif table == "model_versions":
            name, version, source, storage, status = row
            key, ready = f"{name}/{version}", str(status) == "READY"
            if source:
                yield Ref(table, key, "source", str(source), ready, True)
            if storage and storage != source:
                yield Ref(table, key, "storage_location", str(storage), ready, True)
        elif table == "logged_models" and row[1]:
            ready = row[2] in (_LOGGED_MODEL_READY, str(_LOGGED_MODEL_READY), "READY")
            yield Ref(table, str(row[0]), "artifact_location", str(row[1]), ready, True)


@dataclass(frozen=True)
class Roots:
    """Where a tracking server's artifacts lie on this machine: ``artifacts_destination`` (its
    ``--artifacts-destination``, where ``mlflow-artifacts:`` URIs point) and ``local`` (further
    directories that plain paths and ``file:`` URIs may name, e.g. a ``--default-artifact-root``
    without the proxy). Paths are made absolute and normal."""

    artifacts_destination: str | None = None
    local: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        dest = self.artifacts_destination
        if dest is not None:
            object.__setattr__(self, "artifacts_destination", _root_path(dest))
        object.__setattr__(self, "local", tuple(_root_path(p) for p in self.local))

    def all(self) -> tuple[str, ...]:
        """Every root, the destination first, each once."""
        first = (self.artifacts_destination,) if self.artifacts_destination else ()
        return tuple(dict.fromkeys(first + self.local))


def _root_path(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    if text.startswith("file:"):
        text = unquote(urlsplit(text).path)
    return os.path.normpath(os.path.abspath(text))


class Resolver:
    """Maps the artifact URIs of one snapshot to paths under ``roots``; ``runs:/`` and
    ``models:/`` URIs through the snapshot's own runs, logged models and model versions."""

    def __init__(self, refs: Iterable[Ref], roots: Roots) -> None:
        self.roots = roots
        self._real_roots = tuple(os.path.realpath(r) for r in roots.all())
        self._targets: dict[tuple[str, str], str] = {}
        for ref in refs:
            if ref.table in ("runs", "logged_models", "model_versions"):
                self._targets.setdefault((ref.table, ref.row), ref.uri)

    def resolve(self, uri: str) -> str:
        """The absolute path ``uri`` names, inside one of the roots; ``ArtifactReferenceError``
        naming the URI and the reason where there is none."""
        return self._resolve(uri, uri, 0)

    def _resolve(self, uri: str, original: str, depth: int) -> str:
        if depth > _MAX_INDIRECTION:
            raise ArtifactReferenceError(f"{original}: runs:/ and models:/ URIs loop", original)
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme in ("runs", "models"):
            target = self._indirect(scheme, parts.netloc + parts.path, original)
            return self._resolve(target, original, depth + 1)
        if scheme == "mlflow-artifacts":
            dest = self.roots.artifacts_destination
            if dest is None:
                raise ArtifactReferenceError(
                    f"{original}: an mlflow-artifacts: URI, but no artifacts destination given",
                    original,
                )
            return self._inside(dest, parts.path, original)
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise ArtifactReferenceError(
                    f"{original}: a file: URI of another host ({parts.netloc})", original
                )
            return self._absolute(unquote(parts.path), original)
        if scheme == "":
            return self._absolute(uri, original)
        raise ArtifactReferenceError(
            f"{original}: not on the local file system ({scheme}:)", original
        )

    def _indirect(self, scheme: str, path: str, original: str) -> str:
        """The URI a ``runs:/<run id>/<path>`` or ``models:/<model id>[/<path>]`` /
        ``models:/<name>/<version>`` URI stands for, from the snapshot's rows."""
        segments = [s for s in path.split("/") if s]
        if not segments:
            raise ArtifactReferenceError(f"{original}: names no {scheme[:-1]}", original)
        if scheme == "runs":
            base = self._targets.get(("runs", segments[0]))
            rest = segments[1:]
        elif ("logged_models", segments[0]) in self._targets:
            base, rest = self._targets[("logged_models", segments[0])], segments[1:]
        elif len(segments) >= 2:
            base = self._targets.get(("model_versions", f"{segments[0]}/{segments[1]}"))
            rest = segments[2:]
        else:
            base, rest = None, []
        if base is None:
            raise ArtifactReferenceError(
                f"{original}: names a {'run' if scheme == 'runs' else 'model'} that is not in"
                " the snapshot (or an alias or stage, which it does not resolve)",
                original,
            )
        return "/".join([base.rstrip("/"), *rest]) if rest else base

    def _absolute(self, path: str, original: str) -> str:
        if not path.startswith("/"):
            raise ArtifactReferenceError(f"{original}: a relative path", original)
        for root in self.roots.all():
            if path == root or path.startswith(root.rstrip("/") + "/"):
                return self._inside(root, path[len(root) :], original)
        raise ArtifactReferenceError(
            f"{original}: outside the artifact roots ({', '.join(self.roots.all()) or 'none'})",
            original,
        )

    def _inside(self, root: str, rel: str, original: str) -> str:
        """``root`` joined with ``rel``, which may not step up or lead out through a link."""
        segments = [s for s in rel.split("/") if s not in ("", ".")]
        if ".." in segments:
            raise ArtifactReferenceError(f"{original}: a '..' step", original)
        path = os.path.join(root, *segments)
        real = os.path.realpath(path)
        if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in self._real_roots):
            raise ArtifactReferenceError(
                f"{original}: leads outside the artifact roots through a link ({real})", original
            )
        return path
