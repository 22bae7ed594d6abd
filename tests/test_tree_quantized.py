"""Quantized tensors and quantized dtypes in the object tree without pickle (format.md section
6.2, ``$quantized``): stored as their integer values plus parameters, rebuilt exactly."""

from __future__ import annotations

import math
import pathlib
from typing import Any

import h5py
import independent_reader as ir
import pytest
import torch
from safetensors.torch import load_file

import ckptguard
from ckptguard.format.treeids import TREE_TYPES
from ckptguard.open import CheckpointReader
from ckptguard.tree import TreeError, check_tree, flatten, unflatten

# torch warns that creating quantized tensors is deprecated; these tests create them on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions")

X = torch.linspace(-2.0, 3.0, 24).reshape(4, 6)


def _per_tensor(dtype: torch.dtype, scale: float = 0.05, zero_point: int = 3) -> torch.Tensor:
    return torch.quantize_per_tensor(X, scale, zero_point, dtype)


def _per_channel(dtype: torch.dtype, axis: int = 1, float_qparams: bool = False) -> torch.Tensor:
    n = X.shape[axis]
    scales = torch.linspace(0.01, 0.2, n, dtype=torch.float64)
    zero_points = torch.linspace(0.0, 1.5, n) if float_qparams else torch.arange(n) - 1
    if dtype == torch.quint8 and not float_qparams:
        zero_points = zero_points + 1  # in quint8's range
    return torch.quantize_per_channel(X, scales, zero_points, axis, dtype)


def _state() -> dict:
    odd = torch._make_per_tensor_quantized_tensor(
        torch.tensor([[0, 255], [7, 128]], dtype=torch.uint8), float("nan"), -(2**40)
    )
    return {
        "pt": {n: _per_tensor(d) for n, d in (("u8", torch.quint8), ("i8", torch.qint8))},
        "pt32": _per_tensor(torch.qint32, 1e-4, -12),
        "pc": [_per_channel(torch.qint8, 0), _per_channel(torch.quint8, 1)],
        "pc32": _per_channel(torch.qint32),
        "fq": _per_channel(torch.quint8, 0, float_qparams=True),
        "odd": {
            "nan": odd,
            "inf": torch._make_per_tensor_quantized_tensor(odd.int_repr(), -1e308 * 10, 0),
        },
        "empty": torch.quantize_per_tensor(torch.empty(0, 3), 1.0, 0, torch.qint8),
        "scalar": torch.quantize_per_tensor(torch.tensor(1.5), 0.5, 1, torch.quint8),
        "transposed": _per_tensor(torch.qint8).t(),
        "dtypes": [torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4],
        "plain": torch.arange(3.0),
    }


