"""ckptguard.deepspeed: DeepSpeed's checkpoint engine over ckptguard, tested against DeepSpeed on
the CPU (gloo ranks under torchrun, tests/dist/deepspeed_run.py): ZeRO stages 0-3 resume
bitwise in a fresh process, and a save killed at each of the engine's failpoints leaves the
previous checkpoint or the new one whole, which DeepSpeed resumes from.

DeepSpeed is in the test extras (`make test` installs it): without it these tests skip, and
fail under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import run_command

import ckptguard
from ckptguard.errors import CheckpointNotFoundError, RegisteredTypeError, UnsafePickleError

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's own detection warns on a CPU box
try:
    import deepspeed  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    if os.environ.get("CI") == "true":
        pytest.fail(f"deepspeed is missing in CI, where `make test` installs it: {e}", False)
    reason = f"deepspeed is not installed ({e}): `make test` installs it"
    pytest.skip(reason, allow_module_level=True)

from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo  # noqa: E402
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402

import ckptguard.deepspeed as cgds  # noqa: E402
from ckptguard.deepspeed import layout, objects  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist" / "deepspeed_run.py"
PKG = HERE.parent / "ckptguard" / "deepspeed"
STAGES = (0, 1, 2, 3)
FULL = os.environ.get("CKPTGUARD_FAULTS") == "all"

# point -> (rank killed, the tag `latest` then names, whether tag "k2" is whole)
KILLS = {
    "deepspeed.file_held": (1, "k", False),
    "deepspeed.before_commit": (0, "k", False),
    "commit.before_rename": (0, "k", False),
    "deepspeed.committed": (0, "k", True),
    "deepspeed.latest_written": (0, "k2", True),
}
DEFAULT_KILLS = ("deepspeed.before_commit", "deepspeed.committed", "deepspeed.latest_written")
RUN_KILLS = tuple(KILLS) if FULL else DEFAULT_KILLS


def torchrun(*args: str, timeout: float = 300) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {"PYTHONPATH": str(HERE.parent), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("CKPTGUARD_FAILPOINT", None)
    return run_command([*cmd, str(WORKER), *args], timeout, env=env).returncode


def records(out: Path, mode: str) -> list[dict]:
    return [json.loads((out / f"{mode}-rank-{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train-save-train, the kills, then the resumes in fresh processes: each launch once."""
    out = tmp_path_factory.mktemp("deepspeed")
    assert torchrun("train", str(out), *map(str, STAGES)) == 0
    kills = {}
    for point in RUN_KILLS:
        case = out / f"kill-{point}"
        case.mkdir()
        (case / "case.json").write_text(json.dumps({"stage": 1}))
        rank = KILLS[point][0]
        code = torchrun("kill", str(case), "1", point, str(rank))
        assert code != 0, f"the save killed at {point} returned"
        kills[point] = records(case, "kill")[0]
    assert torchrun("resume", str(out), *map(str, STAGES)) == 0
    return {"out": out, "train": records(out, "train"), "resume": records(out, "resume"), **kills}


@pytest.mark.framework_job
@pytest.mark.parametrize("stage", STAGES)
def test_resume_in_a_fresh_process_is_bitwise(runs: dict, stage: int) -> None:
    for rank in range(2):
        trained, resumed = runs["train"][rank][str(stage)], runs["resume"][rank][str(stage)]
        assert resumed["losses"] == trained["losses"], (stage, rank)
        assert resumed["digest"] == trained["digest"], (stage, rank)


