"""Invariants I1-I8 after a failure at each commit stage on each rank of a 4-rank MPI save.

Cases come from tests/fault_cases.txt. After every case: the old checkpoint and LATEST are whole
(or LATEST names the new one, if the failure came after it moved), no partial checkpoint is
visible, every surviving rank raised the same error naming the failing rank (or timed out, for a
hang), and gc reclaims every leftover.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from test_distributed import mpirun, need_mpi

import ckptguard

HERE = os.path.dirname(os.path.abspath(__file__))


def cases() -> list[tuple[str, int, str, str]]:
    out = []
    with open(os.path.join(HERE, "fault_cases.txt")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                point, rank, action, expect = line.split()
                out.append((point, int(rank), action, expect))
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    need_mpi()
    d = tmp_path_factory.mktemp("base")
    assert mpirun(4, "save", str(d / "store"), "step-10") == 0
    shutil.rmtree(d / "out")
    return d / "store"


@pytest.mark.parametrize(
    "point,rank,action,expect", cases(), ids=[f"{p}:{r}:{a}" for p, r, a, _ in cases()]
)
def test_failure_leaves_invariants(tmp_path, base, point, rank, action, expect):
    store = tmp_path / "store"
    shutil.copytree(base, store)
    env = {"CKPTGUARD_FAILPOINT": f"{point}:{rank}:{action}"}
    code = mpirun(4, "fail", str(store), "new", "5", env=env, timeout=120)
    names = [i.name for i in ckptguard.Store(store).list()]
    if expect == "absent":
        assert code != 0 and names == ["step-10"]
        assert ckptguard.Store(store).latest().name == "step-10"
    else:  # the failure came after the rename: the new checkpoint is whole
        assert sorted(names) == ["new", "step-10"]
        assert ckptguard.verify(store / "new").ok
        assert ckptguard.Store(store).latest().name == ("new" if expect == "latest" else "step-10")
    assert ckptguard.verify(store).ok  # LATEST loads and verifies (I3, I5)
    stray = [n for n in os.listdir(store) if n not in (*names, "LATEST", ".staging")]
    assert all(n.startswith(".LATEST.") for n in stray)  # I1: nothing else appeared
    if action in ("eio", "enospc", "hang"):  # every other rank reports the same outcome (I8)
        outs = []
        for r in range(4):
            path = tmp_path / "out" / f"rank-{r}.json"
            if r != rank or action != "hang":
                with open(path) as f:
                    outs.append(json.load(f))
        if action == "hang":
            assert {o["type"] for o in outs} == {"CoordinationTimeoutError"}
        else:
            assert {o["type"] for o in outs} == {"CheckpointAbortedError"}
            assert len({o["error"] for o in outs}) == 1 and outs[0]["failed_rank"] == rank
    ckptguard.Store(store).gc(older_than=0)
    staging = store / ".staging"
    assert not staging.exists() or os.listdir(staging) == []  # I4: nothing left to reclaim
    assert not [n for n in os.listdir(store) if n.startswith(".LATEST.")]
