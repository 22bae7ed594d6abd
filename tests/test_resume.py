"""Choosing what a restarted job resumes from (ckptguard.redundancy.resume): real MPI with
nodes a, a, b, c simulated by store directories (tests/dist/nodelocal.py). step-10 is saved
node-local and protected by XOR; step-20, newer, is saved node-local only."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from mpikit import need_mpi
from nodekit import SCENARIO, run_failing, run_nodes
from slurmkit import clean_env

import ckptguard
from ckptguard.redundancy.resume import _lost, candidates

pytestmark = pytest.mark.backend_independent  # files are moved as they are

HOSTS = "a,a,b,c"
NODES = ("a", "b", "c")


def _part(base, host: str, name: str):
    return base / host / "store" / name


@pytest.fixture(scope="module")
def two_saves(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    assert {o["level"] for o in run_nodes("protect", "xor", str(base), HOSTS)} == {"protected"}
    out = run_nodes("save", str(base), HOSTS, env={"NODELOCAL_NAME": "step-20"})
    assert {o["level"] for o in out} == {"local"}
    return base


def _fresh(two_saves, tmp_path):
    shutil.copytree(two_saves, tmp_path / "nodes", symlinks=True)
    return tmp_path / "nodes"


def _one(out: list[dict]) -> dict:
    """The outcome every rank reported alike (all but its own path)."""
    same = [{k: v for k, v in o.items() if k not in ("rank", "path")} for o in out]
    assert all(s == same[0] for s in same), out
    return same[0]


def test_intact_nodes_resume_from_the_newest_without_moving_a_byte(two_saves, tmp_path):
    base = _fresh(two_saves, tmp_path)
    out = run_nodes("resume", str(base), HOSTS)
    got = _one(out)
    assert (got["name"], got["level"], got["rebuilt"], got["dropped"]) == (
        "step-20",
        "local",
        [],
        [],
    )
    assert [o["path"] for o in out] == [str(_part(base, h, "step-20")) for h in HOSTS.split(",")]


def test_a_lost_node_resumes_from_the_newest_protected_rebuilt_bitwise(two_saves, tmp_path):
    base = _fresh(two_saves, tmp_path)
    before = tmp_path / "b-before"
    shutil.copytree(_part(base, "b", "step-10"), before)
    shutil.rmtree(base / "b")
    out = run_nodes("resume", str(base), "a,a,b2,c")
    got = _one(out)
    assert (got["name"], got["level"], got["rebuilt"], got["dropped"]) == (
        "step-10",
        "protected",
        ["b2"],
        ["step-20"],
    )
    assert "step-20 is missing on b2 and not protected" in got["note"]
    rebuilt = _part(base, "b2", "step-10")
    assert sorted(os.listdir(rebuilt)) == sorted(os.listdir(before))
    assert all(filecmp.cmp(before / f, rebuilt / f, shallow=False) for f in os.listdir(before))
    for h in ("a", "b2", "c"):  # step-20 can never load: gone, so that it can be saved again
        assert not _part(base, h, "step-20").exists()
        assert (base / h / "store" / "LATEST").read_text() == "step-10\n"
    again = _one(run_nodes("resume", str(base), "a,a,b2,c"))
    assert (again["name"], again["rebuilt"], again["dropped"]) == ("step-10", [], [])


def test_a_failed_fetch_fails_every_rank_alike_and_installs_nothing(two_saves, tmp_path):
    """The load reads files its node lacks; node b's check of what it received fails: every rank
    raises the same error, b's part is as it was, and the load then succeeds."""
    if os.environ.get("CKPTGUARD_FAULTS") != "all":
        pytest.skip("make faults runs it (CKPTGUARD_FAULTS=all): make test keeps to its budget")
    base = _fresh(two_saves, tmp_path)
    before = sorted(os.listdir(_part(base, "b", "step-20")))
    got = run_failing(base, ["resume-load", str(base), HOSTS], "fetch.received", 2, "eio")
    assert sorted(got) == [0, 1, 2, 3] and len({o.get("message") for o in got.values()}) == 1
    assert all(o.get("error") == "RebuildError" for o in got.values()), got
    assert "could not be fetched: node b" in got[0]["message"]
    assert sorted(os.listdir(_part(base, "b", "step-20"))) == before
    out = run_nodes("resume-load", str(base), HOSTS)
    assert all(o.get("loaded") is True for o in out), out
    assert len(os.listdir(_part(base, "b", "step-20"))) > len(before)  # what its ranks read


def test_nothing_the_nodes_can_load_falls_back_to_the_drained_store(two_saves, tmp_path):
    base = _fresh(two_saves, tmp_path)
    drained = tmp_path / "pfs"
    ckptguard.save({"w": torch.arange(4)}, str(drained / "step-5"))
    shutil.rmtree(base / "b")
    shutil.rmtree(base / "c")  # two members of one XOR set: step-10 cannot be rebuilt
    out = run_nodes("resume", str(base), "a,a,b2,c2", env={"NODELOCAL_FALLBACK": str(drained)})
    got = _one(out)
    assert (got["name"], got["level"], got["rebuilt"]) == ("step-5", "drained", [])
    assert sorted(got["dropped"]) == ["step-10", "step-20"]
    assert "step-10 could not be rebuilt" in got["note"]
    assert f"resuming from step-5 in {drained}" in got["note"]
    assert {o["path"] for o in out} == {str(drained / "step-5")}
    assert not _part(base, "a", "step-10").exists()


