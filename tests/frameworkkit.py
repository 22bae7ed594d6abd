"""Training jobs of the framework integrations, each in a process of its own (tests/frameworks/),
for tests/test_lightning.py, tests/test_hf_trainer.py and the fault matrix's ``lightning`` and
``hf`` scenarios (tests/fault_cases.txt).

A fault case runs a job with the case's failpoint armed after its first checkpoint, checks
that every checkpoint left is whole and verified and which one the framework will resume from
(``old``: the one before the failed save; ``new`` / ``latest``: the failed save's), resumes in
a fresh process, and checks that the run then ends bitwise equal to the uninterrupted one,
having started from the expected step.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from conftest import free_port
from faultkit import Case, clean_env, fired, launch

import ckptguard
from ckptguard.temps import TEMP_MARK

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LIGHTNING_JOB = HERE / "frameworks" / "lightning_job.py"
HF_JOB = HERE / "frameworks" / "hf_job.py"
BOUND = 240.0  # seconds a job may take (two DDP ranks importing Lightning on a busy machine)
EPOCHS = 4  # lightning_job: 8 steps an epoch alone, 4 under DDP
HF_STEPS = 12  # hf_job: a save every 2 steps
RELINK = ".last.ckpt.ckptguard-relink"


def job(
    script: Path,
    args: list[Any],
    tmp: Path,
    log: str,
    env: dict | None = None,
    case: Case | None = None,
    ranks: int = 1,
) -> tuple[int | None, str]:
    """Run a job script; its exit status (None: stopped after the hang its case injected) and
    output. Offline, with this checkout's ckptguard."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    full = {**clean_env(tmp), "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", **(env or {})}
    done = None
    if case is not None and case.action == "hang":
        line = f"ckptguard: failpoint {case.point} on rank {case.rank}: hang"
        done = lambda text: line in text  # noqa: E731
    cmd = [sys.executable, str(script), *map(str, args)]
    if ranks > 1:
        run = ["-m", "torch.distributed.run", f"--nproc-per-node={ranks}"]
        cmd[1:1] = [*run, f"--master-port={free_port()}"]
    code, _, out = launch(cmd, full, tmp / log, BOUND, done)
    return code, out


def ok(script: Path, args: list[Any], tmp: Path, log: str, ranks: int = 1) -> None:
    """Run a job (under torchrun with ``ranks`` > 1: gloo on the CPU); it must succeed."""
    code, out = job(script, args, tmp, log, ranks=ranks)
    assert code == 0, f"{script.name} {args} failed ({code}):\n{out[-4000:]}"


def final(root: Path) -> dict:
    return torch.load(root / "final.pt", weights_only=False)


def same(a: Any, b: Any, where: str = "") -> None:
    """``a`` and ``b`` are equal, tensors bitwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (where, a.keys(), b.keys())
        for k in a:
            same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


def same_run(a: dict, b: dict, keys: tuple[str, ...]) -> None:
    """Two runs ended in the same state, bitwise (``keys`` of their final.pt)."""
    for k in keys:
        same(a[k], b[k], k)


# ---- Lightning ----------------------------------------------------------------------------------

LIGHTNING_KEYS = ("state_dict", "optimizer", "scheduler", "global_step", "epoch")


def lightning_base(root: Path) -> Path:
    """The uninterrupted run: EPOCHS epochs, every epoch's checkpoint kept."""
    base = root / "lightning"
    base.mkdir(parents=True)
    ok(LIGHTNING_JOB, [base, EPOCHS], base, "job.log")
    return base


def ckpt_files(ckpts: Path) -> dict[str, str]:
    """name -> "link to X" or "step N" for each entry of a checkpoint directory, each file
    verified."""
    out = {}
    for name in sorted(os.listdir(ckpts)):
        p = ckpts / name
        if p.is_symlink():
            out[name] = f"link to {os.readlink(p)}"
            continue
        report = ckptguard.verify(p)
        assert report.ok, (p, report.problems[:3])
        out[name] = f"step {ckptguard.load(p)['global_step']}"
    return out


def last_step(ckpts: Path) -> int:
    """The global step of the checkpoint ``ckpt_path="last"`` resumes from."""
    last = ckpts / "last.ckpt"
    target = ckpts / os.readlink(last) if last.is_symlink() else last
    return ckptguard.load(target)["global_step"]


# Per point: the failing job's options, and the steps ``last`` holds if the failed save is lost
# (old) or kept (new).
_LIGHTNING_POINTS = {
    # top-k (k=1) removes epoch 0's file after saving epoch 1's; last.ckpt is saved after that
    "lightning.remove.start": (["--top-k", 1, "--save-last", "true"], {"old": 8, "new": 16}),
    # last.ckpt is a link to epoch 0's state; saving over it replaces the link
    "lightning.relink.saved": (["--top-k", -1, "--save-last", "true"], {"old": 8, "new": 16}),
}


