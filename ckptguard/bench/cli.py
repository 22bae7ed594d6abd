"""``ckptguard bench``: ckptguard beside its peers and the machine's limits, in one run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import click

from ckptguard.units import parse_size

from . import WORKLOADS
from .comm import LAUNCHERS, LocalComm, choose_launcher, launch_command, make_comm, under_mpi
from .congestion import KINDS, unavailable


def _size(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device is available", param_hint="--device")
    return "cuda:0" if name == "cuda" else name


def _relaunch(ranks: int, launcher: str) -> None:
    """Run this same command as N ranks of ``python -m ckptguard.bench ...``: under
    ``srun -n N --mpi=pmi2`` inside a Slurm allocation (or with ``--launcher srun``), else under
    ``mpiexec -n N``."""
    venv_mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = {
        "srun": shutil.which("srun"),
        "mpiexec": shutil.which("mpiexec")
        or (venv_mpiexec if os.path.exists(venv_mpiexec) else None),
    }
    try:
        name, path = choose_launcher(launcher, os.environ, found)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    ctx = click.get_current_context()
    args: list[str] = []
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if value is None or p.name in ("render",) or not isinstance(p, click.Option):
            continue
        flag = p.opts[-1] if p.opts[-1].startswith("--") else p.opts[0]
        if p.is_flag:
            if value:
                args.append(flag)
        else:
            args += [flag, str(value)]
    cmd = launch_command(name, path, ranks, args)
    click.echo("launching: " + " ".join(cmd), err=True)
    raise SystemExit(subprocess.call(cmd))


def _announce(engines: dict[str, str], charts: str | None) -> None:
    """Say once, before anything runs, which engines and outputs this run leaves out and why."""
    lines = [f"  {eng_id}: {why}" for eng_id, why in engines.items()]
    if charts:
        lines.append(f"  PNG charts: {charts} (results.json and results.md are still written)")
    if lines:
        click.echo("cannot run here (left out of this run):\n" + "\n".join(lines), err=True)


def _render(path: str, out: str, json_only: bool) -> None:
    from .report import charts_unavailable, markdown, write_reports
    from .stats import summarize

    with open(path) as f:
        results = json.load(f)
    results["summary"] = summarize(results)
    if not json_only:
        _announce({}, charts_unavailable())
    for p in write_reports(results, out, json_only):
        click.echo(f"wrote {p}", err=True)
    click.echo(markdown(results))


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--size",
    default="1GiB",
    show_default=True,
    callback=_size,
    help="Bytes of tensor state per rank (64MiB, 1GiB, 16GiB ...).",
)
@click.option(
    "--dir",
    "directory",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where checkpoints are written: a temporary folder inside it, removed after.",
)
@click.option(
    "--out",
    default="bench-results",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Results folder (JSON, Markdown, PNG).",
)
@click.option("--trials", default=3, show_default=True, type=click.IntRange(1))
@click.option(
    "--workloads",
    default="model,finetune,small",
    show_default=True,
    help=f"Comma list of {', '.join(WORKLOADS)}.",
)
@click.option(
    "--engines",
    default="all",
    show_default=True,
    help="Comma list of engine ids or prefixes (ckptguard, torch.save, dcp, ...).",
)
@click.option(
    "--ranks",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Run as N ranks: under srun inside a Slurm allocation, else mpiexec (see --launcher).",
)
@click.option(
    "--launcher",
    type=click.Choice(LAUNCHERS),
    default="auto",
    show_default=True,
    help="For --ranks > 1: auto (srun -n N --mpi=pmi2 when SLURM_JOB_ID is set and srun is on "
    "PATH, else mpiexec -n N), mpiexec or srun.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where the state lives: auto (cuda if present), cpu, cuda, cuda:N.",
)
@click.option("--limit-size", callback=_size, help="Bytes for the disk limits [min(size, 4GiB)].")
@click.option("--limit-trials", type=int, default=0, help="Limit trials [same as --trials].")
@click.option("--copy-size", callback=_size, help="Bytes for GPU copy limits [min(size, 4GiB)].")
@click.option(
    "--pageable-copy-size",
    callback=_size,
    help="Bytes for pageable GPU copies [min(copy size, 1GiB)]; 0 skips them.",
)
@click.option(
    "--evict-file-size",
    callback=_size,
    help="If the page cache cannot be dropped, read a file this large to evict it.",
)
@click.option(
    "--budget",
    type=float,
    default=0.0,
    help="Seconds from the start of the run (imports before it and the reports after it not "
    "counted): engine trials estimated to end past it are skipped and listed, as are workloads "
    "not started by then (0: no limit).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-load", is_flag=True, help="Measure saves only.")
@click.option(
    "--load-engines",
    default="all",
    show_default=True,
    help="Engines (ids or prefixes) whose checkpoints are also loaded cold.",
)
@click.option(
    "--congestion",
    type=click.Choice(KINDS),
    default="none",
    show_default=True,
    help="Also run every limit and engine trial beside a competing writer on the same file "
    "system, reported apart from the quiet trials: dd (ckptguard's own O_DIRECT writer process, "
    "needs nothing installed) or stress (stress-ng --hdd, where installed).",
)
@click.option(
    "--congestion-size",
    callback=_size,
    help="The file the competing writer writes through [min(size, 1GiB)].",
)
@click.option("--json-only", is_flag=True, help="Write results.json only (no Markdown/PNG).")
@click.option(
    "--render",
    type=click.Path(dir_okay=False, exists=True),
    help="Only re-render the reports of an earlier results.json into --out.",
)
def bench(
    size: int,
    directory: str,
    out: str,
    trials: int,
    workloads: str,
    engines: str,
    ranks: int,
    launcher: str,
    device: str,
    limit_size: int | None,
    limit_trials: int,
    copy_size: int | None,
    pageable_copy_size: int | None,
    evict_file_size: int | None,
    budget: float,
    seed: int,
    no_load: bool,
    load_engines: str,
    congestion: str,
    congestion_size: int | None,
    json_only: bool,
    render: str | None,
) -> None:
    """Measure ckptguard beside torch.save, DCP, safetensors, h5py and the machine's limits.

    Prints a Markdown table and writes results.json, results.md and one PNG per workload to OUT.
    """
    if render:
        _render(render, out, json_only)
        return
    if ranks > 1 and not under_mpi():
        _relaunch(ranks, launcher)
    from .engines import select_engines
    from .report import charts_unavailable, markdown, write_reports
    from .runner import BenchConfig, Runner, failures

    try:
        comm = make_comm()
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    if comm.size != ranks and comm.rank == 0:
        click.echo(f"note: running on {comm.size} rank(s) as launched", err=True)
    wl = [w.strip() for w in workloads.split(",") if w.strip()]
    bad = [w for w in wl if w not in WORKLOADS]
    if bad:
        raise click.BadParameter(f"unknown workload(s) {bad}", param_hint="--workloads")
    try:
        chosen = select_engines(engines)
        loaded = None if load_engines == "all" else [e.id for e in select_engines(load_engines)]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--engines") from None
    why = unavailable(congestion) if congestion != "none" else None
    if why:
        raise click.BadParameter(why, param_hint="--congestion")
    dev = _device(device)
    if dev.startswith("cuda") and comm.size > 1:
        import torch

        dev = f"cuda:{comm.rank % torch.cuda.device_count()}"
        torch.cuda.set_device(dev)
    scratch = _scratch(comm, directory)
    cfg = BenchConfig(
        size=size,
        directory=scratch,
        trials=trials,
        workloads=wl,
        device=dev,
        limit_size=limit_size or 0,
        limit_trials=limit_trials,
        copy_size=copy_size or 0,
        pageable_copy_size=-1 if pageable_copy_size == 0 else (pageable_copy_size or 0),
        evict_bytes=evict_file_size or 0,
        budget_s=budget,
        seed=seed,
        load=not no_load,
        load_engines=loaded,
        congestion=congestion,
        congestion_bytes=congestion_size or 0,
    )

    def save_partial(results: dict[str, Any]) -> None:
        write_reports(results, out, json_only=True)
        if not json_only:
            with open(os.path.join(out, "results.md"), "w") as f:
                f.write(markdown(results))

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    runner = Runner(cfg, chosen, comm, log=log, on_progress=save_partial)
    if comm.rank == 0:
        _announce(runner.unavailable, None if json_only else charts_unavailable())
    try:
        if len(runner.unavailable) == len(chosen):
            raise click.ClickException("none of the chosen engines can run here (see above)")
        with _sigterm_unwinds():
            results = runner.run()
    finally:
        comm.barrier()
        if comm.rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    if comm.rank == 0:
        for p in write_reports(results, out, json_only):
            log(f"wrote {p}")
        click.echo(markdown(results))
    failed = failures(results)
    if failed:  # the same trials on every rank, so every rank exits alike
        if comm.rank == 0:
            click.echo("failed:\n" + "\n".join(f"  {f}" for f in failed), err=True)
        raise click.exceptions.Exit(1)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while the run lasts, so that a killed run still stops its
    competing writer and removes its scratch folder (as Ctrl-C does)."""

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: leave the signal alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _scratch(comm: LocalComm, directory: str) -> str:
    path = None
    if comm.rank == 0:
        os.makedirs(directory, exist_ok=True)
        path = tempfile.mkdtemp(prefix="ckptguard-bench-", dir=directory)
    return comm.bcast(path)
