"""A store's operations metrics: one JSON-serialisable dict computed from its events
(``events.read``), its listing and its audit log (docs/operations.md, "Metrics: definitions").

The four seed metrics (recovery integrity rate, metadata-artifact consistency, audit
completeness, MTTR) each come with their numerator and denominator (or count) and their
definition, so the report, ``ckptguard metrics`` and the Prometheus output carry the same figures
and say what they mean. Events are figures written by many processes on many hosts: a missing
event leaves a figure None (with the reason), and a duration that comes out negative (clock
skew) is never reported as one.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from typing import Any

from . import audit, auditcheck, events, recovery
from .errors import CheckpointError, CheckpointNotFoundError, CheckpointReplacedError
from .fsutil import UnsafeFileError
from .open import CheckpointReader
from .store import Store

__all__ = ["DEFINITIONS", "GONE", "SCHEMA", "compute", "percentile", "structure_ok"]

SCHEMA = "ckptguard.metrics/1"

DEFINITIONS = {
    "recovery_integrity_rate": (
        "drill events with result ok / drill events, in the window (a drill restores a "
        "checkpoint into scratch and checks every byte)"
    ),
    "metadata_artifact_consistency": (
        "committed checkpoints whose manifest, index and data files agree structurally / "
        "checkpoints in the store (listed or with a damaged manifest): index hash and "
        "validation, totals, each data file's size, header, trailer and footer; no payload read"
    ),
    "audit_completeness": (
        "checkpoints present and removed that the audit log accounts for (commit entry; "
        "delete, prune or overwrite entry) / all of them (ckptguard audit check)"
    ),
    "mttr": (
        "mean over recoveries of first_step.time - start.time: the start of the job that "
        "resumed after an interruption to its first training step"
    ),
}

GONE = "gone"
"""``structure_ok``'s answer for a checkpoint deleted or replaced while it was read."""
_CACHE_MAX = 4096
_structure_cache: dict[tuple, str | None] = {}


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ``values``; None for none."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def _stats(values: list[float]) -> dict[str, float | None]:
    return {
        "last": values[-1] if values else None,
        "median": percentile(values, 50),
        "p95": percentile(values, 95),
    }


def _ratio(num: int, den: int, definition: str, **extra: Any) -> dict[str, Any]:
    return {
        "value": num / den if den else None,
        "numerator": num,
        "denominator": den,
        "definition": definition,
        **extra,
    }


def _signature(path: str) -> tuple:
    """What a structural result depends on: the directory's entries and their identities."""
    with os.scandir(path) as it:
        stats = [(e.name, e.stat(follow_symlinks=False)) for e in it]
    return (path, tuple(sorted((n, s.st_ino, s.st_size, s.st_mtime_ns) for n, s in stats)))


def structure_ok(path: str) -> str | None:
    """None if the checkpoint at ``path`` is structurally whole (``DEFINITIONS``), else why not.

    Opens it as a load does (manifest, index against its hash, validation, totals) and every
    data file (regular, of the manifest's size; header, trailer, footer against the index)
    without reading a payload. The answer is cached while the directory's entries keep their
    inode, size and modification time (a Prometheus scrape asks again every few seconds).
    ``GONE`` for a checkpoint deleted or replaced meanwhile: not a checkpoint of the store."""
    try:
        key = _signature(path)
    except FileNotFoundError:
        return GONE
    except OSError as e:
        return f"cannot list {path}: {e.strerror or e}"
    if key in _structure_cache:
        return _structure_cache[key]
    why: str | None = None
    try:
        with CheckpointReader(path) as rd:
            for name in rd.files:
                os.close(rd.open_file(name))
    except (CheckpointNotFoundError, CheckpointReplacedError):
        return GONE
    except (CheckpointError, OSError) as e:
        why = str(e)
    if len(_structure_cache) >= _CACHE_MAX:
        _structure_cache.clear()
    _structure_cache[key] = why
    return why


