"""Protected node-local checkpoints under real MPI: nodes simulated by rank groups with a store
directory each (tests/dist/nodelocal.py). A node is lost (its store deleted), a node of another
name with an empty store takes its ranks, and the rebuild gives it back the same bytes, checked
against the checkpoint's hashes, and its part of the set's protection."""

from __future__ import annotations

import filecmp
import json
import os
import shutil

import pytest
from nodekit import fault_cases, run_failing, run_nodes

import ckptguard
from ckptguard.errors import RebuildError, RedundancyError
from ckptguard.redundancy.protect import check_record, node_files, set_record
from ckptguard.redundancy.rebuild import _agree

# Files are moved as they are; the one read of records (the rebuilt files checked against the
# index) is verify's, which both backends run in its own tests.
pytestmark = pytest.mark.backend_independent

HOSTS = "a,a,b,c"  # node a runs ranks 0 and 1
FULL = os.environ.get("CKPTGUARD_FAULTS") == "all"


def _record(base, host: str):
    red = base / host / "store" / ".redundancy"
    (entry,) = os.listdir(red)
    return red / entry


def _assemble(base) -> None:
    """BASE/shared/step-10: every node's part of the node-local save together, which must be
    the whole checkpoint (it verifies); what a rebuilt node is compared with."""
    whole = base / "shared" / "step-10"
    whole.mkdir(parents=True)
    for h in "abc":
        for f in os.listdir(base / h / "store" / "step-10"):
            if not (whole / f).exists():
                shutil.copyfile(base / h / "store" / "step-10" / f, whole / f)
    assert ckptguard.verify(str(whole)).ok


@pytest.fixture(scope="module", params=["xor", "partner"])
def protected(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"nodes-{request.param}")
    out = run_nodes("protect", request.param, str(base), HOSTS)
    assert [o["level"] for o in out] == ["protected"] * 4
    _assemble(base)
    return request.param, base


def _xor_unless_full(protected, also: bool = True) -> None:
    """`make test` runs a case of the partner scheme only where it differs; `make faults` all."""
    if not FULL and protected[0] != "xor" and also:
        pytest.skip("make faults runs this case for partner copies too (CKPTGUARD_FAULTS=all)")


def _fresh(protected, tmp_path):
    scheme, base = protected
    shutil.copytree(base, tmp_path / "nodes", symlinks=True)
    return scheme, tmp_path / "nodes"


@pytest.mark.parametrize("lost,new", [("a", "a2"), ("c", "c2")])
def test_a_lost_node_is_rebuilt_on_a_new_one(protected, tmp_path, lost, new):
    _xor_unless_full(protected, lost == "c")
    scheme, base = _fresh(protected, tmp_path)
    kept = "parity" if scheme == "xor" else "ward"
    before = tmp_path / "before"
    shutil.copytree(_record(base, lost), before)
    shutil.rmtree(base / lost)
    hosts = HOSTS.replace(lost, new)
    out = run_nodes("rebuild", str(base), hosts)
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
    whole.mkdir()
    for h in dict.fromkeys(hosts.split(",")):
        for f in os.listdir(base / h / "store" / "step-10"):
            shutil.copyfile(base / h / "store" / "step-10" / f, whole / f)
    assert sorted(os.listdir(whole)) == sorted(os.listdir(shared))
    assert ckptguard.verify(str(whole)).ok
    if FULL or (scheme, lost) == ("xor", "a"):  # a second rebuild finds nothing lost
        again = run_nodes("rebuild", str(base), hosts)
        assert all(o.get("rebuilt") == [] for o in again), again


def test_ls_shows_each_nodes_protection_and_where_it_lives(protected, tmp_path, monkeypatch):
    from clikit import run

    scheme, base = _fresh(protected, tmp_path)
    monkeypatch.setenv("COLUMNS", "200")  # one line per checkpoint
    res = run("ls", base / "b" / "store")
    assert res.exit_code == 0, res.output
    (line,) = [ln for ln in res.output.splitlines() if "step-10" in ln]
    rec = json.loads((_record(base, "b") / "SET.json").read_text())
    nodes = [m["node"] for m in rec["members"]]
    if scheme == "xor":
        assert f"protected: xor, parity on {', '.join(n for n in nodes if n != 'b')}" in line
    else:
        assert f"protected: partner, copy on {nodes[(nodes.index('b') + 1) % 3]}" in line
    (_record(base, "b") / "PROTECTED").unlink()  # without the marker: not protected here
    (line,) = [ln for ln in run("ls", base / "b" / "store").output.splitlines() if "step-10" in ln]
    assert "local" in line and "protected" not in line


