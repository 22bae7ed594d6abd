"""What the bench compares against is measured, not assumed: every write strategy is a limit (the
best is "the write limit"), the first save of a fresh engine is kept apart from warm ones, and
loaded trials (beside a competing writer that is always stopped) are kept apart from quiet ones.
Tiny sizes; no test asserts a speed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from click.testing import CliRunner

from ckptguard.bench import congestion, limits
from ckptguard.bench.cli import _sigterm_unwinds, bench
from ckptguard.bench.congestion import CompetingWriter
from ckptguard.bench.engines import TorchSave
from ckptguard.bench.report import markdown
from ckptguard.bench.runner import BenchConfig, Runner
from ckptguard.bench.stats import summarize, summarize_limits

WRITES = {("write_fsync", 1), ("write_writeback", 1), ("write_direct", 1), ("write_fsync", 2)}


def _kinds(entries: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(e["limit"], e["files"]) for e in entries]


def test_every_write_strategy_is_measured_in_the_same_order_every_trial(tmp_path: Any) -> None:
    runs = [limits.disk_limits(str(tmp_path), 256 << 10, 2, trial=t) for t in range(3)]
    assert _kinds(runs[0]) == _kinds(runs[1]) == _kinds(runs[2])  # ranks combine by position
    for entries in runs:
        writes = [e for e in entries if e["limit"].startswith("write_")]
        assert {(e["limit"], e["files"]) for e in writes} == WRITES
        for e in writes:
            assert ("skipped" in e) or (e["bytes"] >= 256 << 10 and e["seconds"] > 0 and e["how"])
        assert [e["files"] for e in entries if e["limit"] == "read_cold"] == [1, 2]
    assert os.listdir(tmp_path) == []  # every file written was removed


def test_a_refused_strategy_is_skipped_with_its_reason_and_never_the_limit(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: str) -> int:
        raise limits.Refused("the file system refuses O_DIRECT (Invalid argument)")

    monkeypatch.setattr(limits, "_open_direct", refuse)
    entries = limits.disk_limits(str(tmp_path), 128 << 10, 2)
    direct = next(e for e in entries if e["limit"] == "write_direct")
    assert direct["skipped"].startswith("the file system refuses O_DIRECT") and not direct["bytes"]
    lim = summarize_limits(entries)
    assert lim["per_limit"]["write_direct_1f"]["skipped"] == direct["skipped"]
    assert lim["write_from"] != "write_direct_1f" and lim["write_gbps"] > 0
    md = markdown({"summary": {"limits": lim}, "config": {}})
    assert "| write_direct_1f | skipped | - | the file system refuses O_DIRECT" in md


def test_writeback_falls_back_to_fdatasync_where_sync_file_range_is_missing(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "start_writeback", lambda fd, pos, n: False)
    block = limits._aligned_block(64 << 10)
    how = limits._write_file(str(tmp_path / "f"), 64 << 10, block, "writeback")
    assert "fdatasync" in how and (tmp_path / "f").stat().st_size == 64 << 10


def _lim(name: str, files: int, gbps: float, cond: str = "quiet", **kw: Any) -> dict[str, Any]:
    e = {"limit": name, "files": files, "bytes": 10, "seconds": 1.0, "gbps": gbps}
    return {**e, "condition": cond, **kw}


def _rec(engine: str, family: str, durable: float, cond: str = "quiet", **kw: Any) -> dict:
    return {
        "workload": "w",
        "engine": engine,
        "family": family,
        "trial": 0,
        "condition": cond,
        "logical_bytes": 1_000_000_000,
        "stall_s": durable,
        "durable_s": durable,
        "stored_bytes": 10,
        "verified": True,
        "wall_s": 1.0,
        **kw,
    }


def test_the_write_limit_is_the_best_strategy_and_quiet_and_loaded_stay_apart() -> None:
    results = {
        "workloads": {"w": {"logical_bytes": 1_000_000_000}},
        "config": {"congestion": "dd"},
        "limits": [
            _lim("write_fsync", 1, 1.0),
            _lim("write_writeback", 1, 4.0),
            _lim("write_direct", 1, 0.0, skipped="refused"),
            _lim("write_fsync", 1, 0.2, "loaded"),
            _lim("write_direct", 1, 0.5, "loaded"),
        ],
        "trials": [
            _rec("mine", "ckptguard", 0.5),  # 2 GB/s: half the quiet limit, not 200% of fsync's
            _rec("peer", "peer", 1.0),
            _rec("mine", "ckptguard", 4.0, "loaded", competing_writer={"gbps": 1.5}),
            _rec("peer", "peer", 2.0, "loaded"),
        ],
    }
    s = summarize(results)
    assert s["limits"]["write_from"] == "write_writeback_1f"
    mine = next(r for r in s["engines"] if r["engine"] == "mine")
    assert mine["vs_limit"]["save"] == pytest.approx(0.5)
    assert mine["vs_best_peer"]["durable_s"] == pytest.approx(0.5)
    loaded = s["loaded"]
    assert loaded["limits"]["write_from"] == "write_direct_1f"
    lmine = next(r for r in loaded["engines"] if r["engine"] == "mine")
    assert lmine["vs_limit"]["save"] == pytest.approx(0.25 / 0.5)
    assert lmine["vs_best_peer"]["durable_s"] == pytest.approx(2.0)
    assert loaded["competing_writer_gbps"]["median"] == 1.5
    results["summary"] = s
    md = markdown(results)
    quiet_part, loaded_part = md.split("#### Under load")
    assert "4.00 GB/s (write_writeback_1f)" in quiet_part
    assert "0.50 GB/s (write_direct_1f)" in loaded_part and "**w (loaded)**" in loaded_part
    assert "| mine | 4.00 | 4.00 |" in loaded_part and "| mine | 0.50 | 0.50 |" in quiet_part
    assert "loaded" not in summarize({**results, "limits": [], "trials": results["trials"][:2]})


def test_first_saves_are_reported_apart_from_warm_ones() -> None:
    first = {"setup_s": 0.3, "stall_s": 1.4, "durable_s": 2.0, "save_extra_rss_bytes": 7}
    trials = [
        {**_rec("a", "ckptguard", 0.6, stall_s=0.1, first=first), "asynchronous": True},
        _rec("peer", "peer", 1.0),
    ]
    results = {"workloads": {"w": {"logical_bytes": 1}}, "limits": [], "trials": trials}
    s = summarize(results)
    row = next(r for r in s["engines"] if r["engine"] == "a")
    assert row["metrics"]["first_stall_s"]["median"] == 1.4
    assert row["metrics"]["stall_s"]["median"] == 0.1  # the warm save
    assert row["metrics"]["first_setup_s"]["median"] == 0.3
    results["summary"] = s
    md = markdown(results)
    assert "**w, first save of a fresh engine vs warm saves**" in md
    assert "| a (async) | 0.30 | 1.40 | 0.10 | 2.00 | 0.60 |" in md


class _Stateful(TorchSave):
    """A synchronous engine that keeps state, counting how often it is started fresh."""

    id = "stateful"
    keeps_state = True

    def __init__(self) -> None:
        self.fresh_calls = 0
        self.saves: list[str] = []

    def fresh(self, state: dict) -> None:
        self.fresh_calls += 1

    def save(self, state: dict, d: str, name: str, rank: int, world: int) -> None:
        self.saves.append(name)
        return super().save(state, d, name, rank, world)


def _cfg(tmp_path: Any, **kw: Any) -> BenchConfig:
    base: dict[str, Any] = dict(
        size=64 << 10,
        directory=str(tmp_path / "scratch"),
        trials=2,
        workloads=["small"],
        limit_size=64 << 10,
        limit_trials=1,
        parallel_files=2,
    )
    return BenchConfig(**{**base, **kw})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_loaded_trials_alternate_with_quiet_ones_and_the_writer_always_stops(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids: list[int] = []
    start = CompetingWriter.start

    def spy(self: CompetingWriter) -> None:
        start(self)
        assert self.proc is not None and _alive(self.proc.pid)
        pids.append(self.proc.pid)

    monkeypatch.setattr(CompetingWriter, "start", spy)
    stateful = _Stateful()
    res = Runner(_cfg(tmp_path, congestion="dd"), [TorchSave(), stateful]).run()
    trials = res["trials"]
    assert [t["condition"] for t in trials] == ["quiet"] * 2 + ["loaded"] * 4 + ["quiet"] * 2
    loaded = [t for t in trials if t["condition"] == "loaded"]
    assert all(t["competing_writer"]["bytes"] > 0 for t in loaded), loaded
    assert all("error" not in t and t["verified"] for t in trials)
    assert {e["condition"] for e in res["limits"]} == {"quiet", "loaded"}
    assert len(pids) == 4 + 1  # one writer per loaded trial, one for the loaded limits
    assert not any(_alive(p) for p in pids)
    assert os.listdir(tmp_path / "scratch") == []
    assert stateful.fresh_calls == 4 and stateful.saves == ["first", "ckpt"] * 4
    assert all("first" in t for t in trials if t["engine"] == "stateful")
    assert "#### Under load" in markdown(res)


def test_the_writer_is_stopped_and_its_file_removed_on_an_exception_or_ctrl_c(
    tmp_path: Any,
) -> None:
    for exc in (RuntimeError("trial failed"), KeyboardInterrupt()):
        writer = CompetingWriter("dd", str(tmp_path), 4 << 20)
        with pytest.raises(type(exc)), writer:
            assert writer.proc is not None
            pid, workdir = writer.proc.pid, writer.workdir
            assert workdir and os.listdir(workdir) == ["load.bin"]
            raise exc
        assert writer.proc is None and not _alive(pid)
        assert writer.result["bytes"] > 0 and "error" not in writer.result
        assert os.listdir(tmp_path) == []


_ORPHAN = """
import os, signal, sys
from ckptguard.bench.congestion import CompetingWriter
w = CompetingWriter("dd", sys.argv[1], 4 << 20)
w.start()
print(w.proc.pid, os.path.join(w.workdir, "load.bin"), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_bench_leaves_no_writer_behind(tmp_path: Any) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _ORPHAN, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pid, path = proc.stdout.split()
    deadline = time.monotonic() + 30  # a bound on the wait, not a speed
    while (_alive(int(pid)) or os.path.exists(path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(path)
    if _alive(int(pid)):  # a zombie (not reaped by init yet) has exited all the same
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().split(")")[-1].split()[0] == "Z"


def test_sigterm_unwinds_the_run_and_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info, _sigterm_unwinds():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_stress_needs_stress_ng_and_says_so_up_front(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(congestion.shutil, "which", lambda name: None)
    assert "stress-ng is not installed" in (congestion.unavailable("stress") or "")
    args = ["--size", "64KiB", "--workloads", "small", "--engines", "torch.save"]
    args += ["--congestion", "stress", "--dir", str(tmp_path), "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(bench, args)
    assert r.exit_code == 2 and "stress-ng is not installed" in r.output
    assert not (tmp_path / "o").exists()
    cmd = congestion.command("stress", "/d", 1 << 20)
    assert cmd[:3] == ["stress-ng", "--hdd", "1"] and "direct,wr-seq" in cmd and "/d" in cmd
    with pytest.raises(ValueError):
        CompetingWriter("none", str(tmp_path), 1)


def test_the_cli_runs_quiet_and_loaded_and_reports_them_apart(tmp_path: Any) -> None:
    out = tmp_path / "out"
    args = ["--size", "64KiB", "--trials", "1", "--workloads", "small", "--limit-size", "64KiB"]
    args += ["--engines", "torch.save", "--congestion", "dd", "--json-only"]
    r = CliRunner().invoke(bench, [*args, "--dir", str(tmp_path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["congestion"] == "dd"
    assert sorted(t["condition"] for t in res["trials"]) == ["loaded", "quiet"]
    assert "loaded" in res["summary"] and "#### Under load" in r.output
    assert "| write_writeback_1f |" in r.output and "The write limit" in r.output
    assert [p for p in os.listdir(tmp_path) if p != "out"] == []
