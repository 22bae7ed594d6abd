"""From raw trials to figures: medians with min and max, and ratios to the best peer and to the
machine's limits. Pure functions of the results dict (tested on made-up trials)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

# The figures of the first save of a fresh engine (one that keeps a pool or a staging cache across
# saves), kept apart from the warm save that the other figures describe.
FIRST = ("setup_s", "stall_s", "durable_s", "save_extra_rss_bytes", "pinned_peak_bytes")
METRICS = (
    "stall_s",
    "durable_s",
    "call_s",
    "fsync_s",
    "save_gbps",
    "stored_bytes",
    "stored_ratio",
    "load_s",
    "load_gbps",
    "save_extra_rss_bytes",
    "load_extra_rss_bytes",
    "save_peak_rss_bytes",
    "load_peak_rss_bytes",
    "pinned_peak_bytes",
    *(f"first_{m}" for m in FIRST),
)
# Figures where less is better: each gets a ratio to the best (lowest) peer. A best peer of 0 (e.g.
# no pinned memory) gives no ratio (None).
LOWER_IS_BETTER = (
    "stall_s",
    "durable_s",
    "load_s",
    "stored_bytes",
    "save_peak_rss_bytes",
    "load_peak_rss_bytes",
    "save_extra_rss_bytes",
    "load_extra_rss_bytes",
    "pinned_peak_bytes",
)


def spread(values: Iterable[float | None]) -> dict[str, float] | None:
    """``{"median", "min", "max", "n"}`` of the values (Nones left out: a trial without that
    figure), or None if there are none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def limit_key(entry: dict[str, Any]) -> str:
    """``write_fsync`` with 4 files -> ``write_fsync_4f``; copies keep their name."""
    return f"{entry['limit']}_{entry['files']}f" if "files" in entry else entry["limit"]


def summarize_limits(limits: list[dict[str, Any]]) -> dict[str, Any]:
    """Per limit: GB/s spread (or why it was skipped); plus the write limit (the best of the
    write strategies), the best cold read and the capture limit."""
    keys = sorted({limit_key(e) for e in limits})
    per: dict[str, dict[str, Any]] = {}
    for k in keys:
        rows = [e for e in limits if limit_key(e) == k]
        ran = [e for e in rows if "skipped" not in e]
        per[k] = {**(spread([e["gbps"] for e in ran]) or {}), "bytes": rows[0]["bytes"]}
        if not ran:
            per[k]["skipped"] = rows[0]["skipped"]
        methods = sorted({e["cache"]["method"] for e in rows if "cache" in e})
        if methods:
            per[k]["cache"] = methods
        how = next((e["how"] for e in rows if e.get("how")), None)
        if how:
            per[k]["how"] = how

    def best(prefix: str) -> tuple[str | None, float | None]:
        cands = [(k, v["median"]) for k, v in per.items() if k.startswith(prefix) and "median" in v]
        return max(cands, key=lambda kv: kv[1]) if cands else (None, None)

    write_k, write = best("write_")
    read_k, read = best("read_cold")
    cap_k = "d2h_pinned" if "d2h_pinned" in per else ("memcpy" if "memcpy" in per else None)
    return {
        "per_limit": per,
        "write_gbps": write,
        "write_from": write_k,
        "read_gbps": read,
        "read_from": read_k,
        "capture_gbps": per[cap_k].get("median") if cap_k else None,
        "capture_from": cap_k,
    }


def trial_metrics(rec: dict[str, Any]) -> dict[str, float | None]:
    """The per-trial figures, derived ones (GB/s, stored ratio) included."""
    logical = rec["logical_bytes"]
    out: dict[str, float | None] = {m: rec.get(m) for m in METRICS}
    dur, load, stored = rec.get("durable_s"), rec.get("load_s"), rec.get("stored_bytes")
    out["save_gbps"] = logical / dur / 1e9 if dur else None
    out["load_gbps"] = logical / load / 1e9 if load else None
    out["stored_ratio"] = stored / logical if stored is not None and logical else None
    first = rec.get("first") or {}
    for m in FIRST:
        out[f"first_{m}"] = first.get(m)
    return out


