"""ckptguard.hf against transformers' Trainer: a tiny GPT-2 built from a config here (nothing
from the Hub), dropout on. Resuming from a ckptguard checkpoint in a fresh process, mid-epoch
and at an epoch's end, by ``True`` and by path, ends bitwise where the uninterrupted run did;
``save_total_limit`` rotates through the store; ``load_best_model_at_end`` loads the best
checkpoint's weights; a failure at the failpoint the save adds (tests/fault_cases.txt, scenario
hf) leaves a whole checkpoint that the Trainer resumes from. The runs are processes of their own
(tests/frameworks/hf_job.py, tests/frameworkkit.py); the DDP ones under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import faultkit
import frameworkkit as fk
import pytest

import ckptguard
from ckptguard.errors import IntegrationError

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
import ckptguard.hf as chf  # noqa: E402
from ckptguard.hf import state as hstate  # noqa: E402

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The uninterrupted run: 12 steps (1.5 epochs), a checkpoint every 2, all kept."""
    return fk.hf_base(tmp_path_factory.mktemp("hf"))


def _store_upto(base: Path, out: Path, step: int) -> None:
    """``out``: a copy of the base run's store as it was at ``step`` (later saves deleted)."""
    import shutil

    shutil.copytree(base, out, ignore=shutil.ignore_patterns("final.pt", "*.log"))
    st = ckptguard.Store(out)
    for info in reversed(st.list()):
        if int(info.name.removeprefix("step-")) > step:
            st.delete(info.name)
    assert st.latest_name() == f"step-{step}"


def test_each_checkpoint_is_one_commit_holding_all_a_resume_needs(base: Path) -> None:
    st = ckptguard.Store(base)
    assert [i.name for i in st.list()] == [f"step-{s}" for s in range(2, 13, 2)]
    assert st.latest_name() == "step-12"
    assert sorted(os.listdir(base / "step-4")) == [
        "MANIFEST.json",
        "index.parquet",
        "rank-00000.ckg",
    ]
    got = ckptguard.load(base / "step-4")
    assert got["format"] == "ckptguard.hf/1"
    assert {"model", "optimizer", "scheduler", "rng", "trainer_state", "config"} <= set(got)
    assert json.loads(got["trainer_state"])["global_step"] == 4
    assert json.loads(got["config"])["n_layer"] == 2
    assert ckptguard.verify(base / "step-4").ok


@pytest.mark.parametrize(("step", "how"), [(4, "true"), (8, "path")])
def test_resume_in_a_fresh_process_is_bitwise(base: Path, tmp_path: Path, step, how) -> None:
    """Step 4 is mid-epoch (the Trainer skips the batches seen), step 8 an epoch's end."""
    out = tmp_path / "run"
    _store_upto(base, out, step)
    resume = "true" if how == "true" else out / f"step-{step}"
    fk.ok(fk.HF_JOB, [out, fk.HF_STEPS, "--resume", resume], tmp_path, "resume.log")
    resumed = fk.final(out)
    assert resumed["start_step"] == step
    fk.same_run(fk.final(base), resumed, fk.HF_KEYS)


@pytest.mark.framework_job
def test_ddp_under_torchrun_resumes_bitwise(tmp_path: Path) -> None:
    """Two gloo ranks: every rank takes part in each save (one data file each, the weights
    written once) and restores its own RNG states; a fresh job resumes mid-epoch, bitwise."""
    a, b = tmp_path / "a", tmp_path / "b"
    fk.ok(fk.HF_JOB, [a, fk.HF_STEPS], tmp_path, "ddp.log", ranks=2)
    assert ckptguard.describe(a / "step-4").info.world_size == 2
    _store_upto(a, b, 4)
    fk.ok(fk.HF_JOB, [b, fk.HF_STEPS, "--resume", "true"], tmp_path, "resume.log", ranks=2)
    assert fk.final(b)["start_step"] == 4
    fk.same_run(fk.final(a), fk.final(b), fk.HF_KEYS)


@pytest.mark.framework_job
def test_rotation_and_best_model_at_end(tmp_path: Path) -> None:
    """save_total_limit=2 keeps the newest and the best (an early one: the highest eval loss is
    "best" here); at the end the model holds the best checkpoint's weights."""
    out = tmp_path / "run"
    fk.ok(fk.HF_JOB, [out, fk.HF_STEPS, "--limit", 2, "--best"], tmp_path, "best.log")
    result = fk.final(out)
    best = result["best_model_checkpoint"]
    st = ckptguard.Store(out)
    assert best != str(out / "step-12") and os.path.dirname(best) == str(out)
    assert [i.name for i in st.list()] == sorted([os.path.basename(best), "step-12"], key=len)
    assert st.latest_name() == "step-12"
    fk.same(result["model"], ckptguard.load(best)["model"])
    assert not os.listdir(out / ".staging")  # every delete finished


