"""What cannot be stored without pickle is refused with the key path, and nothing is written;
the strict rules of the tree encoding (docs/format.md section 6) hold in the writer, the decoder
and the independent reader."""

from __future__ import annotations

import collections
import fractions
import os
from typing import Any

import independent_reader as ir
import numpy as np
import pytest
import torch
from conftest import resign_manifest

import ckptguard
from ckptguard.tree import TreeError, check_tree, flatten


class Custom:
    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return isinstance(other, Custom) and other.x == self.x


@pytest.mark.parametrize(
    "state,path",
    [
        ({"a": {"b": [1, Custom(1)]}}, "a/b/1"),
        ({"f": fractions.Fraction(1, 3)}, "f"),
        ({"s": {1, fractions.Fraction(1, 2)}}, "s/"),
        ({"k": {(1, fractions.Fraction(1, 2)): 3}}, "k/"),
        ({"np": np.array(["x"])}, "np"),
        ({"sparse": torch.eye(3).to_sparse_csc()}, "sparse"),
        ({"lam": lambda: 1}, "lam"),
    ],
)
def test_unsupported_objects_name_their_path(tmp_path, state, path):
    with pytest.raises(ckptguard.UnsupportedObjectError) as e:
        ckptguard.save(state, tmp_path / "c")
    assert e.value.key_path.startswith(path)
    assert os.listdir(tmp_path) == []  # nothing written, not even a staging directory


def test_pickle_needs_opt_in_at_save_and_load(tmp_path):
    state = {"obj": Custom(5), "t": torch.ones(2)}
    ckptguard.save(state, tmp_path / "c", allow_pickle=True)
    with pytest.raises(ckptguard.UnsupportedObjectError):
        ckptguard.load(tmp_path / "c")
    out = ckptguard.load(tmp_path / "c", allow_pickle=True)
    assert out["obj"] == Custom(5) and torch.equal(out["t"], state["t"])
    assert ckptguard.verify(tmp_path / "c").ok


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        ckptguard.save({}, tmp_path / "c", compress="brotli")
    with pytest.raises(ckptguard.UnsupportedObjectError):
        ckptguard.save({}, tmp_path / "c", metadata={"x": object()})
    for bad in ["..", ".hidden", "a b", ""]:
        with pytest.raises(ckptguard.InvalidNameError):
            ckptguard.save({}, tmp_path / bad if bad else str(tmp_path) + "/")
    assert os.listdir(tmp_path) == []


# Non-canonical or out-of-range encodings of docs/format.md section 6: each is refused, by the
# decoder and by the independent reader, as a tree (in a checkpoint: CorruptCheckpointError).
NON_CANONICAL = {
    "npscalar_uppercase_hex": {"$npscalar": "int16", "hex": "0A00"},
    "npscalar_spaced_hex": {"$npscalar": "int16", "hex": "0a 0"},
    "npscalar_short_hex": {"$npscalar": "int16", "hex": "0a"},
    "size_negative": {"$size": [2, -1]},
    "size_beyond_int64": {"$size": [1 << 63]},
    "int_within_int64": {"$int": "5"},
    "int_min_int64": {"$int": str(-(1 << 63))},
    "int_leading_zero": {"$int": "0" + str(1 << 64)},
    "int_plus_sign": {"$int": "+" + str(1 << 64)},
    "int_underscore": {"$int": "1_" + "0" * 20},
    "int_too_many_digits": {"$int": "9" * 4301},
    "dict_duplicate_key": {"$dict": [[1, "a"], [1, "b"]]},
    "dict_duplicate_str_key": {"$dict": [[1, "a"], ["$x", 0], ["$x", 1]]},
    "odict_duplicate_key": {"$odict": [["a", 1], ["a", 2]]},
    "dict_of_plain_keys": {"$dict": [["a", 1], ["b", 2]]},
    "number_beyond_int64": 1 << 63,
    "number_not_finite": float("inf"),  # JSON 1e400 parses as inf
    "bytes_nonzero_pad_bits": {"$bytes": "YR=="},  # b"a" is "YQ=="
    "bytes_unpadded": {"$bytes": "YQ"},
    "bytes_not_base64": {"$bytes": "Y*=="},
    "pickle_nonzero_pad_bits": {"$pickle": "gAR="},
    "device_uppercase": {"$device": "CPU"},
    "device_leading_zero_index": {"$device": "cuda:01"},
    "device_with_space": {"$device": "cuda :0"},
}


@pytest.mark.parametrize("name", sorted(NON_CANONICAL))
def test_non_canonical_tree_refused(name: str, tmp_path) -> None:
    bad = {"x": [NON_CANONICAL[name]]}
    with pytest.raises(TreeError):
        check_tree(bad, 1)
    with pytest.raises(ir.SpecViolation):
        ir._TreeDecoder(1).decode(bad, (), 0)
    ckptguard.save({"t": torch.ones(2)}, tmp_path / "c")
    resign_manifest(tmp_path / "c", lambda b: b.update(tree={"t": {"$tensor": 0}, "x": bad}))
    with pytest.raises(ckptguard.CorruptCheckpointError):
        ckptguard.load(tmp_path / "c")
    with pytest.raises(ir.SpecViolation):
        ir.read_checkpoint(str(tmp_path / "c"))


