"""``ckptguard validate PATH``: re-read a committed checkpoint from storage after its commit,
record a ``validation`` event, and mark it in its store if it fails (docs/operations.md,
"Validation after each commit")."""

from __future__ import annotations

import os

import click

from ._output import CheckFailed, echo


@click.command("validate")
@click.argument("path")
@click.option(
    "--trust",
    "trust_paths",
    metavar="KEY_OR_DIR",
    multiple=True,
    help="The checkpoint must be signed by this public key (a .pub file or a directory of "
    "them); repeat for several.",
)
@click.option(
    "--by",
    type=click.Choice(["agent", "process", "slurm"]),
    default=None,
    help="Who runs it, for the event (default: slurm inside a Slurm job, else process).",
)
def command(path: str, trust_paths: tuple[str, ...], by: str | None) -> None:
    """Validate checkpoint PATH (or a store's LATEST): check every byte as `verify` does.

    Records a validation event in the store. A checkpoint that fails is marked in
    STORE/.validation/NAME.json, which `ckptguard.load(store, skip_failed_validation=True)`
    and `ckptguard latest --skip-failed-validation` skip; one that passes loses its marker.
    Exits 0 if whole, 1 if it failed (the problems on stderr), 2 for an error (nothing
    marked).
    """
    from ckptguard.units import format_size
    from ckptguard.validation import describe_failure, validate

    who = by or ("slurm" if os.environ.get("SLURM_JOB_ID") else "process")
    out = validate(path, trusted_keys=list(trust_paths) or None, by=who)
    if not out.ok:
        echo(*describe_failure(out), err=True)
        raise CheckFailed
    size = format_size(out.bytes_checked)
    echo(f"ok   {out.path} ({out.chunks_checked} chunks, {size} checked in {out.seconds:.2f} s)")
