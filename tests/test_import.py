"""Checkpoints of other formats (ckptguard/foreign/, ckptguard/importer.py): torch.save files
(zip and legacy), safetensors files and sharded sets, DCP directories written by 4 gloo ranks;
``ckptguard.load`` reads them as they are, ``import_checkpoint`` saves them as verified
checkpoints, ``verify`` refuses them. Hostile and broken sources (a FIFO, links, truncated and
garbage files, a header pointing outside its file, names outside the directory, pickled
globals) end in a typed error naming the file, and nothing at the destination."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import free_port
from safetensors.torch import save_file

import ckptguard
from ckptguard import (
    CheckpointNotFoundError,
    ForeignCheckpointError,
    ForeignFormatError,
    UnsafePickleError,
    UnsupportedObjectError,
)

HERE = Path(__file__).resolve().parent
DCP_SCRIPT = HERE / "dist" / "dcp_save.py"


class Custom:
    """A class torch's weights-only unpickler does not know."""

    def __init__(self, value: int) -> None:
        self.value = value


def assert_same(got: Any, want: Any, where: str = "<root>") -> None:
    """Equal values, tensors equal in dtype, shape and every element (NaN-free states); dicts
    with the same keys (in any order: safetensors and DCP keep none)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), (where, list(got), list(want))
        for k in want:
            assert_same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}/{i}")
    else:
        assert got == want, (where, got, want)


def training_state() -> dict[str, Any]:
    """A model's state_dict and its AdamW state after two steps, and plain values."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(5, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "step": 2,
        "rng": torch.get_rng_state(),
        "half": torch.arange(6, dtype=torch.float16),
    }


def no_dest(dest: Path) -> None:
    assert not dest.exists(), f"{dest} exists after a failed import"


# ---- torch.save ------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_save_loads_and_imports_equal(tmp_path: Path, legacy: bool) -> None:
    state = training_state()
    src = tmp_path / "model.pt"
    torch.save(state, src, _use_new_zipfile_serialization=not legacy)
    assert_same(ckptguard.load(src), state)
    report = ckptguard.import_checkpoint(src, tmp_path / "store" / "imported", step=2)
    assert report.kind == ("torch.save (legacy)" if legacy else "torch.save (zip)")
    assert report.verified.ok and report.info.step == 2
    assert report.info.tensors == 4 + 3 * 4 + 2  # model, AdamW step and moments, rng, half
    out = ckptguard.load(tmp_path / "store" / "imported")
    assert_same(out, state)
    assert isinstance(out["model"], OrderedDict) and list(out["model"]) == list(state["model"])
    assert ckptguard.verify(tmp_path / "store").ok


def test_a_refused_global_is_named_and_allow_pickle_reads_it(tmp_path: Path) -> None:
    src = tmp_path / "custom.pt"
    torch.save({"w": torch.ones(3), "extra": Custom(7)}, src)
    dest = tmp_path / "store" / "c"
    with pytest.raises(UnsafePickleError) as exc:
        ckptguard.load(src)
    assert exc.value.global_name.endswith("Custom") and exc.value.path == str(src)
    assert "allow_pickle=True" in str(exc.value) and "arbitrary code" in str(exc.value)
    with pytest.raises(UnsafePickleError, match="Custom"):
        ckptguard.import_checkpoint(src, dest)
    no_dest(dest)
    assert ckptguard.load(src, allow_pickle=True)["extra"].value == 7
    ckptguard.import_checkpoint(src, dest, allow_pickle=True)
    with pytest.raises(UnsupportedObjectError):  # the checkpoint holds a pickle: opt in to load
        ckptguard.load(dest)
    out = ckptguard.load(dest, allow_pickle=True)
    assert out["extra"].value == 7 and torch.equal(out["w"], torch.ones(3))


def test_a_value_ckptguard_cannot_store_is_named_by_its_key_path(tmp_path: Path) -> None:
    src = tmp_path / "sparse.pt"
    sparse = torch.eye(3).to_sparse_csc()  # COO and CSR are stored; CSC is not (yet)
    torch.save({"model": {"emb": sparse}, "w": torch.ones(2)}, src)
    dest = tmp_path / "store" / "s"
    with pytest.raises(UnsupportedObjectError) as exc:
        ckptguard.import_checkpoint(src, dest)
    assert exc.value.key_path == "model/emb"
    no_dest(dest)