def _consistency(scan: Any, structure: bool) -> dict[str, Any]:
    """The metadata-artifact consistency of the store, and its MLflow backups' own."""
    bad: list[dict[str, str]] = [
        {"checkpoint": s.name, "reason": s.reason} for s in scan.skipped if not s.link
    ]
    good = gone = 0
    backups = []
    for info in scan.listed:
        why = structure_ok(info.path) if structure else None
        if why == GONE:
            gone += 1
            continue
        if why is None:
            good += 1
        else:
            bad.append({"checkpoint": info.name, "reason": why})
        mb = info.metadata.get("mlflow_backup") if isinstance(info.metadata, dict) else None
        if isinstance(mb, dict) and isinstance(mb.get("fraction_consistent"), (int, float)):
            refs = mb.get("references")
            backups.append(
                {
                    "checkpoint": info.name,
                    "fraction_consistent": float(mb["fraction_consistent"]),
                    "references": refs if isinstance(refs, int) else None,
                }
            )
    out = _ratio(
        good,
        len(scan.listed) - gone + len([s for s in scan.skipped if not s.link]),
        DEFINITIONS["metadata_artifact_consistency"],
        inconsistent=bad,
        mlflow_backups=backups,
        mlflow_newest=backups[-1] if backups else None,
    )
    if not structure:
        out.update(value=None, numerator=None, denominator=None, reason="not checked")
    return out


def _audit(root: str) -> dict[str, Any]:
    if not audit.enabled(root):
        return {
            "value": None,
            "numerator": None,
            "denominator": None,
            "definition": DEFINITIONS["audit_completeness"],
            "reason": "the store keeps no audit log (ckptguard audit init)",
        }
    try:
        c = auditcheck.check(root)
    except (CheckpointError, OSError) as e:
        return {
            "value": None,
            "numerator": None,
            "denominator": None,
            "definition": DEFINITIONS["audit_completeness"],
            "reason": f"the audit log cannot be read: {e}",
        }
    return _ratio(
        c.complete,
        c.total,
        DEFINITIONS["audit_completeness"],
        gaps=[g.__dict__ for g in c.gaps],
    )


def _in(records: list[dict[str, Any]], since: float | None) -> list[dict[str, Any]]:
    return records if since is None else [r for r in records if r["time"] >= since]


