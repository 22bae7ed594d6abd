"""ckptguard.export (ckptguard/exporter/): a checkpoint as safetensors, HDF5 or a torch.save
file, every tensor checked as it is written; sharded saves consolidated; files named only once
whole. The command line is tests/test_cli_export.py."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from clikit import flip_payload_byte
from conftest import run_command
from memkit import peak_allocation
from mpikit import need_mpi
from safetensors.torch import load_file
from threadcoord import ThreadCoordinator, run_ranks

import ckptguard
from ckptguard import (
    CorruptCheckpointError,
    ExportError,
    ExportWarning,
    StoreFullError,
    StoreNotWritableError,
)
from ckptguard.exporter.formats import DTYPE_ATTR, VALUES_ATTR
from ckptguard.tree import TORCH_BY_NAME

HERE = Path(__file__).resolve().parent

# Every dtype the formats take (float8 where this torch has it), 0-d and empty tensors.
FLOAT8 = [n for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 7, generator=g)
    out = {
        "bf16": x.bfloat16(),
        "fp16": x.half(),
        "fp32": x,
        "fp64": x.double(),
        "i8": torch.randint(-128, 127, (9,), dtype=torch.int8, generator=g),
        "i32": torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32, generator=g),
        "i64": torch.arange(-50, 50, dtype=torch.int64),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.rand(17, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "nan": torch.tensor([float("nan"), float("inf"), -0.0]),
        "big": torch.randn(64, 64, generator=g),  # 4 chunks, in records of its own
    }
    for n in FLOAT8:
        out[n] = x.to(getattr(torch, n))
    return out


def state() -> dict[str, Any]:
    return {
        "model": {"layers": [{"w": t} for t in tensors().values()], **tensors()},
        "optim": {"lr": 0.01, "step": 7, "name": "adam", "betas": (0.9, 0.99), "none": None},
    }


def same(a: Any, b: Any) -> bool:
    """Equal dtype, shape and bytes (NaN equal to itself; float8 has no torch.equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "store" / "c"
    ckptguard.save(state(), str(path), chunk_size=4096)
    return path


def test_safetensors_round_trip(ckpt: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.warns(ExportWarning, match="optim.lr"):
        result = ckptguard.export(ckpt.parent, to="safetensors", dest=dest)  # a store: LATEST
    assert result.files == [str(dest / "model.safetensors")]
    assert sorted(os.listdir(dest)) == ["model.safetensors"]
    got = load_file(dest / "model.safetensors")
    want = tensors()
    for k, t in want.items():
        assert same(got[f"model.{k}"], t), k
    for i, t in enumerate(want.values()):
        assert same(got[f"model.layers.{i}.w"], t), i
    assert len(got) == 2 * len(want) == result.tensors
    assert sorted(n for n, _ in result.left_out) == [
        "optim.betas.0",
        "optim.betas.1",
        "optim.lr",
        "optim.name",
        "optim.none",
        "optim.step",
    ]
    assert result.bytes == sum(t.numel() * t.element_size() for t in got.values())


def test_hdf5_round_trip(ckpt: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    result = ckptguard.export(ckpt, to="hdf5", dest=dest)
    assert result.files == [str(dest / "checkpoint.h5")] and result.left_out == []
    want = tensors()
    with h5py.File(dest / "checkpoint.h5", "r") as f:
        for k, t in want.items():
            for where in (f"model/{k}", f"model/layers/{list(want).index(k)}/w"):
                ds = f[where]
                assert ds.attrs[DTYPE_ATTR] == str(t.dtype).removeprefix("torch.")
                arr = ds[()]
                if k in ("bf16", *FLOAT8):  # the bit pattern, restored by the recorded dtype
                    assert arr.dtype == {2: np.uint16, 1: np.uint8}[t.element_size()]
                back = torch.from_numpy(np.array(arr)).view(TORCH_BY_NAME[ds.attrs[DTYPE_ATTR]])
                assert same(back, t), where
        assert f["model/scalar"].shape == () and f["model/empty"].shape == (0, 4)
        opt = f["optim"].attrs
        assert (opt["lr"], opt["step"], opt["name"]) == (0.01, 7, "adam")
        assert (f["optim/betas"].attrs["0"], f["optim/betas"].attrs["1"]) == (0.9, 0.99)
        assert json.loads(f.attrs[VALUES_ATTR]) == {"optim/none": None}


def test_torch_round_trip(ckpt: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    result = ckptguard.export(ckpt, to="torch", dest=dest)
    assert result.files == [str(dest / "checkpoint.pt")]
    got = torch.load(dest / "checkpoint.pt", weights_only=True)
    want = state()
    assert got["optim"] == want["optim"]
    for k, t in want["model"].items():
        if k != "layers":
            assert same(got["model"][k], t), k
    for a, b in zip(got["model"]["layers"], want["model"]["layers"], strict=True):
        assert same(a["w"], b["w"])


def test_select_exports_a_subtree_named_relative_to_it(ckpt: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    result = ckptguard.export(ckpt, to="safetensors", dest=dest, select="model/layers", strict=True)
    got = load_file(dest / "model.safetensors")
    assert sorted(got) == sorted(f"{i}.w" for i in range(len(tensors())))
    assert result.left_out == []
    got_pt = ckptguard.export(ckpt, to="torch", dest=tmp_path / "pt", select="optim")
    assert torch.load(got_pt.files[0], weights_only=True) == state()["optim"]
    with pytest.raises(
        ExportError, match=r"no key 'nope' under model in .* \(the keys there: 'layers', 'bf16'"
    ):
        ckptguard.export(ckpt, to="hdf5", dest=tmp_path / "h", select="model/nope")
    with pytest.raises(ExportError, match="single value"):
        ckptguard.export(ckpt, to="safetensors", dest=tmp_path / "s", select="model/fp32")


def test_strict_refuses_what_safetensors_cannot_hold(ckpt: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(ExportError, match=r"cannot hold 6 value\(s\).*optim\.lr \(not a tensor\)"):
        ckptguard.export(ckpt, to="safetensors", dest=dest / "a" / "b", strict=True)
    assert not dest.exists()  # a refused export leaves no directory it made
    dest.mkdir()
    (dest / "theirs").write_text("x")
    with pytest.raises(ExportError):
        ckptguard.export(ckpt, to="safetensors", dest=dest / "c", strict=True)
    assert os.listdir(dest) == ["theirs"]
    path = tmp_path / "c128"
    ckptguard.save({"z": torch.zeros(2, dtype=torch.complex128), "w": torch.ones(2)}, str(path))
    with pytest.warns(ExportWarning, match="z"):
        result = ckptguard.export(path, to="safetensors", dest=tmp_path / "z")
    assert result.left_out == [("z", "dtype complex128 has no safetensors type")]
    assert list(load_file(tmp_path / "z" / "model.safetensors")) == ["w"]


def test_names_that_collide_once_joined_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c"
    ckptguard.save({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}}, str(path))
    with pytest.raises(ExportError, match=r"name 'a\.b' would name both 'a\.b' and 'a/b'"):
        ckptguard.export(path, to="safetensors", dest=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nor the directory it made
    ckptguard.export(path, to="hdf5", dest=tmp_path / "h5")  # its paths keep them apart
    with h5py.File(tmp_path / "h5" / "checkpoint.h5") as f:
        assert f["a.b"][0] == 1 and f["a/b"][0] == 0


def test_sharded_safetensors_and_index(ckpt: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    result = ckptguard.export(
        ckpt, to="safetensors", dest=dest, select="model", max_shard_size="300B"
    )
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.listdir(dest)) == [*shards, "model.safetensors.index.json"]
    got: dict[str, torch.Tensor] = {}
    for name in shards:
        part = load_file(dest / name)
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 300 or len(part) == 1  # a larger tensor is a shard of its own
        assert all(index["weight_map"][k] == name for k in part)
        got |= part
    assert index["metadata"]["total_size"] == result.bytes
    assert sorted(got) == sorted(index["weight_map"])
    for k, t in tensors().items():
        assert same(got[k], t), k


def test_existing_files_are_replaced_only_with_force(ckpt: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "checkpoint.h5").write_bytes(b"mine")
    with pytest.raises(ExportError, match="checkpoint.h5 already exists: pass force=True"):
        ckptguard.export(ckpt, to="hdf5", dest=dest)
    assert (dest / "checkpoint.h5").read_bytes() == b"mine"
    ckptguard.export(ckpt, to="hdf5", dest=dest, force=True)
    assert h5py.is_hdf5(dest / "checkpoint.h5")
    # A sharded export beside an earlier single file (which from_pretrained would prefer).
    ckptguard.export(ckpt, to="safetensors", dest=dest, select="model")
    with pytest.raises(ExportError, match="model.safetensors already exists"):
        ckptguard.export(ckpt, to="safetensors", dest=dest, select="model", max_shard_size="1KB")
    ckptguard.export(
        ckpt, to="safetensors", dest=dest, select="model", max_shard_size="1KB", force=True
    )
    names = sorted(os.listdir(dest))
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    ckptguard.export(ckpt, to="safetensors", dest=dest, select="model", force=True)
    assert sorted(os.listdir(dest)) == ["checkpoint.h5", "model.safetensors"]


@pytest.mark.parametrize("to", ["safetensors", "hdf5", "torch"])
def test_corruption_fails_the_export_and_leaves_no_file(
    ckpt: Path, tmp_path: Path, to: str
) -> None:
    flip_payload_byte(ckpt, "model/big")
    dest = tmp_path / "out"
    with pytest.raises(CorruptCheckpointError, match="chunk hash mismatch.*model/big") as err:
        ckptguard.export(ckpt, to=to, dest=dest, select="model")
    assert err.value.key == "model/big"
    assert not dest.exists()  # nor a temporary file, nor the directory it made


def test_bad_input_is_a_typed_error(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ckptguard.CheckpointNotFoundError):
        ckptguard.export(tmp_path / "missing", to="hdf5", dest=tmp_path / "out")
    with pytest.raises(ExportError, match="cannot export to 'onnx': the formats are"):
        ckptguard.export(ckpt, to="onnx", dest=tmp_path / "out")
    with pytest.raises(ExportError, match="max_shard_size applies to safetensors"):
        ckptguard.export(ckpt, to="hdf5", dest=tmp_path / "out", max_shard_size="1GB")
    with pytest.raises(ExportError, match="'lots' is not a size"):
        ckptguard.export(ckpt, to="safetensors", dest=tmp_path / "out", max_shard_size="lots")
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match="is not a directory"):
        ckptguard.export(ckpt, to="torch", dest=tmp_path / "file")
    with pytest.raises(ExportError, match="into the checkpoint itself"):
        ckptguard.export(ckpt, to="torch", dest=ckpt / "sub")
    with pytest.raises(ExportError, match="rank must be a saved rank, 0 to 0, not 1"):
        ckptguard.export(ckpt, to="torch", dest=tmp_path / "out", rank=1)


def test_unwritable_destination(ckpt: Path, tmp_path: Path, tmpfs: Any) -> None:
    """A read-only destination (a read-only mount for root, whom modes do not stop)."""
    if os.geteuid() == 0:
        dest = Path(tmpfs("ro,size=1m"))
    else:
        dest = tmp_path / "ro"
        dest.mkdir(mode=0o500)
    with pytest.raises(StoreNotWritableError, match="export destination is not writable"):
        ckptguard.export(ckpt, to="safetensors", dest=dest, select="model")
    assert os.listdir(dest) == []


@pytest.mark.parametrize("to", ["safetensors", "hdf5", "torch"])
def test_a_full_destination_leaves_no_file(tmp_path: Path, tmpfs: Any, to: str) -> None:
    path = tmp_path / "c"
    ckptguard.save({"w": torch.randn(256, 256)}, str(path))  # 256 KiB
    dest = tmpfs("size=64k")
    with pytest.raises(StoreFullError, match="No space left"):
        ckptguard.export(path, to=to, dest=dest)
    assert os.listdir(dest) == []


def test_one_tensor_in_memory_at_a_time(tmp_path: Path) -> None:
    """Six 1 MiB arrays saved as row shards by 4 ranks export with one array and one shard's
    chunks allocated at most (numpy buffers: what tracemalloc sees; a load holds all six)."""
    full = {f"t{i}": np.random.default_rng(i).random((256, 512)) for i in range(6)}
    path = str(tmp_path / "c")

    def rank_main(coord: ThreadCoordinator) -> None:
        r = coord.rank
        mine = {
            k: ckptguard.Shard(v[64 * r : 64 * r + 64].copy(), v.shape, (64 * r, 0))
            for k, v in full.items()
        }
        ckptguard.save(mine, path, chunk_size=64 << 10, coordinator=coord)

    run_ranks(4, rank_main, abort_on_error=True)
    mib = 1 << 20
    for to in ("safetensors", "hdf5"):
        ckptguard.export(path, to=to, dest=tmp_path / "warm")  # the imports, allocated once
        peak = peak_allocation(lambda to=to: ckptguard.export(path, to=to, dest=tmp_path / to))
        # One array, a quarter of one in shard chunks, a few chunk buffers: never two arrays.
        assert mib < peak < 2 * mib, (to, peak)
    assert peak_allocation(lambda: ckptguard.load(path)) > 6 * mib
    got = load_file(tmp_path / "safetensors" / "model.safetensors")
    assert all(np.array_equal(got[k].numpy(), v) for k, v in full.items())


def _scenarios() -> Any:
    """tests/dist/scenarios.py, whose ranks save the checkpoint the test exports."""
    spec = importlib.util.spec_from_file_location("scenarios", HERE / "dist" / "scenarios.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.rank_job
def test_a_checkpoint_of_4_mpi_ranks_is_consolidated(tmp_path: Path) -> None:
    store = tmp_path / "store"
    script = HERE / "dist" / "scenarios.py"
    cmd = [need_mpi(), "-n", "4", sys.executable, script, "mpi", "save", store, "step-10"]
    assert run_command(cmd, 120).returncode == 0
    full = _scenarios().global_state()
    want = {
        "model.w": full["w"],
        "model.bias": full["bias"],
        "model.emb": full["emb"],
        "optim.state.0.m": full["m"],
        "optim.state.0.step": torch.tensor(5.0),
        "scalar": full["scalar"],
    }
    ckpt = store / "step-10"
    with pytest.warns(ExportWarning):
        ckptguard.export(ckpt, to="safetensors", dest=tmp_path / "st")
    got = load_file(tmp_path / "st" / "model.safetensors")
    for k, t in want.items():
        assert same(got[k], t), k
    assert np.array_equal(got["np"].numpy(), np.arange(6, dtype=np.int32))
    ckptguard.export(ckpt, to="hdf5", dest=tmp_path / "h5")
    with h5py.File(tmp_path / "h5" / "checkpoint.h5") as f:
        assert np.array_equal(f["model/w"][()], full["w"].numpy())
        assert np.array_equal(f["optim/state/0/m"][()], full["m"].numpy())
        assert f["/"].attrs["rank"] == 0
    ckptguard.export(ckpt, to="torch", dest=tmp_path / "pt", select="model")
    model = torch.load(tmp_path / "pt" / "checkpoint.pt", weights_only=True)
    assert same(model["w"], full["w"]) and same(model["emb"], full["emb"])


def _tiny_gpt2(tmp_path: Path) -> tuple[Any, Path]:
    """A GPT-2 of 2 layers, 32 wide, 100 tokens (random weights), its config.json in a dir."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install '.[test]')"
    )
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    dest = tmp_path / "hf"
    config.save_pretrained(dest)
    return model, dest


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_transformers_from_pretrained_loads_the_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shard: str | None
) -> None:
    model, dest = _tiny_gpt2(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "store" / "step-1"
    ckptguard.save({"model": model.state_dict(), "step": 1}, str(path))
    ckptguard.export(path, to="safetensors", dest=dest, select="model", max_shard_size=shard)
    if shard:
        assert (dest / "model.safetensors.index.json").exists()
    from transformers import GPT2LMHeadModel

    loaded = GPT2LMHeadModel.from_pretrained(dest).eval()
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_only_dead_exports_temporaries_are_removed(ckpt: Path, tmp_path: Path) -> None:
    """An export removes the temporaries in DEST of export files whose process is provably
    gone; a live process's, another host's and any other file stay."""
    import subprocess

    from ckptguard.temps import TEMP_MARK, temp_name

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()

    def temp(filename: str, pid: int, host: str | None = None) -> str:
        stem, _, rest = temp_name(filename).partition(TEMP_MARK)
        key, h, ns, _, rand = rest.split(".")
        return f"{stem}{TEMP_MARK}{key}.{host or h}.{ns}.{pid}.{rand}"

    dest = tmp_path / "out"
    dest.mkdir()
    dead = [temp("checkpoint.h5", proc.pid), temp("model-00003-of-00007.safetensors", proc.pid)]
    kept = [
        temp("checkpoint.h5", os.getppid()),  # alive
        temp("checkpoint.h5", proc.pid, host="elsewhere"),
        temp("model.pt", proc.pid),  # a one-file save's: its next save's to remove
        ".checkpoint.h5.0123456789ab.tmp",
    ]
    for n in dead + kept:
        (dest / n).write_bytes(b"partial")
    ckptguard.export(ckpt, to="hdf5", dest=dest)
    assert sorted(os.listdir(dest)) == sorted([*kept, "checkpoint.h5"])
