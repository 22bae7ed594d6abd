"""Types a checkpoint keeps without pickle beyond plain containers (format.md section 6.2):
sets, complex numbers, slices, paths, argparse namespaces, hashable dict keys, meta tensors, and
the dataclasses, enums and named tuples a process registers (``ckptguard.register_types``)."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import fractions
import math
import pathlib
import sys
import typing
from collections.abc import Iterator
from typing import Any

import independent_reader as ir
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ckptguard
from ckptguard.format.treeids import TREE_TYPES
from ckptguard.open import CheckpointReader
from ckptguard.tree import TreeError, check_tree, flatten, unflatten


class Color(enum.Enum):
    RED = 1
    BLUE = 2


class Perm(enum.Flag):
    R = 1
    W = 2


@dataclasses.dataclass
class Config:
    lr: float
    layers: list
    mode: Color = Color.RED


@dataclasses.dataclass(frozen=True)
class Frozen:
    name: str


class Point(typing.NamedTuple):
    x: int
    y: float


@pytest.fixture
def registered() -> Iterator[None]:
    ckptguard.register_types(Color, Config, Frozen, Point)
    yield
    ckptguard.unregister_types(Color, Config, Frozen, Point)


def _same(a: Any, b: Any) -> bool:
    """Equal with the same type all the way down (nan equal to nan, -0.0 not to 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, complex):
        return _same(a.real, b.real) and _same(a.imag, b.imag)
    if isinstance(a, torch.Tensor):
        return (
            a.device == b.device
            and a.shape == b.shape
            and a.dtype == b.dtype
            and (a.is_meta or torch.equal(a, b))
            and a.requires_grad == b.requires_grad
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(map(repr, a)) == list(map(repr, b)) and all(
            type(k) is type(j) and _same(a[k], b[j]) for k, j in zip(a, b, strict=True)
        )
    if isinstance(a, slice):
        return _same((a.start, a.stop, a.step), (b.start, b.stop, b.step))
    if isinstance(a, argparse.Namespace):
        return _same(vars(a), vars(b))
    if dataclasses.is_dataclass(a):
        return _same(dataclasses.asdict(a), dataclasses.asdict(b))  # type: ignore[arg-type]
    return a == b


def _state() -> dict:
    nan = float("nan")
    return {
        "sets": [{1, "a", (1, 2), None, b"x", 2.5}, frozenset({frozenset({1}), 3}), set()],
        "complex": [complex(1, -2), complex(nan, float("inf")), complex(-0.0, 0.0)],
        "slices": [slice(1, None, 2), slice(None), slice("a", (1,), 3.5)],
        "paths": {
            "p": pathlib.Path("/data/run"),
            "posix": pathlib.PurePosixPath("a/b"),
            "win": pathlib.PureWindowsPath("C:\\x\\y"),
        },
        "args": argparse.Namespace(lr=0.1, name="x", dims=[1, 2], nested={"k": 1}),
        "keys": {True: "bool", 1.5: "float", None: "none", (1, "a", (b"b",)): "tuple", b"z": 5},
        "more_keys": {1: "int", "s": "str", -0.0: "negative zero", 3 + 4j: "complex"},
        "meta": {
            "w": torch.empty(3, 4, device="meta"),
            "p": torch.nn.Parameter(torch.empty(2, dtype=torch.bfloat16, device="meta")),
            "frozen": torch.nn.Parameter(torch.empty(0, 5, device="meta"), requires_grad=False),
        },
        "real": torch.arange(4.0),
    }


def _registered_state() -> dict:
    return {
        "enum": [Color.RED, {Color.BLUE}, {Color.RED: 1}],
        "config": Config(0.5, [Point(1, 2.0)], Color.BLUE),
        "frozen": {"a": Frozen("b")},
        "point": Point(3, 4.5),
    }


def _roundtrip(tmp_path: pathlib.Path, state: Any, where: str) -> tuple[Any, set]:
    path = tmp_path / where
    ckptguard.save(state, path)
    with CheckpointReader(str(path)) as rd:
        features = set(rd.features)
    assert ckptguard.verify(path).ok
    return ckptguard.load(path), features


@pytest.mark.parametrize("where", ["ckpt", "x.pt"])
def test_types_round_trip_with_exact_type_and_value(tmp_path, where):
    state = _state()
    back, features = _roundtrip(tmp_path, state, where)
    assert _same(back, state)
    assert back["meta"]["w"].is_meta and type(back["meta"]["p"]) is torch.nn.Parameter
    assert back["meta"]["p"].requires_grad and not back["meta"]["frozen"].requires_grad
    assert TREE_TYPES in features and "pickle" not in features


@pytest.mark.parametrize("where", ["ckpt", "x.pt"])
def test_registered_types_round_trip(tmp_path, where, registered):
    state = _registered_state()
    back, features = _roundtrip(tmp_path, state, where)
    assert _same(back, state)
    assert back["enum"][0] is Color.RED and type(back["config"].layers[0]) is Point
    assert TREE_TYPES in features


def test_a_state_without_the_new_types_lists_no_feature(tmp_path):
    _, features = _roundtrip(tmp_path, {"a": {1: [1, 2.5], "$x": (1,)}, "t": torch.ones(2)}, "c")
    assert TREE_TYPES not in features


def test_set_elements_are_stored_in_canonical_order():
    a, _, _ = flatten({"b", "a", 10, 2, (1,)})
    b, _, _ = flatten({(1,), 2, 10, "a", "b"})
    assert a == b == {"$set": ["a", "b", 10, 2, {"$tuple": [1]}]}  # by JSON text


def test_unregistered_class_is_refused_at_save_naming_path_and_register_types(tmp_path):
    with pytest.raises(ckptguard.UnsupportedObjectError, match="register_types") as e:
        ckptguard.save({"a": [Config(1.0, [])]}, tmp_path / "c")
    assert e.value.key_path == "a/0" and "Config" in str(e.value)
    with pytest.raises(ckptguard.UnsupportedObjectError, match="register_types"):
        ckptguard.save({"e": Color.RED}, tmp_path / "c")


def test_unregistered_class_at_load_is_refused_without_importing(tmp_path):
    # A class whose module does not exist: a load that imported by name would fail differently.
    Ghost = dataclasses.make_dataclass("Ghost", [("v", int)])
    Ghost.__module__ = "ckptguard_test_no_such_module"
    ckptguard.register_types(Ghost)
    try:
        ckptguard.save({"cfg": {"inner": Ghost(3)}}, tmp_path / "c")
        assert ckptguard.load(tmp_path / "c")["cfg"]["inner"] == Ghost(3)
    finally:
        ckptguard.unregister_types(Ghost)
    with pytest.raises(ckptguard.RegisteredTypeError, match="register_types") as e:
        ckptguard.load(tmp_path / "c")
    assert e.value.key_path == "cfg/inner"
    assert e.value.type_name == "ckptguard_test_no_such_module.Ghost"
    assert "ckptguard_test_no_such_module" not in sys.modules
    assert ckptguard.verify(tmp_path / "c").ok  # checking needs no class


def test_a_changed_class_is_refused_at_load(tmp_path, registered):
    ckptguard.save({"c": Config(1.0, [])}, tmp_path / "c")
    Other = dataclasses.make_dataclass("Config", [("lr", float)])
    Other.__module__, Other.__qualname__ = Config.__module__, Config.__qualname__
    ckptguard.unregister_types(Config)
    ckptguard.register_types(Other)
    try:
        with pytest.raises(ckptguard.RegisteredTypeError, match="fields") as e:
            ckptguard.load(tmp_path / "c")
        assert e.value.key_path == "c"
    finally:
        ckptguard.unregister_types(Other)
        ckptguard.register_types(Config)


def test_only_dataclasses_enums_and_named_tuples_can_be_registered():
    class Plain:
        pass

    for bad in (Plain, len, print, eval, object, dict, pathlib.Path, Color.RED, "os.system"):
        with pytest.raises(TypeError, match="register_types accepts"):
            ckptguard.register_types(bad)  # type: ignore[arg-type]
    assert Plain not in ckptguard.registered_types()

    @dataclasses.dataclass
    class Hidden:
        a: int
        b: int = dataclasses.field(init=False, default=0)

    with pytest.raises(TypeError, match="init=False"):
        ckptguard.register_types(Hidden)


def test_two_classes_of_one_name_cannot_both_be_registered(registered):
    Twin = dataclasses.make_dataclass("Frozen", [("name", str)])
    Twin.__module__, Twin.__qualname__ = Frozen.__module__, Frozen.__qualname__
    with pytest.raises(ValueError, match="already registered"):
        ckptguard.register_types(Twin)


def test_a_registered_name_never_calls_another_class(registered):
    # A tree naming a registered enum as a dataclass (or any other mismatch) is refused.
    tree = {"$dataclass": f"{Color.__module__}.Color", "fields": {"value": 1}}
    with pytest.raises(ckptguard.RegisteredTypeError, match="not registered"):
        unflatten(tree, [])


@pytest.mark.parametrize(
    "state,path,what",
    [
        ({"s": [{1, fractions.Fraction(1, 3)}]}, "s/0/", "set element"),
        ({"k": {(1, fractions.Fraction(1, 3)): 0}}, "k/", "dict key"),
        ({"k": {frozenset({pathlib.Path("a")}): 0}}, "k/", "dict key"),
        ({"s": {float("nan"), float("nan")}}, "s", "two elements stored alike"),
        ({"f": Perm.R | Perm.W}, "f", "no single member"),
    ],
)
def test_refusals_name_the_key_path(state, path, what):
    if "f" in state:
        ckptguard.register_types(Perm)
    try:
        with pytest.raises(ckptguard.UnsupportedObjectError, match=what) as e:
            flatten(state)
        assert e.value.key_path.startswith(path)
    finally:
        ckptguard.unregister_types(Perm)


def test_a_lambda_under_allow_pickle_is_a_typed_error():
    with pytest.raises(ckptguard.UnsupportedObjectError, match="pickle cannot store it") as e:
        flatten({"fn": [lambda x: x]}, allow_pickle=True)
    assert e.value.key_path == "fn/0"


def test_unregistered_class_under_allow_pickle_is_pickled(tmp_path):
    ckptguard.save({"c": Config(1.0, [])}, tmp_path / "c", allow_pickle=True)
    assert ckptguard.load(tmp_path / "c", allow_pickle=True)["c"] == Config(1.0, [])


def test_a_meta_tensor_too_large_is_refused():
    with pytest.raises(ckptguard.UnsupportedObjectError, match="meta tensor") as e:
        flatten({"m": torch.empty(2**62, 0, dtype=torch.float64, device="meta")})
    assert e.value.key_path == "m"


@pytest.mark.parametrize(
    "tree",
    [
        {"$set": [2, 1]},  # out of order
        {"$set": [1, 1]},
        {"$set": [1, 1.0]},  # equal values
        {"$set": [[1]]},  # unhashable
        {"$set": [{"$tensor": 0}]},
        {"$frozenset": "ab"},
        {"$complex": [1, 2.0]},  # an int part
        {"$complex": [1.0]},
        {"$slice": [1, 2]},
        {"$path": "", "class": "Path"},
        {"$path": "a//b", "class": "PurePosixPath"},  # not canonical
        {"$path": "a", "class": "PosixPath"},
        {"$namespace": {"$odict": [["a", 1]]}},
        {"$dict": [[[1], 0]]},  # a list key
        {"$dict": [[True, 0], [1, 1]]},  # equal keys
        {"$dict": [[{"$tuple": [{"$tensor": 0}]}, 0]]},
        {"$meta": "float32", "shape": [-1], "requires_grad": False, "parameter": False},
        {"$meta": "int64", "shape": [1], "requires_grad": True, "parameter": False},
        {"$meta": "float64", "shape": [0, 1 << 62, 2], "requires_grad": False, "parameter": False},
        {"$meta": "nope", "shape": [1], "requires_grad": False, "parameter": False},
        {"$enum": 5, "name": "RED"},
        {"$dataclass": "m.C", "fields": [1]},
        {"$namedtuple": "m.C", "fields": {"x": 1}},
    ],
)
def test_malformed_tags_are_refused(tree):
    with pytest.raises(TreeError):
        check_tree(tree, 1)


def test_the_tags_need_the_feature():
    for tree in (
        {"$set": [1]},
        {"$dict": [[None, 1]]},
        {"$meta": "float32", "shape": [1], "requires_grad": False, "parameter": False},
    ):
        check_tree(tree, 0)
        with pytest.raises(TreeError, match="tree-types|not a string or integer"):
            check_tree(tree, 0, types=False)


@pytest.mark.parametrize("where", ["ckpt", "x.pt"])
def test_the_independent_reader_reads_every_tag(tmp_path, where, registered):
    state = {**_state(), **_registered_state(), "under": {(1, "a/b"): {"w": torch.ones(2)}}}
    ckptguard.save(state, tmp_path / where)
    ck = ir.read_checkpoint(str(tmp_path / where))
    assert "tree-types" in ck.manifest["features"]
    tree = ck.tree
    assert tree["sets"][0] == {1, "a", (1, 2), None, b"x", 2.5}
    assert tree["keys"][(1, "a", (b"b",))] == "tuple" and tree["more_keys"][3 + 4j] == "complex"
    assert tree["paths"]["win"] == ir.PathValue("PureWindowsPath", "C:\\x\\y")
    assert tree["meta"]["p"] == ir.Meta("bfloat16", (2,), True, True)
    assert tree["enum"][0] == ir.EnumMember(f"{__name__}.Color", "RED")
    assert tree["config"].fields["layers"][0].fields == [1, 2.0]
    # A tensor below a key other than str and int: that key's canonical JSON text, escaped.
    key = 'under/{"$tuple":[1,"a%2Fb"]}/w'
    assert (
        key in ck.tensors and ckptguard.load(tmp_path / where)["under"][(1, "a/b")]["w"].sum() == 2
    )


def test_the_independent_reader_refuses_a_tag_without_the_feature(tmp_path):
    body = {"tree": {"$set": [1]}, "rank_trees": {}, "tensors": [], "features": []}
    with pytest.raises(ir.SpecViolation, match="tree-types"):
        ir.decode_tree(body)
    ir.decode_tree({**body, "features": ["tree-types"]})
    with pytest.raises(ir.SpecViolation, match="tree-types"):
        ir.decode_tree({**body, "tree": [1], "features": ["tree-types"]})


def test_export_names_tensors_inside_the_new_containers(tmp_path, registered):
    state = {
        "ns": argparse.Namespace(w=torch.ones(2)),
        "cfg": Config(0.1, [torch.zeros(3)]),
        "k": {(1, "a"): torch.ones(1)},
        "sl": slice(torch.ones(4), None, None),
    }
    ckptguard.save(state, tmp_path / "c")
    with pytest.warns(ckptguard.ExportWarning):
        result = ckptguard.export(tmp_path / "c", to="safetensors", dest=tmp_path / "st")
    names = sorted(load_file(result.files[0]))
    assert names == ["cfg.layers.0", 'k.{"$tuple":[1,"a"]}', "ns.w", "sl.0"]  # as key paths
    back = ckptguard.export(tmp_path / "c", to="torch", dest=tmp_path / "pt")
    got = torch.load(back.files[0], weights_only=False)
    assert _same(got, state)


def test_a_template_finds_tensors_inside_the_new_containers(tmp_path, registered):
    state = {"cfg": Config(0.1, [torch.ones(3)]), "ns": argparse.Namespace(w=torch.ones(2))}
    ckptguard.save(state, tmp_path / "c")
    template = {
        "cfg": Config(0.0, [torch.zeros(3)]),
        "ns": argparse.Namespace(w=torch.zeros(2)),
        "odd": {fractions.Fraction(1, 2): {object()}},  # ignored, as any value a save refuses
    }
    _, refs, _ = flatten(template, tensors_only=True)
    assert [r.key for r in refs] == ["cfg/layers/0", "ns/w"]
    ckptguard.load(tmp_path / "c", template=template)
    assert template["cfg"].layers[0].sum() == 3 and template["ns"].w.sum() == 2


def _sparse() -> dict:
    dense = torch.tensor([[0.0, 1.5, 0.0], [2.0, 0.0, -3.0]])
    uncoalesced = torch.sparse_coo_tensor(
        torch.tensor([[1, 0, 1], [2, 1, 2]]), torch.tensor([1.0, 2.0, 3.0]), (2, 3)
    )
    return {
        "coo": dense.to_sparse(),
        "csr": dense.to_sparse_csr(),
        "hybrid": torch.arange(12.0).reshape(3, 4).to_sparse(1),  # dense values per index
        "uncoalesced": uncoalesced,
        "empty": torch.zeros(4, 5).to_sparse(),
    }


@pytest.mark.parametrize("where", ["ckpt", "x.pt"])
@pytest.mark.filterwarnings("ignore:Sparse")
def test_sparse_tensors_round_trip(tmp_path, where):
    state = _sparse()
    back, features = _roundtrip(tmp_path, state, where)
    for k, t in state.items():
        got = back[k]
        assert got.layout == t.layout and got.shape == t.shape and got.dtype == t.dtype
        assert torch.equal(got.to_dense(), t.to_dense())
        if t.layout == torch.sparse_coo:
            assert got.is_coalesced() == t.is_coalesced()
    assert TREE_TYPES in features
    ck = ir.read_checkpoint(str(tmp_path / where))
    assert {"coo/indices", "coo/values", "csr/crow_indices", "csr/col_indices"} <= set(ck.tensors)
    assert ck.tree["csr"].layout == "csr" and len(ck.tree["csr"].parts) == 3


@pytest.mark.filterwarnings("ignore:Sparse")
def test_sparse_parts_inconsistent_with_the_shape_are_a_corrupt_tree():
    idx, values = torch.tensor([[5], [0]]), torch.tensor([1.0])
    tree = {"$sparse": "coo", "shape": [2, 2], "parts": [{"$tensor": 0}, {"$tensor": 1}]}
    check_tree({**tree, "coalesced": False}, 2)  # the structure is fine; the values are not
    with pytest.raises(TreeError, match="not consistent"):
        unflatten({**tree, "coalesced": False}, [idx, values])
    unsorted = torch.tensor([[1, 0], [0, 0]])
    with pytest.raises(TreeError, match="not consistent"):
        unflatten({**tree, "coalesced": True}, [unsorted, torch.ones(2)])


def test_a_sparse_tensor_that_requires_grad_is_refused():
    t = torch.eye(2).to_sparse().requires_grad_()
    with pytest.raises(ckptguard.UnsupportedObjectError, match="sparse tensor that requires grad"):
        flatten({"w": t})


def test_a_reader_without_the_feature_refuses_by_name(tmp_path, monkeypatch):
    ckptguard.save({"s": {1, 2}}, tmp_path / "c")
    from ckptguard.format import manifest

    older = manifest.KNOWN_FEATURES - {TREE_TYPES}
    monkeypatch.setattr(manifest, "KNOWN_FEATURES", older)
    with pytest.raises(ckptguard.FormatVersionError, match="tree-types"):
        ckptguard.load(tmp_path / "c")


def test_the_registry_is_safe_across_threads():
    import threading

    classes = [dataclasses.make_dataclass(f"T{i}", [("v", int)]) for i in range(64)]

    def work(cls: type) -> None:
        for _ in range(50):
            ckptguard.register_types(cls)
            ckptguard.unregister_types(cls)
        ckptguard.register_types(cls)

    threads = [threading.Thread(target=work, args=(c,)) for c in classes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert set(classes) <= set(ckptguard.registered_types())
    finally:
        ckptguard.unregister_types(*classes)
    assert not set(classes) & set(ckptguard.registered_types())


@pytest.mark.parametrize("where", ["ckpt", "x.pt"])
def test_structured_numpy_arrays_round_trip(tmp_path, where):
    rec = np.array(
        [(1, 2.5, True), (-3, np.nan, False)], dtype=[("x", "i4"), ("y", "f8"), ("ok", "?")]
    )
    state = {
        "rec": rec,
        "grid": np.zeros((2, 0, 3), dtype=[("a", "u2"), ("z", "c8")]),
        "scalar": np.array((7, 1.5), dtype=[("n", "i8"), ("v", "f2")]),
        "view": rec[::-1],  # not contiguous: stored in C order
    }
    back, features = _roundtrip(tmp_path, state, where)
    for k, a in state.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape
        assert a.tobytes() == np.ascontiguousarray(back[k]).tobytes()
    assert TREE_TYPES in features
    ck = ir.read_checkpoint(str(tmp_path / where))
    assert ck.tree["rec"].fields == (("x", "int32"), ("y", "float64"), ("ok", "bool"))
    assert ck.tensors["rec"].dtype == "uint8" and ck.tensors["rec"].shape == (26,)


@pytest.mark.parametrize(
    "dtype",
    [
        [("a", ">i4")],  # not native
        np.dtype([("a", "i1"), ("b", "i4")], align=True),  # padding
        [("a", "i4", (2,))],  # a sub-array
        [("a", [("b", "i4")])],  # nested
        [("a", "O")],
        [("a", "U3")],
    ],
)
def test_structured_dtypes_that_are_not_plain_are_refused(dtype):
    with pytest.raises(ckptguard.UnsupportedObjectError, match="structured dtype") as e:
        flatten({"q": [np.zeros(2, dtype=dtype)]})
    assert e.value.key_path == "q/0"


def test_structured_data_of_the_wrong_size_is_a_corrupt_tree():
    tree = {"$structured": [["a", "int32"]], "shape": [2], "data": {"$tensor": 0}}
    check_tree(tree, 1)
    assert unflatten(tree, [np.zeros(8, np.uint8)]).dtype == np.dtype([("a", "i4")])
    for bad in (np.zeros(7, np.uint8), np.zeros(2, np.int32), torch.zeros(8, dtype=torch.uint8)):
        with pytest.raises(TreeError, match="structured data"):
            unflatten(tree, [bad])


def test_a_class_that_refuses_its_fields_is_a_typed_error_naming_the_path(tmp_path):
    @dataclasses.dataclass
    class Checked:
        n: int

        def __post_init__(self) -> None:
            if self.n < 0:
                raise ValueError("n must be >= 0")

    ckptguard.register_types(Checked)
    try:
        tree = {"a": {"$dict": [[1, {"$dataclass": _name(Checked), "fields": {"n": -1}}]]}}
        with pytest.raises(ckptguard.RegisteredTypeError, match="n must be >= 0") as e:
            unflatten(tree, [])
        assert e.value.key_path == "a/1"
    finally:
        ckptguard.unregister_types(Checked)


def test_an_unregistered_enum_key_is_named_by_its_path(registered):
    tree = {"k": {"$dict": [[{"$enum": "no.Such", "name": "A"}, 1]]}}
    with pytest.raises(ckptguard.RegisteredTypeError, match="no.Such") as e:
        unflatten(tree, [])
    assert e.value.key_path == 'k/{"$enum":"no.Such","name":"A"}'


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_a_new_type_in_another_ranks_tree_lists_the_feature(tmp_path):
    from threadcoord import ThreadCoordinator, run_ranks

    path = str(tmp_path / "c")

    def rank_main(coord: ThreadCoordinator) -> None:
        tags: Any = {"a", "b"} if coord.rank == 1 else ["a", "b"]
        state = {"w": torch.ones(2), "tags": tags, "rank": coord.rank}
        ckptguard.save(state, path, coordinator=coord)

    run_ranks(2, rank_main, abort_on_error=True)
    with CheckpointReader(path) as rd:
        assert TREE_TYPES in rd.features and rd.manifest["tree"]["tags"] == ["a", "b"]
    assert ckptguard.load(path)["tags"] == ["a", "b"]
    ck = ir.read_checkpoint(path)
    assert ck.rank_trees[1]["tags"] == {"a", "b"}
