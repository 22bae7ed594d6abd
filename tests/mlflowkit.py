"""Real MLflow tracking servers for the tests of ckptguard.mlflow (tests/test_mlflow_*.py):
``mlflow server`` in a process group of its own on 127.0.0.1, a free port, its artifacts proxied
(``--serve-artifacts``) into a directory of the test's, over SQLite (a file in the test's
directory) or PostgreSQL (a fresh database on the server of services/postgres.sh, which the
fixture starts; skipped with the reason where it cannot, failed under CI=true). Loaded as a
plugin by conftest.py, so ``mlflow_sqlite``, ``mlflow_postgres`` and ``mlflow_server`` (both, as
parameters) are fixtures; each server is shared by every test of the session (each test logs
into experiments of its own)."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CI = os.environ.get("CI") == "true"
ROOT = Path(__file__).resolve().parent.parent
POSTGRES_SH = ROOT / "services" / "postgres.sh"
START_TIMEOUT = 180.0  # a cold start migrates a fresh database through every alembic revision


@dataclass
class MlflowServer:
    """A running ``mlflow server``: its URL, backend store URI, artifacts destination, log."""

    kind: str
    url: str
    backend_uri: str
    artifacts: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def client(self) -> Any:
        """An ``MlflowClient`` talking to this server over HTTP (tracking and registry)."""
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url, registry_uri=self.url)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def unavailable(reason: str) -> None:
    """Skip the test, or fail it under CI=true, where `make test` installs the mlflow extra and
    can start PostgreSQL."""
    if CI:
        pytest.fail(f"the MLflow tests cannot run in CI: {reason}", False)
    pytest.skip(reason)


def need(module: str) -> None:
    """``module`` importable, or the test skipped (failed under CI=true)."""
    try:
        importlib.import_module(module)
    except ImportError:
        unavailable(f"{module} is not installed (pip install -e '.[mlflow]')")


def _free_port() -> int:
    from conftest import free_port

    return free_port()


def start_server(kind: str, backend_uri: str, workdir: Path) -> MlflowServer:
    """``mlflow server`` on ``backend_uri`` with its artifacts under ``workdir/artifacts``,
    waited for until /health answers; the test fails with the server's log if it exits or
    does not answer in START_TIMEOUT s."""
    need("mlflow")
    artifacts = workdir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = workdir / "mlflow-server.log"
    args = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--serve-artifacts", "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with open(log, "wb") as out:
        # cwd: the server writes nothing into the checkout; a group of its own: killed whole.
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True
        )
    server = MlflowServer(kind, f"http://127.0.0.1:{port}", backend_uri, artifacts, log, proc)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited {proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.3)
    stop_server(server)
    pytest.fail(f"mlflow server did not answer in {START_TIMEOUT:.0f} s:\n{server.log_tail()}")


def stop_server(server: MlflowServer) -> None:
    """Kill the server's process group (uvicorn and any worker), SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(server.proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


# ---- PostgreSQL -----------------------------------------------------------------------------


def postgres_admin_url() -> str:
    """services/postgres.sh started (idempotent) and the URL of its ``postgres`` database; skip
    (fail in CI) where it cannot start."""
    if os.geteuid() != 0:
        unavailable("services/postgres.sh needs root (it runs PostgreSQL as the postgres user)")
    from conftest import run_command

    proc = run_command([POSTGRES_SH, "start"], 600)
    if proc.returncode != 0:
        unavailable(f"services/postgres.sh start failed: {proc.stderr.strip()[-2000:]}")
    url = run_command([POSTGRES_SH, "url", "postgres"], 30)
    assert url.returncode == 0, url.stderr
    return url.stdout.strip()


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg2://``) as libpq takes it (``postgresql://``)."""
    scheme, rest = url.split("://", 1)
    return f"{scheme.split('+', 1)[0]}://{rest}"


def _pg_autocommit(url: str) -> Any:
    import psycopg2

    conn = psycopg2.connect(libpq_url(url), connect_timeout=10)
    conn.autocommit = True
    return conn


