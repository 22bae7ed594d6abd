"""``ckptguard metrics STORE``: a store's operations metrics (docs/operations.md, "Metrics:
definitions") as JSON, as a Prometheus textfile, or served to Prometheus over HTTP."""

from __future__ import annotations

import json
import time

import click

from ._args import parse_duration
from ._output import echo


@click.command("metrics")
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option(
    "--textfile",
    type=click.Path(dir_okay=False),
    help="Write the Prometheus text format to this file (node_exporter's textfile collector: "
    "e.g. /var/lib/node_exporter/textfile/ckptguard.prom), whole: a temporary renamed over it.",
)
@click.option("--serve", "port", type=click.IntRange(0, 65535), help="Serve /metrics on PORT.")
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address --serve binds.")
@click.option(
    "--cache",
    default=5.0,
    show_default=True,
    type=float,
    help="--serve: seconds a result is reused.",
)
@click.option("--window", help="Only the events of this last duration (e.g. 7d); default all.")
def command(
    store: str,
    as_json: bool,
    textfile: str | None,
    port: int | None,
    bind: str,
    cache: float,
    window: str | None,
) -> None:
    """The metrics of STORE from its events, listing and audit log.

    Without an option, prints the Prometheus text format. --serve keeps running until
    interrupted, computing the metrics again on a scrape at most every --cache seconds.
    """
    from ckptguard import metrics, promexport

    win = float(parse_duration(window)) if window else None
    if port is not None:
        server, stop = promexport.serve(store, port, bind, cache_s=cache, window=win)
        echo(f"serving {store}'s metrics on http://{bind}:{server.server_port}/metrics")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            stop()
        return
    m = metrics.compute(store, window=win)
    if textfile is not None:
        promexport.write_textfile(m, textfile)
    if as_json:
        echo(json.dumps(m, allow_nan=False))  # one line: JSON escapes every control
    elif textfile is None:
        echo(*promexport.render(m).decode().splitlines())
