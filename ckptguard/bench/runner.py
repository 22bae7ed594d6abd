"""Runs the limits and every engine on every workload in alternating trials; keeps raw records."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..units import format_size
from .comm import LocalComm, init_torch_distributed
from .congestion import CompetingWriter, describe
from .disk import fsync_tree, make_cold, tree_bytes
from .engines import Engine
from .limits import disk_limits, gpu_copy_limits, memcpy_limit
from .machine import (
    PeakRSS,
    describe_machine,
    load_average,
    peak_pinned_bytes,
    pinned_bytes,
    reset_peak_pinned,
)
from .stats import LOADED, QUIET, summarize, summarize_limits
from .workloads import Workload, make_workload

SCHEMA = "ckptguard-bench/1"


@dataclass
class BenchConfig:
    """What to run; sizes in bytes (per rank for workloads), times in seconds."""

    size: int
    directory: str
    trials: int = 3
    workloads: list[str] = field(default_factory=lambda: ["model", "finetune", "small"])
    device: str = "cpu"
    limit_size: int = 0  # 0: min(size, 4 GiB)
    limit_trials: int = 0  # 0: same as trials
    parallel_files: int = 0  # 0: min(8, max(2, cpu count))
    copy_size: int = 0  # GPU copy limits, 0: min(size, 4 GiB)
    pageable_copy_size: int = 0  # 0: min(copy_size, 1 GiB); negative: skip pageable copies
    evict_bytes: int = 0  # > 0: read a file this large when the page cache cannot be dropped
    budget_s: float = 0.0  # > 0: skip engine trials that would not finish within this
    seed: int = 0
    load: bool = True
    load_engines: list[str] | None = None  # engine ids that get the cold load; None: all
    congestion: str = "none"  # a competing writer for loaded trials: none, dd or stress
    congestion_bytes: int = 0  # the file it writes through; 0: min(size, 1 GiB), at least 4 MiB

    def resolved(self) -> BenchConfig:
        """A copy with every 0 default filled in."""
        c = BenchConfig(**asdict(self))
        c.limit_size = c.limit_size or min(c.size, 4 << 30)
        c.limit_trials = c.limit_trials or c.trials
        c.parallel_files = c.parallel_files or min(8, max(2, os.cpu_count() or 2))
        c.copy_size = c.copy_size or min(c.size, 4 << 30)
        if c.pageable_copy_size == 0:
            c.pageable_copy_size = min(c.copy_size, 1 << 30)
        c.congestion_bytes = c.congestion_bytes or max(4 << 20, min(c.size, 1 << 30))
        return c


Log = Callable[[str], None]


def _collect(cfg: BenchConfig) -> None:
    """Collect garbage between measurements, where it can matter (it costs ~0.1 s)."""
    if cfg.size >= 32 << 20:
        gc.collect()


def touch(obj: Any) -> None:
    """Read one byte of every page of every CPU tensor in ``obj``.

    Engines that return memory-mapped tensors (safetensors) have read nothing yet; the pages must
    come in from disk inside the timed load, as they do for engines that copy.
    """
    from .treeutil import flatten

    for t in flatten(obj)[0].values():
        if t.device.type == "cpu" and t.numel() and t.is_contiguous():
            t.reshape(-1).view(torch.uint8)[::4096].sum()


def _minus(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else max(0, a - b)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Runner:
    """One benchmark run on one or more ranks; rank 0 holds the results."""

    def __init__(
        self,
        cfg: BenchConfig,
        engines: list[Engine],
        comm: LocalComm | None = None,
        log: Log | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.cfg = cfg.resolved()
        self.engines = engines
        self.comm = comm or LocalComm()
        self.log = log if (log and self.comm.rank == 0) else (lambda _m: None)
        self.on_progress = on_progress if self.comm.rank == 0 else None
        # Asked once, before anything runs, so that the caller can say up front what is left out.
        self.unavailable: dict[str, str] = {}
        for eng in engines:
            why = eng.unavailable(self.comm.size, self.cfg.device)
            if why:
                self.unavailable[eng.id] = why
        self.t_start = time.perf_counter()
        self.results: dict[str, Any] = {
            "schema": SCHEMA,
            "config": asdict(self.cfg),
            "ranks": self.comm.size,
            "machine": None,
            "workloads": {},
            "limits": [],
            "trials": [],
            "skipped": [],
            "notes": [],
            "complete": False,
        }

    # -- bookkeeping ------------------------------------------------------------------------------

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.results["summary"] = summarize(self.results)
            self.on_progress(self.results)

    def _elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def _over_budget(self, estimate: float) -> bool:
        b = self.cfg.budget_s
        return b > 0 and self.comm.any(self._elapsed() + estimate > b)

    # -- limits -----------------------------------------------------------------------------------

    def conditions(self, k: int) -> list[str]:
        """The conditions of round ``k``: quiet, and loaded when the run has a competing writer,
        their order alternating from round to round."""
        conds = [QUIET] if self.cfg.congestion == "none" else [QUIET, LOADED]
        k %= len(conds)
        return conds[k:] + conds[:k]

    @contextlib.contextmanager
    def under(self, cond: str) -> Iterator[dict[str, Any]]:
        """Run the block in condition ``cond``: for ``loaded``, with the competing writer
        running (rank 0 starts one; every rank starts its work once it writes), stopped and
        its file removed when the block is left. Yields a dict that then holds the writer's
        report."""
        report: dict[str, Any] = {}
        if cond == QUIET:
            yield report
            return
        writer = None
        if self.comm.rank == 0:
            cfg = self.cfg
            writer = CompetingWriter(cfg.congestion, cfg.directory, cfg.congestion_bytes)
        try:
            if writer is not None:
                writer.start()
            self.comm.barrier()
            yield report
        finally:
            if writer is not None:
                report.update(writer.stop())

    def measure_limits(self, trial: int, cond: str = QUIET) -> None:
        """One trial of every machine limit, all ranks at once (rates are aggregates)."""
        cfg = self.cfg
        mine = os.path.join(cfg.directory, f"rank{self.comm.rank}")
        os.makedirs(mine, exist_ok=True)
        self.comm.barrier()
        with self.under(cond) as writer:
            entries = disk_limits(
                mine, cfg.limit_size, cfg.parallel_files, cfg.evict_bytes, trial=trial
            )
            self.comm.barrier()
        entries.append(memcpy_limit(min(cfg.limit_size, 1 << 30)))
        if cfg.device.startswith("cuda"):
            pageable = cfg.pageable_copy_size if cfg.pageable_copy_size > 0 else 0
            entries += gpu_copy_limits(cfg.copy_size, pageable)
        agg = []
        for e in entries:
            total = self.comm.sum(e["bytes"])
            secs = self.comm.max(e["seconds"])
            row = {**e, "trial": trial, "condition": cond, "bytes": total, "seconds": secs}
            row["gbps"] = total / secs / 1e9 if secs else 0.0
            if self.comm.any("skipped" in e) and "skipped" not in row:
                row["skipped"] = "refused on another rank"
            if writer and e["limit"].startswith("write_"):
                row["competing_writer"] = writer
            agg.append(row)
        shutil.rmtree(mine, ignore_errors=True)
        self.results["limits"] += agg
        for e in agg:
            files = f" x{e['files']} files" if e.get("files", 1) > 1 else ""
            cache = f" (cache: {e['cache']['method']})" if "cache" in e else ""
            what = f"skipped: {e['skipped']}" if "skipped" in e else f"{e['gbps']:.2f} GB/s"
            tag = f" ({cond})" if cond != QUIET else ""
            self.log(f"  limit {e['limit']}{files}{tag}: {what}{cache}")
        self._progress()

    # -- one engine trial -------------------------------------------------------------------------

    def _save(self, eng: Engine, w: Workload, d: str, name: str) -> dict[str, Any]:
        rank, world, device = self.comm.rank, self.comm.size, self.cfg.device
        _collect(self.cfg)
        _sync(device)
        reset_peak_pinned()
        pinned_before = pinned_bytes()
        self.comm.barrier()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            waiter = eng.save(w.state, d, name, rank, world)
            t_call = time.perf_counter() - t0
            if waiter is not None:
                waiter()
            t_done = time.perf_counter() - t0
            outs = eng.outputs(d, name, rank, world)
            fsync_tree(outs, up_to=d)
            t_durable = time.perf_counter() - t0
            self.comm.barrier()
            t_all = time.perf_counter() - t0
        own = 0 if (eng.shared_output() and rank != 0) else tree_bytes(outs)
        call_s = self.comm.max(t_call)
        return {
            "call_s": call_s,
            "done_s": self.comm.max(t_done),
            "durable_s": self.comm.max(max(t_durable, t_all)),
            "fsync_s": self.comm.max(t_durable - t_done),
            "stored_bytes": int(self.comm.sum(own)),
            "save_peak_rss_bytes": int(self.comm.max(mem.peak)),
            "save_extra_rss_bytes": int(self.comm.max(mem.extra)),
            "pinned_held_before_bytes": pinned_before,
            "pinned_peak_bytes": _minus(peak_pinned_bytes(), pinned_before),
        }

    def _load(self, eng: Engine, w: Workload, d: str, name: str) -> dict[str, Any]:
        from .treeutil import compare, empty_like_state

        rank, world, device = self.comm.rank, self.comm.size, self.cfg.device
        template = empty_like_state(w.state) if eng.needs_template else None
        cold = make_cold([d], self.cfg.directory, self.cfg.evict_bytes)
        _collect(self.cfg)
        self.comm.barrier()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            obj = eng.load(d, name, template, device, rank, world)
            touch(obj)
            _sync(device)
            t_load = time.perf_counter() - t0
            self.comm.barrier()
        ok, why = compare(w.state, obj)
        del obj, template
        return {
            "load_s": self.comm.max(t_load),
            "load_cache": cold,
            "load_peak_rss_bytes": int(self.comm.max(mem.peak)),
            "load_extra_rss_bytes": int(self.comm.max(mem.extra)),
            "verified": not self.comm.any(not ok),
            "verify_message": why,
        }

    def _first_save(self, eng: Engine, w: Workload, d: str) -> dict[str, Any]:
        """Start ``eng`` fresh (its setup timed apart) and measure its first save."""
        t0 = time.perf_counter()
        eng.fresh(w.state)
        setup_s = self.comm.max(time.perf_counter() - t0)
        first = self._save(eng, w, d, "first")
        first["stall_s"] = first["call_s"] if eng.asynchronous else first["durable_s"]
        return {**first, "setup_s": setup_s}

    def run_trial(
        self, eng: Engine, w: Workload, trial: int, position: int, cond: str = QUIET
    ) -> dict[str, Any]:
        """Save (and for two-save workloads, first a base save), make cold, load, compare; in
        condition ``cond``. An engine that keeps state across saves starts fresh and saves once
        first: its first save is recorded under ``first``, and the measured save is warm."""
        d = os.path.join(self.cfg.directory, f"{w.name}.{eng.id}.t{trial}.{cond}")
        if self.comm.rank == 0:
            os.makedirs(d, exist_ok=True)
        self.comm.barrier()
        rec: dict[str, Any] = {
            "workload": w.name,
            "engine": eng.id,
            "family": eng.family,
            "asynchronous": eng.asynchronous,
            "trial": trial,
            "position": position,
            "condition": cond,
            "logical_bytes": self.results["workloads"][w.name]["logical_bytes"],
        }
        t0 = time.perf_counter()
        try:
            with self.under(cond) as writer:
                self._trial_body(eng, w, d, rec)
            if writer:
                rec["competing_writer"] = writer
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["traceback"] = traceback.format_exc(limit=6)
        if eng.note:
            rec["note"] = eng.note
        failed = self.comm.any("error" in rec)
        if failed and "error" not in rec:
            rec["error"] = "another rank failed"
        self.comm.barrier()
        if self.comm.rank == 0:
            shutil.rmtree(d, ignore_errors=True)
        self.comm.barrier()
        rec["wall_s"] = time.perf_counter() - t0
        return rec

    def _trial_body(self, eng: Engine, w: Workload, d: str, rec: dict[str, Any]) -> None:
        if eng.keeps_state:
            rec["first"] = self._first_save(eng, w, d)
        if w.advance is not None:
            base = eng.save(w.state, d, "base", self.comm.rank, self.comm.size)
            if base is not None:
                base()
            fsync_tree(eng.outputs(d, "base", self.comm.rank, self.comm.size), up_to=d)
            w.advance(w.state)
            _sync(self.cfg.device)
        rec.update(self._save(eng, w, d, "ckpt"))
        rec["stall_s"] = rec["call_s"] if eng.asynchronous else rec["durable_s"]
        if self._loads(eng):
            rec.update(self._load(eng, w, d, "ckpt"))

    # -- the whole run ----------------------------------------------------------------------------

    def _loads(self, eng: Engine) -> bool:
        if not self.cfg.load:
            return False
        return self.cfg.load_engines is None or eng.id in self.cfg.load_engines

    def _estimate(self, eng: Engine, wname: str) -> float:
        """Seconds the next trial of ``eng`` will likely take: its own last trial if any, else
        the median save and load of this workload so far (or the disk limits) plus overhead."""
        done = [t for t in self.results["trials"] if t["workload"] == wname and "error" not in t]
        same = [t["wall_s"] for t in done if t["engine"] == eng.id]
        if same:
            return max(same)
        meta = self.results["workloads"][wname]
        lim = summarize_limits(self.results["limits"])
        gb = meta["logical_bytes"] / 1e9
        saves = [t["durable_s"] for t in done]
        loads = [t["load_s"] for t in done if "load_s" in t]
        save = statistics.median(saves) if saves else gb / (lim["write_gbps"] or 1.0)
        load = statistics.median(loads) if loads else gb / (lim["read_gbps"] or 1.0)
        extra = save if meta.get("two_saves") else 0.0
        return save + extra + (load if self._loads(eng) else 0.0) + 3.0

    def _round(self, w: Workload, order: list[Engine], trial: int, cond: str) -> None:
        """One trial of each engine in ``order``, in condition ``cond`` (within the budget)."""
        for pos, eng in enumerate(order):
            if self._over_budget(self._estimate(eng, w.name)):
                skip = {"engine": eng.id, "workload": w.name, "trial": trial}
                skip["reason"] = f"time budget of {self.cfg.budget_s:.0f} s"
                if cond != QUIET:
                    skip["condition"] = cond
                self.results["skipped"].append(skip)
                self.log(f"  [{w.name} t{trial + 1}] {eng.id}: skipped (time budget)")
                continue
            rec = self.run_trial(eng, w, trial, pos, cond)
            self.results["trials"].append(rec)
            self.log("  " + _trial_line(rec, self.cfg.trials))
            self._progress()

    def run(self) -> dict[str, Any]:
        """Measure the limits, then each workload's engines in rotating order; return results."""
        cfg, comm = self.cfg, self.comm
        if comm.rank == 0:
            os.makedirs(cfg.directory, exist_ok=True)
        comm.barrier()
        if comm.rank == 0:
            self.results["machine"] = describe_machine(cfg.directory)
        for eng_id, why in self.unavailable.items():
            self.results["skipped"].append({"engine": eng_id, "reason": why})
        runnable = [e for e in self.engines if e.id not in self.unavailable]
        if comm.size > 1 and any(e.id.startswith("dcp") for e in runnable):
            init_torch_distributed(comm, cfg.device)
        if cfg.congestion != "none":
            self.results["notes"].append(
                f"loaded: {describe(cfg.congestion)}, through a file of "
                f"{format_size(cfg.congestion_bytes)}, started before and stopped after each "
                "loaded trial; quiet and loaded trials alternate"
            )
        for t in range(cfg.limit_trials):
            self.log(f"limits, trial {t + 1}/{cfg.limit_trials}")
            for cond in self.conditions(t):
                self.measure_limits(t, cond)
        for wname in cfg.workloads:
            if self._over_budget(0.0):  # not even worth generating the state
                for eng in runnable:
                    self.results["skipped"].append(
                        {
                            "engine": eng.id,
                            "workload": wname,
                            "reason": f"time budget of {cfg.budget_s:.0f} s spent before it",
                        }
                    )
                self.log(f"workload {wname}: skipped (time budget spent)")
                continue
            t0 = time.perf_counter()
            w = make_workload(wname, cfg.size, cfg.device, cfg.seed, comm.rank, comm.size)
            _sync(cfg.device)
            gen_s = time.perf_counter() - t0
            meta = {
                "description": w.description,
                "logical_bytes": int(comm.sum(w.logical_bytes)),
                "tensors": int(comm.sum(w.tensor_count)),
                "device": cfg.device,
                "generate_s": gen_s,
                "two_saves": w.advance is not None,
                **w.info,
            }
            self.results["workloads"][wname] = meta
            self.log(
                f"workload {wname}: {meta['description']} ({meta['tensors']} tensors, "
                f"{format_size(meta['logical_bytes'], places=2)}, made in {gen_s:.1f} s)"
            )
            for eng in runnable:
                eng.begin_workload()
            for trial in range(cfg.trials):
                k = trial % max(1, len(runnable))
                order = runnable[k:] + runnable[:k]
                for cond in self.conditions(trial):
                    self._round(w, order, trial, cond)
            for eng in runnable:
                try:
                    eng.end_workload()
                except Exception as exc:  # closing a stager must not lose the results
                    self.results["notes"].append(f"{eng.id}: end_workload failed: {exc}")
            del w
            gc.collect()
            if cfg.device.startswith("cuda"):
                torch.cuda.empty_cache()
        self.results["complete"] = True
        self.results["elapsed_s"] = self._elapsed()
        self.results["loadavg_end"] = load_average()
        self.results["summary"] = summarize(self.results)
        if self.on_progress is not None:
            self.on_progress(self.results)
        return self.results


