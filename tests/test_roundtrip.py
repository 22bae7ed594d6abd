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
from ckptguard.tree import NUMPY_BY_NAME, TORCH_DTYPES

COMPRESS = ["lz4", "zstd", "none"]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    # a fresh contiguous copy: .contiguous() may keep odd strides on size-1 dims, which .view()
    # then refuses
    t = (
        t.detach()
        .resolve_conj()
        .resolve_neg()
        .reshape(-1)
        .clone(memory_format=torch.contiguous_format)
    )
    # empty: no bytes (dtype and shape are compared apart; equal_cpu lacks e.g. ComplexHalf)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


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
    assert out["t"].stride() == (1, 5) and out["view"].data_ptr() == out["w"].data_ptr() + 20
    out["w"][6] = -1  # views of one storage load sharing it (format.md section 3.2)
    assert out["view"][1] == -1 and out["t"][1, 1] == -1


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
# Everything issue point 5 lists: every torch dtype the format maps (format/dtypes.py, incl. the
# float8 types, complex32/64/128, bool, uint16/32/64), 0-d and empty tensors, non-contiguous views
# (transposes, permutes, step slices, expands, conj), several views of one tensor in one tree,
# numpy arrays and scalars of every supported numpy dtype, and the plain leaves and containers.

_TORCH_DTYPES = list(TORCH_DTYPES)
_NP_DTYPES = sorted(NUMPY_BY_NAME)
_FLOAT_SPECIALS = [0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 1e-40, -3.5, 65504.0]
_MAX_ELEMS = 48  # small tensors keep the test fast (chunk_size=64 still cuts many into chunks)
_shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).filter(
    lambda s: math.prod(s) <= _MAX_ELEMS
)


