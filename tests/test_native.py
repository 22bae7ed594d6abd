"""The chunk codec on both backends (python-zstandard style: same tests, each backend).

The native path must produce exactly the bytes of the pure-Python path (same LZ4 version), decode
anything either writes, and fail with the same typed errors. Outcomes only, never timings.

Without the extension the native tests skip, except under CI=true, where a missing extension is a
failure (`make test` installs the libraries and builds it). With different LZ4 versions in the
extension and the `lz4` wheel, the identical-bytes assertions skip; cross-decoding is always
checked.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptguard
from ckptguard import backend, encode, io
from ckptguard.format.datafile import (
    CODECS,
    LZ4_MAX_RATIO,
    LZ4_SLACK,
    RECORD_HEADER_SIZE,
    RECORD_MAGIC,
    FormatError,
)
from ckptguard.format.layout import ALIGN, align

HERE = Path(__file__).resolve().parent
CI = os.environ.get("CI") == "true"
# A missing extension skips the native tests, but not under CI=true (there they run and fail on
# NativeUnavailableError, and test_extension_built_in_ci says why). CKPTGUARD_NATIVE=0 is a
# choice, not a missing piece: it skips them everywhere.
FORCED_PYTHON = os.environ.get(backend.ENV, "").strip() == "0"
NATIVE_SKIP = pytest.mark.skipif(
    not backend.available() and (FORCED_PYTHON or not CI), reason=backend.reason()
)
BACKENDS = [
    pytest.param("python", id="python"),
    pytest.param("native", id="native", marks=NATIVE_SKIP),
]
ELEMS = [1, 2, 4, 8, 16]


def _model_like(n: int, dtype: torch.dtype, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(n, generator=g) * 0.02).to(dtype)
    return t.view(torch.uint8).numpy()


def _inputs() -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(1)
    return [
        ("bf16", _model_like(300_000, torch.bfloat16), 2),
        ("fp32", _model_like(200_000, torch.float32), 4),
        ("fp16", _model_like(100_000, torch.float16), 2),
        ("zeros", np.zeros(1 << 16, np.uint8), 8),
        ("random", rng.integers(0, 256, 70_000, dtype=np.uint8), 1),
        ("lowent", rng.integers(0, 3, 90_000, dtype=np.uint8), 1),
        ("int64", np.arange(20_000, dtype=np.int64).view(np.uint8), 8),
        ("c128", rng.standard_normal(4_000).astype(np.complex128).view(np.uint8), 16),
        ("tiny", np.arange(48, dtype=np.uint8), 4),
        ("empty", np.zeros(0, np.uint8), 2),
    ]


INPUTS = _inputs()


def _lz4_versions() -> tuple[str | None, str]:
    """The LZ4 versions of the extension (the library it runs with) and of the `lz4` wheel."""
    import lz4

    n = lz4.library_version_number()
    wheel = f"{n // 10000}.{n // 100 % 100}.{n % 100}"
    native = backend.native().library_versions()["lz4"] if backend.available() else None
    return native, wheel


NATIVE_LZ4, WHEEL_LZ4 = _lz4_versions()
SAME_LZ4 = NATIVE_LZ4 == WHEEL_LZ4
LZ4_DIFFERS = (
    f"LZ4 {NATIVE_LZ4} in the extension, {WHEEL_LZ4} in the lz4 wheel: identical bytes are "
    "promised only for the same version (cross-decoding was checked)"
)


def _same_bytes_or_skip(a: object, b: object) -> None:
    """Assert a == b (encoded bytes of both paths) when both use the same LZ4, else skip saying why.
    Call it last: what the test checked before (cross-decoding) has then passed."""
    if not SAME_LZ4:
        pytest.skip(LZ4_DIFFERS)
    assert a == b


def _check_records_decode(data: np.ndarray, elem: int, chunk: int, recs: list) -> None:
    """Records of either path decode, on both paths, to the chunks they were made of."""
    assert len(recs) == -(-len(data) // chunk)
    for i, (cid, payload, h) in enumerate(recs):
        piece = data[i * chunk : (i + 1) * chunk].tobytes()
        assert h == encode.digest(piece)
        for be in ("python", "native"):
            assert encode.decode(cid, payload, len(piece), elem, backend=be) == piece, (i, be)


# ---- the extension itself -----------------------------------------------------------------


def test_extension_built_in_ci():
    """Under CI=true `make test` builds the extension: its absence fails (elsewhere it skips)."""
    if backend.available():
        return
    if FORCED_PYTHON:
        pytest.skip(backend.reason())
    if CI:
        pytest.fail(f"the native extension is missing in CI: {backend.reason()}", False)
    pytest.skip(backend.reason())


def _built_extension() -> None:
    """Skip (fail under CI=true) when the extension was not built; CKPTGUARD_NATIVE=0 does not
    matter here: the extension is imported directly."""
    if importlib.util.find_spec("ckptguard._native") is None:
        if CI:
            pytest.fail("the native extension is missing in CI", False)
        pytest.skip("ckptguard._native is not built")


def test_stub_matches(tmp_path: Path) -> None:
    """ckptguard/_native.pyi states what the built extension has: names, signatures, types.

    The stub and the built extension are checked in a package of their own: stubtest would
    otherwise analyse the whole library (torch's stubs with it) to reach one module."""
    _built_extension()
    spec = importlib.util.find_spec("ckptguard._native")
    assert spec is not None and spec.origin is not None
    built = Path(spec.origin)
    alone = tmp_path / "ckptguard"
    alone.mkdir()
    (alone / "__init__.py").write_text("")
    shutil.copy(built, alone / built.name)
    shutil.copy(Path(ckptguard.__file__).parent / "_native.pyi", alone / "_native.pyi")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "ckptguard._native"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success" in out.stdout, out.stdout  # the module it checked was the copy


def test_constants_match_python():
    """Every constant the C code has its own copy of equals the Python one (docs/format.md)."""
    _built_extension()
    n = importlib.import_module("ckptguard._native")
    assert (n.RAW, n.SHUFFLE_LZ4) == (CODECS["raw"], CODECS["shuffle-lz4"]) == (encode.RAW, 1)
    assert n.REC_HDR == RECORD_HEADER_SIZE
    assert n.ALIGN == ALIGN
    assert n.REC_MAGIC == RECORD_MAGIC
    assert n.MIN_COMPRESS == encode.MIN_COMPRESS
    assert n.LZ4_MAX_INPUT == encode.LZ4_MAX_INPUT
    assert (n.LZ4_MAX_RATIO, n.LZ4_SLACK) == (LZ4_MAX_RATIO, LZ4_SLACK)
    assert n.MAX_EXTENT == io.MAX_EXTENT
    assert n.MAX_SEQ == io.MAX_SEQ


@NATIVE_SKIP
def test_lz4_versions_reported():
    """doctor's versions: the identical-bytes tests compare these (they skip when they differ)."""
    info = backend.info()
    assert info["libraries"]["lz4"] == NATIVE_LZ4
    assert WHEEL_LZ4 in str(info["python_lz4"])
    if not SAME_LZ4:
        pytest.skip(LZ4_DIFFERS)


def _setup_tree(tmp_path: Path) -> Path:
    """setup.py, native/ and a package skeleton: what build_ext needs, nothing else."""
    root = tmp_path / "src"
    shutil.copytree(HERE.parent / "native", root / "native", ignore=shutil.ignore_patterns("tests"))
    shutil.copy2(HERE.parent / "setup.py", root / "setup.py")
    (root / "ckptguard").mkdir()
    (root / "ckptguard" / "__init__.py").write_text("")
    return root


def _build_ext(root: Path, tag: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CKPTGUARD_")}
    full.update(env)
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "-b", f"lib-{tag}", "-t", f"tmp-{tag}"]
    return subprocess.run(cmd, cwd=root, env=full, capture_output=True, text=True, timeout=120)


def test_setup_failed_compiler_warns_or_fails_when_required(tmp_path):
    """A compiler that fails (CC=false): the build succeeds with a warning and no extension,
    unless CKPTGUARD_NATIVE=1, where it fails saying why."""
    root = _setup_tree(tmp_path)
    p = _build_ext(root, "auto", CC="false")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "WARNING: ckptguard native extension:" in p.stderr
    assert "pure-Python path" in p.stderr
    assert not list(root.rglob("_native*.so"))
    p = _build_ext(root, "required", CC="false", CKPTGUARD_NATIVE="1")
    assert p.returncode != 0
    assert "error: CKPTGUARD_NATIVE=1 but" in p.stderr, p.stderr[-3000:]
    assert "pure-Python path" not in p.stderr
    assert not list(root.rglob("_native*.so"))


# ---- identical bytes ----------------------------------------------------------------------


@NATIVE_SKIP
@pytest.mark.parametrize("name,data,elem", INPUTS, ids=[x[0] for x in INPUTS])
@pytest.mark.parametrize("chunk", [64, 4096, 65_536, 1 << 20])
@pytest.mark.parametrize("compress", [True, False])
def test_encode_buffer_identical(name: str, data: np.ndarray, elem: int, chunk: int, compress):
    py = encode.encode_buffer(data, elem, chunk, compress, threads=2, backend="python")
    nat = encode.encode_buffer(data, elem, chunk, compress, threads=2, backend="native")
    _check_records_decode(data, elem, chunk, py)
    _check_records_decode(data, elem, chunk, nat)
    _same_bytes_or_skip(nat, py)


@NATIVE_SKIP
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(ELEMS),
    st.integers(0, 3000),
    st.integers(1, 64),
    st.sampled_from(["random", "runs", "small"]),
    st.integers(0, 2**32 - 1),
    st.integers(1, 4),
)
def test_encode_identical_property(elem, n_elems, chunk_elems, kind, seed, threads):
    rng = np.random.default_rng(seed)
    n = n_elems * elem
    if kind == "random":
        data = rng.integers(0, 256, n, dtype=np.uint8)
    elif kind == "runs":
        data = np.repeat(rng.integers(0, 256, n // 7 + 1, dtype=np.uint8), 7)[:n]
    else:
        data = rng.integers(0, 4, n, dtype=np.uint8)
    chunk = chunk_elems * elem * 16
    py = encode.encode_buffer(data, elem, chunk, True, threads, "python")
    nat = encode.encode_buffer(data, elem, chunk, True, threads, "native")
    _check_records_decode(data, elem, chunk, py)
    _check_records_decode(data, elem, chunk, nat)
    if SAME_LZ4:  # (no skip inside a property; test_lz4_versions_reported says why)
        assert nat == py
        for i, rec in enumerate(nat):
            assert encode.encode(data[i * chunk : (i + 1) * chunk].tobytes(), elem, True) == rec


@NATIVE_SKIP
@pytest.mark.parametrize("width", ELEMS + [3, 12])
def test_shuffle_identical(width: int):
    data = np.random.default_rng(width).integers(0, 256, width * 1001, dtype=np.uint8).tobytes()
    n = backend.native()
    assert n.shuffle(data, width) == encode.shuffle(data, width)
    assert n.unshuffle(n.shuffle(data, width), width) == data
    assert n.hash128(data) == encode.digest(data)


@pytest.mark.parametrize("be", BACKENDS)
def test_encode_buffer_accepts_tensors_and_views(be: str):
    t = (torch.randn(50_000) * 0.02).to(torch.bfloat16)
    want = encode.encode_buffer(t.view(torch.uint8).numpy().tobytes(), 2, 8192, backend=be)
    assert encode.encode_buffer(t, 2, 8192, backend=be) == want
    assert (
        encode.encode_buffer(memoryview(t.view(torch.uint8).numpy()), 2, 8192, backend=be) == want
    )
    assert encode.encode_buffer(t.view(torch.int16).numpy(), 2, 8192, backend=be) == want
    assert any(c == encode.SHUFFLE_LZ4 for c, _, _ in want)


@pytest.mark.parametrize("be", BACKENDS)
def test_encode_buffer_rejects_bad_arguments(be: str):
    with pytest.raises(ValueError):
        encode.encode_buffer(b"\0" * 10, 4, 64, True, backend=be)  # not whole elements
    with pytest.raises(ValueError):
        encode.encode_buffer(b"\0" * 64, 4, 30, True, backend=be)  # chunk splits elements
    with pytest.raises(ValueError):
        encode.encode_buffer(b"\0" * 64, 0, 64, True, backend=be)
    with pytest.raises(ValueError):
        encode.encode_buffer(b"\0" * 64, 1, 0, True, backend=be)
    with pytest.raises(ValueError):
        encode.encode_buffer(np.zeros((8, 8), np.uint8)[:, ::2], 1, 64, True, backend=be)


# ---- decode into a destination ------------------------------------------------------------


def _items(data: np.ndarray, elem: int, chunk: int) -> list[encode.DecodeItem]:
    recs = encode.encode_buffer(data, elem, chunk, True, 2, "python")
    return [
        encode.DecodeItem(c, p, min(chunk, len(data) - i * chunk), elem, h, i * chunk)
        for i, (c, p, h) in enumerate(recs)
    ]


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("name,data,elem", INPUTS, ids=[x[0] for x in INPUTS])
def test_decode_into_roundtrip(be: str, name: str, data: np.ndarray, elem: int):
    items = _items(data, elem, 4096)
    dest = np.full(len(data), 0xAA, np.uint8)
    encode.decode_into(dest, items, threads=2, backend=be)
    assert dest.tobytes() == data.tobytes()


@pytest.mark.parametrize("be", BACKENDS)
def test_decode_into_torch_destination(be: str):
    src = (torch.randn(10_000) * 0.02).to(torch.bfloat16)
    raw = src.view(torch.uint8).numpy()
    out = torch.empty_like(src)
    encode.decode_into(out, _items(raw, 2, 4096), backend=be)
    assert torch.equal(out, src)


@pytest.mark.parametrize("be", BACKENDS)
def test_decode_into_hash_mismatch_names_chunk(be: str):
    data = _model_like(40_000, torch.float32)
    items = _items(data, 4, 16_384)
    bad = list(items)
    bad[3] = bad[3]._replace(hash=bytes(16))
    with pytest.raises(encode.ChunkHashError) as e:
        encode.decode_into(np.empty(len(data), np.uint8), bad, threads=2, backend=be)
    assert e.value.index == 3
    assert isinstance(e.value, FormatError)
    # Without a hash the chunk is not verified.
    bad[3] = bad[3]._replace(hash=None)
    encode.decode_into(np.empty(len(data), np.uint8), bad, threads=2, backend=be)


def _malformed(items: list[encode.DecodeItem]) -> list[tuple[str, encode.DecodeItem]]:
    lz = next(it for it in items if it.codec == encode.SHUFFLE_LZ4)
    raw = next(it for it in items if it.codec == encode.RAW)
    p = bytes(lz.payload)
    return [
        ("truncated", lz._replace(payload=p[: len(p) // 2])),
        ("empty", lz._replace(payload=b"")),
        ("garbage", lz._replace(payload=bytes([0xF0]) + p[1:])),
        ("extra", lz._replace(payload=p + b"\x00" * 9)),
        ("short raw_len", lz._replace(raw_len=lz.raw_len - lz.elem_size)),
        ("bad codec", lz._replace(codec=7)),
        ("codec 255", raw._replace(codec=255)),
        ("elem 0", lz._replace(elem_size=0)),
        ("elem 3", lz._replace(elem_size=3)),
        ("raw too short", raw._replace(payload=bytes(raw.payload)[:-1])),
        ("raw as lz4", raw._replace(codec=encode.SHUFFLE_LZ4)),
        ("lz4 as raw", lz._replace(codec=encode.RAW)),
    ]


@pytest.mark.parametrize("be", BACKENDS)
def test_decode_into_malformed_records_raise_typed_errors(be: str):
    rng = np.random.default_rng(5)
    data = np.concatenate(
        [rng.integers(0, 4, 32768, np.uint8), rng.integers(0, 256, 32768, np.uint8)]
    )
    items = _items(data, 4, 32768)
    for name, bad in _malformed(items):
        for pos in (0, len(items) - 1):
            case = list(items)
            case[pos] = bad._replace(dest_offset=items[pos].dest_offset)
            if case[pos].raw_len > len(data) - case[pos].dest_offset:
                continue
            dest = np.empty(len(data), np.uint8)
            with pytest.raises(encode.ChunkError) as e:
                encode.decode_into(dest, case, threads=2, backend=be)
            assert e.value.index == pos, name


@pytest.mark.parametrize("be", BACKENDS)
def test_decode_into_refuses_chunks_outside_destination(be: str):
    data = np.arange(4096, dtype=np.uint8)
    items = _items(data, 1, 1024)
    for bad in (
        items[3]._replace(dest_offset=3500),
        items[0]._replace(raw_len=1 << 62),
        items[1]._replace(dest_offset=1 << 40),
    ):
        with pytest.raises(encode.ChunkError):
            encode.decode_into(np.empty(4096, np.uint8), [items[0], bad], backend=be)
    with pytest.raises(ValueError):
        encode.decode_into(b"\0" * 4096, items, backend=be)  # read-only destination


@pytest.mark.parametrize("be", BACKENDS)
def test_decode_single_chunk_errors(be: str):
    data = np.random.default_rng(2).integers(0, 4, 16384, dtype=np.uint8)
    payload = encode.encode_buffer(data, 4, 1 << 20, backend="python")
    cid, p, _ = payload[0]
    assert cid == encode.SHUFFLE_LZ4
    with pytest.raises(FormatError):
        encode.decode(cid, p[:-5], 16384, 4, backend=be)
    with pytest.raises(FormatError):
        encode.decode(cid, p, 1 << 50, 4, backend=be)  # refused before allocating
    with pytest.raises(FormatError):
        encode.decode(9, p, 16384, 4, backend=be)
    with pytest.raises(FormatError):
        encode.decode(encode.RAW, p, 16384, 4, backend=be)


# ---- records on disk ----------------------------------------------------------------------


def _write(path: str, be: str, data, elem: int, chunk: int, compress=True, direct=False, pos=4096):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, b"H" * pos, 0)
        res = io.write_records(fd, path, pos, 5, data, elem, chunk, compress, 2, direct, be)
        assert os.lseek(fd, 0, os.SEEK_CUR) == res.end
    finally:
        os.close(fd)
    return res


@NATIVE_SKIP
@pytest.mark.parametrize("name,data,elem", INPUTS, ids=[x[0] for x in INPUTS])
def test_write_records_identical_files(tmp_path, name: str, data: np.ndarray, elem: int):
    a, b = str(tmp_path / "py.ckg"), str(tmp_path / "nat.ckg")
    ra = _write(a, "python", data, elem, 16384)
    rb = _write(b, "native", data, elem, 16384)
    for path, res in ((a, ra), (b, rb)):
        assert os.path.getsize(path) == res.end
        pos = 4096
        for r in res.records:
            assert r.offset == pos
            pos += align(64 + r.stored_len)
        _check_cross_read(path, res, data, elem, 16384)
    _same_bytes_or_skip(
        (ra.records, ra.end, Path(a).read_bytes()), (rb.records, rb.end, Path(b).read_bytes())
    )


def _check_cross_read(path: str, res: io.WriteResult, data: np.ndarray, elem: int, chunk: int):
    """A file written by either path reads back, on both paths, to the bytes it was made of."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for be in ("python", "native"):
            dest = np.full(len(data), 0xAA, np.uint8)
            io.read_records(fd, path, dest, _read_items(res, elem, chunk), 2, True, be)
            assert dest.tobytes() == data.tobytes(), be
    finally:
        os.close(fd)


def _direct_opens(directory: str) -> bool:
    probe = os.path.join(directory, f"ckg-probe-{os.getpid()}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o644))
        return hasattr(os, "O_DIRECT")
    except OSError:
        return False
    finally:
        if os.path.exists(probe):
            os.unlink(probe)


@NATIVE_SKIP
@pytest.mark.parametrize("where", ["tmp", "shm"])
@pytest.mark.parametrize("refused", [False, True])
def test_write_records_direct_io_or_fallback(tmp_path, where: str, refused: bool):
    if where == "shm" and not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    base = str(tmp_path) if where == "tmp" else "/dev/shm"
    data = _model_like(600_000, torch.bfloat16)
    a = os.path.join(base, f"ckg-direct-{os.getpid()}-a")
    b = os.path.join(base, f"ckg-direct-{os.getpid()}-b")
    n = backend.native()
    if refused and not _direct_opens(base):
        pytest.skip(f"{base} refuses O_DIRECT at open (the fallback is taken there anyway)")
    try:
        if refused:  # the first O_DIRECT write is refused (EINVAL): buffered from then on
            n._inject_io_error(errno.EINVAL, 0)
        ra = _write(a, "native", data, 2, 1 << 18, direct=True)
        rb = _write(b, "python", data, 2, 1 << 18)
        if refused:
            assert ra.direct is False
        _check_cross_read(a, ra, data, 2, 1 << 18)
        _check_cross_read(b, rb, data, 2, 1 << 18)
        same = (ra.records, Path(a).read_bytes()) == (rb.records, Path(b).read_bytes())
    finally:
        n._inject_io_error(0)
        for p in (a, b):
            if os.path.exists(p):
                os.unlink(p)
    _same_bytes_or_skip(same, True)


@pytest.mark.parametrize("be", BACKENDS)
def test_write_records_enospc_is_typed_oserror(be: str):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            io.write_records(fd, "/dev/full", 0, 0, b"x" * 100_000, 1, 8192, backend=be)
    finally:
        os.close(fd)
    assert e.value.errno == errno.ENOSPC
    assert e.value.filename == "/dev/full"


@NATIVE_SKIP
def test_write_records_injected_eio(tmp_path):
    path = str(tmp_path / "f.ckg")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    n = backend.native()
    try:
        n._inject_io_error(errno.EIO, 3)
        with pytest.raises(OSError) as e:
            io.write_records(fd, path, 0, 0, b"y" * 100_000, 1, 8192, backend="native")
    finally:
        n._inject_io_error(0)
        os.close(fd)
    assert e.value.errno == errno.EIO and e.value.filename == path


class _EIOPread:
    """``os`` as ckptguard.io sees it (every record and header read of load and verify), but
    ``pread`` of a data file (``*.ckg``) fails with EIO."""

    def __getattr__(self, name: str):
        return getattr(os, name)

    @staticmethod
    def pread(fd: int, n: int, offset: int) -> bytes:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".ckg"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return os.pread(fd, n, offset)


def _saved_checkpoint(tmp_path: Path) -> tuple[str, str]:
    """A small committed checkpoint of several records, and its data file's name."""
    state = {"w": _model_like(40_000, torch.float32), "ids": torch.arange(9_000)}
    path = ckptguard.save(state, str(tmp_path / "c"), chunk_size=16384).path
    return path, next(n for n in sorted(os.listdir(path)) if n.endswith(".ckg"))


@pytest.mark.parametrize("be", BACKENDS)
def test_load_read_eio_is_store_error_naming_file(tmp_path, monkeypatch, be: str):
    """EIO while reading a data file's records (native: the I/O fault hook; Python: os.pread) is
    a StoreError with errno and the file's path, not CorruptCheckpointError; so is an EIO in
    verify's reads."""
    path, name = _saved_checkpoint(tmp_path)
    with backend.use(be):
        if be == "native":
            backend.native()._inject_io_error(errno.EIO, 1)  # the second record read
        else:
            monkeypatch.setattr(io, "os", _EIOPread())
        try:
            with pytest.raises(ckptguard.StoreError) as e:
                ckptguard.load(path)
        finally:
            if be == "native":
                backend.native()._inject_io_error(0)
    err = e.value
    assert type(err) is ckptguard.StoreError, err  # neither "full" nor "not writable"
    assert err.errno == errno.EIO and err.path == os.path.join(path, name) and err.file == name
    assert os.path.join(path, name) in str(err)
    monkeypatch.setattr(io, "os", os)
    assert ckptguard.load(path)["ids"].equal(torch.arange(9_000))  # the hook was used up
    monkeypatch.setattr(io, "os", _EIOPread())
    with pytest.raises(ckptguard.StoreError) as e:
        ckptguard.verify(path)
    assert e.value.errno == errno.EIO and e.value.file == name


_UNREADABLE_CHILD = r"""
import json, sys
import ckptguard
from ckptguard import backend
out = {}
for be in sys.argv[2:]:
    with backend.use(be):
        try:
            ckptguard.load(sys.argv[1])
            out[be] = None
        except Exception as e:
            out[be] = [type(e).__name__, isinstance(e, ckptguard.StoreError),
                       *(getattr(e, a, None) for a in ("errno", "path", "file"))]
print(json.dumps(out))
"""


def test_load_unreadable_data_file_is_store_error(tmp_path):
    """A data file this process may not read (chmod 000; as root, without the capabilities that
    bypass mode bits, as tests/test_resource_faults.py does): StoreNotWritableError with EACCES
    and the file's path on both backends, not CorruptCheckpointError."""
    path, name = _saved_checkpoint(tmp_path)
    cmd = [sys.executable, "-c", _UNREADABLE_CHILD, path, "python"]
    cmd += ["native"] if backend.available() else []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root without setpriv: mode bits cannot be made to apply")
        cmd = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]
    data_file = os.path.join(path, name)
    os.chmod(data_file, 0o000)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    finally:
        os.chmod(data_file, 0o644)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    for be, got in out.items():
        assert got == ["StoreNotWritableError", True, errno.EACCES, data_file, name], (be, got)


def _read_items(res: io.WriteResult, elem: int, chunk: int) -> list[encode.ReadItem]:
    return [
        encode.ReadItem(
            r.offset,
            align(64 + r.stored_len),
            r.codec,
            elem,
            r.raw_len,
            r.stored_len,
            r.hash,
            i * chunk,
            5 + i,
        )
        for i, r in enumerate(res.records)
    ]


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("writer", BACKENDS)
def test_read_records_roundtrip(tmp_path, be: str, writer: str):
    data = _model_like(300_000, torch.bfloat16)
    path = str(tmp_path / "r.ckg")
    res = _write(path, writer, data, 2, 65536)
    dest = np.zeros(len(data), np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        io.read_records(fd, path, dest, _read_items(res, 2, 65536), threads=2, backend=be)
    finally:
        os.close(fd)
    assert dest.tobytes() == data.tobytes()


@pytest.mark.parametrize("be", BACKENDS)
def test_read_records_detects_damage(tmp_path, be: str):
    data = _model_like(100_000, torch.float32)
    path = str(tmp_path / "r.ckg")
    res = _write(path, "python", data, 4, 65536)
    items = _read_items(res, 4, 65536)
    good = Path(path).read_bytes()

    def attempt(content: bytes, its=items) -> None:
        with open(path, "wb") as f:
            f.write(content)
        fd = os.open(path, os.O_RDONLY)
        try:
            io.read_records(fd, path, np.empty(len(data), np.uint8), its, 2, True, be)
        finally:
            os.close(fd)

    r2 = res.records[2]
    flip = bytearray(good)
    flip[r2.offset + 64 + r2.stored_len // 2] ^= 0x40
    with pytest.raises(encode.ChunkError) as e:  # LZ4 garbage or a hash mismatch
        attempt(bytes(flip))
    assert e.value.index == 2
    pad = bytearray(good)
    pad[r2.offset + 64 + r2.stored_len] = 1
    with pytest.raises(encode.ChunkError, match="padding") as e:
        attempt(bytes(pad))
    assert e.value.index == 2 and not isinstance(e.value, encode.ChunkHashError)
    hdr = bytearray(good)
    hdr[r2.offset + 1] ^= 1
    with pytest.raises(encode.ChunkError) as e:
        attempt(bytes(hdr))
    assert e.value.index == 2
    with pytest.raises(encode.ChunkError, match="truncated") as e:
        attempt(good[: res.records[-1].offset + 100])
    assert e.value.index == len(items) - 1
    wrong_seq = [*items[:1], items[1]._replace(seq=99), *items[2:]]
    with pytest.raises(encode.ChunkError) as e:
        attempt(good, wrong_seq)
    assert e.value.index == 1
    raw_rec = next(i for i, r in enumerate(res.records) if r.codec == encode.RAW)
    if raw_rec is not None:  # a raw chunk with a flipped byte decodes, then fails its hash
        rr = res.records[raw_rec]
        body = bytearray(good)
        body[rr.offset + 64 + 10] ^= 0x01
        with pytest.raises(encode.ChunkHashError) as e:
            attempt(bytes(body))
        assert e.value.index == raw_rec


# ---- save / load end to end ---------------------------------------------------------------


def _state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "emb": (torch.randn(300, 512, generator=g) * 0.02).to(torch.bfloat16),
        "w": torch.randn(257, 129, generator=g),
        "ids": torch.arange(70_000, dtype=torch.int64),
        "mask": torch.rand(1000, generator=g) > 0.5,
        "step": 7,
    }


def _record_region(ckpt: str) -> tuple[bytes, list]:
    from ckptguard.open import CheckpointReader

    with CheckpointReader(ckpt) as rd:
        rows = [(r.key, r.offset, r.stored_len, r.codec, r.hash) for r in rd.rows]
        name = next(iter(rd.files))
        data = Path(os.path.join(ckpt, name)).read_bytes()
        end = max(r.extent for r in rd.rows)
        return data[4096:end], rows


@NATIVE_SKIP
def test_save_identical_files_and_cross_load(tmp_path):
    state = _state()
    paths = {}
    for be in ("python", "native"):
        with backend.use(be):
            paths[be] = ckptguard.save(
                state, str(tmp_path / "s" / be), chunk_size=65536, compress="lz4"
            ).path
    for writer, reader in [("python", "native"), ("native", "python")]:
        with backend.use(reader):
            out = ckptguard.load(paths[writer])
        assert out["step"] == 7
        for k in ("emb", "w", "ids", "mask"):
            assert torch.equal(out[k], state[k]), (writer, reader, k)
    _same_bytes_or_skip(_record_region(paths["python"]), _record_region(paths["native"]))


@NATIVE_SKIP
def test_native_is_default_and_switchable():
    assert backend.active() and backend.name() == "native"
    with backend.use("python"):
        assert backend.name() == "python" and not backend.active()
        assert "pure Python" in backend.reason()
    assert backend.name() == "native"
    with pytest.raises(ValueError):
        backend.resolve("fortran")


# ---- the switch, threads, doctor ------------------------------------------------------------


def _probe(env: dict[str, str], block_native: bool = False) -> subprocess.CompletedProcess:
    code = (
        ("import sys; sys.modules['ckptguard._native'] = None\n" if block_native else "")
        + "from ckptguard import backend\n"
        + "print(backend.name()); print(backend.reason()); print(backend.default_threads())"
    )
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTGUARD_", "SLURM_"))}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120
    )


def test_env_forces_python():
    p = _probe({"CKPTGUARD_NATIVE": "0"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[:2] == ["python", "pure Python: forced by CKPTGUARD_NATIVE=0"]


def test_missing_extension_falls_back_with_reason():
    p = _probe({}, block_native=True)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "python" and "cannot be imported" in lines[1]


def test_env_requires_native_fails_loudly_when_missing():
    p = _probe({"CKPTGUARD_NATIVE": "1"}, block_native=True)
    assert p.returncode != 0
    assert "NativeUnavailableError" in p.stderr and "CKPTGUARD_NATIVE=1" in p.stderr


def test_env_rejects_unknown_value():
    p = _probe({"CKPTGUARD_NATIVE": "maybe"})
    assert p.returncode != 0 and "CKPTGUARD_NATIVE" in p.stderr


@NATIVE_SKIP
def test_env_requires_native():
    p = _probe({"CKPTGUARD_NATIVE": "1"})
    assert p.returncode == 0 and p.stdout.splitlines()[0] == "native"


def test_thread_count_sources():
    cpus = len(os.sched_getaffinity(0))
    assert int(_probe({}).stdout.splitlines()[2]) == cpus
    assert int(_probe({"SLURM_CPUS_PER_TASK": "1"}).stdout.splitlines()[2]) == 1
    assert int(_probe({"SLURM_CPUS_PER_TASK": "999"}).stdout.splitlines()[2]) == cpus
    assert int(_probe({"CKPTGUARD_THREADS": "3"}).stdout.splitlines()[2]) == 3
    backend.set_threads(5)
    try:
        assert backend.default_threads() == 5
    finally:
        backend.set_threads(None)


# ---- threads, GIL, fork -------------------------------------------------------------------


@NATIVE_SKIP
def test_concurrent_callers_get_the_same_bytes():
    data = _model_like(400_000, torch.bfloat16)
    want = encode.encode_buffer(data, 2, 32768, True, 2, "python")
    results: list = [None] * 4

    def run(i: int) -> None:
        results[i] = encode.encode_buffer(data, 2, 32768, True, 3, "native")

    ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(r == results[0] for r in results)
    _check_records_decode(data, 2, 32768, results[0])
    _same_bytes_or_skip(results[0], want)


_FORK_DATA = np.random.default_rng(9).integers(0, 4, 300_000, dtype=np.uint8)


def _child_encode(q) -> None:  # a forked child, after the parent used the pool (no torch here)
    q.put(encode.encode_buffer(_FORK_DATA, 2, 16384, True, 2, "native"))


@NATIVE_SKIP
def test_pool_survives_fork():
    want = encode.encode_buffer(_FORK_DATA, 2, 16384, True, 2, "native")
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_encode, args=(q,))
    p.start()
    try:
        got = q.get(timeout=60)
    finally:
        p.join(timeout=60)
        if p.exitcode is None:
            p.kill()
    assert p.exitcode == 0 and got == want
