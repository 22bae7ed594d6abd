"""ckptguard.nodedrain: a node-local checkpoint drained by its nodes together into one shared
store, under `mpiexec -n 4` on three simulated nodes (tests/dist/nodelocal.py)."""

from __future__ import annotations

import filecmp
import json
import os
import shutil

import pytest
from nodekit import fault_cases, run_failing, run_nodes

import ckptguard
from ckptguard.fsutil import read_manifest

pytestmark = pytest.mark.rank_job

HOSTS = "a,a,b,c"  # node a runs ranks 0 and 1


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base = tmp_path_factory.mktemp("saved")
    assert [o["level"] for o in run_nodes("save", str(base), HOSTS)] == ["local"] * 4
    return base


def _fresh(saved, tmp_path):
    base = tmp_path / "nodes"
    shutil.copytree(saved, base, symlinks=True)
    return base, tmp_path / "pfs"


def _uuid(base) -> str:
    return read_manifest(str(base / "a" / "store" / "step-10"))[1]["uuid"]


def _drained_whole(base, pfs) -> None:
    """pfs/step-10 is the nodes' checkpoint: every data file byte for byte its node's, every
    chunk verified, LATEST names it, no staging left."""
    copy = pfs / "step-10"
    assert ckptguard.verify(copy).ok
    assert read_manifest(str(copy))[1]["uuid"] == _uuid(base)
    names = sorted(os.listdir(copy))
    assert names == ["MANIFEST.json", "index.parquet"] + [f"rank-{r:05d}.ckg" for r in range(4)]
    for node, ranks in (("a", (0, 1)), ("b", (2,)), ("c", (3,))):
        for r in ranks:
            f = f"rank-{r:05d}.ckg"
            assert filecmp.cmp(base / node / "store" / "step-10" / f, copy / f, shallow=False)
    assert ckptguard.Store(pfs).latest_name() == "step-10"
    assert os.listdir(pfs / ".staging") == []


def test_the_nodes_drain_one_checkpoint_that_a_restart_falls_back_to(saved, tmp_path):
    """Each node copies its own files; the drained checkpoint is whole, verified and LATEST; a
    second drain copies nothing; with two nodes lost, the restart loads it bitwise."""
    base, pfs = _fresh(saved, tmp_path)
    out = run_nodes("drain", str(pfs), str(base), HOSTS)
    assert all(o["path"] == str(pfs / "step-10") and o["uuid"] == _uuid(base) for o in out), out
    _drained_whole(base, pfs)

    inodes = {n: os.stat(pfs / "step-10" / n).st_ino for n in os.listdir(pfs / "step-10")}
    again = run_nodes("drain", str(pfs), str(base), HOSTS)
    assert [o["path"] for o in again] == [o["path"] for o in out]
    assert {n: os.stat(pfs / "step-10" / n).st_ino for n in inodes} == inodes

    shutil.rmtree(base / "b")
    shutil.rmtree(base / "c")
    got = run_nodes("resume-load", str(base), "a,a,b2,c2", env={"NODELOCAL_FALLBACK": str(pfs)})
    assert all(o["level"] == "drained" and o["loaded"] for o in got), got
    assert {o["path"] for o in got} == {str(pfs / "step-10")}


def _refused(base, pfs) -> list[dict]:
    out = run_nodes("drain", str(pfs), str(base), HOSTS)
    assert all("error" in o for o in out), out
    return out


@pytest.mark.parametrize("kind", ["missing", "fifo", "link"])
def test_a_part_that_lacks_a_file_is_refused_on_every_rank(saved, tmp_path, kind):
    """A data file missing, or in its place a FIFO (never opened: no hang) or a link to a copy
    of it outside the part (never followed): no node holds it, so nothing is drained."""
    base, pfs = _fresh(saved, tmp_path)
    part = base / "b" / "store" / "step-10"
    os.chmod(part, 0o755)
    os.rename(part / "rank-00002.ckg", tmp_path / "outside.ckg")
    if kind == "fifo":
        os.mkfifo(part / "rank-00002.ckg")
    elif kind == "link":
        os.symlink(tmp_path / "outside.ckg", part / "rank-00002.ckg")
    out = _refused(base, pfs)
    said = {(o["error"], o["message"]) for o in out}
    assert len(said) == 1, said
    ((kind, message),) = said
    assert kind == "StoreError" and "no node holds rank-00002.ckg whole" in message
    assert not pfs.exists()  # nothing created


