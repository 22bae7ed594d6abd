"""``ckptguard verify PATH``: check every byte of a checkpoint, or of each checkpoint of a store,
against its hashes; under ``srun``/``mpiexec`` the tasks share the chunks (ckptguard.pverify)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

import ckptguard
from ckptguard import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    SignatureError,
)
from ckptguard.units import format_size

from ._args import is_one_checkpoint, require_checkpoint
from ._output import CheckFailed, cell, console, echo, terminal_safe

if TYPE_CHECKING:  # the load path (and torch) is imported only when a command runs
    from ckptguard import Problem
    from ckptguard.sign import TrustSet

# The verify of one process (ckptguard.verify) or of rank 0 leading the others (pverify).
Verify = Callable[..., "ckptguard.VerifyReport"]


@click.command("verify")
@click.argument("path")
@click.option("--latest", "latest_only", is_flag=True, help="Of a store, verify only LATEST.")
@click.option(
    "--parallel/--no-parallel",
    default=True,
    show_default=True,
    help="Started as several MPI tasks (srun, mpiexec -n N): split the chunks across them.",
)
@click.option(
    "--trust",
    "trust_paths",
    metavar="KEY_OR_DIR",
    multiple=True,
    help="Accept only checkpoints signed by this public key (a .pub file, or a directory of "
    "them); repeat for several (key rotation).",
)
def command(path: str, latest_only: bool, parallel: bool, trust_paths: tuple[str, ...]) -> None:
    """Check every byte of a checkpoint or store against its hashes.

    PATH is a checkpoint, a directory or one file (checked alone), or a store (each committed
    checkpoint, or with --latest only LATEST); either may be in an object store
    (s3://bucket/prefix[/name], read from the bucket by this process alone). Prints each
    problem with its file, tensor, chunk and offset. With --trust, a checkpoint must also carry
    a signature by one of those keys that binds its manifest (docs/security.md). Exits 0 if all
    are whole, 1 otherwise. Under `srun` or `mpiexec -n N` the tasks share the chunks; rank 0
    prints the same report and every task exits with the same code.
    """
    from ckptguard import pverify
    from ckptguard.api import resolve
    from ckptguard.sign import trust_set

    trust = trust_set(list(trust_paths)) if trust_paths else None  # a bad key: before any work
    if path.startswith("s3://"):  # one process reads the bucket (no chunks shared)
        _verify_paths(path, latest_only, ckptguard.verify, False, trust)
        return
    world = pverify.world(parallel)
    if world is None:
        _verify_paths(path, latest_only, ckptguard.verify, console().is_terminal, trust)
        return
    if world.rank != 0:  # prints nothing; exits as rank 0 does
        raise click.exceptions.Exit(pverify.follow(world))
    leader = pverify.Leader(world, resolve=resolve)
    code = 1
    try:
        _verify_paths(path, latest_only, leader.verify, False, trust)
        code = 0
    except (CheckpointError, OSError):
        code = 2
        raise
    finally:
        leader.finish(code)


def _verify_paths(
    path: str, latest_only: bool, verify: Verify, bar: bool, trust: TrustSet | None = None
) -> None:
    """Verify what PATH names, print the outcome, raise CheckFailed unless all is whole."""
    if path.startswith("s3://"):
        from ckptguard.objstore.source import targets as bucket_targets

        targets, problems = bucket_targets(path, latest_only)
    else:
        _refuse_foreign(path)
        where = require_checkpoint(path, "checkpoint or store")
        targets, problems = _verify_targets(where, latest_only)
    if problems:
        echo(*problems)
    if not targets:
        if not problems:
            echo(f"no committed checkpoints in {path}", err=True)
        raise CheckFailed
    if bar:
        results = _verify_with_bar(targets, trust)
    else:
        results = []
        for target in targets:
            ok, lines = _verify_one(target, None, verify, trust)
            echo(*lines)
            results.append(ok)
    if len(results) > 1:
        echo(f"{results.count(True)} of {len(results)} checkpoints ok")
    if problems or not all(results):
        raise CheckFailed


def _refuse_foreign(path: str) -> None:
    """ForeignCheckpointError for a checkpoint of another format: it has no ckptguard hashes."""
    from ckptguard import foreign

    try:
        source = foreign.detect(path)
    except CheckpointNotFoundError:  # none of the kinds: what follows says what PATH lacks
        return
    if source is not None:
        raise foreign.not_ckptguard(source)


def _verify_targets(path: str, latest_only: bool) -> tuple[list[str], list[str]]:
    """The checkpoint directories that ``verify PATH`` checks, and the store's own problems
    (a damaged LATEST, or one naming no committed checkpoint: format.md section 1)."""
    if is_one_checkpoint(path):
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
    verify: Verify,
    trust: TrustSet | None = None,
) -> tuple[bool, list[str]]:
    """Verify one checkpoint; (whole?, lines describing the outcome)."""
    from ckptguard.store import note_read

    noted = verify is not ckptguard.verify  # ckptguard.verify records its outcome itself
    try:
        report = verify(path, progress=progress, trusted_keys=trust)
    except (CorruptCheckpointError, FormatVersionError, SignatureError) as exc:
        if noted:
            note_read(path, "verify", {"result": "failed", "error": str(exc)[:1000]})
        return False, [f"FAIL {path}", f"  problem: {exc}"]
    if noted:
        result = "ok" if report.ok else "failed"
        note_read(path, "verify", {"result": result, "problems": len(report.problems)})
    if report.ok:
        size = format_size(report.bytes_checked)
        signed = f"; signed by key {report.signed_by[:16]}" if report.signed_by else ""
        lines = [f"ok   {report.path} ({report.chunks_checked} chunks, {size} checked{signed})"]
        for scope, n in sorted(report.keyless.items()):  # sealed chunks without their key
            lines.append(
                f"  {n} records of scope {scope!r} checked as stored only (ciphertext; "
                f"plaintext not checked: {report.key_errors.get(scope, 'no key')})"
            )
        return True, lines
    lines = [f"FAIL {report.path}: {len(report.problems)} problem(s)"]
    return False, lines + [_problem_line(p) for p in report.problems]


def _verify_with_bar(targets: list[str], trust: TrustSet | None = None) -> list[bool]:
    """Verify with a live progress bar per checkpoint (terminals only)."""
    cols = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    results = []
    with Progress(*cols, transient=True) as bar:
        for target in targets:
            task = bar.add_task(cell(os.path.basename(os.path.normpath(target))), total=None)

            def progress(done: int, total: int, task: TaskID = task) -> None:
                bar.update(task, completed=done, total=total)

            ok, lines = _verify_one(target, progress, ckptguard.verify, trust)
            bar.remove_task(task)
            for line in lines:
                bar.console.print(
                    terminal_safe(line), markup=False, highlight=False, soft_wrap=True
                )
            results.append(ok)
    return results
