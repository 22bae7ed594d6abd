"""ckptguard mlflow backup / restore on a real MLflow store (SQLite, in process, artifacts in a
local root): the round trip, what the backup refuses and skips, hostile backups, corruption
found by verify. The live-server round trips (SQLite and PostgreSQL, a client logging during
the backup) are in test_mlflow_roundtrip.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

import ckptguard
from ckptguard.errors import MlflowBackupError, MlflowRestoreError
from ckptguard.mlflow.backup import backup
from ckptguard.mlflow.refs import Roots
from ckptguard.mlflow.restore import restore

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.backend_independent  # a backup is an ordinary save: both backends ran it


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A tracking store in ``tmp_path/src``: two runs with params, metrics and artifacts, a
    registered model with two versions and an alias."""
    src = tmp_path / "src"
    (src / "mlruns").mkdir(parents=True)
    monkeypatch.chdir(src)  # the Default experiment's location: ./mlruns, made absolute
    uri = f"sqlite:///{src / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri, uri)
    exp = client.create_experiment("e", artifact_location=str(src / "mlruns" / "e"))
    runs = []
    for i in range(2):
        run = client.create_run(exp, run_name=f"r{i}")
        rid = run.info.run_id
        client.log_param(rid, "lr", str(0.1 * (i + 1)))
        for step in range(3):
            client.log_metric(rid, "loss", 1.0 / (step + 1), step=step)
        f = tmp_path / f"weights{i}.bin"
        f.write_bytes(os.urandom(5000 + i))
        client.log_artifact(rid, str(f), "model")
        (tmp_path / "cfg.json").write_text(json.dumps({"i": i}))
        client.log_artifact(rid, str(tmp_path / "cfg.json"))
        client.set_terminated(rid)
        runs.append(rid)
    client.create_registered_model("m")
    for rid in runs:
        client.create_model_version("m", f"runs:/{rid}/model", rid)
    client.set_registered_model_alias("m", "champion", "2")
    yield {"uri": uri, "root": str(src / "mlruns"), "client": client, "runs": runs}
    mlflow.set_tracking_uri(None)


def _snapshot_of(client, runs):
    """What a restored server must answer the same: runs, params, metrics, tags, versions."""
    out = {}
    for rid in runs:
        r = client.get_run(rid)
        hist = [(m.step, m.value) for m in client.get_metric_history(rid, "loss")]
        tags = {k: v for k, v in r.data.tags.items() if not k.startswith("ckptguard.")}
        out[rid] = (r.info.run_name, r.info.status, dict(r.data.params), hist, tags)
    versions = sorted(
        (v.version, v.run_id, v.source, v.current_stage)
        for v in client.search_model_versions("name='m'")
    )
    out["versions"] = versions
    out["alias"] = client.get_model_version_by_alias("m", "champion").version
    return out


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def test_backup_and_restore_round_trip(server, tmp_path):
    res = backup(server["uri"], str(tmp_path / "store"), Roots(None, (server["root"],)))
    assert not res.report.dangling, res.report.to_json()["dangling"]
    assert res.report.fraction_consistent == 1.0
    assert res.files == 4 and not res.skipped
    assert ckptguard.verify(res.info.path).ok
    meta = ckptguard.describe(res.info.path).info.metadata["mlflow_backup"]
    assert meta["kind"] == "sqlite" and meta["alembic_revision"] and meta["files"] == 4
    before = _snapshot_of(server["client"], server["runs"])

    dst = tmp_path / "dst"
    dst.mkdir()
    new_uri = f"sqlite:///{dst / 'mlflow.db'}"
    new_root = str(dst / "artifacts")
    out = restore(
        str(tmp_path / "store"), new_uri, Roots(None, ()), root_map={server["root"]: new_root}
    )
    assert out.files == 4 and out.rewritten >= 3  # the experiment and both runs
    assert _files(new_root) == _files(server["root"])
    client = mlflow.MlflowClient(new_uri, new_uri)
    assert _snapshot_of(client, server["runs"]) == before
    run = client.get_run(server["runs"][0])
    assert run.info.artifact_uri.startswith(new_root)
    got = client.download_artifacts(server["runs"][0], "model", str(tmp_path / "dl"))
    want = os.path.join(server["root"], "e", server["runs"][0], "artifacts", "model")
    assert _files(got) == _files(want)


