"""Creating the coordinator's communicator is bounded by the save's timeout.

A rank 15 s late to its first save (the save that creates the duplicated MPI communicator or the
gloo group) must make the others give up within the save's 3 s timeout, with nothing visible;
then a save on time by every rank must succeed on a fresh communicator. The MPI job (3 ranks,
``mpiexec``) and the gloo job (4 processes) run at the same time: both mostly sleep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import free_port
from mpikit import MPIEXEC, need_mpi

import ckptguard

LATE_RANK = Path(__file__).parent / "dist" / "late_rank.py"
SLEEP, TIMEOUT, BOUND = 15, 3, 12  # the late rank's delay, the save's timeout, the others' bound
GIVE_UP = ("CoordinationTimeoutError", "CheckpointAbortedError")


class Job:
    """Processes of one launch, their logs, and where their rank-R.json files go."""

    def __init__(self, base: Path, n: int) -> None:
        self.store, self.out, self.n = base / "store", base / "out", n
        self.procs: list[tuple[subprocess.Popen, object]] = []

    def start(self, cmd: list[str], env: dict | None = None) -> None:
        log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in wait()
        env = {**os.environ, **(env or {})}
        self.procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=log), log))

    def script(self, backend: str, late: int) -> list[str]:
        """The command line of one rank (after the launcher's part)."""
        args = [self.store, self.out, late, SLEEP, TIMEOUT]
        return [sys.executable, str(LATE_RANK), backend, *map(str, args)]

    def wait(self, timeout: float = 120) -> list[dict]:
        for i, (p, log) in enumerate(self.procs):
            try:
                code = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for q, _ in self.procs:
                    q.kill()
                code = p.wait()
            log.seek(0)
            print(f"--- process {i} exit {code}\n{log.read()[-3000:]}")  # shown if a test fails
            log.close()
            assert code == 0, f"process {i} exited with {code}"
        return [json.loads((self.out / f"rank-{r}.json").read_text()) for r in range(self.n)]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Both launches, started together (each mostly waits for its late rank)."""
    mpi = None
    if MPIEXEC is not None:
        mpi = Job(tmp_path_factory.mktemp("mpi"), 3)
        mpi.start([MPIEXEC, "-n", "3", *mpi.script("mpi", late=2)])
    gloo = Job(tmp_path_factory.mktemp("gloo"), 4)
    port = str(free_port())
    for r in range(4):
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r), "WORLD_SIZE": "4"}
        gloo.start(gloo.script("torch", late=3), env)
    return {"mpi": mpi, "torch": gloo}


def check(job: Job, late: int) -> None:
    res = job.wait()
    for r in res:
        first = r["first"]
        assert not first["ok"], r
        assert first["type"] in GIVE_UP, r
        if r["rank"] != late:  # bounded by the save's timeout, not by the late rank
            assert first["seconds"] < BOUND, r
    assert "creation" in res[0]["first"]["error"], res[0]  # it named what it waited for
    assert [n for n in res[0]["visible"] if not n.startswith(".")] == [], res[0]
    # All on time: a fresh communicator / group, the save commits on every rank.
    assert all(r["second"]["ok"] for r in res), res
    assert len({r["second"]["uuid"] for r in res}) == 1
    store = ckptguard.Store(job.store)
    assert store.latest().name == "second"
    assert not (job.store / "first").exists()
    assert ckptguard.verify(job.store).ok


@pytest.mark.backend_independent  # a timeout, a signal or a race: the same on both backends
def test_a_late_rank_under_mpi_times_out_the_others(jobs):
    if jobs["mpi"] is None:  # no mpiexec: need_mpi() skips (fails in CI)
        need_mpi()
    check(jobs["mpi"], late=2)


@pytest.mark.backend_independent  # a timeout, a signal or a race: the same on both backends
def test_a_late_rank_under_gloo_times_out_the_others(jobs):
    check(jobs["torch"], late=3)