def test_protecting_a_protected_checkpoint_again_changes_nothing(protected, tmp_path):
    _xor_unless_full(protected)
    scheme, base = _fresh(protected, tmp_path)
    before = {h: sorted(os.listdir(_record(base, h))) for h in "abc"}
    marks = {h: (_record(base, h) / "PROTECTED").read_bytes() for h in "abc"}
    out = run_nodes("reprotect", scheme, str(base), HOSTS)
    assert [(o["level"], o["stored"]) for o in out] == [("protected", 0)] * 4
    assert {h: sorted(os.listdir(_record(base, h))) for h in "abc"} == before
    assert {h: (_record(base, h) / "PROTECTED").read_bytes() for h in "abc"} == marks


def test_more_losses_than_the_scheme_survives_rebuild_nothing(protected, tmp_path):
    _xor_unless_full(protected)
    scheme, base = _fresh(protected, tmp_path)
    shutil.rmtree(base / "b")
    shutil.rmtree(base / "c")
    out = run_nodes("rebuild", str(base), "a,a,x,y")
    msgs = {o.get("message") for o in out}
    assert len(msgs) == 1 and all(o.get("error") == "RebuildError" for o in out), out
    want = "XOR set are lost; it survives one" if scheme == "xor" else "its partner are both lost"
    assert want in msgs.pop()
    assert not os.path.exists(base / "x") and not os.path.exists(base / "y")


def test_a_damaged_survivor_fails_the_rebuild_and_installs_nothing(protected, tmp_path):
    _xor_unless_full(protected)
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
    out = run_nodes("rebuild", str(base), "a,a,b2,c")
    assert all(o.get("error") == "RebuildError" for o in out), out
    assert any("do not match the checkpoint's hashes" in o["message"] for o in out), out
    store = base / "b2" / "store"
    assert not (store / "step-10").exists() and not (store / "LATEST").exists()
    assert os.listdir(store / ".staging") == []


def test_a_node_without_a_protected_checkpoint_has_nothing_to_rebuild_from(tmp_path):
    out = run_nodes("rebuild", str(tmp_path), HOSTS)
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


def _states(hosts: list[str], sets: list[list[str]], lost: set[str]) -> list[dict]:
    """Each node's state as ``rebuild`` gathers it, nodes in ``lost`` holding nothing."""
    body = _body()
    out = []
    for node in dict.fromkeys(hosts):
        if node in lost:
            out.append({"present": False})
            continue
        members = next(s for s in sets if node in s)
        rec = set_record(body, "xor", members, hosts, members.index(node))
        rec["parity_xxh3_128"] = "0" * 32
        out.append(
            {"present": True, "uuid": body["uuid"], "set": rec, "protected": True, "whole": True}
        )
    return out


def test_the_nodes_agree_on_what_is_lost():
    hosts = ["a", "b", "c", "d"]
    sets = [["a", "c"], ["b", "d"]]
    uid, got, lost = _agree(_states(hosts, sets, {"c"}), hosts, "step-10")
    assert uid == "ab" * 16 and len(got) == 2 and list(lost.values()) == ["c"]


def test_a_whole_lost_set_is_not_a_silent_partial_rebuild():
    hosts = ["a", "b", "c", "d"]
    states = _states(hosts, [["a", "c"], ["b", "d"]], {"a", "c"})
    with pytest.raises(RebuildError, match=r"cover ranks 1, 3 of the 4 here"):
        _agree(states, hosts, "step-10")


def test_a_restart_whose_ranks_moved_between_nodes_is_refused():
    hosts = ["a", "b", "c", "d"]
    states = _states(["a", "a", "b", "c"], [["a", "b", "c"]], set())
    with pytest.raises(RebuildError, match=r"ranks \[0, 1\] ran on one node at the save"):
        _agree(states + [{"present": False}], hosts, "step-10")


