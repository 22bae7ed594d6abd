"""``ckptguard gc STORE``: reclaim abandoned saves and leftovers from a store's staging area."""

from __future__ import annotations

import click

import ckptguard

from ._args import parse_duration, require_dir
from ._output import echo


@click.command("gc")
@click.argument("store")
@click.option(
    "--older-than",
    default="1h",
    show_default=True,
    help="Reclaim staging entries older than this (0, 90s, 30m, 1h, 2d).",
)
def command(store: str, older_than: str) -> None:
    """Remove abandoned saves and leftovers from STORE/.staging.

    Of a store in an object store (s3://bucket/prefix): the objects of drains that never
    created their MANIFEST.json, and unfinished multipart uploads, older than --older-than
    (which must exceed the longest drain)."""
    seconds = parse_duration(older_than)
    if store.startswith("s3://"):
        from ckptguard.objstore import gc

        removed = gc(store, older_than=seconds)
    else:
        removed = ckptguard.Store(require_dir(store, "store")).gc(older_than=seconds)
    for path in removed:
        echo(f"removed {path}")
    echo(f"{len(removed)} item(s) removed" if removed else "nothing to remove")
