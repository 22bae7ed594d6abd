"""ckptguard.mlflow.snapshot against real MLflow servers (tests/mlflowkit.py) on SQLite and on
PostgreSQL: a snapshot taken while a client keeps logging holds exactly the rows committed before
it (the runs created before it began, none of those begun after it ended), every reference it
holds resolves, and its database file holds the same references; bad URIs, unreachable servers
and a failing pg_dump are typed errors that leave nothing behind."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import run_command
from mlflowkit import (
    Logged,
    Logger,
    MlflowServer,
    create_database,
    drop_database,
    libpq_url,
    populate,
)

from ckptguard.errors import MlflowStoreError
from ckptguard.mlflow.check import check_consistency
from ckptguard.mlflow.refs import Roots, read_refs
from ckptguard.mlflow.snapshot import (
    PG_DUMP_FILE,
    SQLITE_FILE,
    live_refs,
    mlflow_version,
    take_snapshot,
)

pytestmark = pytest.mark.backend_independent  # no checkpoint is saved or loaded


@pytest.fixture(scope="module")
def logged(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Logged:
    return populate(mlflow_server, tmp_path_factory.mktemp("files"), mlflow_server.kind)


def _restored_refs(server: MlflowServer, snap_dir: Path, name: str) -> tuple[object, ...]:
    """The references read back from the snapshot's database file (a PostgreSQL dump restored
    into a fresh database with pg_restore)."""
    if server.kind == "sqlite":
        conn = sqlite3.connect(snap_dir / name)
        try:
            return read_refs(conn, "sqlite")
        finally:
            conn.close()
    import psycopg2

    url = create_database(server.backend_uri.rsplit("/", 1)[0] + "/postgres")
    try:
        proc = run_command(
            ["pg_restore", "--no-owner", "--exit-on-error", f"--dbname={libpq_url(url)}",
             snap_dir / name],
            120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        conn = psycopg2.connect(libpq_url(url))
        try:
            return read_refs(conn, "postgresql")
        finally:
            conn.close()
    finally:
        drop_database(url)


def test_snapshot_while_a_client_logs(
    mlflow_server: MlflowServer, logged: Logged, tmp_path: Path
) -> None:
    """The snapshot is one point in time: runs created before it began are in it, runs begun
    after it ended are not; every reference resolves; the orphans are the later runs' only."""
    artifact = tmp_path / "note.txt"
    artifact.write_text("logged while a backup runs\n")
    logger = Logger(mlflow_server, logged.experiment, artifact)
    logger.start()
    try:
        logger.wait_for(lambda: len(logger.created) >= 3, "created 3 runs")
        t0 = time.monotonic()
        snap = take_snapshot(mlflow_server.backend_uri, tmp_path)
        t1 = time.monotonic()
        logger.wait_for(lambda: sum(b > t1 for _, b, _ in logger.created) >= 3, "went on")
    finally:
        logger.halt.set()
        logger.join(60)
    assert not logger.errors, logger.errors

    runs = {r.row for r in snap.references if r.table == "runs"}
    before = {rid for rid, _, returned in logger.created if returned < t0}
    after = {rid for rid, began, _ in logger.created if began > t1}
    assert before and after
    assert before <= runs and not after & runs
    assert set(logged.runs) <= runs
    assert set(logged.versions) <= {r.row for r in snap.references if r.table == "model_versions"}
    assert set(logged.logged_models) <= {
        r.row for r in snap.references if r.table == "logged_models"
    }

    report = check_consistency(snap.references, Roots(str(mlflow_server.artifacts)))
    assert not report.dangling, report.to_json()["dangling"]
    assert report.fraction_consistent == 1.0
    orphan_runs = {Path(p).name for p in report.orphans}
    later = {rid for rid, _, _ in logger.created} - runs
    assert orphan_runs <= later, report.orphans
    assert all(Path(p).parent.name == logged.experiment for p in report.orphans)
    assert {rid for rid in after if (artifact_dir(mlflow_server, logged, rid)).exists()} <= (
        orphan_runs
    )

    name = SQLITE_FILE if mlflow_server.kind == "sqlite" else PG_DUMP_FILE
    assert snap.database == name and sorted(os.listdir(tmp_path)) == sorted([name, "note.txt"])
    assert _restored_refs(mlflow_server, tmp_path, name) == snap.references
    assert snap.kind == mlflow_server.kind and snap.mlflow_version == mlflow_version()
    assert snap.alembic_revision == live_refs(mlflow_server.backend_uri)[0]
    assert snap.to_json()["references"][0]["uri"] == snap.references[0].uri


