"""``ckptguard advise`` and ckptguard/advise.py: Young's and Daly's optimum checkpoint interval
(Daly's worked examples reproduced), Daly's wall-time model against a simulation of it, the
retention depth for a silent-corruption window, inputs derived from a store's events, the
refusals, and the command's text and JSON."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from clikit import run

from ckptguard import events, metrics
from ckptguard.advise import advise, daly, efficiency, history, retention_depth, young
from ckptguard.errors import AdviceError

pytestmark = pytest.mark.backend_independent  # no save or load: figures and events only

MIN, HOUR, DAY = 60.0, 3600.0, 86400.0


# ---- the formulas ----


@pytest.mark.parametrize(
    ("mtbf", "expected", "digits"),
    [(24 * HOUR, 117, 0), (6 * HOUR, 57, 0), (15 * MIN, 9.1, 1)],
)
def test_daly_worked_examples(mtbf: float, expected: float, digits: int) -> None:
    """Daly (FGCS 22, 2006), figures 3 to 5: delta = 5 min, R = 10 min, T_s = 500 h; the
    model predicts tau_opt = 117 min for M = 24 h, 57 min for M = 6 h, 9.1 min for M = 15 min."""
    assert round(daly(5 * MIN, mtbf) / MIN, digits) == expected


def test_young_first_order() -> None:
    """sqrt(2 delta M): 5 min of checkpoint and a day between failures give exactly 2 h."""
    assert young(5 * MIN, 24 * HOUR) == pytest.approx(120 * MIN, rel=1e-12)


def test_young_and_daly_agree_as_the_cost_vanishes() -> None:
    """Daly's corrections are of order sqrt(delta / M): the two converge as delta -> 0."""
    mtbf = 1000.0
    gaps = [abs(daly(x * mtbf, mtbf) / young(x * mtbf, mtbf) - 1) for x in (1e-2, 1e-4, 1e-6, 1e-8)]
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-4 and gaps[0] > 1e-2


def test_daly_beyond_twice_the_mtbf_is_the_mtbf() -> None:
    assert daly(2000.0, 1000.0) == 1000.0
    assert daly(5000.0, 1000.0) == 1000.0
    # Just below the limit, the series gives 2M (1 + 1/3 + 1/9) - 2M = 8M/9.
    assert daly(1999.999, 1000.0) == pytest.approx(8000 / 9, rel=1e-4)


def _exact_optimum(delta: float, mtbf: float) -> float:
    """The compute time that minimises Daly's wall time, by ternary search (it is unimodal)."""
    lo, hi = 1e-9 * mtbf, 50 * mtbf
    for _ in range(200):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if efficiency(a, delta, mtbf, 0.0) > efficiency(b, delta, mtbf, 0.0):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


@pytest.mark.parametrize("ratio", [1e-4, 1e-3, 1e-2, 0.1, 0.5])
def test_daly_is_near_the_exact_optimum_of_his_model(ratio: float) -> None:
    """Daly's estimate is within 1 % of the interval that truly maximises efficiency for
    delta <= M/2, and loses under 0.01 % of efficiency; Young's is off by more."""
    mtbf = 1000.0
    delta = ratio * mtbf
    best = _exact_optimum(delta, mtbf)
    assert abs(daly(delta, mtbf) / best - 1) < 0.01
    top = efficiency(best, delta, mtbf, 0.0)
    assert efficiency(daly(delta, mtbf), delta, mtbf, 0.0) == pytest.approx(top, rel=1e-4)
    assert abs(young(delta, mtbf) / best - 1) > abs(daly(delta, mtbf) / best - 1)


def test_efficiency_matches_a_simulation_of_the_model() -> None:
    """Daly's wall time, simulated: each segment of tau + delta runs until it meets no failure
    (exponential, mean M); a failure loses the attempt and costs a restart R (which may fail
    too) before the next. Work over wall time agrees with ``efficiency`` within 2 %."""
    rng = random.Random(21)
    mtbf, tau, delta, restart = 1.0, 0.3, 0.05, 0.1
    wall, segments = 0.0, 20_000
    for _ in range(segments):
        need = tau + delta
        while True:
            failure = rng.expovariate(1 / mtbf)
            if failure >= need:
                wall += need
                break
            wall += failure
            need = restart + tau + delta
    assert segments * tau / wall == pytest.approx(efficiency(tau, delta, mtbf, restart), rel=0.02)


