"""``ckptguard latest STORE``: the absolute path of a store's LATEST checkpoint, for scripts."""

from __future__ import annotations

import os

import click

import ckptguard

from ._output import CheckFailed, echo


@click.command("latest")
@click.argument("store")
def command(store: str) -> None:
    """Print the absolute path of STORE's LATEST checkpoint.

    Exits 1, with a message on stderr, if there is none (or no STORE): start fresh then.
    """
    info = ckptguard.Store(store).latest() if os.path.isdir(store) else None
    if info is None:
        echo(f"no committed checkpoint in {store}", err=True)
        raise CheckFailed
    echo(os.path.abspath(info.path))
