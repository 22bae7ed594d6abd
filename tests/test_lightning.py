"""ckptguard.lightning against Lightning itself: ModelCheckpoint's top-k and save_last (a link, or
a file saved over one), fit(ckpt_path="last"), resuming bitwise in a fresh process, alone and
under DDP on two CPU ranks (gloo), load_from_checkpoint, and a kill at each failpoint the
plugin adds (tests/fault_cases.txt, scenario lightning). The training jobs run in processes of
their own (tests/frameworks/lightning_job.py, tests/frameworkkit.py)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import faultkit
import frameworkkit as fk
import pytest
import torch

import ckptguard
from ckptguard.errors import IntegrationError

lightning = pytest.importorskip("lightning")
import ckptguard.lightning as cl  # noqa: E402

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The uninterrupted run (every epoch's checkpoint kept) every resume is compared with."""
    return fk.lightning_base(tmp_path_factory.mktemp("lightning"))


def test_uninterrupted_run_wrote_one_verified_file_per_epoch(base: Path) -> None:
    files = fk.ckpt_files(base / "ckpts")
    assert files == {f"epoch={e}-step={8 * (e + 1)}.ckpt": f"step {8 * (e + 1)}" for e in range(4)}
    assert ckptguard.describe(base / "ckpts" / "epoch=3-step=32.ckpt").info.world_size == 1


def test_top_k_link_and_resume_from_last_bitwise(base: Path, tmp_path: Path) -> None:
    """Two epochs with top-k 1 and save_last="link"; a fresh process resumes from "last" (the
    link) and ends where the uninterrupted run did, bitwise."""
    root, ckpts = tmp_path / "run", tmp_path / "run" / "ckpts"
    opts = ["--top-k", 1, "--save-last", "link"]
    fk.ok(fk.LIGHTNING_JOB, [root, 2, *opts], tmp_path, "first.log")
    # epoch 0's file went through remove_checkpoint once epoch 1's was better
    assert fk.ckpt_files(ckpts) == {
        "epoch=1-step=16.ckpt": "step 16",
        "last.ckpt": "link to epoch=1-step=16.ckpt",
    }
    fk.ok(fk.LIGHTNING_JOB, [root, 4, "--resume", "last", *opts], tmp_path, "resume.log")
    resumed = fk.final(root)
    assert resumed["start_step"] == 16
    fk.same_run(fk.final(base), resumed, fk.LIGHTNING_KEYS)
    assert fk.ckpt_files(ckpts) == {
        "epoch=3-step=32.ckpt": "step 32",
        "last.ckpt": "link to epoch=3-step=32.ckpt",
    }
    assert resumed["best_k_models"] == ["epoch=3-step=32.ckpt"]


@pytest.mark.framework_job
def test_ddp_saves_once_from_rank_zero_and_resumes_bitwise(tmp_path: Path) -> None:
    """Two gloo ranks: each checkpoint is one file, written once (a one-process save: rank 0
    holds DDP's replicated state); a fresh job resumes from a path and matches, bitwise."""
    a, b = tmp_path / "a", tmp_path / "b"
    fk.ok(fk.LIGHTNING_JOB, [a, 4, "--ddp"], tmp_path, "ddp.log")
    files = fk.ckpt_files(a / "ckpts")
    assert files == {f"epoch={e}-step={4 * (e + 1)}.ckpt": f"step {4 * (e + 1)}" for e in range(4)}
    middle = a / "ckpts" / "epoch=1-step=8.ckpt"
    assert ckptguard.describe(middle).info.world_size == 1
    fk.ok(fk.LIGHTNING_JOB, [b, 4, "--ddp", "--resume", middle], tmp_path, "resume.log")
    assert fk.final(b)["start_step"] == 8
    fk.same_run(fk.final(a), fk.final(b), fk.LIGHTNING_KEYS)


def _job_module():
    spec = importlib.util.spec_from_file_location("lightning_job", fk.LIGHTNING_JOB)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lightning_job"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_load_from_checkpoint_reads_a_ckptguard_file(base: Path) -> None:
    """Lightning's own loader cannot read the file (it is not a torch.save file); the helper
    hands it to LightningModule.load_from_checkpoint, hyperparameters and all."""
    job = _job_module()
    path = base / "ckpts" / "epoch=3-step=32.ckpt"
    with pytest.raises(Exception):  # noqa: B017  torch.load's refusal, whichever it is
        job.Net.load_from_checkpoint(path)
    model = cl.load_from_checkpoint(job.Net, path, lr=0.5)
    assert isinstance(model, job.Net)
    assert model.hparams.hidden == 16 and model.hparams.lr == 0.5  # an override, as Lightning's
    fk.same(model.state_dict(), fk.final(base)["state_dict"])


