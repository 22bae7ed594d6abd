"""Round-trips: every supported value and dtype comes back exactly, through both codecs."""

from __future__ import annotations

import collections
import math
import random
import uuid

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptguard
from ckptguard.tree import TORCH_DTYPES

COMPRESS = ["lz4", "none"]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t


def same(a, b) -> bool:
    """Deep equality that treats tensors/arrays bytewise and nan == nan."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and type(a) is type(b)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.requires_grad == b.requires_grad
            and torch.equal(_bytes(a), _bytes(b))
        )
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.tobytes() == b.tobytes()
            and a.shape == b.shape
        )
    if isinstance(a, np.generic):
        return type(a) is type(b) and a.tobytes() == b.tobytes()
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def roundtrip(tmp_path, obj, **kw):
    name = f"c{uuid.uuid4().hex}"
    ckptguard.save(obj, tmp_path / name, **kw)
    return ckptguard.load(tmp_path / name)


def _all_dtype_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for dt, name in TORCH_DTYPES.items():
        base = torch.randn(37, 5, generator=g) * 3
        if name == "bool":
            t = base > 0
        elif name == "complex32":
            t = torch.randn(37, 5, dtype=torch.complex64, generator=g).to(torch.complex32)
        elif name.startswith("complex"):
            t = torch.randn(37, 5, dtype=dt, generator=g)
        elif name.startswith(("int", "uint")):
            t = (base * 1000).to(torch.int64).to(dt)
        else:
            t = base.to(dt)
        out[name] = t
    return out


@pytest.mark.parametrize("compress", COMPRESS)
def test_every_dtype_and_shape(tmp_path, compress):
    state = _all_dtype_tensors()
    state["scalar"] = torch.tensor(2.5)
    state["empty"] = torch.empty(0, 7)
    state["empty_bf16"] = torch.empty(3, 0, dtype=torch.bfloat16)
    state["noncontig"] = torch.arange(60.0).reshape(6, 10).t()
    state["strided"] = torch.arange(100, dtype=torch.int32)[::7]
    state["big"] = torch.randn(3000, 50)  # several chunks with the small chunk size below
    state["np_f64"] = np.linspace(0, 1, 101)
    state["np_u16"] = np.arange(9, dtype=np.uint16).reshape(3, 3)
    state["np_bool"] = np.array([True, False])
    state["np_scalar"] = np.float32(1.5)
    state["np_i64"] = np.int64(-7)
    state["param"] = torch.nn.Parameter(torch.randn(4, 4))
    out = roundtrip(tmp_path, state, compress=compress, chunk_size=16384)
    assert same(state, out)
    assert isinstance(out["param"], torch.nn.Parameter) and out["param"].requires_grad


def test_views_sharing_storage(tmp_path):
    base = torch.arange(20.0)
    state = {"w": base, "tied": base, "view": base[5:10], "t": base.view(4, 5).t()}
    out = roundtrip(tmp_path, state)
    assert out["tied"] is out["w"]  # the same tensor twice stays one tensor
    assert same(out["view"], state["view"]) and same(out["t"], state["t"].contiguous())


def test_conj_and_neg_views_are_resolved(tmp_path):
    z = torch.randn(5, dtype=torch.complex64)
    out = roundtrip(tmp_path, {"c": z.conj()})
    assert torch.equal(out["c"], z.conj().resolve_conj())


def test_plain_values(tmp_path):
    state = {
        "none": None,
        "t": True,
        "f": False,
        "i": -3,
        "big": 2**80,
        "neg_big": -(2**70),
        "fl": 0.1,
        "negzero": -0.0,
        "inf": float("inf"),
        "ninf": float("-inf"),
        "nan": float("nan"),
        "s": "h\u00e9llo/\u2603",
        "b": b"\x00\xff",
        "l": [1, [2, (3,)]],
        "tup": (1, "a", None),
        "intkeys": {1: "a", 2: "b"},
        "dollar": {"$tensor": 5, "x": 1},
        "mixed": {"a": 1, 0: 2},
        "od": collections.OrderedDict([("z", 1), ("a", 2)]),
        "dtype": torch.bfloat16,
        "size": torch.Size([2, 3]),
        "dev": torch.device("cpu"),
        "empty": {},
        "el": [],
        "et": (),
    }
    out = roundtrip(tmp_path, state)
    assert same(state, out)
    assert type(out["od"]) is collections.OrderedDict


def test_model_optimizer_rng_state(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(50, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 50)
    )
    model[2].weight = model[0].weight  # tied weights, as in language models
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = model(torch.randint(0, 50, (4, 8))).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "step": 3,
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        },
    }
    out = roundtrip(tmp_path, state)
    assert same(state, out)
    model2 = torch.nn.Sequential(
        torch.nn.Embedding(50, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 50)
    )
    model2[2].weight = model2[0].weight
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    model2.load_state_dict(out["model"])
    opt2.load_state_dict(out["optim"])
    random.setstate(out["rng"]["python"])
    x = torch.randint(0, 50, (4, 8))
    for m, o in ((model, opt), (model2, opt2)):
        loss = m(x).logsumexp(-1).mean()
        o.zero_grad()
        loss.backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_codecs_store_the_same_values(tmp_path):
    t = torch.randn(2000, 64).bfloat16()
    a = ckptguard.save({"t": t}, tmp_path / "lz4", compress="lz4")
    b = ckptguard.save({"t": t}, tmp_path / "raw", compress="none")
    assert a.stored_bytes < b.stored_bytes == b.raw_bytes == t.numel() * 2
    assert torch.equal(ckptguard.load(tmp_path / "lz4")["t"], ckptguard.load(tmp_path / "raw")["t"])


def test_store_path_loads_latest_and_metadata(tmp_path):
    ckptguard.save({"v": 1}, tmp_path / "a", step=1, metadata={"run": "x", "lr": [1e-3]})
    info = ckptguard.save({"v": 2}, tmp_path / "b", step=2)
    assert ckptguard.load(tmp_path) == {"v": 2}
    assert info.step == 2 and ckptguard.Store(tmp_path).list()[0].metadata == {
        "run": "x",
        "lr": [1e-3],
    }


def test_map_location(tmp_path):
    ckptguard.save({"t": torch.ones(2)}, tmp_path / "a")
    out = ckptguard.load(tmp_path / "a", map_location="cpu")
    assert out["t"].device.type == "cpu"
    out = ckptguard.load(tmp_path / "a", map_location=lambda saved: "cpu")
    assert out["t"].device.type == "cpu"


# --- property-based: random nested trees of supported values ----------------------------------

_DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.int8,
    torch.int64,
    torch.bool,
    torch.float64,
    torch.uint8,
    torch.complex64,
]
_shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    shape = draw(_shapes)
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    raw = torch.randint(
        0, 256, (n * torch.empty((), dtype=dtype).element_size(),), dtype=torch.uint8, generator=g
    )
    t = raw.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
    if dtype == torch.bool:
        t = (raw > 127).reshape(shape) if n else t
    return t


leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    tensors(),
)
trees = st.recursive(
    leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-5, 5)), kids, max_size=4),
    ),
    max_leaves=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(obj=trees, compress=st.sampled_from(COMPRESS))
def test_random_trees_roundtrip(tmp_path, obj, compress):
    assert same(obj, roundtrip(tmp_path, obj, compress=compress, chunk_size=64))