def test_a_node_holding_another_checkpoint_of_the_name_is_refused():
    hosts = ["a", "b", "c", "d"]
    states = _states(hosts, [hosts], set())
    states[2] = {"present": True, "uuid": "cd" * 16}
    with pytest.raises(RebuildError, match="node c holds another checkpoint 'step-10'"):
        _agree(states, hosts, "step-10")


# ---- failures at every step (tests/fault_cases.txt's rules, for the redundancy points) -----

# point -> the ranks that reach it: 0 leads node a, 1 only joins a's agreement, 2 leads b
PROTECT_POINTS = {
    "protect.record_built": (0, 2),
    "protect.record_installed": (0, 2),
    "protect.agreed": (0, 1, 2),
    "protect.marked": (0, 1, 2),
}
# b (rank 2) is lost and rebuilt as b2
REBUILD_POINTS = {
    "rebuild.agreed": (0, 2),
    "rebuild.files_rebuilt": (2,),
    "rebuild.installed": (2,),
    "rebuild.marked": (0, 2),
}
# What `make test` runs (XOR only for the rebuild); `make faults` (CKPTGUARD_FAULTS=all) runs all.
SUBSET = {
    ("protect.marked", 1, "kill"),
    ("rebuild.files_rebuilt", 2, "kill"),
}


def _claims(base) -> list[str]:
    """The nodes whose store records the checkpoint as protected."""
    from ckptguard.fsutil import read_manifest
    from ckptguard.redundancy.protect import marked

    _, body = read_manifest(str(base / "shared" / "step-10"))
    return [h for h in "abc" if marked(str(base / h / "store"), "step-10", body["uuid"])]


def _rebuilt_bitwise(base, node: str, new: str) -> None:
    shared, mine = base / "shared" / "step-10", base / new / "store" / "step-10"
    names = [n for n in os.listdir(mine)]
    assert "MANIFEST.json" in names and len(names) >= 3
    assert all(filecmp.cmp(shared / n, mine / n, shallow=False) for n in names)


@pytest.fixture(scope="module")
def laid_out(tmp_path_factory):
    base = tmp_path_factory.mktemp("laid-out")
    assert [o["level"] for o in run_nodes("save", str(base), HOSTS)] == ["local"] * 4
    _assemble(base)
    return base


@pytest.mark.timeout(600)
@pytest.mark.parametrize("point,rank,action", fault_cases(PROTECT_POINTS, SUBSET))
def test_a_failed_protection_claims_only_what_holds(laid_out, tmp_path, point, rank, action):
    """Whatever fails where, a node records the checkpoint as protected only if every node's
    part is in place: a node then lost is rebuilt. Without a claim, protecting again completes."""
    base = tmp_path / "nodes"
    shutil.copytree(laid_out, base, symlinks=True)
    run_failing(base, ["reprotect", "xor", str(base), HOSTS], point, rank, action)
    if _claims(base):
        lost = "a" if rank in (0, 1) else "b"
        shutil.rmtree(base / lost)
        out = run_nodes("rebuild", str(base), HOSTS.replace(lost, lost + "2"))
        assert all(o.get("rebuilt") == [lost + "2"] for o in out), out
        _rebuilt_bitwise(base, lost, lost + "2")
    else:
        out = run_nodes("reprotect", "xor", str(base), HOSTS)
        assert [o.get("level") for o in out] == ["protected"] * 4, out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("point,rank,action", fault_cases(REBUILD_POINTS, SUBSET))
def test_a_failed_rebuild_leaves_a_state_a_rebuild_completes(
    protected, tmp_path, point, rank, action
):
    _xor_unless_full(protected)
    scheme, base = _fresh(protected, tmp_path)
    shutil.rmtree(base / "b")
    run_failing(base, ["rebuild", str(base), "a,a,b2,c"], point, rank, action)
    assert _claims(base)  # the survivors' claims stand
    out = run_nodes("rebuild", str(base), "a,a,b2,c")
    assert all("error" not in o and o["level"] == "protected" for o in out), out
    _rebuilt_bitwise(base, "b", "b2")
    assert sorted(os.listdir(base / "b2" / "store" / "step-10")) == [
        "MANIFEST.json",
        "index.parquet",
        "rank-00002.ckg",
    ]