def test_map_location_applies_to_a_torch_file(tmp_path: Path) -> None:
    src = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, src)
    seen: list[str] = []
    out = ckptguard.load(src, map_location=lambda saved: seen.append(saved) or "cpu")
    assert seen == ["cpu"] and out["w"].device.type == "cpu"
    assert ckptguard.load(src, map_location={"cpu": torch.device("cpu")})["w"].sum() == 2


# ---- safetensors -----------------------------------------------------------------------------


def flat_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "embed.weight": torch.randn(10, 4, generator=g),
        "layers.0.weight": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "layers.0.bias": torch.zeros(4),
        "layers.1.weight": torch.randn(4, 4, generator=g),
        "head.ids": torch.arange(7, dtype=torch.int64),
    }


def test_a_safetensors_file_keeps_its_metadata(tmp_path: Path) -> None:
    tensors = flat_tensors()
    src = tmp_path / "model.safetensors"
    save_file(tensors, src, metadata={"format": "pt", "source": "test"})
    assert_same(ckptguard.load(src), tensors)
    report = ckptguard.import_checkpoint(src, tmp_path / "store" / "st")
    assert report.kind == "safetensors" and report.info.tensors == len(tensors)
    assert report.info.metadata == {"format": "pt", "source": "test"}
    assert_same(ckptguard.load(tmp_path / "store" / "st"), tensors)
    # The caller's metadata wins over the file's.
    other = ckptguard.import_checkpoint(src, tmp_path / "store" / "m", metadata={"run": 1})
    assert other.info.metadata == {"run": 1}


