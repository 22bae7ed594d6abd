"""Packed records (feature packed-records, docs/format.md section 4.1): many small tensors share
one record; each index row is a checked slice of its raw bytes; the record stays the unit of
integrity."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import independent_reader as ir
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import rewrite_rows

import ckptguard
from ckptguard import loader, pack, select
from ckptguard.format.datafile import HEADER_SIZE, TRAILER_SIZE, unpack_trailer
from ckptguard.format.index import PACKED_RECORDS, is_packed
from ckptguard.open import CheckpointReader
from ckptguard.pack import PACK_MAX_TENSOR, groups_of, plan
from ckptguard.read import verify_checkpoint
from ckptguard.sources import DIRECT, BufferedSource, gather
from ckptguard.tree import flatten
from ckptguard.writer import RankWriter


def _state(n: int = 200) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {
        "small": {f"p{i}": torch.randn(1024, generator=g) for i in range(n)},  # 4 KiB each
        "big": torch.randn(1 << 18, generator=g),
        "half": [torch.randn(7, generator=g).half() for _ in range(5)],
        "ints": np.arange(40, dtype=np.int32),  # packs with the fp32 tensors (element size 4)
        "empty": torch.zeros(0),
        "one_f64": torch.ones(3, dtype=torch.float64),  # alone of its size: a plain record
        "meta": {"step": 3},
    }


def _body(path: str) -> dict[str, Any]:
    return json.loads(Path(path, "MANIFEST.json").read_bytes()[58:-2])


def _equal(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _equal(a[k], b[k])
    elif isinstance(a, list):
        for x, y in zip(a, b, strict=True):
            _equal(x, y)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype and a.shape == b.shape
    else:
        assert a == b


@pytest.fixture(params=["none", "lz4"])
def packed(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    state = _state()
    path = str(tmp_path / "s" / "p")
    ckptguard.save(state, path, compress=request.param)
    return path, state


def test_small_tensors_share_records_and_round_trip(packed: tuple[str, dict]) -> None:
    path, state = packed
    body = _body(path)
    assert PACKED_RECORDS in body["features"]
    rows = ir.read_index(path, body)
    assert body["totals"]["chunks"] == len(rows)
    records = {(r["file"], r["offset"]) for r in rows}
    assert len(records) < len(rows) / 20  # 200 small fp32 tensors in a handful of records
    assert sum(r["raw_len"] for r in rows) == body["totals"]["raw_bytes"]
    by_key = {r["key"]: r for r in rows}
    assert by_key["one_f64"]["record_raw_len"] == by_key["one_f64"]["raw_len"]
    assert by_key["ints"]["offset"] == by_key["small/p0"]["offset"]  # one element size, one pack
    _equal(ckptguard.load(path), state)
    ck = ir.read_checkpoint(path)  # the independent reader, from docs/format.md alone
    assert np.array_equal(
        np.frombuffer(ck.tensors["small/p7"].data, np.float32), state["small"]["p7"].numpy()
    )
    assert np.frombuffer(ck.tensors["ints"].data, np.int32).tolist() == list(range(40))
    report = verify_checkpoint(path)
    assert report.ok and report.chunks_checked == len(rows)


def test_small_tensors_store_little_more_than_their_bytes(tmp_path: Path) -> None:
    state = {f"t{i}": torch.randn(1024) for i in range(1000)}
    path = str(tmp_path / "s" / "p")
    ckptguard.save(state, path, compress="none")
    raw = 1000 * 4096
    assert os.path.getsize(os.path.join(path, "rank-00000.ckg")) <= 1.15 * raw


def test_a_state_without_two_small_tensors_of_one_size_is_not_packed(tmp_path: Path) -> None:
    state = {"a": torch.ones(10), "b": torch.ones(10, dtype=torch.int64), "w": torch.ones(1 << 20)}
    path = str(tmp_path / "s" / "p")
    ckptguard.save(state, path)
    body = _body(path)
    assert PACKED_RECORDS not in body["features"]
    assert len(ir.read_index(path, body)[0]) == 18 + 2  # the v1 columns (the reader adds 2)
    assert "record_raw_len" not in Path(path, "rank-00000.ckg").read_bytes()[-4096:].decode(
        "latin-1"
    )


def test_pack_plan_keeps_large_tensors_in_place_and_caps_packs() -> None:
    state = {
        "a": torch.ones(1000),  # 4000 B
        "w": torch.ones(PACK_MAX_TENSOR // 4 + 1),  # just too large to pack
        "b": torch.ones(1000),
        "h": torch.ones(10).half(),
        **{k: torch.ones(1000) for k in "cde"},
    }
    _, refs, _ = flatten(state)
    todo = list(enumerate(refs))
    assert plan(todo, 1 << 20) == [[0, 2, 4, 5, 6], [1], [3]]
    # A pack holds at most chunk_size bytes; tensors above a quarter of it are not packed.
    assert plan(todo, 16384) == [[0, 2, 4, 5], [1], [3], [6]]
    assert plan(todo, 8192) == [[0], [1], [2], [3], [4], [5], [6]]


def _scalar_groups(size: list[int], elem: list[int], chunk_size: int) -> list[list[int]]:
    """The pack plan one tensor at a time: each element size's pack fills in order."""
    limit = min(PACK_MAX_TENSOR, chunk_size // 4)
    groups: list[list[int]] = []
    open_: dict[int, tuple[list[int], int]] = {}
    for i, (n, e) in enumerate(zip(size, elem, strict=True)):
        if not 0 < n <= limit:
            groups.append([i])
            continue
        group, used = open_.get(e, ([], chunk_size + 1))
        if used + n > chunk_size:
            group, used = [], 0
            groups.append(group)
        group.append(i)
        open_[e] = (group, used + n)
    return groups


@pytest.mark.parametrize("seed", range(6))
def test_pack_groups_on_arrays_are_the_scalar_plan(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 300))
    elem = rng.choice([1, 2, 4, 8, 16], n)
    size = elem * rng.choice([0, 1, 3, 100, 1000, 4096, 20000], n)
    for chunk in (4096, 16384, 1 << 20):
        want = _scalar_groups(size.tolist(), elem.tolist(), chunk)
        assert groups_of(size, elem, chunk) == want


