"""Training lineage: which MLflow run made a checkpoint, and which checkpoints a run made.

``save(..., mlflow_run=...)``: before any file is written, the committer (rank 0) reads the run
from its tracking server (id, name, experiment, params, and the code commit and entry point that
MLflow recorded as the tags ``mlflow.source.git.commit`` and ``mlflow.source.name``) and stores
them as the ``mlflow`` member of the checkpoint's metadata. After the commit it tags the run with
the checkpoint's URI and the SHA-256 of its MANIFEST.json (``ckptguard.checkpoint``,
``ckptguard.manifest_sha256``, ``ckptguard.step``): a model version leads to its run, the run to
its newest checkpoint, and the checkpoint back to the run.

MLflow is imported only when the option is given. A run that cannot be read fails the save
before anything is written (``LineageError``); a tag that cannot be set after the commit is a
``CheckpointWarning`` (the checkpoint stands). The recorded tracking URI never carries a
password: a database URI's credentials are dropped from it.
"""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import LineageError, warn_after_commit

MEMBER = "mlflow"
"""The member of the checkpoint's metadata that holds the run."""
MAX_PARAMS_BYTES = 1 << 20
"""The most bytes of params recorded (MLflow keeps at most 6,000 characters per value)."""
_ATTRS = ("run_id", "tracking_uri")


def normalize(run: Any) -> dict[str, Any] | None:
    """``mlflow_run`` as the save carries it: None, or ``{"run_id", "tracking_uri"}``.

    ``True``: the run active in this thread (MLflow keeps one per thread, so it is looked up
    here, in the caller's thread, not in a background save's); where none is active the value
    stays ``{"run_id": None}`` and only the committer refuses it (other ranks of a job seldom
    have a run). A run id, or an MLflow ``Run``/``ActiveRun``: that run, on the tracking server
    this process uses now. A dict with ``run_id`` and ``tracking_uri`` (the form the agent is
    handed): itself."""
    if run is None or run is False:
        return None
    if isinstance(run, dict):
        rid, uri = run.get("run_id"), run.get("tracking_uri")
        if set(run) != set(_ATTRS) or not (rid is None or isinstance(rid, str) and rid):
            raise TypeError(f"mlflow_run as a dict has exactly the keys {_ATTRS}: {run!r}")
        if not isinstance(uri, str) or not uri:
            raise TypeError(f"mlflow_run: tracking_uri must be a non-empty string: {run!r}")
        return {"run_id": rid, "tracking_uri": uri}
    if run is True:
        mlflow = _mlflow()
        active = mlflow.active_run()
        run_id = active.info.run_id if active is not None else None
    elif isinstance(run, str):
        run_id = run
    elif isinstance(getattr(getattr(run, "info", None), "run_id", None), str):
        run_id = run.info.run_id
    else:
        raise TypeError(
            f"mlflow_run must be True, a run id, an MLflow Run or None, not {type(run).__name__}"
        )
    if run_id is not None and (not run_id or len(run_id) > 256 or not run_id.isprintable()):
        raise ValueError(f"mlflow_run: {run_id!r} is not a run id")
    return {"run_id": run_id, "tracking_uri": _mlflow().get_tracking_uri()}


def resolve(run: dict[str, Any] | None) -> dict[str, Any] | None:
    """The lineage the committer records (the ``mlflow`` member of the metadata), read from the
    tracking server; None without ``mlflow_run``. LineageError if the run cannot be read."""
    if run is None:
        return None
    uri = run["tracking_uri"]
    if run["run_id"] is None:
        raise LineageError(
            "mlflow_run=True, but no MLflow run is active in the thread that called save on "
            "the committing rank (call mlflow.start_run() first, or pass the run id)"
        )
    try:
        got = _mlflow().MlflowClient(tracking_uri=uri).get_run(run["run_id"])
    except Exception as e:  # MLflow raises its own, REST and database errors alike
        raise LineageError(
            f"MLflow run {run['run_id']!r} could not be read from {safe_uri(uri)}: {e}"
        ) from None
    params = dict(got.data.params)
    if sum(len(k) + len(v) for k, v in params.items()) > MAX_PARAMS_BYTES:
        raise LineageError(
            f"MLflow run {run['run_id']!r} has more than {MAX_PARAMS_BYTES} bytes of params "
            "to record in the checkpoint's metadata"
        )
    tags = got.data.tags
    return {
        "tracking_uri": safe_uri(uri),
        "run_id": got.info.run_id,
        "run_name": got.info.run_name,
        "experiment_id": got.info.experiment_id,
        "params": params,
        "commit": tags.get("mlflow.source.git.commit"),
        "source": tags.get("mlflow.source.name"),
    }


def merged(metadata: Any, lineage: dict[str, Any] | None) -> Any:
    """The metadata the manifest records: the user's, with the ``mlflow`` member added."""
    if lineage is None:
        return metadata
    return {**(metadata or {}), MEMBER: lineage}


def check_metadata(metadata: Any) -> None:
    """With ``mlflow_run``, the user's metadata must leave room for the ``mlflow`` member."""
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(
            "mlflow_run records the run in the metadata's 'mlflow' member: metadata must then be "
            f"a dict or None, not {type(metadata).__name__}"
        )
    if metadata and MEMBER in metadata:
        raise ValueError("mlflow_run records the run as metadata['mlflow']: that key is taken")


def tag_run(run: dict[str, Any], path: str, step: int | None, digest: Callable[[], str]) -> None:
    """Tag the run with a committed checkpoint (``digest``: its manifest's SHA-256, read
    here); a failure is a CheckpointWarning."""
    try:
        tags = {
            "ckptguard.checkpoint": Path(path).absolute().as_uri(),
            "ckptguard.manifest_sha256": digest(),
        }
        if step is not None:
            tags["ckptguard.step"] = str(step)
        client = _mlflow().MlflowClient(tracking_uri=run["tracking_uri"])
        for key, value in tags.items():
            client.set_tag(run["run_id"], key, value)
    except Exception as e:  # the commit stands whatever the tracking server says
        warn_after_commit(
            f"the checkpoint {path} is committed, but tagging MLflow run {run['run_id']!r} "
            f"failed: {e}",
            stacklevel=3,
        )


def safe_uri(uri: str) -> str:
    """``uri`` without the user name and password of its network location."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


_lock = threading.Lock()


def _mlflow() -> Any:
    with _lock:  # one import, however many threads ask
        try:
            import mlflow
        except ImportError:
            raise LineageError(
                "mlflow_run needs the mlflow package (pip install 'ckptguard[mlflow]')"
            ) from None
    return mlflow
