"""``ckptguard drain SRC DST``: copy committed checkpoints from a fast store to a durable one,
verified and committed atomically (ckptguard.drain; docs/operations.md)."""

from __future__ import annotations

import click

import ckptguard
from ckptguard.units import format_size

from ._args import require_dir
from ._output import echo, fail


@click.command("drain")
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
@click.option(
    "--sign-key",
    type=click.Path(dir_okay=False),
    help="Sign each copy that is not signed already with this Ed25519 key (ckptguard key "
    "generate); the checkpoint must have chunk digests.",
)
def command(
    src: str,
    dst: str,
    names: tuple[str, ...],
    latest_only: bool,
    all_: bool,
    jobs: int,
    overwrite: bool,
    no_stripe: bool,
    sign_key: str | None,
) -> None:
    """Copy committed checkpoints from store SRC (fast staging) to store DST (durable).

    Each is copied into DST's staging area, verified chunk by chunk and committed with one
    rename; DST's LATEST moves to it if it is newer. Checkpoints DST already holds are skipped;
    one with the same name but another uuid is an error unless --overwrite. With --sign-key, a
    checkpoint that is not signed is signed on its way (a signed one keeps its signature).

    DST may be a store in an object store, s3://bucket/prefix (endpoint and credentials from
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... as boto3 reads them): each checkpoint is uploaded,
    read back and verified, then made visible by creating its MANIFEST.json object only if
    there is none; --overwrite and --sign-key are refused there.
    """
    from ckptguard.drain import drain

    if sum([bool(names), latest_only, all_]) > 1:
        fail("give at most one of --name, --latest and --all")
    require_dir(src, "store")
    chosen: list[str] | None = list(names) if names else None
    if latest_only:
        name = ckptguard.Store(src).latest_name()
        if name is None:
            raise ckptguard.CheckpointNotFoundError(f"store {src} has no LATEST")
        chosen = [name]
    done = drain(
        src,
        dst,
        names=chosen,
        jobs=jobs,
        overwrite=overwrite,
        stripe=not no_stripe,
        on_drained=_report,
        sign_key=sign_key,
    )
    if not done:
        echo(f"nothing to drain: {dst} holds every selected checkpoint")


def _report(info: ckptguard.CheckpointInfo, nbytes: int, seconds: float) -> None:
    """One line per drained checkpoint: where it went, its size and the copy rate."""
    rate = format_size(int(nbytes / seconds)) if seconds > 0 else "-"
    echo(
        f"drained {info.name} -> {info.path}: {nbytes} bytes ({format_size(nbytes)}) "
        f"in {seconds:.2f} s ({rate}/s)"
    )