@pytest.mark.framework_job
def test_a_tag_is_one_ckptguard_checkpoint(runs: dict) -> None:
    save_dir = runs["out"] / "z2"
    assert (save_dir / "latest").read_text() == "k"
    tag_dir = save_dir / "k"
    report = ckptguard.verify(tag_dir / layout.CHECKPOINT)
    assert report.ok, report
    info = ckptguard.describe(tag_dir / layout.CHECKPOINT)
    assert info.info.metadata == {"deepspeed": {"tag": "k"}}
    names = {p.name for p in tag_dir.iterdir() if p.name.endswith(".pt")}
    assert names == {
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    assert all(layout.is_stub(str(tag_dir / n)) for n in names)
    manifest = json.loads((tag_dir / layout.CHECKPOINT / "MANIFEST.json").read_text())
    assert "pickle" not in manifest["manifest"]["features"]
    optim = cgds.load_file(tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert type(optim["optimizer_state_dict"]["loss_scaler"]) is LossScaler
    assert optim["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.gradients


@pytest.mark.framework_job
@pytest.mark.parametrize("point", RUN_KILLS)
def test_a_killed_save_leaves_a_whole_checkpoint(runs: dict, point: str) -> None:
    _, latest_tag, new_whole = KILLS[point]
    digests = runs[point]
    for rank in range(2):
        seen = runs["resume"][rank][f"kill-{point}"]
        resumed = seen["None"]
        assert resumed.get("tag") == latest_tag, (rank, seen)
        assert resumed["steps"] == (3 if latest_tag == "k" else 5)
        assert resumed["digest"] == digests[latest_tag]
        new = seen["k2"]
        if new_whole:
            assert new.get("digest") == digests["k2"] and new["steps"] == 5, (rank, seen)
        else:  # the stubs lead DeepSpeed to the tag; the engine says it never committed
            assert new.get("error") == "CheckpointNotFoundError", (rank, seen)
            assert "did not finish" in new["message"]


def test_every_failpoint_of_the_engine_is_killed_in_the_full_run() -> None:
    named = set()
    for p in PKG.rglob("*.py"):
        named.update(re.findall(r'failpoint\("([^"]+)"\)', p.read_text()))
    assert named and named <= set(KILLS), named - set(KILLS)


# ---- in one process: the engine's steps as DeepSpeed calls them ----------------------------


def _save(engine: cgds.CheckpointEngine, save_dir: Path, tag: str, files: dict) -> None:
    info = CheckpointCommitInfo(tag=tag, save_dir=str(save_dir), save_latest=True)
    engine.create(info)
    engine.makedirs(str(save_dir / tag), exist_ok=True)
    for name, state in files.items():
        engine.save(state, str(save_dir / tag / name))
    engine.commit(info)


def test_engine_saves_and_loads_in_one_process(tmp_path: Path) -> None:
    engine = cgds.CheckpointEngine()
    scaler = DynamicLossScaler(2.0**8, 10, 1.0, delayed_shift=2, consecutive_hysteresis=False)
    state = {
        "module": OrderedDict(w=torch.randn(3, 4), b=torch.zeros(4)),
        "optimizer_state_dict": {"loss_scaler": scaler, "zero_stage": ZeroStageEnum.weights},
        "global_steps": 7,
    }
    _save(engine, tmp_path, "t1", {"mp_rank_00_model_states.pt": state})
    assert (tmp_path / "latest").read_text() == "t1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    loaded = engine.load(str(tmp_path / "t1" / "mp_rank_00_model_states.pt"), "cpu")
    assert type(loaded["module"]) is OrderedDict
    assert all(torch.equal(loaded["module"][k], v) for k, v in state["module"].items())
    got = loaded["optimizer_state_dict"]["loss_scaler"]
    assert type(got) is DynamicLossScaler and vars(got) == vars(scaler)
    assert loaded["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.weights
    assert loaded["global_steps"] == 7


def test_saving_a_tag_again_replaces_it_and_its_stale_stubs(tmp_path: Path) -> None:
    engine = cgds.CheckpointEngine()
    two = {"mp_rank_00_model_states.pt": {"x": torch.ones(2)}, "mp_rank_01_model_states.pt": {}}
    _save(engine, tmp_path, "t", two)
    _save(engine, tmp_path, "t", {"mp_rank_00_model_states.pt": {"x": torch.zeros(2)}})
    assert sorted(p.name for p in (tmp_path / "t").glob("*.pt")) == ["mp_rank_00_model_states.pt"]
    loaded = cgds.load_file(tmp_path / "t" / "mp_rank_00_model_states.pt")
    assert torch.equal(loaded["x"], torch.zeros(2))


def test_a_file_the_checkpoint_does_not_hold_is_not_found(tmp_path: Path) -> None:
    engine = cgds.CheckpointEngine()
    _save(engine, tmp_path, "t", {"mp_rank_00_model_states.pt": {"x": torch.ones(2)}})
    layout.write_stub(str(tmp_path / "t" / "mp_rank_01_model_states.pt"))  # e.g. a failed save's
    with pytest.raises(CheckpointNotFoundError, match="mp_rank_01_model_states.pt"):
        engine.load(str(tmp_path / "t" / "mp_rank_01_model_states.pt"))


def test_a_tag_whose_save_never_committed_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    layout.write_stub(str(tmp_path / "t" / "mp_rank_00_model_states.pt"))
    with pytest.raises(CheckpointNotFoundError, match="did not finish"):
        cgds.load_file(tmp_path / "t" / "mp_rank_00_model_states.pt")


def test_a_file_deepspeed_itself_wrote_loads_as_a_foreign_torch_file(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    path = tmp_path / "t" / "mp_rank_00_model_states.pt"
    torch.save({"w": torch.ones(2), "loss_scaler": LossScaler(4.0)}, path)
    with pytest.raises(UnsafePickleError):
        cgds.load_file(path)
    loaded = cgds.load_file(path, allow_pickle=True)
    assert loaded["loss_scaler"].cur_scale == 4.0


def test_a_file_outside_the_tag_directory_is_refused(tmp_path: Path) -> None:
    engine = cgds.CheckpointEngine()
    engine.create(CheckpointCommitInfo(tag="t", save_dir=str(tmp_path), save_latest=True))
    with pytest.raises(ValueError, match="outside the tag directory"):
        engine.save({}, str(tmp_path / "t" / "offloaded_tensors" / "rank0.pt"))


def test_install_replaces_the_engines_checkpoint_engine() -> None:
    class Engine:
        _config = None
        checkpoint_engine = None

    e = Engine()
    installed = cgds.install(e, compress="none")
    assert e.checkpoint_engine is installed and installed.name == "ckptguard"
    assert not installed.preserves_storage_sharing()


# ---- DeepSpeed's plain objects, without pickle ----------------------------------------------


def test_plain_objects_round_trip_only_for_allowed_classes() -> None:
    allowed = {objects.qualified_name(LossScaler): LossScaler}
    state = {"a": [1, (LossScaler(8.0), "x")], "b": OrderedDict(c=2)}
    plain = objects.to_plain(state, allowed)
    assert type(plain["a"][1][0]) is objects.PlainObject
    assert plain["b"] is state["b"]  # unchanged containers are not copied
    back = objects.from_plain(plain, allowed)
    assert type(back["a"][1]) is tuple and back["a"][1][0].cur_scale == 8.0
    with pytest.raises(RegisteredTypeError, match="LossScaler.*a/1/0"):
        objects.from_plain(plain, {})


def test_latest_is_replaced_whole(tmp_path: Path) -> None:
    layout.write_latest(str(tmp_path), "a")
    layout.write_latest(str(tmp_path), "b")
    assert sorted(os.listdir(tmp_path)) == ["latest"]
    assert (tmp_path / "latest").read_text() == "b"
