"""``nn.Module`` state dicts and object identity through ckptguard.save/load, each checked
against torch.save/torch.load on the same object: a state dict's ``_metadata`` (format.md
section 6.2, an ``$odict``'s ``metadata``), which tensors load as one object and which as
distinct objects sharing memory, and the common modules through ``load_state_dict(strict=True)``
on a fresh module."""

from __future__ import annotations

import collections
import copy
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import independent_reader as ir
import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from conftest import resign_manifest
from threadcoord import ThreadCoordinator, run_ranks
from torch import nn

import ckptguard
from ckptguard.format.ranktrees import TextDiffer, apply_diff

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
qnn = torch.ao.nn.quantized


def _torch(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _ours(tmp_path: Path, obj: Any, name: str = "c") -> Any:
    path = tmp_path / name
    ckptguard.save(obj, path)
    return ckptguard.load(path)


def _features(path: Path) -> list[str]:
    return ir.parse_manifest(ir.read_manifest_bytes(str(path)))["features"]


def _qweight(shape: tuple[int, ...], per_channel: bool) -> torch.Tensor:
    w = torch.randn(shape)
    if not per_channel:
        return torch.quantize_per_tensor(w, 0.05, 0, torch.qint8)
    n = shape[0]
    scales = torch.rand(n, dtype=torch.float64) * 0.1 + 0.01
    return torch.quantize_per_channel(w, scales, torch.zeros(n, dtype=torch.long), 0, torch.qint8)


def _qlinear(per_channel: bool) -> nn.Module:
    m = qnn.Linear(4, 3)
    m.set_weight_bias(_qweight((3, 4), per_channel), torch.randn(3))
    return m


def _qconv(per_channel: bool) -> nn.Module:
    m = qnn.Conv2d(2, 4, 3)
    m.set_weight_bias(_qweight((4, 2, 3, 3), per_channel), torch.randn(4))
    return m


class _WithExtra(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.extra = {"calls": 0, "names": ("a", "b")}

    def get_extra_state(self) -> Any:
        return self.extra

    def set_extra_state(self, state: Any) -> None:
        self.extra = state


class _Symmetric(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.triu() + x.triu(1).transpose(0, 1)


def _parametrized() -> nn.Module:
    m = nn.Linear(3, 3)
    parametrize.register_parametrization(m, "weight", _Symmetric())
    return m


def _batchnorm() -> nn.Module:
    m = nn.BatchNorm2d(3)
    m(torch.randn(4, 3, 2, 2))  # running statistics and num_batches_tracked
    return m


MODULES: dict[str, Callable[[], nn.Module]] = {
    "batchnorm": _batchnorm,
    "layernorm": lambda: nn.LayerNorm(4),
    "embedding": lambda: nn.Embedding(6, 3),
    "lstm": lambda: nn.LSTM(3, 4, num_layers=2),
    "multihead_attention": lambda: nn.MultiheadAttention(4, 2),
    "quantized_linear": lambda: _qlinear(False),
    "quantized_linear_per_channel": lambda: _qlinear(True),
    "quantized_conv2d": lambda: _qconv(False),
    "quantized_conv2d_per_channel": lambda: _qconv(True),
    "extra_state": _WithExtra,
    "parametrize": _parametrized,
    "weight_norm": lambda: nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)),
    "weight_norm_hook": lambda: nn.utils.weight_norm(nn.Linear(3, 3)),
}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_quantized:
            return (
                b.is_quantized
                and a.qscheme() == b.qscheme()
                and bool(
                    torch.equal(a.int_repr(), b.int_repr())
                    and torch.equal(a.dequantize(), b.dequantize())
                )
            )
        return bool(torch.equal(a, b))
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return bool(a == b)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_state_dict_loads_strictly_like_torch_save(tmp_path: Path, name: str) -> None:
    """The state dict loads into a fresh module with ``strict=True`` and leaves it as
    torch.save's round trip leaves another; the loaded dict has torch's ``_metadata``."""
    torch.manual_seed(0)
    make = MODULES[name]
    sd = make().state_dict()
    ours, theirs = _ours(tmp_path, sd), _torch(sd)
    assert ours._metadata == theirs._metadata == sd._metadata
    torch.manual_seed(1)
    a, b = make(), make()
    a.load_state_dict(ours, strict=True)
    b.load_state_dict(theirs, strict=True)
    assert _equal(a.state_dict(), b.state_dict())
    assert _equal(a.state_dict(), sd)
    if name == "extra_state":
        assert a.extra == b.extra == {"calls": 0, "names": ("a", "b")}


def test_quantized_linear_needs_the_metadata(tmp_path: Path) -> None:
    """Without ``_metadata`` a quantized Linear takes the state for an old layout (KeyError
    'weight'): the metadata is what makes it load, as after torch.load."""
    sd = qnn.Linear(4, 4).state_dict()
    out = _ours(tmp_path, sd)
    qnn.Linear(4, 4).load_state_dict(out)
    del out._metadata
    with pytest.raises(KeyError, match="weight"):
        qnn.Linear(4, 4).load_state_dict(out)


def test_metadata_round_trip_and_feature(tmp_path: Path) -> None:
    """An OrderedDict's ``_metadata`` is the ``$odict``'s ``metadata`` (feature tree-types,
    listed exactly when some OrderedDict has one); one without the attribute loads without it."""
    sd = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).state_dict()
    plain = collections.OrderedDict(a=1)
    state = {"model": sd, "plain": plain, "nested": [sd]}
    out = _ours(tmp_path, state, "with")
    assert out["model"]._metadata == sd._metadata == _torch(state)["model"]._metadata
    assert out["nested"][0]._metadata == sd._metadata
    assert not hasattr(out["plain"], "_metadata") and not hasattr(_torch(plain), "_metadata")
    assert "tree-types" in _features(tmp_path / "with")
    tree = ir.parse_manifest(ir.read_manifest_bytes(str(tmp_path / "with")))["tree"]
    assert tree["model"]["metadata"] == {
        "$odict": [["", {"version": 1}], ["0", {"version": 1}], ["1", {"version": 2}]]
    }
    _ours(tmp_path, {"plain": plain}, "without")
    assert "tree-types" not in _features(tmp_path / "without")
    ck = ir.read_checkpoint(str(tmp_path / "with"))  # the reader written from the spec
    assert ck.tree["model"]._metadata == collections.OrderedDict(sd._metadata)


