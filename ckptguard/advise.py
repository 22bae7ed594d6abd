"""Advice on how often to checkpoint and how many checkpoints to keep, from a store's events.

The model (docs/operations.md, "Checkpoint interval and retention depth"): failures arrive as a
Poisson process with mean time between failures M; each checkpoint costs the job delta seconds
of blocked training; a restart costs R seconds before training resumes, and the work since the
last checkpoint is lost. Young (CACM 17(9), 1974) minimised lost work plus checkpoint overhead
to first order: a compute time of sqrt(2 delta M) between checkpoints. Daly (FGCS 22, 2006,
303-312) kept the higher-order terms: his equation 37 for the optimum and his wall-clock time
T_w(tau) = M e^(R/M) (e^((tau+delta)/M) - 1) T_s / tau for a job of T_s seconds of work, whose
ratio T_s / T_w is the efficiency reported here.

The pure functions (``young``, ``daly``, ``efficiency``, ``retention_depth``) take seconds.
``advise`` gathers the inputs a caller does not give from the store's events (``events.read``):
delta, the median stall of recent saves; R, the median recovery (start to first step) or load;
M, observed job time over interruptions (incarnations, interruptions and recoveries as
``recovery`` defines them for the metrics); the interval the job uses now; and the silent
corruption window of the store's retention policy. Every figure carries its source.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import events, recovery
from .errors import AdviceError, RetentionPolicyError, StoreError
from .fsutil import UnsafeFileError
from .retention import read_policy

__all__ = [
    "RECENT_SAVES",
    "Advice",
    "Figure",
    "History",
    "Interval",
    "Retention",
    "advise",
    "daly",
    "efficiency",
    "history",
    "retention_depth",
    "young",
]

RECENT_SAVES = 50
"""The saves (and gaps between saves) whose median is taken: the job as it runs lately."""


def young(delta: float, mtbf: float) -> float:
    """Young's first-order optimum compute time between checkpoints: sqrt(2 delta M)."""
    return math.sqrt(2.0 * delta * mtbf)


def daly(delta: float, mtbf: float) -> float:
    """Daly's higher-order optimum compute time between checkpoints (2006, equation 37):
    sqrt(2 delta M) [1 + (1/3) sqrt(delta / 2M) + (1/9) (delta / 2M)] - delta for
    delta < 2M, else M (a checkpoint that costs more than two MTBFs: save once per MTBF)."""
    if delta >= 2.0 * mtbf:
        return mtbf
    ratio = delta / (2.0 * mtbf)
    return young(delta, mtbf) * (1.0 + math.sqrt(ratio) / 3.0 + ratio / 9.0) - delta


def efficiency(compute: float, delta: float, mtbf: float, restart: float) -> float:
    """The fraction of wall-clock time that is useful work, T_s / T_w in Daly's model, with
    ``compute`` seconds of work between checkpoints of cost ``delta``: tau e^(-R/M) /
    (M (e^((tau+delta)/M) - 1)). 0 where the period is so long that no segment completes."""
    if compute <= 0:
        return 0.0
    x = (compute + delta) / mtbf
    if x > 700:  # e^x overflows a float: the expected time is unbounded
        return 0.0
    return compute * math.exp(-restart / mtbf) / (mtbf * math.expm1(x))


def retention_depth(window: float, period: float) -> int:
    """Checkpoints to keep, one every ``period`` seconds, so that one was created at least
    ``window`` seconds ago even right after a save: ceil(window / period) + 1."""
    return math.ceil(round(window / period, 9)) + 1


@dataclass(frozen=True)
class Figure:
    """One input in seconds and where it came from ("median stall of 12 saves")."""

    value: float
    source: str


@dataclass(frozen=True)
class History:
    """The store's incarnations, interruptions and recoveries (``recovery``; docs/operations.md,
    "Metrics: definitions")."""

    incarnations: int
    observed_s: float
    """Job time: the sum over incarnations of their last event's time less their start (or,
    where the start was not recorded, their first event's)."""
    preempted: int
    failed: int
    """Incarnations with no preempt whose exit outcome was not "completed"."""
    crashed: int
    """Incarnations with a start and no exit, followed by a later start."""
    recovered: int
    """Interruptions followed by a later start (recoveries, first step recorded or not)."""
    recoveries: tuple[float, ...]
    """Seconds from the start to the first training step of each recovery that has both (and
    no clock skew between them)."""

    @property
    def interruptions(self) -> int:
        return self.preempted + self.failed + self.crashed


@dataclass(frozen=True)
class Interval:
    """A checkpoint interval: compute time between saves, the period from one save to the
    next (compute plus the checkpoint cost), and the expected efficiency at it."""

    compute_s: float
    period_s: float
    efficiency: float


