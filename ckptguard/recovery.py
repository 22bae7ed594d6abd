"""Interruptions and recoveries of the jobs writing to a store, from its events (a pure function
of the event records; docs/operations.md, "Metrics: definitions").

An incarnation is one run of a job: the events with the same Slurm ``job`` and ``restart``
(a requeue keeps the job id and counts up the restart), or, without Slurm, the events from one
``start`` to the next. Its interruption is its first ``preempt``; else its ``exit`` whose outcome
is not "completed"; else, when it has a ``start`` and no ``exit`` and a later incarnation started,
a crash at its last event (its ``kind``: "preempted", "failed", "crashed"). The recovery of an
interruption is the next ``start`` after it (any job) and that incarnation's first
``first_step``. Durations between events of different hosts can come out negative under clock
skew: such a duration is reported as None, with a note, and never enters a mean. The metrics
(MTTR) and ``advise`` (the mean time between failures, the restart cost) both count from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["AGENT_KINDS", "INTERRUPTIONS", "Incarnation", "incarnations", "recoveries", "span"]

# The kinds an unkeyed incarnation (no Slurm) takes by time: what the job itself writes.
AGENT_KINDS = ("start", "preempt", "exit", "first_step", "save", "save_failed", "load")

# The kinds of interruption: a preempt, an exit not "completed", a start with no exit (a crash).
INTERRUPTIONS = ("preempted", "failed", "crashed")

# Per recovery: each component's name and the two moments it lies between.
COMPONENTS = (
    ("preempt_to_checkpoint", "preempt", "checkpoint"),
    ("checkpoint_to_exit", "checkpoint", "exit"),
    ("exit_to_start", "exit", "start"),
    ("start_to_load", "start", "load"),
    ("load_to_first_step", "load", "first_step"),
    ("start_to_first_step", "start", "first_step"),
    ("outage", "interruption", "first_step"),
)


@dataclass
class Incarnation:
    """One run of a job: its ``start`` (None if its start was not recorded) and its events."""

    key: tuple[str, int | None] | None
    start: dict[str, Any] | None
    events: list[dict[str, Any]] = field(default_factory=list)

    def first(self, kind: str, after: float | None = None) -> dict[str, Any] | None:
        """The first event of ``kind`` (at or after time ``after``, if given)."""
        for e in self.events:
            if e["kind"] == kind and (after is None or e["time"] >= after):
                return e
        return None

    @property
    def time(self) -> float:
        return self.start["time"] if self.start is not None else self.events[0]["time"]

    @property
    def observed_s(self) -> float:
        """Its observed run time: its last event's time less its ``time`` (0 under skew)."""
        return max(0.0, self.events[-1]["time"] - self.time)


def _key(e: dict[str, Any]) -> tuple[str, int | None] | None:
    return (e["job"], e["restart"]) if e.get("job") is not None else None


def incarnations(records: list[dict[str, Any]]) -> list[Incarnation]:
    """The incarnations of ``records`` (oldest first, by time), in the order they started."""
    out: list[Incarnation] = []
    by_key: dict[tuple[str, int | None], list[Incarnation]] = {}
    for e in records:
        if e["kind"] == "start":
            inc = Incarnation(_key(e), e, [e])
            out.append(inc)
            if inc.key is not None:
                by_key.setdefault(inc.key, []).append(inc)
    for e in records:
        key = _key(e)
        if e["kind"] == "start" or (key is None and e["kind"] not in AGENT_KINDS):
            continue
        if key is None:
            # Without Slurm: the latest start before it, if that one had no job either.
            before = [i for i in out if i.start is not None and i.start["time"] <= e["time"]]
            if before and before[-1].key is None:
                before[-1].events.append(e)
            continue
        same = by_key.get(key)
        if not same:  # a run whose start was not recorded (started before events were on)
            by_key[key] = [Incarnation(key, None, [e])]
            out.append(by_key[key][0])
            continue
        started = [i for i in same if i.time <= e["time"]]
        # A start recorded a little after its own events (clock skew): the earliest one.
        (started[-1] if started else same[0]).events.append(e)
    for inc in out:
        inc.events.sort(key=lambda r: r["time"])
    out.sort(key=lambda i: i.time)
    return out


def span(a: float | None, b: float | None, what: str, notes: list[str]) -> float | None:
    """``b - a``, or None when a moment is missing or the result is negative (clock skew:
    noted, never reported as a duration)."""
    if a is None or b is None:
        return None
    if b < a:
        notes.append(f"{what}: negative ({b - a:.3f} s), clock skew between hosts; left out")
        return None
    return b - a


def _interruption(inc: Incarnation, later: bool) -> tuple[float, str, str] | None:
    """When, of which kind (``INTERRUPTIONS``) and how ``inc`` was interrupted, or None (it
    completed, or it is still running)."""
    pre = inc.first("preempt")
    if pre is not None:
        return pre["time"], "preempted", f"preempt ({pre.get('reason')})"
    end = inc.first("exit")
    if end is not None:
        if end.get("outcome") == "completed":
            return None
        cause = f"exit ({end.get('outcome')}, status {end.get('status')})"
        return end["time"], "failed", cause
    if inc.start is not None and later:
        return inc.events[-1]["time"], "crashed", "crash (a start without an exit)"
    return None


def recoveries(incs: list[Incarnation]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(recoveries, interruptions not recovered yet): each interruption (a recovery's
    ``interrupted``) has its time, kind, cause, job and restart; each recovery its components."""
    out: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    for n, inc in enumerate(incs):
        got = _interruption(inc, any(i.start is not None for i in incs[n + 1 :]))
        if got is None:
            continue
        at, kind, cause = got
        nxt = next(
            (i for i in incs[n + 1 :] if i.start is not None and i.start["time"] >= at), None
        )
        what = {
            "time": at,
            "kind": kind,
            "cause": cause,
            "job": _job(inc),
            "restart": _restart(inc),
        }
        if nxt is None:
            pending.append(what)
            continue
        out.append(_recovery(inc, nxt, what))
    return out, pending


def _job(inc: Incarnation) -> str | None:
    return inc.key[0] if inc.key else None


def _restart(inc: Incarnation) -> int | None:
    return inc.key[1] if inc.key else None


def _recovery(inc: Incarnation, nxt: Incarnation, what: dict[str, Any]) -> dict[str, Any]:
    """One recovery: the moments from the interruption to the first step, and the spans."""
    assert nxt.start is not None
    pre = inc.first("preempt")
    ckpt = inc.first("save", pre["time"]) if pre is not None else None
    end = inc.first("exit")
    start = nxt.start["time"]
    load = nxt.first("load")
    step = nxt.first("first_step")
    moments: dict[str, float | None] = {
        "interruption": what["time"],
        "preempt": pre["time"] if pre else None,
        "checkpoint": ckpt["time"] if ckpt else None,
        "exit": end["time"] if end else None,
        "start": start,
        "load": load["time"] if load else None,
        "first_step": step["time"] if step else None,
    }
    notes: list[str] = []
    spans = {
        name: span(moments[a], moments[b], name.replace("_", " "), notes)
        for name, a, b in COMPONENTS
    }
    return {
        "interrupted": what,
        "resumed": {"job": _job(nxt), "restart": _restart(nxt)},
        "checkpoint": ckpt.get("checkpoint") if ckpt else None,
        "loaded": load.get("checkpoint") if load else None,
        "moments": moments,
        "seconds": spans,
        "complete": spans["start_to_first_step"] is not None,
        "notes": notes if step is not None else [*notes, "no first_step after the start yet"],
    }