def test_restore_refuses_targets_that_are_not_fresh(server, tmp_path):
    res = backup(server["uri"], str(tmp_path / "store"), Roots(None, (server["root"],)))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    with pytest.raises(MlflowRestoreError, match="not empty"):
        restore(
            res.info.path,
            f"sqlite:///{tmp_path / 'new.db'}",
            Roots(None, ()),
            root_map={server["root"]: str(busy)},
        )
    assert not (tmp_path / "new.db").exists()
    with pytest.raises(MlflowRestoreError, match="exists"):
        restore(res.info.path, server["uri"], Roots(None, ()), root_map={server["root"]: "/x/y"})
    assert (busy / "x").read_text() == "keep me"


def test_links_and_fifos_in_artifacts_are_skipped_not_followed(server, tmp_path):
    run_dir = Path(server["root"]) / "e" / server["runs"][0] / "artifacts"
    secret = tmp_path / "secret"
    secret.write_text("outside the artifact root")
    os.symlink(secret, run_dir / "link")
    os.symlink(tmp_path, run_dir / "dirlink")
    os.mkfifo(run_dir / "fifo")
    res = backup(server["uri"], str(tmp_path / "store"), Roots(None, (server["root"],)))
    assert set(res.skipped) == {str(run_dir / n) for n in ("link", "dirlink", "fifo")}
    tree = ckptguard.load(res.info.path)
    stored = b"".join(bytes(a) for files in tree["artifacts"] for a in files.values())
    assert b"outside the artifact root" not in stored


def test_max_memory_refuses_before_anything_is_committed(server, tmp_path):
    with pytest.raises(MlflowBackupError, match=r"^/.*: the backup would hold more than max_mem"):
        backup(
            server["uri"], str(tmp_path / "store"), Roots(None, (server["root"],)), max_memory=1024
        )
    assert not (tmp_path / "store").exists() or not ckptguard.Store(str(tmp_path / "store")).list()


def test_a_failed_backup_keeps_the_previous_one(server, tmp_path):
    store = str(tmp_path / "store")
    first = backup(server["uri"], store, Roots(None, (server["root"],)), name="b1")
    with pytest.raises(ckptguard.CheckpointExistsError, match="b1 exists"):
        backup(server["uri"], store, Roots(None, (server["root"],)), name="b1")
    with pytest.raises(Exception, match="sqlite"):
        backup("sqlite:///" + str(tmp_path / "nope.db"), store, Roots(None, ()), name="b2")
    assert [c.name for c in ckptguard.Store(store).list()] == ["b1"]
    assert ckptguard.verify(first.info.path).ok


@pytest.mark.parametrize("what", ["database", "artifact"])
def test_verify_names_a_corrupted_file(server, tmp_path, what):
    res = backup(
        server["uri"], str(tmp_path / "store"), Roots(None, (server["root"],)), compress="none"
    )
    tree = ckptguard.load(res.info.path)
    needle = bytes(tree["database"][:4096]) if what == "database" else None
    if needle is None:
        files = tree["artifacts"][0]
        key = next(k for k in files if k.endswith("weights0.bin"))
        needle = bytes(files[key][:64])
    data = next(Path(res.info.path).glob("rank-*.ckg"))
    raw = bytearray(data.read_bytes())
    at = raw.find(needle)
    assert at >= 0
    raw[at + 10] ^= 0xFF
    os.chmod(data, 0o644)
    data.write_bytes(bytes(raw))
    report = ckptguard.verify(res.info.path)
    assert not report.ok
    text = " ".join(map(str, report.problems))
    assert ("database" if what == "database" else "weights0.bin") in text


