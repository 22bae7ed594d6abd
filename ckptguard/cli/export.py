"""``ckptguard export CKPT --to safetensors|hdf5|torch DIR``: a verified checkpoint as files other
tools read (ckptguard.export)."""

from __future__ import annotations

import warnings

import click

import ckptguard
from ckptguard.units import format_size, parse_size

from ._args import require_checkpoint
from ._output import echo

# Left-out values named on stderr before the rest is counted.
_SHOWN = 20


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command("export")
@click.argument("ckpt")
@click.argument("dest")
@click.option("--to", "to", required=True, metavar="FORMAT", help="safetensors, hdf5 or torch.")
@click.option(
    "--max-shard-size",
    callback=_size,
    metavar="SIZE",
    help="safetensors: shards of at most SIZE (5GB, 500MiB) and model.safetensors.index.json.",
)
@click.option(
    "--select",
    metavar="KEY",
    help="Export only the subtree at KEY (e.g. model, or model/encoder), named relative to it.",
)
@click.option("--strict", is_flag=True, help="Refuse to leave out values the format cannot hold.")
@click.option("--force", is_flag=True, help="Replace files of an earlier export in DEST.")
@click.option("--allow-pickle", is_flag=True, help="torch: allow pickled leaves (trusted only).")
@click.option(
    "--rank",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Whose non-tensor values and PerRank tensors to export.",
)
def command(
    ckpt: str,
    dest: str,
    to: str,
    max_shard_size: int | None,
    select: str | None,
    strict: bool,
    force: bool,
    allow_pickle: bool,
    rank: int,
) -> None:
    """Write a verified checkpoint as safetensors, HDF5 or a torch.save file in DEST.

    CKPT is a checkpoint, or a store (meaning its LATEST). Every tensor is consolidated from its
    saved shards and checked against its hashes as it is written, one at a time; the files get
    their names only once all are whole. safetensors: model.safetensors (or shards and their
    index), names joined by '.'; values that are not tensors are left out, named on stderr
    (--strict: refused). hdf5: checkpoint.h5, a dataset per tensor. torch: checkpoint.pt.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ckptguard.ExportWarning)  # named below, one per line
        result = ckptguard.export(
            require_checkpoint(ckpt, "checkpoint or store"),
            to=to,
            dest=dest,
            select=select,
            max_shard_size=max_shard_size,
            strict=strict,
            force=force,
            allow_pickle=allow_pickle,
            rank=rank,
        )
    if result.left_out:
        lines = [f"  {name} ({why})" for name, why in result.left_out[:_SHOWN]]
        more = len(result.left_out) - _SHOWN
        if more > 0:
            lines.append(f"  ... and {more} more")
        echo(f"left out of the {to} export ({len(result.left_out)}):", *lines, err=True)
    for path in result.files:
        echo(f"wrote {path}")
    echo(f"{result.tensors} tensors, {format_size(result.bytes)}, verified, from {result.source}")
