"""Protected node-local checkpoints under real MPI: nodes simulated by rank groups with a store
directory each (tests/dist/nodelocal.py). A node is lost (its store deleted), a node of another
name with an empty store takes its ranks, and the rebuild gives it back the same bytes, checked
against the checkpoint's hashes, and its part of the set's protection."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import sys

import pytest
from conftest import run_command
from mpikit import need_mpi

import ckptguard
from ckptguard.errors import RedundancyError
from ckptguard.redundancy.protect import check_record, node_files, set_record

# Files are moved as they are; the one read of records (the rebuilt files checked against the
# index) is verify's, which both backends run in its own tests.
pytestmark = pytest.mark.backend_independent

SCENARIO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist", "nodelocal.py")
HOSTS = "a,a,b,c"  # node a runs ranks 0 and 1


def _run(*args: str) -> list[dict]:
    cmd = [need_mpi(), "-n", "4", sys.executable, SCENARIO, *args]
    res = run_command(cmd, 180)
    assert res.returncode == 0, res.stdout + res.stderr
    out = os.path.join(args[-2], "out")
    got = [json.load(open(os.path.join(out, f"rank-{r}.json"))) for r in range(4)]  # noqa: SIM115
    shutil.rmtree(out)
    return got


def _record(base, host: str):
    red = base / host / "store" / ".redundancy"
    (entry,) = os.listdir(red)
    return red / entry


@pytest.fixture(scope="module", params=["xor", "partner"])
def protected(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"nodes-{request.param}")
    out = _run("protect", request.param, str(base), HOSTS)
    assert [o["level"] for o in out] == ["protected"] * 4
    return request.param, base


def _fresh(protected, tmp_path):
    scheme, base = protected
    shutil.copytree(base, tmp_path / "nodes", symlinks=True)
    return scheme, tmp_path / "nodes"


@pytest.mark.parametrize("lost,new", [("a", "a2"), ("c", "c2")])
def test_a_lost_node_is_rebuilt_on_a_new_one(protected, tmp_path, lost, new):
    scheme, base = _fresh(protected, tmp_path)
    kept = "parity" if scheme == "xor" else "ward"
    before = tmp_path / "before"
    shutil.copytree(_record(base, lost), before)
    shutil.rmtree(base / lost)
    hosts = HOSTS.replace(lost, new)
    out = _run("rebuild", str(base), hosts)
    assert all(o.get("rebuilt") == [new] and o["level"] == "protected" for o in out), out
    shared, mine = base / "shared" / "step-10", base / new / "store" / "step-10"
    ranks = [r for r, h in enumerate(hosts.split(",")) if h == new]
    names = sorted(["MANIFEST.json", "index.parquet"] + [f"rank-{r:05d}.ckg" for r in ranks])
    assert sorted(os.listdir(mine)) == names
    assert all(filecmp.cmp(shared / n, mine / n, shallow=False) for n in names)
    assert (base / new / "store" / "LATEST").read_text() == "step-10\n"
    # its part of the protection is made again, byte for byte what the lost node had
    after = _record(base, new)
    if scheme == "xor":
        assert (after / kept).read_bytes() == (before / kept).read_bytes()
    else:
        cmp = filecmp.dircmp(after / kept, before / kept)
        assert cmp.left_list == cmp.right_list and cmp.common_files
        assert filecmp.cmpfiles(after / kept, before / kept, cmp.common_files, shallow=False)[
            1:
        ] == ([], [])
    # every node's part put together is the whole checkpoint, and it verifies
    whole = tmp_path / "whole"
    shutil.copytree(shared, whole)
    assert ckptguard.verify(str(whole)).ok
    # a second rebuild finds nothing lost
    again = _run("rebuild", str(base), hosts)
    assert all(o.get("rebuilt") == [] for o in again), again


def test_protecting_a_protected_checkpoint_again_changes_nothing(protected, tmp_path):
    scheme, base = _fresh(protected, tmp_path)
    before = {h: sorted(os.listdir(_record(base, h))) for h in "abc"}
    marks = {h: (_record(base, h) / "PROTECTED").read_bytes() for h in "abc"}
    out = _run("reprotect", scheme, str(base), HOSTS)
    assert [(o["level"], o["stored"]) for o in out] == [("protected", 0)] * 4
    assert {h: sorted(os.listdir(_record(base, h))) for h in "abc"} == before
    assert {h: (_record(base, h) / "PROTECTED").read_bytes() for h in "abc"} == marks


def test_more_losses_than_the_scheme_survives_rebuild_nothing(protected, tmp_path):
    scheme, base = _fresh(protected, tmp_path)
    shutil.rmtree(base / "b")
    shutil.rmtree(base / "c")
    out = _run("rebuild", str(base), "a,a,x,y")
    msgs = {o.get("message") for o in out}
    assert len(msgs) == 1 and all(o.get("error") == "RebuildError" for o in out), out
    want = "XOR set are lost; it survives one" if scheme == "xor" else "its partner are both lost"
    assert want in msgs.pop()
    assert not os.path.exists(base / "x") and not os.path.exists(base / "y")


def test_a_damaged_survivor_fails_the_rebuild_and_installs_nothing(protected, tmp_path):
    scheme, base = _fresh(protected, tmp_path)
    shutil.rmtree(base / "b")
    if scheme == "xor":  # b, member 1 of 3 with less than a segment: c's parity covers it
        victim = _record(base, "c") / "parity"
    else:  # the node whose ward b is keeps a copy of b's file
        (victim,) = [
            _record(base, h) / "ward" / "rank-00002.ckg"
            for h in "ac"
            if (_record(base, h) / "ward" / "rank-00002.ckg").exists()
        ]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(victim, 0o600)
    victim.write_bytes(bytes(data))
    out = _run("rebuild", str(base), "a,a,b2,c")
    assert all(o.get("error") == "RebuildError" for o in out), out
    assert any("do not match the checkpoint's hashes" in o["message"] for o in out), out
    store = base / "b2" / "store"
    assert not (store / "step-10").exists() and not (store / "LATEST").exists()
    assert os.listdir(store / ".staging") == []


def test_a_node_without_a_protected_checkpoint_has_nothing_to_rebuild_from(tmp_path):
    out = _run("rebuild", str(tmp_path), HOSTS)
    assert all(o.get("error") == "RebuildError" for o in out), out
    assert all("no node holds a protected checkpoint 'step-10'" in o["message"] for o in out)


def _body() -> dict:
    files = [
        {"name": f"rank-{r:05d}.ckg", "rank": r, "size": 100 + r, "chunks": 1} for r in range(4)
    ]
    return {"name": "step-10", "uuid": "ab" * 16, "world_size": 4, "files": files}


@pytest.mark.parametrize("scheme", ["xor", "partner"])
def test_a_set_record_as_written_passes_its_checks(scheme):
    rec = set_record(_body(), scheme, ["a", "b", "c"], ["a", "a", "b", "c"], 1)
    if scheme == "xor":
        rec["parity_xxh3_128"] = "0" * 32
        assert rec["segment"] == -(-(100 + 101) // 2)
    assert check_record(rec, "step-10", "ab" * 16) is rec
    assert rec["members"][0] == {
        "node": "a",
        "ranks": [0, 1],
        "files": [["rank-00000.ckg", 100], ["rank-00001.ckg", 101]],
    }


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r.update(v=2),
        lambda r: r.update(uuid="cd" * 16),
        lambda r: r.update(scheme="raid6"),
        lambda r: r.update(member=3),
        lambda r: r.update(member=True),
        lambda r: r.update(extra=1),
        lambda r: r.update(segment=5),
        lambda r: r.update(parity_xxh3_128="XYZ"),
        lambda r: r["members"].pop(),
        lambda r: r["members"][0].update(ranks=[1, 0]),
        lambda r: r["members"][0].update(ranks=[]),
        lambda r: r["members"][0].update(files=[["../escape", 1]]),
        lambda r: r["members"][0].update(files=[["x", -1]]),
        lambda r: r["members"][0].update(files=[["x", 1, 2]]),
        lambda r: r["members"][1].pop("node"),
    ],
)
def test_a_damaged_set_record_is_refused(damage):
    rec = set_record(_body(), "xor", ["a", "b"], ["a", "a", "b", "b"], 0)
    rec["parity_xxh3_128"] = "0" * 32
    damage(rec)
    with pytest.raises(RedundancyError, match="damaged|not a plain"):
        check_record(rec, "step-10", "ab" * 16)


def test_protection_of_a_checkpoint_saved_by_another_world_is_refused():
    with pytest.raises(RedundancyError, match="saved by 4 ranks; 2 take part here"):
        node_files(_body(), ["a", "b"])
