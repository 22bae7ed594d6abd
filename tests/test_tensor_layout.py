"""Layout round trip (docs/format.md section 3.2, feature ``tensor-views``): strides, storage
offsets and storage sharing load as torch.load gives them; numpy arrays as numpy's pickle (and
so torch.save) keeps them; every load path; hostile view entries refused by a typed error.

(tests/test_layout.py is format/layout.py's: checkpoint names.)"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import independent_reader as ir
import numpy as np
import pytest
import torch
from conftest import resign_manifest
from threadcoord import ThreadCoordinator, run_ranks

import ckptguard
from ckptguard.format import manifest
from ckptguard.format.views import TENSOR_VIEWS


def _torch_roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _ours(tmp_path: Path, obj: Any, name: str = "c", **kw: Any) -> Any:
    path = tmp_path / "s" / name
    ckptguard.save(obj, path, **kw)
    return ckptguard.load(path)


def _body(path: Path) -> dict:
    return ir.parse_manifest(ir.read_manifest_bytes(str(path)))


def _start(t: torch.Tensor) -> int:
    """Byte address of a tensor's first element within its storage."""
    return t.storage_offset() * t.element_size()


def _facts(out: dict) -> dict:
    """What a layout round trip must keep of each tensor (shape, strides, dtype, values,
    memory format) and of each pair (whether they share memory, and then how far apart their
    first elements lie): the same after torch.load and after ckptguard.load."""
    ts = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    each = {
        k: (t.shape, t.stride(), t.dtype, t.is_contiguous(memory_format=torch.channels_last))
        for k, t in ts.items()
    }
    pairs = {}
    for a, ta in ts.items():
        for b, tb in ts.items():
            shared = ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr()
            pairs[(a, b)] = _start(tb) - _start(ta) if shared else None
    return {"each": each, "pairs": pairs}


def _state() -> dict:
    w = torch.arange(24.0).reshape(4, 6)
    fused = torch.arange(36.0).reshape(9, 4)
    q, k, v = fused.chunk(3)  # slices of a fused weight, saved without it
    big = torch.arange(100, dtype=torch.int16).reshape(10, 10)
    return {
        "w": w,
        "w.t": w.t(),
        "w.rows": w[1:],
        "w.flat": w.view(-1),
        "w.col": w[:, 2],
        "w.elem": w[2, 3],  # a 0-d view
        "q": q,
        "k": k,
        "v": v,
        "stepped": torch.arange(50, dtype=torch.int64)[3::7],
        "expanded": torch.arange(3.0).expand(5, 3),
        "channels_last": torch.arange(120.0)
        .reshape(2, 3, 4, 5)
        .to(memory_format=torch.channels_last),
        "narrow": big.narrow(1, 2, 3),
        "bf16": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4).t(),
        "bool": (torch.arange(12) % 3 == 0).reshape(3, 4)[:, ::2],
        "plain": torch.ones(7),
    }


