"""``ckptguard demo``: train, checkpoint, corrupt, restore and resume a small model
(ckptguard.demo, the code behind ``make demo``)."""

from __future__ import annotations

import click

from ._output import CheckFailed


@click.command("demo")
@click.option("--store", default="./ckpts", show_default=True, help="Where to save checkpoints.")
def command(store: str) -> None:
    """Train, checkpoint, corrupt, restore and resume a small model."""
    from ckptguard.demo import run_demo

    if run_demo(store) != 0:
        raise CheckFailed
