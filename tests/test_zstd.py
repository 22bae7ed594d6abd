"""The shuffle-zstd codec (docs/format.md sections 3, 4, 7) on both backends.

Both paths write the same bytes for the same libzstd version (the extension's system libzstd and
the `zstandard` wheel's bundled one may differ: then the identical-bytes assertions skip and
cross-decoding is what is checked). Malformed frames fail with typed errors before anything is
allocated for a claimed length; a checkpoint with zstd chunks declares the `zstd` feature.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

import ckptguard
from ckptguard import backend, encode
from ckptguard.format import index, manifest
from ckptguard.format.datafile import CODECS, ZSTD_MAX_RATIO, FormatError
from ckptguard.format.validate import check_table
from ckptguard.options import COMPRESS, SaveOptions
from tests.test_native import BACKENDS, INPUTS, NATIVE_SKIP

ZSTD = encode.SHUFFLE_ZSTD
WHEEL_ZSTD = ".".join(map(str, zstandard.ZSTD_VERSION))
NATIVE_ZSTD = backend.native().library_versions()["zstd"] if backend.available() else None
ZSTD_DIFFERS = (
    f"zstd {NATIVE_ZSTD} in the extension, {WHEEL_ZSTD} in the zstandard wheel: identical bytes "
    "are promised only for the same version (cross-decoding was checked)"
)


def _same_bytes_or_skip(a: object, b: object) -> None:
    if NATIVE_ZSTD != WHEEL_ZSTD:
        pytest.skip(ZSTD_DIFFERS)
    assert a == b


def _frame(data: bytes, **kw: object) -> bytes:
    args = {"level": 1, "write_content_size": True, "write_checksum": False, "write_dict_id": False}
    return zstandard.ZstdCompressor(**{**args, **kw}).compress(data)  # type: ignore[arg-type]


def test_codec_id_and_constants():
    assert ZSTD == CODECS["shuffle-zstd"] == 2 and ZSTD in encode.WRITABLE
    if backend.available():
        n = backend.native()
        assert (n.SHUFFLE_ZSTD, n.ZSTD_MAX_RATIO) == (ZSTD, ZSTD_MAX_RATIO)
        assert (n.ZSTD_MIN_LEVEL, n.ZSTD_MAX_LEVEL) == (
            encode.ZSTD_MIN_LEVEL,
            encode.ZSTD_MAX_LEVEL,
        )
        assert backend.info()["libraries"]["zstd"] == NATIVE_ZSTD  # type: ignore[index]
    assert WHEEL_ZSTD in str(backend.info()["python_zstd"])


@NATIVE_SKIP
@pytest.mark.parametrize("name,data,elem", INPUTS, ids=[x[0] for x in INPUTS])
@pytest.mark.parametrize("level", [-1, 0, 3])
def test_encode_buffer_cross_decodes_and_matches(name: str, data: np.ndarray, elem: int, level):
    chunk = 65536
    out = {
        be: encode.encode_buffer(data, elem, chunk, ZSTD, threads=2, backend=be, level=level)
        for be in ("python", "native")
    }
    for recs in out.values():
        assert len(recs) == -(-len(data) // chunk)
        for i, (cid, payload, h) in enumerate(recs):
            piece = data[i * chunk : (i + 1) * chunk].tobytes()
            assert cid in (encode.RAW, ZSTD) and h == encode.digest(piece)
            if cid == ZSTD:
                assert encode.keeps_compressed(len(payload), len(piece))
            for be in ("python", "native"):
                assert encode.decode(cid, payload, len(piece), elem, backend=be) == piece
    if name in ("bf16", "zeros", "lowent"):
        assert any(c == ZSTD for c, _, _ in out["python"])
    _same_bytes_or_skip(out["native"], out["python"])


@pytest.mark.parametrize("be", BACKENDS)
def test_level_zero_is_level_one_and_levels_differ(be: str):
    data = INPUTS[1][1]  # fp32
    one = encode.encode_buffer(data, 4, 1 << 20, ZSTD, backend=be, level=1)
    assert encode.encode_buffer(data, 4, 1 << 20, ZSTD, backend=be, level=0) == one
    assert encode.encode_buffer(data, 4, 1 << 20, ZSTD, backend=be, level=9) != one


@pytest.mark.parametrize("be", BACKENDS)
def test_random_bytes_stay_raw(be: str):
    data = np.random.default_rng(3).integers(0, 256, 10_000, dtype=np.uint8)
    [(cid, payload, _)] = encode.encode_buffer(data, 1, 1 << 20, ZSTD, backend=be)
    assert cid == encode.RAW and payload == data.tobytes()


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("level", [encode.ZSTD_MIN_LEVEL - 1, encode.ZSTD_MAX_LEVEL + 1])
def test_bad_level_is_value_error(be: str, level: int):
    with pytest.raises(ValueError, match="zstd level"):
        encode.encode_buffer(np.zeros(4096, np.uint8), 1, 1024, ZSTD, backend=be, level=level)


def test_python_threads_each_use_their_own_compressor():
    """zstandard compressors are not thread-safe: concurrent encodes give the one-thread bytes."""
    data = INPUTS[0][1]
    want = encode.encode_buffer(data, 2, 4096, ZSTD, threads=1, backend="python")
    got: list[object] = []
    workers = [
        threading.Thread(
            target=lambda: got.append(
                encode.encode_buffer(data, 2, 4096, ZSTD, threads=4, backend="python")
            )
        )
        for _ in range(4)
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert got == [want] * 4


@pytest.mark.parametrize(
    "value,want",
    [("zstd", (ZSTD, 0)), ("zstd:3", (ZSTD, 3)), ("zstd:-1", (ZSTD, -1)), ("lz4", (1, 0))],
)
def test_parse_compress(value: str, want: tuple[int, int]):
    assert encode.parse_compress(value, COMPRESS) == want
    assert SaveOptions(compress=value).compress == value


@pytest.mark.parametrize("value", ["zstd:", "zstd:x", "zstd: 1", "zstd:1.5", "lz4:1", "gz", 3])
def test_parse_compress_refuses_naming_the_value(value: object):
    with pytest.raises(ValueError, match="compress") as e:
        SaveOptions(compress=value)  # type: ignore[arg-type]
    assert repr(value) in str(e.value)
    with pytest.raises(ValueError, match="zstd level"):
        SaveOptions(compress="zstd:23")


# ---- malformed payloads ---------------------------------------------------------------------

RAW_BYTES = bytes(range(100)) * 41  # 4100 bytes, compressible


def _malformed() -> list[tuple[str, bytes, int]]:
    """(what, payload, raw_len): none of them is a valid shuffle-zstd payload of raw_len bytes."""
    good = _frame(RAW_BYTES)
    small = _frame(bytes(100))  # single segment: its content size is the byte at offset 5
    assert small[4] & 0x20 and small[5] == 100
    skippable = b"\x50\x2a\x4d\x18" + len(RAW_BYTES).to_bytes(4, "little")
    return [
        ("content size is not raw_len", good, len(RAW_BYTES) - 4),
        ("content size lies", small[:5] + bytes([104]) + small[6:], 104),
        ("truncated", good[:-3], len(RAW_BYTES)),
        ("header only", good[:6], len(RAW_BYTES)),
        ("trailing bytes", good + b"\0", len(RAW_BYTES)),
        ("two frames", good + good, len(RAW_BYTES)),
        ("no content size", _frame(RAW_BYTES, write_content_size=False), len(RAW_BYTES)),
        ("checksum flag", _frame(RAW_BYTES, write_checksum=True), len(RAW_BYTES)),
        ("skippable frame", skippable + RAW_BYTES[:8] + good, len(RAW_BYTES)),
        ("not zstd", b"\0" * len(good), len(RAW_BYTES)),
        ("bad block header", good[:6] + bytes([good[6] ^ 0xFF]) + good[7:], len(RAW_BYTES)),
        ("absurd raw_len", good, len(good) * ZSTD_MAX_RATIO + 4),
    ]


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("what,payload,raw_len", _malformed(), ids=[m[0] for m in _malformed()])
def test_malformed_payloads_are_format_errors(be: str, what: str, payload: bytes, raw_len: int):
    assert encode.decode(ZSTD, _frame(RAW_BYTES), len(RAW_BYTES), 1, backend=be) == RAW_BYTES
    with pytest.raises(FormatError):
        encode.decode(ZSTD, payload, raw_len, 1, backend=be)
    if raw_len <= 1 << 20:
        item = encode.DecodeItem(ZSTD, payload, raw_len, 1, None, 0)
        with pytest.raises(encode.ChunkError) as e:
            encode.decode_into(np.empty(raw_len, np.uint8), [item], backend=be)
        assert e.value.index == 0


@pytest.mark.parametrize("be", BACKENDS)
def test_huge_raw_len_refused_before_allocating(be: str):
    with pytest.raises(FormatError, match="impossible|length"):
        encode.decode(ZSTD, _frame(RAW_BYTES), 1 << 50, 1, backend=be)


# ---- checkpoints ----------------------------------------------------------------------------


def _state() -> dict:
    g = torch.Generator().manual_seed(4)
    return {
        "w": (torch.randn(200_000, generator=g) * 0.02).bfloat16(),
        "m": torch.randn(50_000, generator=g),
        "ids": torch.arange(1000),
        "tiny": torch.ones(3),
    }


def _body(path: str) -> dict:
    return json.loads(Path(path, "MANIFEST.json").read_text())["manifest"]


@pytest.mark.parametrize("writer", BACKENDS)
def test_zstd_checkpoint_declares_feature_and_loads_on_both(tmp_path, writer: str):
    state = _state()
    with backend.use(writer):
        info = ckptguard.save(state, str(tmp_path / "z"), compress="zstd:2", chunk_size=65536)
        lz4 = ckptguard.save(state, str(tmp_path / "l"), compress="lz4", chunk_size=65536)
    assert "zstd" in _body(info.path)["features"]
    assert "zstd" not in _body(lz4.path)["features"]
    # the writer member names the zstd library that encoded the records, only where there are any
    assert _body(info.path)["writer"]["zstd"] == backend.zstd_version(writer)
    assert "zstd" not in _body(lz4.path)["writer"]
    assert info.write_stats is not None and info.write_stats["codec"]["shuffle-zstd"] > 0
    for reader in [b.values[0] for b in BACKENDS if not b.marks]:
        with backend.use(reader):
            out = ckptguard.load(info.path)
            assert ckptguard.verify(info.path).ok
        assert all(torch.equal(out[k], v) for k, v in state.items())
    assert info.stored_bytes < lz4.stored_bytes


def test_reader_without_the_feature_refuses(tmp_path, monkeypatch):
    path = ckptguard.save(_state(), str(tmp_path / "z"), compress="zstd").path
    monkeypatch.setattr(manifest, "KNOWN_FEATURES", manifest.KNOWN_FEATURES - {"zstd"})
    with pytest.raises(ckptguard.FormatVersionError, match="zstd"):
        ckptguard.load(path)


def test_zstd_rows_need_the_feature(tmp_path):
    path = ckptguard.save(_state(), str(tmp_path / "z"), compress="zstd").path
    body = _body(path)
    table = index.read_table(Path(path, "index.parquet").read_bytes())
    tensors, files = body["tensors"], {f["name"]: f["size"] for f in body["files"]}
    check_table(table, tensors, files, {"zstd"})
    with pytest.raises(FormatError, match="zstd feature"):
        check_table(table, tensors, files, set())