def _random_tensor(dtype: torch.dtype, shape: list[int], seed: int, specials: bool) -> torch.Tensor:
    """A contiguous tensor of random bit patterns (NaN payloads and all), or of special values."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    if dtype == torch.bool:
        return (torch.randint(0, 2, (n,), dtype=torch.uint8, generator=g) == 1).reshape(shape)
    if specials and dtype.is_floating_point:
        pick = torch.randint(0, len(_FLOAT_SPECIALS), (n,), generator=g)
        return torch.tensor(_FLOAT_SPECIALS, dtype=torch.float64)[pick].to(dtype).reshape(shape)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


@st.composite
def _strided(draw, t: torch.Tensor) -> torch.Tensor:
    """``t`` itself or a non-contiguous view of it."""
    kinds = ["same", "expand"]
    if t.dim() >= 1:
        kinds += ["step", "narrow"]
    if t.dim() >= 2:
        kinds += ["transpose", "permute"]
    if t.dtype in (torch.complex64, torch.complex128):
        kinds += ["conj"]
    kind = draw(st.sampled_from(kinds))
    if kind == "expand":
        return t.unsqueeze(0).expand(draw(st.integers(0, 3)), *t.shape)
    if kind in ("step", "narrow"):
        d = draw(st.integers(0, t.dim() - 1))
        start = draw(st.integers(0, 1))
        step = draw(st.integers(2, 3)) if kind == "step" else 1
        return t[(slice(None),) * d + (slice(start, None, step),)]
    if kind == "transpose":
        i, j = draw(st.permutations(range(t.dim())))[:2]
        return t.transpose(i, j)
    if kind == "permute":
        return t.permute(*draw(st.permutations(range(t.dim()))))
    if kind == "conj":
        return t.conj()
    return t


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(_TORCH_DTYPES))
    t = _random_tensor(dtype, draw(_shapes), draw(st.integers(0, 2**31)), draw(st.booleans()))
    return draw(_strided(t))


@st.composite
def view_families(draw):
    """Several views of one tensor (the tensor itself, possibly twice), to sit in one tree."""
    dtype = draw(st.sampled_from(_TORCH_DTYPES))
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    base = _random_tensor(dtype, shape, draw(st.integers(0, 2**31)), draw(st.booleans()))
    makers = [
        lambda: base,
        lambda: base.reshape(-1),
        lambda: base[0],  # drops a dim; 0-d when base is 1-d
        lambda: base.view(torch.uint8),  # the same bytes, another dtype
        lambda: base.reshape(-1)[1::2],
        lambda: base.reshape(-1)[-1],
    ]
    views = [m() for m in draw(st.lists(st.sampled_from(makers), min_size=1, max_size=4))]
    views.append(draw(_strided(base)))
    return draw(st.sampled_from([list, tuple]))(views)


@st.composite
def np_arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(_NP_DTYPES)))
    shape = draw(_shapes)
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    n = math.prod(shape)
    if dtype == np.bool_:
        a = rng.integers(0, 2, n).astype(bool).reshape(shape)
    else:
        a = np.frombuffer(rng.bytes(n * dtype.itemsize), dtype=dtype).reshape(shape).copy()
    view = draw(st.sampled_from(["same", "T", "step"]))
    if view == "T":
        return a.T
    if view == "step" and a.ndim:
        return a[::2]
    return a


np_scalars = np_arrays().filter(lambda a: a.ndim == 0).map(lambda a: a[()])

_DEVICES = ["cpu", "cuda", "cuda:1", "meta"]

_plain_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.inf, -math.inf, math.nan, -0.0]),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.sampled_from(_TORCH_DTYPES),
    st.lists(st.integers(0, 2**40), max_size=4).map(torch.Size),
    st.sampled_from(_DEVICES).map(torch.device),
)
# about half the leaves are tensors/arrays, so 60 examples reach most dtypes and view kinds
leaves = st.one_of(
    _plain_leaves, st.one_of(tensors(), tensors(), view_families(), np_arrays(), np_scalars)
)
_keys = st.one_of(
    st.text(max_size=6),
    st.integers(-5, 5),
    st.integers(),
    st.sampled_from(["$tensor", "$dict", "$root", "a/b", "a%2Fb", ""]),
)


def _mappings(kids, kind):
    # str(k) unique: an int key and its str twin in one dict is refused when both hold tensors
    items = st.lists(st.tuples(_keys, kids), max_size=4, unique_by=lambda kv: str(kv[0]))
    return items.map(kind)


trees = st.recursive(
    leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=4).map(tuple),
        _mappings(kids, dict),
        _mappings(kids, collections.OrderedDict),
    ),
    max_leaves=10,
)


def _tensor_pairs(a, b, out: list) -> list:
    """(saved, loaded) for every tensor/array in two trees of the same structure."""
    if isinstance(a, (torch.Tensor, np.ndarray)):
        out.append((a, b))
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            _tensor_pairs(x, y, out)
    elif isinstance(a, dict):
        for k in a:
            _tensor_pairs(a[k], b[k], out)
    return out


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(obj=trees, compress=st.sampled_from(COMPRESS))
def test_random_trees_roundtrip(tmp_path, obj, compress):
    out = roundtrip(tmp_path, obj, compress=compress, chunk_size=64)
    assert same(obj, out)
    pairs = _tensor_pairs(obj, out, [])
    for a, b in pairs:  # the same object saved twice comes back as one object
        assert all(d is b for c, d in pairs if c is a)


def test_deepest_allowed_tree_round_trips(tmp_path):
    """A tree nested MAX_DEPTH deep saves and loads (it used to hit Python's recursion limit);
    one level more is refused with a typed error."""
    t = torch.arange(3.0)
    x = t
    for _ in range(512):
        x = [x]
    ckptguard.save(x, tmp_path / "deep")
    y = ckptguard.load(tmp_path / "deep")
    for _ in range(512):
        y = y[0]
    assert torch.equal(y, t)
    with pytest.raises(ckptguard.UnsupportedObjectError):
        ckptguard.save([x], tmp_path / "deeper")


def test_conjugate_and_negative_views_are_distinct_tensors(tmp_path):
    """t.conj() and t._neg_view() share t's storage and strides but not its values."""
    c = torch.tensor([1 + 2j, 3 - 1j])
    ckptguard.save([c, c.conj(), c._neg_view()], tmp_path / "c")
    a, b, n = ckptguard.load(tmp_path / "c")
    assert torch.equal(a, c) and torch.equal(b, c.conj()) and torch.equal(n, -c)


def test_per_rank_tensor_round_trip_in_one_process(tmp_path) -> None:
    """A PerRank tensor saved by one process (sync and async: the capture keeps the wrapper)
    loads as the plain tensor it wraps."""
    import numpy as np

    rng = torch.get_rng_state()
    state = {"rng": ckptguard.PerRank(rng), "n": ckptguard.PerRank(np.arange(3.0)), "step": 3}
    ckptguard.save(state, tmp_path / "s" / "a")
    h = ckptguard.save_async(state, tmp_path / "s" / "b")
    h.result()
    for name in ("a", "b"):
        out = ckptguard.load(tmp_path / "s" / name)
        assert torch.equal(out["rng"], rng) and np.array_equal(out["n"], np.arange(3.0))
        assert ckptguard.describe(tmp_path / "s" / name).tensors[0].shape == (1, *rng.shape)