def _saves(ev: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [e for e in ev if e["kind"] == "save"]
    failed = [e for e in ev if e["kind"] == "save_failed"]
    return {
        "count": len(ok),
        "failed": len(failed),
        "failures_by_type": dict(Counter(e["error"] for e in failed)),
        "stall_s": _stats([e["stall_s"] for e in ok]),
        "durable_s": _stats([e["durable_s"] for e in ok]),
        "bytes": {
            "raw": sum(e["raw_bytes"] for e in ok),
            "stored": sum(e["stored_bytes"] for e in ok),
            "last_raw": ok[-1]["raw_bytes"] if ok else None,
            "last_stored": ok[-1]["stored_bytes"] if ok else None,
        },
    }


def _loads(ev: list[dict[str, Any]]) -> dict[str, Any]:
    loads = [e for e in ev if e["kind"] == "load"]
    ok = [e for e in loads if e["result"] == "ok"]
    return {
        "count": len(loads),
        "failed": len(loads) - len(ok),
        "failures_by_type": dict(
            Counter(str(e.get("error")) for e in loads if e["result"] != "ok")
        ),
        "open_s": {"median": percentile([e["open_s"] for e in ok if e["open_s"] is not None], 50)},
        "total_s": {"median": percentile([e["total_s"] for e in ok], 50)},
    }


def _results(ev: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    got = [e for e in ev if e["kind"] == kind]
    failed = [e for e in got if e["result"] != "ok"]
    return {
        "ok": len(got) - len(failed),
        "failed": len(failed),
        "failed_checkpoints": sorted({str(e["checkpoint"]) for e in failed}),
    }


_FAILED_EXIT = ("failed", "peers_lost", "no_checkpoint")


def _failures(ev: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What failed and when: every failed save, load, verify, drill and validation, and every
    job exit that lost work."""
    out = []
    for e in ev:
        k = e["kind"]
        if k == "save_failed":
            what = f"{e['error']}: {e['message']}"
        elif k in ("load", "verify", "drill", "validation") and e["result"] != "ok":
            what = str(e.get("error") or f"{e.get('problems', '?')} problem(s)")
        elif k == "exit" and e["outcome"] in _FAILED_EXIT:
            what = f"job exit {e['outcome']} (status {e['status']})"
        else:
            continue
        out.append(
            {
                "time": e["time"],
                "kind": k,
                "checkpoint": e.get("checkpoint"),
                "what": what,
                "host": e.get("host"),
                "job": e.get("job"),
                "restart": e.get("restart"),
            }
        )
    return out


def _verified(records: list[dict[str, Any]]) -> dict[str, bool]:
    """Per uuid: whether its latest drill, validation or verify event says ok."""
    latest: dict[str, bool] = {}
    for e in records:
        if e["kind"] in ("drill", "validation", "verify") and e.get("uuid"):
            latest[e["uuid"]] = e["result"] == "ok"
    return latest


def _ages(listed: list[Any], verified: dict[str, bool], now: float, notes: list[str]) -> dict:
    def one(info: Any) -> dict[str, Any] | None:
        if info is None:
            return None
        created = info.created.timestamp()
        age = recovery.span(created, now, f"age of {info.name}", notes)
        return {
            "name": info.name,
            "uuid": info.uuid,
            "step": info.step,
            "created": created,
            "age_s": age,
        }

    newest_ok = next((i for i in reversed(listed) if verified.get(i.uuid)), None)
    return {
        "count": len(listed),
        "newest": one(listed[-1] if listed else None),
        "newest_verified": one(newest_ok),
    }


def _mttr(recs: list[dict[str, Any]]) -> dict[str, Any]:
    spans = [r["seconds"]["start_to_first_step"] for r in recs if r["complete"]]
    return {
        "value": sum(spans) / len(spans) if spans else None,
        "count": len(spans),
        "recoveries": len(recs),
        "excluded": len(recs) - len(spans),
        "definition": DEFINITIONS["mttr"],
    }


def compute(
    store: str | os.PathLike[str],
    *,
    now: float | None = None,
    window: float | None = None,
    structure: bool = True,
    recorded: events.Events | None = None,
) -> dict[str, Any]:
    """The metrics of ``store`` (module docstring), as of ``now`` (default: the clock), over the
    events of the last ``window`` seconds (default: all that are kept). ``structure=False``
    skips the per-checkpoint structural check (metadata-artifact consistency is then None).
    ``recorded``: the store's events already read (a report plots the same ones)."""
    st = Store(store)
    now = time.time() if now is None else now
    since = None if window is None else now - window
    notes: list[str] = []
    try:
        got = events.read(st.root) if recorded is None else recorded
    except (UnsafeFileError, OSError) as e:
        notes.append(f"the events cannot be read: {getattr(e, 'reason', None) or e}")
        got = events.Events(())
    if got.truncated:
        notes.append("the events file is over the read cap: its oldest lines were left out")
    records = list(got.records)
    future = sum(1 for r in records if r["time"] > now)
    if future:
        notes.append(f"{future} event(s) are later than now: clock skew between hosts")
    ev = _in(records, since)
    scan = st.scan()
    incs = recovery.incarnations(records)
    recs, pending = recovery.recoveries(incs)
    if since is not None:
        recs = [r for r in recs if r["interrupted"]["time"] >= since]
        pending = [p for p in pending if p["time"] >= since]
    for r in recs:
        notes.extend(r["notes"])
    drills = _results(ev, "drill")
    return {
        "schema": SCHEMA,
        "store": st.root,
        "now": now,
        "window": {"seconds": window, "since": since},
        "events": {
            "records": len(records),
            "in_window": len(ev),
            "skipped": got.skipped,
            "truncated": got.truncated,
        },
        "seed": {
            "recovery_integrity_rate": _ratio(
                drills["ok"],
                drills["ok"] + drills["failed"],
                DEFINITIONS["recovery_integrity_rate"],
            ),
            "metadata_artifact_consistency": _consistency(scan, structure),
            "audit_completeness": _audit(st.root),
            "mttr": _mttr(recs),
        },
        "saves": _saves(ev),
        "loads": _loads(ev),
        "validations": _results(ev, "validation"),
        "drills": drills,
        "verifies": _results(ev, "verify"),
        "checkpoints": _ages(scan.listed, _verified(records), now, notes),
        "recoveries": recs,
        "interruptions_pending": pending,
        "failures": _failures(ev),
        "notes": list(dict.fromkeys(notes)),
    }
