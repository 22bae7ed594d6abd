"""Chunk digests (docs/format.md section 4.2, feature ``digests``): SHA-256 of every record's raw
bytes in the index, the index's SHA-256 in the manifest, checked on every load and verify; and
what they do and do not stop (docs/security.md)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import independent_reader as ir
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from clikit import run
from forgery import forge_chunk, rewrite_index, set_first_float

import ckptguard
from ckptguard import encode, io
from ckptguard.errors import CorruptCheckpointError
from ckptguard.format import index, manifest


def _state() -> dict:
    g = torch.Generator().manual_seed(7)
    return {
        "w": torch.ones(3000, 50),  # 150,000 floats of 1.0: several raw chunks
        "emb": torch.randn(500, 64, generator=g, dtype=torch.float64),
        "small": [torch.full((3,), float(i)) for i in range(40)],  # packed records
        "step": 3,
    }


def _manifest(path: Path) -> dict:
    return manifest.decode((path / "MANIFEST.json").read_bytes())


@pytest.mark.parametrize("compress", ["none", "lz4", "zstd"])
def test_every_row_has_the_sha256_of_its_record(tmp_path: Path, compress: str) -> None:
    sd = _state()
    path = tmp_path / "c"
    ckptguard.save(sd, str(path), digests=True, compress=compress, chunk_size=64 << 10)
    body = _manifest(path)
    assert "digests" in body["features"]
    data = (path / "index.parquet").read_bytes()
    assert body["index"]["sha256"] == hashlib.sha256(data).hexdigest()
    rows = index.rows_from_table(index.read_table(data))
    assert len(rows) > 10 and any(r.packed for r in rows)
    flat = {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in _tensors(sd).items()}
    for r in rows:  # a packed record's digest covers all its slices: check the unpacked ones
        if not r.packed:
            raw = flat[r.key][r.shard_byte_offset : r.shard_byte_offset + r.raw_len]
            assert r.digest == hashlib.sha256(raw).digest()
    back = ckptguard.load(str(path))
    assert torch.equal(back["w"], sd["w"]) and torch.equal(back["small"][7], sd["small"][7])
    assert ckptguard.verify(str(path)).ok
    ic = ir.read_checkpoint(str(path))
    assert ic.manifest["features"] == body["features"] and all(
        len(r["digest"]) == 32 for r in ic.rows
    )


def _tensors(sd: dict) -> dict[str, torch.Tensor]:
    out = {"w": sd["w"], "emb": sd["emb"]}
    out.update({f"small/{i}": t for i, t in enumerate(sd["small"])})
    return out


def test_without_the_option_the_index_is_v1(tmp_path: Path) -> None:
    ckptguard.save(_state(), str(tmp_path / "c"))
    body = _manifest(tmp_path / "c")
    assert "digests" not in body["features"] and "sha256" not in body["index"]
    assert "digest" not in pq.read_schema(tmp_path / "c" / "index.parquet").names


def test_the_option_is_checked(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="digests"):
        ckptguard.save({"a": torch.ones(2)}, str(tmp_path / "c"), digests="yes")
    assert not (tmp_path / "c").exists()


def _forged(tmp_path: Path, digests: bool, forger_knows_digests: bool) -> Path:
    path = tmp_path / "c"
    ckptguard.save({"w": torch.ones(4096)}, str(path), compress="none", digests=digests)
    forge_chunk(str(path), "w", set_first_float(666.0), digests=forger_knows_digests)
    return path


def test_a_forged_chunk_with_every_checksum_recomputed_fails_its_digest(tmp_path: Path) -> None:
    path = _forged(tmp_path, digests=True, forger_knows_digests=False)
    with pytest.raises(CorruptCheckpointError, match="digest mismatch") as e:
        ckptguard.load(str(path))
    assert e.value.key == "w"
    report = ckptguard.verify(str(path))
    assert not report.ok and "digest" in report.problems[0].message
    result = run("verify", path)
    assert result.exit_code != 0 and "digest" in result.output
    with pytest.raises(ir.SpecViolation, match="SHA-256"):
        ir.read_checkpoint(str(path))


def test_the_same_forgery_passes_every_checksum_without_digests(tmp_path: Path) -> None:
    """What digests are for: without them the forgery above loads (the forger's own checks)."""
    path = _forged(tmp_path, digests=False, forger_knows_digests=False)
    assert ckptguard.verify(str(path)).ok
    assert ckptguard.load(str(path))["w"][0].item() == 666.0


def test_a_forger_who_recomputes_digests_changes_the_manifest_digest(tmp_path: Path) -> None:
    """Digests alone do not stop a writer who knows the format: the checkpoint verifies, but
    the manifest's SHA-256, which a signature binds, is not the one written."""
    path = tmp_path / "c"
    ckptguard.save({"w": torch.ones(4096)}, str(path), compress="none", digests=True)
    before = hashlib.sha256((path / "MANIFEST.json").read_bytes()).hexdigest()
    forge_chunk(str(path), "w", set_first_float(666.0), digests=True)
    assert ckptguard.load(str(path))["w"][0].item() == 666.0
    assert hashlib.sha256((path / "MANIFEST.json").read_bytes()).hexdigest() != before


def test_an_index_whose_sha256_differs_from_the_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c"
    ckptguard.save(_state(), str(path), digests=True)
    body = _manifest(path)
    body["index"]["sha256"] = "0" * 64
    (path / "MANIFEST.json").write_bytes(manifest.encode(body))
    with pytest.raises(CorruptCheckpointError, match="SHA-256"):
        ckptguard.load(str(path))


@pytest.mark.parametrize("how", ["column-without-feature", "feature-without-column"])
def test_the_column_and_the_feature_go_together(tmp_path: Path, how: str) -> None:
    path = tmp_path / "c"
    ckptguard.save(_state(), str(path), digests=True)
    if how == "feature-without-column":
        rows = index.rows_from_table(index.read_table((path / "index.parquet").read_bytes()))
        for r in rows:
            r.digest = None
        rewrite_index(str(path), rows)
    else:
        body = _manifest(path)
        body["features"].remove("digests")
        del body["index"]["sha256"]
        del body["locator"]["footer_sha256"]
        (path / "MANIFEST.json").write_bytes(manifest.encode(body))
    assert ("digest" in pq.read_schema(path / "index.parquet").names) == (how[0] == "c")
    with pytest.raises(CorruptCheckpointError, match="digest"):
        ckptguard.load(str(path))


def test_rows_of_one_packed_record_agree_on_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "c"
    ckptguard.save(_state(), str(path), digests=True)
    rows = index.rows_from_table(index.read_table((path / "index.parquet").read_bytes()))
    packed = [r for r in rows if r.packed]
    packed[1].digest = bytes(32)
    rewrite_index(str(path), rows)
    with pytest.raises(CorruptCheckpointError, match="disagree"):
        ckptguard.load(str(path))


@pytest.mark.parametrize("backend", ["native", "python"])
def test_write_segments_digests_what_it_hashes(tmp_path: Path, backend: str) -> None:
    if backend == "native" and not ckptguard.backend.available():
        pytest.skip("no native extension")
    data = np.random.default_rng(1).integers(0, 4, 300_000, dtype=np.uint8)
    segs = [io.Segment(memoryview(data), 2, encode.SHUFFLE_LZ4), io.Segment(memoryview(data), 1, 0)]
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        done = io.write_segments(
            fd, str(tmp_path / "f"), 4096, 0, segs, 65536, 2, backend, -1, True
        )
        recs = done.records()
        chunks = [data[i : i + 65536].tobytes() for i in range(0, len(data), 65536)] * 2
        assert [r.digest for r in recs] == [hashlib.sha256(c).digest() for c in chunks]
        elems = [2] * 5 + [1] * 5
        items = [
            encode.ReadItem(
                r.offset,
                (r.stored_len + 64 + 4095) // 4096 * 4096,
                r.codec,
                elem,
                r.raw_len,
                r.stored_len,
                r.hash,
                0,
                i,
                r.digest,
            )
            for i, (r, elem) in enumerate(zip(recs, elems, strict=True))
        ]
        for it in items:
            dest = np.empty(it.raw_len, np.uint8)
            io.read_records(fd, "f", dest, [it], backend=backend)
        bad = items[3]._replace(digest=bytes(32))
        with pytest.raises(encode.ChunkDigestError):
            io.read_records(fd, "f", np.empty(bad.raw_len, np.uint8), [bad], backend=backend)
        io.read_records(
            fd, "f", np.empty(bad.raw_len, np.uint8), [bad], verify=False, backend=backend
        )
        plain = io.write_segments(fd, str(tmp_path / "f"), 4096, 0, segs, 65536, 2, backend)
        assert plain.digest == b"" and plain.hash == done.hash
    finally:
        os.close(fd)
