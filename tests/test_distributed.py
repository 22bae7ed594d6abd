"""Distributed saves and resharding loads with real MPI (MPICH + mpi4py) and torch gloo ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import free_port, read_body, resign_manifest, run_command
from mpikit import need_mpi

import ckptguard

HERE = os.path.dirname(os.path.abspath(__file__))
SCENARIOS = os.path.join(HERE, "dist", "scenarios.py")


def mpirun(n: int, *args: str, env: dict | None = None, timeout: float = 120) -> int:
    cmd = [need_mpi(), "-n", str(n), sys.executable, SCENARIOS, "mpi", *args]
    return run_command(cmd, timeout, env=env).returncode


def torchrun(n: int, *args: str, timeout: float = 120) -> list[int]:
    port = str(free_port())
    procs = []
    for r in range(n):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(r),
            "WORLD_SIZE": str(n),
        }
        log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed below
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, SCENARIOS, "torch", *args], env=env, stdout=log, stderr=log
                ),
                log,
            )
        )
    codes = []
    for r, (p, log) in enumerate(procs):
        codes.append(p.wait(timeout=timeout))
        log.seek(0)
        print(f"--- rank {r} exit {codes[-1]}\n{log.read()[-3000:]}")  # shown if a test fails
        log.close()
    return codes


def outcomes(tmp_path, n: int) -> list[dict]:
    res = []
    for r in range(n):
        with open(tmp_path / "out" / f"rank-{r}.json") as f:
            res.append(json.load(f))
    shutil.rmtree(tmp_path / "out")
    return res


@pytest.fixture
def store(tmp_path):
    return tmp_path / "store"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints saved once per world size (1, 2, 4), shared by the load tests."""
    out = {}
    for n in (4, 2, 1):
        base = tmp_path_factory.mktemp(f"saved{n}")
        assert mpirun(n, "save", str(base / "store"), "step-10") == 0
        res = outcomes(base, n)
        assert all(r["ok"] for r in res), res
        assert len({(r["uuid"], r["name"], r["tensors"], r["raw"]) for r in res}) == 1
        out[n] = base / "store"
    return out


