"""Adversarial checkpoints: random damage to every file kind, links and names that lead outside,
and sizes no file could back.

1. A seeded campaign of random damage to a committed two-rank checkpoint: single-bit flips,
   zeroed 4 KiB pages, truncations and swapped files, across MANIFEST.json, index.parquet, each
   data file's header, record headers, payloads (raw and shuffle-lz4), padding, footer and
   trailer, and LATEST. Each is found by ``ckptguard.verify`` and refused by ``ckptguard.load``
   (and by the independent reader), naming the file, and the tensor and chunk when the damage is
   inside a chunk record; none crashes or hangs. ``CKPTGUARD_FUZZ_CASES`` (default 300) and
   ``CKPTGUARD_FUZZ_SEED`` set the number of cases and the seed.
2. Links in place of files and directories: refused, and no file outside the checkpoint
   directory is ever opened. (LATEST's names are tests/test_store.py's.)
3. Hostile sizes: manifests and index rows that claim more than the files can back are refused
   with a typed error before anything of their size is allocated (tracemalloc peaks, and the
   result tensors a load allocates).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import independent_reader as ir
import pyarrow.parquet as pq
import pytest
import torch
from conftest import opened_outside, record_opens, resign_manifest, rewrite_rows, small_state
from memkit import peak_allocation
from threadcoord import ThreadCoordinator, run_ranks

import ckptguard
from ckptguard import Shard

N_CASES = int(os.environ.get("CKPTGUARD_FUZZ_CASES", "300"))
SEED = int(os.environ.get("CKPTGUARD_FUZZ_SEED", "8"))
NAME, OTHER = "ck-a", "other"  # no single-bit flip of "ck-a\n" names another checkpoint
DATA = ["rank-00000.ckg", "rank-00001.ckg"]
PAGE = 4096
CHUNK = 6144  # records of one and of two pages


# ---------------------------------------------------------------------------- a 2-rank save


def global_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64, 40, generator=g),  # raw: incompressible
        "m": torch.zeros(64, 40) + seed,  # shuffle-lz4
        "big": torch.randn(4000, generator=g),  # replicated, several raw chunks
        "ids": torch.arange(3000, dtype=torch.int64) * (seed + 1),  # replicated, shuffle-lz4
        "h": (torch.randn(33, generator=g) * 0.02).to(torch.bfloat16),
    }


def save_sharded(path: str, seed: int, world: int = 2) -> None:
    """A ``world``-rank save from threads: w and m sharded by rows, the rest replicated."""
    full = global_state(seed)

    def rank_main(coord: ThreadCoordinator) -> None:
        r = coord.rank
        a, b = r * 64 // world, (r + 1) * 64 // world
        state = {
            "model": {
                "w": Shard(full["w"][a:b].clone(), (64, 40), (a, 0)),
                "big": full["big"].clone(),
                "h": full["h"].clone(),
            },
            "optim": {"m": Shard(full["m"][a:b].clone(), (64, 40), (a, 0)), "ids": full["ids"]},
            "step": seed,
        }
        ckptguard.save(state, path, chunk_size=CHUNK, coordinator=coord, timeout=60, compress="lz4")

    run_ranks(world, rank_main)


def loaded_equals(out: Any, seed: int) -> bool:
    full = global_state(seed)
    return (
        torch.equal(out["model"]["w"], full["w"])
        and torch.equal(out["optim"]["m"], full["m"])
        and torch.equal(out["model"]["big"], full["big"])
        and torch.equal(out["optim"]["ids"], full["ids"])
        and torch.equal(out["model"]["h"], full["h"])
    )


@dataclass
class Pristine:
    store: str
    ck: ir.Checkpoint  # the layout of NAME, from the independent reader


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    store = str(tmp_path_factory.mktemp("adversarial") / "store")
    save_sharded(os.path.join(store, OTHER), seed=1)
    save_sharded(os.path.join(store, NAME), seed=0)
    assert ckptguard.Store(store).latest().name == NAME
    ck = ir.read_checkpoint(os.path.join(store, NAME))
    assert sorted(ck.files) == DATA and all(ck.files[n].records for n in DATA)
    codecs = {r["codec"] for r in ck.rows}
    assert codecs == {"raw", "shuffle-lz4"}
    assert any(r.end - r.offset > PAGE for n in DATA for r in ck.files[n].records)
    return Pristine(store, ck)


# ---------------------------------------------------------------------------- the damage


@dataclass
class Case:
    kind: str  # bitflip, zero_page, truncate, swap
    target: str  # a file name, or a swap's name
    region: str  # where in the file (data files), or "-"
    u: float  # position in the region, in [0, 1)
    bit: int

    @property
    def category(self) -> str:
        return f"{self.kind}/{_kind_of(self.target)}/{self.region}"


def _kind_of(target: str) -> str:
    return "data" if target.endswith(".ckg") else target


REGIONS = ["header", "record_header", "payload", "padding", "footer", "trailer"]
SWAPS = [
    "data_files_exchanged",
    "data_from_other_checkpoint",
    "truncated_data_from_other",
    "manifest_from_other",
    "index_from_other",
    "manifest_and_index_exchanged",
    "latest_holds_a_manifest",
]


def make_case(i: int) -> Case:
    rng = random.Random(SEED * 1_000_003 + i)
    kind = ["bitflip", "bitflip", "zero_page", "truncate", "swap"][i % 5]
    if kind == "swap":
        return Case(kind, SWAPS[(i // 5) % len(SWAPS)], "-", rng.random(), 0)
    target = rng.choice(["MANIFEST.json", "index.parquet", *DATA, *DATA, "LATEST"])
    region = rng.choice(REGIONS) if target.endswith(".ckg") and kind != "truncate" else "-"
    return Case(kind, target, region, rng.random(), rng.randrange(8))


CASES = [make_case(i) for i in range(N_CASES)]


@dataclass
class Expect:
    files: set[str]  # the problem / error names one of these
    key: str | None = None
    chunk: int | None = None
    store_level: bool = False  # LATEST: verify and load of the store raise


def _span(lay: ir.DataFileLayout, region: str, rng: random.Random) -> tuple[int, int, Any]:
    """[start, end) of a region of a data file, and the record it belongs to (if any)."""
    recs = lay.records
    rec = rng.choice(recs)
    if region == "header":
        return 0, PAGE, None
    if region == "record_header":
        return rec.offset, rec.payload_offset, rec
    if region == "payload":
        return rec.payload_offset, rec.payload_end, rec
    if region == "padding":
        padded = [r for r in recs if r.end > r.payload_end]
        rec = rng.choice(padded)
        return rec.payload_end, rec.end, rec
    if region == "footer":
        return lay.footer_offset, lay.footer_offset + lay.footer_len, None
    return lay.trailer_offset, lay.size, None


def _record_at(lay: ir.DataFileLayout, off: int) -> ir.Record | None:
    for r in lay.records:
        if r.offset <= off < r.end:
            return r
    return None


def _flip(path: str, off: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ (1 << bit)]))


def apply(case: Case, p: Pristine, store: str) -> Expect:
    """Damage the copy of the store at ``store`` as ``case`` says; return what must be named."""
    ck = os.path.join(store, NAME)
    other = os.path.join(store, OTHER)
    rng = random.Random(f"{SEED}:{case}")
    if case.kind == "swap":
        return _swap(case, ck, other, store, rng)
    path = (
        os.path.join(store, "LATEST") if case.target == "LATEST" else os.path.join(ck, case.target)
    )
    size = os.path.getsize(path)
    expect = Expect({case.target}, store_level=case.target == "LATEST")
    if case.kind == "truncate":
        os.truncate(path, int(case.u * size))
        return expect
    lay = p.ck.files.get(case.target)
    if case.kind == "bitflip":
        if lay is None:
            off = int(case.u * size)
        else:
            lo, hi, _ = _span(lay, case.region, rng)
            off = lo + int(case.u * (hi - lo))
        _flip(path, off, case.bit)
        rec = _record_at(lay, off) if lay is not None else None
    else:  # zero_page: a page with a non-zero byte (zeroing zeros changes nothing)
        data = Path(path).read_bytes()
        pages = [k for k in range(0, len(data), PAGE) if any(data[k : k + PAGE])]
        if lay is not None:
            lo, hi, _ = _span(lay, case.region, rng)
            near = [k for k in pages if k < hi and k + PAGE > lo]
            pages = near or pages
        start = pages[int(case.u * len(pages))]
        with open(path, "r+b") as f:
            f.seek(start)
            f.write(bytes(min(PAGE, len(data) - start)))
        rec = _record_at(lay, start) if lay is not None else None
    if rec is not None:
        expect.key, expect.chunk = rec.row["key"], rec.row["chunk"]
    return expect


def _swap(case: Case, ck: str, other: str, store: str, rng: random.Random) -> Expect:
    k = rng.randrange(2)
    if case.target == "data_files_exchanged":
        a, b = (os.path.join(ck, n) for n in DATA)
        os.rename(a, a + ".x")
        os.rename(b, a)
        os.rename(a + ".x", b)
        return Expect(set(DATA))
    if case.target == "data_from_other_checkpoint":
        shutil.copyfile(os.path.join(other, DATA[k]), os.path.join(ck, DATA[k]))
        return Expect({DATA[k]})
    if case.target == "truncated_data_from_other":
        data = Path(other, DATA[k]).read_bytes()
        Path(ck, DATA[k]).write_bytes(data[: int(case.u * len(data))])
        return Expect({DATA[k]})
    if case.target == "manifest_from_other":
        shutil.copyfile(os.path.join(other, ir.MANIFEST), os.path.join(ck, ir.MANIFEST))
        return Expect({ir.MANIFEST, ir.INDEX, *DATA})
    if case.target == "index_from_other":
        shutil.copyfile(os.path.join(other, ir.INDEX), os.path.join(ck, ir.INDEX))
        return Expect({ir.INDEX})
    if case.target == "manifest_and_index_exchanged":
        m, i = os.path.join(ck, ir.MANIFEST), os.path.join(ck, ir.INDEX)
        os.rename(m, m + ".x")
        os.rename(i, m)
        os.rename(m + ".x", i)
        return Expect({ir.MANIFEST, ir.INDEX})
    shutil.copyfile(os.path.join(ck, ir.MANIFEST), os.path.join(store, "LATEST"))
    return Expect({"LATEST"}, store_level=True)


def _names(obj: Any, files: set[str]) -> bool:
    f = getattr(obj, "file", None)
    return f is not None and os.path.basename(str(f)) in files


RESULTS: Counter = Counter()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "i", range(N_CASES), ids=[f"{i:04d}-{c.category}" for i, c in enumerate(CASES)]
)
def test_random_damage_detected(i: int, pristine: Pristine, tmp_path: Path) -> None:
    """verify finds it, load refuses it (naming file, tensor, chunk), so does the reader."""
    case = CASES[i]
    store = str(tmp_path / "store")
    shutil.copytree(pristine.store, store)
    exp = apply(case, pristine, store)
    target = store if exp.store_level else os.path.join(store, NAME)
    where = f"{case} expecting {exp}"

    if exp.store_level:
        with pytest.raises(ckptguard.CorruptCheckpointError) as ei:
            ckptguard.verify(target)
        assert _names(ei.value, exp.files), f"{where}: {ei.value}"
    else:
        report = ckptguard.verify(target)
        probs = "\n".join(map(str, report.problems))
        assert not report.ok, f"{where}: verify found nothing"
        assert any(_names(q, exp.files) for q in report.problems), f"{where}:\n{probs}"
        if exp.key is not None:
            assert any(
                q.key == exp.key and q.chunk == exp.chunk and _names(q, exp.files)
                for q in report.problems
            ), f"{where}: tensor/chunk not named:\n{probs}"

    with pytest.raises(ckptguard.CorruptCheckpointError) as ei:
        ckptguard.load(target)
    err = ei.value
    assert _names(err, exp.files), f"{where}: load said {err}"
    if exp.key is not None:
        assert (err.key, err.chunk) == (exp.key, exp.chunk), f"{where}: load said {err}"
        assert exp.key in str(err)

    with pytest.raises(ir.SpecViolation):
        ir.read_checkpoint(target)
    RESULTS[(case.category, "detected+located")] += 1


def test_random_damage_summary() -> None:
    """Every category of the campaign ran (with the default number of cases); prints counts."""
    if not RESULTS:
        pytest.skip("the campaign did not run in this session")
    cats = Counter(c for c, _ in RESULTS.elements())
    print(f"\n{sum(RESULTS.values())} damage cases detected and located, by category:")
    for cat, n in sorted(cats.items()):
        print(f"  {cat:40s} {n}")
    if N_CASES >= 300 and len(RESULTS) == N_CASES:
        kinds = {c.split("/")[0] for c in cats}
        assert kinds == {"bitflip", "zero_page", "truncate", "swap"}
        data_regions = {c.split("/")[2] for c in cats if c.startswith("bitflip/data")}
        assert data_regions == set(REGIONS)
        assert {c.split("/")[1] for c in cats} >= {
            "MANIFEST.json",
            "index.parquet",
            "data",
            "LATEST",
        }


def test_pristine_copy_loads(pristine: Pristine, tmp_path: Path) -> None:
    """The undamaged store verifies and loads the saved values (so the damage is what the
    campaign detects)."""
    store = str(tmp_path / "store")
    shutil.copytree(pristine.store, store)
    assert ckptguard.verify(store).ok
    assert loaded_equals(ckptguard.load(store), 0)
    assert loaded_equals(ckptguard.load(os.path.join(store, OTHER)), 1)


# ---------------------------------------------------------------------------- links and names


def _decoy(store: str, name: str) -> str:
    """A valid copy of the checkpoint's ``name`` file outside the store; returns its path."""
    outside = os.path.join(os.path.dirname(store), "outside")
    os.makedirs(outside, exist_ok=True)
    src = os.path.join(store, "c1", name) if name != "LATEST" else os.path.join(store, name)
    dst = os.path.join(outside, name)
    shutil.copy2(src, dst)
    return dst