def _mixed_state() -> dict[str, Any]:
    """Small tensors of every kind a pack may hold, nested, with ties and views."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 8, generator=g)
    cplx = torch.randn(6, dtype=torch.complex64, generator=g)
    param = torch.nn.Parameter(torch.randn(5, 3, generator=g))
    return {
        "layers": [
            {"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)}
            for _ in range(30)
        ],
        "tied": {"a": base, "again": base},  # one tensor, reached twice
        "views": {"rows": base[:10], "cols": base[:, 2], "t": base.t()},  # one storage
        "strided": torch.randn(20, 30, generator=g)[:, ::3],
        "scalar": torch.tensor(2.5),
        "int_scalar": torch.tensor(7, dtype=torch.int32),
        "empty": torch.zeros(0, 3),
        "bf16": torch.randn(33, generator=g).to(torch.bfloat16),
        "half_t": torch.randn(7, 9, generator=g).half().t(),
        "flags": torch.rand(17, generator=g).gt(0.5),
        "conj": cplx.conj(),
        "neg": torch.randn(5, dtype=torch.complex64, generator=g)._neg_view(),
        "param": param,
        "np": np.arange(12, dtype=np.int32).reshape(3, 4),
        "np_strided": np.arange(60, dtype=np.float32).reshape(6, 10)[:, ::-2],
        "f64": torch.randn(3, dtype=torch.float64, generator=g),
        "meta": ("x", 1, [None, 2.5]),
    }


def _records(path: str) -> bytes:
    """A data file's records: the bytes between its header and its footer (no uuid)."""
    data = Path(path, "rank-00000.ckg").read_bytes()
    off, _, _ = unpack_trailer(data[-TRAILER_SIZE:], len(data))
    return data[HEADER_SIZE:off]


def test_gathered_packs_are_the_streamed_packs(tmp_path: Path, monkeypatch: Any) -> None:
    """Packs gathered in bulk write the same records and index rows as packs whose members
    arrive one by one through the byte source (device tensors, or gathering switched off)."""
    state = _mixed_state()
    bulk, streamed = str(tmp_path / "s" / "bulk"), str(tmp_path / "s" / "streamed")
    gathered: list[int] = []
    with monkeypatch.context() as m:
        m.setattr(pack, "gather", lambda v, out: (gathered.append(len(v)), gather(v, out)))
        ckptguard.save(state, bulk, compress="none")
    assert gathered and sum(gathered) > 60  # the packs, each gathered in one call
    with monkeypatch.context() as m:
        m.setattr(pack, "gatherable", lambda value: False)
        m.setattr(pack, "gather", lambda v, out: pytest.fail("gathered"))
        ckptguard.save(state, streamed, compress="none")
    assert PACKED_RECORDS in _body(bulk)["features"]
    a, b = (pq.read_table(os.path.join(p, "index.parquet")) for p in (bulk, streamed))
    assert a.equals(b)
    assert _records(bulk) == _records(streamed)
    assert _body(bulk)["tensors"] == _body(streamed)["tensors"]
    loaded = ckptguard.load(bulk)
    assert loaded["tied"]["a"] is loaded["tied"]["again"]
    want = {**state, "conj": state["conj"].resolve_conj(), "neg": state["neg"].resolve_neg()}
    _equal(loaded, want)
    assert ckptguard.verify(bulk).ok


