"""Reports of a run: JSON (everything), a Markdown table, and PNG charts (matplotlib Agg, when
it is installed: the tables never depend on it)."""

from __future__ import annotations

import json
import os
from typing import Any

from ckptguard.units import format_size

from .needs import missing


def _size(n: float | None) -> str:
    """A size in a report, with two decimals so that close measurements stay apart."""
    return format_size(n, places=2)


def write_json(results: dict[str, Any], path: str) -> None:
    """Write the results atomically (a partial run stays readable)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _s(v: dict[str, float] | None, fmt: str = "{:.2f}", spread: bool = True) -> str:
    if not v:
        return "-"
    mid = fmt.format(v["median"])
    if not spread or v["n"] < 2:
        return mid
    return f"{mid} ({fmt.format(v['min'])}–{fmt.format(v['max'])})"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}×"


def _pct(r: float | None) -> str:
    return "-" if r is None else f"{100 * r:.0f}%"


def _machine_line(m: dict[str, Any] | None) -> str:
    if not m:
        return ""
    fs = m.get("filesystem", {})
    gpu = m.get("gpu") or {}
    v = m.get("versions", {})
    parts = [
        f"{m.get('cpu_count')} cores ({m.get('cpu_model')})",
        f"{_size(m.get('mem_total_bytes'))} RAM",
        f"kernel {m.get('kernel')}",
        f"{fs.get('fstype')} on {fs.get('device')}",
        f"GPU {gpu['name']}" if gpu else "no GPU",
        f"torch {v.get('torch')}, numpy {v.get('numpy')}",
    ]
    return ", ".join(parts)


# The ratios table: (heading, figures): one figure is a ratio to the best peer, two are save/load.
_RATIO_COLUMNS = (
    ("stall", ("stall_s",)),
    ("durable", ("durable_s",)),
    ("cold load", ("load_s",)),
    ("stored", ("stored_bytes",)),
    ("peak RSS save/load", ("save_peak_rss_bytes", "load_peak_rss_bytes")),
    ("extra RSS save/load", ("save_extra_rss_bytes", "load_extra_rss_bytes")),
    ("pinned", ("pinned_peak_bytes",)),
)


def _best(bp: dict[str, Any], metrics: tuple[str, ...]) -> str:
    """The best peers' medians, ``engine value``; a pair by one engine names it once."""
    cells: list[str] = []
    engines: list[str] = []
    for m in metrics:
        b = bp.get(m)
        if not b:
            cells.append("-")
            continue
        v = f"{b['value']:.2f} s" if m.endswith("_s") else _size(b["value"])
        cells.append(v if engines and engines[-1] == b["engine"] else f"{b['engine']} {v}")
        engines.append(b["engine"])
    return " / ".join(cells)