@pytest.mark.parametrize(
    "value",
    [
        1 << 64,
        -(1 << 63) - 1,
        pytest.param(10**4300 - 1, id="int_of_4300_digits"),  # the most a $int may have
        {1: "a", "$b": 2},
        collections.OrderedDict([("a", 1), ("b", 2)]),
        {1: "int key", "1": "str key"},
        np.int16(-3),
        np.complex128(1 - 2j),
        torch.Size([0, 3]),
        torch.device("cpu"),
        torch.device("cuda", 12),
        b"\x00\xffab",
    ],
)
def test_canonical_values_round_trip(value: Any, tmp_path) -> None:
    ckptguard.save({"v": value}, tmp_path / "c")
    out = ckptguard.load(tmp_path / "c")["v"]
    assert type(out) is type(value) and out == value
    ir.read_checkpoint(str(tmp_path / "c"))  # the independent reader takes it too


@pytest.mark.parametrize(
    "value,what",
    [
        (torch.Size([3, -1]), "negative"),
        pytest.param(10**4300, "4300 digits", id="int_of_4301_digits"),
        pytest.param(-(10**4300), "4300 digits", id="negative_int_of_4301_digits"),
    ],
)
def test_values_without_an_encoding_refused(value: Any, what: str, tmp_path) -> None:
    with pytest.raises(ckptguard.UnsupportedObjectError, match=what) as e:
        ckptguard.save({"a": [value]}, tmp_path / "c")
    assert e.value.key_path == "a/0"
    assert os.listdir(tmp_path) == []


def test_more_than_64_dimensions_refused_before_writing(tmp_path) -> None:
    ok = torch.zeros([1] * 64)
    ckptguard.save({"ok": ok}, tmp_path / "c")
    assert ckptguard.load(tmp_path / "c")["ok"].shape == ok.shape
    with pytest.raises(ckptguard.UnsupportedObjectError, match="65 dimensions") as e:
        ckptguard.save({"m": {"w": torch.zeros([1] * 65)}}, tmp_path / "other" / "d")
    assert e.value.key_path == "m/w"
    assert not os.path.exists(tmp_path / "other")  # nothing written, not even the store


def test_more_than_64_dimensions_refused_by_both_readers(tmp_path) -> None:
    ckptguard.save({"t": torch.zeros(1)}, tmp_path / "c")
    resign_manifest(tmp_path / "c", lambda b: b["tensors"][0].update(shape=[1] * 65))
    with pytest.raises(ckptguard.CorruptCheckpointError):
        ckptguard.load(tmp_path / "c")
    with pytest.raises(ir.SpecViolation, match="at most 64"):
        ir.read_checkpoint(str(tmp_path / "c"))


def test_flatten_describes_each_tensor_once_with_its_facts() -> None:
    """One ref per distinct tensor object (one object reached twice is one; two objects that are
    the same view of one storage are two, as torch.load keeps them; so are views of one
    storage with other geometry or a lazy conjugate), its facts read off
    the tensor, the tree pointing at it wherever it was reached."""
    base = torch.randn(6, 4)
    cplx = torch.randn(3, dtype=torch.complex64)
    state = {
        "nested": {"l": [base, {"t": base.t()}], "row": base[1]},
        "same_view": [base[:, 1], base[:, 1]],  # two objects, one view
        "cplx": [cplx, cplx.conj()],
        "scalar": torch.tensor(1.0),
        "empty": torch.zeros(0, 2),
        "bf16": torch.ones(3, dtype=torch.bfloat16),
        "param": torch.nn.Parameter(torch.randn(3)),
        "leaf": torch.ones(2, requires_grad=True),
        "nonleaf": torch.ones(2, requires_grad=True) * 2,
        "np": np.arange(3, dtype=np.int16),
        "tuple": (base, 1),
    }
    tree, refs, _ = flatten(state)
    assert [r.key for r in refs] == [
        "nested/l/0",
        "nested/l/1/t",
        "nested/row",
        "same_view/0",
        "same_view/1",
        "cplx/0",
        "cplx/1",
        "scalar",
        "empty",
        "bf16",
        "param",
        "leaf",
        "nonleaf",
        "np",
    ]
    assert tree["same_view"] == [{"$tensor": 3}, {"$tensor": 4}]
    assert tree["tuple"] == {"$tuple": [{"$tensor": 0}, 1]}
    for r in refs:
        t = r.value
        torch_kind = isinstance(t, torch.Tensor)
        assert r.kind == ("torch" if torch_kind else "numpy")
        assert r.dtype == (str(t.dtype).removeprefix("torch.") if torch_kind else str(t.dtype))
        assert r.shape == r.global_shape == tuple(t.shape)
        assert r.offsets == (0,) * len(r.shape) and not r.sharded and not r.per_rank
        assert r.device == (str(t.device) if torch_kind else "cpu")
        assert r.requires_grad == (torch_kind and t.requires_grad and t.is_leaf)
        assert r.parameter == isinstance(t, torch.nn.Parameter)
        assert r.outer is t
    assert [r.key for r in refs if r.requires_grad] == ["param", "leaf"]


@pytest.mark.parametrize(
    "value,what",
    [
        (torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint4x2), "quantized tensor of"),
        (torch.eye(2).to_sparse_bsr(1), "tensor of type Tensor/torch.sparse_bsr"),
        (np.ones(2, dtype=">f4"), "numpy array of dtype >f4"),
    ],
)
def test_tensors_that_cannot_be_saved_name_their_path(value: Any, what: str) -> None:
    with pytest.raises(ckptguard.UnsupportedObjectError, match=f"cannot save {what}") as e:
        flatten({"deep": [value]})
    assert e.value.key_path == "deep/0"
