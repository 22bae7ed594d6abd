"""ckptguard.loader: load_checkpoint, the steps of a load put together (open, select, place,
read, copy, finish), and iter_tensors, whole tensors one at a time."""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import pytest
import torch
from clikit import flip_payload_byte
from threadcoord import ThreadCoordinator, run_ranks

import ckptguard
from ckptguard import loader, select
from ckptguard.errors import CorruptCheckpointError, WorldSizeError
from ckptguard.loader import iter_tensors, load_checkpoint
from ckptguard.open import CheckpointReader


def test_whole_load(store: str) -> None:
    path = os.path.join(store, "c")
    w = torch.nn.Parameter(torch.randn(6, 5))
    ckptguard.save({"w": w, "n": 3, "s": torch.tensor(2.5)}, path, chunk_size=64)
    out = load_checkpoint(path)
    assert isinstance(out["w"], torch.nn.Parameter) and torch.equal(out["w"], w)
    assert out["n"] == 3 and out["s"].item() == 2.5


def test_template_reads_only_the_chunks_of_its_box(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = os.path.join(store, "c")
    full = torch.arange(8 * 16, dtype=torch.float32).reshape(8, 16)
    ckptguard.save({"w": full}, path, chunk_size=64)  # a chunk per row
    read: list[int] = []
    real = select.plan_reads

    def spy(*a: object) -> dict:
        out = real(*a)  # type: ignore[arg-type]
        read.extend(r.offset for ps in out.values() for p in ps for r in p.rows)
        return out

    monkeypatch.setattr(select, "plan_reads", spy)
    want = ckptguard.Shard(torch.zeros(3, 2), (8, 16), (2, 1))
    out = load_checkpoint(path, template={"w": want})
    assert out["w"] is want and torch.equal(want.local, full[2:5, 1:3])
    with CheckpointReader(path) as rd:
        assert sorted(read) == sorted(r.offset for r in rd.rows if r.chunk in (2, 3, 4))


def test_fill_puts_each_box_in_its_target(store: str) -> None:
    """``fill``: several targets of one tensor (in rounds), a strided view, an empty box."""
    path = os.path.join(store, "c")
    full = torch.arange(8 * 16, dtype=torch.float32).reshape(8, 16)
    ckptguard.save({"w": full, "b": torch.arange(5.0)}, path, chunk_size=64)
    top, bottom = torch.zeros(3, 16), torch.zeros(5, 16)
    wide = torch.zeros(4, 20)
    column = wide[:, 2:5]  # not contiguous: copied in, not landed in place
    with CheckpointReader(path) as rd:
        w = next(i for i, t in enumerate(rd.tensors) if t["key"] == "w")
        b = 1 - w
        targets = [
            (w, select.Target(top, top, ((0, 0), (3, 16)), False)),
            (w, select.Target(bottom, bottom, ((3, 0), (5, 16)), False)),
            (w, select.Target(column, column, ((4, 7), (4, 3)), False)),
            (b, select.Target(torch.zeros(0), torch.zeros(0), ((2,), (0,)), False)),
        ]
        loader.fill(rd, targets)
    assert torch.equal(top, full[:3]) and torch.equal(bottom, full[3:])
    assert torch.equal(column, full[4:8, 7:10]) and wide[:, :2].eq(0).all()


def test_per_rank_tensors_load_as_a_saved_rank(store: str) -> None:
    path = os.path.join(store, "c")
    ckptguard.save({"r": ckptguard.PerRank(torch.ones(2))}, path)
    assert torch.equal(load_checkpoint(path, rank=0, world=1)["r"], torch.ones(2))
    with pytest.raises(WorldSizeError, match="2 ranks load it"):
        load_checkpoint(path, rank=0, world=2)
    with pytest.raises(WorldSizeError, match="no rank 3"):
        load_checkpoint(path, rank=3)


def test_a_tree_naming_a_tensor_that_does_not_exist(store: str) -> None:
    from conftest import resign_manifest

    path = os.path.join(store, "c")
    ckptguard.save({"w": torch.ones(2)}, path)
    resign_manifest(path, lambda b: b["tree"]["w"].__setitem__("$tensor", 7))
    with pytest.raises(CorruptCheckpointError, match="tensor 7, which does not exist"):
        load_checkpoint(path)


def save_by_ranks(path: str, ranks: int = 4) -> dict[str, torch.Tensor]:
    """A checkpoint saved by ``ranks`` thread ranks: a tensor sharded by rows, one sharded by
    columns, a replicated one and small ones packed into shared records; the global tensors."""
    g = torch.Generator().manual_seed(3)
    full = {
        "rows": torch.randn(16, 40, generator=g),
        "cols": torch.randn(12, 8, generator=g).bfloat16(),
        "rep": torch.arange(300, dtype=torch.int64),
        **{f"small{i}": torch.full((5,), float(i)) for i in range(6)},
    }

    def rank_main(coord: ThreadCoordinator) -> None:
        r = coord.rank
        state = dict(full)
        state["rows"] = ckptguard.Shard(
            full["rows"][4 * r : 4 * r + 4].clone(), (16, 40), (4 * r, 0)
        )
        state["cols"] = ckptguard.Shard(
            full["cols"][:, 2 * r : 2 * r + 2].clone(), (12, 8), (0, 2 * r)
        )
        ckptguard.save(state, path, chunk_size=256, compress="lz4", coordinator=coord)

    run_ranks(ranks, rank_main, abort_on_error=True)
    return full


def test_iter_tensors_builds_each_tensor_whole_in_the_order_given(store: str) -> None:
    path = os.path.join(store, "c")
    full = save_by_ranks(path)
    with CheckpointReader(path) as rd:
        by_key = {t["key"]: i for i, t in enumerate(rd.tensors)}
        order = ["cols", "small3", "rows", "rep", "cols"]  # one asked twice comes twice
        got = list(iter_tensors(rd, [by_key[k] for k in order]))
    assert [rd.tensors[gid]["key"] for gid, _ in got] == order
    for k, (_, t) in zip(order, got, strict=True):
        assert t.dtype == full[k].dtype and torch.equal(t, full[k]), k


def test_iter_tensors_holds_one_tensor_at_a_time(store: str) -> None:
    """Once the caller drops a tensor, nothing of the iteration keeps it: the next one is built
    with no earlier one alive."""
    path = os.path.join(store, "c")
    save_by_ranks(path)
    refs: list[weakref.ref] = []
    with CheckpointReader(path) as rd:
        for _, t in iter_tensors(rd, list(range(len(rd.tensors)))):
            gc.collect()
            assert all(r() is None for r in refs)
            refs.append(weakref.ref(t))
            del t
    assert len(refs) == len(rd.tensors)


def test_iter_tensors_reads_each_packed_record_once(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = os.path.join(store, "c")
    save_by_ranks(path)
    reads: list[tuple[str, int]] = []
    real = loader.read_record

    def counted(rd: CheckpointReader, fd: int, r: object, verify: bool = True) -> bytes:
        reads.append((r.file, r.offset))  # type: ignore[attr-defined]
        return real(rd, fd, r, verify)  # type: ignore[arg-type]

    monkeypatch.setattr(loader, "read_record", counted)
    with CheckpointReader(path) as rd:
        small = [i for i, t in enumerate(rd.tensors) if t["key"].startswith("small")]
        rows = rd.rows_of_tensors(small)
        packs = {(r.file, r.offset) for r in rows if r.packed}
        assert len(packs) < len(small)  # the small tensors share records
        where = {r.tensor: (r.file, r.offset) for r in rows}
        for _ in iter_tensors(rd, sorted(small, key=where.__getitem__)):
            pass
    assert sorted(reads) == sorted(packs)


def test_iter_tensors_checks_every_record(store: str) -> None:
    path = os.path.join(store, "c")
    save_by_ranks(path)
    flip_payload_byte(Path(path), "rows")
    with CheckpointReader(path) as rd, pytest.raises(CorruptCheckpointError, match="rows"):
        for _ in iter_tensors(rd, list(range(len(rd.tensors)))):
            pass