def test_a_lost_part_is_refused_on_every_rank(saved, tmp_path):
    base, pfs = _fresh(saved, tmp_path)
    shutil.rmtree(base / "c")
    out = run_nodes("drain", str(pfs), str(base), "a,a,b,c2")
    assert {(o["error"], o["message"].split(":")[0]) for o in out} == {
        ("StoreError", "node c2 (rank 3) cannot open its part")
    }, out
    assert not pfs.exists()


def test_a_name_the_store_holds_with_another_uuid_is_a_conflict(saved, tmp_path):
    import torch

    base, pfs = _fresh(saved, tmp_path)
    other = ckptguard.save({"w": torch.zeros(2)}, str(pfs / "step-10"))
    out = _refused(base, pfs)
    assert out[0]["error"] == "DrainConflictError", out
    assert all(o["error"] == "StoreError" and "DrainConflictError" in o["message"] for o in out[1:])
    assert read_manifest(str(pfs / "step-10"))[1]["uuid"] == other.uuid
    assert os.listdir(pfs / ".staging") == []


# ---- a failure at each step, on each rank that reaches it -----------------------------------

# point -> the ranks that reach it: 0 leads node a (and commits), 1 only joins, 2 leads b
POINTS = {
    "drain.piece_copied": (0, 2),
    "nodedrain.verified": (0, 1, 2),
    "drain.after_rename": (0,),
}
# What `make test` runs; `make faults` (CKPTGUARD_FAULTS=all) runs every case.
SUBSET = {("drain.piece_copied", 2, "kill"), ("nodedrain.verified", 1, "eio")}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("point,rank,action", fault_cases(POINTS, SUBSET))
def test_a_failed_drain_leaves_the_store_whole_and_a_drain_completes(
    saved, tmp_path, point, rank, action
):
    """Whatever fails where, DST holds the checkpoint whole and verified or not at all, its
    LATEST never names what is absent; draining again (after gc) completes."""
    base, pfs = _fresh(saved, tmp_path)
    got = run_failing(base, ["drain", str(pfs), str(base), HOSTS], point, rank, action)
    if action == "kill":
        assert rank not in got, got
    elif action == "eio" and point != "drain.after_rename":  # after the commit point: a warning
        assert set(got) == {0, 1, 2, 3} and all("error" in o for o in got.values()), got
    st = ckptguard.Store(pfs)
    if (pfs / "step-10").exists():
        assert ckptguard.verify(pfs / "step-10").ok
    else:
        assert st.latest_name() is None
    st.gc(older_than=0)
    out = run_nodes("drain", str(pfs), str(base), HOSTS)
    assert all(o.get("path") == str(pfs / "step-10") for o in out), json.dumps(out)
    _drained_whole(base, pfs)


# ---- ckptguard drain --node-local -------------------------------------------------------------


def test_the_command_under_mpiexec_one_task_per_node(saved, tmp_path):
    """`mpiexec ... ckptguard drain --node-local SRC DST --latest`, each node's task with its
    own store (CKPTGUARD_NODE per task), and a second run that finds the copy made."""
    import sys

    from conftest import run_command
    from mpikit import need_mpi

    base, pfs = _fresh(saved, tmp_path)
    cmd = [need_mpi()]
    for r, host in enumerate(HOSTS.split(",")):
        src = base / host / "store"
        drain = [sys.executable, "-m", "ckptguard.cli", "drain", "--node-local", src, pfs]
        cmd += [":"] * (r > 0) + ["-n", "1", "-env", "CKPTGUARD_NODE", host, *drain, "--latest"]
    res = run_command(cmd, 180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("drained step-10 -> ") == 1, res.stdout  # rank 0 reports
    _drained_whole(base, pfs)
    res = run_command(cmd, 180)
    assert res.returncode == 0 and "drained step-10" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize(
    "extra",
    [[], ["--all"], ["--latest", "--overwrite"], ["--latest", "--sign-key", "k"]],
    ids=["no-name", "all", "overwrite", "sign-key"],
)
def test_the_command_refuses_what_a_node_local_drain_cannot_do(saved, tmp_path, extra):
    from clikit import run

    base, pfs = _fresh(saved, tmp_path)
    res = run("drain", "--node-local", base / "a" / "store", pfs, *extra)
    assert res.exit_code == 2 and "--node-local needs --name or --latest" in res.output
    assert not pfs.exists()
