"""Protection in the background (``protect_async``) and its bandwidth cap, under real MPI: nodes
simulated by rank groups with a store directory each (tests/dist/nodelocal.py). The job saves
its next checkpoint and runs its own collectives while the previous one is protected, and what
the background protection recorded rebuilds a lost node."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from nodekit import lose_and_rebuild, run_nodes

import ckptguard
from ckptguard.redundancy.exchange import Pace, rate_problem

# Files are moved as they are: no record is encoded or read but by verify, run on both backends
# in its own tests.
pytestmark = pytest.mark.backend_independent

HOSTS = "a,a,b,c"
FULL = os.environ.get("CKPTGUARD_FAULTS") == "all"


@pytest.mark.parametrize("scheme", ["xor", "partner"])
def test_a_background_protection_beside_the_next_save_rebuilds_a_lost_node(tmp_path, scheme):
    if scheme == "partner" and not FULL:
        pytest.skip("make faults runs the partner scheme too (CKPTGUARD_FAULTS=all)")
    base = tmp_path / "nodes"
    out = run_nodes("protect-async", scheme, str(base), HOSTS, env={"NODELOCAL_RATE": "1e6"})
    # the checkpoint is protected, the one saved meanwhile is whole on its nodes, and the job's
    # 50 all-reduces over 4 ranks all completed beside the protection
    assert [(o.get("level"), o.get("next"), o.get("steps")) for o in out] == [
        ("protected", "local", 200)
    ] * 4, out
    assert all((base / h / "store" / "LATEST").read_text() == "step-20\n" for h in "abc")
    lose_and_rebuild(base, "c", "a,a,b,c2", tmp_path / "lost-c")
    whole = tmp_path / "whole"
    whole.mkdir()
    for h in ("a", "b", "c2"):
        for f in os.listdir(base / h / "store" / "step-10"):
            shutil.copyfile(base / h / "store" / "step-10" / f, whole / f)
    assert ckptguard.verify(str(whole)).ok


def test_every_save_into_the_store_is_protected_in_the_background(tmp_path):
    base = tmp_path / "nodes"
    out = run_nodes("protect-saves", "xor", str(base), HOSTS, env={"NODELOCAL_RATE": "1e6"})
    want = {"levels": {"step-10": "protected", "step-20": "protected"}, "other": "local"}
    assert all({k: o.get(k) for k in want} == want for o in out), out
    assert all(o["waited"] == [] for o in out)  # leaving the block waited for each
    records = sorted(os.listdir(base / "b" / "store" / ".redundancy"))
    assert [r.split(".")[0] for r in records] == ["step-10", "step-20"]
    assert not (base / "b" / "other" / ".redundancy").exists()


REFUSED = [  # (scheme, rate and checkpoint name per rank, what every rank is told)
    ("xor", "none,none,none,0", "step-10", "rank 3: rate 0.0 is not a positive number of bytes"),
    ("xor", "1000", "step-10", "rank 0: rate 1000 bytes/s takes over half the 60 s deadline"),
    ("xor,xor,partner,xor", "none", "step-10", "rank 2's scheme, set_size, domains or block"),
    ("raid6", "none", "step-10", "rank 1: redundancy scheme 'raid6' is not one of partner, xor"),
    ("xor", "none", "step-10,step-10,step-10,s-2", "rank 3 protects 's-2', rank 0 'step-10'"),
]


def test_options_that_cannot_protect_are_refused_alike_on_every_rank(tmp_path):
    # refused before any node reads its checkpoint: none need exist; one job tries each in turn
    cases = json.dumps([[s, r, n] for s, r, n, _ in REFUSED])
    out = run_nodes("refuse", str(tmp_path), HOSTS, env={"NODELOCAL_CASES": cases})
    for k, (_, _, _, said) in enumerate(REFUSED):
        got = [o["refused"][k] for o in out]
        assert all(g.startswith("RedundancyError: protecting ") for g in got), got
        why = {g.split(" refused: ", 1)[-1] for g in got}  # each names its own node's path
        assert len(why) == 1 and said in why.pop(), got
    assert sorted(os.listdir(tmp_path)) == []  # nothing written on any node


def test_background_protection_without_thread_multiple_is_refused(tmp_path):
    env = {"NODELOCAL_ASYNC": "1", "MPI4PY_RC_THREAD_LEVEL": "serialized"}
    out = run_nodes("reprotect", "xor", str(tmp_path), HOSTS, env=env)
    assert all(o.get("error") == "RedundancyError" for o in out), out
    assert all("needs MPI initialized with MPI_THREAD_MULTIPLE" in o["message"] for o in out)
    assert sorted(os.listdir(tmp_path)) == []


class _Clock:
    """A clock that moves only when slept on, or by ``work``."""

    def __init__(self) -> None:
        self.now, self.slept = 100.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_a_pace_keeps_the_bytes_moved_within_its_rate():
    clock = _Clock()
    pace = Pace(1000.0, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        pace.wait(500)  # instant reads: the pace alone spaces them
    # one block passes at once; four more need 2 s of the rate before them
    assert clock.now - 100.0 == pytest.approx(2.0)
    clock.now += 10.0  # a slow read: the next block is due at once ...
    pace.wait(500)
    assert len(clock.slept) == 4
    pace.wait(500)  # ... but the pause earned no burst beyond the rate
    assert len(clock.slept) == 5 and clock.slept[-1] == pytest.approx(0.5)


def test_a_pace_without_a_rate_is_the_reader_itself():
    def read(pos: int, size: int):
        return pos, size

    assert Pace(None).reader(read) is read
    clock = _Clock()
    paced = Pace(100.0, clock=clock, sleep=clock.sleep).reader(read)
    assert [paced(0, 100), paced(100, 100)] == [(0, 100), (100, 100)]
    assert clock.slept == [pytest.approx(1.0)]


@pytest.mark.parametrize(
    "rate,said",
    [
        (None, ""),
        (1e9, ""),
        (0, "is not a positive number"),
        (-5.0, "is not a positive number"),
        (float("nan"), "is not a positive number"),
        (float("inf"), "is not a positive number"),
        (True, "is not a positive number"),
        ("1e9", "is not a positive number"),
        (1000, "give at least 279621 bytes/s or a longer timeout"),
    ],
)
def test_rates_that_cannot_keep_the_deadline_are_named(rate, said):
    got = rate_problem(rate, 4 << 20, 30.0)
    assert (said in got) if said else got == ""
