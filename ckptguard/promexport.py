"""A store's metrics (``metrics.compute``) in Prometheus' text format: written as a
node_exporter textfile-collector file (whole or not at all) or served over HTTP, recomputed on
each scrape behind a short cache (docs/operations.md, "Prometheus").

Every metric is a gauge named ``ckptguard_*`` with a ``store`` label: the figures come from the
store's files, not from a counter this process keeps, so they may go down (events rotated out
of the window). A figure that is None (no events of its kind, no audit log) has no sample;
its HELP and TYPE lines are still written, so the family is always there to alert on.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .metrics import DEFINITIONS, compute

__all__ = ["StoreCollector", "families", "render", "serve", "write_textfile"]

_STATS = ("last", "median", "p95")


Sample = tuple[dict[str, str], Any]
Gauge = Callable[[str, str, list[Sample]], None]


def families(m: dict[str, Any]) -> list[GaugeMetricFamily]:
    """The gauges of one ``metrics.compute`` result."""
    store = m["store"]
    out: list[GaugeMetricFamily] = []

    def gauge(name: str, doc: str, samples: list[Sample]) -> None:
        extra = sorted({k for labels, _ in samples for k in labels})
        g = GaugeMetricFamily(f"ckptguard_{name}", doc, labels=["store", *extra])
        for labels, value in samples:
            if value is not None:
                g.add_metric([store, *(labels[k] for k in extra)], float(value))
        out.append(g)

    _seed(m, gauge)
    _operations(m, gauge)
    return out


def _seed(m: dict[str, Any], gauge: Gauge) -> None:
    seed = m["seed"]
    for key, name in (
        ("recovery_integrity_rate", "recovery_integrity_ratio"),
        ("metadata_artifact_consistency", "metadata_artifact_consistency_ratio"),
        ("audit_completeness", "audit_completeness_ratio"),
    ):
        gauge(name, DEFINITIONS[key], [({}, seed[key]["value"])])
    gauge("mttr_seconds", DEFINITIONS["mttr"], [({}, seed["mttr"]["value"])])
    gauge(
        "recoveries",
        "Recoveries counted in MTTR (complete, no clock skew)",
        [({}, seed["mttr"]["count"])],
    )
    newest = seed["metadata_artifact_consistency"]["mlflow_newest"]
    gauge(
        "mlflow_backup_consistency_ratio",
        "Of the newest MLflow backup: references resolving to files in the backup / references",
        [({"checkpoint": newest["checkpoint"]}, newest["fraction_consistent"])] if newest else [],
    )


def _operations(m: dict[str, Any], gauge: Gauge) -> None:
    ck = m["checkpoints"]
    gauge("checkpoints", "Committed checkpoints in the store", [({}, ck["count"])])
    for key, what in (
        ("newest", "the newest checkpoint"),
        (
            "newest_verified",
            "the newest checkpoint whose latest drill, validation or verify event is ok",
        ),
    ):
        one = ck[key]
        gauge(
            f"{key}_checkpoint_age_seconds",
            f"Seconds since the commit of {what}",
            [({}, one["age_s"] if one else None)],
        )
    s = m["saves"]
    gauge("saves", "Save events in the window", [({}, s["count"])])
    gauge(
        "save_failures",
        "Failed saves in the window, by error type",
        [({"error": k}, v) for k, v in sorted(s["failures_by_type"].items())],
    )
    gauge(
        "save_stall_seconds",
        "Time the caller was blocked by a save (last, median, p95)",
        [({"stat": k}, s["stall_s"][k]) for k in _STATS],
    )
    gauge(
        "save_durable_seconds",
        "Save start to committed (last, median, p95)",
        [({"stat": k}, s["durable_s"][k]) for k in _STATS],
    )
    gauge(
        "save_bytes",
        "Bytes of the saves in the window (raw: tensors; stored: on disk)",
        [({"kind": "raw"}, s["bytes"]["raw"]), ({"kind": "stored"}, s["bytes"]["stored"])],
    )
    ld = m["loads"]
    gauge("loads", "Load events in the window", [({}, ld["count"])])
    gauge("load_failures", "Failed loads in the window", [({}, ld["failed"])])
    gauge(
        "load_open_seconds",
        "Median time from a load's start to its checkpoint opened",
        [({"stat": "median"}, ld["open_s"]["median"])],
    )
    gauge(
        "load_total_seconds",
        "Median time of a whole load",
        [({"stat": "median"}, ld["total_s"]["median"])],
    )
    for kind in ("validations", "drills", "verifies"):
        r = m[kind]
        gauge(
            kind,
            f"{kind.capitalize()} in the window, by result",
            [({"result": "ok"}, r["ok"]), ({"result": "failed"}, r["failed"])],
        )
    gauge(
        "events_skipped",
        "Lines of the events file that are not an event (torn, hostile)",
        [({}, m["events"]["skipped"])],
    )


class StoreCollector(Collector):
    """A collector computing ``store``'s metrics at most once per ``cache_s`` seconds."""

    def __init__(
        self, store: str, *, cache_s: float = 5.0, window: float | None = None, **kw: Any
    ) -> None:
        self.store, self.cache_s, self.window, self.kw = store, cache_s, window, kw
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._families: list[GaugeMetricFamily] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            if time.monotonic() - self._at >= self.cache_s:
                self._families = families(compute(self.store, window=self.window, **self.kw))
                self._at = time.monotonic()
            yield from self._families


def _registry(m: dict[str, Any]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)

    class _Fixed(Collector):
        def collect(self) -> Iterator[GaugeMetricFamily]:
            yield from families(m)

    reg.register(_Fixed())
    return reg


def render(m: dict[str, Any]) -> bytes:
    """One ``metrics.compute`` result in the Prometheus text format."""
    return generate_latest(_registry(m))


def write_textfile(m: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """``render(m)`` into ``path`` for node_exporter's textfile collector: a temporary in the
    same directory (named ``.*.tmp``, which the collector ignores), fsynced, then renamed over
    ``path``, so a reader sees the old file or the new one, never half of one."""
    target = os.fspath(path)
    data = render(m)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(target)}.",
        suffix=".tmp",
        dir=os.path.dirname(os.path.abspath(target)),
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the collector (another user) out
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def serve(
    store: str, port: int, addr: str = "127.0.0.1", *, cache_s: float = 5.0, **kw: Any
) -> tuple[Any, Callable[[], None]]:
    """Serve ``store``'s metrics on ``addr:port`` (0: any free port) from a background thread;
    (the server, a function that stops it)."""
    from prometheus_client import start_http_server

    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector(store, cache_s=cache_s, **kw))
    server, thread = start_http_server(port, addr=addr, registry=reg)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return server, stop