def test_efficiency_edges() -> None:
    assert efficiency(0.0, 1.0, 100.0, 0.0) == 0.0
    assert efficiency(1e6, 1.0, 100.0, 0.0) == 0.0  # e^(10^4): no segment ever completes
    assert 0 < efficiency(10.0, 1.0, 100.0, 5.0) < efficiency(10.0, 1.0, 100.0, 0.0) < 1


def test_retention_depth_keeps_one_checkpoint_older_than_the_window() -> None:
    """With checkpoints every ``period`` and the newest of any age below ``period``, keeping
    ``retention_depth`` newest always keeps one at least ``window`` old, and one fewer does
    not right after a save."""
    for window, period in [(3 * DAY, 30 * MIN), (HOUR, 25 * MIN), (HOUR, 30 * MIN), (10, 7)]:
        n = retention_depth(window, period)
        for offset in [0.0, 0.3 * period, 0.999 * period]:
            ages = [offset + k * period for k in range(n)]
            assert max(ages) >= window
        assert (n - 2) * period < window  # n - 1 checkpoints right after a save
    assert retention_depth(3 * DAY, 30 * MIN) == 145
    assert retention_depth(HOUR, 25 * MIN) == 4
    assert retention_depth(HOUR, 30 * MIN) == 3


# ---- inputs from a store's events ----

T0 = 1_700_000_000.0


def _record(store: Path, kind: str, at: float, job: str = "7", restart: int = 0, **kw: Any) -> None:
    """One event as incarnation ``restart`` of job ``job`` wrote it (its own pid)."""
    pid = 1000 + restart + (0 if job == "7" else 500)
    assert (
        events.record(store, kind, at=at, job=job, restart=restart, pid=pid, rank=0, **kw) is None
    )


def _save(store: Path, at: float, stall: float, durable: float, **kw: Any) -> None:
    _record(
        store,
        "save",
        at,
        step=1,
        world_size=8,
        stall_s=stall,
        durable_s=durable,
        raw_bytes=1,
        stored_bytes=1,
        files=1,
        mode="async",
        **kw,
    )


def _history_store(store: Path) -> dict[str, float]:
    """Four incarnations of job 7: preempted, failed, crashed, completed; saves every 20 min.

    Returns what the test expects: job time, recoveries, stalls, gaps."""
    stalls = iter([4.0, 6.0, 5.0, 40.0, 3.0, 7.0, 8.0, 5.5, 6.5, 2.0, 9.0, 30.0])
    starts = [T0, T0 + 10 * HOUR, T0 + 20 * HOUR, T0 + 30 * HOUR]
    steps = [90.0, 150.0, 120.0, 200.0]  # start -> first step of each incarnation
    observed = 0.0
    for inc, (start, step) in enumerate(zip(starts, steps, strict=True)):
        _record(store, "start", start, restart=inc, world_size=8)
        _record(store, "first_step", start + step, restart=inc, step=inc)
        t = start + step
        for _ in range(3):
            t += 20 * MIN
            _save(store, t, next(stalls), 100.0, restart=inc)
        end = t + 60
        if inc == 0:
            _record(store, "preempt", end - 30, restart=inc, reason="SIGTERM")
            _record(store, "exit", end, restart=inc, outcome="checkpointed", status=85)
        elif inc == 1:
            _record(store, "exit", end, restart=inc, outcome="failed", status=1)
        elif inc == 3:
            _record(store, "exit", end, restart=inc, outcome="completed", status=0)
        else:
            end = t  # crashed: its last event is its last save
        observed += end - start
    # Another job saving into the store meanwhile, every 7 minutes: not one of job 7's gaps.
    # It is an incarnation whose start was not recorded: its job time runs from its first event.
    for k in range(3):
        _save(store, T0 + 600 + k * 7 * MIN, 5.0, 100.0, job="8")
    observed += 14 * MIN
    return {"observed": observed, "recovery": 150.0, "stall": 5.5}