def copy_of(saved_store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(saved_store, dst)
    return dst


def test_sharded_save_at_4(saved):
    info = ckptguard.Store(saved[4]).latest()
    assert info.world_size == 4 and info.files == 4 and info.step == 10
    assert ckptguard.verify(saved[4]).ok
    desc = {t.key: t for t in ckptguard.describe(saved[4]).tensors}
    assert desc["model/bias"].raw_bytes == 16  # a replicated tensor is written once
    assert desc["model/w"].raw_bytes == 18 * 5 * 4  # every shard exactly once


@pytest.mark.parametrize("n_saved,n_loaded", [(4, 4), (4, 2), (2, 4), (4, 1), (1, 4)])
def test_resharding_load(tmp_path, saved, n_saved, n_loaded):
    store = copy_of(saved[n_saved], tmp_path)
    assert mpirun(n_loaded, "load", str(store), str(n_saved)) == 0
    res = outcomes(tmp_path, n_loaded)
    assert all(r["ok"] for r in res), res


@pytest.mark.parametrize("located", [True, False])
@pytest.mark.rank_job
def test_collective_load_reads_the_metadata_once(tmp_path, saved, located):
    """A restart's collective load under MPI: rank 0 alone reads MANIFEST.json (and, for a
    checkpoint without a locator, index.parquet); every rank still reads the data files it
    needs and gets its shards."""
    store = copy_of(saved[4], tmp_path)
    if not located:
        resign_manifest(store / "step-10", _without_locator)
    assert mpirun(4, "joint_load", str(store), "4") == 0
    res = outcomes(tmp_path, 4)
    assert all(r["ok"] for r in res), res
    rank0 = (1, 0 if located else 1)
    assert [(r["manifest_opens"], r["index_opens"]) for r in res] == [rank0] + [(0, 0)] * 3
    assert all(r["data_opens"] >= 1 for r in res)


def _without_locator(body: dict) -> None:
    body["features"].remove("locator")
    del body["locator"]


@pytest.mark.rank_job
def test_eight_ranks_commit_and_three_load_collectively(tmp_path, store):
    """A save by 8 MPI ranks (one with an empty shard) has a locator; 3 ranks load it
    collectively, resharded, each from the footers of the files its rows lie in."""
    assert mpirun(8, "save", str(store), "step-10") == 0
    assert all(r["ok"] for r in outcomes(tmp_path, 8))
    assert "locator" in read_body(store / "step-10")["features"]
    assert mpirun(3, "joint_load", str(store), "8") == 0
    res = outcomes(tmp_path, 3)
    assert all(r["ok"] for r in res), res
    assert [(r["manifest_opens"], r["index_opens"]) for r in res] == [(1, 0)] + [(0, 0)] * 2


@pytest.mark.skipif(
    os.environ.get("CKPTGUARD_FAULTS") != "all",
    reason="`make faults` runs it: 16 and 32 ranks on a small machine take minutes",
)
@pytest.mark.timeout(2400)  # three launches of 32 ranks, each importing torch, on 2 cores
@pytest.mark.parametrize("n", [16, 32])
def test_many_ranks_commit_and_load(tmp_path, store, n):
    """A save by 16 or 32 MPI ranks (many with empty shards) has a locator; the same ranks
    load it collectively (rank 0 alone opens the manifest, nobody the index) and each alone."""
    assert mpirun(n, "save", str(store), "step-10", timeout=900) == 0
    assert all(r["ok"] for r in outcomes(tmp_path, n))
    assert "locator" in read_body(store / "step-10")["features"]
    for scenario in ("joint_load", "load"):
        assert mpirun(n, scenario, str(store), str(n), timeout=900) == 0
        res = outcomes(tmp_path, n)
        assert all(r["ok"] for r in res), res
        if scenario == "joint_load":
            opens = [(r["manifest_opens"], r["index_opens"]) for r in res]
            assert opens == [(1, 0)] + [(0, 0)] * (n - 1)


@pytest.mark.rank_job
def test_collective_resharding_load_under_gloo(tmp_path, saved):
    store = copy_of(saved[4], tmp_path)
    assert torchrun(2, "joint_load", str(store), "4") == [0, 0]
    res = outcomes(tmp_path, 2)
    assert all(r["ok"] for r in res), res
    assert [(r["manifest_opens"], r["index_opens"]) for r in res] == [(1, 0), (0, 0)]


def test_replicas_written_by_different_ranks(saved):
    rows = read_rows(saved[4] / "step-10")
    writers = {r.key: r.rank for r in rows if r.shard_lengths == r.global_shape}
    assert len(set(writers.values())) > 1  # replicated tensors are spread across ranks


def read_rows(ckpt):
    from ckptguard.format.index import read

    return read((ckpt / "index.parquet").read_bytes())


@pytest.mark.rank_job
def test_torch_backend_matches_mpi(tmp_path, store):
    assert torchrun(4, "save", str(store), "t") == [0, 0, 0, 0]
    res = outcomes(tmp_path, 4)
    assert all(r["ok"] for r in res)
    assert mpirun(2, "load", str(store), "4") == 0
    assert all(r["ok"] for r in outcomes(tmp_path, 2))
    assert torchrun(4, "load", str(store), "4") == [0, 0, 0, 0]
    assert all(r["ok"] for r in outcomes(tmp_path, 4))


@pytest.mark.rank_job
def test_a_normal_exit_destroys_ckptguards_gloo_group_first(tmp_path, store):
    """torch holds every process group until the interpreter is torn down, where destroying a
    gloo group can abort a process that finished its work; ckptguard's own group is destroyed
    by an exit handler while the interpreter is whole, leaving only the caller's WORLD."""
    assert torchrun(2, "exit", str(store), "t") == [0, 0]
    left = [json.loads((tmp_path / "out" / f"exit-{r}.json").read_text()) for r in range(2)]
    assert all(r["ok"] for r in outcomes(tmp_path, 2))
    assert left == [{"groups": 1}] * 2


@pytest.mark.rank_job
def test_dtensor_save_at_4_load_at_2_with_other_placement(tmp_path, store):
    assert torchrun(4, "dtensor_save", str(store), "dt") == [0, 0, 0, 0]
    assert all(r["ok"] for r in outcomes(tmp_path, 4))
    assert torchrun(2, "dtensor_load", str(store)) == [0, 0]
    res = outcomes(tmp_path, 2)
    assert all(r["ok"] for r in res), res


def _prepare_old(saved, tmp_path):
    return copy_of(saved[4], tmp_path)


def _nothing_new(store) -> None:
    """Invariants after a failed save: only the old checkpoint, LATEST whole, gc reclaims all."""
    assert [i.name for i in ckptguard.Store(store).list()] == ["step-10"]
    assert ckptguard.Store(store).latest().name == "step-10"
    assert ckptguard.verify(store).ok
    ckptguard.Store(store).gc(older_than=0)
    staging = store / ".staging"
    assert not staging.exists() or os.listdir(staging) == []


@pytest.mark.rank_job
def test_a_rank_raising_aborts_every_rank(tmp_path, saved):
    store = _prepare_old(saved, tmp_path)
    env = {"CKPTGUARD_FAILPOINT": "save.data_written:2:eio"}
    assert mpirun(4, "fail", str(store), "new", env=env) != 0
    res = outcomes(tmp_path, 4)
    assert [r["type"] for r in res] == ["CheckpointAbortedError"] * 4
    assert len({r["error"] for r in res}) == 1 and res[0]["failed_rank"] == 2
    assert "rank 2" in res[0]["error"] and "injected EIO" in res[0]["error"]
    staging = store / ".staging"
    assert not staging.exists() or os.listdir(staging) == []  # removed by the save itself
    _nothing_new(store)


@pytest.mark.rank_job
def test_diverging_replicas_are_refused(tmp_path, store):
    assert mpirun(4, "diverge", str(store), "d") != 0
    res = outcomes(tmp_path, 4)
    assert all(r["type"] == "CheckpointAbortedError" for r in res)
    assert "model/bias" in res[0]["error"] and len({r["error"] for r in res}) == 1
    assert not (store / "d").exists()


@pytest.mark.rank_job
def test_ranks_that_name_different_checkpoints_all_raise(tmp_path, saved):
    store = _prepare_old(saved, tmp_path)
    assert mpirun(4, "options", str(store), "new") != 0
    res = outcomes(tmp_path, 4)
    assert [r["type"] for r in res] == ["OptionsMismatchError"] * 4
    assert len({r["error"] for r in res}) == 1
    assert "'path'" in res[0]["error"] and "new-x' on rank 2" in res[0]["error"]
    assert not (store / "new").exists() and not (store / "new-x").exists()
    _nothing_new(store)


@pytest.mark.backend_independent  # a timeout, a signal or a race: the same on both backends
def test_a_stalled_rank_times_out_everywhere(tmp_path, saved):
    store = _prepare_old(saved, tmp_path)
    env = {"CKPTGUARD_FAILPOINT": "save.data_written:2:hang"}
    t0 = time.monotonic()
    assert mpirun(4, "fail", str(store), "new", "5", env=env) != 0
    assert time.monotonic() - t0 < 60  # bounded by the 5 s timeout, never a hang
    res = [json.loads((tmp_path / "out" / f"rank-{r}.json").read_text()) for r in (0, 1, 3)]
    assert all(r["type"] == "CoordinationTimeoutError" for r in res)
    _nothing_new(store)


@pytest.mark.backend_independent  # a timeout, a signal or a race: the same on both backends
def test_a_commit_too_late_for_the_others_is_not_made(tmp_path, saved):
    """Rank 0 reaches the rename after the other ranks' deadline for the outcome: it must not
    commit what they will report as failed. Every rank reports the same abort (I8)."""
    store = _prepare_old(saved, tmp_path)
    env = {"CKPTGUARD_FAILPOINT": "commit.before_rename:0:sleep7.5"}
    assert mpirun(4, "fail", str(store), "new", "5", env=env) != 0
    res = outcomes(tmp_path, 4)
    assert [r["type"] for r in res] == ["CheckpointAbortedError"] * 4, res
    assert len({r["error"] for r in res}) == 1 and res[0]["failed_rank"] == 0
    assert "not committed" in res[0]["error"], res[0]
    _nothing_new(store)


@pytest.mark.rank_job
def test_a_rank_killed_mid_save_leaves_nothing(tmp_path, saved):
    store = _prepare_old(saved, tmp_path)
    env = {"CKPTGUARD_FAILPOINT": "save.data_written:2:kill"}
    assert mpirun(4, "fail", str(store), "new", env=env) != 0  # the launcher ends the job
    _nothing_new(store)


@pytest.mark.backend_independent  # a timeout, a signal or a race: the same on both backends
def test_a_rank_killed_under_gloo_others_time_out(tmp_path, saved):
    store = _prepare_old(saved, tmp_path)
    port = str(free_port())
    procs = []
    for r in range(4):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(r),
            "WORLD_SIZE": "4",
            "CKPTGUARD_FAILPOINT": "save.data_written:2:kill",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, SCENARIOS, "torch", "fail", str(store), "new", "5"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    codes = [p.wait(timeout=120) for p in procs]
    assert codes[2] == -9 and all(c != 0 for c in codes)
    for r in (0, 1, 3):
        with open(tmp_path / "out" / f"rank-{r}.json") as f:
            out = json.load(f)
        assert out["type"] in ("CoordinationTimeoutError", "CheckpointAbortedError"), out
    _nothing_new(store)


def test_corrupted_rank_file_is_named_by_verify(tmp_path, saved):
    store = copy_of(saved[4], tmp_path)
    rows = read_rows(store / "step-10")
    victim = next(r for r in rows if r.rank == 1)
    path = store / "step-10" / victim.file
    data = bytearray(path.read_bytes())
    data[victim.offset + 64] ^= 0xFF
    path.write_bytes(bytes(data))
    report = ckptguard.verify(store / "step-10")
    assert not report.ok
    assert report.problems[0].file == "rank-00001.ckg" and report.problems[0].key == victim.key


@pytest.mark.rank_job
def test_examples_distributed_demo(tmp_path):
    need_mpi()
    demo = os.path.join(os.path.dirname(HERE), "examples", "distributed_demo.py")
    proc = run_command([sys.executable, demo, "--store", tmp_path / "s"], 600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank-00002.ckg" in proc.stdout and "All distributed checks passed." in proc.stdout