@pytest.fixture(params=["dir", "onefile"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return tmp_path / ("s/c" if request.param == "dir" else "c.pt")


def test_layouts_and_sharing_are_torch_loads(where: Path) -> None:
    """Every tensor's shape, strides, dtype and memory format, and which share memory how far
    apart, as torch.save/torch.load gives them; the values too."""
    state = _state()
    ckptguard.save(state, where)
    out = ckptguard.load(where)
    ref = _torch_roundtrip(state)
    assert _facts(out) == _facts(ref) == _facts(state)
    for k, v in state.items():
        assert torch.equal(out[k], v), k


@pytest.mark.parametrize("key", ["w", "w.t", "w.rows", "w.elem", "q", "stepped", "narrow"])
def test_writes_through_one_view_reach_every_other(tmp_path: Path, key: str) -> None:
    """Mutated after loading, one tensor's change is seen by every tensor sharing its memory,
    exactly as after torch.load."""
    state = _state()
    mine, theirs = _ours(tmp_path, state), _torch_roundtrip(state)
    for out in (mine, theirs):
        with torch.no_grad():
            out[key].fill_(-1) if out[key].dtype != torch.bool else out[key].fill_(False)
    for k in state:
        assert torch.equal(mine[k], theirs[k]), (key, k)


def test_spans_keep_only_the_bytes_views_reach(tmp_path: Path) -> None:
    """A group's storage is the span its members reach, never the whole storage torch.save
    writes: a narrow column of a large matrix keeps its rows' span, a view alone that is
    contiguous keeps its own bytes."""
    big = torch.arange(10000.0).reshape(100, 100)
    other = torch.arange(10000.0).reshape(100, 100)
    state = {"col": big[10:20, 5:8], "row": other[50], "exp": torch.zeros(4).expand(1000, 4)}
    out = _ours(tmp_path, state)
    assert out["col"].untyped_storage().nbytes() == (9 * 100 + 3) * 4
    assert "view" not in _body(tmp_path / "s" / "c")["tensors"][1]  # "row": as it always was
    assert out["exp"].untyped_storage().nbytes() == 4 * 4 and out["exp"].stride() == (0, 1)
    info = ckptguard.describe(tmp_path / "s" / "c")
    assert info.info.raw_bytes == (903 + 100 + 4) * 4
    for k, v in state.items():
        assert torch.equal(out[k], v) and out[k].stride() == v.stride()


def test_same_object_twice_is_one_object(tmp_path: Path) -> None:
    """The same tensor object twice loads as one object, as torch.load gives it; two objects
    that are the same view of one storage (a state_dict's detached tied weights) load as two
    objects sharing that memory, as torch.load gives them."""
    emb = torch.nn.Embedding(10, 4)
    model = torch.nn.ModuleDict({"emb": emb, "head": torch.nn.Linear(4, 10, bias=False)})
    model["head"].weight = emb.weight  # tied
    sd = model.state_dict()
    assert sd["emb.weight"] is not sd["head.weight"]  # state_dict detaches: two objects
    w = torch.randn(3, 3)
    out = _ours(tmp_path, {"sd": sd, "a": w, "b": w, "c": w[:]})
    ref = _torch_roundtrip({"sd": sd, "a": w, "b": w, "c": w[:]})
    for got in (out, ref):
        assert got["a"] is got["b"]
        assert got["sd"]["emb.weight"] is not got["sd"]["head.weight"]
        assert got["sd"]["emb.weight"].data_ptr() == got["sd"]["head.weight"].data_ptr()
        assert got["c"] is not got["a"] and got["c"].data_ptr() == got["a"].data_ptr()


def test_tied_embedding_through_a_view(tmp_path: Path) -> None:
    """A head that is the transpose of the embedding (weights tied through a view) loads
    sharing the embedding's memory: a training step on one reaches the other."""
    emb = torch.nn.Parameter(torch.randn(10, 4))
    state = {"emb": emb, "head": emb.detach().t(), "step": 3}
    out = _ours(tmp_path, state)
    assert isinstance(out["emb"], torch.nn.Parameter) and out["head"].stride() == (1, 4)
    with torch.no_grad():
        out["emb"][2, 1] = 100.0
    assert out["head"][1, 2] == 100.0


def test_parameters_and_grad_flags_of_views(tmp_path: Path) -> None:
    """A view keeps its own Parameter and requires_grad facts; its storage keeps its own."""
    base = torch.randn(4, 4)
    state = {"p": torch.nn.Parameter(base.t()), "g": base[1:].requires_grad_(True), "b": base}
    out = _ours(tmp_path, state)
    assert isinstance(out["p"], torch.nn.Parameter) and out["p"].stride() == (1, 4)
    assert out["g"].requires_grad and out["g"].is_leaf and not out["b"].requires_grad
    assert out["p"].data_ptr() == out["b"].data_ptr()


def test_mixed_dtypes_in_one_storage_align_the_span(tmp_path: Path) -> None:
    """Views of other dtypes of one storage (torch.save refuses them: "Cannot save multiple
    tensors or storages that view the same data as different types"), starting past the
    storage's first byte: the span starts at a multiple of the widest element, so every view's
    offset is whole in its own elements."""
    u8 = torch.arange(32, dtype=torch.uint8)
    state = {"a": u8[5:], "b": u8[8:16].view(torch.int32), "c": u8[6:10].view(torch.int16)}
    out = _ours(tmp_path, state)
    assert _facts(out) == _facts(state)
    body = _body(tmp_path / "s" / "c")
    storage = [t for t in body["tensors"] if t["key"].endswith("%storage")]
    assert [(t["dtype"], t["shape"]) for t in storage] == [("uint8", [28])]  # bytes 4..32


def test_numpy_as_torch_save_keeps_it(tmp_path: Path) -> None:
    """numpy arrays as torch.save keeps them (numpy's pickle): Fortran order stays Fortran
    order (the transpose of a C array too); any other layout loads C-contiguous; the same
    array twice is one array; views of one array share nothing."""
    a = np.arange(24.0).reshape(4, 6)
    state = {
        "base": a,
        "same": a,
        "fortran": np.asfortranarray(a),
        "transposed": a.T,
        "stepped": a[:, ::2],
        "rows": a[1:],
        "f3": np.asfortranarray(np.arange(24, dtype=np.int16).reshape(2, 3, 4)),
    }
    mine, theirs = _ours(tmp_path, state), _torch_roundtrip(state)
    for k in state:
        for out in (mine, theirs):
            assert np.array_equal(out[k], state[k]), k
        assert mine[k].strides == theirs[k].strides, k
        assert mine[k].flags.f_contiguous == theirs[k].flags.f_contiguous, k
        assert mine[k].flags.c_contiguous == theirs[k].flags.c_contiguous, k
    for out in (mine, theirs):
        assert out["same"] is out["base"] and not np.shares_memory(out["rows"], out["base"])
        assert out["fortran"].flags.writeable


def test_contiguous_unshared_tensors_are_written_as_before(tmp_path: Path) -> None:
    """A state without shared or non-contiguous tensors lists no feature and no view: it is
    written exactly as before (tests/test_format_stability.py pins its bytes)."""
    path = tmp_path / "s" / "c"
    ckptguard.save({"a": torch.ones(3, 4), "b": np.zeros((2, 2)), "c": torch.arange(5)[1:]}, path)
    body = _body(path)
    assert TENSOR_VIEWS not in body["features"]
    assert not any("view" in t for t in body["tensors"])
    assert [t["key"] for t in body["tensors"]] == ["a", "b", "c"]


def test_view_entries_and_the_independent_reader(where: Path) -> None:
    """The manifest holds each view's storage, offset and strides; the reader written from
    docs/format.md gathers each view's values from its storage's bytes."""
    state = _state()
    ckptguard.save(state, where)
    ck = ir.read_checkpoint(str(where))
    assert TENSOR_VIEWS in ck.manifest["features"]
    views = {t.key: t.view for t in ck.by_id if t.view is not None}
    assert views["w.t"] == {"storage": 0, "offset": 0, "stride": [1, 6]}
    assert views["w.elem"]["offset"] == 15 and views["w.elem"]["stride"] == []
    for key, value in state.items():
        got = ck.tensors[key]
        want = value.float() if value.dtype == torch.bfloat16 else value
        mine = torch.from_numpy(got.numpy().copy())
        if value.dtype == torch.bfloat16:
            mine = mine.view(torch.bfloat16).reshape(value.shape).float()
        assert torch.equal(mine.reshape(value.shape), want), key
    assert all(not r["key"].startswith("w.") for r in ck.rows)  # views have no chunks


# ---- load paths -----------------------------------------------------------------------------


def test_template_naming_views_fills_their_values(tmp_path: Path) -> None:
    """A template naming views (and a Shard of one) is filled with their values, in the
    template's own memory; the views it does not name still share their storage."""
    path = tmp_path / "s" / "c"
    state = _state()
    ckptguard.save(state, path)
    tpl = {
        "w.t": torch.zeros(6, 4),
        "narrow": torch.zeros(3, 10, dtype=torch.int16).t(),  # a template of another layout
        "stepped": ckptguard.Shard(
            torch.zeros(3, dtype=torch.int64), offsets=(2,), global_shape=(7,)
        ),
    }
    held = {k: (v.local if isinstance(v, ckptguard.Shard) else v) for k, v in tpl.items()}
    out = ckptguard.load(path, template=tpl)
    assert out["w.t"] is held["w.t"] and torch.equal(held["w.t"], state["w.t"])
    assert torch.equal(held["narrow"], state["narrow"]) and held["narrow"].stride() == (1, 10)
    assert torch.equal(held["stepped"], state["stepped"][2:5])
    assert out["w.rows"].data_ptr() == out["w"].data_ptr() + 6 * 4  # the others, as saved


def test_template_filling_a_storage_is_never_aliased(tmp_path: Path) -> None:
    """A template that fills a storage in place: the views it does not name get memory of
    their own, with the saved values, and writing the template reaches none of them."""
    path = tmp_path / "s" / "c"
    w = torch.arange(12.0).reshape(3, 4)
    ckptguard.save({"w": w, "t": w.t(), "r": w[1]}, path)
    mine = torch.zeros(3, 4)
    out = ckptguard.load(path, template={"w": mine})
    assert out["w"] is mine and torch.equal(mine, w)
    assert torch.equal(out["t"], w.t()) and out["t"].data_ptr() != mine.data_ptr()
    assert out["t"].data_ptr() == out["r"].data_ptr() - 4 * 4  # still views of one storage
    mine.zero_()
    assert torch.equal(out["t"], w.t())


@pytest.mark.parametrize(
    "map_location",
    [
        "cpu",
        {"cpu": "cpu"},
        lambda saved: "cpu",
        lambda storage, loc: storage,
        lambda storage, loc: storage.clone(),
    ],
    ids=["str", "dict", "device-fn", "torch-fn", "torch-fn-copy"],
)
def test_map_location_keeps_sharing(tmp_path: Path, map_location: Any) -> None:
    """Every kind of map_location moves a storage once; its views follow it."""
    path = tmp_path / "s" / "c"
    state = _state()
    ckptguard.save(state, path)
    out = ckptguard.load(path, map_location=map_location)
    assert _facts(out) == _facts(state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_views_of_cuda_tensors_load_on_the_device(tmp_path: Path) -> None:
    """A group saved from the GPU loads on it, its views sharing one device storage; moved by
    map_location to the CPU, they share a host storage."""
    state = {k: v.cuda() for k, v in _state().items()}
    state["cl"] = torch.randn(2, 3, 4, 5, device="cuda").to(memory_format=torch.channels_last)
    path = tmp_path / "s" / "c"
    ckptguard.save(state, path)
    on_gpu = ckptguard.load(path)
    assert all(v.is_cuda for v in on_gpu.values()) and _facts(on_gpu) == _facts(state)
    on_cpu = ckptguard.load(path, map_location="cpu")
    assert _facts(on_cpu) == _facts(state)
    for k, v in state.items():
        assert torch.equal(on_cpu[k], v.cpu()), k


def test_verify_export_and_restore(tmp_path: Path) -> None:
    """verify passes; safetensors and HDF5 hold each view's values contiguous; a torch export
    keeps the sharing (it is the object as load returns it)."""
    from safetensors.torch import load_file

    path = tmp_path / "s" / "c"
    state = _state()
    ckptguard.save(state, path)
    assert ckptguard.verify(path).ok
    ckptguard.export(path, to="safetensors", dest=tmp_path / "st")
    st = load_file(str(tmp_path / "st" / "model.safetensors"))
    assert sorted(st) == sorted(state)  # views by their key; storages are no value of the tree
    for k, v in state.items():
        assert torch.equal(st[k], v) and st[k].is_contiguous(), k
    ckptguard.export(path, to="torch", dest=tmp_path / "pt")
    back = torch.load(tmp_path / "pt" / "checkpoint.pt", weights_only=True)
    assert _facts(back) == _facts(state)


def test_import_of_a_torch_save_file_keeps_sharing(tmp_path: Path) -> None:
    """ckptguard import (and load) of a torch.save file: its views share memory as they did."""
    src = tmp_path / "model.pt"
    state = _state()
    torch.save(state, src)
    ckptguard.import_checkpoint(src, tmp_path / "s" / "imported")
    out = ckptguard.load(tmp_path / "s" / "imported")
    assert _facts(out) == _facts(state)


def test_async_save_keeps_layout(tmp_path: Path) -> None:
    """save_async snapshots a group's span once; the views load as from a synchronous save."""
    state = _state()
    ckptguard.save_async(state, tmp_path / "s" / "a").result()
    out = ckptguard.load(tmp_path / "s" / "a")
    assert _facts(out) == _facts(state)


def test_views_travel_to_the_agent(tmp_path: Path) -> None:
    """A snapshot handed to the agent (``ckptguard run``): a view travels as its ``view``
    member and no bytes; the agent's side rebuilds it as a view of the storage it names."""
    import mmap

    from ckptguard.agent import handover
    from ckptguard.capture import capture, refs_bytes
    from ckptguard.pool import HostPool
    from ckptguard.tree import flatten

    w = torch.arange(12.0).reshape(3, 4)
    flat = ckptguard.tree.Flat(*flatten({"w": w, "t": w.t(), "s": w[:, 1]}))
    assert refs_bytes(flat.refs) == 64  # the storage's 48 bytes, aligned: the views take none
    pool = HostPool(1 << 16, pin=False)
    snap = capture(flat, pool.acquire(refs_bytes(flat.refs)))
    snap.wait()
    refs = snap.state.refs
    assert [r.value is None for r in refs] == [False, True, True]
    m = mmap.mmap(-1, 1 << 12)
    base = torch.frombuffer(memoryview(m), dtype=torch.uint8)
    base[:48].copy_(refs[0].value.view(-1).view(torch.uint8))
    msgs = [
        {
            "key": r.key,
            "dtype": r.dtype,
            "shape": list(r.shape),
            "kind": r.kind,
            "device": r.device,
            "global_shape": list(r.global_shape),
            "offsets": list(r.offsets),
            "offset": 0,
            "nbytes": 0 if r.view else 48,
            "view": None if r.view is None else r.view.to_json(),
        }
        for r in refs
    ]
    back = [handover._ref(t, m, base) for t in msgs]
    assert [r.view for r in back] == [r.view for r in refs]
    bad = {**msgs[1], "view": {"storage": "w", "offset": -1, "stride": [1, 4]}}
    with pytest.raises(handover.HandoffError, match="bad view"):
        handover._ref(bad, m, base)


# ---- sharded tensors and ranks --------------------------------------------------------------


def _ranks(n: int, main: Callable[[ThreadCoordinator], Any]) -> None:
    run_ranks(n, main, abort_on_error=True)


def test_replicated_views_on_every_rank(tmp_path: Path) -> None:
    """Ranks that each hold the same tied state write the storage once; the views agree."""
    path = tmp_path / "s" / "c"

    def main(coord: ThreadCoordinator) -> None:
        ckptguard.save(_state(), path, coordinator=coord, timeout=60)

    _ranks(2, main)
    assert _facts(ckptguard.load(path)) == _facts(_state())


def test_ranks_that_disagree_on_a_view_all_raise(tmp_path: Path) -> None:
    """One rank's tensor is a view where another's is a tensor of its own: the save is
    refused on every rank, naming the key and the view."""
    path = tmp_path / "s" / "c"
    out: list[Any] = [None, None]

    def main(coord: ThreadCoordinator) -> None:
        w = torch.arange(6.0).reshape(2, 3)
        state = {"w": w, "t": w.t() if coord.rank == 0 else w.t().contiguous()}
        try:
            ckptguard.save(state, path, coordinator=coord, timeout=60)
        except ckptguard.CheckpointAbortedError as e:
            out[coord.rank] = e

    _ranks(2, main)
    assert all(e is not None and "'t'" in str(e) and "view" in str(e) for e in out), out
    assert not path.exists()


def test_non_contiguous_shards_are_pieces_of_a_global_tensor(tmp_path: Path) -> None:
    """A Shard's (or DTensor's) local piece is a piece of a global tensor: stored in C order
    whatever its strides, it reshards into any template layout."""
    path = tmp_path / "s" / "c"
    full = torch.arange(48.0).reshape(8, 6)

    def main(coord: ThreadCoordinator) -> None:
        r = coord.rank
        local = full.t().contiguous().t()[r * 4 : (r + 1) * 4]  # column-major piece
        assert not local.is_contiguous()
        state = {"w": ckptguard.Shard(local, offsets=(r * 4, 0), global_shape=(8, 6))}
        ckptguard.save(state, path, coordinator=coord, timeout=60)

    _ranks(2, main)
    assert TENSOR_VIEWS not in _body(path)["features"]
    assert torch.equal(ckptguard.load(path)["w"], full)
    tpl = ckptguard.Shard(torch.zeros(3, 3).t(), offsets=(2, 3), global_shape=(8, 6))
    ckptguard.load(path, template={"w": tpl})
    assert torch.equal(tpl.local, full[2:5, 3:6]) and tpl.local.stride() == (1, 3)


# ---- hostile view entries -------------------------------------------------------------------


def _view_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "s" / "h"
    w = torch.arange(12.0).reshape(3, 4)
    state = {
        "w": w,
        "t": w.t(),
        "x": torch.arange(5)[::2],
        "n": np.asfortranarray(np.ones((2, 2))),
        "p": torch.ones(2),
    }
    ckptguard.save(state, path)
    return path


def _entry(body: dict, key: str) -> dict:
    return next(t for t in body["tensors"] if t["key"] == key)


HOSTILE: dict[str, Callable[[dict], Any]] = {
    "offset past the end": lambda b: _entry(b, "t")["view"].update(offset=1),
    "stride past the end": lambda b: _entry(b, "t")["view"].update(stride=[1, 5]),
    "huge stride": lambda b: _entry(b, "t")["view"].update(stride=[1 << 62, 1]),
    "stride beyond 2**62 on a length-1 dim": lambda b: (
        _entry(b, "t").update(shape=[1, 3]),
        _entry(b, "t")["view"].update(stride=[(1 << 62) + 1, 4]),
    ),
    "int64 overflow": lambda b: _entry(b, "t")["view"].update(offset=(1 << 63) - 1),
    "negative offset": lambda b: _entry(b, "t")["view"].update(offset=-1),
    "negative stride": lambda b: _entry(b, "t")["view"].update(stride=[-1, 4]),
    "float offset": lambda b: _entry(b, "t")["view"].update(offset=1.0),
    "bool stride": lambda b: _entry(b, "t")["view"].update(stride=[True, 4]),
    "stride of another rank": lambda b: _entry(b, "t")["view"].update(stride=[1]),
    "storage out of range": lambda b: _entry(b, "t")["view"].update(storage=99),
    "storage is itself": lambda b: _entry(b, "t")["view"].update(storage=1),
    "storage is a view": lambda b: _entry(b, "t")["view"].update(storage=1),
    "storage of another kind": lambda b: _entry(b, "n")["view"].update(storage=0),
    "storage on another device": lambda b: _entry(b, "w").update(device="cuda:0"),
    "missing member": lambda b: _entry(b, "t")["view"].pop("stride"),
    "extra member": lambda b: _entry(b, "t")["view"].update(dtype="float32"),
    "view not an object": lambda b: _entry(b, "t").update(view=[0, 0, [1, 4]]),
    "per-rank view": lambda b: (
        _entry(b, "t").update(per_rank=True, shape=[1, 3]),
        b["features"].append("per-rank-tensors"),
    ),
    "without the feature": lambda b: b["features"].remove(TENSOR_VIEWS),
    "a tensor with chunks made a view": lambda b: _entry(b, "p").update(
        view={"storage": 5, "offset": 0, "stride": [0]}
    ),
    "bigger view of the same storage": lambda b: _entry(b, "t").update(shape=[4, 4]),
    "view null": lambda b: _entry(b, "t").update(view=None),
    "empty view stepping past 2**62 bytes": lambda b: (
        _entry(b, "t").update(shape=[0, 3]),
        _entry(b, "t")["view"].update(stride=[(1 << 60) + 1, 1]),
    ),
    "empty view of a huge length": lambda b: (
        _entry(b, "t").update(shape=[1 << 62, 0]),
        _entry(b, "t")["view"].update(stride=[1, 1]),
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_view_entries_are_corrupt(tmp_path: Path, case: str) -> None:
    """A view that would reach outside its storage's bytes, or is malformed: ckptguard raises
    CorruptCheckpointError before building anything, and the independent reader refuses it."""
    path = _view_ckpt(tmp_path)
    if case == "storage is a view":  # point "x" at "t" (a view) instead of its storage
        resign_manifest(path, lambda b: _entry(b, "x")["view"].update(storage=1))
    else:
        resign_manifest(path, HOSTILE[case])
    with pytest.raises(ckptguard.CorruptCheckpointError):
        ckptguard.load(path)
    with pytest.raises(ir.SpecViolation):
        ir.read_checkpoint(str(path))


def test_a_reader_without_the_feature_refuses_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _view_ckpt(tmp_path)
    monkeypatch.setattr(manifest, "KNOWN_FEATURES", manifest.KNOWN_FEATURES - {TENSOR_VIEWS})
    with pytest.raises(ckptguard.FormatVersionError, match=TENSOR_VIEWS):
        ckptguard.load(path)
    monkeypatch.setattr(ir, "KNOWN_FEATURES", ir.KNOWN_FEATURES - {TENSOR_VIEWS})
    with pytest.raises(ir.VersionViolation, match=TENSOR_VIEWS):
        ir.read_checkpoint(str(path))


def test_feature_listed_exactly_when_a_view_is(tmp_path: Path) -> None:
    path = _view_ckpt(tmp_path)
    body = _body(path)
    assert TENSOR_VIEWS in body["features"]
    assert json.dumps(_entry(body, "x")["view"]) == '{"storage": 5, "offset": 0, "stride": [2]}'
    assert [t["key"] for t in body["tensors"]][3:] == ["n", "p", "x%storage", "n%storage"]
    assert "view" not in _entry(body, "p") and os.path.isdir(path)
