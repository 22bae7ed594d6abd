"""``ckptguard report``: a store's metrics (``metrics.compute``) and its per-event series as
``report.json``, and ``report.html``: one static page, its plots inline SVG drawn here, with no
script, no network and no external style (docs/operations.md, "The report").

Every text that comes from the store (names, hosts, error messages) is hostile input: each one
goes through ``html.escape``, and the page's Content-Security-Policy forbids scripts and loads
of any kind, so a name crafted as markup stays text.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from . import events
from .fsutil import UnsafeFileError
from .metrics import compute
from .store import Store

__all__ = ["PLOTS", "build", "render", "series", "write"]

SCHEMA = "ckptguard.report/1"
PLOTS = ("plot-sizes", "plot-save-times", "plot-stall-durable", "plot-drills", "plot-mttr")
_W, _H, _L, _R, _T, _B = 960, 300, 80, 20, 30, 48  # size and margins of a plot
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
_OK, _FAILED = "#2ca02c", "#d62728"

Point = tuple[float, float]
Series = tuple[str, str, list[Point]]  # label, colour, points


def series(recorded: events.Events, since: float | None) -> dict[str, list[dict[str, Any]]]:
    """The events behind the plots, one list per kind, oldest first (within the window)."""
    keep = {
        "save": ("step", "stall_s", "durable_s", "raw_bytes", "stored_bytes", "mode"),
        "save_failed": ("error", "message", "elapsed_s", "mode"),
        "load": ("step", "result", "open_s", "total_s", "bytes_read", "verified"),
        "drill": ("result", "seconds", "error"),
        "validation": ("result", "seconds", "error"),
        "verify": ("result", "seconds", "problems"),
    }
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in keep}
    for e in recorded.records:
        if e["kind"] in keep and (since is None or e["time"] >= since):
            row = {"time": e["time"], "checkpoint": e["checkpoint"], "uuid": e["uuid"]}
            row.update({k: e.get(k) for k in keep[e["kind"]]})
            out[e["kind"]].append(row)
    return out


def build(
    store: str | os.PathLike[str], *, now: float | None = None, window: float | None = None
) -> dict[str, Any]:
    """The report's data: the metrics and the series, from one reading of the events."""
    now = time.time() if now is None else now
    try:
        recorded = events.read(Store(store).root)
    except (UnsafeFileError, OSError):
        recorded = None  # compute reads again and says why in its notes
    m = compute(store, now=now, window=window, recorded=recorded)
    since = m["window"]["since"]
    return {
        "schema": SCHEMA,
        "metrics": m,
        "series": series(recorded or events.Events(()), since),
    }


def write(
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    json_only: bool = False,
    now: float | None = None,
    window: float | None = None,
) -> dict[str, Any]:
    """Write ``out/report.json`` (and ``out/report.html`` unless ``json_only``), each whole
    (a temporary renamed into place); the report's data."""
    os.makedirs(out, exist_ok=True)
    data = build(store, now=now, window=window)
    _write_whole(os.path.join(out, "report.json"), json.dumps(data, indent=1, allow_nan=False))
    if not json_only:
        _write_whole(os.path.join(out, "report.html"), render(data))
    return data