def _record_of(path: str, key: str) -> tuple[str, int, int]:
    rows = ir.read_index(path, _body(path))
    r = next(r for r in rows if r["key"] == key)
    return r["file"], r["offset"], r["record_byte_offset"]


def test_a_flipped_byte_in_a_pack_fails_the_load_of_any_tensor_in_it(tmp_path: Path) -> None:
    state = {f"t{i}": torch.full((256,), float(i)) for i in range(50)}
    path = str(tmp_path / "s" / "p")
    ckptguard.save(state, path, compress="none")
    file, offset, at = _record_of(path, "t30")
    data = bytearray(Path(path, file).read_bytes())
    data[offset + 64 + at + 5] ^= 0x40  # a byte of t30's slice
    Path(path, file).write_bytes(bytes(data))
    with pytest.raises(ckptguard.CorruptCheckpointError, match="hash mismatch"):
        ckptguard.load(path)
    # Loading only t3 (another tensor of the same record) still checks the whole record.
    with CheckpointReader(path) as rd:
        gid = next(i for i, t in enumerate(rd.tensors) if t["key"] == "t3")
        box = select.whole_box(rd.tensors[gid], 0)
        pieces = select.plan_reads(rd.table, rd.tensors, {gid: box})
        targets = {gid: ckptguard.place.fresh_target(rd.tensors[gid], box)}
        with pytest.raises(ckptguard.CorruptCheckpointError, match="hash mismatch") as ei:
            loader._read(rd, targets, pieces, verify=True)
    assert ei.value.offset == offset
    assert not ckptguard.verify(path).ok
    with pytest.raises(ir.SpecViolation, match="xxh3-128"):
        ir.read_checkpoint(path)


def _hostile(path: str, mutate: Any, match: str) -> None:
    rewrite_rows(path, mutate)
    with pytest.raises(ckptguard.CorruptCheckpointError, match=match) as ei:
        ckptguard.load(path)
    assert ei.value.file == "index.parquet"
    with pytest.raises(ir.SpecViolation):
        ir.read_checkpoint(path)


def _small_packed(tmp_path: Path) -> str:
    path = str(tmp_path / "s" / "p")
    ckptguard.save({f"t{i}": torch.full((8,), float(i)) for i in range(4)}, path, compress="none")
    return path


def test_overlapping_slices_are_refused(tmp_path: Path) -> None:
    def mutate(rows: list[dict]) -> None:
        rows[2]["record_byte_offset"] = 16  # overlaps row 1's slice [32, 64) -> [16, 48)

    _hostile(_small_packed(tmp_path), mutate, r"index row [12] .*overlap")


def test_a_slice_past_its_record_is_refused(tmp_path: Path) -> None:
    def mutate(rows: list[dict]) -> None:
        rows[3]["record_byte_offset"] = 120  # [120, 152) of a record of 128 raw bytes

    _hostile(_small_packed(tmp_path), mutate, r"index row 3 .*outside its record")


def test_rows_of_one_record_that_disagree_are_refused(tmp_path: Path) -> None:
    def mutate(rows: list[dict]) -> None:
        rows[1]["hash"] = bytes(16)

    _hostile(_small_packed(tmp_path), mutate, r"index row 1 .*disagree")


def test_packed_columns_without_the_feature_are_refused(tmp_path: Path) -> None:
    path = _small_packed(tmp_path)
    rewrite_rows(path, lambda rows: None, lambda b: b["features"].remove("packed-records"))
    with pytest.raises(ckptguard.CorruptCheckpointError, match="packed-records"):
        ckptguard.load(path)


def test_a_gap_in_a_pack_is_refused(tmp_path: Path) -> None:
    def mutate(rows: list[dict]) -> None:
        rows[3]["raw_len"] = 16  # the last slice no longer reaches the end of the record
        rows[3]["shard_lengths"] = [4]

    _hostile(_small_packed(tmp_path), mutate, r"index row 3 ")


def test_a_pack_streamed_through_buffers_is_the_gathered_pack(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Through a buffered byte source (as for device tensors), a pack is filled value by value
    and written as the gathered pack is."""
    _, refs, _ = flatten(_mixed_state())
    todo = list(enumerate(refs))
    tables, records = [], []
    for name, source in [
        ("bulk", DIRECT),
        ("pieces", BufferedSource(lambda: [torch.empty(4096, dtype=torch.uint8) for _ in "ab"])),
    ]:
        (tmp_path / name).mkdir()
        w = RankWriter(str(tmp_path / name), 0, "ab" * 16, chunk_size=4096)
        with monkeypatch.context() as m:
            if name == "pieces":
                m.setattr(pack, "gatherable", lambda value: False)
            pack.Packer(w, todo, 0).write(source)
        tables.append(w.finish())
        records.append(_records(str(tmp_path / name)))
    assert is_packed(tables[0]) and tables[0].equals(tables[1])
    assert records[0] == records[1]