@pytest.mark.parametrize(
    "metadata",
    [{"w": torch.ones(1)}, {"s": {1, 2}}, [nn.Linear(1, 1).weight], {"x": object()}],
    ids=["tensor", "set", "parameter", "object"],
)
def test_metadata_that_is_not_plain_is_refused(tmp_path: Path, metadata: Any) -> None:
    od = collections.OrderedDict(w=torch.zeros(2))
    od._metadata = metadata  # type: ignore[attr-defined]
    with pytest.raises(ckptguard.UnsupportedObjectError, match="_metadata") as e:
        ckptguard.save({"model": {"sd": od}}, tmp_path / "c")
    assert e.value.key_path.startswith("model/sd")  # the OrderedDict's, or the value's in it
    assert not (tmp_path / "c").exists()


def test_extra_state_that_cannot_be_stored_names_its_key(tmp_path: Path) -> None:
    """A module's extra state is a value of its state dict: one ckptguard cannot store without
    pickle is refused naming its key path."""
    m = _WithExtra()
    m.extra = {"opaque": object()}
    with pytest.raises(ckptguard.UnsupportedObjectError) as e:
        ckptguard.save({"m": m.state_dict()}, tmp_path / "c")
    assert e.value.key_path == "m/_extra_state/opaque"


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t: t["sd"].update({"$dict": t["sd"].pop("$odict")}), r"\$dict with metadata"),
        (lambda t: t["sd"].update(metadata={"w": {"$tensor": 0}}), "not a plain value"),
        (lambda t: t["sd"].update(metadata={"$set": []}), "not a plain value"),
    ],
    ids=["on_a_dict", "tensor", "set"],
)
def test_stored_metadata_that_breaks_the_rules_is_corrupt(
    tmp_path: Path, change: Callable[[dict], None], match: str
) -> None:
    """A ``$dict`` with ``metadata``, or metadata that is not a plain value, is a corrupt tree
    (the error names the mapping's key path); the independent reader refuses it too."""
    od = collections.OrderedDict(w=torch.zeros(2), **{"$k": 1})
    od._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    ckptguard.save({"sd": od}, tmp_path / "c")
    resign_manifest(tmp_path / "c", lambda b: change(b["tree"]))
    with pytest.raises(ckptguard.CorruptCheckpointError, match=match) as e:
        ckptguard.load(tmp_path / "c")
    assert "'sd'" in str(e.value)
    assert not ckptguard.verify(tmp_path / "c").ok
    with pytest.raises(ir.SpecViolation):
        ir.read_checkpoint(str(tmp_path / "c"))


def test_metadata_without_the_feature_is_corrupt(tmp_path: Path) -> None:
    ckptguard.save({"sd": nn.Linear(1, 1).state_dict()}, tmp_path / "c")
    resign_manifest(tmp_path / "c", lambda b: b["features"].remove("tree-types"))
    with pytest.raises(ckptguard.CorruptCheckpointError, match="tree-types"):
        ckptguard.load(tmp_path / "c")
    with pytest.raises(ir.SpecViolation):
        ir.read_checkpoint(str(tmp_path / "c"))


# ---- object identity, as torch.save keeps it ------------------------------------------------