def lightning_case(case: Case, base: Path, tmp: Path, seen: dict) -> tuple[str, str]:
    opts, steps = _LIGHTNING_POINTS[case.point]
    root, ckpts = tmp / "run", tmp / "run" / "ckpts"
    ckpts.mkdir(parents=True)
    args: list[Any] = [root, EPOCHS, *opts, "--arm-epoch", 1]
    if case.point == "lightning.relink.saved":
        # last.ckpt: a link to a checkpoint that names last.ckpt as ModelCheckpoint's last model
        # (as runs that switch save_last between True and "link" leave it): the next save of
        # last.ckpt goes to the link's path
        ok(LIGHTNING_JOB, [root, 1, *opts], tmp, "first.log")
        os.rename(ckpts / "last.ckpt", ckpts / "kept.ckpt")
        os.symlink("kept.ckpt", ckpts / "last.ckpt")
        args[2:2] = ["--resume", "last"]
    code, out = job(LIGHTNING_JOB, args, tmp, "fail.log", {"ARM_FAILPOINT": case.failpoint}, case)
    fired(case, out)
    ended = _ended(case, code, out)
    left = ckpt_files(ckpts)  # every file verifies
    stray = [n for n in left if n.startswith(".")]
    assert all(TEMP_MARK in n or n == RELINK for n in stray), left
    outcome = {v: k for k, v in steps.items()}[last_step(ckpts)]
    seen["outcome"] = outcome
    assert outcome == case.expect, f"last.ckpt holds the {outcome} state, expected {case.expect}"
    ok(LIGHTNING_JOB, [root, EPOCHS, "--resume", "last", *opts], tmp, "resume.log")
    resumed = final(root)
    assert resumed["start_step"] == steps[outcome], resumed["start_step"]
    same_run(final(base), resumed, LIGHTNING_KEYS)
    assert not [n for n in os.listdir(ckpts) if n.startswith(".")], os.listdir(ckpts)
    assert last_step(ckpts) == resumed["global_step"]
    return outcome, ended


def _ended(case: Case, code: int | None, out: str) -> str:
    """How the failing job ended, checked against its action, in a word."""
    if case.action == "kill":
        assert code == -signal.SIGKILL, (code, out[-3000:])
        return "killed"
    if case.action == "hang":
        assert code is None, (code, out[-3000:])
        return "hung job stopped by the test"
    if code == 0:  # an error after the commit point: a warning, and training went on
        assert "CheckpointWarning" in out and "injected" in out, out[-3000:]
        return "ok with a warning"
    assert "injected" in out and ("StoreError" in out or "StoreFullError" in out), out[-3000:]
    return "typed error"


# ---- Hugging Face -------------------------------------------------------------------------------

HF_KEYS = ("model", "optimizer", "scheduler", "global_step", "losses")


def hf_base(root: Path) -> Path:
    """The uninterrupted run: HF_STEPS steps, a checkpoint every 2, all kept."""
    base = root / "hf"
    base.mkdir(parents=True)
    ok(HF_JOB, [base, HF_STEPS], base, "job.log")
    return base


def hf_case(case: Case, base: Path, tmp: Path, seen: dict) -> tuple[str, str]:
    """The failpoint armed from step 3 on: it fires in step 4's save (after step-2's). Rotation
    (save_total_limit=1) runs in the failing job and in the resumed one."""
    out_dir = tmp / "run"
    args: list[Any] = [out_dir, HF_STEPS, "--limit", 1, "--arm-step", 3]
    code, out = job(HF_JOB, args, tmp, "fail.log", {"ARM_FAILPOINT": case.failpoint}, case)
    fired(case, out)
    ended = _ended(case, code, out)
    store = ckptguard.Store(out_dir)
    names = [i.name for i in store.list()]
    latest = store.latest_name()
    if code == 0:  # the save stood; training went on, each later rotation failing alike
        outcome = "latest"
        assert latest == f"step-{HF_STEPS}" and "step-4" in names, names
    else:
        assert set(names) <= {"step-2", "step-4"} and latest == names[-1], (names, latest)
        outcome = "latest" if latest == "step-4" else "absent"
    for n in names:
        assert ckptguard.verify(store.path(n)).ok, n
    seen["outcome"] = outcome
    assert outcome == case.expect, f"step-4 is {outcome}, expected {case.expect}"
    if code != 0:
        ok(HF_JOB, [out_dir, HF_STEPS, "--limit", 1, "--resume", "true"], tmp, "resume.log")
        assert final(out_dir)["start_step"] == {"latest": 4, "absent": 2}[outcome]
        assert [i.name for i in store.list()] == [f"step-{HF_STEPS}"]  # rotation caught up
    same_run(final(base), final(out_dir), HF_KEYS)
    return outcome, ended


def run_case(case: Case, base: Path, tmp: Path, seen: dict) -> tuple[str, str]:
    """One case of the fault matrix's lightning or hf scenario."""
    runner = lightning_case if case.scenario == "lightning" else hf_case
    return runner(case, base, tmp, seen)
