"""``ckptguard info CKPT``: a checkpoint's header and its per-tensor table."""

from __future__ import annotations

import json
import os
from collections import Counter

import click
from rich.console import JustifyMethod
from rich.table import Table

import ckptguard
from ckptguard.units import format_size

from ._args import require_checkpoint
from ._output import cell, console, ratio, when


@click.command("info")
@click.argument("ckpt")
def command(ckpt: str) -> None:
    """Show a checkpoint's header and per-tensor table.

    CKPT is a checkpoint directory, a one-file checkpoint, or a store (meaning its LATEST).
    """
    desc = ckptguard.describe(require_checkpoint(ckpt, "checkpoint"))
    info = desc.info
    con = console()
    facts = [
        ("name", info.name),
        ("path", info.path),
        ("uuid", info.uuid),
        ("step", "-" if info.step is None else str(info.step)),
        ("created", when(info.created)),
        ("world size", str(info.world_size)),
        ("files", str(info.files)),
        ("tensors", str(info.tensors)),
        ("chunks", str(info.chunks)),
        (
            "size",
            f"{format_size(info.stored_bytes)} stored, {format_size(info.raw_bytes)} raw "
            f"({ratio(info.raw_bytes, info.stored_bytes)})",
        ),
    ]
    if info.base is not None:  # an incremental checkpoint (format.md section 4.3)
        facts.append(("base", f"{info.base} (depth {info.depth})"))
    scopes = Counter(t.scope for t in desc.tensors if t.scope is not None)
    if scopes:  # an encrypted checkpoint (format.md section 4.4)
        sealed = ", ".join(f"{s} ({n} tensors)" for s, n in sorted(scopes.items()))
        facts.append(("encrypted", sealed))
    held = _hold(info.path, info.uuid)
    if held:
        facts.append(("held", held))
    if info.metadata is not None:
        facts.append(("metadata", json.dumps(info.metadata, sort_keys=True)[:300]))
    for name, value in facts:
        con.print(f"[bold]{name:>10}[/]  {cell(value)}", highlight=False, soft_wrap=True)
    con.print(_tensor_table(desc))


def _hold(path: str, uuid: str) -> str | None:
    """What holds the checkpoint directory ``path`` in its store (``ckptguard hold``), if
    anything: the hold's description, or why its marker cannot be read (which counts as held)."""
    from ckptguard import holds
    from ckptguard.errors import CheckpointError

    if not os.path.isdir(path):
        return None  # a one-file checkpoint has no store
    store, name = os.path.split(path)
    try:
        hold = holds.read(store, name)
    except CheckpointError as e:
        return f"(the marker cannot be read: {e})"
    if hold is None:
        return None
    stale = "" if hold.uuid == uuid else " (stale: it names another checkpoint of this name)"
    return hold.describe() + stale


def _tensor_table(desc: ckptguard.CheckpointDescription) -> Table:
    """One row per tensor (sizes, ratio, chunks, codecs) and a footer of totals."""
    table = Table(show_footer=True)
    cols = ["key", "dtype", "shape", "raw", "stored", "ratio", "chunks", "codecs"]
    raw = sum(t.raw_bytes for t in desc.tensors)
    stored = sum(t.stored_bytes for t in desc.tensors)
    chunks = sum(t.chunks for t in desc.tensors)
    foot = [
        f"{len(desc.tensors)} tensors",
        "",
        "",
        format_size(raw),
        format_size(stored),
        ratio(raw, stored),
        str(chunks),
        "",
    ]
    for col, footer in zip(cols, foot, strict=True):
        justify: JustifyMethod = "left" if col in ("key", "codecs") else "right"
        table.add_column(col, footer=footer, justify=justify)
    for t in desc.tensors:
        codecs = ", ".join(f"{c} x{n}" for c, n in sorted(t.codecs.items()))
        if t.scope is not None:
            codecs += f", sealed ({t.scope})"
        table.add_row(
            *map(
                cell,
                (
                    t.key,
                    t.dtype,
                    str(list(t.shape)),
                    format_size(t.raw_bytes),
                    format_size(t.stored_bytes),
                    ratio(t.raw_bytes, t.stored_bytes),
                    str(t.chunks),
                    codecs,
                ),
            )
        )
    return table
