"""``ckptguard restore CKPT --torch-out FILE``: a verified checkpoint as a torch.save file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import click

import ckptguard
from ckptguard.units import format_size

from ._args import is_one_checkpoint, require_checkpoint
from ._output import cell, console, echo


@click.command("restore")
@click.argument("ckpt")
@click.option(
    "--torch-out",
    "out",
    required=True,
    type=click.Path(dir_okay=False),
    help="Write the verified state here with torch.save.",
)
@click.option("--allow-pickle", is_flag=True, help="Allow pickled leaves (trusted files only).")
def command(ckpt: str, out: str, allow_pickle: bool) -> None:
    """Write a verified checkpoint as a torch.save file.

    CKPT (a checkpoint directory, a one-file checkpoint, or a store meaning its LATEST) is
    loaded with every chunk verified.
    """
    import torch

    from ckptguard.store import note_read

    source = require_checkpoint(ckpt, "checkpoint")
    if not is_one_checkpoint(source):  # a store: pin its LATEST now, and say which it was
        info = ckptguard.Store(source).latest()
        if info is None:
            raise ckptguard.CheckpointNotFoundError(f"no committed checkpoint in {source}")
        source = info.path
    con = console()
    status = con.status if con.is_terminal else _no_status
    with status(cell(f"loading and verifying {os.path.basename(source)}")):
        state = ckptguard.load(source, allow_pickle=allow_pickle)
    tmp = f"{out}.tmp"
    try:
        with status(cell(f"writing {out}")):
            torch.save(state, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    note_read(source, "restore", {"out": os.path.abspath(out)})
    echo(f"wrote {out} ({format_size(os.path.getsize(out))}) from {os.path.abspath(source)}")


@contextlib.contextmanager
def _no_status(text: str) -> Iterator[None]:
    """The stand-in for ``console.status`` when stdout is not a terminal: shows nothing."""
    yield
