"""What saves, loads and verifies record in their store's events file (ckptguard.measure)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import opened_outside, record_opens, snapshot

import ckptguard
from ckptguard import events, measure
from ckptguard.agent import client


def _state(n: int = 1000) -> dict:
    return {"w": torch.arange(n, dtype=torch.float32), "b": torch.ones(7)}


def _kinds(store: Path) -> list[str]:
    measure.flush()
    return [e["kind"] for e in events.read(store).records]


def test_a_sync_save_records_its_figures(tmp_path: Path) -> None:
    info = ckptguard.save(_state(), tmp_path / "s" / "a", step=3)
    (e,) = events.read(tmp_path / "s").records
    assert e["kind"] == "save" and e["mode"] == "sync" and e["rank"] == 0
    assert (e["checkpoint"], e["uuid"], e["step"]) == ("a", info.uuid, 3)
    assert (e["raw_bytes"], e["stored_bytes"], e["files"]) == (
        info.raw_bytes,
        info.stored_bytes,
        info.files,
    )
    assert e["stall_s"] == e["durable_s"] > 0  # the caller waited for the whole save
    assert sum(e["codec"].values()) == info.raw_bytes and e["incremental"] is False
    assert e["signed"] is False and e["encrypted"] is False and e["warnings"] == 0


def test_an_async_save_records_the_stall_apart(tmp_path: Path) -> None:
    with ckptguard.Checkpointer(tmp_path / "s") as c:
        info = c.save_async(_state(), "a", step=1).result()
    (e,) = events.read(tmp_path / "s").records
    assert e["mode"] == "async" and e["uuid"] == info.uuid
    assert e["stall_s"] is not None and 0 <= e["stall_s"] <= e["durable_s"]


def test_a_failed_save_records_why_and_changes_nothing_else(tmp_path: Path, monkeypatch) -> None:
    store = tmp_path / "s"
    ckptguard.save(_state(), store / "a")
    before = snapshot(str(store))
    monkeypatch.setenv("CKPTGUARD_FAILPOINT", "save.data_written:0:eio")
    with pytest.raises(ckptguard.StoreError):
        ckptguard.save(_state(), store / "b")
    assert snapshot(str(store)) == before
    last = events.read(store).records[-1]
    assert last["kind"] == "save_failed" and last["checkpoint"] == "b"
    assert last["error"] == "StoreError" and "injected" in last["message"]


def test_a_save_into_no_store_leaves_no_events(tmp_path: Path) -> None:
    with pytest.raises(ckptguard.CheckpointError):
        ckptguard.save({"x": object()}, tmp_path / "s" / "a")
    assert not (tmp_path / "s").exists()


def test_a_load_records_what_it_opened_and_read(tmp_path: Path) -> None:
    info = ckptguard.save(_state(), tmp_path / "s" / "a", step=5)
    ckptguard.load(tmp_path / "s")
    measure.flush()  # a read's event is written after it, never during it
    e = events.read(tmp_path / "s").records[-1]
    assert (e["kind"], e["result"], e["checkpoint"], e["uuid"]) == ("load", "ok", "a", info.uuid)
    assert e["step"] == 5 and e["verified"] is True
    assert e["bytes_read"] == info.raw_bytes
    assert 0 <= e["open_s"] <= e["total_s"]


def test_a_corrupt_load_and_verify_are_recorded_as_failed(tmp_path: Path) -> None:
    info = ckptguard.save(_state(), tmp_path / "s" / "a")
    data = Path(info.path) / "rank-00000.ckg"
    os.chmod(data, 0o644)
    raw = bytearray(data.read_bytes())
    raw[200] ^= 0xFF  # inside the first record's payload
    data.write_bytes(bytes(raw))
    with pytest.raises(ckptguard.CorruptCheckpointError):
        ckptguard.load(tmp_path / "s")
    report = ckptguard.verify(info.path)
    assert not report.ok
    measure.flush()
    load, verify = events.read(tmp_path / "s").records[-2:]
    assert (load["kind"], load["result"], load["error"]) == (
        "load",
        "failed",
        "CorruptCheckpointError",
    )
    assert (verify["kind"], verify["result"], verify["uuid"]) == ("verify", "failed", info.uuid)
    assert verify["problems"] == len(report.problems) >= 1


def test_one_file_checkpoints_record_nothing(tmp_path: Path) -> None:
    ckptguard.save(_state(), tmp_path / "m.pt")
    ckptguard.load(tmp_path / "m.pt")
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


def test_a_load_that_cannot_record_neither_warns_nor_fails(tmp_path: Path) -> None:
    """Loads read stores they may not write (a read-only mount of drained checkpoints): the
    event is dropped silently, the load stands."""
    ckptguard.save(_state(), tmp_path / "s" / "a")
    events_dir = tmp_path / "s" / ".events"
    for f in events_dir.iterdir():
        f.unlink()
    events_dir.rmdir()
    events_dir.write_bytes(b"not a directory")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckptguard.load(tmp_path / "s")
    assert events_dir.read_bytes() == b"not a directory"


def test_recording_can_be_switched_off(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CKPTGUARD_EVENTS", "0")
    ckptguard.save(_state(), tmp_path / "s" / "a")
    ckptguard.load(tmp_path / "s")
    assert not (tmp_path / "s" / ".events").exists()


def test_only_rank_0_records_a_load(tmp_path: Path, monkeypatch) -> None:
    ckptguard.save(_state(), tmp_path / "s" / "a")
    monkeypatch.setenv("RANK", "3")
    ckptguard.load(tmp_path / "s")
    assert _kinds(tmp_path / "s") == ["save"]


def test_training_step_without_an_agent_records_the_first_step_once(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("CKPTGUARD_AGENT", raising=False)
    monkeypatch.setattr(client, "_stepped", client.threading.Event())
    (tmp_path / "s").mkdir()
    ckptguard.training_step(11, store=tmp_path / "s")
    ckptguard.training_step(12, store=tmp_path / "s")
    (e,) = events.read(tmp_path / "s").records
    assert (e["kind"], e["step"], e["rank"]) == ("first_step", 11, 0)


def test_training_step_of_another_rank_records_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CKPTGUARD_AGENT", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(client, "_stepped", client.threading.Event())
    (tmp_path / "s").mkdir()
    ckptguard.training_step(1, store=tmp_path / "s")
    assert not (tmp_path / "s" / ".events").exists()


def test_bad_input_changes_nothing_not_even_the_events(tmp_path: Path) -> None:
    """An existing name, an object that cannot be saved, a template that does not fit: the
    caller's errors, not the system's; they leave the store, its events included, as it was."""
    store = tmp_path / "s"
    ckptguard.save(_state(), store / "a")
    before = (store / ".events" / "events.jsonl").read_bytes()
    with pytest.raises(ckptguard.CheckpointExistsError):
        ckptguard.save(_state(), store / "a")
    with pytest.raises(ckptguard.UnsupportedObjectError):
        ckptguard.save({"x": object()}, store / "b")
    with pytest.raises(ckptguard.CheckpointNotFoundError):
        ckptguard.load(store / "missing")
    measure.flush()
    assert (store / ".events" / "events.jsonl").read_bytes() == before


def test_a_read_opens_nothing_outside_its_checkpoint(tmp_path: Path) -> None:
    """I6: a load or verify opens nothing beside the checkpoint; its event is written after it
    (the next save, training_step, or the process's exit)."""
    info = ckptguard.save(_state(), tmp_path / "s" / "a")
    with record_opens() as opened:
        ckptguard.load(tmp_path / "s" / "a")
        ckptguard.verify(info.path)
    assert not opened_outside(opened, info.path), opened
    assert _kinds(tmp_path / "s") == ["save", "load", "verify"]


def test_reads_are_recorded_at_exit(tmp_path: Path) -> None:
    ckptguard.save(_state(), tmp_path / "s" / "a")
    code = "import sys, ckptguard; ckptguard.load(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], check=True, timeout=120)
    assert _kinds(tmp_path / "s") == ["save", "load"]