def create_database(admin_url: str) -> str:
    """A fresh database on the server of ``admin_url``; its URL."""
    name = f"mlflow_test_{uuid.uuid4().hex[:12]}"
    conn = _pg_autocommit(admin_url)
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def drop_database(url: str) -> None:
    admin, name = url.rsplit("/", 1)
    conn = _pg_autocommit(f"{admin}/postgres")
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mlflow_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """An MLflow server on a fresh SQLite file, shared by the session's tests."""
    workdir = tmp_path_factory.mktemp("mlflow-sqlite")
    server = start_server("sqlite", f"sqlite:///{workdir / 'mlflow.db'}", workdir)
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def mlflow_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """An MLflow server on a fresh PostgreSQL database (dropped at the end), shared by the
    session's tests."""
    need("psycopg2")
    url = create_database(postgres_admin_url())
    workdir = tmp_path_factory.mktemp("mlflow-postgres")
    try:
        server = start_server("postgresql", url, workdir)
        yield server
        stop_server(server)
    finally:
        drop_database(url)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def mlflow_server(request: pytest.FixtureRequest) -> MlflowServer:
    """Each backend store in turn: the tests that take it run on SQLite, then on PostgreSQL."""
    name = "mlflow_sqlite" if request.param == "sqlite" else "mlflow_postgres"
    return request.getfixturevalue(name)


# ---- contents -------------------------------------------------------------------------------


class Logger(threading.Thread):
    """A client that keeps creating runs (a param, a metric, an artifact each) until stopped,
    recording when each create_run call began and returned."""

    def __init__(self, server: MlflowServer, experiment: str, artifact: Path) -> None:
        super().__init__(daemon=True)
        self.client = server.client()
        self.experiment = experiment
        self.artifact = artifact
        self.created: list[tuple[str, float, float]] = []  # run id, began, returned
        self.finished: dict[str, float] = {}  # run id: when set_terminated returned
        self.errors: list[BaseException] = []
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                began = time.monotonic()
                rid = self.client.create_run(self.experiment).info.run_id
                self.created.append((rid, began, time.monotonic()))
                self.client.log_param(rid, "n", len(self.created))
                self.client.log_metric(rid, "x", 1.0)
                self.client.log_artifact(rid, str(self.artifact))
                self.client.set_terminated(rid)
                self.finished[rid] = time.monotonic()
        except BaseException as e:  # reported by the test
            self.errors.append(e)

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"the logging client never {what}"
            time.sleep(0.05)


@dataclass
class Logged:
    """What ``populate`` logged: the experiment, its runs, the model versions (``name/version``)
    and the logged models (MLflow 3)."""

    experiment: str
    runs: list[str]
    versions: list[str]
    logged_models: list[str]


def model_files(directory: Path) -> Path:
    """A small model directory (an MLmodel file and some bytes) to log as artifacts."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "MLmodel").write_text("artifact_path: model\nflavors: {}\n")
    (directory / "weights.bin").write_bytes(os.urandom(4096))
    return directory


def populate(server: MlflowServer, scratch: Path, tag: str) -> Logged:
    """Through the server's HTTP API: an experiment with two finished runs (params, metrics,
    tags, a model's files as artifacts), a registered model with a version from ``runs:/``, one
    from the run's artifact URI and, where MLflow has logged models, a ready logged model and a
    version from ``models:/<model id>``; an alias on the last version."""
    client = server.client()
    files = model_files(scratch / f"files-{tag}")
    exp = client.create_experiment(f"exp-{tag}")
    runs = []
    for i in range(2):
        rid = client.create_run(exp, run_name=f"run-{tag}-{i}").info.run_id
        client.log_param(rid, "lr", 0.1 * (i + 1))
        client.log_metric(rid, "loss", 1.0 / (i + 1), step=i)
        client.set_tag(rid, "stage", "train")
        client.log_artifacts(rid, str(files), "model")
        client.set_terminated(rid)
        runs.append(rid)
    name = f"model-{tag}"
    client.create_registered_model(name)
    versions = [
        client.create_model_version(name, f"runs:/{runs[0]}/model", runs[0]).version,
        client.create_model_version(
            name, f"{client.get_run(runs[1]).info.artifact_uri}/model", runs[1]
        ).version,
    ]
    logged_models = []
    if hasattr(client, "create_logged_model"):
        from mlflow.entities import LoggedModelStatus

        model = client.create_logged_model(exp, name=f"lm-{tag}", source_run_id=runs[0])
        client.log_model_artifacts(model.model_id, str(files))
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        logged_models.append(model.model_id)
        version = client.create_model_version(
            name, f"models:/{model.model_id}", runs[0], model_id=model.model_id
        )
        versions.append(version.version)
    client.set_registered_model_alias(name, "champion", versions[-1])
    return Logged(exp, runs, [f"{name}/{v}" for v in versions], logged_models)
