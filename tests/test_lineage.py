"""Training lineage (ckptguard.lineage): save(..., mlflow_run=...) records the MLflow run in the
checkpoint's metadata and tags the run with the checkpoint, against a real MLflow tracking store
(SQLite, in process)."""

from __future__ import annotations

import hashlib
import os
import threading
import warnings

import pytest
import torch

import ckptguard
from ckptguard import lineage
from ckptguard.errors import CheckpointWarning, LineageError
from ckptguard.options import SaveOptions

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.backend_independent  # lineage never changes how records are written

STATE = {"w": torch.arange(6.0)}


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A SQLite tracking store with one experiment, used by every test of the module."""
    root = tmp_path_factory.mktemp("mlruns")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("lineage")
    yield uri
    mlflow.set_tracking_uri(before)


def _manifest_sha256(path: str) -> str:
    with open(os.path.join(path, "MANIFEST.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_active_run_is_recorded_and_tagged(tracking, tmp_path):
    path = str(tmp_path / "store" / "step-7")
    with mlflow.start_run(run_name="train") as run:
        mlflow.log_params({"lr": "0.001", "layers": "12"})
        mlflow.set_tag("mlflow.source.git.commit", "0123abcd" * 5)
        info = ckptguard.save(STATE, path, mlflow_run=True, step=7, metadata={"note": "x"})
    rid = run.info.run_id
    got = ckptguard.describe(path).info.metadata
    assert got["note"] == "x"
    assert got["mlflow"]["run_id"] == rid
    assert got["mlflow"]["run_name"] == "train"
    assert got["mlflow"]["params"] == {"lr": "0.001", "layers": "12"}
    assert got["mlflow"]["commit"] == "0123abcd" * 5
    assert got["mlflow"]["experiment_id"] == run.info.experiment_id
    assert got["mlflow"]["tracking_uri"] == tracking
    assert info.metadata == got
    tags = mlflow.MlflowClient().get_run(rid).data.tags
    assert tags["ckptguard.checkpoint"] == "file://" + os.path.abspath(path)
    assert tags["ckptguard.manifest_sha256"] == _manifest_sha256(path)
    assert tags["ckptguard.step"] == "7"
    torch.testing.assert_close(ckptguard.load(path)["w"], STATE["w"])


def test_run_id_and_one_file_checkpoint(tracking, tmp_path):
    from ckptguard.commit import manifest_sha256

    rid = mlflow.MlflowClient().create_run(mlflow.get_experiment_by_name("lineage").experiment_id)
    run_id = rid.info.run_id
    path = str(tmp_path / "model.pt")
    ckptguard.save(STATE, path, mlflow_run=run_id)
    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    assert tags["ckptguard.checkpoint"] == "file://" + path
    assert tags["ckptguard.manifest_sha256"] == manifest_sha256(path)
    assert len(tags["ckptguard.manifest_sha256"]) == 64
    assert ckptguard.describe(path).info.metadata["mlflow"]["run_id"] == run_id


def test_active_run_is_taken_in_the_callers_thread(tracking, tmp_path):
    """MLflow keeps the active run per thread: the one of the thread that calls save."""
    with mlflow.start_run() as run:
        opt_run = lineage.normalize(True)
    assert opt_run == {"run_id": run.info.run_id, "tracking_uri": tracking}
    seen: list = []
    t = threading.Thread(target=lambda: seen.append(lineage.normalize(True)))
    with mlflow.start_run():
        t.start()
        t.join()
    assert seen == [{"run_id": None, "tracking_uri": tracking}]


def _nothing_written(store) -> None:
    assert not store.exists() or os.listdir(store) in ([], [".keys"])


def test_no_active_run_fails_before_anything_is_written(tracking, tmp_path):
    assert mlflow.active_run() is None
    store = tmp_path / "store"
    with pytest.raises(LineageError, match="no MLflow run is active"):
        ckptguard.save(STATE, str(store / "a"), mlflow_run=True)
    _nothing_written(store)


def test_unknown_run_fails_before_anything_is_written(tracking, tmp_path):
    store = tmp_path / "store"
    with pytest.raises(LineageError, match="could not be read from sqlite"):
        ckptguard.save(STATE, str(store / "a"), mlflow_run="f" * 32)
    _nothing_written(store)


def test_a_previous_checkpoint_survives_a_failed_lineage(tracking, tmp_path):
    path = str(tmp_path / "store" / "a")
    ckptguard.save(STATE, path)
    before = _manifest_sha256(path)
    with pytest.raises(LineageError):
        ckptguard.save({"w": torch.zeros(2)}, path, overwrite=True, mlflow_run="0" * 32)
    assert _manifest_sha256(path) == before


def test_tagging_failure_after_the_commit_is_a_warning(tracking, tmp_path):
    client = mlflow.MlflowClient()
    run = client.create_run(mlflow.get_experiment_by_name("lineage").experiment_id)
    client.delete_run(run.info.run_id)  # still readable, no longer taggable
    path = str(tmp_path / "store" / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckptguard.save(STATE, path, mlflow_run=run.info.run_id)
    msgs = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert any("tagging MLflow run" in m and "is committed" in m for m in msgs), msgs
    assert ckptguard.verify(path).ok


@pytest.mark.parametrize(
    ("metadata", "error"),
    [("a string", TypeError), ([1, 2], TypeError), ({"mlflow": 1}, ValueError)],
)
def test_metadata_must_leave_room(tracking, tmp_path, metadata, error):
    with pytest.raises(error, match="mlflow"):
        ckptguard.save(STATE, str(tmp_path / "s" / "a"), mlflow_run="x", metadata=metadata)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "bad", [3, 1.5, "", "a\nb", {"run_id": "x"}, {"run_id": "x", "tracking_uri": ""}, object()]
)
def test_bad_mlflow_run_values_are_refused(bad):
    with pytest.raises((TypeError, ValueError)):
        lineage.normalize(bad)


def test_the_handed_off_form_round_trips(tracking):
    run = {"run_id": "abc", "tracking_uri": tracking}
    assert lineage.normalize(run) == run
    opt = SaveOptions(mlflow_run=run)
    assert SaveOptions.from_kwargs(opt.to_json()).mlflow_run == run


@pytest.mark.parametrize(
    ("uri", "safe"),
    [
        ("postgresql://u:secret@db:5432/mlflow", "postgresql://db:5432/mlflow"),
        ("https://user@host/x", "https://host/x"),
        ("sqlite:////tmp/a.db", "sqlite:////tmp/a.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_recorded_uris_carry_no_credentials(uri, safe):
    assert lineage.safe_uri(uri) == safe


def test_async_save_records_the_callers_run(tracking, tmp_path):
    """save_async encodes and commits on background threads; the run is the caller's."""
    with ckptguard.Checkpointer(str(tmp_path / "store")) as ckpt, mlflow.start_run() as run:
        ckpt.save_async(STATE, "a", mlflow_run=True).result()
    meta = ckptguard.describe(str(tmp_path / "store" / "a")).info.metadata
    assert meta["mlflow"]["run_id"] == run.info.run_id
    tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["ckptguard.checkpoint"].endswith("/store/a")