@dataclass(frozen=True)
class Retention:
    """Checkpoints to keep so one predates the silent-corruption window at each interval."""

    window: Figure
    at_optimum: int
    at_current: int | None
    policy_has_sdc_window: bool


@dataclass(frozen=True)
class Advice:
    """What ``advise`` found: its inputs with their sources, and the intervals they give."""

    checkpoint_cost: Figure
    restart_cost: Figure
    mtbf: Figure
    history: History
    durable: Figure | None
    """Median save-start-to-committed time: the period may not be shorter (the floor)."""
    current: Figure | None
    """Median period between consecutive saves of one process."""
    young_s: float
    daly_s: float
    optimum: Interval
    recommended: Interval
    """The optimum, or the floor (``durable``) where saves could not keep up at the optimum."""
    at_current: Interval | None
    retention: Retention | None
    notes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The advice as a JSON object (seconds, fractions)."""
        doc = asdict(self)
        doc["history"]["interruptions"] = self.history.interruptions
        doc["notes"] = list(self.notes)
        doc["history"]["recoveries"] = list(self.history.recoveries)
        return doc


def history(records: Sequence[dict[str, Any]]) -> History:
    """The incarnations, job time, interruptions and recoveries of a store's events, as
    ``recovery`` defines them (the same ones the metrics report)."""
    incs = recovery.incarnations(list(records))
    recs, pending = recovery.recoveries(incs)
    kinds = Counter(i["kind"] for i in [*(r["interrupted"] for r in recs), *pending])
    return History(
        incarnations=len(incs),
        observed_s=sum(i.observed_s for i in incs),
        preempted=kinds["preempted"],
        failed=kinds["failed"],
        crashed=kinds["crashed"],
        recovered=len(recs),
        recoveries=tuple(r["seconds"]["start_to_first_step"] for r in recs if r["complete"]),
    )


def _gaps(saves: Iterable[dict[str, Any]]) -> list[float]:
    """Seconds between consecutive saves of one process (one incarnation), oldest first."""
    last: dict[tuple[Any, ...], float] = {}
    gaps: list[tuple[float, float]] = []
    for s in saves:
        key = (s["job"], s["restart"], s["host"], s["pid"])
        if key in last and s["time"] > last[key]:
            gaps.append((s["time"], s["time"] - last[key]))
        last[key] = s["time"]
    return [g for _, g in sorted(gaps)]


def _positive(value: float | None, what: str, option: str, *, zero: bool = False) -> float | None:
    """``value`` as a float if it is a finite number above 0 (or 0, with ``zero``)."""
    if value is None:
        return None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        least = "0 or more" if zero else "more than 0"
        raise AdviceError(f"{what} ({option}) must be a finite number {least}, not {value!r}")
    return float(value)


def _checkpoint_cost(saves: list[dict[str, Any]], given: float | None) -> Figure:
    if given is not None:
        return Figure(given, "given --checkpoint-cost")
    if not saves:
        raise AdviceError(
            "no save is recorded in the store's events, so the checkpoint cost is unknown: "
            "give --checkpoint-cost SECONDS"
        )
    stall = statistics.median(s["stall_s"] for s in saves)
    if stall <= 0:
        raise AdviceError(
            f"the median stall of {len(saves)} saves is 0 s: give --checkpoint-cost SECONDS"
        )
    return Figure(stall, f"median stall of {len(saves)} saves")


def _restart_cost(loads: list[dict[str, Any]], past: History, given: float | None) -> Figure:
    if given is not None:
        return Figure(given, "given --restart-cost")
    if past.recoveries:
        n = len(past.recoveries)
        return Figure(
            statistics.median(past.recoveries), f"median start->first_step of {n} recoveries"
        )
    if loads:
        median = statistics.median(r["total_s"] for r in loads)
        return Figure(median, f"median load time of {len(loads)} loads (no recovery recorded)")
    return Figure(0.0, "no recovery or load recorded: 0 assumed (give --restart-cost)")


def _mtbf(past: History, mtbf: float | None, rate: float | None) -> Figure:
    if mtbf is not None:
        return Figure(mtbf, "given --mtbf")
    if rate is not None:
        return Figure(3600.0 / rate, f"given --failure-rate {rate:g} per hour")
    if past.incarnations == 0:
        raise AdviceError(
            "no job start is recorded in the store's events (`ckptguard run` records starts, "
            "preemptions and exits), so the mean time between failures cannot be estimated: "
            "give --mtbf DURATION or --failure-rate PER_HOUR"
        )
    if past.interruptions == 0:
        raise AdviceError(
            f"no interruption is recorded in {past.observed_s / 3600:.1f} h of job time over "
            f"{past.incarnations} incarnations, so the mean time between failures cannot be "
            "estimated: give --mtbf DURATION or --failure-rate PER_HOUR"
        )
    kinds = f"{past.preempted} preempted, {past.failed} failed, {past.crashed} crashed"
    return Figure(
        past.observed_s / past.interruptions,
        f"{past.observed_s / 3600:.1f} h of job time over {past.incarnations} incarnations / "
        f"{past.interruptions} interruptions ({kinds})",
    )


def _window(store: str, given: float | None, notes: list[str]) -> tuple[Figure | None, bool]:
    """The silent-corruption window, given or the policy's; whether the policy has one."""
    try:
        policy = read_policy(store)
    except RetentionPolicyError as e:
        notes.append(f"the store's retention policy is not used: {e}")
        policy = None
    has = policy is not None and policy.sdc_window is not None
    if given is not None:
        return Figure(given, "given --sdc-window"), has
    if policy is not None and policy.sdc_window is not None:
        return Figure(policy.sdc_window.total_seconds(), "the store's retention policy"), has
    return None, has


