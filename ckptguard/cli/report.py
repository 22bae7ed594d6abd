"""``ckptguard report STORE --out DIR``: the store's metrics and event series as report.json and
one self-contained page, report.html (docs/operations.md, "The report")."""

from __future__ import annotations

import os

import click

from ._args import parse_duration
from ._output import echo


@click.command("report")
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--json-only", is_flag=True, help="Write report.json only.")
@click.option("--window", help="Only the events of this last duration (e.g. 7d); default all.")
def command(store: str, out: str, json_only: bool, window: str | None) -> None:
    """Write DIR/report.json and DIR/report.html for STORE.

    The page needs no network and runs no script: plots are inline SVG.
    """
    from ckptguard import reporthtml

    win = float(parse_duration(window)) if window else None
    data = reporthtml.write(store, out, json_only=json_only, window=win)
    seed = data["metrics"]["seed"]
    for name in ("report.json", *(() if json_only else ("report.html",))):
        echo(os.path.join(os.path.abspath(out), name))
    for key, v in seed.items():
        echo(f"{key}: {'-' if v['value'] is None else format(v['value'], '.6g')}")