def test_inputs_from_the_store_events(tmp_path: Path) -> None:
    expected = _history_store(tmp_path)
    (tmp_path / ".retention.json").write_text('{"keep_last": 3, "sdc_window": "1d"}')
    a = advise(tmp_path)
    h = a.history
    assert (h.incarnations, h.preempted, h.failed, h.crashed) == (5, 1, 1, 1)  # job 8's too
    assert h.recovered == 3
    assert h.observed_s == pytest.approx(expected["observed"])
    # Recoveries: the starts of incarnations 1, 2, 3 to their first steps (150, 120, 200 s).
    assert sorted(h.recoveries) == [120.0, 150.0, 200.0]
    assert a.restart_cost.value == expected["recovery"]
    assert a.restart_cost.source == "median start->first_step of 3 recoveries"
    # The median of 15 stalls (12 of job 7, 3 of job 8 at 5 s).
    assert a.checkpoint_cost.value == expected["stall"]
    assert a.checkpoint_cost.source == "median stall of 15 saves"
    assert a.mtbf.value == pytest.approx(expected["observed"] / 3)
    assert "3 interruptions (1 preempted, 1 failed, 1 crashed)" in a.mtbf.source
    assert a.durable is not None and a.durable.value == 100.0
    assert a.current is not None and a.current.value == pytest.approx(20 * MIN)
    assert "10 gaps" in a.current.source  # 2 per incarnation of job 7, 2 of job 8
    d, m, r = 5.5, expected["observed"] / 3, 150.0
    assert a.daly_s == daly(d, m) and a.young_s == young(d, m)
    assert a.optimum.period_s == pytest.approx(daly(d, m) + d)
    assert a.optimum.efficiency == efficiency(daly(d, m), d, m, r)
    assert a.at_current is not None
    assert a.at_current.efficiency == efficiency(20 * MIN - d, d, m, r)
    assert a.recommended == a.optimum
    assert a.retention is not None and a.retention.policy_has_sdc_window
    assert a.retention.window.value == DAY and "policy" in a.retention.window.source
    assert a.retention.at_current == 73  # ceil(24 h / 20 min) + 1
    assert a.retention.at_optimum == retention_depth(DAY, a.optimum.period_s)


def test_advise_and_the_metrics_count_the_same_interruptions_and_recoveries(
    tmp_path: Path,
) -> None:
    """The cases where incarnations are easy to get wrong: a run whose start was not recorded,
    a recovery with no first step yet, a crash recovered by a job without Slurm, one pending."""

    def log(kind: str, at: float, job: str | None, restart: int | None, **kw: Any) -> None:
        assert events.record(tmp_path, kind, at=at, job=job, restart=restart, rank=0, **kw) is None

    log("save", T0, "7", 0, step=1, world_size=1, stall_s=2.0, durable_s=2.0, raw_bytes=1,
        stored_bytes=1, files=1, mode="sync")  # fmt: skip
    log("exit", T0 + 100, "7", 0, outcome="failed", status=1)  # no start recorded
    log("start", T0 + 200, "7", 1, world_size=1)
    log("first_step", T0 + 260, "7", 1, step=2)
    log("preempt", T0 + 1000, "7", 1, reason="SIGTERM")
    log("exit", T0 + 1010, "7", 1, outcome="checkpointed", status=85)
    log("start", T0 + 1100, "7", 2, world_size=1)  # no first step: then it crashes
    log("start", T0 + 2000, None, None, world_size=1)
    log("first_step", T0 + 2050, None, None, step=3)
    log("exit", T0 + 3000, None, None, outcome="completed", status=0)
    log("verify", T0 + 9000, None, None, result="ok", seconds=1.0, problems=0)  # no job's
    log("start", T0 + 10_000, "9", 0, world_size=1)
    log("preempt", T0 + 10_100, "9", 0, reason="time limit")  # not recovered yet
    h = advise(tmp_path).history
    assert h == history(events.read(tmp_path).records)
    m = metrics.compute(tmp_path, now=T0 + 20_000, structure=False)
    mttr = m["seed"]["mttr"]
    assert h.recovered == mttr["recoveries"] == len(m["recoveries"]) == 3
    assert h.interruptions == len(m["recoveries"]) + len(m["interruptions_pending"]) == 4
    assert (h.preempted, h.failed, h.crashed) == (2, 1, 1)
    assert len(h.recoveries) == mttr["count"] == 2
    assert sorted(h.recoveries) == [50.0, 60.0] and mttr["value"] == 55.0
    # Job time: 100 + 810 + 0 + 1000 + 100 s (the verify event belongs to no incarnation).
    assert (h.incarnations, h.observed_s) == (5, 2010.0)
    res = run("advise", tmp_path)
    assert res.exit_code == 0, res.output
    assert "4 interruptions (2 preempted, 1 failed, 1 crashed)" in res.output
    assert "3 recoveries (2 with a first step)" in res.output


def test_given_figures_replace_the_events(tmp_path: Path) -> None:
    _history_store(tmp_path)
    a = advise(tmp_path, failure_rate=0.5, checkpoint_cost=30.0, restart_cost=0.0, sdc_window=DAY)
    assert (a.mtbf.value, a.checkpoint_cost.value, a.restart_cost.value) == (7200.0, 30.0, 0.0)
    assert "--failure-rate" in a.mtbf.source and "--checkpoint-cost" in a.checkpoint_cost.source
    assert a.retention is not None and a.retention.window.source == "given --sdc-window"
    assert not a.retention.policy_has_sdc_window
    assert advise(tmp_path, mtbf=DAY).mtbf.source == "given --mtbf"


