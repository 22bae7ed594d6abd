"""Operations metrics from hand-built event sequences with known answers; the Prometheus output
parsed back; the structural check of real checkpoints."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import ckptguard
from ckptguard import events, metrics, promexport

UID = "0" * 31 + "1"


class Log:
    """Events of one store, each recorded as a given job incarnation at a given time."""

    def __init__(self, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.store, self.mp = store, monkeypatch

    def __call__(
        self, kind: str, at: float, job: str | None = "100", restart: int | None = 0, **kw: Any
    ) -> None:
        for var, value in (("SLURM_JOB_ID", job), ("SLURM_RESTART_COUNT", restart)):
            if value is None:
                self.mp.delenv(var, raising=False)
            else:
                self.mp.setenv(var, str(value))
        assert events.record(self.store, kind, at=at, rank=0, **kw) is None


def save(log: Log, at: float, restart: int, step: int) -> None:
    log(
        "save",
        at,
        restart=restart,
        step=step,
        world_size=1,
        stall_s=1.0,
        durable_s=2.0,
        raw_bytes=100,
        stored_bytes=50,
        files=1,
        mode="sync",
        checkpoint=f"step-{step}",
    )


def two_preemptions(log: Log) -> None:
    """Job 100 preempted and requeued twice: recoveries of 50 s and 30 s (MTTR 40 s)."""
    log("start", 1000, restart=0, world_size=1)
    log("first_step", 1010, restart=0, step=0)
    save(log, 1100, 0, 10)
    log("preempt", 1200, restart=0, reason="SIGTERM")
    save(log, 1230, 0, 20)
    log("exit", 1240, restart=0, outcome="checkpointed", status=85)
    log("start", 1300, restart=1, world_size=1)
    log(
        "load",
        1320,
        restart=1,
        step=20,
        result="ok",
        open_s=0.5,
        total_s=3.0,
        bytes_read=100,
        verified=True,
        checkpoint="step-20",
    )
    log("first_step", 1350, restart=1, step=21)
    log("preempt", 1500, restart=1, reason="time limit")
    save(log, 1510, 1, 30)
    log("exit", 1520, restart=1, outcome="checkpointed", status=85)
    log("start", 1600, restart=2, world_size=1)
    log(
        "load",
        1610,
        restart=2,
        step=30,
        result="ok",
        open_s=0.25,
        total_s=1.0,
        bytes_read=100,
        verified=True,
        checkpoint="step-30",
    )
    log("first_step", 1630, restart=2, step=31)
    log("exit", 1700, restart=2, outcome="completed", status=0)


@pytest.mark.backend_independent  # no record encoded or read
def test_two_recoveries_give_the_exact_mttr_and_components(tmp_path, monkeypatch):
    two_preemptions(Log(tmp_path, monkeypatch))
    m = metrics.compute(tmp_path, now=2000)
    mttr = m["seed"]["mttr"]
    assert (mttr["value"], mttr["count"], mttr["excluded"]) == (40.0, 2, 0)
    first, second = m["recoveries"]
    assert first["seconds"] == {
        "preempt_to_checkpoint": 30,
        "checkpoint_to_exit": 10,
        "exit_to_start": 60,
        "start_to_load": 20,
        "load_to_first_step": 30,
        "start_to_first_step": 50,
        "outage": 150,
    }
    assert first["interrupted"]["cause"] == "preempt (SIGTERM)"
    assert (first["interrupted"]["restart"], first["resumed"]["restart"]) == (0, 1)
    assert (first["checkpoint"], first["loaded"]) == ("step-20", "step-20")
    assert second["seconds"]["start_to_first_step"] == 30 and second["seconds"]["outage"] == 130
    assert m["interruptions_pending"] == [] and m["notes"] == []
    assert m["saves"]["count"] == 3 and m["saves"]["bytes"]["raw"] == 300
    assert m["loads"]["count"] == 2 and m["loads"]["open_s"]["median"] == 0.25
    json.dumps(m, allow_nan=False)  # JSON as it is
    # The window keeps the second recovery only (its interruption at 1500).
    assert metrics.compute(tmp_path, now=2000, window=600)["seed"]["mttr"]["value"] == 30.0


@pytest.mark.backend_independent  # no record encoded or read
def test_a_crash_without_exit_is_an_interruption(tmp_path, monkeypatch):
    log = Log(tmp_path, monkeypatch)
    log("start", 100, job="7", restart=0, world_size=2)
    log("first_step", 110, job="7", restart=0, step=0)
    save(log, 150, 0, 5)  # job 100 restart 0: another job's save, not this incarnation's
    log(
        "save_failed",
        160,
        job="7",
        restart=0,
        error="StoreError",
        message="EIO",
        elapsed_s=1.0,
        mode="sync",
    )
    log("start", 300, job="7", restart=1, world_size=2)
    log("first_step", 325, job="7", restart=1, step=1)
    log("exit", 350, job="7", restart=1, outcome="completed", status=0)
    # Without Slurm: a start and no exit, then another start.
    log("start", 400, job=None, restart=None, world_size=1)
    log("start", 500, job=None, restart=None, world_size=1)
    log("first_step", 512, job=None, restart=None, step=2)
    m = metrics.compute(tmp_path, now=1000)
    crash, plain = m["recoveries"]
    assert crash["interrupted"]["cause"] == "crash (a start without an exit)"
    assert crash["interrupted"]["time"] == 160  # its last event
    assert crash["seconds"]["start_to_first_step"] == 25 and crash["seconds"]["outage"] == 165
    assert crash["seconds"]["exit_to_start"] is None  # no exit: no queue wait to report
    assert plain["seconds"]["start_to_first_step"] == 12
    assert m["seed"]["mttr"]["value"] == pytest.approx(18.5)
    assert m["saves"]["failures_by_type"] == {"StoreError": 1}
    assert [f["kind"] for f in m["failures"]] == ["save_failed"]


@pytest.mark.backend_independent  # no record encoded or read
def test_clock_skew_is_never_a_duration(tmp_path, monkeypatch):
    log = Log(tmp_path, monkeypatch)
    log("start", 1000, restart=0, world_size=1)
    log("preempt", 1100, restart=0, reason="SIGUSR1")
    log("exit", 1110, restart=0, outcome="checkpointed", status=85)
    log("start", 1200, restart=1, world_size=1)
    log("first_step", 1195, restart=1, step=1)  # the trainer's host is 5 s behind
    m = metrics.compute(tmp_path, now=1150)  # and now is before some events
    (r,) = m["recoveries"]
    assert r["seconds"]["start_to_first_step"] is None and not r["complete"]
    assert r["seconds"]["outage"] == 95  # what can be measured still is
    assert m["seed"]["mttr"] == {**m["seed"]["mttr"], "value": None, "count": 0, "excluded": 1}
    assert any("clock skew" in n for n in m["notes"])
    assert any("later than now" in n for n in m["notes"])


@pytest.mark.backend_independent  # no record encoded or read
def test_drills_three_ok_one_failed_and_skipped_lines(tmp_path, monkeypatch):
    log = Log(tmp_path, monkeypatch)
    for at in (10, 20, 30):
        log("drill", at, result="ok", seconds=1.0, checkpoint="step-1", uuid=UID)
    log(
        "drill",
        40,
        result="failed",
        seconds=1.0,
        checkpoint="step-2",
        error="CorruptCheckpointError",
    )
    log("validation", 50, result="failed", seconds=0.5, checkpoint="step-2", problems=3)
    with open(tmp_path / ".events" / "events.jsonl", "ab") as f:
        f.write(b'{"v":1,"kind":"drill","time":-1}\n')  # a negative time: not an event
        f.write(b"not json\n")
        f.write(b'{"v":1,"kind":"drill"')  # torn by a crash
    m = metrics.compute(tmp_path, now=100)
    rate = m["seed"]["recovery_integrity_rate"]
    assert (rate["value"], rate["numerator"], rate["denominator"]) == (0.75, 3, 4)
    assert m["events"]["skipped"] == 3 and m["events"]["records"] == 5
    assert m["drills"] == {"ok": 3, "failed": 1, "failed_checkpoints": ["step-2"]}
    assert m["validations"]["failed_checkpoints"] == ["step-2"]
    assert [(f["kind"], f["what"]) for f in m["failures"]] == [
        ("drill", "CorruptCheckpointError"),
        ("validation", "3 problem(s)"),
    ]
    assert (
        metrics.compute(tmp_path, now=100, window=65)["seed"]["recovery_integrity_rate"]["value"]
        == 0.0
    )
    audit = m["seed"]["audit_completeness"]
    assert audit["value"] is None and "no audit log" in audit["reason"]


@pytest.mark.backend_independent  # no record encoded or read
def test_prometheus_output_parses_back_with_the_same_figures(tmp_path, monkeypatch):
    log = Log(tmp_path, monkeypatch)
    two_preemptions(log)
    for at, result in ((1800, "ok"), (1810, "ok"), (1820, "ok"), (1830, "failed")):
        log("drill", at, result=result, seconds=1.0)
    log("save_failed", 1840, error="StoreError", message="x", elapsed_s=1.0, mode="async")
    m = metrics.compute(tmp_path, now=2000)
    got = _parse(promexport.render(m).decode())
    store = m["store"]
    assert got["ckptguard_mttr_seconds"] == {(("store", store),): 40.0}
    assert got["ckptguard_recovery_integrity_ratio"] == {(("store", store),): 0.75}
    assert got["ckptguard_save_failures"] == {(("error", "StoreError"), ("store", store)): 1.0}
    assert got["ckptguard_save_durable_seconds"][(("stat", "p95"), ("store", store))] == 2.0
    assert got["ckptguard_drills"][(("result", "failed"), ("store", store))] == 1.0
    assert got["ckptguard_audit_completeness_ratio"] == {}  # None: the family, no sample
    # Written for the textfile collector: whole, and nothing else left in the directory.
    out = tmp_path / "prom"
    out.mkdir()
    promexport.write_textfile(m, out / "ckptguard.prom")
    assert os.listdir(out) == ["ckptguard.prom"]
    assert _parse((out / "ckptguard.prom").read_text()) == got


def _parse(text: str) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        samples = out.setdefault(fam.name, {})
        for s in fam.samples:
            samples[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.mark.backend_independent  # no record encoded or read
def test_served_metrics_are_recomputed_after_the_cache(tmp_path, monkeypatch):
    log = Log(tmp_path, monkeypatch)
    log("drill", 10, result="ok", seconds=1.0)
    server, stop = promexport.serve(str(tmp_path), 0, cache_s=0.0)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        first = _parse(urllib.request.urlopen(url, timeout=10).read().decode())
        log("drill", 20, result="failed", seconds=1.0)
        second = _parse(urllib.request.urlopen(url, timeout=10).read().decode())
    finally:
        stop()
    key = (("store", str(tmp_path)),)
    assert first["ckptguard_recovery_integrity_ratio"][key] == 1.0
    assert second["ckptguard_recovery_integrity_ratio"][key] == 0.5


def test_structure_and_verified_age_of_real_checkpoints(tmp_path, monkeypatch):
    store = tmp_path / "store"
    backup = {"mlflow_backup": {"references": 8, "fraction_consistent": 0.875}}
    infos = [
        ckptguard.save(
            {"w": torch.arange(64.0) * i},
            store / f"step-{i}",
            step=i,
            metadata=backup if i == 2 else None,
        )
        for i in (1, 2, 3)
    ]
    log = Log(store, monkeypatch)
    log(
        "verify",
        1e10,
        result="ok",
        seconds=1.0,
        problems=0,
        checkpoint="step-1",
        uuid=infos[0].uuid,
    )
    log("drill", 1e10 + 1, result="ok", seconds=1.0, checkpoint="step-2", uuid=infos[1].uuid)
    log("drill", 1e10 + 2, result="failed", seconds=1.0, checkpoint="step-2", uuid=infos[1].uuid)
    data = next(p for p in (store / "step-3").iterdir() if p.name.startswith("rank-"))
    os.chmod(data, 0o644)
    with open(data, "ab") as f:  # a data file longer than the manifest says
        f.write(b"\0" * 8)
    m = metrics.compute(store, now=1e10 + 10)
    c = m["seed"]["metadata_artifact_consistency"]
    assert (c["numerator"], c["denominator"]) == (2, 3)
    assert [x["checkpoint"] for x in c["inconsistent"]] == ["step-3"]
    assert c["mlflow_newest"] == {
        "checkpoint": "step-2",
        "fraction_consistent": 0.875,
        "references": 8,
    }
    got = _parse(promexport.render(m).decode())["ckptguard_mlflow_backup_consistency_ratio"]
    assert got == {(("checkpoint", "step-2"), ("store", m["store"])): 0.875}
    ck = m["checkpoints"]
    assert ck["newest"]["name"] == "step-3"
    assert ck["newest_verified"]["name"] == "step-1"  # step-2's latest drill failed
    assert ck["newest_verified"]["age_s"] == pytest.approx(
        1e10 + 10 - ck["newest_verified"]["created"]
    )


@pytest.mark.backend_independent  # no record encoded or read
def test_cli_prints_json_writes_the_textfile_and_refuses_a_missing_store(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ckptguard.cli import cli

    two_preemptions(Log(tmp_path, monkeypatch))
    prom = tmp_path / "ckptguard.prom"
    res = CliRunner().invoke(cli, ["metrics", str(tmp_path), "--json", "--textfile", str(prom)])
    assert res.exit_code == 0, res.output
    m = json.loads(res.output)
    assert m["seed"]["mttr"]["value"] == 40.0 and m["schema"] == metrics.SCHEMA
    assert _parse(prom.read_text())["ckptguard_mttr_seconds"] == {(("store", m["store"]),): 40.0}
    res = CliRunner().invoke(cli, ["metrics", str(tmp_path)])
    assert res.exit_code == 0 and "# HELP ckptguard_mttr_seconds mean over recoveries" in res.output
    res = CliRunner().invoke(cli, ["metrics", str(tmp_path / "absent")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_audit_completeness_of_an_audited_store(tmp_path):
    from ckptguard import auditcheck

    store = tmp_path / "store"
    for i in (1, 2):
        ckptguard.save({"w": torch.arange(8.0) * i}, store / f"step-{i}", step=i)
    auditcheck.init(store)
    assert metrics.compute(store)["seed"]["audit_completeness"]["value"] == 1.0
    os.chmod(store / "step-1", 0o755)
    for p in (store / "step-1").iterdir():
        p.unlink()
    (store / "step-1").rmdir()  # removed behind the log's back
    a = metrics.compute(store)["seed"]["audit_completeness"]
    assert (a["value"], a["numerator"], a["denominator"]) == (0.5, 1, 2)
    assert [(g["kind"], g["name"]) for g in a["gaps"]] == [("delete", "step-1")]
    text = promexport.render(metrics.compute(store)).decode()
    key = (("store", str(store)),)
    assert _parse(text)["ckptguard_audit_completeness_ratio"] == {key: 0.5}
