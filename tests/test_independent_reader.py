"""Checkpoints written by ckptguard, read back by the independent reader of docs/format.md."""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Any

import independent_reader as ir
import numpy as np
import pytest
import torch
from conftest import small_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptguard

DTYPES: list[torch.dtype] = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.uint16,
    torch.int32,
    torch.uint32,
    torch.int64,
    torch.uint64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex32,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def raw_bytes(x: torch.Tensor | np.ndarray) -> bytes:
    """A tensor's elements in C order as little-endian bytes (format.md section 5)."""
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"), copy=False).tobytes()
    return x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def rand_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes of ``dtype`` (bool: 0/1), whatever values they mean."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    size = torch.empty((), dtype=dtype).element_size()
    n = math.prod(shape) * size
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def compressible(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes of ``dtype`` that shuffle+LZ4 compresses well (small repeating values)."""
    if dtype == torch.bool:
        return (torch.arange(math.prod(shape)) % 7 == 0).reshape(shape)
    size = torch.empty((), dtype=dtype).element_size()
    n = math.prod(shape)
    b = torch.zeros(n, size, dtype=torch.uint8)
    b[:, 0] = (torch.arange(n) % 3).to(torch.uint8)
    return b.reshape(-1).view(dtype).reshape(shape)


def save_and_read(
    state: Any, path: str, **kw: Any
) -> tuple[ckptguard.CheckpointInfo, ir.Checkpoint]:
    info = ckptguard.save(state, path, **kw)
    return info, ir.read_checkpoint(path)


def assert_matches(orig: Any, dec: Any, ck: ir.Checkpoint, where: str = "") -> None:
    """The decoded tree ``dec`` is the saved object ``orig`` (tensors compared by bytes)."""
    if isinstance(orig, (torch.Tensor, np.ndarray)):
        assert isinstance(dec, ir.TensorRef), where
        td = ck.by_id[dec.id]
        assert td.data == raw_bytes(orig), f"bytes differ at {where}"
        assert td.shape == tuple(orig.shape), where
        if isinstance(orig, torch.Tensor):
            assert td.dtype == dtype_name(orig.dtype), where
            assert td.kind == "torch" and td.device == str(orig.device), where
            assert td.parameter == isinstance(orig, torch.nn.Parameter), where
            assert td.requires_grad == orig.requires_grad, where
        else:
            assert td.kind == "numpy" and not td.requires_grad and not td.parameter, where
            assert td.dtype == orig.dtype.name, where
        return
    if isinstance(orig, torch.Size):
        assert dec == ir.Size(tuple(orig)), where
    elif isinstance(orig, torch.dtype):
        assert dec == ir.DType(dtype_name(orig)), where
    elif isinstance(orig, torch.device):
        assert dec == ir.Device(str(orig)), where
    elif isinstance(orig, np.generic):
        assert isinstance(dec, ir.NpScalar) and dec.dtype == orig.dtype.name, where
        assert dec.raw == orig.astype(orig.dtype.newbyteorder("<")).tobytes(), where
    elif isinstance(orig, float) and math.isnan(orig):
        assert isinstance(dec, float) and math.isnan(dec), where
    elif isinstance(orig, (list, tuple)):
        assert type(dec) is type(orig) and len(dec) == len(orig), where
        for i, (a, b) in enumerate(zip(orig, dec, strict=True)):
            assert_matches(a, b, ck, f"{where}/{i}")
    elif isinstance(orig, dict):
        is_od = isinstance(orig, collections.OrderedDict)
        assert isinstance(dec, collections.OrderedDict) == is_od, where
        assert list(dec) == list(orig), where
        for k in orig:
            assert type(next(x for x in dec if x == k)) is type(k), where
            assert_matches(orig[k], dec[k], ck, f"{where}/{k}")
    else:
        assert type(dec) is type(orig) and dec == orig, f"{where}: {dec!r} != {orig!r}"


@pytest.mark.parametrize("compress", ["lz4", "zstd", "zstd:-3", "none"])
def test_every_dtype_multichunk(store: str, compress: str) -> None:
    """All dtypes of section 5, random and compressible, contiguous or not, many chunks each."""
    state: dict[str, Any] = {}
    for i, dt in enumerate(DTYPES):
        n = dtype_name(dt)
        state[n] = {
            "rand": rand_tensor(dt, (9, 20), seed=i),
            "flat": compressible(dt, (300,)),
            "strided": rand_tensor(dt, (12, 10), seed=100 + i).t()[::2],
            "scalar": rand_tensor(dt, (), seed=200 + i),
            "empty": rand_tensor(dt, (0, 3)),
        }
    path = os.path.join(store, f"dtypes-{compress.replace(':', '_')}")
    _, ck = save_and_read(state, path, compress=compress, chunk_size=64)
    assert_matches(state, ck.tree, ck)
    # a strided tensor is a view (section 3.2) of a storage of the bytes it reaches
    views = {f"{d}/strided" for d in state}
    storages = {f"{v}%storage" for v in views}
    assert set(ck.tensors) == {f"{d}/{k}" for d in state for k in state[d]} | storages
    assert {k for k, t in ck.tensors.items() if t.view is not None} == views
    codecs = collections.Counter(r["codec"] for r in ck.rows)
    codec = {"lz4": "shuffle-lz4", "none": "raw"}.get(compress, "shuffle-zstd")
    assert set(codecs) <= {"raw", codec} and codecs[codec] > 0
    assert ("zstd" in ck.manifest["features"]) == (codec == "shuffle-zstd")
    for r in ck.rows:
        assert r["raw_len"] <= 64
        if r["codec"] != "raw":  # kept only when it saves at least 5%
            assert r["stored_len"] * 20 <= r["raw_len"] * 19
    # empty tensors have no rows, a 0-d tensor exactly one chunk
    keys = collections.Counter(r["key"] for r in ck.rows)
    for d in state:
        assert keys[f"{d}/empty"] == 0
        assert keys[f"{d}/scalar"] == 1
        want = math.ceil(state[d]["rand"].numel() * ir.DTYPE_SIZES[d] / 64)
        assert keys[f"{d}/rand"] == want


def test_shapes_and_views(store: str) -> None:
    """0-d, empty, zero-sized middle dims, transposes, storage offsets, channels_last."""
    base = torch.arange(4 * 5 * 6 * 7, dtype=torch.float32).reshape(4, 5, 6, 7)
    big = torch.arange(1000, dtype=torch.int32)
    state = {
        "zero_d": torch.tensor(3.5),
        "empty": torch.empty(0),
        "empty_mid": torch.empty(3, 0, 2, dtype=torch.float64),
        "transposed": base.transpose(0, 3),
        "sliced": base[1:3, ::2, :, 5],
        "offset_view": big[500:600],
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
        "neg_strides_like": big.flip(0)[:10],
    }
    _, ck = save_and_read(state, os.path.join(store, "shapes"), chunk_size=128)
    assert_matches(state, ck.tree, ck)
    assert ck.tensors["zero_d"].shape == ()
    assert ck.tensors["empty_mid"].shape == (3, 0, 2)
    np.testing.assert_array_equal(ck.tensors["sliced"].numpy(), state["sliced"].numpy())


def test_large_tensor_default_chunk(store: str) -> None:
    """A tensor over one default chunk (4 MiB) splits on elem_size boundaries."""
    t = torch.randn(1 << 20 | 3)  # 4 MiB + 12 bytes
    _, ck = save_and_read({"t": t}, os.path.join(store, "big"))
    assert len(ck.rows) == 2
    assert ck.tensors["t"].data == raw_bytes(t)


def test_state_dict_metadata_and_quantized_identity(store: str) -> None:
    """Section 6.2: an ``$odict``'s metadata becomes the OrderedDict's ``_metadata``; one
    quantized tensor reached twice decodes as one object, a distinct equal one as another."""
    sd = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).state_dict()
    q = torch.quantize_per_tensor(torch.randn(3), 0.5, 1, torch.quint8)
    r = torch.quantize_per_tensor(q.dequantize(), 0.5, 1, torch.quint8)
    state = {"sd": sd, "q": [q, q, r]}
    _, ck = save_and_read(state, os.path.join(store, "meta"))
    assert ck.tree["sd"]._metadata == collections.OrderedDict(sd._metadata)
    assert_matches(sd, ck.tree["sd"], ck, "sd")
    a, b, c = ck.tree["q"]
    assert a is b and c is not a and c.int_repr != a.int_repr
    assert "tree-types" in ck.manifest["features"]


def test_object_tree(store: str) -> None:
    """Every value kind of section 6, nested, with tied tensors and keys needing escapes."""
    w = torch.randn(4, 3)
    od = collections.OrderedDict([("z", 1), ("a", [2, 3])])
    state = {
        "none": None,
        "flags": [True, False],
        "text": 'héllo \u2603 "quoted" \\ /',
        "ints": [0, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 10**40],
        "floats": [0.0, -0.0, 1.5, 1e-300, 1e300, 0.1, float("inf"), float("-inf"), float("nan")],
        "bytes": [b"", b"\x00\xff\x10abc"],
        "tuple": (1, (2, "x"), ()),
        "int_keys": {1: "one", -5: w, 2**40: "big"},
        "dollar": {"$tensor": 7, "$x": "y"},
        "odict": od,
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "np_scalars": [np.float32(1.25), np.int64(-7), np.bool_(True), np.complex128(1 - 2j)],
        "np_array": np.arange(12, dtype=np.int16).reshape(3, 4),
        "model": {"layers.0.weight": w, "tied": w},
        "odd/key%": torch.ones(2),
        "list": [torch.zeros(1), {"inner": torch.full((2,), 7, dtype=torch.int8)}],
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "grad_leaf": torch.randn(3, requires_grad=True),
        "empty_containers": [[], {}, ()],
    }
    _, ck = save_and_read(state, os.path.join(store, "tree"), metadata={"m": [1, "x"]}, step=42)
    assert_matches(state, ck.tree, ck)
    assert ck.manifest["step"] == 42 and ck.manifest["metadata"] == {"m": [1, "x"]}
    # w appears three times: one tensor id, restored as one tensor
    ids = {ck.tree["int_keys"][-5].id, ck.tree["model"]["layers.0.weight"].id}
    ids.add(ck.tree["model"]["tied"].id)
    assert len(ids) == 1
    keys = set(ck.tensors)
    assert "odd%2Fkey%25" in keys
    assert "list/1/inner" in keys and "list/0" in keys
    assert ck.tensors["param"].parameter and ck.tensors["param"].requires_grad
    assert ck.tensors["grad_leaf"].requires_grad and not ck.tensors["grad_leaf"].parameter
    assert ck.manifest["totals"]["tensors"] == len(ck.by_id)


def test_manifest_fields(store: str) -> None:
    """Members of section 3 a writer must fill in, and the store entries of section 1."""
    path = os.path.join(store, "m-1")
    info, ck = save_and_read(small_state(), path)
    m = ck.manifest
    assert m["name"] == "m-1" and m["uuid"] == info.uuid and m["world_size"] == 1
    assert "ckptguard" in m["writer"]
    assert [f["name"] for f in m["files"]] == ["rank-00000.ckg"]
    assert ir.list_store(store) == ["m-1"]
    assert ir.resolve(store) == path  # LATEST names it
    assert info.chunks == len(ck.rows) and info.tensors == len(ck.by_id)
    assert info.raw_bytes == sum(r["raw_len"] for r in ck.rows)
    # overwrite commits a new checkpoint under the same name
    info2, ck2 = save_and_read(small_state(seed=1), path, overwrite=True)
    assert ck2.manifest["uuid"] == info2.uuid != info.uuid
    assert ck2.tensors["model/w"].data == raw_bytes(small_state(seed=1)["model"]["w"])


def test_root_tensor(store: str) -> None:
    """A bare tensor as the whole state (its key is the empty path)."""
    t = torch.arange(5)
    _, ck = save_and_read(t, os.path.join(store, "root"))
    assert isinstance(ck.tree, ir.TensorRef)
    assert ck.by_id[ck.tree.id].data == raw_bytes(t)


def test_colliding_tensor_keys(store: str) -> None:
    """{1: t, "1": u} gives two tensors the path "1" (format.md section 6 makes keys unique by
    escaping '/' and '%' only). Either both are stored under distinct keys, or the save is refused
    with a typed error and leaves nothing behind."""
    state = {1: torch.ones(2), "1": torch.zeros(2)}
    path = os.path.join(store, "collide")
    try:
        _, ck = save_and_read(state, path)
    except ckptguard.UnsupportedObjectError:
        assert ir.list_store(store) == [] if os.path.isdir(store) else True
        return
    assert_matches(state, ck.tree, ck)
    assert len(ck.tensors) == 2


def test_non_native_numpy_byte_order(store: str) -> None:
    """Big-endian numpy arrays are stored as little-endian bytes (or refused, never misread)."""
    a = np.arange(6, dtype=">i4").reshape(2, 3)
    try:
        _, ck = save_and_read({"a": a}, os.path.join(store, "be"))
    except ckptguard.UnsupportedObjectError:
        return
    np.testing.assert_array_equal(ck.tensors["a"].numpy(), a)


def test_verify_off_still_same_bytes(store: str) -> None:
    """ckptguard.load and the independent reader agree on every tensor."""
    state = {"x": rand_tensor(torch.bfloat16, (7, 9)), "y": compressible(torch.float32, (500,))}
    _, ck = save_and_read(state, os.path.join(store, "agree"), chunk_size=96)
    back = ckptguard.load(os.path.join(store, "agree"))
    for k in state:
        assert raw_bytes(back[k]) == ck.tensors[k].data


_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.integers(min_value=0, max_value=40).map(lambda n: torch.arange(n, dtype=torch.int16)),
)
_keys = st.one_of(st.text(max_size=6), st.integers(min_value=-(2**62), max_value=2**62))
_trees = st.recursive(
    _leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=3).map(tuple),
        st.dictionaries(_keys, kids, max_size=4),
    ),
    max_leaves=12,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=_trees)
def test_random_trees(store: str, tree: Any) -> None:
    """Random nested values round-trip through the independent reader."""
    path = os.path.join(store, "h")
    _, ck = save_and_read({"t": tree}, path, overwrite=True, chunk_size=64)
    assert_matches({"t": tree}, ck.tree, ck)


# ---------------------------------------------------------------- sealed chunks (section 4.4)

KEK_HEX = "a1" * 32
KEK = bytes.fromhex(KEK_HEX)
SCOPES = {"model/*": "a", "opt/*": "b"}


@pytest.fixture
def kek_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """ckptguard takes its key-encryption key from CKPTGUARD_KEK (64 hex digits)."""
    for var in ("CKPTGUARD_KEK_FILE", "CKPTGUARD_KEK_COMMAND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CKPTGUARD_KEK", KEK_HEX)


def sealed_state(seed: int = 0) -> dict[str, Any]:
    """Two scopes and the clear: every dtype, multi-chunk tensors (at chunk_size 64 KiB),
    compressible ones, and many tiny tensors (packed records) in each."""
    model: dict[str, Any] = {}
    for i, dt in enumerate(DTYPES):
        model[dtype_name(dt)] = rand_tensor(dt, (33, 17), seed=seed + i)
    model["big"] = rand_tensor(torch.float32, (256, 300), seed=seed + 50)  # 5 chunks
    model["flat"] = compressible(torch.float32, (40000,))  # 3 chunks, compressible
    model.update(
        {f"s{i}": rand_tensor(torch.float32, (7,), seed=seed + 100 + i) for i in range(30)}
    )
    opt = {f"s{i}": rand_tensor(torch.int64, (3,), seed=seed + 200 + i) for i in range(30)}
    opt["m"] = compressible(torch.bfloat16, (70000,))
    opt["h"] = rand_tensor(torch.float16, (50000,), seed=seed + 300)
    plain = {f"s{i}": rand_tensor(torch.int16, (5,), seed=seed + 400 + i) for i in range(10)}
    plain["x"] = rand_tensor(torch.float64, (20000,), seed=seed + 500)
    return {"model": model, "opt": opt, "plain": plain, "step": 3}


def assert_same_as_load(path: str, ck: ir.Checkpoint, scopes: set[str]) -> None:
    """Every tensor of the scopes in ``scopes`` (and the clear) has ckptguard.load's bytes; the
    others are reported unreadable with their scope."""
    back = ckptguard.load(path, shredded="meta")
    for group in ("model", "opt", "plain"):
        scope = {"model": "a", "opt": "b"}.get(group)
        for k, v in back[group].items():
            td = ck.tensors[f"{group}/{k}"]
            assert td.scope == scope
            if scope is None or scope in scopes:
                assert td.data is not None and td.data == raw_bytes(v), (group, k)
                assert td.unreadable is None
            else:
                assert td.data is None and td.unreadable, (group, k)
                with pytest.raises(ir.SealedUnreadable, match=repr(scope)):
                    td.numpy()


@pytest.mark.parametrize("compress", ["none", "lz4", "zstd"])
def test_sealed_round_trip(store: str, kek_env: None, compress: str) -> None:
    """Sealed records of two scopes (packed, multi-chunk, compressed, digests) decrypt to the
    bytes ckptguard.load returns; without the key every stored byte still checks."""
    state = sealed_state()
    path = os.path.join(store, f"sealed-{compress}")
    ckptguard.save(state, path, encrypt=SCOPES, chunk_size=1 << 16, compress=compress, digests=True)
    ck = ir.read_checkpoint(path, kek=KEK)
    assert {"encryption", "digests", "packed-records"} <= set(ck.manifest["features"])
    scopes = {k["scope"]: k["key_id"] for k in ck.manifest["encryption"]["keys"]}
    assert set(scopes) == {"a", "b"} and ck.unreadable == {}
    assert_same_as_load(path, ck, {"a", "b"})
    assert_matches(state, ck.tree, ck)
    sealed = [r for r in ck.rows if r["key_id"] is not None]
    for r in ck.rows:
        group = r["key"].split("/")[0]
        assert r["key_id"] == {"model": scopes["a"], "opt": scopes["b"]}.get(group)
    # what the test is meant to cover is there: packed and multi-chunk sealed records, and
    # (when asked) compressed sealed payloads
    assert any(r["record_raw_len"] > r["raw_len"] for r in sealed)
    assert any(r["chunk"] > 0 for r in sealed)
    codecs = {r["codec"] for r in sealed}
    assert codecs == {"raw"} if compress == "none" else len(codecs) == 2
    # without the key-encryption key: stored bytes checked, sealed tensors unreadable
    keyless = ir.read_checkpoint(path)
    assert set(keyless.unreadable) == {"a", "b"}
    assert all("key-encryption key" in why for why in keyless.unreadable.values())
    assert_same_as_load(path, keyless, set())
    # another key-encryption key: the same, the reason says so
    other = ir.read_checkpoint(path, kek=bytes.fromhex("b2" * 32))
    assert all("another key-encryption key" in w for w in other.unreadable.values())


def test_sealed_incremental(store: str, kek_env: None) -> None:
    """An incremental save links sealed records of its base: the linked rows keep their key_id,
    open under the holder's record key and authenticate with their associated data."""
    state = sealed_state()
    kw: dict[str, Any] = {"encrypt": SCOPES, "chunk_size": 1 << 16, "digests": True}
    ckptguard.save(state, os.path.join(store, "c1"), **kw)
    state["opt"]["h"] += 1
    state["model"]["big"][0] += 1
    path = os.path.join(store, "c2")
    ckptguard.save(state, path, base="c1", **kw)
    ck = ir.read_checkpoint(path, kek=KEK)
    linked = [r for r in ck.rows if r["base"] is not None]
    assert {r["key_id"] is not None for r in linked} == {True, False}
    assert any(r["key"] == "model/big" for r in linked)  # the chunks after the changed row
    assert all(r["key"] != "opt/h" for r in linked)
    assert "incremental" in ck.manifest["features"]
    assert_same_as_load(path, ck, {"a", "b"})
    assert_matches(state, ck.tree, ck)
    assert set(ir.read_checkpoint(path).unreadable) == {"a", "b"}


def test_sealed_shredded_scope(store: str, kek_env: None) -> None:
    """After shredding scope a: its tensors are unreadable (the tombstone says so), scope b and
    the clear still read and verify."""
    path = os.path.join(store, "c")
    ckptguard.save(sealed_state(), path, encrypt=SCOPES, chunk_size=1 << 16, digests=True)
    ckptguard.keyring.shred(store, "a", reason="erasure request")
    ck = ir.read_checkpoint(path, kek=KEK)
    assert list(ck.unreadable) == ["a"] and "shredded" in ck.unreadable["a"]
    assert_same_as_load(path, ck, {"b"})
    keyless = ir.read_checkpoint(path)
    assert set(keyless.unreadable) == {"a", "b"} and "shredded" in keyless.unreadable["a"]


def _sealed_one(store: str, name: str = "t") -> tuple[str, dict[str, Any]]:
    """A checkpoint of one sealed tensor in one raw record, and that record's index row."""
    path = os.path.join(store, name)
    ckptguard.save({"w": torch.randn(4096)}, path, encrypt="s", compress="none")
    (row,) = ir.read_checkpoint(path).rows
    return path, row


def _patch_record(path: str, row: dict[str, Any], at: int, xor: int, header: bool) -> None:
    """XOR one byte of the record at ``at`` (from its header's start); ``header``: then set the
    header's stored-payload hash and its xxh3-64 as a forger without the key can."""
    import struct

    import xxhash

    f = os.path.join(path, row["file"])
    os.chmod(path, 0o755)
    os.chmod(f, 0o644)
    with open(f, "r+b") as fh:
        data = bytearray(fh.read())
        data[row["offset"] + at] ^= xor
        hdr = row["offset"]
        if header:
            payload = bytes(data[hdr + 64 : hdr + 64 + row["stored_len"]])
            data[hdr + 24 : hdr + 40] = xxhash.xxh3_128(payload).digest()
        struct.pack_into(
            "<Q", data, hdr + 56, xxhash.xxh3_64_intdigest(bytes(data[hdr : hdr + 56]))
        )
        fh.seek(0)
        fh.write(data)


def test_tampered_sealed_record_fails_authentication(store: str, kek_env: None) -> None:
    """A flipped ciphertext byte under a recomputed header hash passes every keyless check and
    fails authentication with the key; without the recomputation it fails as stored."""
    path, row = _sealed_one(store)
    _patch_record(path, row, 64 + 10, 0x01, header=True)
    assert ir.read_checkpoint(path).unreadable  # keyless checks cannot see it
    with pytest.raises(ir.SpecViolation, match="authenticate"):
        ir.read_checkpoint(path, kek=KEK)
    path, row = _sealed_one(store, "t2")
    _patch_record(path, row, 64 + 10, 0x01, header=False)
    with pytest.raises(ir.SpecViolation, match="stored payload"):
        ir.read_checkpoint(path)


@pytest.mark.parametrize("at,xor,match", [(6, 0x01, "in the clear"), (6, 0x03, "flags")])
def test_sealed_header_flags(store: str, kek_env: None, at: int, xor: int, match: str) -> None:
    """A sealed record's flag cleared (under a row with a key_id) or set to 2: refused."""
    path, row = _sealed_one(store)
    _patch_record(path, row, at, xor, header=False)
    with pytest.raises(ir.SpecViolation, match=match):
        ir.read_checkpoint(path)


def test_damaged_keyring_entry(store: str, kek_env: None) -> None:
    """A keyring entry whose wrap does not authenticate is damage (section 1.1), not a missing
    key."""
    path, _ = _sealed_one(store)
    (entry,) = [e for e in os.listdir(os.path.join(store, ".keys")) if e.endswith(".json")]
    f = os.path.join(store, ".keys", entry)
    with open(f) as fh:
        doc = json.loads(fh.read())
    assert entry == ir.scope_id("s") + ".json" and doc["kek_id"] == ir.kek_id(KEK)
    doc["wrapped"] = ("0" if doc["wrapped"][0] != "0" else "1") + doc["wrapped"][1:]
    os.chmod(f, 0o600)
    with open(f, "w") as fh:
        fh.write(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")
    assert ir.read_checkpoint(path).unreadable == {"s": "no key-encryption key"}
    with pytest.raises(ir.KeyringViolation, match="authenticate"):
        ir.read_checkpoint(path, kek=KEK)


def _surrogate_scope(store: str) -> str:
    """A sealed checkpoint whose manifest names its scope with a lone surrogate (a JSON escape
    that is no Unicode character, so no UTF-8 and no scope id), checksum recomputed."""
    path, _ = _sealed_one(store)
    raw = ir.read_manifest_bytes(path)
    _, a, b = ir.manifest_span(raw)
    body = raw[a:b].replace(b'"scope":"s"', b'"scope":"\\ud800"')
    assert body != raw[a:b]
    f = os.path.join(path, ir.MANIFEST)
    os.chmod(path, 0o755)
    os.chmod(f, 0o644)
    with open(f, "wb") as fh:
        fh.write(ir.frame_manifest(body))
    return path


def test_lone_surrogate_scope_is_refused(store: str, kek_env: None) -> None:
    with pytest.raises(ir.SpecViolation, match="bad scope name"):
        ir.read_checkpoint(_surrogate_scope(store), kek=KEK)


def test_lone_surrogate_scope_is_corrupt_for_ckptguard(store: str, kek_env: None) -> None:
    path = _surrogate_scope(store)
    with pytest.raises(ckptguard.CorruptCheckpointError):
        ckptguard.load(path)
    report = ckptguard.verify(path)
    assert not report.ok
