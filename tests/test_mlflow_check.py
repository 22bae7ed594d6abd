"""ckptguard.mlflow.refs and .check: every URI form MLflow writes resolved inside the artifact
roots (and every way out refused), and the consistency check against a real server's store
(tests/mlflowkit.py, SQLite: the check reads references, whichever database they came from):
consistent as logged, then dangling references and orphans found as directories are removed
and added."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflowkit import Logged, MlflowServer, populate, start_server, stop_server

from ckptguard.errors import ArtifactReferenceError, MlflowStoreError
from ckptguard.mlflow.check import check_consistency
from ckptguard.mlflow.refs import Ref, Resolver, Roots, read_refs
from ckptguard.mlflow.snapshot import Snapshot, take_snapshot

pytestmark = pytest.mark.backend_independent  # no checkpoint is saved or loaded


# ---- resolution -----------------------------------------------------------------------------


def _ref(table: str, row: str, uri: str, column: str = "artifact_location") -> Ref:
    return Ref(table, row, column, uri, table in ("model_versions", "logged_models"), True)


@pytest.fixture
def resolver(tmp_path: Path) -> Resolver:
    dest, local = tmp_path / "dest", tmp_path / "local"
    dest.mkdir()
    local.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", dest / "escape")
    refs = [
        _ref("runs", "r1", "mlflow-artifacts:/1/r1/artifacts", "artifact_uri"),
        _ref("logged_models", "m-1", "mlflow-artifacts:/1/models/m-1/artifacts"),
        _ref("model_versions", "reg/1", "runs:/r1/model", "source"),
        _ref("model_versions", "loop/1", "models:/loop/1", "source"),
    ]
    return Resolver(refs, Roots(artifacts_destination=str(dest), local=(str(local),)))


@pytest.mark.parametrize(
    ("uri", "rel"),
    [
        ("mlflow-artifacts:/1/r1/artifacts", "dest/1/r1/artifacts"),
        ("mlflow-artifacts://127.0.0.1:5000/1/r1/artifacts/x", "dest/1/r1/artifacts/x"),
        ("mlflow-artifacts:/1/./r1//artifacts/", "dest/1/r1/artifacts"),
        ("runs:/r1/model/MLmodel", "dest/1/r1/artifacts/model/MLmodel"),
        ("runs:/r1", "dest/1/r1/artifacts"),
        ("models:/m-1", "dest/1/models/m-1/artifacts"),
        ("models:/m-1/MLmodel", "dest/1/models/m-1/artifacts/MLmodel"),
        ("models:/reg/1", "dest/1/r1/artifacts/model"),
        ("file:///{root}/local/exp/run", "local/exp/run"),
        ("file://localhost/{root}/local/a%20b", "local/a b"),
        ("/{root}/local/exp", "local/exp"),
        ("/{root}/dest", "dest"),
    ],
)
def test_uris_resolve_inside_the_roots(
    resolver: Resolver, tmp_path: Path, uri: str, rel: str
) -> None:
    assert resolver.resolve(uri.format(root=str(tmp_path).lstrip("/"))) == str(tmp_path / rel)


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("s3://bucket/1/r1", r"not on the local file system \(s3:\)"),
        ("relative/path", "a relative path"),
        ("mlflow-artifacts:/1/../../etc", "'..' step"),
        ("file:///etc/passwd", "outside the artifact roots"),
        ("/{root}/localx/y", "outside the artifact roots"),
        ("file://otherhost/{root}/local/x", "another host"),
        ("mlflow-artifacts:/escape/x", "through a link"),
        ("runs:/unknown/model", "not in the snapshot"),
        ("models:/reg@champion", "alias or stage"),
        ("models:/loop/1", "loop"),
        ("runs:/", "names no run"),
    ],
)
def test_uris_that_lead_elsewhere_are_refused(
    resolver: Resolver, tmp_path: Path, uri: str, reason: str
) -> None:
    uri = uri.format(root=str(tmp_path).lstrip("/"))
    with pytest.raises(ArtifactReferenceError, match=reason) as info:
        resolver.resolve(uri)
    assert info.value.uri == uri


def test_mlflow_artifacts_without_a_destination_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactReferenceError, match="no artifacts destination"):
        Resolver([], Roots(local=(str(tmp_path),))).resolve("mlflow-artifacts:/1/x")


def test_refs_of_a_schema_without_logged_models(tmp_path: Path) -> None:
    """MLflow before 3.0: no logged_models table, no such references; no runs table: not
    MLflow's."""
    conn = sqlite3.connect(tmp_path / "old.db")
    conn.executescript(
        "CREATE TABLE experiments (experiment_id, artifact_location);"
        "CREATE TABLE runs (run_uuid, artifact_uri);"
        "CREATE TABLE model_versions (name, version, source, storage_location, status);"
        "INSERT INTO experiments VALUES (0, '/a/0'), (1, NULL);"
        "INSERT INTO runs VALUES ('r', '/a/0/r/artifacts');"
        "INSERT INTO model_versions VALUES ('m', 1, 'runs:/r/x', 'runs:/r/x', 'READY'),"
        " ('m', 2, '/a/0/r/artifacts/y', '/a/s/y', 'PENDING_REGISTRATION');"
    )
    assert read_refs(conn, "sqlite") == (
        Ref("experiments", "0", "artifact_location", "/a/0", False, False),
        Ref("runs", "r", "artifact_uri", "/a/0/r/artifacts", False, True),
        Ref("model_versions", "m/1", "source", "runs:/r/x", True, True),
        Ref("model_versions", "m/2", "source", "/a/0/r/artifacts/y", False, True),
        Ref("model_versions", "m/2", "storage_location", "/a/s/y", False, True),
    )
    conn.execute("DROP TABLE runs")
    with pytest.raises(MlflowStoreError, match="not an MLflow database: no table runs"):
        read_refs(conn, "sqlite")
    conn.close()