def test_load_time_is_the_restart_cost_without_a_recovery(tmp_path: Path) -> None:
    _record(tmp_path, "start", T0, world_size=1)
    for k, total in enumerate([30.0, 50.0, 40.0]):
        _save(tmp_path, T0 + (k + 1) * HOUR, 2.0, 2.0)
        _record(tmp_path, "load", T0 + (k + 1) * HOUR + 1, step=1, result="ok", open_s=1.0,
                total_s=total, bytes_read=1, verified=True)  # fmt: skip
    a = advise(tmp_path, mtbf=DAY)
    assert a.restart_cost.value == 40.0 and "3 loads" in a.restart_cost.source


def test_the_floor_when_saves_are_slower_than_the_optimum(tmp_path: Path) -> None:
    for k in range(5):
        _save(tmp_path, T0 + k * HOUR, 1.0, 2 * HOUR)
    a = advise(tmp_path, mtbf=10 * HOUR)  # optimum about 2 min of compute
    assert a.optimum.period_s < 2 * HOUR
    assert a.recommended.period_s == 2 * HOUR
    assert any("pile up" in n for n in a.notes)


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(AdviceError, match="--checkpoint-cost"):
        advise(tmp_path, mtbf=DAY)
    _record(tmp_path, "start", T0, world_size=1)
    _save(tmp_path, T0 + HOUR, 3.0, 3.0)
    _record(tmp_path, "exit", T0 + 2 * HOUR, outcome="completed", status=0)
    with pytest.raises(AdviceError, match=r"no interruption .* 2\.0 h .* give --mtbf"):
        advise(tmp_path)
    for bad in [{"mtbf": -1.0}, {"checkpoint_cost": 0.0}, {"restart_cost": -2.0},
                {"failure_rate": math.inf}, {"mtbf": 1.0, "failure_rate": 1.0}]:  # fmt: skip
        with pytest.raises(AdviceError):
            advise(tmp_path, **bad)


# ---- the command ----


def test_cli_text_and_json(tmp_path: Path) -> None:
    _history_store(tmp_path)
    res = run("advise", tmp_path, "--sdc-window", "2d")
    assert res.exit_code == 0, res.output
    out = res.output
    assert "median stall of 15 saves" in out and "median start->first_step of 3" in out
    assert "3 interruptions (1 preempted, 1 failed, 1 crashed)" in out
    a = advise(tmp_path, sdc_window=2 * DAY)
    assert f"{a.daly_s / 60:.1f} min" in out and f"{a.young_s / 60:.1f} min" in out
    assert f"keep_last {a.retention.at_optimum} " in out  # type: ignore[union-attr]
    assert "keep_last 145" in out  # ceil(48 h / 20 min) + 1 at the current period
    assert '"sdc_window": "2d"' in out
    res = run(
        "advise",
        tmp_path,
        "--json",
        "--mtbf",
        "8h",
        "--checkpoint-cost",
        "1m",
        "--sdc-window",
        "86400",
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["mtbf"] == {"value": 8 * HOUR, "source": "given --mtbf"}
    assert doc["checkpoint_cost"]["value"] == 60.0
    assert doc["daly_s"] == daly(60.0, 8 * HOUR)
    assert doc["history"]["interruptions"] == 3 and doc["retention"]["at_current"] == 73


@pytest.mark.parametrize(
    "args",
    [
        ["--mtbf", "-5"],
        ["--mtbf", "0"],
        ["--mtbf", "soon"],
        ["--failure-rate", "-1"],
        ["--checkpoint-cost", "-3"],
        ["--restart-cost", "-1"],
        ["--sdc-window", "nan"],
        ["--mtbf", "8h", "--failure-rate", "1"],
    ],
)
def test_cli_usage_errors(tmp_path: Path, args: list[str]) -> None:
    res = run("advise", tmp_path, *args)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert args[0] in res.output or "not both" in res.output


def test_cli_refusals_name_the_option(tmp_path: Path) -> None:
    res = run("advise", tmp_path, "--mtbf", "1d")
    assert res.exit_code == 2 and res.stderr.startswith("error: ")
    assert "--checkpoint-cost" in res.stderr
    res = run("advise", tmp_path, "--checkpoint-cost", "30")
    assert res.exit_code == 2 and "--mtbf" in res.stderr and "no job start" in res.stderr
    assert run("advise", tmp_path / "missing", "--mtbf", "1d").exit_code == 2