def _identity(out: dict) -> dict[str, Any]:
    def ptr(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    return {
        "same_object": out["a"] is out["b"],
        "views_distinct": out["x"] is not out["y"],
        "views_share": ptr(out["x"]) == ptr(out["y"]) == ptr(out["base"]),
        "views_write_through": _writes_through(out["x"], out["y"]),
        "quantized_same_object": out["p"] is out["q"],
        "quantized_distinct": out["p"] is not out["r"],
    }


def _writes_through(x: torch.Tensor, y: torch.Tensor) -> bool:
    x[0] = 123.0
    return bool(y[0] == 123.0)


def test_object_identity_matches_torch_save(tmp_path: Path) -> None:
    """(a) one tensor object twice loads as one object; (b) two objects that are the same view
    of one storage load as two objects sharing it; (c) one quantized tensor twice loads as one
    object, and an equal but distinct one as another: each as torch.save's round trip."""
    t = torch.randn(4)
    base = torch.randn(6)
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    r = torch.quantize_per_tensor(q.dequantize(), 0.1, 0, torch.qint8)  # equal, not q
    state = {"a": t, "b": t, "base": base, "x": base[1:3], "y": base[1:3], "p": q, "q": q, "r": r}
    want = _identity(_torch(state))
    assert want == dict.fromkeys(want, True)
    assert _identity(_ours(tmp_path, state)) == want


def test_per_channel_quantized_twice_is_one_object(tmp_path: Path) -> None:
    w = _qweight((3, 2), per_channel=True)
    out = _ours(tmp_path, {"w": w, "again": [w]})
    assert out["w"] is out["again"][0]
    assert torch.equal(out["w"].int_repr(), w.int_repr())
    ck = ir.read_checkpoint(str(tmp_path / "c"))
    assert ck.tree["w"] is ck.tree["again"][0]


def test_detached_tied_weights_share_memory_as_two_tensors(tmp_path: Path) -> None:
    """A state dict's tied weights (two detached objects of one view) load as two tensors
    sharing memory, as after torch.load; the second is stored as a view (no bytes of its own)."""
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)})
    model["head"].weight = model["emb"].weight
    sd = model.state_dict()
    out = _ours(tmp_path, sd)
    ref = _torch(sd)
    for got in (out, ref):
        assert got["emb.weight"] is not got["head.weight"]
        assert got["emb.weight"].data_ptr() == got["head.weight"].data_ptr()
    ck = ir.read_checkpoint(str(tmp_path / "c"))
    assert ck.tensors["head.weight"].view is not None
    assert ckptguard.describe(tmp_path / "c").info.raw_bytes == 10 * 4 * 4
    fresh = nn.ModuleDict({"emb": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)})
    fresh["head"].weight = fresh["emb"].weight
    ckptguard.load(tmp_path / "c", template=fresh.state_dict())
    assert torch.equal(fresh["emb"].weight, model["emb"].weight)


# ---- per-rank trees --------------------------------------------------------------------------


def test_rank_diffs_descend_into_metadata_odicts() -> None:
    """Two ranks' state dicts that differ in one value differ in one diff entry, inside the
    ``$odict`` with metadata (the pairs or the metadata), not the whole dict."""
    base = {
        "$odict": [["w", {"$tensor": 0}], ["n", 1]],
        "metadata": {"$odict": [["", {"version": 1}]]},
    }
    other = json.loads(json.dumps(base))
    other["$odict"][1][1] = 2
    other["metadata"]["$odict"][0][1]["version"] = 3
    text = json.dumps(other, separators=(",", ":"))
    diff = TextDiffer(json.dumps(base, separators=(",", ":"))).diff(text)
    assert diff == [
        [["$odict", 1, 1], 2],
        [["metadata", "$odict", 0, 1, "version"], 3],
    ]
    assert apply_diff(base, diff) == other


def test_ranks_with_state_dicts_store_small_diffs(tmp_path: Path) -> None:
    """Each rank saves its model's state dict and its rank: the rank trees are diffs of one
    entry each, and every rank loads its own values and the metadata."""
    path = tmp_path / "c"
    # Built once: the ranks are threads, and torch's global RNG is not theirs alone.
    torch.manual_seed(0)
    sd = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).state_dict()

    def main(coord: ThreadCoordinator) -> None:
        mine = copy.deepcopy(sd)  # each rank its own tensors, equal values, the same _metadata
        ckptguard.save({"model": mine, "rank": coord.rank}, path, coordinator=coord, timeout=60)

    run_ranks(2, main, abort_on_error=True)
    body = ir.parse_manifest(ir.read_manifest_bytes(str(path)))
    assert body["rank_trees"] == {"1": [[["rank"], 1]]}
    for rank in (0, 1):
        out = ckptguard.load(path, rank=rank)
        assert out["rank"] == rank
        assert out["model"]._metadata["1"] == {"version": 2}