def test_without_a_fallback_the_job_starts_afresh_and_says_why(tmp_path):
    got = _one(run_nodes("resume", str(tmp_path), HOSTS))
    assert (got["name"], got["level"]) == (None, "none")
    assert "no node-local checkpoint can load" in got["note"]


def _kill_node_b(launch: list[str], base, scheme: str) -> None:
    """Start a job that saves node-local, protects and trains on; once every rank is past the
    protection, kill node b's rank (SIGKILL, as a lost node), and see the job end."""
    cmd = [*launch, sys.executable, SCENARIO, "train", scheme]
    cmd += [str(base), HOSTS]
    pids = [base / "out" / f"pid-{r}" for r in range(4)]
    with subprocess.Popen(
        cmd,
        env=clean_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as job:
        try:
            deadline = time.monotonic() + 240
            while not all(p.exists() for p in pids) and job.poll() is None:
                assert time.monotonic() < deadline, "the job never got past its protection"
                time.sleep(0.2)
            assert job.poll() is None, job.communicate()[0].decode(errors="replace")
            os.kill(int(pids[2].read_text()), signal.SIGKILL)
            job.communicate(timeout=120)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    shutil.rmtree(base / "out")


def _resume_bitwise(launch: list[str], base) -> list[dict]:
    """The restart on a fresh node b2: resume, then every rank loads and compares."""
    shutil.rmtree(base / "b")  # the lost node's disk went with it
    cmd = [*launch, sys.executable, SCENARIO, "resume-load", str(base), "a,a,b2,c"]
    res = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = [json.loads((base / "out" / f"rank-{r}.json").read_text()) for r in range(4)]
    assert all(o.get("loaded") is True for o in out), out
    got = _one(out)
    assert (got["name"], got["level"], got["rebuilt"]) == ("step-10", "protected", ["b2"])
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("scheme", ["xor", "partner"])
def test_a_killed_node_is_rebuilt_and_the_job_resumes_bitwise(tmp_path, scheme):
    if scheme != "xor" and os.environ.get("CKPTGUARD_FAULTS") != "all":
        pytest.skip("make faults runs the partner scheme too (CKPTGUARD_FAULTS=all)")
    launch = [need_mpi(), "-n", "4"]
    _kill_node_b(launch, tmp_path, scheme)
    _resume_bitwise(launch, tmp_path)
    # the restarted node got its part back, and only the files its ranks read besides
    assert "rank-00002.ckg" in os.listdir(_part(tmp_path, "b2", "step-10"))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("scheme", ["xor", "partner"])
def test_under_slurm_a_killed_node_is_rebuilt_and_the_job_resumes_bitwise(tmp_path, job, scheme):
    if scheme != "xor" and os.environ.get("CKPTGUARD_FAULTS") != "all":
        pytest.skip("make faults runs the partner scheme too (CKPTGUARD_FAULTS=all)")
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install '.[mpi]')")
    launch = ["srun", *job[:2], "--time=10", "--mpi=pmi2", "--kill-on-bad-exit=1", "-n", "4"]
    _kill_node_b(launch, tmp_path, scheme)
    _resume_bitwise(launch, tmp_path)


def _p(name: str, uid: str, created: str, whole: bool = True, world: int = 4, prot=False):
    return {
        "name": name,
        "uuid": uid,
        "created": created,
        "world": world,
        "whole": whole,
        "protected": prot,
    }


def test_candidates_are_newest_first_and_count_only_whole_parts_of_this_world():
    held = {
        "a": [_p("s1", "u1", "2026-01-01T00:00:00Z"), _p("s2", "u2", "2026-01-02T00:00:00Z")],
        "b": [_p("s2", "u2", "2026-01-02T00:00:00Z", whole=False)],
        "c": [_p("s1", "u1", "2026-01-01T00:00:00Z", prot=True), _p("s2", "u9", "2026-01-03")],
    }
    got = candidates(held, 4)
    assert [(c["name"], c["uuid"]) for c in got] == [("s2", "u9"), ("s2", "u2"), ("s1", "u1")]
    assert got[1]["holders"] == ["a"] and got[1]["present"] == ["a", "b"]
    assert got[2]["protected"] and got[2]["holders"] == ["a", "c"]
    assert candidates(held, 8)[2]["holders"] == []  # saved by 4 ranks: no part is whole for 8


def test_only_checkpoints_that_can_never_load_are_dropped():
    held = {"a": [_p("s", "u", "t")], "b": [_p("s", "u", "t", whole=False)], "c": []}
    (moved,) = candidates(held, 4)  # b holds a part, for other ranks: ranks moved, not lost
    assert not _lost(moved, 4)
    (lost,) = candidates({"a": [_p("s", "u", "t")], "b": [], "c": []}, 4)
    assert _lost(lost, 4)
    assert not _lost(lost, 8)  # a job restarted at another size may come back to it
