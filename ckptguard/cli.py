"""The ``ckptguard`` command: inspect, verify, restore and tidy a store of checkpoints.

Exit codes: 0 success; 1 a check failed (``verify`` found problems, ``latest`` found none);
2 an error (bad path, corrupt manifest, bad arguments), printed as one ``error: ...`` line.
``run`` exits with its trainer's status, or 85/86 after a checkpoint request (docs/agent.md).

Names, keys, paths and messages come from checkpoints and stores that may be hostile: every line
this module prints goes out through ``_echo``, ``_fail`` or ``_cell`` (rich tables and status
lines), which escape control characters with ``terminal_safe``, so that nothing read from a
checkpoint can move the cursor, clear the screen or reorder what the operator sees.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

import ckptguard
from ckptguard import CheckpointError, CorruptCheckpointError, FormatVersionError, Problem
from ckptguard.format.layout import looks_like_checkpoint

# C0 controls, DEL, C1 controls, and the Unicode format characters that reorder or break lines:
# bidi marks, embeddings, overrides and isolates, and the line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def terminal_safe(text: object) -> str:
    """``str(text)`` with each control or reordering character written as a visible escape
    (``\\x1b``, ``\\u202e``): what the CLI prints can never drive the terminal."""
    return _UNSAFE.sub(
        lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}",
        str(text),
    )


def _echo(*lines: object, err: bool = False) -> None:
    """Print ``lines`` (each escaped whole, so a newline inside one is shown, not obeyed)."""
    click.echo("\n".join(terminal_safe(line) for line in lines), err=err)


def _cell(text: object) -> str:
    """``text`` for rich (a table cell, a title, a status): escaped, and never markup."""
    return escape(terminal_safe(text))


class _Failed(Exception):
    """Raised by a command that already printed why it failed; exits 1."""


class _CkptGroup(click.Group):
    """Turns ckptguard errors into one ``error:`` line and registers ``bench`` lazily."""

    _lazy = {"bench": "ckptguard.bench.cli"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self._lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self._lazy:
            return super().get_command(ctx, name)
        try:
            return getattr(importlib.import_module(self._lazy[name]), name)
        except Exception as exc:  # an optional part: report it only when it is used
            return _unavailable(name, exc)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except CheckpointError as exc:
            _fail(str(exc))
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            _fail(f"{exc.strerror or exc}{where}")
        except _Failed:
            raise click.exceptions.Exit(1) from None


def _fail(message: str) -> None:
    _echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(2)


def _unavailable(name: str, exc: Exception) -> click.Command:
    why = f"{type(exc).__name__}: {exc}"

    @click.command(
        name, help=f"(unavailable: {why})", context_settings={"ignore_unknown_options": True}
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def stub(args: Sequence[str]) -> None:
        _fail(f"'ckptguard {name}' is unavailable: {why}")

    return stub


def _console() -> Console:
    """Rich console on stdout; wide when piped so tables are not folded."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=max(probe.width, 200))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # unreachable


def _ratio(raw: int, stored: int) -> str:
    return f"{raw / stored:.2f}x" if stored else "-"


def _when(created: datetime) -> str:
    return created.strftime("%Y-%m-%d %H:%M:%S UTC")


def _require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise ckptguard.StoreError(f"no such {what}: {path}", path=path)
    return path


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1h``, ``2d`` (or ``1h30m``) as seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise click.BadParameter(f"{text!r} is not a duration like 0, 90s, 30m, 1h or 2d")
    return sum(float(n) * units[u] for n, u in parts)