def _hostile(tmp_path, rel: str) -> str:
    path = str(tmp_path / "hostile" / "b")
    tree = {
        "mlflow_backup": 1,
        "snapshot": {"kind": "sqlite"},
        "roots": {"destination": None, "local": ["/tmp/r"]},
        "database": np.zeros(4, dtype=np.uint8),
        "artifacts": [{rel: np.ones(3, dtype=np.uint8)}],
    }
    ckptguard.save(tree, path)
    return path


@pytest.mark.parametrize("rel", ["../../etc/x", "/abs", "a/../b", "a//b", "./a", "a\0b"])
def test_hostile_paths_in_a_backup_are_refused(tmp_path, rel):
    path = _hostile(tmp_path, rel)
    target = tmp_path / "t"
    with pytest.raises(MlflowRestoreError, match="not a plain relative path"):
        restore(
            path,
            f"sqlite:///{target / 'db'}",
            Roots(None, ()),
            root_map={"/tmp/r": str(target / "root")},
        )
    assert not target.exists()


# ---- a live server, a client logging throughout the backup ------------------------------------


def _in_snapshot(res, table: str) -> set[str]:
    return {r.row for r in res.snapshot.references if r.table == table}


def _run_answers(client, rid: str, scratch: Path) -> tuple:
    r = client.get_run(rid)
    info = r.info
    history = {
        k: [(m.step, m.timestamp, m.value) for m in client.get_metric_history(rid, k)]
        for k in r.data.metrics
    }
    files = _files(client.download_artifacts(rid, "", str(scratch)))
    return (
        (info.run_name, info.status, info.start_time, info.end_time, info.lifecycle_stage),
        (info.artifact_uri, info.experiment_id),
        dict(r.data.params),
        dict(r.data.metrics),
        dict(r.data.tags),
        history,
        files,
    )


def _registry_answers(client, versions: set[str]) -> dict:
    out = {}
    for key in sorted(versions):
        name, version = key.rsplit("/", 1)
        v = client.get_model_version(name, version)
        out[key] = (v.source, v.run_id, v.status, v.current_stage, sorted(v.aliases), v.tags)
        model = client.get_registered_model(name)
        out[name] = (model.description, dict(model.tags), dict(model.aliases))
    return out


def test_backup_while_a_client_logs_restores_identically(mlflow_server, tmp_path):
    from mlflowkit import (
        Logger,
        create_database,
        drop_database,
        populate,
        postgres_admin_url,
        start_server,
        stop_server,
    )

    server = mlflow_server
    logged = populate(server, tmp_path / "files", f"backup-{server.kind}")
    note = tmp_path / "note.txt"
    note.write_text("logged while the backup ran\n")
    logger = Logger(server, logged.experiment, note)
    logger.start()
    try:
        logger.wait_for(lambda: len(logger.finished) >= 3, "finished 3 runs")
        began = time.monotonic()
        res = backup(server.backend_uri, str(tmp_path / "store"), Roots(str(server.artifacts)))
        done = time.monotonic()
        logger.wait_for(lambda: sum(b > done for _, b, _ in logger.created) >= 2, "went on")
    finally:
        logger.halt.set()
        logger.join(60)
    assert not logger.errors, logger.errors
    assert not res.report.dangling, res.report.to_json()["dangling"]
    assert res.report.fraction_consistent == 1.0
    assert ckptguard.verify(res.info.path).ok
    runs = _in_snapshot(res, "runs")
    assert set(logged.runs) <= runs and {rid for rid, _, _ in logger.created} - runs

    work = tmp_path / "restored"
    new_uri = f"sqlite:///{work / 'mlflow.db'}"
    if server.kind == "postgresql":
        new_uri = create_database(postgres_admin_url())
    try:
        work.mkdir()
        restore(res.info.path, new_uri, Roots(str(work / "artifacts")))
        new = start_server(server.kind, new_uri, work)
        try:
            old_c, new_c = server.client(), new.client()
            # runs whose logging ended before the backup began: every answer the same; the
            # others the snapshot caught mid-way: present
            whole = set(logged.runs) | {r for r, t in logger.finished.items() if t < began}
            assert whole <= runs
            for rid in sorted(whole):
                a = _run_answers(old_c, rid, tmp_path / "a" / rid)
                b = _run_answers(new_c, rid, tmp_path / "b" / rid)
                assert a == b, rid
            assert all(new_c.get_run(rid).info.run_id == rid for rid in runs - whole)
            versions = _in_snapshot(res, "model_versions")
            assert set(logged.versions) <= versions
            assert _registry_answers(old_c, versions) == _registry_answers(new_c, versions)
            for mid in _in_snapshot(res, "logged_models"):
                m1, m2 = old_c.get_logged_model(mid), new_c.get_logged_model(mid)
                assert (m1.name, m1.status, m1.artifact_location) == (
                    m2.name,
                    m2.status,
                    m2.artifact_location,
                )
            for exp in _in_snapshot(res, "experiments"):
                e1, e2 = old_c.get_experiment(exp), new_c.get_experiment(exp)
                assert (e1.name, e1.artifact_location, e1.tags) == (
                    e2.name,
                    e2.artifact_location,
                    e2.tags,
                )
            later = {rid for rid, _, _ in logger.created} - runs
            assert all(_missing(new_c, rid) for rid in later)
        finally:
            stop_server(new)
    finally:
        if server.kind == "postgresql":
            drop_database(new_uri)


