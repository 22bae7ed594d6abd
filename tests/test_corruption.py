"""One damaged byte (or a truncated, missing or swapped file) anywhere in a committed checkpoint is
found by ckptguard.verify, refused by ckptguard.load, and refused by the independent reader, and
neither changes a file. Links in place of files are tests/test_adversarial.py's."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import independent_reader as ir
import pytest
import torch
from conftest import flip_byte, reorder_footer, resign_manifest, snapshot

import ckptguard

DATA = "rank-00000.ckg"
CHUNK = 1024


@dataclass
class Expect:
    """What the problem report and the error must name."""

    file: str
    key: str | None = None
    chunk: int | None = None


@dataclass
class Pristine:
    path: str
    ck: ir.Checkpoint


COMPRESS = ["lz4", "none"]
both_codecs = pytest.mark.parametrize("pristine", COMPRESS, indirect=True)
CODEC_OF = {"lz4": "shuffle-lz4", "zstd": "shuffle-zstd"}  # the compressed codec each save has


@pytest.fixture(scope="module")
def pristine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    """A committed checkpoint: several multi-chunk tensors; with lz4 both codecs occur."""
    g = torch.Generator().manual_seed(1)
    state = {
        "rand": torch.randn(3 * CHUNK // 4 + 5, generator=g),  # incompressible: raw
        "zeros": torch.zeros(3 * CHUNK // 8, dtype=torch.float64),  # compressed under lz4/zstd
        "ids": torch.arange(700, dtype=torch.int64),
        "small": torch.tensor([1, 2, 3], dtype=torch.int16),
        "meta": {"step": 3},
    }
    store = tmp_path_factory.mktemp(f"pristine-{request.param}")
    path = str(store / "ck")
    ckptguard.save(state, path, compress=request.param, chunk_size=CHUNK)
    ck = ir.read_checkpoint(path)
    return Pristine(path, ck)


def _record(p: Pristine, codec: str, chunk: int = 1) -> ir.Record:
    for rec in p.ck.files[DATA].records:
        if rec.row["codec"] == codec and rec.row["chunk"] == chunk:
            return rec
    pytest.skip(f"no {codec} record with chunk {chunk} in this checkpoint")


def _padded_record(p: Pristine) -> ir.Record:
    for rec in p.ck.files[DATA].records:
        if rec.end > rec.payload_end:
            return rec
    pytest.skip("no record with padding")


Damage = Callable[[str, Pristine], Expect]
CASES: dict[str, Damage] = {}


def case(name: str) -> Callable[[Damage], Damage]:
    def reg(fn: Damage) -> Damage:
        CASES[name] = fn
        return fn

    return reg


def _flip_at(file: str, off: int) -> Damage:
    def fn(d: str, p: Pristine) -> Expect:
        flip_byte(os.path.join(d, file), off)
        return Expect(file)

    return fn


# MANIFEST.json: framing, checksum, body
for _n, _o in {
    "open_brace": 0,
    "checksum_key": 3,
    "checksum_hex": 20,
    "manifest_key": 50,
    "suffix_brace": -2,
    "newline": -1,
}.items():
    CASES[f"manifest_{_n}"] = _flip_at(ir.MANIFEST, _o)


def _manifest_body_at(needle: bytes, skip: int) -> Damage:
    def fn(d: str, p: Pristine) -> Expect:
        raw = Path(d, ir.MANIFEST).read_bytes()
        flip_byte(os.path.join(d, ir.MANIFEST), raw.index(needle, ir.PREFIX_LEN) + skip)
        return Expect(ir.MANIFEST)

    return fn


CASES["manifest_body_name"] = _manifest_body_at(b'"name":"ck"', 9)
CASES["manifest_body_file_size"] = _manifest_body_at(b'"size":', 8)
CASES["manifest_body_uuid"] = _manifest_body_at(b'"uuid":"', 10)

# index.parquet
for _n, _o in {"magic": 0, "middle": None, "footer_len": -5, "end_magic": -1}.items():

    def _idx(d: str, p: Pristine, o: int | None = _o) -> Expect:
        size = os.path.getsize(os.path.join(d, ir.INDEX))
        flip_byte(os.path.join(d, ir.INDEX), size // 2 if o is None else o)
        return Expect(ir.INDEX)

    CASES[f"index_{_n}"] = _idx

# data file header fields, including reserved zero bytes
for _n, _o in {
    "magic": 0,
    "version": 8,
    "rank": 12,
    "uuid": 20,
    "alignment": 33,
    "zero36": 36,
    "hash": 41,
    "zero48": 48,
    "zero_last": 4095,
}.items():
    CASES[f"header_{_n}"] = _flip_at(DATA, _o)


# a record header (second chunk of a raw tensor)
def _rec_hdr(rel: int) -> Damage:
    def fn(d: str, p: Pristine) -> Expect:
        rec = _record(p, "raw")
        flip_byte(os.path.join(d, DATA), rec.offset + rel)
        return Expect(DATA)

    return fn


for _n, _o in {
    "magic": 0,
    "codec": 4,
    "elem_size": 5,
    "zero6": 6,
    "raw_len": 8,
    "stored_len": 17,
    "hash": 30,
    "seq": 40,
    "zero44": 50,
    "header_hash": 60,
}.items():
    CASES[f"record_{_n}"] = _rec_hdr(_o)


# payloads: first, middle, last byte, of a raw and of a shuffle-lz4 record
def _payload(codec: str, where: str) -> Damage:
    def fn(d: str, p: Pristine) -> Expect:
        rec = _record(p, codec)
        off = {
            "first": rec.payload_offset,
            "middle": rec.payload_offset + rec.stored_len // 2,
            "last": rec.payload_end - 1,
        }[where]
        flip_byte(os.path.join(d, DATA), off)
        return Expect(DATA, rec.row["key"], rec.row["chunk"])

    return fn


for _c in ("raw", "shuffle-lz4", "shuffle-zstd"):
    for _w in ("first", "middle", "last"):
        CASES[f"payload_{_c}_{_w}"] = _payload(_c, _w)


@case("padding_first")
def _pad_first(d: str, p: Pristine) -> Expect:
    rec = _padded_record(p)
    flip_byte(os.path.join(d, DATA), rec.payload_end)
    return Expect(DATA)


@case("padding_last")
def _pad_last(d: str, p: Pristine) -> Expect:
    rec = _padded_record(p)
    flip_byte(os.path.join(d, DATA), rec.end - 1)
    return Expect(DATA)


def _footer(where: str) -> Damage:
    def fn(d: str, p: Pristine) -> Expect:
        lay = p.ck.files[DATA]
        off = {"first": 0, "middle": lay.footer_len // 2, "last": lay.footer_len - 1}[where]
        flip_byte(os.path.join(d, DATA), lay.footer_offset + off)
        return Expect(DATA)

    return fn


for _w in ("first", "middle", "last"):
    CASES[f"footer_{_w}"] = _footer(_w)

for _n, _o in {"footer_offset": -32, "footer_len": -24, "footer_hash": -16, "magic": -8}.items():
    CASES[f"trailer_{_n}"] = _flip_at(DATA, _o)
CASES["trailer_last_byte"] = _flip_at(DATA, -1)


def _truncate(file: str, to: Callable[[int, Pristine], int]) -> Damage:
    def fn(d: str, p: Pristine) -> Expect:
        path = os.path.join(d, file)
        os.truncate(path, to(os.path.getsize(path), p))
        return Expect(file)

    return fn


CASES["truncate_manifest_1"] = _truncate(ir.MANIFEST, lambda n, p: n - 1)
CASES["truncate_manifest_half"] = _truncate(ir.MANIFEST, lambda n, p: n // 2)
CASES["truncate_manifest_0"] = _truncate(ir.MANIFEST, lambda n, p: 0)
CASES["truncate_index_1"] = _truncate(ir.INDEX, lambda n, p: n - 1)
CASES["truncate_index_0"] = _truncate(ir.INDEX, lambda n, p: 0)
CASES["truncate_data_1"] = _truncate(DATA, lambda n, p: n - 1)
CASES["truncate_data_at_footer"] = _truncate(DATA, lambda n, p: p.ck.files[DATA].footer_offset)
CASES["truncate_data_mid_record"] = _truncate(
    DATA, lambda n, p: p.ck.files[DATA].records[1].offset + 100
)
CASES["truncate_data_header"] = _truncate(DATA, lambda n, p: 4096)
CASES["truncate_data_0"] = _truncate(DATA, lambda n, p: 0)


@case("append_data_byte")
def _append(d: str, p: Pristine) -> Expect:
    with open(os.path.join(d, DATA), "ab") as f:
        f.write(b"\0")
    return Expect(DATA)


@case("delete_data")
def _delete_data(d: str, p: Pristine) -> Expect:
    os.remove(os.path.join(d, DATA))
    return Expect(DATA)


@case("delete_index")
def _delete_index(d: str, p: Pristine) -> Expect:
    os.remove(os.path.join(d, ir.INDEX))
    return Expect(ir.INDEX)


@case("data_is_directory")
def _data_dir(d: str, p: Pristine) -> Expect:
    os.remove(os.path.join(d, DATA))
    os.mkdir(os.path.join(d, DATA))
    return Expect(DATA)


def _names_file(problem: object, file: str) -> bool:
    pf = getattr(problem, "file", None)
    return (pf is not None and os.path.basename(str(pf)) == file) or file in str(problem)


def _applies(compress: str, name: str) -> bool:
    """Whether case ``name`` damages a record that a save with ``compress`` has."""
    codec = next((c for c in CODEC_OF.values() if c in name), None)
    if compress == "zstd":
        return codec == "shuffle-zstd"
    return codec is None or codec == CODEC_OF.get(compress)


@pytest.mark.parametrize(
    "pristine,name",
    # Every case on checkpoints saved with "lz4" and "none" (where it has such a record), and
    # the damaged zstd payloads on one saved with "zstd".
    [(c, n) for c in [*COMPRESS, "zstd"] for n in sorted(CASES) if _applies(c, n)],
    indirect=["pristine"],
)
def test_damage_detected(name: str, pristine: Pristine, tmp_path: Path) -> None:
    """verify reports it (naming file, tensor and chunk), load refuses it, so does the reader."""
    d = str(tmp_path / "store" / "ck")
    shutil.copytree(pristine.path, d)
    exp = CASES[name](d, pristine)
    before = snapshot(str(tmp_path / "store"), staging=True)

    report = ckptguard.verify(d)
    assert not report.ok, f"{name}: verify found nothing"
    probs = "\n".join(map(str, report.problems))
    assert any(_names_file(p, exp.file) for p in report.problems), f"{exp.file} not in:\n{probs}"
    if exp.key is not None:
        assert any(p.key == exp.key and p.chunk == exp.chunk for p in report.problems), (
            f"no problem names tensor {exp.key!r} chunk {exp.chunk}:\n{probs}"
        )

    with pytest.raises(ckptguard.CorruptCheckpointError) as ei:
        ckptguard.load(d)
    if exp.key is not None:
        assert ei.value.key == exp.key and exp.key in str(ei.value)
        assert ei.value.chunk == exp.chunk

    with pytest.raises(ir.SpecViolation):
        ir.read_checkpoint(d)
    assert snapshot(str(tmp_path / "store"), staging=True) == before


@both_codecs
def test_pristine_is_clean(pristine: Pristine, tmp_path: Path) -> None:
    """The undamaged copy verifies and loads (so the damage is what the other tests detect)."""
    d = str(tmp_path / "store" / "ck")
    shutil.copytree(pristine.path, d)
    report = ckptguard.verify(d)
    assert report.ok and not report.problems
    assert report.chunks_checked == len(pristine.ck.rows)
    assert report.bytes_checked > 0
    ckptguard.load(d)
    ir.read_checkpoint(d)


@both_codecs
@pytest.mark.parametrize("rest", ["checkpoint", "zeroed_data_file"])
def test_missing_manifest(pristine: Pristine, tmp_path: Path, rest: str) -> None:
    """Without MANIFEST.json the directory is not a checkpoint, whether the rest of one is there
    or only a data file of zeros: not loaded, not verified ok, not listed, nothing changed."""
    d = str(tmp_path / "store" / "ck")
    if rest == "checkpoint":
        shutil.copytree(pristine.path, d)
        os.remove(os.path.join(d, ir.MANIFEST))
    else:
        os.makedirs(d)
        Path(d, DATA).write_bytes(b"\0" * 8192)
    store = str(tmp_path / "store")
    before = snapshot(store, staging=True)
    with pytest.raises((ckptguard.CorruptCheckpointError, ckptguard.CheckpointNotFoundError)):
        ckptguard.load(d)
    try:
        report = ckptguard.verify(d)
    except (ckptguard.CorruptCheckpointError, ckptguard.CheckpointNotFoundError):
        pass
    else:
        assert not report.ok
    assert ckptguard.Store(store).list() == []
    assert snapshot(store, staging=True) == before  # nothing written, renamed or removed


@both_codecs
def test_verify_off_skips_hash_only(pristine: Pristine, tmp_path: Path) -> None:
    """load(verify=False) still refuses structural damage (a bad record header)."""
    d = str(tmp_path / "store" / "ck")
    shutil.copytree(pristine.path, d)
    rec = pristine.ck.files[DATA].records[1]
    flip_byte(os.path.join(d, DATA), rec.offset)  # record magic
    with pytest.raises(ckptguard.CorruptCheckpointError):
        ckptguard.load(d, verify=False)


def _rewrite_footer(
    d: str, p: Pristine, edit: Callable[[bytes], bytes], relocate: bool = True
) -> None:
    """Replace the data file's footer with ``edit(footer)`` (same length) and re-seal its trailer
    hash, and (``relocate``) its hash in the manifest's locator (format.md 4.5), as a writer that
    formats the same JSON differently (or lies consistently) would."""
    import struct

    import xxhash

    lay = p.ck.files[DATA]
    path = os.path.join(d, DATA)
    with open(path, "r+b") as f:
        f.seek(lay.footer_offset)
        old = f.read(lay.footer_len)
        new = edit(old)
        assert len(new) == len(old) and new != old
        f.seek(lay.footer_offset)
        f.write(new)
        f.seek(-16, os.SEEK_END)
        f.write(struct.pack("<Q", xxhash.xxh3_64_intdigest(new)))
    if relocate:

        def mut(body: dict) -> None:
            body["locator"]["footers"][0] = xxhash.xxh3_128_hexdigest(new)

        resign_manifest(d, mut)


@both_codecs
def test_a_footer_formatted_otherwise_still_loads(pristine: Pristine, tmp_path: Path) -> None:
    """The reader compares a footer with the one it would write for the index's rows; a footer
    that differs only in form (members in another order) is parsed and compared instead."""
    d = str(tmp_path / "store" / "ck")
    shutil.copytree(pristine.path, d)

    _rewrite_footer(d, pristine, reorder_footer)
    assert ckptguard.verify(d).ok
    got, want = ckptguard.load(d), ckptguard.load(pristine.path)
    assert all(torch.equal(got[k], want[k]) for k in ("rand", "zeros", "ids", "small"))


@both_codecs
def test_a_footer_that_is_not_the_one_the_locator_hashed(
    pristine: Pristine, tmp_path: Path
) -> None:
    """A footer whose trailer hash is right but whose bytes are not those the manifest's locator
    hashed is corruption (format.md 4.5), even when its rows equal the index's."""
    d = str(tmp_path / "store" / "ck")
    shutil.copytree(pristine.path, d)

    _rewrite_footer(d, pristine, reorder_footer, relocate=False)
    before = snapshot(str(tmp_path / "store"), staging=True)
    with pytest.raises(ckptguard.CorruptCheckpointError, match="hash in the manifest's locator"):
        ckptguard.load(d)
    assert not ckptguard.verify(d).ok
    with pytest.raises(ir.SpecViolation, match="locator"):
        ir.read_checkpoint(d)
    assert snapshot(str(tmp_path / "store"), staging=True) == before


@both_codecs
def test_a_well_formed_footer_that_disagrees_with_the_index(
    pristine: Pristine, tmp_path: Path
) -> None:
    """A footer with a valid hash whose rows say something else than the index is corruption."""
    d = str(tmp_path / "store" / "ck")
    shutil.copytree(pristine.path, d)
    _rewrite_footer(d, pristine, lambda f: f.replace(b'"elem_size":4', b'"elem_size":8', 1))
    before = snapshot(str(tmp_path / "store"), staging=True)
    with pytest.raises(ckptguard.CorruptCheckpointError, match="footer rows disagree"):
        ckptguard.load(d)
    assert not ckptguard.verify(d).ok
    assert snapshot(str(tmp_path / "store"), staging=True) == before