LINKED = ["MANIFEST.json", "index.parquet", "rank-00000.ckg", "LATEST"]


@pytest.mark.parametrize("name", LINKED)
@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_symlinked_file_is_refused(store: str, name: str, how: str) -> None:
    """A link in place of any file of a checkpoint (or LATEST) is damage, even when it points
    at an identical copy; nothing outside the checkpoint is opened."""
    ckptguard.save(small_state(), os.path.join(store, "c1"), chunk_size=128)
    target = _decoy(store, name)
    link = os.path.join(store, name) if name == "LATEST" else os.path.join(store, "c1", name)
    os.remove(link)
    os.symlink(
        target if how == "absolute" else os.path.relpath(target, os.path.dirname(link)), link
    )
    path = store if name == "LATEST" else os.path.join(store, "c1")
    with record_opens() as opened:
        with pytest.raises(ckptguard.CorruptCheckpointError) as ei:
            ckptguard.load(path)
        assert os.path.basename(str(ei.value.file)) == name
        if name == "LATEST":
            with pytest.raises(ckptguard.CorruptCheckpointError) as ei:
                ckptguard.verify(path)
            assert ei.value.file == name
        else:
            report = ckptguard.verify(path)
            assert not report.ok and any(p.file == name for p in report.problems)
    allowed = (store, os.path.join(store, "LATEST"))
    assert not opened_outside(opened, os.path.join(store, "c1"), allowed), opened
    if name != "LATEST":
        with pytest.raises(ir.SpecViolation):
            ir.read_checkpoint(path)