@pytest.mark.framework_job
def test_limit_one_keeps_only_the_best_at_the_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    fk.ok(fk.HF_JOB, [out, 6, "--limit", 1, "--best"], tmp_path, "best.log")
    best = os.path.basename(fk.final(out)["best_model_checkpoint"])
    st = ckptguard.Store(out)
    assert [i.name for i in st.list()] == [best] and st.latest_name() == best


# ---- in this process ----------------------------------------------------------------------------


def test_checkpoint_source(tmp_path: Path) -> None:
    ckptguard.save({"format": "x"}, tmp_path / "step-2")
    ckptguard.save({"format": "x"}, tmp_path / "step-4")
    (tmp_path / "checkpoint-6").mkdir()  # the Trainer's own format: its loader's
    assert hstate.checkpoint_source(True, str(tmp_path)) == str(tmp_path / "step-4")
    assert hstate.checkpoint_source(str(tmp_path / "step-2"), "x") == str(tmp_path / "step-2")
    assert hstate.checkpoint_source(str(tmp_path), "x") == str(tmp_path / "step-4")
    assert hstate.checkpoint_source(str(tmp_path / "checkpoint-6"), "x") is None
    assert hstate.checkpoint_source(None, str(tmp_path)) is None
    assert hstate.checkpoint_source(True, str(tmp_path / "nothing")) is None


def test_rotation_keeps_newest_and_best(tmp_path: Path) -> None:
    for s in (2, 4, 6, 8):
        ckptguard.save({"s": s}, tmp_path / f"step-{s}")
    hstate.rotate(str(tmp_path), 2, str(tmp_path / "step-2"))
    assert [i.name for i in ckptguard.Store(tmp_path).list()] == ["step-2", "step-8"]
    hstate.rotate(str(tmp_path), 1, None)
    assert [i.name for i in ckptguard.Store(tmp_path).list()] == ["step-8"]
    hstate.rotate(str(tmp_path), None, None)  # no limit: nothing deleted
    assert ckptguard.Store(tmp_path).latest_name() == "step-8"


def test_rng_state_round_trip(tmp_path: Path) -> None:
    import random

    import numpy as np
    import torch

    ckptguard.save({"rng": hstate.rng_state(False)}, tmp_path / "r")
    want = (random.random(), np.random.rand(), torch.rand(1))
    hstate.set_rng_state(ckptguard.load(tmp_path / "r")["rng"], False)
    assert (random.random(), np.random.rand()) == want[:2] and torch.equal(torch.rand(1), want[2])


def test_other_transformers_internals_are_refused_by_name() -> None:
    chf.check_transformers()  # the installed release: accepted

    class Changed(transformers.Trainer):
        def _load_rng_state(self, checkpoint, strict):  # a parameter more
            pass

    with pytest.raises(
        IntegrationError, match=r"Trainer._load_rng_state is \(checkpoint, strict\)"
    ):
        chf.check_transformers(Changed)


def test_bad_save_options_fail_at_construction(tmp_path: Path) -> None:
    args = transformers.TrainingArguments(tmp_path, report_to=[], use_cpu=True)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=1))
    with pytest.raises(TypeError, match="unknown save option"):
        chf.Trainer(model=model, args=args, save_options={"compres": "zstd"})
    with pytest.raises(TypeError, match="overwrite or step"):
        chf.Trainer(model=model, args=args, save_options={"overwrite": True})


def test_import_loads_no_transformers() -> None:
    code = "import sys, ckptguard.hf; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- a failure at the failpoint the save adds ---------------------------------------------------

KILLS = [c for c in faultkit.cases(full=True) if c.scenario == "hf" and c.action == "kill"]


@pytest.mark.framework_job
@pytest.mark.parametrize("case", KILLS, ids=[c.id for c in KILLS])
def test_kill_leaves_a_whole_checkpoint_to_resume_from(base: Path, tmp_path: Path, case) -> None:
    outcome, _ = fk.hf_case(case, base, tmp_path, {})
    assert outcome == case.expect
