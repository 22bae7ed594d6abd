"""ckptguard.megatron: Megatron-Core dist_checkpointing strategies over ckptguard, tested against
megatron-core on the CPU (gloo ranks under torchrun, tests/dist/megatron_run.py): a
column-parallel model resumes bitwise in a fresh process, loads whole on one rank (a reshard),
and a save killed before its commit leaves the previous checkpoint whole.

megatron-core is in the test extras (`make test` installs it): without it these tests skip, and
fail under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_command

import ckptguard
from ckptguard.errors import UnsupportedObjectError

try:
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
except ImportError as e:  # pragma: no cover - depends on the environment
    if os.environ.get("CI") == "true":
        pytest.fail(f"megatron-core is missing in CI, where `make test` installs it: {e}", False)
    reason = f"megatron-core is not installed ({e}): `make test` installs it"
    pytest.skip(reason, allow_module_level=True)

from ckptguard.megatron import strategy  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist" / "megatron_run.py"


def torchrun(n: int, *args: str, timeout: float = 300) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    env = {"PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    return run_command([*cmd, str(n), str(WORKER), *args], timeout, env=env).returncode


def records(out: Path, mode: str, n: int = 2) -> list[dict]:
    return [json.loads((out / f"{mode}-rank-{r}.json").read_text()) for r in range(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train-save-train, a save killed before its commit, the resume in a fresh process, and a
    one-rank load: each launch once."""
    out, killed = tmp_path_factory.mktemp("megatron"), tmp_path_factory.mktemp("killed")
    assert torchrun(2, "train", str(out)) == 0
    assert torchrun(2, "kill", str(killed), "megatron.before_commit") != 0
    assert torchrun(2, "resume", str(out), str(killed)) == 0
    assert torchrun(1, "full", str(out)) == 0
    return {
        "out": out,
        "train": records(out, "train"),
        "resume": records(out, "resume"),
        "full": records(out, "full", 1)[0],
    }


@pytest.mark.framework_job
def test_resume_in_a_fresh_process_is_bitwise(runs: dict) -> None:
    for trained, resumed in zip(runs["train"], runs["resume"], strict=True):
        assert resumed["saved"] == trained["saved"]
        assert resumed["losses"] == trained["losses"]
        assert resumed["final"] == trained["final"]


@pytest.mark.framework_job
def test_one_rank_loads_what_two_saved(runs: dict) -> None:
    saved = runs["train"][0]["saved"]
    assert {k: runs["full"][k] for k in saved} == saved
    assert runs["full"]["step"] == 3


@pytest.mark.framework_job
def test_a_save_killed_before_its_commit_leaves_the_previous_one(runs: dict) -> None:
    for rank in range(2):
        seen = runs["resume"][rank]
        assert seen["it5"]["error"] == "CheckpointingException", seen["it5"]
        assert "not a distributed checkpoint" in seen["it5"]["message"]
        assert seen["it3"] == runs["train"][rank]["saved"]


@pytest.mark.framework_job
def test_the_sharded_part_is_one_ckptguard_checkpoint(runs: dict) -> None:
    ckpt = runs["out"] / "it3" / strategy.CHECKPOINT
    assert ckptguard.verify(ckpt).ok
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())["manifest"]
    assert manifest["world_size"] == 2 and "pickle" not in manifest["features"]
    config = json.loads((runs["out"] / "it3" / "metadata.json").read_text())
    assert config["sharded_backend"] == strategy.BACKEND


# ---- the mapping, on Megatron's own objects ----------------------------------------------------


def test_a_sharded_tensor_is_a_shard_of_its_global_tensor() -> None:
    data = torch.arange(6.0).reshape(2, 3)
    sh = ShardedTensor.from_rank_offsets("w", data, (0, 1, 4), (1, 2, 3), prepend_axis_num=1)
    shard = strategy.as_shard(sh)
    assert shard.global_shape == (4, 6, 3) and shard.offsets == (1, 4, 0)
    assert shard.local.shape == (1, 2, 3)
    shard.local.fill_(7.0)  # a view: a load fills the ShardedTensor's data
    assert torch.equal(data, torch.full((2, 3), 7.0))


def test_saved_keys_map_back_to_sharded_tensor_keys() -> None:
    assert strategy.saved_key("tensors/decoder.layers.0.weight") == "decoder.layers.0.weight"
    assert strategy.saved_key("tensors/a%2Fb%25c") == "a/b%c"
    assert strategy.saved_key("objects/rng/shard_0_2/0") is None


def test_two_main_replicas_of_one_key_on_a_rank_are_refused(tmp_path: Path) -> None:
    a = ShardedTensor.from_rank_offsets("w", torch.ones(2), (0, 0, 2))
    b = ShardedTensor.from_rank_offsets("w", torch.ones(2), (0, 1, 2))
    with pytest.raises(UnsupportedObjectError, match="two main replicas"):
        strategy.SaveStrategy().save({"a": a, "b": b}, tmp_path)


def test_replicas_and_objects_of_other_ranks_are_not_saved_here(tmp_path: Path) -> None:
    """Only main replicas are saved (Megatron saves each box once); this single process saves
    without a job, so the checkpoint holds what rank 0 passed."""
    sd = {
        "w": ShardedTensor.from_rank_offsets("w", torch.ones(2, 2)),
        "copy": ShardedTensor.from_rank_offsets("c", torch.ones(3), replica_id=1),
        "obj": ShardedObject("o", {"x": 1}, (1,), (0,), replica_id=0),
    }
    strategy.SaveStrategy(compress="none").save(sd, tmp_path)
    loaded = ckptguard.load(tmp_path / strategy.CHECKPOINT)
    assert set(loaded["tensors"]) == {"w"}
    assert loaded["objects"] == {"o/shard_0_1": {"x": 1}}


def test_every_failpoint_of_the_strategies_is_killed_here() -> None:
    source = (HERE.parent / "ckptguard" / "megatron" / "strategy.py").read_text()
    assert re.findall(r'failpoint\("([^"]+)"\)', source) == ["megatron.before_commit"]
