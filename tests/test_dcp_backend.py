"""ckptguard.dcp: DCP's save and load through ckptguard's StorageWriter and StorageReader.

In one process (DCP without a process group): the checkpoint is ckptguard's (verify, info, ls,
ckptguard.load), values are stored without pickle where they can be, what DCP pickled is never
unpickled by ckptguard, chunks are verified on load, failures leave the store as it was. Under
torchrun with 4 gloo ranks (tests/dist/dcp_backend.py): an FSDP2 model saved by dcp.save and
dcp.async_save, reshard-loaded at 2 and 1 ranks equal to DCP's own FileSystemWriter's copy of
the same state, a bitwise resume in a fresh job, and kills and errors at the failpoints the
save passes (the fault matrix's ``dcp`` scenario).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faultkit
import pytest
import torch
import torch.distributed.checkpoint as dcp
from clikit import flip_payload_byte, run
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

import ckptguard
import ckptguard.dcp
from ckptguard.dcp.nesting import NestingError, build, leaf_paths, leaves
from ckptguard.format.index import read

SCRIPT = Path(__file__).parent / "dist" / "dcp_backend.py"
STEPS, AT = 6, 3


@pytest.fixture(autouse=True)
def _no_dist_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


class Opaque:
    """A value of a class ckptguard cannot store without pickle; counts its unpicklings."""

    unpickled = 0

    def __init__(self, v: int) -> None:
        self.v = v

    def __setstate__(self, state: dict) -> None:
        type(self).unpickled += 1
        self.__dict__.update(state)


def state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(3, 6, generator=g)).sum().backward()
    optim.step()
    return {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "zeros": torch.zeros(4096),  # compresses
        "step": 7 + seed,
        "names": ["a", "b"],
        "blob": b"\x00raw",
        "pair": (1.5, "x"),
        "mixed": [torch.arange(3) + seed, {"k": seed}, "s"],
    }


def _copy_target(sd: dict[str, Any]) -> dict[str, Any]:
    """A load target of ``sd``'s structure: tensors zeroed, values changed."""
    out: Any = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.zeros_like(v)
        elif isinstance(v, dict):
            out[k] = _copy_target(v)
        elif isinstance(v, list):
            out[k] = list(_copy_target(dict(enumerate(v))).values())
        else:
            out[k] = None
    return out


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        keys = {str(k) for k in a} == {str(k) for k in b}
        bb = {str(k): v for k, v in b.items()}
        return keys and all(_equal(v, bb[str(k)]) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def save(sd: dict[str, Any], path: Path, **options: Any) -> ckptguard.dcp.Writer:
    writer = ckptguard.dcp.Writer(path, **options)
    dcp.save(sd, storage_writer=writer)
    return writer


# -- DCP's keys and the tree ----------------------------------------------------------------------
def _tensor(node: Any) -> bool:
    return isinstance(node, dict) and "$tensor" in node


def test_keys_nest_as_dcp_flattened_them() -> None:
    fqns = ["m.w", "o.state.0.exp_avg", "o.groups.0.lr", "o.groups.0.params", "l.0", "l.1"]
    mapping = {
        "m.w": ("m", "w"),
        "o.state.0.exp_avg": ("o", "state", "0", "exp_avg"),
        "o.groups.0.lr": ("o", "groups", 0, "lr"),
        "o.groups.0.params": ("o", "groups", 0, "params"),
        "l.0": ("l", 0),
        "l.1": ("l", 1),
    }
    nodes = {
        f: {"$tensor": i} if f in ("m.w", "o.state.0.exp_avg", "l.0") else [1, 2]
        for i, f in enumerate(fqns)
    }
    paths = leaf_paths(fqns, mapping)
    tree = build(paths, nodes, _tensor)
    assert tree["o"]["groups"] == [{"lr": [1, 2], "params": [1, 2]}]
    assert {p: n for p, n in leaves(tree, _tensor)} == {paths[f]: nodes[f] for f in fqns}


def test_keys_that_do_not_nest_stay_flat() -> None:
    # A list of values only is a leaf by DCP's rule: keys below it cannot be found again.
    paths = leaf_paths(["a.0", "a.1"], {"a.0": ("a", 0), "a.1": ("a", 1)})
    with pytest.raises(NestingError):
        build(paths, {"a.0": 1, "a.1": 2}, _tensor)
    flat = leaf_paths(["a.0", "a.1"], None)
    assert build(flat, {"a.0": 1, "a.1": 2}, _tensor) == {"a.0": 1, "a.1": 2}
    # A mapping whose dotted path is not its key, or a tag-like key: flat.
    assert leaf_paths(["x"], {"x": ("y",)}) == {"x": ("x",)}
    assert leaf_paths(["a.$b"], {"a.$b": ("a", "$b")}) == {"a.$b": ("a.$b",)}


# -- one process ----------------------------------------------------------------------------------
def test_save_is_a_ckptguard_checkpoint(tmp_path: Path) -> None:
    sd = state()
    writer = save(sd, tmp_path / "store" / "one", step=7, compress="zstd")
    ckpt = tmp_path / "store" / "one"
    assert writer.info is not None and writer.info.name == "one" and writer.info.step == 7
    assert sorted(os.listdir(ckpt)) == ["MANIFEST.json", "index.parquet", "rank-00000.ckg"]
    assert ckptguard.verify(ckpt).ok
    assert run("verify", ckpt).exit_code == 0
    info = run("info", ckpt)
    assert info.exit_code == 0 and "optim/state/0/exp_avg" in info.output
    assert "one" in run("ls", tmp_path / "store").output
    got = ckptguard.load(tmp_path / "store")  # LATEST: the state as it was passed, nested
    assert _equal(sd["model"], got["model"]) and _equal(sd["optim"], got["optim"])
    assert got["step"] == 7 and got["names"] == ["a", "b"] and got["blob"] == b"\x00raw"
    assert got["pair"] == (1.5, "x") and _equal(got["mixed"], sd["mixed"])
    # Values are plain JSON in the manifest; the zeros compressed; no DCP .metadata pickle.
    doc = json.loads((ckpt / "MANIFEST.json").read_text())["manifest"]
    assert doc["tree"]["optim"]["param_groups"][0]["lr"] == 0.01
    assert "pickle" not in doc["features"] and "zstd" in doc["features"]
    desc = {t.key: t for t in ckptguard.describe(ckpt).tensors}
    assert desc["zeros"].stored_bytes < desc["zeros"].raw_bytes // 10


def test_load_through_the_reader(tmp_path: Path) -> None:
    sd = state(1)
    save(sd, tmp_path / "s" / "a")
    target = _copy_target(sd)
    target["model"]["0.weight"] = torch.zeros(8, 6, dtype=torch.float64)  # DCP converts dtypes
    dcp.load(target, storage_reader=ckptguard.dcp.Reader(tmp_path / "s"))
    assert torch.equal(target["model"]["0.weight"], sd["model"]["0.weight"].double())
    del target["model"]["0.weight"], sd["model"]["0.weight"]
    assert _equal(sd, target)
    # DCP's loader of a whole checkpoint without a state (metadata's planner_data rebuilt).
    whole = _load_state_dict_from_keys(storage_reader=ckptguard.dcp.Reader(tmp_path / "s" / "a"))
    assert whole["step"] == 8 and torch.equal(whole["zeros"], sd["zeros"])


def test_pickled_values_are_never_unpickled_by_ckptguard(tmp_path: Path) -> None:
    save({"w": torch.ones(3), "obj": Opaque(5)}, tmp_path / "s" / "a")
    Opaque.unpickled = 0
    got = ckptguard.load(tmp_path / "s" / "a")
    assert isinstance(got["obj"], ckptguard.dcp.Pickled) and Opaque.unpickled == 0
    assert b"Opaque" in got["obj"].data  # DCP's own bytes, kept as they were
    target = {"w": torch.zeros(3), "obj": None}
    dcp.load(target, storage_reader=ckptguard.dcp.Reader(tmp_path / "s" / "a"))
    assert Opaque.unpickled == 1 and target["obj"].v == 5  # DCP's reader unpickles it


def test_without_flattening_nested_values_keep_dcps_bytes(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    sd = {"m": {"w": torch.ones(2)}, "x": 1}
    writer = ckptguard.dcp.Writer(tmp_path / "s" / "a")
    dcp.save(sd, storage_writer=writer, planner=DefaultSavePlanner(flatten_state_dict=False))
    got = ckptguard.load(tmp_path / "s" / "a")  # a dict DCP pickled whole, tensor and all
    assert isinstance(got["m"], ckptguard.dcp.Pickled) and got["x"] == 1
    whole = _load_state_dict_from_keys(storage_reader=ckptguard.dcp.Reader(tmp_path / "s" / "a"))
    assert torch.equal(whole["m"]["w"], torch.ones(2)) and whole["x"] == 1  # DCP unpickled it


def test_a_damaged_chunk_fails_the_load(tmp_path: Path) -> None:
    sd = {"w": torch.randn(64, 64)}
    save(sd, tmp_path / "s" / "a", chunk_size=4096, compress="none")
    flip_payload_byte(tmp_path / "s" / "a", "w")
    with pytest.raises(CheckpointException) as exc:
        dcp.load({"w": torch.zeros(64, 64)}, storage_reader=ckptguard.dcp.Reader(tmp_path / "s"))
    assert isinstance(ckptguard.dcp.failure_cause(exc.value), ckptguard.CorruptCheckpointError)


def test_an_existing_name_is_kept_unless_overwrite(tmp_path: Path) -> None:
    save({"w": torch.ones(2)}, tmp_path / "s" / "a")
    with pytest.raises(CheckpointException) as exc:
        save({"w": torch.zeros(2)}, tmp_path / "s" / "a")
    assert isinstance(ckptguard.dcp.failure_cause(exc.value), ckptguard.CheckpointExistsError)
    assert torch.equal(ckptguard.load(tmp_path / "s" / "a")["w"], torch.ones(2))
    save({"w": torch.zeros(2)}, tmp_path / "s" / "a", overwrite=True)
    assert torch.equal(ckptguard.load(tmp_path / "s" / "a")["w"], torch.zeros(2))
    assert os.listdir(tmp_path / "s" / ".staging") == []


def test_a_failed_write_leaves_the_store_as_it_was(tmp_path: Path, monkeypatch: Any) -> None:
    save({"w": torch.ones(2)}, tmp_path / "s" / "a")
    writer = ckptguard.dcp.Writer(tmp_path / "s" / "b")
    monkeypatch.setenv("CKPTGUARD_FAILPOINT", "save.data_written:0:eio")
    with pytest.raises(CheckpointException, match="injected EIO"):
        dcp.save({"w": torch.zeros(2)}, storage_writer=writer)
    monkeypatch.delenv("CKPTGUARD_FAILPOINT")
    assert [i.name for i in ckptguard.Store(tmp_path / "s").list()] == ["a"]
    assert ckptguard.Store(tmp_path / "s").latest_name() == "a"
    dcp.save({"w": torch.zeros(2)}, storage_writer=writer)  # the retry removes what it left
    assert os.listdir(tmp_path / "s" / ".staging") == []
    assert ckptguard.Store(tmp_path / "s").latest_name() == "b"


def test_options_and_paths(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="allow_pickle"):
        ckptguard.dcp.Writer(tmp_path / "a", allow_pickle=True)
    with pytest.raises(ValueError, match="compress"):
        ckptguard.dcp.Writer(tmp_path / "a", compress="nope")
    # The path may come as DCP's checkpoint_id instead.
    dcp.save(
        {"w": torch.ones(1)},
        checkpoint_id=tmp_path / "s" / "c",
        storage_writer=ckptguard.dcp.Writer(),
    )
    target = {"w": torch.zeros(1)}
    dcp.load(target, checkpoint_id=tmp_path / "s" / "c", storage_reader=ckptguard.dcp.Reader())
    assert target["w"].item() == 1.0
    with pytest.raises(CheckpointException, match="no path"):
        dcp.save({"w": torch.ones(1)}, storage_writer=ckptguard.dcp.Writer())


def test_reader_loads_a_checkpoint_of_ckptguard_save(tmp_path: Path) -> None:
    sd = state(2)
    ckptguard.save(sd, tmp_path / "s" / "a")
    target = _copy_target(sd)
    dcp.load(target, storage_reader=ckptguard.dcp.Reader(tmp_path / "s" / "a"))
    assert _equal(sd, target)


def test_import_alone_loads_no_dcp() -> None:
    code = "import sys, ckptguard.dcp; print('torch.distributed.checkpoint' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# -- 4 gloo ranks under torchrun ------------------------------------------------------------------
def torchrun(n: int, *args: Any, timeout: float = 400) -> list[dict]:
    """Run ``n`` ranks of tests/dist/dcp_backend.py ARGS; each rank's outcome (OUT: args[1])."""
    out = Path(args[1])
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank-*.json"):
        old.unlink()
    proc = subprocess.run(
        faultkit.torchrun(n, SCRIPT, *args),
        env=faultkit.torchrun_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    reports = []
    for r in range(n):
        p = out / f"rank-{r}.json"
        reports.append(json.loads(p.read_text()) if p.exists() else {"rank": r, "ok": False})
    assert proc.returncode == 0 and all(r["ok"] for r in reports), (
        json.dumps(reports)[-4000:] + proc.stdout[-2000:] + proc.stderr[-4000:]
    )
    return reports


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """4 ranks train STEPS steps, saving after step AT with the Writer (sync and async) and
    with FileSystemWriter: (store, out)."""
    root = tmp_path_factory.mktemp("dcp")
    store, out = root / "store", root / "train"
    reports = torchrun(4, "train", out, store, STEPS, AT)
    assert reports[0]["committed"] == f"step-{AT}"
    return store, out


@pytest.mark.framework_job
def test_fsdp2_save_is_one_verified_checkpoint(trained: tuple[Path, Path]) -> None:
    store, _ = trained
    listed = {i.name: i for i in ckptguard.Store(store).list()}
    assert set(listed) == {f"step-{AT}", f"async-{AT}"}
    assert ckptguard.Store(store).latest_name() == f"async-{AT}"  # committed last
    for info in listed.values():
        assert info.world_size == 4 and info.step == AT
        assert ckptguard.verify(info.path).ok
    described = ckptguard.describe(store / f"step-{AT}").tensors
    w = next(t for t in described if t.key == "app/model/0.weight")
    assert w.shape == (30, 10)
    rows = read((store / f"step-{AT}" / "index.parquet").read_bytes())
    shards = {
        (r.shard_offsets[0], r.shard_lengths[0], r.rank)
        for r in rows
        if r.key == "app/model/0.weight"
    }
    assert shards == {(0, 8, 0), (8, 8, 1), (16, 8, 2), (24, 6, 3)}  # FSDP2's uneven shards


@pytest.mark.framework_job
def test_async_save_holds_the_state_of_its_step(trained: tuple[Path, Path]) -> None:
    store, _ = trained
    sync, later = ckptguard.load(store / f"step-{AT}"), ckptguard.load(store / f"async-{AT}")
    assert _equal(sync, later) and sync["app"]["step"] == AT


@pytest.mark.framework_job
@pytest.mark.parametrize("ranks", [2, 1])
def test_reshard_load_equals_dcp_filesystem(trained: tuple[Path, Path], ranks: int) -> None:
    store, out = trained
    reports = torchrun(ranks, "load", out, store / f"step-{AT}", out / "fs")
    assert all(r["dtensors"] > 0 for r in reports)


def test_bitwise_resume_in_a_fresh_job(trained: tuple[Path, Path], tmp_path: Path) -> None:
    store, out = trained
    reports = torchrun(4, "resume", tmp_path, store, STEPS)
    assert reports[0]["resumed_at"] == AT
    whole = torch.load(out / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "final.pt", weights_only=True)
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k


# -- failures at the save's failpoints (tests/fault_cases.txt, scenario dcp) ----------------------
FAULTS = [  # make faults runs every rank x action of every dcp line (tests/test_fault_matrix.py)
    "dcp:dcp.reports_gathered:0:kill",
    "dcp:dcp.reports_gathered:0:eio",
    "dcp:save.data_written:2:kill",
    "dcp:commit.after_rename:0:kill",
    "dcp:commit.after_rename:0:eio",
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> faultkit.Bases:
    return faultkit.make_bases(tmp_path_factory.mktemp("bases"))


@pytest.mark.framework_job
@pytest.mark.parametrize("case_id", FAULTS)
def test_failure_leaves_old_or_new_whole(
    bases: faultkit.Bases, tmp_path: Path, case_id: str
) -> None:
    case = next(c for c in faultkit.cases(full=True) if c.id == case_id)
    outcome, _ = faultkit.run_case(case, bases, tmp_path, {})
    assert outcome == case.expect
