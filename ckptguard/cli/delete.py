"""``ckptguard delete STORE NAME``: delete one checkpoint, moving LATEST back first if needed."""

from __future__ import annotations

import click

import ckptguard

from ._args import require_dir
from ._output import echo


@click.command("delete")
@click.argument("store")
@click.argument("name")
def command(store: str, name: str) -> None:
    """Delete checkpoint NAME from STORE.

    If NAME is LATEST, LATEST first moves to the newest remaining checkpoint.
    """
    st = ckptguard.Store(require_dir(store, "store"))
    st.delete(name)
    latest = st.latest()
    echo(f"deleted {name}; LATEST is now {latest.name if latest else 'absent'}")
