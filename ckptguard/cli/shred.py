"""``ckptguard shred STORE SCOPE [--reason TEXT] --yes``: destroy an encryption scope's data key
in STORE and in every store holding a copy of it (crypto-shredding; docs/security.md)."""

from __future__ import annotations

import click

from ._args import require_dir
from ._output import echo, fail


@click.command("shred")
@click.argument("store")
@click.argument("scope")
@click.option("--reason", default="", help="Why (kept in the tombstone and the audit log).")
@click.option("--yes", is_flag=True, help="Confirm: the scope's data is unreadable for good.")
def command(store: str, scope: str, reason: str, yes: bool) -> None:
    """Destroy the data key of SCOPE in STORE and every store its keyring copies reach: every
    chunk saved under SCOPE becomes unreadable for good; other scopes still load. Refused if a
    held checkpoint uses SCOPE. A store that cannot be reached is named: run it again.
    """
    from ckptguard import keyring

    require_dir(store, "store")
    try:
        keyring.check_scope(scope)
    except ValueError as e:
        fail(str(e))
    if not yes:
        fail(
            f"this destroys the data key of scope {scope!r} in {store} and in every store "
            "holding a copy of it: everything saved under that scope becomes unreadable, "
            "irreversibly; add --yes to do it"
        )
    for s in keyring.shred(store, scope, reason):
        echo(f"shredded {scope!r} in {s}")
