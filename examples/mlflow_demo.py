"""The MLflow part of `make demo`: a small local model registry (a SQLite backend store and an
artifact root on disk), a training run whose checkpoint records its lineage, then a backup of
the registry as one verified checkpoint and a restore into a fresh database and artifact root
that answers the same.

python examples/mlflow_demo.py --dir ./mlflow-demo
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

import torch

import ckptguard
from ckptguard.mlflow.backup import backup
from ckptguard.mlflow.refs import Roots
from ckptguard.mlflow.restore import restore


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="./mlflow-demo", help="Where the demo's registry lives.")
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its schema creation, not our story

    root = os.path.abspath(args.dir)
    shutil.rmtree(root, ignore_errors=True)  # the demo's own directory, made fresh each time
    src, dst = os.path.join(root, "registry"), os.path.join(root, "restored")
    arts = os.path.join(src, "mlruns")
    os.makedirs(arts)
    os.chdir(src)  # the Default experiment's artifact location, ./mlruns, lies in the root too
    uri = f"sqlite:///{src}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.create_experiment("demo", artifact_location=os.path.join(arts, "demo"))

    print("1. Train, checkpoint with lineage, register the model (MLflow on SQLite)")
    model = torch.nn.Linear(16, 4)
    with mlflow.start_run(experiment_id=exp, run_name="train") as run:
        mlflow.log_params({"lr": 0.01, "features": 16})
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for step in range(10):
            loss = model(torch.randn(8, 16)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mlflow.log_metric("loss", loss.item(), step=step)
        ckpt = os.path.join(root, "ckpts", "step-10")
        ckptguard.save(model.state_dict(), ckpt, step=10, mlflow_run=True)
        torch.save(model.state_dict(), os.path.join(root, "model.pt"))
        mlflow.log_artifact(os.path.join(root, "model.pt"), "model")
    client = mlflow.MlflowClient(uri, uri)
    client.create_registered_model("demo-model")
    version = client.create_model_version("demo-model", f"runs:/{run.info.run_id}/model")
    tags = client.get_run(run.info.run_id).data.tags
    lineage = ckptguard.describe(ckpt).info.metadata["mlflow"]
    print(f"   run {run.info.run_id}: checkpoint {tags['ckptguard.checkpoint']}")
    print(f"   the checkpoint names its run {lineage['run_id']} and params {lineage['params']}")
    ok = lineage["run_id"] == run.info.run_id

    print("2. Back up the registry: its database at one point in time, then every artifact")
    res = backup(uri, os.path.join(root, "backups"), Roots(None, (arts,)))
    rep = res.report
    print(f"   {res.info.path}: {res.files} artifact files, {res.artifact_bytes} bytes")
    print(f"   consistency: {rep.consistent}/{rep.references} references consistent")
    ok &= rep.fraction_consistent == 1.0 and ckptguard.verify(res.info.path).ok

    print("3. Restore into a fresh database and artifact root, and ask it the same questions")
    os.makedirs(dst)
    new_uri = f"sqlite:///{dst}/mlflow.db"
    restore(
        res.info.path,
        new_uri,
        Roots(None, ()),
        root_map={arts: os.path.join(dst, "mlruns")},
    )
    new = mlflow.MlflowClient(new_uri, new_uri)
    a, b = client.get_run(run.info.run_id), new.get_run(run.info.run_id)
    same = a.data.params == b.data.params and a.data.metrics == b.data.metrics
    v = new.get_model_version("demo-model", version.version)
    got = new.download_artifacts(run.info.run_id, "model/model.pt", os.path.join(root, "dl"))
    with open(got, "rb") as f, open(os.path.join(root, "model.pt"), "rb") as g:
        same &= f.read() == g.read()
    print(f"   params, metrics and model.pt bytes equal: {same}; version {v.version}: {v.source}")
    ok &= same
    print("   ckptguard mlflow backup|restore|check do the same from the command line")
    print("All checks passed." if ok else "Some checks FAILED.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