# ---- the plugin in this process ----------------------------------------------------------------


def test_save_replaces_only_when_whole_and_loads_verified(tmp_path: Path) -> None:
    io = cl.CheckpointIO(compress="zstd")
    path = tmp_path / "sub" / "x.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 7}, path)
    assert ckptguard.describe(path).info.step == 7
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path, storage_options={"step": 9})
    got = io.load_checkpoint(path)
    assert torch.equal(got["state_dict"]["w"], torch.zeros(3))
    assert ckptguard.describe(path).info.step == 9
    assert os.listdir(path.parent) == ["x.ckpt"]


def test_a_torch_save_checkpoint_still_resumes(tmp_path: Path) -> None:
    """A checkpoint of Lightning's default format (torch.save) loads through the plugin."""
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4.0)}, "epoch": 1}, path)
    got = cl.CheckpointIO().load_checkpoint(path)
    assert got["epoch"] == 1 and torch.equal(got["state_dict"]["w"], torch.arange(4.0))


def test_save_over_a_link_replaces_the_link_not_its_target(tmp_path: Path) -> None:
    io = cl.CheckpointIO()
    io.save_checkpoint({"v": torch.ones(2)}, tmp_path / "epoch=0.ckpt")
    os.symlink("epoch=0.ckpt", tmp_path / "last.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "last.ckpt")["v"], torch.ones(2))
    io.save_checkpoint({"v": torch.zeros(2)}, tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").is_symlink()
    assert torch.equal(io.load_checkpoint(tmp_path / "last.ckpt")["v"], torch.zeros(2))
    assert torch.equal(io.load_checkpoint(tmp_path / "epoch=0.ckpt")["v"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["epoch=0.ckpt", "last.ckpt"]


def test_remove_and_its_refusals(tmp_path: Path) -> None:
    io = cl.CheckpointIO()
    io.save_checkpoint({"v": torch.ones(2)}, tmp_path / "a.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")  # nothing there: as Lightning's own
    assert os.listdir(tmp_path) == []
    (tmp_path / "d.ckpt").mkdir()
    with pytest.raises(IntegrationError, match="is a directory"):
        io.remove_checkpoint(tmp_path / "d.ckpt")
    with pytest.raises(IntegrationError, match="not to a URL"):
        io.save_checkpoint({}, "s3://bucket/x.ckpt")
    with pytest.raises(TypeError, match="unknown save option"):
        cl.CheckpointIO(compres="zstd")
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({}, tmp_path / "b.ckpt", storage_options="zstd")
    with pytest.raises(ckptguard.OneFileError, match="cannot be signed"):
        cl.CheckpointIO(sign_key=tmp_path / "k.key")  # one-file checkpoints carry no signature
    io = cl.CheckpointIO(digests=True)  # digests they do carry
    io.save_checkpoint({"v": torch.ones(2)}, tmp_path / "c.ckpt")
    with ckptguard.open.CheckpointReader(str(tmp_path / "c.ckpt")) as rd:
        assert "digests" in rd.features


def test_import_loads_no_lightning() -> None:
    code = "import sys, ckptguard.lightning; print('lightning' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- a failure at each failpoint the plugin adds ------------------------------------------------

# Every kill, and an I/O error where the plugin itself renames (the full matrix has them all).
FAILURES = [
    c
    for c in faultkit.cases(full=True)
    if c.scenario == "lightning"
    and (c.action == "kill" or (c.action == "eio" and c.point == "lightning.relink.saved"))
]


@pytest.mark.framework_job
@pytest.mark.parametrize("case", FAILURES, ids=[c.id for c in FAILURES])
def test_a_failure_leaves_a_whole_checkpoint_to_resume_from(
    base: Path, tmp_path: Path, case
) -> None:
    outcome, _ = fk.lightning_case(case, base, tmp_path, {})
    assert outcome == case.expect
