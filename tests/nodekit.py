"""Running tests/dist/nodelocal.py: nodes simulated by rank groups under `mpiexec -n 4`, each
node with its own store directory BASE/<host>/store."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from conftest import run_command
from mpikit import need_mpi
from slurmkit import clean_env

SCENARIO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist", "nodelocal.py")
ACTIONS = ("kill", "eio", "hang")


def run_nodes(*args: str, env: dict[str, str] | None = None) -> list[dict]:
    """The scenario ``args`` (its last two: BASE and the hosts), which must succeed as a job;
    every rank's outcome. ``env``: NODELOCAL_NAME, NODELOCAL_FALLBACK (tests/dist/nodelocal.py)."""
    cmd = [need_mpi(), "-n", "4", sys.executable, SCENARIO, *args]
    res = run_command(cmd, 180, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    out = os.path.join(args[-2], "out")
    got = [json.loads(Path(out, f"rank-{r}.json").read_text()) for r in range(4)]
    shutil.rmtree(out)
    return got


def lose_and_rebuild(base: Path, lost: str, hosts: str, keep: Path) -> None:
    """Lose node ``lost`` (its store deleted; a copy of its step-10 kept at ``keep``), rebuild
    on ``hosts`` (a new node in its place) and check that the new node's part is the lost one,
    byte for byte."""
    shutil.copytree(base / lost / "store" / "step-10", keep)
    shutil.rmtree(base / lost)
    (new,) = set(hosts.split(",")) - {p.name for p in base.iterdir()}
    got = run_nodes("rebuild", str(base), hosts)
    assert all(o.get("rebuilt") == [new] and o["level"] == "protected" for o in got), got
    mine = base / new / "store" / "step-10"
    assert sorted(os.listdir(mine)) == sorted(os.listdir(keep))
    assert all(filecmp.cmp(keep / n, mine / n, shallow=False) for n in os.listdir(keep))


def fault_cases(points: dict[str, tuple[int, ...]], subset: set[tuple[str, int, str]]) -> list:
    """pytest params (point, rank, action) of every point on each rank that reaches it with each
    of ACTIONS under ``make faults`` (CKPTGUARD_FAULTS=all); else only those of ``subset``."""
    import pytest

    full = os.environ.get("CKPTGUARD_FAULTS") == "all"
    return [
        pytest.param(point, rank, action, id=f"{point}:{rank}:{action}")
        for point, ranks in points.items()
        for rank in ranks
        for action in ACTIONS
        if full or (point, rank, action) in subset
    ]


def run_failing(base: Path, args: list[str], point: str, rank: int, action: str) -> dict[int, dict]:
    """The scenario ``args`` with a failpoint armed, killed after 90 s if it hangs; the outcomes
    of the ranks that wrote one. With a hang, every other rank must have given up with an error
    within its deadline (NODELOCAL_TIMEOUT=8)."""
    env = {
        **clean_env(),
        "CKPTGUARD_FAILPOINT": f"{point}:{rank}:{action}",
        "NODELOCAL_TIMEOUT": "8",
    }
    cmd = [need_mpi(), "-n", "4", sys.executable, SCENARIO, *args]
    with subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as p:
        try:
            text = p.communicate(timeout=90)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            text = p.communicate()[0].decode(errors="replace")
            assert action == "hang", f"the job hung without a hang injected:\n{text[-3000:]}"
    out = base / "out"
    got = {}
    for r in range(4):
        f = out / f"rank-{r}.json"
        if f.exists():
            got[r] = json.loads(f.read_text())
    shutil.rmtree(out, ignore_errors=True)
    if action == "hang":
        assert set(got) == {0, 1, 2, 3} - {rank} and all("error" in o for o in got.values()), text
    return got