def _rate(times: dict[str, float] | None, nbytes: int) -> dict[str, float] | None:
    if not times or not times["min"] or not nbytes:
        return None
    g = nbytes / 1e9
    return {
        "median": g / times["median"],
        "min": g / times["max"],
        "max": g / times["min"],
        "n": times["n"],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


QUIET, LOADED = "quiet", "loaded"


def condition(entry: dict[str, Any]) -> str:
    """``loaded`` for a trial or limit measured beside a competing writer, else ``quiet``."""
    return str(entry.get("condition", QUIET))


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The quiet figures (medians per workload and engine, best peers, ratios) at the top level
    and, when the run had a competing writer, the loaded ones under ``loaded``: each condition
    against its own peers and the limits measured in it, never mixed."""
    out = _summarize(results, QUIET)
    entries = [*results.get("trials", []), *results.get("limits", [])]
    if any(condition(e) == LOADED for e in entries):
        out[LOADED] = _summarize(results, LOADED)
    return out


def _summarize(results: dict[str, Any], cond: str) -> dict[str, Any]:
    """Medians per (workload, engine), the best peer per figure, and every ratio, of the trials
    and limits measured in condition ``cond``."""
    lim = summarize_limits([e for e in results.get("limits", []) if condition(e) == cond])
    rows: list[dict[str, Any]] = []
    trials = [t for t in results.get("trials", []) if condition(t) == cond]
    pairs = list(dict.fromkeys((t["workload"], t["engine"]) for t in trials))
    for wname, eng in pairs:
        recs = [t for t in trials if t["workload"] == wname and t["engine"] == eng]
        ok = [t for t in recs if "error" not in t]
        per_trial = [trial_metrics(t) for t in ok]
        metrics = {m: spread([p[m] for p in per_trial]) for m in METRICS}
        logical = recs[0]["logical_bytes"]
        # rates are logical bytes over the time figures (median rate = bytes / median time)
        metrics["save_gbps"] = _rate(metrics["durable_s"], logical)
        metrics["load_gbps"] = _rate(metrics["load_s"], logical)
        errors = [t["error"] for t in recs if "error" in t]
        rows.append(
            {
                "workload": wname,
                "engine": eng,
                "family": recs[0]["family"],
                "asynchronous": recs[0].get("asynchronous", False),
                "trials": len(recs),
                "ok_trials": len(ok),
                "errors": errors,
                "verified": bool(ok) and all(t.get("verified", True) for t in ok),
                "verify_messages": sorted(
                    {t["verify_message"] for t in ok if "verify_message" in t}
                ),
                "load_cache": sorted({t["load_cache"]["method"] for t in ok if "load_cache" in t}),
                "note": next((t["note"] for t in recs if t.get("note")), None),
                "metrics": metrics,
            }
        )
    best_peer: dict[str, dict[str, Any]] = {}
    for wname in dict.fromkeys(r["workload"] for r in rows):
        peers = [r for r in rows if r["workload"] == wname and r["family"] == "peer"]
        best_peer[wname] = {}
        for m in LOWER_IS_BETTER:
            cands = [(r["engine"], r["metrics"][m]["median"]) for r in peers if r["metrics"][m]]
            if cands:
                e, v = min(cands, key=lambda ev: ev[1])
                best_peer[wname][m] = {"engine": e, "value": v}
    for r in rows:
        bp = best_peer.get(r["workload"], {})
        med = {m: (v["median"] if v else None) for m, v in r["metrics"].items()}
        r["vs_best_peer"] = {
            m: _ratio(med[m], bp[m]["value"]) if m in bp else None for m in LOWER_IS_BETTER
        }
        logical = results["workloads"].get(r["workload"], {}).get("logical_bytes")
        stall_gbps = _ratio(logical, med["stall_s"])
        r["vs_limit"] = {
            "save": _ratio(med["save_gbps"], lim["write_gbps"]),
            "load": _ratio(med["load_gbps"], lim["read_gbps"]),
            "stall": _ratio(stall_gbps / 1e9 if stall_gbps else None, lim["capture_gbps"]),
        }
        # the capture floor: the state copied once at the capture limit (pinned D2H, or memcpy)
        floor_s = _ratio(logical / 1e9 if logical else None, lim["capture_gbps"])
        r["capture_floor_s"] = floor_s
        r["stall_vs_floor"] = _ratio(med["stall_s"], floor_s)
    writer = [t["competing_writer"].get("gbps") for t in trials if "competing_writer" in t]
    return {
        "limits": lim,
        "engines": rows,
        "best_peer": best_peer,
        "competing_writer_gbps": spread(writer),
    }