def _same_quantized(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal as the issue asks: dtype, qscheme, parameters, integer values bit for bit."""
    assert b.is_quantized and b.dtype == a.dtype and b.qscheme() == a.qscheme()
    assert b.shape == a.shape and b.device == a.device
    assert torch.equal(b.int_repr(), a.int_repr())
    if a.qscheme() == torch.per_tensor_affine:
        sa, sb = a.q_scale(), b.q_scale()
        assert (math.isnan(sa) and math.isnan(sb)) or repr(sa) == repr(sb)
        assert b.q_zero_point() == a.q_zero_point()
        return
    for get in ("q_per_channel_scales", "q_per_channel_zero_points"):
        pa, pb = getattr(a, get)(), getattr(b, get)()
        assert pb.dtype == pa.dtype and torch.equal(pb, pa), get
    assert b.q_per_channel_axis() == a.q_per_channel_axis()


def _walk(a: Any, b: Any) -> int:
    """Compare two states; the number of quantized tensors compared."""
    if isinstance(a, torch.Tensor) and a.is_quantized:
        _same_quantized(a, b)
        return 1
    if isinstance(a, dict):
        assert list(a) == list(b)
        return sum(_walk(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert len(a) == len(b)
        return sum(_walk(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b and type(a) is type(b)
    return 0


def _features(path: pathlib.Path) -> set:
    with CheckpointReader(str(path)) as rd:
        return set(rd.features)


@pytest.mark.parametrize("where", ["ckpt", "x.pt"])
def test_quantized_tensors_round_trip_exactly(tmp_path, where):
    state = _state()
    ckptguard.save(state, tmp_path / where)
    assert ckptguard.verify(tmp_path / where).ok
    back = ckptguard.load(tmp_path / where)
    assert _walk(state, back) == 12
    assert back["transposed"].shape == (6, 4)  # loads contiguous, values as they were
    features = _features(tmp_path / where)
    assert TREE_TYPES in features and "pickle" not in features


def test_the_integer_values_and_channel_parameters_are_tensors_at_their_key_paths(tmp_path):
    state = {"fc": {"w": _per_channel(torch.qint8, 0)}, "act": _per_tensor(torch.quint8)}
    tree, refs, _ = flatten(state)
    assert [(r.key, r.dtype, r.shape) for r in refs] == [
        ("fc/w/int_repr", "int8", (4, 6)),
        ("fc/w/scale", "float64", (4,)),
        ("fc/w/zero_point", "int64", (4,)),
        ("act/int_repr", "uint8", (4, 6)),
    ]
    assert tree["act"] == {
        "$quantized": "quint8",
        "qscheme": "per_tensor_affine",
        "axis": None,
        "scale": 0.05,
        "zero_point": 3,
        "int_repr": {"$tensor": 3},
    }
    assert tree["fc"]["w"]["axis"] == 0 and tree["fc"]["w"]["scale"] == {"$tensor": 1}


def test_a_quantized_tensor_reached_twice_is_stored_once(tmp_path):
    q = _per_channel(torch.qint8)
    tree, refs, _ = flatten({"a": q, "b": [q]})
    assert tree["a"] == tree["b"][0] and len(refs) == 3
    ckptguard.save({"a": q, "b": [q]}, tmp_path / "c")
    back = ckptguard.load(tmp_path / "c")
    _same_quantized(q, back["a"])
    _same_quantized(q, back["b"][0])


@pytest.mark.parametrize(
    "make,what",
    [
        (lambda: torch.quantize_per_tensor(X, 0.1, 0, torch.quint4x2), "dtype torch.quint4x2"),
        (
            lambda: torch.nn.Parameter(_per_tensor(torch.qint8), requires_grad=False),
            "dtype torch.qint8",
        ),
    ],
)
def test_quantized_tensors_the_format_does_not_store_are_refused_naming_the_path(make, what):
    with pytest.raises(ckptguard.UnsupportedObjectError, match=what) as e:
        flatten({"m": {"w": make()}})
    assert e.value.key_path == "m/w"


def test_a_quantized_module_state_dict_loads_into_a_module(tmp_path):
    conv, other = (torch.ao.nn.quantized.Conv2d(3, 4, 3) for _ in range(2))
    conv.set_weight_bias(_per_channel_weight(), torch.linspace(-1, 1, 4))
    ckptguard.save(conv.state_dict(), tmp_path / "conv.pt")
    other.load_state_dict(ckptguard.load(tmp_path / "conv.pt"))
    x = torch.quantize_per_tensor(
        torch.linspace(-1, 1, 75).reshape(1, 3, 5, 5), 0.02, 64, torch.quint8
    )
    assert torch.equal(conv(x).int_repr(), other(x).int_repr())


def _per_channel_weight() -> torch.Tensor:
    w = torch.linspace(-0.5, 0.5, 4 * 3 * 3 * 3).reshape(4, 3, 3, 3)
    return torch.quantize_per_channel(
        w,
        torch.full((4,), 0.01, dtype=torch.float64),
        torch.zeros(4, dtype=torch.long),
        0,
        torch.qint8,
    )


@pytest.mark.parametrize("where", ["ckpt", "x.pt"])
def test_the_independent_reader_reads_quantized_tensors(tmp_path, where):
    state = {"w": _per_channel(torch.quint8, 1, float_qparams=True), "a": _per_tensor(torch.qint8)}
    state["dt"] = torch.qint32
    ckptguard.save(state, tmp_path / where)
    ck = ir.read_checkpoint(str(tmp_path / where))
    w, a = ck.tree["w"], ck.tree["a"]
    assert (w.dtype, w.qscheme, w.axis) == ("quint8", "per_channel_affine_float_qparams", 1)
    assert (a.dtype, a.qscheme, a.scale, a.zero_point, a.axis) == (
        "qint8",
        "per_tensor_affine",
        0.05,
        3,
        None,
    )
    assert ck.tree["dt"] == ir.DType("qint32")
    assert ck.tensors["w/int_repr"].dtype == "uint8"
    assert ck.tensors["w/scale"].dtype == ck.tensors["w/zero_point"].dtype == "float32"
    body = {
        "tree": {"w": flatten(state)[0]["w"]},
        "rank_trees": {},
        "tensors": [
            {"key": "w/int_repr", "dtype": "int8", "shape": [4, 6]},  # not quint8's uint8
            {"key": "w/scale", "dtype": "float32", "shape": [6]},
            {"key": "w/zero_point", "dtype": "float32", "shape": [6]},
        ],
        "features": [TREE_TYPES],
    }
    with pytest.raises(ir.SpecViolation, match="int_repr is int8"):
        ir.decode_tree(body)
    body["tensors"][0]["dtype"] = "uint8"
    body["tensors"][1]["shape"] = [4]  # the channels of axis 0, not 1
    with pytest.raises(ir.SpecViolation, match="w/scale"):
        ir.decode_tree(body)
    body["tensors"][1]["shape"] = [6]
    ir.decode_tree(body)


def test_parts_that_do_not_fit_are_a_corrupt_tree():
    per_tensor = {"$quantized": "qint8", "qscheme": "per_tensor_affine", "axis": None}
    per_tensor |= {"int_repr": {"$tensor": 0}, "scale": 0.5, "zero_point": 1}
    check_tree(per_tensor, 1)
    assert unflatten(per_tensor, [torch.zeros(2, dtype=torch.int8)]).q_scale() == 0.5
    with pytest.raises(TreeError, match="int_repr is not a torch torch.int8"):
        unflatten(per_tensor, [torch.zeros(2, dtype=torch.uint8)])
    per_channel = {"$quantized": "quint8", "qscheme": "per_channel_affine", "axis": 1}
    per_channel |= {
        "int_repr": {"$tensor": 0},
        "scale": {"$tensor": 1},
        "zero_point": {"$tensor": 2},
    }
    check_tree(per_channel, 3)
    data, zero_points = torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(3, dtype=torch.long)
    assert (
        unflatten(
            per_channel, [data, torch.ones(3, dtype=torch.float64), zero_points]
        ).q_per_channel_axis()
        == 1
    )
    for scales, match in (
        (torch.ones(2, dtype=torch.float64), "channels of axis 1"),
        (torch.ones(3, dtype=torch.float32), "scale is not a dense torch torch.float64"),
    ):
        with pytest.raises(TreeError, match=match):
            unflatten(per_channel, [data, scales, zero_points])
    with pytest.raises(TreeError, match="axis 2 is not a dimension"):
        unflatten(
            {**per_channel, "axis": 2}, [data, torch.ones(3, dtype=torch.float64), zero_points]
        )


@pytest.mark.parametrize(
    "change",
    [
        {"$quantized": "quint4x2"},
        {"qscheme": "per_tensor_symmetric"},
        {"scale": 1},  # a JSON integer is no float
        {"scale": {"$tensor": 1}},
        {"zero_point": 1.0},
        {"zero_point": True},
        {"zero_point": 1 << 63},
        {"axis": 0},
        {"int_repr": 0},
    ],
)
def test_malformed_quantized_values_are_refused(change):
    node = {"$quantized": "qint8", "qscheme": "per_tensor_affine", "axis": None}
    node |= {"int_repr": {"$tensor": 0}, "scale": 0.5, "zero_point": 1}
    check_tree(node, 2)
    with pytest.raises(TreeError):
        check_tree({**node, **change}, 2)
    with pytest.raises(TreeError):
        check_tree({**node, "extra": 1}, 2)


def test_quantized_dtypes_need_the_feature():
    check_tree({"$dtype": "quint2x4"}, 0)
    with pytest.raises(TreeError, match=r"\$dtype"):
        check_tree({"$dtype": "quint2x4"}, 0, types=False)
    assert flatten(torch.qint8)[0] == {"$dtype": "qint8"}


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # torch.load of quantized
def test_export_names_the_parts_and_torch_export_rebuilds_them(tmp_path):
    state = {"w": _per_channel(torch.qint8, 0), "a": _per_tensor(torch.quint8)}
    ckptguard.save(state, tmp_path / "c")
    with pytest.warns(ckptguard.ExportWarning):
        result = ckptguard.export(tmp_path / "c", to="safetensors", dest=tmp_path / "st")
    assert sorted(load_file(result.files[0])) == [
        "a.int_repr",
        "w.int_repr",
        "w.scale",
        "w.zero_point",
    ]
    assert sorted(n for n, _ in result.left_out) == [
        "a.axis",
        "a.qscheme",
        "a.scale",
        "a.zero_point",
        "w.axis",
        "w.qscheme",
    ]
    h5 = ckptguard.export(tmp_path / "c", to="hdf5", dest=tmp_path / "h5")
    with h5py.File(h5.files[0]) as f:
        assert f["w/int_repr"].dtype == "int8" and f["w/scale"].dtype == "float64"
        assert dict(f["a"].attrs) == {
            "qscheme": "per_tensor_affine",
            "scale": 0.05,
            "zero_point": 3,
        }
        back = ckptguard.export(tmp_path / "c", to="torch", dest=tmp_path / "pt")
    got = torch.load(back.files[0], weights_only=True)
    _same_quantized(state["w"], got["w"])
    _same_quantized(state["a"], got["a"])