@click.group(cls=_CkptGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(ckptguard.__version__, prog_name="ckptguard")
def cli() -> None:
    """Atomic, verified checkpoints for PyTorch training.

    Exit codes: 0 success, 1 a check failed, 2 an error (one 'error: ...' line on stderr).
    """


@cli.command("ls")
@click.argument("store")
def ls_cmd(store: str) -> None:
    """List the committed checkpoints of STORE, oldest first."""
    st = ckptguard.Store(_require_dir(store, "store"))
    scan = st.scan()
    infos = scan.listed
    for skipped in scan.skipped:  # damaged ones are named, never silently left out
        _echo(f"skipped {skipped.name}: {skipped.reason}", err=True)
    if not infos:
        damaged = f" ({len(scan.skipped)} skipped, see above)" if scan.skipped else ""
        _echo(f"no committed checkpoints in {store}{damaged}")
        return
    try:
        latest = st.latest()
    except CorruptCheckpointError as exc:  # still list what is there; verify exits 1 on it
        latest = None
        _echo(f"warning: {exc}", err=True)
    table = Table(title=_cell(f"store {os.path.abspath(store)}"), title_justify="left")
    for col, justify in [
        ("name", "left"),
        ("step", "right"),
        ("stored", "right"),
        ("raw", "right"),
        ("tensors", "right"),
        ("created", "left"),
        ("", "left"),
    ]:
        table.add_column(col, justify=justify)
    for info in infos:
        mark = "LATEST" if latest is not None and info.name == latest.name else ""
        step = "-" if info.step is None else str(info.step)
        table.add_row(
            *map(
                _cell,
                (
                    info.name,
                    step,
                    _size(info.stored_bytes),
                    _size(info.raw_bytes),
                    str(info.tensors),
                    _when(info.created),
                    mark,
                ),
            )
        )
    _console().print(table)


@cli.command("info")
@click.argument("ckpt")
def info_cmd(ckpt: str) -> None:
    """Show a checkpoint's header and per-tensor table.

    CKPT is a checkpoint directory, or a store (meaning its LATEST).
    """
    desc = ckptguard.describe(_require_dir(ckpt, "checkpoint"))
    info = desc.info
    con = _console()
    facts = [
        ("name", info.name),
        ("path", info.path),
        ("uuid", info.uuid),
        ("step", "-" if info.step is None else str(info.step)),
        ("created", _when(info.created)),
        ("world size", str(info.world_size)),
        ("files", str(info.files)),
        ("tensors", str(info.tensors)),
        ("chunks", str(info.chunks)),
        (
            "size",
            f"{_size(info.stored_bytes)} stored, {_size(info.raw_bytes)} raw "
            f"({_ratio(info.raw_bytes, info.stored_bytes)})",
        ),
    ]
    if info.metadata is not None:
        facts.append(("metadata", json.dumps(info.metadata, sort_keys=True)[:300]))
    for name, value in facts:
        con.print(f"[bold]{name:>10}[/]  {_cell(value)}", highlight=False, soft_wrap=True)
    table = Table(show_footer=True)
    cols = ["key", "dtype", "shape", "raw", "stored", "ratio", "chunks", "codecs"]
    raw = sum(t.raw_bytes for t in desc.tensors)
    stored = sum(t.stored_bytes for t in desc.tensors)
    chunks = sum(t.chunks for t in desc.tensors)
    foot = [
        f"{len(desc.tensors)} tensors",
        "",
        "",
        _size(raw),
        _size(stored),
        _ratio(raw, stored),
        str(chunks),
        "",
    ]
    for col, footer in zip(cols, foot, strict=True):
        justify = "left" if col in ("key", "codecs") else "right"
        table.add_column(col, footer=footer, justify=justify)
    for t in desc.tensors:
        codecs = ", ".join(f"{c} x{n}" for c, n in sorted(t.codecs.items()))
        table.add_row(
            *map(
                _cell,
                (
                    t.key,
                    t.dtype,
                    str(list(t.shape)),
                    _size(t.raw_bytes),
                    _size(t.stored_bytes),
                    _ratio(t.raw_bytes, t.stored_bytes),
                    str(t.chunks),
                    codecs,
                ),
            )
        )
    con.print(table)


def _is_checkpoint_dir(path: str) -> bool:
    return looks_like_checkpoint(os.listdir(path))


def _verify_targets(path: str, latest_only: bool) -> tuple[list[str], list[str]]:
    """The checkpoint directories that ``verify PATH`` checks, and the store's own problems
    (a damaged LATEST, or one naming no committed checkpoint: format.md section 1)."""
    if _is_checkpoint_dir(path):
        return [path], []
    st = ckptguard.Store(path)
    try:
        info = st.latest()
    except CorruptCheckpointError as exc:
        info, problems = None, [f"FAIL {os.path.join(path, 'LATEST')}", f"  problem: {exc}"]
    else:
        problems = []
    if latest_only:
        return ([] if info is None else [info.path]), problems
    scan = st.scan()
    # A directory the store skipped has a broken manifest: the reader says what is wrong with
    # it. A link is never followed: it is a problem of the store itself.
    for skipped in scan.skipped:
        if skipped.link:
            problems += [f"FAIL {skipped.path}", f"  problem: {skipped.reason}"]
    damaged = [skipped.path for skipped in scan.skipped if not skipped.link]
    return [info.path for info in scan.listed] + damaged, problems


def _problem_line(p: Problem) -> str:
    return f"  problem: {p}"


def _verify_one(
    path: str,
    progress: Callable[[int, int], None] | None,
    verify: Callable[..., ckptguard.VerifyReport] = ckptguard.verify,
) -> tuple[bool, list[str]]:
    """Verify one checkpoint; (whole?, lines describing the outcome)."""
    try:
        report = verify(path, progress=progress)
    except (CorruptCheckpointError, FormatVersionError) as exc:
        return False, [f"FAIL {path}", f"  problem: {exc}"]
    if report.ok:
        size = _size(report.bytes_checked)
        return True, [f"ok   {report.path} ({report.chunks_checked} chunks, {size} checked)"]
    lines = [f"FAIL {report.path}: {len(report.problems)} problem(s)"]
    return False, lines + [_problem_line(p) for p in report.problems]


def _verify_with_bar(targets: list[str]) -> list[bool]:
    """Verify with a live progress bar per checkpoint (terminals only)."""
    cols = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    results = []
    with Progress(*cols, transient=True) as bar:
        for target in targets:
            task = bar.add_task(_cell(os.path.basename(os.path.normpath(target))), total=None)

            def progress(done: int, total: int, task: TaskID = task) -> None:
                bar.update(task, completed=done, total=total)

            ok, lines = _verify_one(target, progress)
            bar.remove_task(task)
            for line in lines:
                bar.console.print(
                    terminal_safe(line), markup=False, highlight=False, soft_wrap=True
                )
            results.append(ok)
    return results


@cli.command("verify")
@click.argument("path")
@click.option("--latest", "latest_only", is_flag=True, help="Of a store, verify only LATEST.")
@click.option(
    "--parallel/--no-parallel",
    default=True,
    show_default=True,
    help="Started as several MPI tasks (srun, mpiexec -n N): split the chunks across them.",
)
def verify_cmd(path: str, latest_only: bool, parallel: bool) -> None:
    """Check every byte of a checkpoint or store against its hashes.

    PATH is a checkpoint (checked alone) or a store (each committed checkpoint, or with
    --latest only LATEST). Prints each problem with its file, tensor, chunk and offset.
    Exits 0 if all are whole, 1 otherwise. Under `srun` or `mpiexec -n N` the tasks share the
    chunks; rank 0 prints the same report and every task exits with the same code.
    """
    from ckptguard import pverify

    world = pverify.world(parallel)
    if world is None:
        _verify_paths(path, latest_only, ckptguard.verify, _console().is_terminal)
        return
    if world.rank != 0:  # prints nothing; exits as rank 0 does
        raise click.exceptions.Exit(pverify.follow(world))
    leader = pverify.Leader(world, resolve=ckptguard.api.resolve)
    code = 1
    try:
        _verify_paths(path, latest_only, leader.verify, False)
        code = 0
    except (CheckpointError, OSError):
        code = 2
        raise
    finally:
        leader.finish(code)


def _verify_paths(
    path: str, latest_only: bool, verify: Callable[..., ckptguard.VerifyReport], bar: bool
) -> None:
    targets, problems = _verify_targets(_require_dir(path, "checkpoint or store"), latest_only)
    if problems:
        _echo(*problems)
    if not targets:
        if not problems:
            _echo(f"no committed checkpoints in {path}", err=True)
        raise _Failed
    if bar:
        results = _verify_with_bar(targets)
    else:
        results = []
        for target in targets:
            ok, lines = _verify_one(target, None, verify)
            _echo(*lines)
            results.append(ok)
    if len(results) > 1:
        _echo(f"{results.count(True)} of {len(results)} checkpoints ok")
    if problems or not all(results):
        raise _Failed


@cli.command("latest")
@click.argument("store")
def latest_cmd(store: str) -> None:
    """Print the absolute path of STORE's LATEST checkpoint.

    Exits 1, with a message on stderr, if there is none (or no STORE): start fresh then.
    """
    info = ckptguard.Store(store).latest() if os.path.isdir(store) else None
    if info is None:
        _echo(f"no committed checkpoint in {store}", err=True)
        raise _Failed
    _echo(os.path.abspath(info.path))


@cli.command("gc")
@click.argument("store")
@click.option(
    "--older-than",
    default="1h",
    show_default=True,
    help="Reclaim staging entries older than this (0, 90s, 30m, 1h, 2d).",
)
def gc_cmd(store: str, older_than: str) -> None:
    """Remove abandoned saves and leftovers from STORE/.staging."""
    seconds = parse_duration(older_than)
    removed = ckptguard.Store(_require_dir(store, "store")).gc(older_than=seconds)
    for path in removed:
        _echo(f"removed {path}")
    _echo(f"{len(removed)} item(s) removed" if removed else "nothing to remove")


@cli.command("delete")
@click.argument("store")
@click.argument("name")
def delete_cmd(store: str, name: str) -> None:
    """Delete checkpoint NAME from STORE.

    If NAME is LATEST, LATEST first moves to the newest remaining checkpoint.
    """
    st = ckptguard.Store(_require_dir(store, "store"))
    st.delete(name)
    latest = st.latest()
    _echo(f"deleted {name}; LATEST is now {latest.name if latest else 'absent'}")


@contextlib.contextmanager
def _no_status(text: str) -> Iterator[None]:
    yield


@cli.command("restore")
@click.argument("ckpt")
@click.option(
    "--torch-out",
    "out",
    required=True,
    type=click.Path(dir_okay=False),
    help="Write the verified state here with torch.save.",
)
@click.option("--allow-pickle", is_flag=True, help="Allow pickled leaves (trusted files only).")
def restore_cmd(ckpt: str, out: str, allow_pickle: bool) -> None:
    """Write a verified checkpoint as a torch.save file.

    CKPT is loaded with every chunk verified (a store means its LATEST).
    """
    import torch

    source = _require_dir(ckpt, "checkpoint")
    if not _is_checkpoint_dir(source):  # a store: pin its LATEST now, and say which it was
        info = ckptguard.Store(source).latest()
        if info is None:
            raise ckptguard.CheckpointNotFoundError(f"no committed checkpoint in {source}")
        source = info.path
    con = _console()
    status = con.status if con.is_terminal else _no_status
    with status(_cell(f"loading and verifying {os.path.basename(source)}")):
        state = ckptguard.load(source, allow_pickle=allow_pickle)
    tmp = f"{out}.tmp"
    try:
        with status(_cell(f"writing {out}")):
            torch.save(state, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _echo(f"wrote {out} ({_size(os.path.getsize(out))}) from {os.path.abspath(source)}")


@cli.command("demo")
@click.option("--store", default="./ckpts", show_default=True, help="Where to save checkpoints.")
def demo_cmd(store: str) -> None:
    """Train, checkpoint, corrupt, restore and resume a small model."""
    from ckptguard.demo import run_demo

    if run_demo(store) != 0:
        raise _Failed


# ---- run (the per-rank agent of issue #7; docs/agent.md) ----


@cli.command("run", context_settings={"allow_interspersed_args": False})
@click.option(
    "--grace",
    metavar="DURATION",
    default="300",
    show_default=True,
    help="After a checkpoint request, how long every rank has to commit (90, 5m, ...).",
)
@click.option(
    "--time-margin",
    metavar="DURATION",
    default=None,
    help="Request a checkpoint this long before the job's end time (squeue, or "
    "CKPTGUARD_END_TIME in unix seconds). Off unless given.",
)
@click.option(
    "--term-timeout",
    metavar="DURATION",
    default="30",
    show_default=True,
    help="When stopping the trainer, SIGKILL it this long after SIGTERM.",
)
@click.option(
    "--poll",
    default=0.5,
    show_default=True,
    type=click.FloatRange(min=0.01),
    help="Seconds between two agreements of the agents.",
)
@click.option(
    "--peer-timeout",
    metavar="DURATION",
    default="120",
    show_default=True,
    help="An agent that gets no answer from the others this long stops its trainer and aborts "
    "the job (exit 87).",
)
@click.option(
    "--drain-to",
    metavar="STORE",
    default=None,
    help="Copy committed checkpoints to this durable store in the background (rank 0).",
)
@click.option(
    "--drain-every",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="With --drain-to: drain every K-th checkpoint committed.",
)
@click.option(
    "--drain-jobs",
    default=4,
    show_default=True,
    type=click.IntRange(min=1, max=32),
    help="With --drain-to: copy threads (the cap on concurrent writers).",
)
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def run_cmd(
    grace: str,
    time_margin: str | None,
    term_timeout: str,
    poll: float,
    peer_timeout: str,
    drain_to: str | None,
    drain_every: int,
    drain_jobs: int,
    cmd: Sequence[str],
) -> None:
    """Run CMD as this rank's trainer, under a checkpoint agent (one agent per rank).

    Launch with `srun ckptguard run -- python train.py` or `mpiexec -n N ckptguard run -- ...`.
    SIGUSR1 or SIGTERM to any agent, or the time margin, asks every trainer for a checkpoint
    (ckptguard.checkpoint_requested()). Exit status: the trainer's own (128+N if killed by signal
    N); 85 when every rank committed after a request (requeue me); 86 when a request got no
    commit from every rank within the grace; 87 when another agent stopped answering (the job
    is aborted); 2 when the agents could not start.
    """
    from ckptguard.agent.runner import Options, run

    opts = Options(
        cmd=tuple(cmd),
        grace=parse_duration(grace),
        time_margin=None if time_margin is None else parse_duration(time_margin),
        term_timeout=parse_duration(term_timeout),
        poll=poll,
        peer_timeout=parse_duration(peer_timeout),
        drain_to=drain_to,
        drain_every=drain_every,
        drain_jobs=drain_jobs,
    )
    raise click.exceptions.Exit(run(opts))


# ---- doctor (native codec path; owned by the native-codec work, docs/native.md) ----


@cli.command("doctor")
def doctor_cmd() -> None:
    """Say which codec path is active (native or pure Python) and why, with threads and libs."""
    from ckptguard import backend

    info = backend.info()
    _echo(f"codec path: {info['backend']}")
    _echo(f"reason:     {info['reason']}")
    _echo(f"threads:    {info['threads']} (CPUs usable: {info['cpus']})")
    _echo(f"O_DIRECT:   {'on' if info['o_direct'] else 'off'} (CKPTGUARD_ODIRECT)")
    for name, version in sorted(dict(info.get("libraries") or {}).items()):
        _echo(f"native {name}: {version}")
    _echo(f"python lz4: {info['python_lz4']}")


# ---- drain (multi-level checkpointing, issue #7; docs/operations.md) ----


@cli.command("drain")
@click.argument("src")
@click.argument("dst")
@click.option("--name", "names", multiple=True, help="Drain this checkpoint (repeatable).")
@click.option("--latest", "latest_only", is_flag=True, help="Drain only SRC's LATEST.")
@click.option(
    "--all", "all_", is_flag=True, help="Every committed checkpoint DST lacks (the default)."
)
@click.option(
    "--jobs",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="Files (or pieces of files) copied at once; capped at 32.",
)
@click.option("--overwrite", is_flag=True, help="Replace a DST checkpoint of the same name.")
@click.option("--no-stripe", is_flag=True, help="On Lustre, keep the directory's default layout.")
def drain_cmd(
    src: str,
    dst: str,
    names: tuple[str, ...],
    latest_only: bool,
    all_: bool,
    jobs: int,
    overwrite: bool,
    no_stripe: bool,
) -> None:
    """Copy committed checkpoints from store SRC (fast staging) to store DST (durable).

    Each is copied into DST's staging area, verified chunk by chunk and committed with one
    rename; DST's LATEST moves to it if it is newer. Checkpoints DST already holds are skipped;
    one with the same name but another uuid is an error unless --overwrite.
    """
    from ckptguard.drain import drain

    if sum([bool(names), latest_only, all_]) > 1:
        _fail("give at most one of --name, --latest and --all")
    _require_dir(src, "store")
    chosen: list[str] | None = list(names) if names else None
    if latest_only:
        name = ckptguard.Store(src).latest_name()
        if name is None:
            raise ckptguard.CheckpointNotFoundError(f"store {src} has no LATEST")
        chosen = [name]

    def report(info: ckptguard.CheckpointInfo, nbytes: int, seconds: float) -> None:
        rate = _size(int(nbytes / seconds)) if seconds > 0 else "-"
        _echo(
            f"drained {info.name} -> {info.path}: {nbytes} bytes ({_size(nbytes)}) "
            f"in {seconds:.2f} s ({rate}/s)"
        )

    done = drain(
        src,
        dst,
        names=chosen,
        jobs=jobs,
        overwrite=overwrite,
        stripe=not no_stripe,
        on_drained=report,
    )
    if not done:
        _echo(f"nothing to drain: {dst} holds every selected checkpoint")


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="ckptguard")


if __name__ == "__main__":
    main(sys.argv[1:])