def _interval(compute: float, delta: float, mtbf: float, restart: float) -> Interval:
    return Interval(compute, compute + delta, efficiency(compute, delta, mtbf, restart))


def advise(
    store: str | os.PathLike[str],
    *,
    mtbf: float | None = None,
    failure_rate: float | None = None,
    checkpoint_cost: float | None = None,
    restart_cost: float | None = None,
    sdc_window: float | None = None,
) -> Advice:
    """The optimum checkpoint interval and retention depth for ``store``: each argument given
    (seconds; ``failure_rate`` per hour) replaces the figure its events would give. AdviceError
    names a figure that is missing or unusable and the option that supplies it."""
    if mtbf is not None and failure_rate is not None:
        raise AdviceError("give --mtbf or --failure-rate, not both")
    mtbf = _positive(mtbf, "the mean time between failures", "--mtbf")
    failure_rate = _positive(failure_rate, "the failure rate", "--failure-rate")
    given_delta = _positive(checkpoint_cost, "the checkpoint cost", "--checkpoint-cost")
    given_r = _positive(restart_cost, "the restart cost", "--restart-cost", zero=True)
    window_s = _positive(sdc_window, "the SDC window", "--sdc-window")
    root = os.fspath(store)
    try:
        read = events.read(root)
    except UnsafeFileError as e:
        raise StoreError(f"{root}/{events.EVENTS_DIR}: {e.reason}: not read", path=root) from None
    saves = read.of("save")[-RECENT_SAVES:]
    past = history(read.records)
    delta = _checkpoint_cost(saves, given_delta)
    restart = _restart_cost([r for r in read.of("load") if r["result"] == "ok"], past, given_r)
    m = _mtbf(past, mtbf, failure_rate)
    d, r, mv = delta.value, restart.value, m.value
    notes: list[str] = []
    if read.skipped:
        notes.append(f"{read.skipped} lines of the events file are not events and were skipped")
    if read.truncated:
        notes.append("the oldest events are beyond what is read and were left out")
    durable = None
    if saves:
        n = len(saves)
        median = statistics.median(s["durable_s"] for s in saves)
        durable = Figure(median, f"median save-to-durable time of {n} saves")
    gaps = _gaps(read.of("save"))[-RECENT_SAVES:]
    current = None
    if gaps:
        current = Figure(
            statistics.median(gaps),
            f"median of {len(gaps)} gaps between consecutive saves of one process",
        )
    optimum = _interval(daly(d, mv), d, mv, r)
    recommended = optimum
    if durable is not None and durable.value > optimum.period_s:
        recommended = _interval(durable.value - d, d, mv, r)
        notes.append(
            "a save takes longer to become durable than the optimum period: saves would pile "
            "up, so the recommendation is the floor"
        )
    at_current = None
    if current is not None:
        at_current = _interval(current.value - d, d, mv, r)
        if current.value <= d:
            notes.append("the current period is no longer than the checkpoint cost")
    window, has = _window(root, window_s, notes)
    retention = None
    if window is not None:
        now = None if current is None else retention_depth(window.value, current.value)
        retention = Retention(window, retention_depth(window.value, optimum.period_s), now, has)
    return Advice(
        checkpoint_cost=delta,
        restart_cost=restart,
        mtbf=m,
        history=past,
        durable=durable,
        current=current,
        young_s=young(d, mv),
        daly_s=daly(d, mv),
        optimum=optimum,
        recommended=recommended,
        at_current=at_current,
        retention=retention,
        notes=tuple(notes),
    )
