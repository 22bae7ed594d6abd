"""The benchmark harness's logic on tiny sizes: it runs, its JSON has every field, its figures and
ratios come from the trials. No test asserts a speed."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from ckptguard.bench.cli import bench
from ckptguard.bench.comm import (
    MPI_ENV,
    choose_launcher,
    launch_command,
    make_comm,
    slurm_task,
    under_mpi,
)
from ckptguard.bench.disk import make_cold, tree_bytes
from ckptguard.bench.engines import Engine, TorchSave, select_engines
from ckptguard.bench.limits import fresh_host_copy_seconds, gpu_copy_limits
from ckptguard.bench.report import markdown, write_reports
from ckptguard.bench.runner import BenchConfig, Runner
from ckptguard.bench.stats import LOWER_IS_BETTER, METRICS, summarize, summarize_limits
from ckptguard.bench.treeutil import compare, flatten
from ckptguard.bench.workloads import make_workload

TINY = 256 << 10


def _ckptguard_works() -> bool:
    try:
        import ckptguard

        ckptguard.save({"a": torch.ones(2)}, "/nonexistent-dir-for-probe/\0x")
    except AttributeError:
        return False
    except Exception:
        return True
    return True


@pytest.mark.parametrize("name", ["model", "finetune", "small", "weights"])
def test_workloads_are_deterministic_and_sized(name: str) -> None:
    a = make_workload(name, 4 << 20, seed=3)
    b = make_workload(name, 4 << 20, seed=3)
    c = make_workload(name, 4 << 20, seed=4)
    ta, tc = flatten(a.state)[0], flatten(c.state)[0]
    assert compare(a.state, b.state)[0]
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)
    assert 0.8 * (4 << 20) <= a.logical_bytes <= 1.1 * (4 << 20)
    assert a.tensor_count == len(ta)


def test_model_workload_looks_trained() -> None:
    w = make_workload("model", 8 << 20)
    model, optim = w.state["model"], w.state["optim"]
    assert all(t.dtype == torch.bfloat16 for t in model.values())
    norms = [t.float() for k, t in model.items() if k.endswith("ln1.weight")]
    assert norms and all(abs(t.mean().item() - 1.0) < 0.05 for t in norms)
    linear = next(t.float() for k, t in model.items() if k.endswith("fc1.weight"))
    assert 0.01 < linear.std().item() < 0.03
    st = next(iter(optim["state"].values()))
    assert st["exp_avg"].dtype == torch.float32 and st["exp_avg"].abs().max() < 1e-2
    assert (st["exp_avg_sq"] >= 0).all() and st["exp_avg_sq"].max() < 1e-4
    assert set(optim["state"]) == set(model)


def test_finetune_advance_changes_only_the_trainable_part() -> None:
    w = make_workload("finetune", 8 << 20)
    assert w.advance is not None and w.info["frozen_fraction"] >= 0.9
    before = {k: t.clone() for k, t in flatten(w.state)[0].items()}
    w.advance(w.state)
    after = flatten(w.state)[0]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(not k.startswith("model/") for k in changed)
    frozen = sum(t.numel() * t.element_size() for k, t in after.items() if k not in changed)
    assert frozen / w.logical_bytes >= 0.9


def test_small_workload_has_many_4k_tensors() -> None:
    w = make_workload("small", 40 << 20)
    tensors = flatten(w.state)[0]
    assert len(tensors) == 10_000
    assert all(t.numel() * t.element_size() == 4096 for t in tensors.values())


def _trial(
    engine: str,
    family: str,
    trial: int,
    stall: float,
    durable: float,
    load: float,
    stored: int = 100,
    rss: int = 1000,
    pinned: int = 100,
) -> dict:
    return {
        "workload": "w",
        "engine": engine,
        "family": family,
        "asynchronous": stall < durable,
        "trial": trial,
        "logical_bytes": 1_000_000_000,
        "stall_s": stall,
        "durable_s": durable,
        "load_s": load,
        "stored_bytes": stored,
        "save_peak_rss_bytes": rss,
        "load_peak_rss_bytes": 2 * rss,
        "save_extra_rss_bytes": rss // 10,
        "load_extra_rss_bytes": rss // 5,
        "pinned_peak_bytes": pinned,
        "verified": True,
        "wall_s": 1.0,
    }


def test_summary_medians_and_ratios_come_from_the_trials() -> None:
    results = {
        "workloads": {"w": {"logical_bytes": 1_000_000_000}},
        "limits": [
            {"limit": "write_fsync", "files": 1, "bytes": 1, "gbps": 0.5, "seconds": 1},
            {"limit": "write_fsync", "files": 2, "bytes": 1, "gbps": 1.0, "seconds": 1},
            {"limit": "write_fsync", "files": 2, "bytes": 1, "gbps": 3.0, "seconds": 1},
            {"limit": "write_fsync", "files": 2, "bytes": 1, "gbps": 2.0, "seconds": 1},
            {
                "limit": "read_cold",
                "files": 1,
                "bytes": 1,
                "gbps": 4.0,
                "seconds": 1,
                "cache": {"method": "fadvise"},
            },
            {"limit": "memcpy", "bytes": 1, "gbps": 10.0, "seconds": 1},
        ],
        "trials": [
            _trial("peer-a", "peer", 0, 4.0, 4.0, 2.0, rss=2000, pinned=800),
            _trial("peer-a", "peer", 1, 6.0, 6.0, 3.0, rss=3000, pinned=800),
            _trial("peer-a", "peer", 2, 5.0, 5.0, 4.0, rss=2500, pinned=800),
            _trial("peer-b", "peer", 0, 8.0, 8.0, 1.0, rss=1000, pinned=400),
            _trial("mine", "ckptguard", 0, 0.5, 2.0, 1.0, stored=50, rss=1000, pinned=200),
            _trial("mine", "ckptguard", 1, 0.5, 3.0, 1.0, stored=50, rss=2000, pinned=200),
            {**_trial("mine", "ckptguard", 2, 0.5, 3.0, 1.0), "error": "boom"},
        ],
    }
    s = summarize(results)
    lim = s["limits"]
    assert lim["write_gbps"] == 2.0 and lim["write_from"] == "write_fsync_2f"
    assert lim["read_gbps"] == 4.0 and lim["capture_gbps"] == 10.0
    rows = {r["engine"]: r for r in s["engines"]}
    a, mine = rows["peer-a"], rows["mine"]
    assert a["metrics"]["durable_s"] == {"median": 5.0, "min": 4.0, "max": 6.0, "n": 3}
    assert set(a["metrics"]) == set(METRICS)
    assert mine["ok_trials"] == 2 and mine["errors"] == ["boom"]
    assert mine["metrics"]["durable_s"]["median"] == 2.5
    assert s["best_peer"]["w"]["durable_s"] == {"engine": "peer-a", "value": 5.0}
    assert s["best_peer"]["w"]["load_s"] == {"engine": "peer-b", "value": 1.0}
    assert mine["vs_best_peer"]["durable_s"] == pytest.approx(2.5 / 5.0)
    assert mine["vs_best_peer"]["stall_s"] == pytest.approx(0.5 / 5.0)
    assert mine["vs_best_peer"]["stored_bytes"] == pytest.approx(0.5)
    assert mine["vs_limit"]["save"] == pytest.approx((1.0 / 2.5) / 2.0)
    assert mine["vs_limit"]["load"] == pytest.approx(1.0 / 4.0)
    assert mine["vs_limit"]["stall"] == pytest.approx((1.0 / 0.5) / 10.0)
    assert a["metrics"]["save_gbps"]["median"] == pytest.approx(1.0 / 5.0)
    # peak RSS and pinned memory are lower-is-better figures: best peer and ratio from the trials
    assert set(mine["vs_best_peer"]) == set(LOWER_IS_BETTER)
    assert s["best_peer"]["w"]["save_peak_rss_bytes"] == {"engine": "peer-b", "value": 1000}
    assert s["best_peer"]["w"]["load_peak_rss_bytes"] == {"engine": "peer-b", "value": 2000}
    assert mine["vs_best_peer"]["save_peak_rss_bytes"] == pytest.approx(1500 / 1000)
    assert mine["vs_best_peer"]["save_extra_rss_bytes"] == pytest.approx(150 / 100)
    assert mine["vs_best_peer"]["pinned_peak_bytes"] == pytest.approx(200 / 400)
    assert a["vs_best_peer"]["save_peak_rss_bytes"] == pytest.approx(2500 / 1000)
    assert mine["vs_best_peer"]["load_s"] == pytest.approx(1.0 / 1.0)
    # the stall over the capture floor: 1 GB at the memcpy limit of 10 GB/s is 0.1 s
    assert mine["capture_floor_s"] == pytest.approx(0.1)
    assert mine["stall_vs_floor"] == pytest.approx(0.5 / 0.1)
    assert a["stall_vs_floor"] == pytest.approx(5.0 / 0.1)
    md = markdown({**results, "summary": s, "config": {}, "complete": True})
    assert "| mine (async) |" in md and "peer-a" in md and "write_fsync_2f" in md
    assert "**w, ratios**" in md and "stall ÷ capture floor (memcpy: 0.100 s)" in md
    for head in ("stall ÷ best", "cold load ÷ best", "stored ÷ best", "pinned ÷ best"):
        assert head in md
    assert "peak RSS save/load ÷ best" in md and "| *best peer* | peer-a 5.00 s |" in md
    ratios = md[md.index("**w, ratios**") :]
    row = next(line for line in ratios.splitlines() if line.startswith("| mine (async) |"))
    # stall/best, stall/floor, durable, load, stored, peak RSS save/load, extra RSS, pinned
    assert row.split(" | ")[1:] == [
        "0.10×",
        "5.00×",
        "0.50×",
        "1.00×",
        "0.50×",
        "1.50× / 1.50×",
        "1.50× / 1.50×",
        "0.50× |",
    ]


def test_a_best_peer_of_zero_gives_no_ratio() -> None:
    trials = [
        _trial("peer", "peer", 0, 1.0, 1.0, 1.0, pinned=0),
        _trial("mine", "ckptguard", 0, 1.0, 1.0, 1.0, pinned=100),
    ]
    s = summarize({"workloads": {"w": {"logical_bytes": 10}}, "limits": [], "trials": trials})
    mine = next(r for r in s["engines"] if r["engine"] == "mine")
    assert mine["vs_best_peer"]["pinned_peak_bytes"] is None
    assert mine["vs_best_peer"]["durable_s"] == pytest.approx(1.0)
    assert mine["stall_vs_floor"] is None  # no capture limit measured


def test_pageable_limits_are_labelled_fresh_and_reused() -> None:
    limits = [
        {"limit": "d2h_pageable", "bytes": 8, "gbps": 14.0, "seconds": 1, "how": "reused"},
        {"limit": "d2h_pageable_fresh", "bytes": 8, "gbps": 1.06, "seconds": 1, "how": "fresh"},
    ]
    per = summarize_limits(limits)["per_limit"]
    assert per["d2h_pageable"]["how"] == "reused" and per["d2h_pageable_fresh"]["how"] == "fresh"
    md = markdown({"summary": {"limits": {"per_limit": per}}, "config": {}})
    assert "| d2h_pageable_fresh | 1.06 | 8 B | fresh |" in md


def test_fresh_host_copy_and_the_cpu_skip_path() -> None:
    src = torch.arange(1 << 20, dtype=torch.int32)
    calls: list[int] = []
    secs = fresh_host_copy_seconds(src, 3, lambda: calls.append(1))
    assert secs > 0 and len(calls) == 6  # synchronized before and after each copy
    if not torch.cuda.is_available():
        assert gpu_copy_limits(1 << 20, 1 << 20) == []


def test_launcher_choice() -> None:
    both = {"srun": "/usr/bin/srun", "mpiexec": "/venv/bin/mpiexec"}
    in_job = {"SLURM_JOB_ID": "42"}
    assert choose_launcher("auto", in_job, both) == ("srun", "/usr/bin/srun")
    assert choose_launcher("auto", {}, both) == ("mpiexec", "/venv/bin/mpiexec")
    assert choose_launcher("auto", in_job, {**both, "srun": None})[0] == "mpiexec"
    assert choose_launcher("mpiexec", in_job, both)[0] == "mpiexec"
    assert choose_launcher("srun", {}, both)[0] == "srun"  # srun may allocate a job itself
    with pytest.raises(ValueError, match="srun is not on PATH"):
        choose_launcher("srun", in_job, {"srun": None, "mpiexec": "/m"})
    with pytest.raises(ValueError, match="needs mpiexec"):
        choose_launcher("auto", {}, {"srun": "/usr/bin/srun", "mpiexec": None})
    with pytest.raises(ValueError, match="unknown launcher"):
        choose_launcher("torchrun", {}, both)
    cmd = launch_command("srun", "/usr/bin/srun", 4, ["--size", "1024"], python="py")
    assert cmd == ["/usr/bin/srun", "-n", "4", "--mpi=pmi2", "py", "-m", "ckptguard.bench"] + [
        "--size",
        "1024",
    ]
    assert launch_command("mpiexec", "/m", 2, [], python="py") == [
        "/m",
        "-n",
        "2",
        "py",
        "-m",
        "ckptguard.bench",
    ]


def test_slurm_task_detection() -> None:
    step = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "2", "SLURM_NTASKS": "4"}
    assert slurm_task({**step, "SLURM_STEP_NUM_TASKS": "4"}) == (2, 4)
    assert under_mpi({**step, "SLURM_STEP_NUM_TASKS": "4"})
    # a batch script or salloc shell has SLURM_PROCID and SLURM_NTASKS but is not a rank
    batch = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}
    assert slurm_task(batch) is None and not under_mpi(batch)
    assert under_mpi({"PMI_RANK": "0"}) and not under_mpi({})


def _no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in (*MPI_ENV, "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)


def test_srun_tasks_without_an_mpi_world_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    _no_launcher_env(monkeypatch)
    assert type(make_comm()).__name__ == "LocalComm"
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert type(make_comm()).__name__ == "LocalComm"  # one srun task runs alone, without MPI
    # four srun tasks without PMI: each would run the whole benchmark alone (own process: MPI init)
    env = {**os.environ, "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4"}
    code = "from ckptguard.bench.comm import make_comm; make_comm()"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    why = ("no MPI world", "mpi4py does not import")  # the second where ckptguard[mpi] is absent
    assert proc.returncode != 0 and any(w in proc.stderr for w in why), proc.stderr[-2000:]


def test_ranks_relaunch_under_srun_in_an_allocation(
    tmp_path: os.PathLike, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckptguard.bench.cli as cli

    _no_launcher_env(monkeypatch)
    launched: list[list[str]] = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: launched.append(cmd) or 0)
    monkeypatch.setattr(cli.shutil, "which", lambda name: f"/opt/bin/{name}")
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    args = ["--ranks", "2", "--size", "64KiB", "--no-load", "--out", str(tmp_path)]
    r = CliRunner().invoke(bench, args)
    assert r.exit_code == 0, r.output
    cmd = launched[-1]
    assert cmd[:4] == ["/opt/bin/srun", "-n", "2", "--mpi=pmi2"]
    assert cmd[5:7] == ["-m", "ckptguard.bench"] and "--no-load" in cmd
    assert cmd[cmd.index("--size") + 1] == str(64 << 10)
    r = CliRunner().invoke(bench, [*args, "--launcher", "mpiexec"])
    assert r.exit_code == 0 and launched[-1][:3] == ["/opt/bin/mpiexec", "-n", "2"]
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    r = CliRunner().invoke(bench, [*args, "--launcher", "srun"])
    assert r.exit_code != 0 and "srun is not on PATH" in r.output


def test_default_engines_include_the_async_modes() -> None:
    ids = [e.id for e in select_engines("all")]
    for want in ("ckptguard-async", "ckptguard-async-stream", "dcp.async_save+cached"):
        assert want in ids
    assert bench.params[[p.name for p in bench.params].index("engines")].default == "all"


class _Broken(Engine):
    id = "broken"

    def save(self, state: dict, d: str, name: str, rank: int, world: int) -> None:
        raise RuntimeError("disk on fire")

    def outputs(self, d: str, name: str, rank: int, world: int) -> list[str]:
        return []


def _tiny_cfg(tmp_path: os.PathLike, **kw: object) -> BenchConfig:
    base = dict(
        size=TINY,
        directory=str(tmp_path / "scratch"),
        trials=2,
        workloads=["model", "finetune"],
        limit_size=64 << 10,
        limit_trials=1,
        parallel_files=2,
    )
    base.update(kw)
    return BenchConfig(**base)


def test_runner_rotates_records_errors_and_verifies(tmp_path: os.PathLike) -> None:
    engines = [TorchSave(), *select_engines("h5py,dcp.save"), _Broken()]
    seen: list[int] = []
    res = Runner(_tiny_cfg(tmp_path), engines, on_progress=lambda r: seen.append(1)).run()
    assert res["complete"] and seen
    trials = res["trials"]
    assert len(trials) == 2 * 2 * len(engines)
    first = [t["engine"] for t in trials if t["workload"] == "model" and t["trial"] == 0]
    second = [t["engine"] for t in trials if t["workload"] == "model" and t["trial"] == 1]
    assert first != second and sorted(first) == sorted(second)
    ok = [t for t in trials if t["engine"] != "broken"]
    assert all(t["verified"] and "error" not in t for t in ok), [t.get("error") for t in ok]
    assert all(t["stored_bytes"] >= t["logical_bytes"] * 0.9 for t in ok)
    assert all(t["stall_s"] == t["durable_s"] for t in ok)  # all synchronous here
    broken = [t for t in trials if t["engine"] == "broken"]
    assert broken and all("disk on fire" in t["error"] for t in broken)
    assert not os.listdir(tmp_path / "scratch")  # every trial cleaned up


def test_time_budget_skips_and_says_so(tmp_path: os.PathLike) -> None:
    cfg = _tiny_cfg(tmp_path, budget_s=1e-9, workloads=["small"], size=64 << 10)
    res = Runner(cfg, [TorchSave()]).run()
    assert res["complete"] and not res["trials"] and not res["workloads"]  # not even generated
    assert any(s.get("reason", "").startswith("time budget") for s in res["skipped"])
    assert "skipped torch.save (small, all trials): time budget" in markdown(res)


def test_time_budget_skips_trials_estimated_to_end_past_it(
    tmp_path: os.PathLike, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _tiny_cfg(tmp_path, budget_s=1e4, workloads=["small"], size=64 << 10, trials=1)
    runner = Runner(cfg, select_engines("torch.save,safetensors"))
    monkeypatch.setattr(runner, "_estimate", lambda eng, w: 1e5 if eng.id == "torch.save" else 0)
    res = runner.run()
    assert [t["engine"] for t in res["trials"]] == ["safetensors"]
    skip = next(s for s in res["skipped"] if s["engine"] == "torch.save")
    assert skip["workload"] == "small" and skip["trial"] == 0


def test_load_only_for_chosen_engines(tmp_path: os.PathLike) -> None:
    cfg = _tiny_cfg(
        tmp_path, workloads=["small"], size=64 << 10, trials=1, load_engines=["torch.save"]
    )
    res = Runner(cfg, select_engines("torch.save,safetensors")).run()
    by = {t["engine"]: t for t in res["trials"]}
    assert "load_s" in by["torch.save"] and by["torch.save"]["verified"]
    assert "load_s" not in by["safetensors"] and "error" not in by["safetensors"]
    assert "cold loads measured only for: torch.save" in markdown(res)


def test_make_cold_says_how(tmp_path: os.PathLike) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(1 << 20))
    got = make_cold([str(f)], str(tmp_path))
    assert got["method"] in ("fadvise", "drop_caches", "evict-file", "none")
    assert got["resident"] is None or 0.0 <= got["resident"] <= 1.0
    assert tree_bytes([str(tmp_path)]) == 1 << 20


def test_cli_writes_json_markdown_png_and_renders(tmp_path: os.PathLike) -> None:
    out = tmp_path / "out"
    engines = "torch.save,safetensors" + (",ckptguard" if _ckptguard_works() else "")
    args = [
        "--size",
        "128KiB",
        "--trials",
        "1",
        "--workloads",
        "small",
        "--engines",
        engines,
        "--dir",
        str(tmp_path),
        "--out",
        str(out),
        "--limit-size",
        "64KiB",
    ]
    r = CliRunner().invoke(bench, args)
    assert r.exit_code == 0, r.output
    assert "| torch.save |" in r.output and "write_fsync_1f" in r.output
    res = json.loads((out / "results.json").read_text())
    for key in (
        "schema",
        "config",
        "machine",
        "workloads",
        "limits",
        "trials",
        "summary",
        "skipped",
        "complete",
    ):
        assert key in res
    for key in ("date", "cpu_count", "mem_total_bytes", "kernel", "filesystem", "versions", "gpu"):
        assert key in res["machine"]
    t = res["trials"][0]
    for key in (
        "stall_s",
        "durable_s",
        "stored_bytes",
        "load_s",
        "load_cache",
        "verified",
        "save_peak_rss_bytes",
        "pinned_peak_bytes",
    ):
        assert key in t
    assert (out / "results.md").exists() and (out / "small.png").stat().st_size > 0
    assert [p for p in os.listdir(tmp_path) if p.startswith("ckptguard-bench-")] == []
    r2 = CliRunner().invoke(
        bench, ["--render", str(out / "results.json"), "--out", str(tmp_path / "again")]
    )
    assert r2.exit_code == 0, r2.output
    assert (tmp_path / "again" / "small.png").exists()


def _without(tmp_path: os.PathLike, *packages: str) -> str:
    """A directory that, first on PYTHONPATH, makes each of ``packages`` fail to import as an
    absent package does."""
    stubs = tmp_path / "absent"
    for name in packages:
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(
            "raise ModuleNotFoundError(f'No module named {__name__!r}', name=__name__)\n"
        )
    return str(stubs)


def test_missing_peer_and_charts_are_named_up_front_and_the_run_still_succeeds(
    tmp_path: os.PathLike,
) -> None:
    import subprocess
    import sys

    import ckptguard

    root = os.path.dirname(os.path.dirname(ckptguard.__file__))
    path = [_without(tmp_path, "safetensors", "matplotlib"), root, os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    out = tmp_path / "out"
    args = ["--size", "64KiB", "--trials", "1", "--workloads", "small", "--limit-size", "64KiB"]
    args += ["--engines", "torch.save,safetensors", "--budget", "120"]
    args += ["--dir", str(tmp_path), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "ckptguard.bench", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    up_front = err[: err.index("limits, trial")]  # said before anything was measured
    assert "safetensors: safetensors is not installed" in up_front, err
    assert "PNG charts: matplotlib is not installed" in up_front, err
    assert up_front.count("ckptguard[bench]") == 2
    assert err.count("matplotlib") == 1  # said once
    assert "| torch.save |" in proc.stdout
    assert (out / "results.md").exists() and not list(out.glob("*.png"))
    res = json.loads((out / "results.json").read_text())
    assert [t["engine"] for t in res["trials"]] == ["torch.save"]
    assert res["skipped"][0]["engine"] == "safetensors"


def test_a_failing_engine_fails_the_run(
    tmp_path: os.PathLike, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckptguard.bench.engines as engines

    everything = engines.all_engines
    monkeypatch.setattr(engines, "all_engines", lambda: [*everything(), _Broken()])
    args = ["--size", "64KiB", "--trials", "1", "--workloads", "small", "--limit-size", "64KiB"]
    args += ["--dir", str(tmp_path), "--out", str(tmp_path / "out"), "--json-only"]
    r = CliRunner().invoke(bench, [*args, "--engines", "torch.save,broken"])
    assert r.exit_code == 1, r.output
    assert "broken (small): RuntimeError: disk on fire" in r.output
    assert (tmp_path / "out" / "results.json").exists()  # the results are still written
    r = CliRunner().invoke(bench, [*args, "--engines", "torch.save"])
    assert r.exit_code == 0, r.output


class _Absent(Engine):
    id = "absent"

    def unavailable(self, world: int, device: str) -> str | None:
        return "absentlib is not installed; install it with pip install absentlib"


def test_a_run_where_no_chosen_engine_can_run_measures_nothing_and_fails(
    tmp_path: os.PathLike, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckptguard.bench.engines as engines

    monkeypatch.setattr(engines, "all_engines", lambda: [TorchSave(), _Absent()])
    args = ["--size", "64KiB", "--workloads", "small", "--engines", "absent"]
    r = CliRunner().invoke(bench, [*args, "--dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1, r.output
    assert "absent: absentlib is not installed" in r.output
    assert "none of the chosen engines can run here" in r.output
    assert "limits, trial" not in r.output and not (tmp_path / "o").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith("ckptguard-bench-")] == []


def test_reports_of_a_partial_run(tmp_path: os.PathLike) -> None:
    results = {
        "config": {},
        "workloads": {},
        "limits": [],
        "trials": [],
        "skipped": [],
        "notes": [],
        "complete": False,
    }
    results["summary"] = summarize(results)
    paths = write_reports(results, str(tmp_path))
    assert "PARTIAL" in (tmp_path / "results.md").read_text()
    assert len(paths) == 2