def artifact_dir(server: MlflowServer, logged: Logged, run_id: str) -> Path:
    return server.artifacts / logged.experiment / run_id


def test_live_refs_equal_a_snapshots(
    mlflow_server: MlflowServer, logged: Logged, tmp_path: Path
) -> None:
    """With no writer, the live store's references are the snapshot's; a second snapshot into
    the same directory is refused and leaves the first one as it was."""
    revision, refs = live_refs(mlflow_server.backend_uri)
    snap = take_snapshot(mlflow_server.backend_uri, tmp_path)
    assert (revision, refs) == (snap.alembic_revision, snap.references)
    before = (tmp_path / snap.database).read_bytes()
    with pytest.raises(MlflowStoreError, match="exists"):
        take_snapshot(mlflow_server.backend_uri, tmp_path)
    assert (tmp_path / snap.database).read_bytes() == before


def test_failing_pg_dump_names_itself_and_leaves_nothing(
    mlflow_postgres: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "pg_dump"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'pg_dump: error: server is on fire' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CKPTGUARD_PG_DUMP", str(fake))
    dest = tmp_path / "snap"
    dest.mkdir()
    with pytest.raises(MlflowStoreError, match="exited 3.*server is on fire") as info:
        take_snapshot(mlflow_postgres.backend_uri, dest)
    assert str(fake) in str(info.value)
    assert os.listdir(dest) == []


# ---- without a server -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("./mlruns", "a file store or a path"),
        ("mysql://u@localhost/db", "unsupported backend store"),
        ("sqlite://", "sqlite:///relative/path"),
        ("sqlite:///db.sqlite?timeout=5", "without options"),
        ("postgresql://u:hunter2@127.0.0.1:1/", "names no database"),
        ("postgresql://u:hunter2@127.0.0.1:notaport/db", "malformed"),
    ],
)
def test_bad_uris_are_refused(uri: str, match: str, tmp_path: Path) -> None:
    with pytest.raises(MlflowStoreError, match=match) as info:
        take_snapshot(uri, tmp_path)
    assert "hunter2" not in str(info.value)
    assert os.listdir(tmp_path) == []


def test_unreachable_postgres_is_named(tmp_path: Path) -> None:
    pytest.importorskip("psycopg2")
    with pytest.raises(MlflowStoreError, match="127.0.0.1:1/db.*cannot connect") as info:
        take_snapshot("postgresql://u:hunter2@127.0.0.1:1/db", tmp_path, timeout=5)
    assert "hunter2" not in str(info.value) and "***" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_sqlite_that_is_missing_or_not_mlflows(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    missing = tmp_path / "nope.db"
    with pytest.raises(MlflowStoreError, match="no database file"):
        take_snapshot(f"sqlite:///{missing}", dest)
    assert not missing.exists()  # opened read-only: a typo creates nothing
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(MlflowStoreError, match="not an MLflow database"):
        take_snapshot(f"sqlite:///{other}", dest)
    assert os.listdir(dest) == []
    with pytest.raises(MlflowStoreError, match="not a directory"):
        take_snapshot(f"sqlite:///{other}", tmp_path / "absent")


def test_postgres_sh_answers_and_checks_names(mlflow_postgres: MlflowServer) -> None:
    """services/postgres.sh: status 0 while the server answers (the fixture started it); url
    names the database it is given and refuses a name that is not one."""
    from mlflowkit import POSTGRES_SH

    status = run_command([POSTGRES_SH, "status"], 60)
    assert status.returncode == 0 and "answering" in status.stdout
    assert mlflow_postgres.backend_uri.startswith("postgresql+psycopg2://postgres@127.0.0.1:")
    url = run_command([POSTGRES_SH, "url", "db_1"], 30)
    assert url.returncode == 0 and url.stdout.strip().endswith("/db_1")
    bad = run_command([POSTGRES_SH, "url", "x;drop"], 30)
    assert bad.returncode != 0 and "letters, digits" in bad.stderr