def _write_whole(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".report.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _num(v: float) -> str:
    return f"{v:.4g}"


def _time_format(times: list[float]) -> Callable[[float], str]:
    """Tick labels for a time axis: the time of day within a day, else the date and minute."""
    within_day = bool(times) and max(times) - min(times) < 86400
    return lambda t: _when(t)[11:19] if within_day else _when(t)[5:16]


def _bytes_unit(peak: float) -> tuple[float, str]:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if peak >= size:
            return float(size), unit
    return 1.0, "B"


def _scale(lo: float, hi: float, a: float, b: float) -> Callable[[float], float]:
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    return lambda v: a + (v - lo) / (hi - lo) * (b - a)


def _frame(pid: str, title: str, body: str, cls: str = "plot") -> str:
    return (
        f'<figure><svg id="{pid}" class="{cls}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img" '
        f'aria-label="{_e(title)}"><title>{_e(title)}</title>'
        f'<rect class="bg" x="0" y="0" width="{_W}" height="{_H}" fill="#ffffff"/>'
        f'<text x="{_L}" y="18" font-size="14" font-weight="bold">{_e(title)}</text>'
        f"{body}</svg></figure>"
    )


def _nodata(pid: str, title: str, why: str) -> str:
    body = (
        f'<text class="nodata" x="{_W / 2}" y="{_H / 2}" text-anchor="middle" '
        f'font-size="16" fill="#666666">no data: {_e(why)}</text>'
    )
    return _frame(pid, title, body, "plot nodata")


def _axes(
    x: Callable[[float], float],
    y: Callable[[float], float],
    xr: tuple[float, float],
    yr: tuple[float, float],
    labels: tuple[str, str],
    xfmt: Callable[[float], str],
) -> str:
    """The axes, five ticks on each with their labels, and the axis titles."""
    parts = [f'<path class="axis" d="M{_L} {_T} V{_H - _B} H{_W - _R}" stroke="#333" fill="none"/>']
    for k in range(5):
        yv = yr[0] + (yr[1] - yr[0]) * k / 4
        xv = xr[0] + (xr[1] - xr[0]) * k / 4
        parts.append(
            f'<text x="{_L - 6}" y="{y(yv) + 4:.1f}" font-size="11" text-anchor="end">'
            f"{_e(_num(yv))}</text>"
            f'<text x="{x(xv):.1f}" y="{_H - _B + 16}" font-size="11" text-anchor="middle">'
            f"{_e(xfmt(xv))}</text>"
        )
    parts.append(
        f'<text x="{(_L + _W - _R) / 2}" y="{_H - 8}" font-size="12" text-anchor="middle">'
        f"{_e(labels[0])}</text>"
        f'<text x="16" y="{(_T + _H - _B) / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 16 {(_T + _H - _B) / 2})">{_e(labels[1])}</text>'
    )
    return "".join(parts)


def _legend(items: list[tuple[str, str]]) -> str:
    out = []
    for k, (label, colour) in enumerate(items):
        x = _W - _R - 180 * (len(items) - k)
        out.append(
            f'<rect class="key" x="{x}" y="8" width="12" height="12" fill="{colour}"/>'
            f'<text x="{x + 16}" y="18" font-size="12">{_e(label)}</text>'
        )
    return "".join(out)


def _plot(
    pid: str,
    title: str,
    labels: tuple[str, str],
    lines: list[Series],
    *,
    points: bool = False,
    xfmt: Callable[[float], str] = _num,
    why: str = "no events of this kind",
) -> str:
    """A plot of ``lines`` (each a path through its points with a square at each one), or of
    squares only (``points``); a "no data" note when every series is empty."""
    every = [p for _, _, pts in lines for p in pts]
    if not every:
        return _nodata(pid, title, why)
    xr = (min(p[0] for p in every), max(p[0] for p in every))
    yr = (0.0, max(p[1] for p in every) * 1.1 or 1.0)
    x = _scale(*xr, _L + 10, _W - _R - 10)
    y = _scale(*yr, _H - _B, _T + 10)
    body = [_axes(x, y, xr, yr, labels, xfmt)]
    for label, colour, pts in lines:
        if not pts:
            continue
        if not points:
            d = " ".join(
                f"{'L' if k else 'M'}{x(a):.1f} {y(b):.1f}" for k, (a, b) in enumerate(pts)
            )
            body.append(f'<path class="series" d="{d}" stroke="{colour}" fill="none"/>')
        body.extend(
            f'<rect class="point" x="{x(a) - 3:.1f}" y="{y(b) - 3:.1f}" width="6" height="6" '
            f'fill="{colour}"><title>{_e(label)}: {_e(_num(b))}</title></rect>'
            for a, b in pts
        )
    body.append(_legend([(label, colour) for label, colour, _ in lines]))
    return _frame(pid, title, "".join(body))


def _bars(
    pid: str,
    title: str,
    ylabel: str,
    groups: list[tuple[str, list[float | None]]],
    keys: list[tuple[str, str]],
    why: str,
) -> str:
    """Grouped bars: one group per (label, values), one bar per key; None draws no bar."""
    values = [v for _, vs in groups for v in vs if v is not None]
    if not values:
        return _nodata(pid, title, why)
    yr = (0.0, max(values) * 1.1 or 1.0)
    y = _scale(*yr, _H - _B, _T + 10)
    slot = (_W - _L - _R) / len(groups)
    width = max(2.0, slot * 0.8 / len(keys))
    body = [_axes(lambda v: _L, y, (0, 0), yr, ("", ylabel), lambda v: "")]
    for g, (label, vs) in enumerate(groups):
        x0 = _L + g * slot + slot * 0.1
        for k, v in enumerate(vs):
            if v is None:
                continue
            top = y(v)
            body.append(
                f'<rect class="bar" x="{x0 + k * width:.1f}" y="{top:.1f}" width="{width:.1f}" '
                f'height="{_H - _B - top:.1f}" fill="{keys[k][1]}"><title>{_e(label)} '
                f"{_e(keys[k][0])}: {_e(_num(v))}</title></rect>"
            )
        body.append(
            f'<text x="{x0 + slot * 0.4:.1f}" y="{_H - _B + 16}" font-size="11" '
            f'text-anchor="middle">{_e(label)}</text>'
        )
    body.append(_legend(keys))
    return _frame(pid, title, "".join(body))


def _plots(data: dict[str, Any]) -> list[str]:
    s, m = data["series"], data["metrics"]
    saves = s["save"]
    xs = [float(e["step"]) if e["step"] is not None else float(k) for k, e in enumerate(saves)]
    pairs = list(zip(xs, saves, strict=True))
    scale, unit = _bytes_unit(max([e["raw_bytes"] for e in saves] or [0]))
    sizes = [
        ("raw", _COLOURS[0], [(x, e["raw_bytes"] / scale) for x, e in pairs]),
        ("stored", _COLOURS[1], [(x, e["stored_bytes"] / scale) for x, e in pairs]),
    ]
    times = [
        ("durable", _COLOURS[0], [(x, e["durable_s"]) for x, e in pairs]),
        ("stall", _COLOURS[1], [(x, e["stall_s"]) for x, e in pairs]),
    ]
    drills = [
        ("ok", _OK, [(e["time"], e["seconds"]) for e in s["drill"] if e["result"] == "ok"]),
        ("failed", _FAILED, [(e["time"], e["seconds"]) for e in s["drill"] if e["result"] != "ok"]),
    ]
    recs = m["recoveries"]
    return [
        _plot("plot-sizes", "Checkpoint size by step", ("step", unit), sizes, why="no save events"),
        _plot(
            "plot-save-times", "Save time by step", ("step", "seconds"), times, why="no save events"
        ),
        _plot(
            "plot-stall-durable",
            "Stall against durable time, per save",
            ("durable (s): save start to committed", "stall (s): caller blocked"),
            [("save", _COLOURS[0], [(e["durable_s"], e["stall_s"]) for e in saves])],
            points=True,
            why="no save events",
        ),
        _plot(
            "plot-drills",
            "Recovery drills over time (seconds each)",
            ("time (UTC)", "s"),
            drills,
            points=True,
            xfmt=_time_format([e["time"] for e in s["drill"]]),
            why="no drill events",
        ),
        _bars(
            "plot-mttr",
            "Recoveries: start to first step, and outage",
            "seconds",
            [
                (f"#{k + 1}", [r["seconds"]["start_to_first_step"], r["seconds"]["outage"]])
                for k, r in enumerate(recs)
            ],
            [("start to first step", _COLOURS[0]), ("outage", _COLOURS[3])],
            why="no recoveries",
        ),
    ]


_SEED = (
    ("recovery_integrity_rate", "Recovery integrity rate"),
    ("metadata_artifact_consistency", "Metadata-artifact consistency"),
    ("audit_completeness", "Audit completeness"),
    ("mttr", "MTTR"),
)


def _seed_value(key: str, v: dict[str, Any]) -> tuple[str, str]:
    """The shown value and its basis (numerator/denominator or count)."""
    if key == "mttr":
        shown = "-" if v["value"] is None else f"{v['value']:.1f} s"
        return shown, f"{v['count']} recoveries ({v['excluded']} left out)"
    shown = "-" if v["value"] is None else f"{v['value']:.3f}"
    if v.get("numerator") is None:
        return shown, str(v.get("reason", ""))
    return shown, f"{v['numerator']}/{v['denominator']}"


def _table(cls: str, head: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="{cls} empty">{_e(empty)}</p>'
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _seconds(v: float | None) -> str:
    return "-" if v is None else _e(f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}")


def _seed_rows(m: dict[str, Any]) -> list[list[str]]:
    seed_rows = []
    for key, title in _SEED:
        v = m["seed"][key]
        shown, basis = _seed_value(key, v)
        raw = "" if v["value"] is None else _e(repr(v["value"]))
        seed_rows.append(
            [
                _e(title),
                f'<span class="value" data-metric="{key}" data-value="{raw}">{_e(shown)}</span>',
                _e(basis),
                _e(v["definition"]),
            ]
        )
    return seed_rows


def _two(stat: dict[str, Any]) -> str:
    return ", ".join("-" if v is None else _seconds(v) for v in (stat["median"], stat["p95"]))


def _kinds(saves: dict[str, Any]) -> str:
    by = saves["failures_by_type"]
    return "(" + ", ".join(f"{k}: {v}" for k, v in sorted(by.items())) + ")" if by else ""


def _summary(m: dict[str, Any]) -> list[list[str]]:
    ck, sv, ld = m["checkpoints"], m["saves"], m["loads"]

    def age(one: dict[str, Any] | None) -> str:
        return "-" if one is None else f"{_e(one['name'])}, {_seconds(one['age_s'])} s old"

    summary = [
        ["checkpoints", _e(ck["count"])],
        ["newest", age(ck["newest"])],
        ["newest verified", age(ck["newest_verified"])],
        ["saves", _e(f"{sv['count']} ok, {sv['failed']} failed {_kinds(sv)}".rstrip())],
        ["save durable s (median, p95)", _two(sv["durable_s"])],
        ["save stall s (median, p95)", _two(sv["stall_s"])],
        ["loads", _e(f"{ld['count']}, {ld['failed']} failed")],
        *[
            [k, _e(f"{m[k]['ok']} ok, {m[k]['failed']} failed")]
            for k in ("validations", "drills", "verifies")
        ],
        ["events", _e(f"{m['events']['records']} read, {m['events']['skipped']} lines skipped")],
    ]
    return [[_e(a), b] for a, b in summary]


def _sections(data: dict[str, Any]) -> list[str]:
    m = data["metrics"]
    recs = [
        [
            _e(k + 1),
            _e(r["interrupted"]["cause"]),
            _e(_when(r["interrupted"]["time"])),
            *[
                _seconds(r["seconds"][c])
                for c in (
                    "preempt_to_checkpoint",
                    "checkpoint_to_exit",
                    "exit_to_start",
                    "start_to_load",
                    "load_to_first_step",
                    "start_to_first_step",
                    "outage",
                )
            ],
        ]
        for k, r in enumerate(m["recoveries"])
    ]
    fails = [
        [
            _e(_when(f["time"])),
            _e(f["kind"]),
            _e(f["checkpoint"] or "-"),
            _e(f["what"]),
            _e(f["host"]),
            _e(f"{f['job']}/{f['restart']}"),
        ]
        for f in m["failures"]
    ]
    notes = "".join(f"<li>{_e(n)}</li>" for n in m["notes"]) or "<li>none</li>"
    return [
        "<h2>The four metrics</h2>",
        _table("seed", ["metric", "value", "basis", "definition"], _seed_rows(m), ""),
        "<h2>Summary</h2>",
        _table("summary", ["", ""], _summary(m), ""),
        "<h2>Plots</h2>",
        *_plots(data),
        "<h2>Recoveries (seconds)</h2>",
        _table(
            "recoveries",
            [
                "#",
                "interruption",
                "at (UTC)",
                "preempt to checkpoint",
                "checkpoint to exit",
                "exit to start",
                "start to load",
                "load to first step",
                "start to first step",
                "outage",
            ],
            recs,
            "no recoveries",
        ),
        "<h2>What failed, and when</h2>",
        _table(
            "failures",
            ["at (UTC)", "kind", "checkpoint", "what", "host", "job/restart"],
            fails,
            "nothing failed",
        ),
        f'<h2>Notes</h2><ul class="notes">{notes}</ul>',
    ]


_STYLE = (
    "body{font-family:sans-serif;margin:24px;color:#222;background:#fff}"
    "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #bbb;padding:4px 8px;"
    "text-align:left;vertical-align:top}th{background:#eef}figure{margin:12px 0}"
    ".value{font-weight:bold}"
)


def render(data: dict[str, Any]) -> str:
    """The report page of ``build``'s data: one self-contained HTML document."""
    m = data["metrics"]
    title = f"ckptguard report: {m['store']}"
    win = m["window"]["seconds"]
    scope = "all events kept" if win is None else f"the last {win:g} s"
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            "style-src 'unsafe-inline'\">",
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
            f"<h1>{_e(title)}</h1>",
            f"<p>At {_e(_when(m['now']))} UTC, over {_e(scope)}.</p>",
            *_sections(data),
            "</body></html>\n",
        ]
    )
