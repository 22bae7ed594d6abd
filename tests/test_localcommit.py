"""Node-local saves under real MPI (tests/dist/nodelocal.py): four ranks on simulated nodes
a, a, b, c, each node with its own store. Each node keeps the manifest, the index and its own
ranks' data files; LATEST moves on a node only once every node holds its part, whatever fails
where."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from nodekit import fault_cases, run_failing, run_nodes

import ckptguard

pytestmark = pytest.mark.backend_independent  # the save's bytes are the shared save's

HOSTS = "a,a,b,c"
PARTS = {"a": [0, 1], "b": [2], "c": [3]}


def _part(base, host: str):
    return base / host / "store" / "step-10"


def _holds(base, host: str) -> bool:
    """Whether node ``host`` shows the checkpoint, with exactly its own part."""
    d = _part(base, host)
    if not d.exists():
        return False
    own = [f"rank-{r:05d}.ckg" for r in PARTS[host]]
    assert sorted(os.listdir(d)) == sorted(["MANIFEST.json", "index.parquet", *own])
    return True


def _latest(base, host: str) -> str | None:
    f = base / host / "store" / "LATEST"
    return f.read_text() if f.exists() else None


def test_each_node_keeps_its_part_and_the_parts_make_the_whole(tmp_path):
    out = run_nodes("save", str(tmp_path), HOSTS)
    assert [o.get("level") for o in out] == ["local"] * 4, out
    hosts = HOSTS.split(",")
    assert [o["path"] for o in out] == [str(_part(tmp_path, h)) for h in hosts]
    assert all(_holds(tmp_path, h) and _latest(tmp_path, h) == "step-10\n" for h in PARTS)
    for f in ("MANIFEST.json", "index.parquet"):  # one manifest and one index, on every node
        assert len({(_part(tmp_path, h) / f).read_bytes() for h in PARTS}) == 1
    for h in PARTS:  # committed files are read-only, and nothing is left in staging
        assert all(p.stat().st_mode & 0o222 == 0 for p in _part(tmp_path, h).iterdir())
        assert os.listdir(tmp_path / h / "store" / ".staging") == []
    whole = tmp_path / "whole"
    whole.mkdir()
    for h in PARTS:
        for p in _part(tmp_path, h).iterdir():
            if not (whole / p.name).exists():
                shutil.copyfile(p, whole / p.name)
    assert ckptguard.verify(str(whole)).ok
    # a part alone is not the checkpoint: it lacks the other nodes' files
    assert not ckptguard.verify(str(_part(tmp_path, "b"))).ok


def test_a_node_whose_store_holds_the_name_fails_the_save_on_every_node(tmp_path):
    blocker = _part(tmp_path, "b")
    blocker.mkdir(parents=True)
    (blocker / "notes.txt").write_text("not a checkpoint")
    out = run_nodes("save", str(tmp_path), HOSTS)
    assert all(o.get("error") == "CheckpointAbortedError" for o in out), out
    assert len({o["message"] for o in out}) == 1 and "rank 2 failed" in out[0]["message"]
    assert "is a directory but not a committed checkpoint" in out[0]["message"]
    assert not _holds(tmp_path, "a") and not _holds(tmp_path, "c")
    assert sorted(os.listdir(blocker)) == ["notes.txt"]
    for h in PARTS:
        assert _latest(tmp_path, h) is None
        assert os.listdir(tmp_path / h / "store" / ".staging") == []


def test_ranks_that_disagree_on_node_local_fail_alike(tmp_path):
    out = run_nodes("save-mixed", str(tmp_path), HOSTS)
    assert all(o.get("error") == "OptionsMismatchError" for o in out), out
    assert "'node_local'" in out[0]["message"]
    assert not any((tmp_path / h / "store" / "step-10").exists() for h in PARTS)


@pytest.mark.parametrize(
    "options,error",
    [
        ({"node_local": "a", "overwrite": True}, "do not take overwrite"),
        ({"node_local": True, "base": "auto"}, "do not take base"),
        ({"node_local": "a", "encrypt": "s", "keep": {"keep_last": 2}}, "take encrypt, keep"),
        ({"node_local": 3}, "must be True, False or a node's name"),
        ({"node_local": ""}, "must be True, False or a node's name"),
        ({"node_local": "a\nb"}, "a node name must be printable"),
    ],
)
def test_options_a_node_local_save_cannot_honour_are_refused(tmp_path, options, error):
    with pytest.raises((ValueError, TypeError), match=error):
        ckptguard.save({"w": torch.ones(3)}, str(tmp_path / "s" / "x"), **options)
    assert not (tmp_path / "s").exists()


def test_a_bad_node_name_from_the_environment_fails_the_save(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTGUARD_NODE", "x" * 256)
    with pytest.raises(ValueError, match="a node name must be 1 to 255"):
        ckptguard.save({"w": torch.ones(3)}, str(tmp_path / "s" / "x"), node_local=True)
    assert not (tmp_path / "s" / "x").exists()


def test_one_process_saves_node_local_as_a_whole_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTGUARD_NODE", "n1")
    info = ckptguard.save({"w": torch.arange(5)}, str(tmp_path / "s" / "x"), node_local=True)
    assert info.path == str(tmp_path / "s" / "x")
    assert (tmp_path / "s" / "LATEST").read_text() == "x\n"
    assert torch.equal(ckptguard.load(info.path)["w"], torch.arange(5))


# point: the ranks that fail there (b's leader is rank 2; rank 0 leads a)
POINTS = {
    "nodelocal.prepared": (0, 2),
    "nodelocal.renaming": (0, 2),
    "nodelocal.renamed": (0, 2),
    "nodelocal.latest_moved": (2, 3),
}
SUBSET = {
    ("nodelocal.renaming", 2, "eio"),
    ("nodelocal.renamed", 2, "kill"),
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("point,rank,action", fault_cases(POINTS, SUBSET))
def test_a_failed_node_local_save_never_moves_latest_past_a_missing_part(
    tmp_path, point, rank, action
):
    """Whatever fails where: a node's LATEST names the checkpoint only if every node holds its
    part; a save every live rank reports failed leaves nothing visible where it could clean up;
    one reported committed is held whole by every node."""
    got = run_failing(tmp_path, ["save", str(tmp_path), HOSTS], point, rank, action)
    held = {h: _holds(tmp_path, h) for h in PARTS}
    moved = {h for h in PARTS if _latest(tmp_path, h) == "step-10\n"}
    assert not moved or all(held.values()), (held, moved)
    if any("error" not in o for o in got.values()):
        assert all(held.values()), (got, held)
    if action != "eio":
        return
    if point in ("nodelocal.prepared", "nodelocal.renaming"):  # every rank lived to clean up
        assert len({o.get("message") for o in got.values()}) == 1, got
        assert not any(held.values()) and not moved, (got, held)
        assert all(os.listdir(tmp_path / h / "store" / ".staging") == [] for h in PARTS)
    else:  # past its rename, a node's I/O error is a warning
        assert all(o.get("level") == "local" for o in got.values()), got
        if point == "nodelocal.renamed":  # the rename may not be durable: LATEST stays there
            assert moved == set(PARTS) - {"abbc"[rank]}, moved
        else:  # after LATEST moved there
            assert moved == set(PARTS), moved
