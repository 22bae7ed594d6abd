"""``ckptguard ls STORE``: the committed checkpoints of a store, oldest first."""

from __future__ import annotations

import os

import click
from rich.console import JustifyMethod
from rich.table import Table

import ckptguard
from ckptguard import CorruptCheckpointError
from ckptguard.units import format_size

from ._args import is_one_file, require_dir
from ._output import cell, console, echo, when


@click.command("ls")
@click.argument("store")
def command(store: str) -> None:
    """List the committed checkpoints of STORE, oldest first (STORE may also be a one-file
    checkpoint: then it alone; or a store in an object store, s3://bucket/prefix)."""
    if store.startswith("s3://"):
        _ls_bucket(store)
        return
    if is_one_file(store):
        info = ckptguard.describe(store).info
        console().print(_table(f"checkpoint {os.path.abspath(store)}", [info], None))
        return
    st = ckptguard.Store(require_dir(store, "store"))
    scan = st.scan()
    infos = scan.listed
    for skipped in scan.skipped:  # damaged ones are named, never silently left out
        echo(f"skipped {skipped.name}: {skipped.reason}", err=True)
    if not infos:
        damaged = f" ({len(scan.skipped)} skipped, see above)" if scan.skipped else ""
        echo(f"no committed checkpoints in {store}{damaged}")
        return
    try:
        latest = st.latest()
    except CorruptCheckpointError as exc:  # still list what is there; verify exits 1 on it
        latest = None
        echo(f"warning: {exc}", err=True)
    levels = None
    if os.path.isdir(os.path.join(store, ".redundancy")):  # a node's store: its protections
        from ckptguard.redundancy.protect import where  # only here: `--help` loads no torch

        levels = {i.name: where(st.root, i.name, i.uuid) for i in infos}
    console().print(_table(f"store {os.path.abspath(store)}", infos, latest, levels))


def _ls_bucket(store: str) -> None:
    """``ls`` of a store in a bucket: its checkpoints (objects of unfinished drains are none)."""
    from ckptguard import objstore
    from ckptguard.objstore.s3 import Bucket

    url = objstore.parse(store)
    bucket = Bucket(url.bucket)
    scan = objstore.scan(bucket, url)
    for skipped, reason in scan.skipped:
        echo(f"skipped {skipped}: {reason}", err=True)
    if not scan.listed:
        echo(f"no committed checkpoints in {url}")
        return
    name: str | None = None
    try:
        name = objstore.latest_name(bucket, url)
    except CorruptCheckpointError as exc:
        echo(f"warning: {exc}", err=True)
    latest = next((i for i in scan.listed if i.name == name), None)
    if name is not None and latest is None:
        echo(f"warning: LATEST names {name!r}, which is not a committed checkpoint", err=True)
    console().print(_table(f"store {url}", scan.listed, latest))


def _table(
    title: str,
    infos: list[ckptguard.CheckpointInfo],
    latest: ckptguard.CheckpointInfo | None,
    levels: dict[str, str] | None = None,
) -> Table:
    """One row per checkpoint; LATEST marked; ``levels``: a node-local store's protection of
    each (docs/operations.md)."""
    table = Table(title=cell(title), title_justify="left")
    columns: list[tuple[str, JustifyMethod]] = [
        ("name", "left"),
        ("step", "right"),
        ("stored", "right"),
        ("raw", "right"),
        ("tensors", "right"),
        ("created", "left"),
        ("", "left"),
    ]
    if levels is not None:
        columns.insert(-1, ("level", "left"))
    for col, justify in columns:
        table.add_column(col, justify=justify)
    for info in infos:
        mark = "LATEST" if latest is not None and info.name == latest.name else ""
        step = "-" if info.step is None else str(info.step)
        table.add_row(
            *map(
                cell,
                (
                    info.name,
                    step,
                    format_size(info.stored_bytes),
                    format_size(info.raw_bytes),
                    str(info.tensors),
                    when(info.created),
                    *([levels.get(info.name, "local")] if levels is not None else []),
                    mark,
                ),
            )
        )
    return table