def _trial_line(rec: dict[str, Any], trials: int) -> str:
    tag = "" if rec.get("condition", QUIET) == QUIET else f" {rec['condition']}"
    head = f"[{rec['workload']} t{rec['trial'] + 1}/{trials}{tag}] {rec['engine']}:"
    if "error" in rec:
        return f"{head} ERROR {rec['error']}"
    load = f", cold load {rec['load_s']:.2f} s" if "load_s" in rec else ""
    if "first" in rec:
        f = rec["first"]
        head += f" first save: stall {f['stall_s']:.2f} s, durable {f['durable_s']:.2f} s; warm:"
    ok = "" if rec.get("verified", True) else f", NOT VERIFIED ({rec.get('verify_message')})"
    return (
        f"{head} stall {rec['stall_s']:.2f} s, durable {rec['durable_s']:.2f} s, "
        f"stored {format_size(rec['stored_bytes'])}{load}{ok} (trial {rec['wall_s']:.1f} s)"
    )


def failures(results: dict[str, Any]) -> list[str]:
    """One line per engine and workload whose trials failed (an error, or a load that did not
    compare equal to the state saved); empty when every engine that ran succeeded."""
    bad: dict[tuple[str, str], str] = {}
    for t in results.get("trials", []):
        why = t.get("error") or (
            None if t.get("verified", True) else f"not verified: {t.get('verify_message')}"
        )
        if why:
            bad.setdefault((t["engine"], t["workload"]), why)
    return [f"{engine} ({workload}): {why}" for (engine, workload), why in bad.items()]