def write_sharded(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A sharded set as Hugging Face writes it: two shards and the index naming each tensor's."""
    directory.mkdir()
    names = list(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    index = directory / "model.safetensors.index.json"
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("name", ["directory", "index"])
def test_a_sharded_safetensors_set(tmp_path: Path, name: str) -> None:
    tensors = flat_tensors()
    index = write_sharded(tmp_path / "hf", tensors)
    src = index.parent if name == "directory" else index
    assert_same(ckptguard.load(src), tensors)
    report = ckptguard.import_checkpoint(src, tmp_path / "store" / "hf")
    assert report.kind == "safetensors (sharded)" and report.info.metadata == {"format": "pt"}
    assert_same(ckptguard.load(tmp_path / "store" / "hf"), tensors)


def test_a_sharded_set_reads_nothing_outside_its_directory(tmp_path: Path) -> None:
    tensors = flat_tensors()
    index = write_sharded(tmp_path / "hf", tensors)
    doc = json.loads(index.read_text())
    outside = tmp_path / "outside.safetensors"
    save_file({"embed.weight": tensors["embed.weight"]}, outside)
    doc["weight_map"]["embed.weight"] = "../outside.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(ForeignFormatError, match="not a plain name"):
        ckptguard.load(index)
    # A shard that is a link (to a file outside) is refused by name, never followed.
    doc["weight_map"]["embed.weight"] = "linked.safetensors"
    index.write_text(json.dumps(doc))
    (tmp_path / "hf" / "linked.safetensors").symlink_to(outside)
    with pytest.raises(ForeignFormatError, match="linked.safetensors is a symbolic link"):
        ckptguard.load(index)
    # A shard that lacks a tensor its index assigns it.
    doc["weight_map"]["embed.weight"] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(ForeignFormatError, match="does not hold what"):
        ckptguard.load(index)


# ---- DCP, written by 4 gloo ranks ------------------------------------------------------------


@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DCP checkpoint saved by 4 gloo ranks of tests/dist/dcp_save.py."""
    out = tmp_path_factory.mktemp("dcp") / "ckpt"
    port = str(free_port())
    procs = []
    for rank in range(4):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "WORLD_SIZE": "4",
            "LOCAL_RANK": str(rank),
        }
        log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed below
        cmd = [sys.executable, str(DCP_SCRIPT), str(out)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=log), log))
    for rank, (proc, log) in enumerate(procs):
        code = proc.wait(timeout=180)
        log.seek(0)
        text = log.read()
        log.close()
        assert code == 0, f"rank {rank} exited {code}:\n{text[-3000:]}"
    return out


def dcp_expected() -> dict[str, Any]:
    """The state of all 4 ranks as one: replicated keys once, each rank's own, the DTensor whole."""
    sys.path.insert(0, str(DCP_SCRIPT.parent))
    try:
        import dcp_save
    finally:
        sys.path.remove(str(DCP_SCRIPT.parent))
    want = dcp_save.state(0, 4)
    for rank in range(1, 4):
        want.update({k: v for k, v in dcp_save.state(rank, 4).items() if k.startswith("rank")})
    return want


@pytest.mark.rank_job
def test_a_dcp_checkpoint_of_4_ranks(dcp_dir: Path, tmp_path: Path) -> None:
    want = dcp_expected()
    assert sorted(p.name for p in dcp_dir.iterdir() if p.suffix == ".distcp") == [
        f"__{r}_0.distcp" for r in range(4)
    ]
    got = ckptguard.load(dcp_dir)
    assert sorted(got) == sorted(want)
    for key in want:
        assert_same(got[key], want[key], key)
    report = ckptguard.import_checkpoint(dcp_dir, tmp_path / "store" / "dcp", step=7)
    assert report.kind == "DCP" and report.verified.ok
    out = ckptguard.load(tmp_path / "store" / "dcp")
    for key in want:
        assert_same(out[key], want[key], key)


class _Runs:
    """Unpickled, it would run a command."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_dcp_metadata_is_not_unpickled_with_full_pickle(dcp_dir: Path, tmp_path: Path) -> None:
    """``.metadata`` that names a global outside DCP's metadata classes is refused by name."""
    copy = tmp_path / "dcp"
    shutil.copytree(dcp_dir, copy)
    (copy / ".metadata").write_bytes(pickle.dumps(_Runs()))
    with pytest.raises(UnsafePickleError) as exc:
        ckptguard.import_checkpoint(copy, tmp_path / "store" / "x")
    assert exc.value.global_name in ("posix.system", "os.system")
    assert exc.value.path == str(copy / ".metadata")
    no_dest(tmp_path / "store" / "x")
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


@pytest.mark.parametrize("damage", ["truncated", "outside", "value-global", "huge", "past-end"])
def test_a_damaged_or_hostile_dcp_checkpoint(dcp_dir: Path, tmp_path: Path, damage: str) -> None:
    copy = tmp_path / "dcp"
    shutil.copytree(dcp_dir, copy)
    meta = pickle.loads((copy / ".metadata").read_bytes())
    if damage == "truncated":
        data = (copy / "__3_0.distcp").read_bytes()
        (copy / "__3_0.distcp").write_bytes(data[: len(data) // 2])
        expected: type[Exception] = ForeignFormatError
    elif damage == "outside":
        next(iter(meta.storage_data.values())).relative_path = "../elsewhere.distcp"
        expected = ForeignFormatError
    elif (
        damage == "huge"
    ):  # a tensor declared far larger than any file: refused before DCP allocates
        md = next(m for m in meta.state_dict_metadata.values() if hasattr(m, "chunks"))
        md.size = torch.Size([1 << 40])
        expected = ForeignFormatError
    elif damage == "past-end":
        next(iter(meta.storage_data.values())).length = 1 << 40
        expected = ForeignFormatError
    else:  # the non-tensor value "epoch" replaced by a pickle that would run a command
        info = next(i for k, i in meta.storage_data.items() if k.fqn == "epoch")
        buf = io.BytesIO()
        torch.save(_Runs(), buf)
        with open(copy / info.relative_path, "ab") as f:
            info.offset, info.length = f.tell(), len(buf.getvalue())
            f.write(buf.getvalue())
        expected = UnsafePickleError
    (copy / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(expected, match=str(copy)) as exc:
        ckptguard.import_checkpoint(copy, tmp_path / "store" / "x")
    if damage == "value-global":
        assert "key 'epoch'" in str(exc.value) and exc.value.global_name.endswith("system")
    if damage in ("huge", "past-end"):
        assert ("declares" if damage == "huge" else "places an item") in str(exc.value)
    no_dest(tmp_path / "store" / "x")


# ---- what every source shares ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_fifo_as_source_is_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    with pytest.raises(ForeignFormatError, match="FIFO"):
        ckptguard.load(fifo)
    with pytest.raises(ForeignFormatError, match="FIFO"):
        ckptguard.import_checkpoint(fifo, tmp_path / "store" / "f")
    no_dest(tmp_path / "store" / "f")


def test_a_linked_source_is_refused_naming_its_target(tmp_path: Path) -> None:
    real = tmp_path / "real.pt"
    torch.save({"w": torch.ones(2)}, real)
    link = tmp_path / "link.pt"
    link.symlink_to(real)
    with pytest.raises(ForeignFormatError, match=f"pass {real}"):
        ckptguard.load(link)


def truncated(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "kind", ["zip", "legacy", "safetensors-header", "safetensors-data", "garbage"]
)
def test_a_broken_file_is_a_typed_error_and_leaves_no_dest(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "broken"
    state = {"w": torch.arange(1000.0), "b": torch.ones(3)}
    if kind in ("zip", "legacy"):
        torch.save(state, src, _use_new_zipfile_serialization=kind == "zip")
        truncated(src, 0.5)
    elif kind.startswith("safetensors"):
        save_file(state, src)
        truncated(src, 0.01 if kind == "safetensors-header" else 0.9)
    else:
        src.write_bytes(b"\x00not a checkpoint of any kind\n" * 10)
    dest = tmp_path / "store" / "x"
    expected = CheckpointNotFoundError if kind == "garbage" else ForeignFormatError
    with pytest.raises(expected, match=str(src)):
        ckptguard.load(src)
    with pytest.raises(expected, match=str(src)):
        ckptguard.import_checkpoint(src, dest)
    no_dest(dest)


def test_a_safetensors_header_pointing_outside_the_file(tmp_path: Path) -> None:
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]}}
    ).encode()
    src = tmp_path / "hostile.safetensors"
    src.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 64)
    dest = tmp_path / "store" / "h"
    with pytest.raises(ForeignFormatError) as exc:
        ckptguard.import_checkpoint(src, dest)
    assert exc.value.path == str(src) and str(src) in str(exc.value)
    assert exc.value.kind == "safetensors"
    no_dest(dest)


@pytest.mark.parametrize("kind", ["zip", "safetensors", "dcp"])
def test_verify_refuses_another_format_and_suggests_import(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    if kind == "dcp":
        src = request.getfixturevalue("dcp_dir")
    elif kind == "zip":
        src = tmp_path / "m.pt"
        torch.save({"w": torch.ones(2)}, src)
    else:
        src = tmp_path / "m.safetensors"
        save_file({"w": torch.ones(2)}, src)
    with pytest.raises(ForeignCheckpointError, match="ckptguard import") as exc:
        ckptguard.verify(src)
    assert "not a ckptguard checkpoint" in str(exc.value) and exc.value.path == str(src)


def test_what_is_none_of_the_kinds_names_the_kinds_tried(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "notes.txt"):
        if path.suffix:
            path.write_text("hello")
        with pytest.raises(CheckpointNotFoundError, match=r"torch\.save.*safetensors.*DCP"):
            ckptguard.load(path)
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint or store"):
        ckptguard.load(tmp_path / "missing")


def test_template_does_not_apply_to_another_format(tmp_path: Path) -> None:
    src = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, src)
    with pytest.raises(ValueError, match="template"):
        ckptguard.load(src, template={"w": torch.zeros(2)})


def test_importing_a_ckptguard_checkpoint_or_nothing(tmp_path: Path) -> None:
    ckptguard.save({"w": torch.ones(2)}, tmp_path / "store" / "a")
    with pytest.raises(ckptguard.CheckpointError, match="already"):
        ckptguard.import_checkpoint(tmp_path / "store" / "a", tmp_path / "store" / "b")
    with pytest.raises(CheckpointNotFoundError, match="nothing to import"):
        ckptguard.import_checkpoint(tmp_path / "missing.pt", tmp_path / "store" / "b")
    no_dest(tmp_path / "store" / "b")
