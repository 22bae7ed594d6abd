"""``ckptguard release STORE NAME``: release the legal hold on a checkpoint."""

from __future__ import annotations

import click

import ckptguard

from ._args import require_dir
from ._output import echo


@click.command("release")
@click.argument("store")
@click.argument("name")
def command(store: str, name: str) -> None:
    """Release the hold on NAME in STORE (also a stale or unreadable one); exit 2 if none."""
    hold = ckptguard.Store(require_dir(store, "store")).release(name)
    echo(f"released {name}{f' (held since {hold.created})' if hold else ''}")