def test_symlinked_directory_entries(store: str) -> None:
    """A data file that is a link to a directory, or a directory, is refused."""
    ckptguard.save(small_state(), os.path.join(store, "c1"), chunk_size=128)
    d = os.path.join(store, "c1")
    os.makedirs(os.path.join(os.path.dirname(store), "somedir"))
    os.remove(os.path.join(d, "rank-00000.ckg"))
    os.symlink(os.path.join(os.path.dirname(store), "somedir"), os.path.join(d, "rank-00000.ckg"))
    with pytest.raises(ckptguard.CorruptCheckpointError, match="rank-00000.ckg"):
        ckptguard.load(d)
    assert not ckptguard.verify(d).ok


# ---------------------------------------------------------------------------- hostile sizes


@pytest.fixture
def allocations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes of every tensor a load allocates for its result."""
    from ckptguard import place

    seen: list[int] = []
    real = place.host_empty

    def spy(entry: dict) -> Any:
        t = real(entry)
        seen.append(t.numel() * t.element_size() if isinstance(t, torch.Tensor) else t.nbytes)
        return t

    monkeypatch.setattr(place, "host_empty", spy)
    return seen


def _lz4_ckpt(store: str) -> str:
    path = os.path.join(store, "c1")
    ckptguard.save({"z": torch.zeros(1024)}, path, chunk_size=4096, compress="lz4")
    assert pq.read_table(os.path.join(path, "index.parquet")).column("codec")[0].as_py() == (
        "shuffle-lz4"
    )
    return path


LIMIT = 1 << 24
"""Bytes a refusal may allocate: far below what any hostile size here claims."""


def _refused_unallocated(path: str, allocations: list[int], limit: int = LIMIT) -> None:
    """load and verify refuse ``path`` without allocating what it claims: no result tensor and no
    Python or numpy buffer over ``limit`` bytes."""
    for fn in (ckptguard.load, ckptguard.verify):

        def call(fn: Callable[[str], Any] = fn) -> None:
            try:
                report = fn(path)
            except ckptguard.CorruptCheckpointError:
                pass
            else:
                assert not report.ok

        peak = peak_allocation(call)
        assert peak <= limit, f"{fn.__name__} allocated {peak} bytes"
    assert all(n <= limit for n in allocations), allocations


def _load_refused_unallocated(path: str, match: str, limit: int = LIMIT) -> None:
    """load raises CorruptCheckpointError matching ``match``, allocating at most ``limit``."""

    def call() -> None:
        with pytest.raises(ckptguard.CorruptCheckpointError, match=match):
            ckptguard.load(path)

    peak = peak_allocation(call)
    assert peak <= limit, f"load allocated {peak} bytes"


def test_lz4_row_claiming_more_than_lz4_can_expand(store: str, allocations: list[int]) -> None:
    """A 26-byte LZ4 payload claiming 4 TiB of raw bytes: refused by the index rules (before,
    the load tried to allocate 4 TiB and died with torch's RuntimeError)."""
    path = _lz4_ckpt(store)
    n = 1 << 40

    def rows(rs: list[dict]) -> None:
        rs[0].update(raw_len=n * 4, global_shape=[n], shard_lengths=[n])

    def body(b: dict) -> None:
        b["tensors"][0]["shape"] = [n]
        b["totals"]["raw_bytes"] = n * 4

    rewrite_rows(path, rows, body)
    _refused_unallocated(path, allocations)
    with pytest.raises(ckptguard.CorruptCheckpointError, match="more raw bytes"):
        ckptguard.load(path)


def test_manifest_claiming_a_huge_data_file(store: str, allocations: list[int]) -> None:
    """Rows inside a data file the manifest says is 4 GiB (it has 8 KiB): the load checks the
    files' real sizes before allocating the 1 TiB their rows would fill."""
    path = _lz4_ckpt(store)
    stored, raw = 1 << 32, 1 << 40

    def rows(rs: list[dict]) -> None:
        rs[0].update(raw_len=raw, stored_len=stored, global_shape=[raw // 4])
        rs[0].update(shard_lengths=[raw // 4])

    def body(b: dict) -> None:
        b["tensors"][0]["shape"] = [raw // 4]
        b["totals"].update(raw_bytes=raw, stored_bytes=stored)
        b["files"][0]["size"] = 4096 + (64 + stored + 4095) // 4096 * 4096 + 8192

    rewrite_rows(path, rows, body)
    _refused_unallocated(path, allocations)
    with pytest.raises(ckptguard.CorruptCheckpointError, match="rank-00000.ckg"):
        ckptguard.load(path)


def test_tensor_whose_byte_count_overflows_int64(store: str, allocations: list[int]) -> None:
    """shape [2**60 + 1] complex128 is 2**64 + 16 bytes, which int64 arithmetic saw as 16: one
    16-byte chunk passed the index rules and the load asked torch for 16 EiB."""
    path = os.path.join(store, "c1")
    ckptguard.save({"z": torch.zeros(1, dtype=torch.complex128)}, path, compress="none")
    n = (1 << 60) + 1

    def rows(rs: list[dict]) -> None:
        rs[0].update(global_shape=[n], shard_lengths=[n])

    rewrite_rows(path, rows, lambda b: b["tensors"][0].__setitem__("shape", [n]))
    _refused_unallocated(path, allocations)
    with pytest.raises(ckptguard.CorruptCheckpointError, match="MANIFEST.json"):
        ckptguard.load(path)


@pytest.mark.parametrize("rank", [(1 << 31) - 1, 200_000_000])
def test_row_with_a_huge_rank(store: str, rank: int) -> None:
    """A row naming rank 2**31-1: the index check looks the rank up among the manifest's files
    instead of building anything with an entry per rank up to it (gigabytes)."""
    path = os.path.join(store, "c1")
    ckptguard.save(small_state(), path, chunk_size=128)
    rewrite_rows(path, lambda rs: rs[0].__setitem__("rank", rank))
    _load_refused_unallocated(path, "file of the row's rank")


def test_data_file_of_a_huge_rank(store: str) -> None:
    """A manifest whose only file is rank-999999999.ckg (a legal name): refused because the
    header names rank 0, without allocating anything with an entry per rank."""
    path = os.path.join(store, "c1")
    ckptguard.save(small_state(), path, chunk_size=128)
    big = "rank-999999999.ckg"

    def rows(rs: list[dict]) -> None:
        for r in rs:
            r.update(file=big, rank=999_999_999)

    def body(b: dict) -> None:
        b["files"][0].update(name=big, rank=999_999_999)
        b["world_size"] = 1_000_000_000

    rewrite_rows(path, rows, body)
    os.rename(os.path.join(path, "rank-00000.ckg"), os.path.join(path, big))
    _load_refused_unallocated(path, "header names rank 0")


def _deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("where", ["metadata", "tree"])
def test_manifest_nested_beyond_the_stack(store: str, where: str) -> None:
    """A signed manifest body nested 100,000 deep: CorruptCheckpointError, not RecursionError."""
    path = os.path.join(store, "c1")
    ckptguard.save(small_state(), path, chunk_size=128)
    raw = ir.read_manifest_bytes(path)
    _, a, b = ir.manifest_span(raw)
    body = json.loads(raw[a:b])
    body[where] = "@@DEEP@@"
    text = json.dumps(body, separators=(",", ":")).replace('"@@DEEP@@"', _deep(100_000))
    Path(path, ir.MANIFEST).write_bytes(ir.frame_manifest(text.encode()))
    with pytest.raises(ckptguard.CorruptCheckpointError, match="MANIFEST.json"):
        ckptguard.load(path)
    report = ckptguard.verify(path)
    assert not report.ok and report.problems[0].file == ir.MANIFEST
    assert ckptguard.Store(store).list() == []


def test_footer_nested_beyond_the_stack(store: str) -> None:
    """A data file whose (correctly hashed) footer is 100,000 nested arrays."""
    import xxhash

    path = os.path.join(store, "c1")
    ckptguard.save(small_state(), path, chunk_size=128)
    f = os.path.join(path, "rank-00000.ckg")
    data = Path(f).read_bytes()
    off = int.from_bytes(data[-32:-24], "little")
    footer = _deep(100_000).encode()
    trailer = (
        off.to_bytes(8, "little")
        + len(footer).to_bytes(8, "little")
        + xxhash.xxh3_64_intdigest(footer).to_bytes(8, "little")
        + b"CKGFOOT1"
    )
    new = data[:off] + footer + trailer
    Path(f).write_bytes(new)

    def body(b: dict) -> None:
        b["files"][0]["size"] = len(new)
        b["locator"]["footers"][0] = xxhash.xxh3_128_hexdigest(footer)

    resign_manifest(path, body)
    with pytest.raises(ckptguard.CorruptCheckpointError, match="footer is not valid JSON"):
        ckptguard.load(path)
    report = ckptguard.verify(path)
    assert [p.file for p in report.problems] == ["rank-00000.ckg"]


def test_unknown_device_strings(store: str) -> None:
    """A device torch does not know, in the tree or a tensor entry: a typed error."""
    path = os.path.join(store, "c1")
    ckptguard.save(small_state(), path, chunk_size=128)
    resign_manifest(path, lambda b: b["tensors"][0].__setitem__("device", "warp:9"))
    with pytest.raises(ckptguard.CheckpointError, match="warp:9"):
        ckptguard.load(path)
    assert ckptguard.load(path, map_location="cpu")["model"]["w"].shape == (8, 16)
    resign_manifest(path, lambda b: b["tree"].__setitem__("dev", {"$device": "warp:9"}))
    with pytest.raises(ckptguard.CorruptCheckpointError, match="not a device"):
        ckptguard.load(path, map_location="cpu")
    assert not ckptguard.verify(path).ok


def test_index_with_strings_that_are_not_utf8(tmp_path: Path) -> None:
    """A (re-signed) index.parquet whose key column holds bytes that are not UTF-8: Parquet
    reads them as they are; the reader refuses them (it raised UnicodeDecodeError while
    naming the bad row). The file is a finding of the mutation fuzzer, kept in the corpus."""
    import xxhash

    here = os.path.dirname(os.path.abspath(__file__))
    path = str(tmp_path / "store" / "ck")
    shutil.copytree(os.path.join(here, "corpus", "checkpoint"), path)
    data = Path(here, "corpus", "index", "regress-key-not-utf8").read_bytes()
    Path(path, ir.INDEX).write_bytes(data)

    def sign(b: dict) -> None:
        b["index"].update(size=len(data), xxh3_128=xxhash.xxh3_128_hexdigest(data))

    resign_manifest(path, sign)
    with pytest.raises(ckptguard.CorruptCheckpointError, match="UTF8") as ei:
        ckptguard.load(path)
    assert ei.value.file == ir.INDEX
    assert [p.file for p in ckptguard.verify(path).problems] == [ir.INDEX]
