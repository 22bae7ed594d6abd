"""Incremental saves (docs/format.md section 4.3): what a save with ``base`` writes and links,
that every checkpoint stays whole whatever happens to the others (delete, prune, overwrite, gc,
drain), the depth bound, multi-rank saves, misuse, and a randomised run of saves, deletes,
prunes and gcs after each of which every listed checkpoint loads what was saved."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from pathlib import Path

import independent_reader as ir
import pytest
import torch
from threadcoord import ThreadCoordinator, run_ranks

import ckptguard
from ckptguard.errors import CheckpointNotFoundError, InvalidNameError, OneFileError
from ckptguard.shard import Shard

CHUNK = 1 << 16


def _state(seed: int = 0) -> dict:
    """A frozen base (most of the bytes, several chunks) and a small trained part."""
    g = torch.Generator().manual_seed(seed)
    return {
        "base": {
            "emb": torch.randn(64, 1024, generator=g),  # 256 KiB: 4 chunks
            "w": torch.randn(48, 1024, generator=g).to(torch.bfloat16),
            "ids": torch.arange(40_000, dtype=torch.int64) * (seed + 1),
        },
        "adapter": {"a": torch.randn(16, 64, generator=g), "b": torch.zeros(64, 16)},
        "step": 0,
    }


def _train(state: dict, step: int) -> None:
    """One step: the adapter changes, one row of the embedding too."""
    state["adapter"]["a"] += 0.01 * step
    state["adapter"]["b"][step % 64, 0] = float(step)
    state["base"]["emb"][step % 64, :8] += 1.0
    state["step"] = step


def _manifest(path: Path) -> dict:
    raw = (path / "MANIFEST.json").read_bytes()
    return json.loads(raw)["manifest"]


def _own_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("rank-*.ckg") if p.name.count(".") == 1)


def _same(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _copy(state: dict) -> dict:
    return {
        k: _copy(v) if isinstance(v, dict) else v.clone() if torch.is_tensor(v) else v
        for k, v in state.items()
    }


def test_unchanged_chunks_are_linked_not_written(tmp_path: Path) -> None:
    s = _state()
    ckptguard.save(s, str(tmp_path / "a"), chunk_size=CHUNK)
    _train(s, 1)
    ckptguard.save(s, str(tmp_path / "b"), chunk_size=CHUNK, base="auto")
    a, b = _manifest(tmp_path / "a"), _manifest(tmp_path / "b")
    assert "incremental" not in a["features"] and "incremental" not in a
    assert "incremental" in b["features"] and b["incremental"] == {"base": "a", "depth": 1}
    linked = tmp_path / "b" / f"rank-00000.{a['uuid']}.ckg"
    assert linked.stat().st_ino == (tmp_path / "a" / "rank-00000.ckg").stat().st_ino
    assert _own_bytes(tmp_path / "b") < _own_bytes(tmp_path / "a") / 3
    assert _same(ckptguard.load(str(tmp_path / "b")), s)
    assert ckptguard.verify(str(tmp_path / "b")).ok
    ic = ir.read_checkpoint(str(tmp_path / "b"))
    rows = [r for r in ic.rows if r["base"] is not None]
    assert (
        rows and {r["base"] for r in rows} == {"a"} and {r["file"] for r in rows} == {linked.name}
    )


def test_deleting_pruning_and_overwriting_the_base_keeps_the_others_whole(tmp_path: Path) -> None:
    s, saved = _state(), {}
    for i, name in enumerate(["a", "b", "c", "d"]):
        _train(s, i + 1)
        ckptguard.save(s, str(tmp_path / name), chunk_size=CHUNK, base="auto")
        saved[name] = _copy(s)
    assert _manifest(tmp_path / "d")["incremental"]["depth"] == 3
    store = ckptguard.Store(str(tmp_path))
    store.delete("a")
    store.delete("c")
    _train(s, 9)
    ckptguard.save(s, str(tmp_path / "b"), chunk_size=CHUNK, overwrite=True)
    saved["b"] = _copy(s)
    store.prune({"keep_last": 2})
    store.gc(older_than=0)
    names = sorted(i.name for i in store.list())
    assert names == ["b", "d"]
    for name in names:
        assert _same(ckptguard.load(str(tmp_path / name)), saved[name])
        assert ckptguard.verify(str(tmp_path / name)).ok
    # The last link of a's data file went with d's directory: nothing of it is left.
    store.delete("d")
    inodes = {p.stat().st_ino for p in tmp_path.rglob("*.ckg")}
    assert len(inodes) == len(list(tmp_path.rglob("*.ckg")))


def test_depth_is_bounded(tmp_path: Path) -> None:
    s = _state()
    depths = []
    for i in range(5):
        _train(s, i + 1)
        ckptguard.save(s, str(tmp_path / f"s{i}"), chunk_size=CHUNK, base="auto", max_depth=2)
        depths.append(_manifest(tmp_path / f"s{i}").get("incremental", {}).get("depth", 0))
    assert depths == [0, 1, 2, 0, 1]


def test_base_by_name_and_the_misuses(tmp_path: Path) -> None:
    s = _state()
    ckptguard.save(s, str(tmp_path / "a"), chunk_size=CHUNK)
    ckptguard.save(_state(1), str(tmp_path / "other"), chunk_size=CHUNK)
    _train(s, 2)
    ckptguard.save(s, str(tmp_path / "b"), chunk_size=CHUNK, base="a")
    assert _manifest(tmp_path / "b")["incremental"]["base"] == "a"
    with pytest.raises(CheckpointNotFoundError):
        ckptguard.save(s, str(tmp_path / "c"), base="missing")
    with pytest.raises(InvalidNameError):
        ckptguard.save(s, str(tmp_path / "c"), base="../a")
    with pytest.raises(OneFileError, match="base"):
        ckptguard.save(s, str(tmp_path / "one.pt"), base="auto")
    assert not (tmp_path / "c").exists() and not list((tmp_path / ".staging").iterdir())
    assert ckptguard.Store(str(tmp_path)).latest_name() == "b"


def test_nothing_to_compare_with_is_a_full_save(tmp_path: Path) -> None:
    s = _state()
    ckptguard.save(s, str(tmp_path / "a"), base="auto")  # an empty store
    ckptguard.save(_state(5), str(tmp_path / "b"), base="auto")  # nothing in common
    for name in "ab":
        body = _manifest(tmp_path / name)
        assert "incremental" not in body and len(body["files"]) == 1


def test_digests_match_by_sha256_and_signed_incremental_saves_verify(tmp_path: Path) -> None:
    from ckptguard import keys

    priv, pub, _ = keys.generate(tmp_path / "k")
    s = _state()
    ckptguard.save(s, str(tmp_path / "plain"), chunk_size=CHUNK)
    _train(s, 1)
    ckptguard.save(s, str(tmp_path / "a"), chunk_size=CHUNK, base="auto", sign_key=priv)
    assert "incremental" not in _manifest(tmp_path / "a")  # no digests to match by in "plain"
    _train(s, 2)
    ckptguard.save(s, str(tmp_path / "b"), chunk_size=CHUNK, base="auto", sign_key=priv)
    body = _manifest(tmp_path / "b")
    assert body["incremental"]["base"] == "a" and "digests" in body["features"]
    trusted = [pub]
    assert _same(ckptguard.load(str(tmp_path / "b"), trusted_keys=trusted), s)
    assert ckptguard.verify(str(tmp_path / "b"), trusted_keys=trusted).ok


def test_changed_geometry_is_written_again(tmp_path: Path) -> None:
    s = _state()
    ckptguard.save(s, str(tmp_path / "a"), chunk_size=CHUNK)
    s["base"]["w"] = s["base"]["w"].float()  # another dtype
    s["base"]["ids"] = s["base"]["ids"][:-1]  # another shape
    ckptguard.save(s, str(tmp_path / "b"), chunk_size=CHUNK * 2, base="a")  # other chunks
    assert "incremental" not in _manifest(tmp_path / "b")  # small tensors share a record
    assert _same(ckptguard.load(str(tmp_path / "b")), s)


def test_four_ranks_each_link_their_own_shards(tmp_path: Path) -> None:
    full = torch.randn(64, 4096)
    world = 4

    def save(name: str, bump: bool) -> None:
        def rank_main(coord: ThreadCoordinator) -> None:
            r = coord.rank
            a, b = r * 16, (r + 1) * 16
            piece = full[a:b].clone()
            if bump and r == 2:
                piece[0, 0] += 1.0
            state = {"w": Shard(piece, (64, 4096), (a, 0)), "step": 1}
            ckptguard.save(
                state, str(tmp_path / name), chunk_size=CHUNK, coordinator=coord, base="auto"
            )

        run_ranks(world, rank_main)

    save("a", False)
    save("b", True)
    body = _manifest(tmp_path / "b")
    linked = sorted(f["name"] for f in body["files"] if f["name"].count(".") == 2)
    assert [n[:10] for n in linked] == [f"rank-0000{r}" for r in range(world)]
    expect = full.clone()
    expect[32, 0] += 1.0
    assert torch.equal(ckptguard.load(str(tmp_path / "b"))["w"], expect)


def test_a_damaged_or_linked_base_file_is_not_reused(tmp_path: Path) -> None:
    s = _state()
    ckptguard.save(s, str(tmp_path / "a"), chunk_size=CHUNK)
    victim = tmp_path / "a" / "rank-00000.ckg"
    real = tmp_path / "elsewhere.ckg"
    shutil.move(victim, real)
    os.symlink(real, victim)  # a link where the data file must be: never followed
    ckptguard.save(s, str(tmp_path / "b"), chunk_size=CHUNK, base="a")
    assert "incremental" not in _manifest(tmp_path / "b")
    os.unlink(victim)
    data = bytearray(real.read_bytes())
    data[-40] ^= 0xFF  # the footer: its hash no longer matches
    victim.write_bytes(bytes(data))
    ckptguard.save(s, str(tmp_path / "c"), chunk_size=CHUNK, base="a")
    assert "incremental" not in _manifest(tmp_path / "c")
    assert _same(ckptguard.load(str(tmp_path / "c")), s)


def test_a_state_changed_during_the_save_still_verifies(tmp_path: Path) -> None:
    s = _state()
    ckptguard.save(s, str(tmp_path / "a"), chunk_size=CHUNK)
    stop = threading.Event()

    def mutate() -> None:
        while not stop.is_set():
            s["base"]["emb"].add_(1.0)

    t = threading.Thread(target=mutate)
    t.start()
    try:
        for i in range(5):
            ckptguard.save(s, str(tmp_path / f"m{i}"), chunk_size=CHUNK, base="auto")
    finally:
        stop.set()
        t.join()
    for i in range(5):
        assert ckptguard.verify(str(tmp_path / f"m{i}")).ok


def test_async_and_drain_and_export(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    s = _state()
    ckptguard.save(s, str(src / "a"), chunk_size=CHUNK)
    _train(s, 1)
    ckptguard.save_async(s, str(src / "b"), chunk_size=CHUNK, base="auto").result()
    assert _manifest(src / "b")["incremental"]["base"] == "a"
    from ckptguard.drain import drain

    drain(str(src), str(dst))
    assert _same(ckptguard.load(str(dst / "b")), s) and ckptguard.verify(str(dst / "b")).ok
    # b's linked file is a's own data file, which the drain of a put in DST: linked, not copied
    linked = next(p for p in (dst / "b").iterdir() if p.name.count(".") == 2)
    assert linked.stat().st_ino == (dst / "a" / "rank-00000.ckg").stat().st_ino
    with pytest.warns(ckptguard.ExportWarning):  # "step" is no tensor
        ckptguard.export(str(src / "b"), to="safetensors", dest=str(tmp_path / "out"))
    assert sum(p.stat().st_size for p in (tmp_path / "out").iterdir()) > 0


@pytest.mark.timeout(600)
def test_random_saves_deletes_prunes_and_gcs_keep_every_checkpoint_whole(tmp_path: Path) -> None:
    rng = random.Random(1234)
    store = ckptguard.Store(str(tmp_path))
    s, saved, n = _state(), {}, 0
    for step in range(160):
        op = rng.choices(["save", "delete", "prune", "gc"], [6, 2, 1, 1])[0]
        names = sorted(saved)
        if op == "save" or not names:
            _train(s, step)
            if rng.random() < 0.2:
                s["base"]["w"] = torch.randn(48, 1024).to(torch.bfloat16)
            name = f"c{n:03d}"
            n += 1
            base = rng.choice(["auto", "auto", rng.choice(names) if names else "auto", None])
            ckptguard.save(s, str(tmp_path / name), chunk_size=CHUNK, base=base, max_depth=4)
            saved[name] = _copy(s)
        elif op == "delete":
            victim = rng.choice(names)
            store.delete(victim)
            del saved[victim]
        elif op == "prune":
            store.prune({"keep_last": rng.randint(1, 4)})
        else:
            store.gc(older_than=0)
        listed = {i.name for i in store.list()}
        saved = {k: v for k, v in saved.items() if k in listed}
        assert listed == set(saved), (step, op)
        for name in listed:
            assert _same(ckptguard.load(str(tmp_path / name)), saved[name]), (step, op, name)
    store.gc(older_than=0)
    assert not list((tmp_path / ".staging").iterdir())
