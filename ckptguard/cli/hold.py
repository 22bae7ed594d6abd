"""``ckptguard hold STORE NAME [--reason TEXT] [--immutable]``: place a legal hold on a
checkpoint; ``ckptguard hold STORE --list``: the store's holds, stale ones included."""

from __future__ import annotations

import json

import click

import ckptguard

from ._args import require_dir
from ._output import echo, fail


@click.command("hold")
@click.argument("store")
@click.argument("name", required=False)
@click.option("--reason", default="", help="Why it is held (kept in the hold and the audit log).")
@click.option(
    "--immutable",
    is_flag=True,
    help="Also set the immutable attribute (needs CAP_LINUX_IMMUTABLE; else a warning).",
)
@click.option("--list", "as_list", is_flag=True, help="List the holds of STORE.")
@click.option("--json", "as_json", is_flag=True, help="With --list: print JSON.")
def command(
    store: str, name: str | None, reason: str, immutable: bool, as_list: bool, as_json: bool
) -> None:
    """Hold checkpoint NAME of STORE: until `ckptguard release`, delete, prune and overwrite
    refuse it (prune keeps it). --list shows every hold; a stale one (its checkpoint gone or
    replaced) or one whose marker cannot be read is marked so, and can be released.
    """
    st = ckptguard.Store(require_dir(store, "store"))
    if as_list:
        if name is not None:
            fail("--list takes no NAME")
        _list(st, as_json)
        return
    if name is None:
        fail("give the NAME of the checkpoint to hold (or --list)")
    hold = st.hold(name, reason, immutable=immutable)
    echo(f"held {name} (uuid {hold.uuid}){': ' + reason if reason else ''}")


def _list(st: ckptguard.Store, as_json: bool) -> None:
    uuids = {i.name: i.uuid for i in st.list()}
    rows = []
    for name, hold, problem in st.holds():
        if hold is None:
            state = f"unreadable: {problem}"
        elif uuids.get(name) is None:
            state = "stale: the checkpoint is gone"
        elif uuids[name] != hold.uuid:
            state = "stale: the checkpoint was replaced"
        else:
            state = "held"
        rows.append((name, hold, state))
    if as_json:
        doc = [
            {"name": n, "state": s, **({} if h is None else {k: getattr(h, k) for k in _KEYS})}
            for n, h, s in rows
        ]
        echo(json.dumps(doc))
        return
    for n, h, s in rows:
        who = "" if h is None else f"  since {h.created} by {h.user}@{h.host}  {h.reason}"
        echo(f"{n}  {s}{who}")
    echo(f"{len(rows)} hold{'s' if len(rows) != 1 else ''}")


_KEYS = ("uuid", "reason", "created", "user", "host", "immutable")
