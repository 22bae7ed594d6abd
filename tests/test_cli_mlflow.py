"""``ckptguard mlflow backup|restore|check`` from the command line, on an MLflow store in
process (SQLite, a local artifact root): exit codes, JSON output, errors as one line."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from ckptguard.cli import cli

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.backend_independent  # the saves are ordinary ones


@pytest.fixture
def store_uri(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "mlruns").mkdir(parents=True)
    monkeypatch.chdir(src)
    uri = f"sqlite:///{src / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    exp = client.create_experiment("e", artifact_location=str(src / "mlruns" / "e"))
    rid = client.create_run(exp).info.run_id
    (tmp_path / "a.txt").write_text("artifact")
    client.log_artifact(rid, str(tmp_path / "a.txt"))
    return uri, str(src / "mlruns"), rid


def test_backup_check_restore(store_uri, tmp_path):
    uri, root, rid = store_uri
    run = CliRunner().invoke
    r = run(cli, ["mlflow", "check", "--backend-store-uri", uri, "--artifact-root", root])
    # the Default experiment, ours and the run
    assert r.exit_code == 0 and "3/3 references consistent (100.00%), 0 orphans" in r.output, (
        r.output
    )
    store = str(tmp_path / "backups")
    args = ["mlflow", "backup", store, "--backend-store-uri", uri, "--artifact-root", root]
    r = run(cli, [*args, "--name", "b1", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["name"] == "b1" and out["files"] == 1 and out["consistency"]["ok"]
    r = run(cli, ["verify", os.path.join(store, "b1")])
    assert r.exit_code == 0, r.output

    new_root = str(tmp_path / "restored" / "mlruns")
    new_uri = f"sqlite:///{tmp_path / 'restored' / 'mlflow.db'}"
    os.makedirs(os.path.dirname(new_root))
    restore = ["mlflow", "restore", store, "--backend-store-uri", new_uri]
    r = run(cli, [*restore, "--map", f"{root}={new_root}"])
    assert r.exit_code == 0 and "restored 1 artifact files" in r.output, r.output
    with open(os.path.join(new_root, "e", rid, "artifacts", "a.txt")) as f:
        assert f.read() == "artifact"
    r = run(cli, [*restore, "--map", f"{root}={new_root}"])  # again: nothing is overwritten
    assert r.exit_code == 2 and r.output.startswith("error: ") and "not empty" in r.output, r.output
    r = run(cli, ["mlflow", "check", "--backend-store-uri", new_uri, "--artifact-root", new_root])
    assert r.exit_code == 0, r.output


def test_check_exits_1_and_backup_says_what_it_lacks(store_uri, tmp_path):
    uri, root, rid = store_uri
    shutil.rmtree(os.path.join(root, "e", rid))
    os.makedirs(os.path.join(root, "e", "stray"))
    open(os.path.join(root, "e", "stray", "x"), "w").close()
    run = CliRunner().invoke
    r = run(cli, ["mlflow", "check", "--backend-store-uri", uri, "--artifact-root", root])
    assert r.exit_code == 1 and "orphan: " in r.output and "stray" in r.output, r.output
    store = str(tmp_path / "backups")
    r = run(cli, ["mlflow", "backup", store, "--backend-store-uri", uri, "--artifact-root", root])
    assert r.exit_code == 0, r.output  # a run's directory appears with its first artifact


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["check", "--backend-store-uri", "sqlite:///nope.db", "--artifact-root", "."], "nope"),
        (["check", "--backend-store-uri", "mysql://x/y", "--artifact-root", "."], "unsupported"),
        (["check", "--backend-store-uri", "sqlite:///x.db"], "--artifacts-destination"),
        (["restore", "nowhere", "--backend-store-uri", "sqlite:///y.db"], "no checkpoint"),
        (["restore", ".", "--backend-store-uri", "sqlite:///y.db", "--map", "x"], "OLD=NEW"),
    ],
)
def test_errors_are_one_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["mlflow", *args])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and message in r.output, r.output
    assert not (tmp_path / "y.db").exists() and not (tmp_path / "nope.db").exists()
