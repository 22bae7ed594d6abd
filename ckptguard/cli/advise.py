"""``ckptguard advise STORE``: the checkpoint interval that minimises expected lost work plus
checkpoint overhead (Young 1974, Daly 2006), and how many checkpoints to keep for a
silent-corruption window, from the store's own events or the figures given."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import click

from ._args import require_dir
from ._output import echo

if TYPE_CHECKING:  # the core (and numpy, through retention) is imported when the command runs
    from ckptguard.advise import Advice, Interval


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """A duration option (90m, 36h, 2d 12h, or seconds) in seconds, by retention's parser."""
    if value is None:
        return None
    from ckptguard.errors import RetentionPolicyError
    from ckptguard.retention import parse_duration

    try:
        return parse_duration(_number(value) if _is_number(value) else value).total_seconds()
    except RetentionPolicyError:
        raise click.BadParameter(
            f"{value!r} is not a duration above 0 such as 300, 90m, 36h or 2d"
        ) from None


def _cost(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """A cost in seconds (a number, or a duration such as 90s or 5m); 0 for a restart."""
    if value is None:
        return None
    if param.name != "restart_cost":
        return _duration(ctx, param, value)
    if _is_number(value) and _number(value) == 0:
        return 0.0
    try:
        return _duration(ctx, param, value)
    except click.BadParameter:
        raise click.BadParameter(
            f"{value!r} is not 0 or more seconds, nor a duration such as 90s or 5m"
        ) from None


def _rate(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"{value!r} is not a failure rate above 0 per hour")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else -1.0  # inf and nan are refused as below 0


@click.command("advise")
@click.argument("store")
@click.option(
    "--mtbf", metavar="DURATION", callback=_duration, help="Mean time between failures (8h, 2d)."
)
@click.option(
    "--failure-rate",
    type=float,
    metavar="PER_HOUR",
    callback=_rate,
    help="Failures per hour (instead of --mtbf).",
)
@click.option(
    "--checkpoint-cost",
    metavar="SECONDS",
    callback=_cost,
    help="Seconds a save blocks training (default: events).",
)
@click.option(
    "--restart-cost",
    metavar="SECONDS",
    callback=_cost,
    help="Seconds from a restart to training (default: events).",
)
@click.option(
    "--sdc-window",
    metavar="DURATION",
    callback=_duration,
    help="Silent-corruption detection window.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the advice as JSON.")
def command(
    store: str,
    mtbf: float | None,
    failure_rate: float | None,
    checkpoint_cost: float | None,
    restart_cost: float | None,
    sdc_window: float | None,
    as_json: bool,
) -> None:
    """Advise how often to checkpoint STORE's job and how many checkpoints to keep.

    The optimum compute time between saves is Daly's higher-order estimate (Young's
    sqrt(2 delta M) beside it), for the checkpoint cost delta (the median stall of recent
    saves), the restart cost R (the median recovery) and the mean time between failures M
    (job time over interruptions), each taken from the store's events unless given. With a
    silent-corruption window (--sdc-window or the store's retention policy) it says how many
    checkpoints to keep so that one predates the window. docs/operations.md has the model.
    """
    from ckptguard.advise import advise

    if mtbf is not None and failure_rate is not None:
        raise click.UsageError("give --mtbf or --failure-rate, not both")
    advice = advise(
        require_dir(store, "store"),
        mtbf=mtbf,
        failure_rate=failure_rate,
        checkpoint_cost=checkpoint_cost,
        restart_cost=restart_cost,
        sdc_window=sdc_window,
    )
    if as_json:
        echo(json.dumps(advice.to_json()))
    else:
        echo(*_text(advice))


def _unit(seconds: float) -> tuple[str, float]:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= 2 * size:
            return unit, size
    return "s", 1.0


def _human(seconds: float, like: float | None = None) -> str:
    """``seconds`` in the unit that reads best for it (or for ``like``, so that figures side
    by side share one): 0.25 s, 42.0 s, 26.6 min, 8.00 h, 3.00 d."""
    unit, size = _unit(seconds if like is None else like)
    value = seconds / size
    if unit in ("d", "h"):
        return f"{value:.2f} {unit}"
    return f"{value:.1f} {unit}" if value >= 1 or unit == "min" else f"{value:.3g} {unit}"


def _rule(seconds: float) -> str:
    """``seconds`` as a retention duration ("3d", "36h"): the largest unit it is a whole of."""
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and float(seconds / size).is_integer():
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _waste(at: Interval) -> str:
    return f"efficiency {at.efficiency:.1%}, waste {1 - at.efficiency:.1%}"


def _text(a: Advice) -> list[str]:
    """The advice as the lines the command prints: inputs with sources, then results."""
    lines = ["Inputs:"]
    rows = [
        ("checkpoint cost (delta)", a.checkpoint_cost),
        ("restart cost (R)", a.restart_cost),
        ("mean time between failures (M)", a.mtbf),
        ("save to durable", a.durable),
        ("current period between saves", a.current),
    ]
    lines += [f"  {name:<31} {_human(f.value):>10}  ({f.source})" for name, f in rows if f]
    h = a.history
    if h.incarnations:
        timed = len(h.recoveries)
        lines.append(
            f"  history: {h.incarnations} incarnations, {_human(h.observed_s)} of job time, "
            f"{h.interruptions} interruptions ({h.preempted} preempted, {h.failed} failed, "
            f"{h.crashed} crashed), {h.recovered} recoveries"
            + (f" ({timed} with a first step)" if timed < h.recovered else "")
        )
    else:
        lines.append("  history: no job start recorded (`ckptguard run` records them)")
    o, r = a.optimum, a.recommended
    lines += [
        "Optimum compute time between saves:",
        f"  Young, sqrt(2 delta M):         {_human(a.young_s, a.daly_s):>10}",
        f"  Daly, higher order:             {_human(a.daly_s):>10}  (a save every "
        f"{_human(o.period_s)}: {_waste(o)})",
    ]
    if a.durable is not None:
        lines.append(
            f"  floor: a save every {_human(a.durable.value)} at least (the time a save takes "
            "to become durable; shorter periods pile saves up)"
        )
    if r != o:
        lines.append(f"  recommended: a save every {_human(r.period_s)} ({_waste(r)})")
    if a.at_current is not None and a.current is not None:
        extra = o.efficiency / a.at_current.efficiency - 1 if a.at_current.efficiency else math.inf
        lines.append(
            f"  current: a save every {_human(a.current.value)} ({_waste(a.at_current)}; "
            f"{extra:.1%} more wall time than at the optimum)"
        )
    lines += _retention_lines(a)
    lines += [f"note: {n}" for n in a.notes]
    return lines


def _retention_lines(a: Advice) -> list[str]:
    ret = a.retention
    if ret is None:
        return ["Retention: no silent-corruption window (give --sdc-window or set sdc_window)"]
    w = _human(ret.window.value)
    lines = [
        f"Retention for a silent-corruption window of {w} ({ret.window.source}):",
        f"  at the optimum period: keep_last {ret.at_optimum} (ceil(W / period) + 1)",
    ]
    if ret.at_current is not None:
        lines.append(f"  at the current period: keep_last {ret.at_current}")
    if ret.policy_has_sdc_window:
        lines.append("  the store's policy has sdc_window: it keeps one checkpoint older than W")
    else:
        lines.append(
            f'  or the rule "sdc_window": "{_rule(ret.window.value)}" in .retention.json, which '
            "keeps the newest checkpoint older than W"
        )
    return lines
