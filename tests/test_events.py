"""A store's events file: appended whole by concurrent writers, read as hostile input."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from ckptguard import events
from ckptguard.fsutil import UnsafeFileError

UID = "0" * 31 + "1"


def test_record_and_read_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert events.record(tmp_path, "preempt", reason="SIGTERM", rank=0) is None
    assert events.record(tmp_path, "first_step", step=5, checkpoint="step-5", uuid=UID) is None
    got = events.read(tmp_path)
    assert [e["kind"] for e in got.records] == ["preempt", "first_step"]
    first = got.records[0]
    assert (first["job"], first["restart"], first["rank"], first["reason"]) == (
        "77",
        2,
        0,
        "SIGTERM",
    )
    assert got.records[1]["checkpoint"] == "step-5" and got.skipped == 0
    assert oct(os.stat(tmp_path / ".events").st_mode & 0o777) == "0o700"
    assert oct(os.stat(tmp_path / ".events" / "events.jsonl").st_mode & 0o777) == "0o600"


def test_disabled_records_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTGUARD_EVENTS", "0")
    assert events.record(tmp_path, "preempt", reason="x") is None
    assert not (tmp_path / ".events").exists()


def test_bad_events_are_refused_before_writing(tmp_path):
    assert "unknown event kind" in events.record(tmp_path, "nonsense")
    assert "not recorded" in events.record(
        tmp_path, "verify", result="ok", seconds=float("nan"), problems=0
    )
    # A long message is cut, so the line stays one write.
    assert (
        events.record(
            tmp_path, "save_failed", error="E", message="x" * 10_000, elapsed_s=1.0, mode="sync"
        )
        is None
    )
    (only,) = events.read(tmp_path).records
    assert len(only["message"]) == 512


def test_missing_store_or_hostile_directory_is_reported_not_raised(tmp_path):
    assert "not recorded" in events.record(tmp_path / "absent", "preempt", reason="x")
    os.symlink(tmp_path / "elsewhere", tmp_path / ".events")
    (tmp_path / "elsewhere").mkdir()
    problem = events.record(tmp_path, "preempt", reason="x")
    assert problem is not None and "link" in problem
    assert os.listdir(tmp_path / "elsewhere") == []
    with pytest.raises(UnsafeFileError):
        events.read(tmp_path)


def test_fifo_in_place_of_the_file_neither_blocks_nor_is_written(tmp_path):
    (tmp_path / ".events").mkdir()
    os.mkfifo(tmp_path / ".events" / "events.jsonl")
    problem = events.record(tmp_path, "preempt", reason="x")
    assert problem is not None
    with pytest.raises(UnsafeFileError):
        events.read(tmp_path)


def test_hostile_lines_are_skipped_and_counted(tmp_path):
    assert events.record(tmp_path, "exit", outcome="checkpointed", status=0) is None
    good = (tmp_path / ".events" / "events.jsonl").read_bytes()
    base = json.loads(good)
    bad = [
        b"{torn",
        b"[1,2]",
        json.dumps({**base, "v": 2}).encode(),
        json.dumps({**base, "time": -1}).encode(),
        json.dumps({**base, "status": True}).encode(),
        json.dumps({**base, "checkpoint": "../x"}).encode(),
        json.dumps({**base, "uuid": "nothex"}).encode(),
        json.dumps({k: v for k, v in base.items() if k != "outcome"}).encode(),
        b'{"v":1,"time":NaN}',
        b"x" * 5000,
    ]
    with open(tmp_path / ".events" / "events.jsonl", "ab") as f:
        f.write(b"\n".join(bad) + b"\n")
    got = events.read(tmp_path)
    assert len(got.records) == 1 and got.skipped == len(bad)


def test_unknown_kinds_and_members_are_kept(tmp_path):
    line = json.loads(events.build("preempt", reason="x"))
    line.update(kind="future_kind", extra={"a": 1})
    (tmp_path / ".events").mkdir()
    (tmp_path / ".events" / "events.jsonl").write_text(json.dumps(line) + "\n")
    (rec,) = events.read(tmp_path).records
    assert rec["kind"] == "future_kind" and rec["extra"] == {"a": 1}


def test_rotation_keeps_two_generations(tmp_path, monkeypatch):
    monkeypatch.setattr(events, "ROTATE_AT", 2000)
    for i in range(60):
        assert events.record(tmp_path, "first_step", step=i) is None
    names = sorted(os.listdir(tmp_path / ".events"))
    assert names == ["events.1.jsonl", "events.jsonl"]
    steps = [e["step"] for e in events.read(tmp_path).records]
    assert steps == sorted(steps) and steps[-1] == 59 and len(steps) < 60


def test_read_cap_keeps_the_newest_whole_lines(tmp_path):
    for i in range(50):
        events.record(tmp_path, "first_step", step=i, at=1000.0 + i)
    got = events.read(tmp_path, max_bytes=1000)
    assert got.truncated and got.skipped == 0
    steps = [e["step"] for e in got.records]
    assert steps[-1] == 49 and steps == list(range(50 - len(steps), 50))


def _writer(store: str, n: int) -> None:
    for i in range(n):
        assert events.record(store, "verify", result="ok", seconds=0.5, problems=i) is None


def test_concurrent_processes_never_interleave(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 200)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = events.read(tmp_path)
    assert len(got.records) == 800 and got.skipped == 0