def test_importing_the_package_loads_no_mlflow_numpy_or_torch() -> None:
    code = (
        "import sys, ckptguard.mlflow as m, ckptguard.mlflow.snapshot, ckptguard.mlflow.check\n"
        "assert m.take_snapshot and m.check_consistency and m.Roots\n"
        "print(' '.join(x for x in ('mlflow', 'numpy', 'torch', 'psycopg2', 'pyarrow')"
        " if x in sys.modules))\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == []


# ---- against a real store -------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A server of this module's own (not the session's): the counts below are of a store that
    holds only what ``store`` logs."""
    workdir = tmp_path_factory.mktemp("mlflow-check")
    server = start_server("sqlite", f"sqlite:///{workdir / 'mlflow.db'}", workdir)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def store(
    mlflow_sqlite: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Logged, Snapshot]:
    """A populated server and a snapshot of its store."""
    logged = populate(mlflow_sqlite, tmp_path_factory.mktemp("files"), "check")
    return logged, take_snapshot(mlflow_sqlite.backend_uri, tmp_path_factory.mktemp("snap"))


@pytest.fixture
def tree(mlflow_sqlite: MlflowServer, tmp_path: Path) -> Path:
    """A copy of the server's artifacts to damage."""
    return Path(shutil.copytree(mlflow_sqlite.artifacts, tmp_path / "artifacts", symlinks=True))


def test_a_store_as_logged_is_consistent(store: tuple[Logged, Snapshot], tree: Path) -> None:
    logged, snap = store
    report = check_consistency(snap.references, Roots(artifacts_destination=str(tree)))
    assert report.ok, report.to_json()
    tables = [r.table for r in snap.references]
    # Default experiment and ours; two runs; versions (storage_location where it differs).
    assert tables.count("experiments") == 2 and tables.count("runs") == 2
    assert {r.row for r in snap.references if r.table == "model_versions"} == set(logged.versions)
    assert tables.count("logged_models") == len(logged.logged_models)
    assert report.references == len(snap.references) == report.consistent
    assert report.fraction_consistent == 1.0
    assert report.empty == 1  # the Default experiment's directory: nothing logged there
    assert report.to_json()["ok"] is True


def test_dangling_references_and_orphans_are_found(
    store: tuple[Logged, Snapshot], tree: Path
) -> None:
    logged, snap = store
    exp = tree / logged.experiment
    shutil.rmtree(exp / logged.runs[0] / "artifacts" / "model")  # version 1's files
    for p in (exp / logged.runs[1] / "artifacts" / "model").iterdir():
        p.unlink()  # version 2's directory left empty
    (tree / "999").mkdir()  # an experiment no row names
    (exp / "0123abcd").mkdir()  # a run no row names
    (exp / "stray.txt").write_text("x")
    (exp / logged.runs[1] / "artifacts" / "extra.txt").write_text("x")  # the run's own
    report = check_consistency(snap.references, Roots(artifacts_destination=str(tree)))

    dangling = {(d.ref.row, d.ref.column, d.reason) for d in report.dangling}
    name = logged.versions[0].split("/")[0]
    expected = {(f"{name}/1", "source", "missing"), (f"{name}/2", "source", "an empty directory")}
    if logged.logged_models:  # its files gone: the logged model and the version made of it
        model = logged.logged_models[0]
        shutil.rmtree(exp / "models" / model / "artifacts")
        report = check_consistency(snap.references, Roots(artifacts_destination=str(tree)))
        dangling = {(d.ref.row, d.ref.column, d.reason) for d in report.dangling}
        expected |= {
            (model, "artifact_location", "missing"),
            (f"{name}/3", "source", "missing"),
            (f"{name}/3", "storage_location", "missing"),
        }
    assert dangling == expected
    assert report.orphans == sorted(
        str(p) for p in (tree / "999", exp / "0123abcd", exp / "stray.txt")
    )
    assert report.consistent == report.references - len(expected)
    assert report.fraction_consistent == pytest.approx(1 - len(expected) / report.references)
    assert not report.ok
    as_json = report.to_json()
    assert {d["reason"] for d in as_json["dangling"]} == {e[2] for e in expected}
    assert as_json["orphans"] == report.orphans


def test_a_reference_outside_the_roots_is_dangling(
    store: tuple[Logged, Snapshot], tree: Path
) -> None:
    """Checked against another root (or none for mlflow-artifacts:), every reference is
    dangling with the resolver's reason; nothing is counted consistent."""
    _, snap = store
    report = check_consistency(snap.references, Roots(local=(str(tree),)))
    assert report.consistent == 0 and len(report.dangling) == report.references
    assert all(d.path is None for d in report.dangling)
    assert any("no artifacts destination" in d.reason for d in report.dangling)