def _ratio_table(
    wname: str, rows: list[dict[str, Any]], bp: dict[str, Any], lim: dict[str, Any]
) -> list[str]:
    """Per engine: each lower-is-better figure over the best peer's, and the stall over the
    capture floor (one copy of the state at the capture limit)."""
    rows = [r for r in rows if r["ok_trials"]]
    if not rows:
        return []
    floor = rows[0].get("capture_floor_s")
    cap = lim.get("capture_from")
    floor_head = f"stall ÷ capture floor ({cap}: {floor:.3f} s)" if floor else "stall ÷ floor"
    heads = [f"{h} ÷ best" for h, _ in _RATIO_COLUMNS]
    lines = [
        f"**{wname}, ratios**: medians over the best peer's median for each figure (lower is "
        "better; - where there is no peer figure or it is 0)",
        "",
        "| engine | " + " | ".join([heads[0], floor_head, *heads[1:]]) + " |",
        "|---" * (len(heads) + 2) + "|",
    ]
    best = [_best(bp, ms) for _, ms in _RATIO_COLUMNS]
    lines.append("| *best peer* | " + " | ".join([best[0], "", *best[1:]]) + " |")
    for r in rows:
        vb = r.get("vs_best_peer", {})
        cells = [" / ".join(_x(vb.get(m)) for m in ms) for _, ms in _RATIO_COLUMNS]
        cells.insert(1, _x(r.get("stall_vs_floor")))
        name = r["engine"] + (" (async)" if r["asynchronous"] else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _limit_lines(lim: dict[str, Any], title: str) -> list[str]:
    """The limits table, and the write limit named with the strategy it comes from."""
    lines = [
        f"**{title}** (same run, same directory)",
        "",
        "| limit | GB/s | bytes | cache / how |",
        "|---|---|---|---|",
    ]
    for k, v in lim.get("per_limit", {}).items():
        if "skipped" in v:
            lines.append(f"| {k} | skipped | - | {v['skipped']} |")
            continue
        how = ", ".join(v.get("cache", [])) or v.get("how", "")
        lines.append(f"| {k} | {_s(v)} | {_size(v.get('bytes'))} | {how} |")
    lines.append("")
    if lim.get("write_gbps"):
        lines += [
            f"The write limit (*% write limit* below) is the best of the write strategies: "
            f"{lim['write_gbps']:.2f} GB/s ({lim['write_from']}).",
            "",
        ]
    return lines


def _engine_row(r: dict[str, Any]) -> str:
    mt = r["metrics"]
    if not r["ok_trials"]:
        err = r["errors"][0] if r["errors"] else "no trials"
        return f"| {r['engine']} | error: {err[:80]} |" + " |" * 10
    rss = (
        f"{_size((mt['save_extra_rss_bytes'] or {}).get('median'))} / "
        f"{_size((mt['load_extra_rss_bytes'] or {}).get('median'))}"
    )
    pinned = mt["pinned_peak_bytes"]
    stored = mt["stored_bytes"]
    ratio = mt["stored_ratio"]["median"] if mt["stored_ratio"] else None
    cells = [
        r["engine"] + (" (async)" if r["asynchronous"] else ""),
        _s(mt["stall_s"]),
        _s(mt["durable_s"]),
        _s(mt["save_gbps"], spread=False),
        _pct(r["vs_limit"]["save"]),
        _x(r["vs_best_peer"]["durable_s"]),
        f"{_size(stored['median'] if stored else None)}"
        + (f" ({100 * ratio:.0f}%)" if ratio else ""),
        _s(mt["load_s"]),
        _pct(r["vs_limit"]["load"]),
        rss,
        _size(pinned["median"]) if pinned else "-",
        ("yes" if r["verified"] else "NO")
        + (f" ({r['ok_trials']}/{r['trials']})" if r["errors"] else ""),
    ]
    return "| " + " | ".join(cells) + " |"


def _first_lines(wname: str, rows: list[dict[str, Any]]) -> list[str]:
    """The first save of a fresh engine beside its warm saves (engines that keep state)."""
    rows = [r for r in rows if r["ok_trials"] and r["metrics"].get("first_stall_s")]
    if not rows:
        return []
    lines = [
        f"**{wname}, first save of a fresh engine vs warm saves** (each trial starts the engine "
        "fresh, set up as its user would, saves once, then measures a warm save)",
        "",
        "| engine | setup s | first stall s | warm stall s | first durable s | warm durable s "
        "| first: extra RSS / pinned |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mt = r["metrics"]
        pinned = mt.get("first_pinned_peak_bytes")
        extra = mt.get("first_save_extra_rss_bytes")
        cells = [
            r["engine"] + (" (async)" if r["asynchronous"] else ""),
            _s(mt.get("first_setup_s")),
            _s(mt["first_stall_s"]),
            _s(mt["stall_s"]),
            _s(mt.get("first_durable_s")),
            _s(mt["durable_s"]),
            f"{_size(extra['median'] if extra else None)} / "
            f"{_size(pinned['median']) if pinned else '-'}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _workload_lines(results: dict[str, Any], summ: dict[str, Any], tag: str = "") -> list[str]:
    """Per workload: the engines' table, the first-save table, and the ratios table."""
    lines: list[str] = []
    rows = summ.get("engines", [])
    lim = summ.get("limits", {})
    for wname, meta in results.get("workloads", {}).items():
        mine = [r for r in rows if r["workload"] == wname]
        if not mine:
            continue
        bp = summ.get("best_peer", {}).get(wname, {})
        best_d = bp.get("durable_s", {}).get("engine", "-")
        lines += [
            f"**{wname}{tag}**: {meta.get('description', '')}; {meta.get('tensors', '?')} "
            f"tensors, {_size(meta.get('logical_bytes'))} (best peer by durable time: {best_d})",
            "",
            "| engine | stall s | durable s | save GB/s | % write limit | durable vs best peer "
            "| stored | cold load s | % read limit | extra RSS save/load | pinned | verified |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *(_engine_row(r) for r in mine),
            "",
        ]
        lines += _first_lines(wname + tag, mine)
        lines += _ratio_table(wname + tag, mine, bp, lim)
    return lines


def _loaded_lines(results: dict[str, Any], loaded: dict[str, Any]) -> list[str]:
    """The loaded half of a run: its own limits, tables and best peers."""
    w = loaded.get("competing_writer_gbps")
    rate = f"; the writer itself wrote {_s(w)} GB/s beside the trials" if w else ""
    return [
        "#### Under load",
        "",
        f"The same engines and limits with a competing writer running "
        f"(`--congestion {results.get('config', {}).get('congestion')}`){rate}. Every figure "
        "here is against the loaded limits and the loaded peers.",
        "",
        *_limit_lines(loaded.get("limits", {}), "Machine limits, loaded"),
        *_workload_lines(results, loaded, " (loaded)"),
    ]


def markdown(results: dict[str, Any]) -> str:
    """The run as Markdown: machine, limits, one table per workload (quiet, then loaded where
    the run had a competing writer), skips and notes."""
    summ = results.get("summary") or {}
    m = results.get("machine") or {}
    cfg = results.get("config", {})
    lines = [
        f"### ckptguard bench, {m.get('date', '?')}",
        "",
        f"Machine: {_machine_line(m)}.  ",
        f"Directory: `{m.get('directory', cfg.get('directory'))}`. Load average at start "
        f"{m.get('loadavg')}, at end {results.get('loadavg_end')} (other work skews figures).  ",
        f"Size {_size(cfg.get('size'))} per rank, {results.get('ranks', 1)} rank(s), "
        f"device {cfg.get('device')}, {cfg.get('trials')} trials (engine order rotates), "
        "figures are median (min–max). GB/s = 10^9 bytes/s of logical (tensor) bytes.",
        "",
        *_limit_lines(
            summ.get("limits", {}), "Machine limits" + (", quiet" if "loaded" in summ else "")
        ),
        *_workload_lines(results, summ),
    ]
    if "loaded" in summ:
        lines += _loaded_lines(results, summ["loaded"])
    return "\n".join([*lines, "Notes:", "", *_notes(results, summ), ""])


def _notes(results: dict[str, Any], summ: dict[str, Any]) -> list[str]:
    cfg = results.get("config", {})
    rows = summ.get("engines", []) + summ.get("loaded", {}).get("engines", [])
    notes = [f"- {r['engine']}: {r['note']}" for r in rows if r.get("note")]
    notes = list(dict.fromkeys(notes))
    for s in results.get("skipped", []):
        where = f" ({s['workload']} trial {s['trial'] + 1})" if "trial" in s else ""
        where = where or (f" ({s['workload']}, all trials)" if "workload" in s else "")
        notes.append(f"- skipped {s['engine']}{where}: {s['reason']}")
    notes += [f"- {n}" for n in results.get("notes", [])]
    if cfg.get("load_engines") is not None:
        notes.append(
            "- cold loads measured only for: " + (", ".join(cfg["load_engines"]) or "none")
        )
    elif cfg.get("load") is False:
        notes.append("- cold loads not measured (--no-load)")
    methods = sorted({c for r in rows for c in r.get("load_cache", [])})
    if methods:
        notes.append(
            "- cold loads: page cache dropped by "
            + ", ".join(methods)
            + ("" if "none" not in methods else " ('none': could not drop; those loads were warm)")
        )
    notes.append(
        "- stall: time the caller is blocked (synchronous engines: until durable, since the "
        "caller must also fsync); durable: all data fsynced and visible; % limits: logical GB/s "
        "over the write limit (the best write strategy) / the best cold-read rate above; peers "
        "fsync via the harness; engines that keep a pool or cache: the warm save (the first "
        "save of a fresh one has its own table)."
    )
    notes.append(
        "- ratios: each figure's median over the lowest median among the peers (the *best peer* "
        "row); capture floor: the workload's bytes copied once at the capture limit (d2h_pinned "
        "on a GPU, else memcpy); extra RSS: peak RSS during the save or load minus RSS before it."
    )
    if not results.get("complete", False):
        notes.append("- PARTIAL: the run did not finish; these are the trials done so far.")
    return notes


def charts_unavailable() -> str | None:
    """Why the PNG charts cannot be drawn here (matplotlib missing), or None."""
    return missing("matplotlib.pyplot")


def plots(results: dict[str, Any], out_dir: str) -> list[str]:
    """One PNG per workload: stall and durable time per engine; save/load GB/s vs the limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = results.get("summary") or {}
    lim = summ.get("limits", {})
    paths = []
    for wname in results.get("workloads", {}):
        rows = [r for r in summ.get("engines", []) if r["workload"] == wname and r["ok_trials"]]
        if not rows:
            continue
        names = [r["engine"] for r in rows]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.5 * len(rows) + 2.5))
        ys = range(len(rows))
        for off, metric, label in ((-0.2, "stall_s", "stall"), (0.2, "durable_s", "durable")):
            med, lo, hi = [], [], []
            for r in rows:
                v = r["metrics"][metric] or {"median": 0, "min": 0, "max": 0}
                med.append(v["median"])
                lo.append(v["median"] - v["min"])
                hi.append(v["max"] - v["median"])
            ax1.barh([y + off for y in ys], med, height=0.4, xerr=[lo, hi], label=label)
        ax1.set_yticks(list(ys), names)
        ax1.invert_yaxis()
        ax1.set_xlabel("seconds (median, min–max)")
        ax1.set_title(f"{wname}: stall and time to durable")
        ax1.legend()
        for off, metric, label in ((-0.2, "save_gbps", "save"), (0.2, "load_gbps", "cold load")):
            vals = [(r["metrics"][metric] or {"median": 0})["median"] for r in rows]
            ax2.barh([y + off for y in ys], vals, height=0.4, label=label)
        for key, style, label in (
            ("write_gbps", "--", "write limit (best strategy)"),
            ("read_gbps", ":", "cold read limit"),
        ):
            if lim.get(key):
                ax2.axvline(lim[key], linestyle=style, color="k", label=f"{label} {lim[key]:.2f}")
        ax2.set_yticks(list(ys), names)
        ax2.invert_yaxis()
        ax2.set_xlabel("GB/s of logical bytes")
        ax2.set_title("throughput against the machine limits")
        ax2.legend(fontsize="small")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{wname}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_reports(results: dict[str, Any], out_dir: str, json_only: bool = False) -> list[str]:
    """results.json, and unless json_only results.md and, where matplotlib is installed, one PNG
    per workload, in ``out_dir`` (the caller says once, up front, when the charts are left out)."""
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, "results.json")]
    write_json(results, written[0])
    if not json_only:
        md = os.path.join(out_dir, "results.md")
        with open(md, "w") as f:
            f.write(markdown(results))
        written.append(md)
        if charts_unavailable() is None:
            written += plots(results, out_dir)
    return written
