"""Checkpoints written by ckptguard, read back by the independent reader of docs/format.md."""

from __future__ import annotations

import collections
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