def _missing(client, rid: str) -> bool:
    try:
        client.get_run(rid)
    except Exception:
        return True
    return False


def test_examples_mlflow_demo(tmp_path):
    """The MLflow part of `make demo` runs and passes its own checks."""
    import subprocess
    import sys

    demo = Path(__file__).resolve().parent.parent / "examples" / "mlflow_demo.py"
    proc = subprocess.run(
        [sys.executable, str(demo), "--dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4/4 references consistent" in proc.stdout and "All checks passed." in proc.stdout


def test_signed_backup_restores_only_under_its_key(server, tmp_path):
    from ckptguard import keys
    from ckptguard.errors import SignatureError
    from ckptguard.sign import trust_set

    priv, pub, _ = keys.generate(tmp_path / "k")
    _, other, _ = keys.generate(tmp_path / "other")
    roots = Roots(None, (server["root"],))
    res = backup(server["uri"], str(tmp_path / "store"), roots, sign_key=priv)
    assert ckptguard.verify(res.info.path, trusted_keys=trust_set([pub])).ok
    new = tmp_path / "new"
    with pytest.raises(SignatureError):
        restore(
            res.info.path,
            f"sqlite:///{new / 'db'}",
            Roots(None, ()),
            root_map={server["root"]: str(new / "r")},
            trusted_keys=trust_set([other]),
        )
    assert not new.exists()
    new.mkdir()
    out = restore(
        res.info.path,
        f"sqlite:///{new / 'db'}",
        Roots(None, ()),
        root_map={server["root"]: str(new / "r")},
        trusted_keys=trust_set([pub]),
    )
    assert out.files == 4


def test_restore_writes_only_where_it_is_told(server, tmp_path):
    """A backup's roots are paths it names itself: each must be placed (--map), and an
    artifacts destination given for a backup without one is refused; nothing is written."""
    res = backup(server["uri"], str(tmp_path / "store"), Roots(None, (server["root"],)))
    new = tmp_path / "new"
    with pytest.raises(MlflowRestoreError, match="has no place to go: give --map"):
        restore(res.info.path, f"sqlite:///{new / 'db'}", Roots(None, ()))
    with pytest.raises(MlflowRestoreError, match="no artifacts destination"):
        restore(res.info.path, f"sqlite:///{new / 'db'}", Roots(str(new / "dest"), ()))
    assert not new.exists()
