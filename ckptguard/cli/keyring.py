"""``ckptguard keyring list|create|rotate``: a store's keyring of encryption keys
(docs/operations.md, "Keys and shredding"). The key-encryption key (KEK) comes from --kek-file
or the environment (CKPTGUARD_KEK_FILE, CKPTGUARD_KEK or CKPTGUARD_KEK_COMMAND)."""

from __future__ import annotations

import json

import click

from ._args import require_dir
from ._output import echo

_KEK_FILE = click.option(
    "--kek-file", default=None, help="The KEK's key file (else the environment's KEK)."
)


@click.group("keyring")
def command() -> None:
    """A store's keyring: the data keys of its encryption scopes, wrapped under a KEK."""


@command.command("list")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(store: str, as_json: bool) -> None:
    """The scopes of STORE's keyring: key id, KEK id and creation, or when and why shredded.
    Keys are never shown."""
    from ckptguard import keyring

    rows = keyring.entries(require_dir(store, "store"))
    if as_json:
        keys = ("scope", "sid", "key_id", "kek_id", "created", "shredded", "reason", "problem")
        echo(json.dumps([{k: getattr(e, k) for k in keys} for e in rows]))
        return
    for e in rows:
        if e.problem:
            echo(f"{e.sid}  damaged: {e.problem}")
        elif e.live:
            echo(f"{e.scope}  key {e.key_id}  kek {e.kek_id}  created {e.created}")
        else:
            why = f": {e.reason}" if e.reason else ""
            echo(f"{e.scope}  key {e.key_id}  shredded {e.shredded} by {e.user}@{e.host}{why}")
    echo(f"{len(rows)} scope{'s' if len(rows) != 1 else ''}")


@command.command("create")
@click.argument("store")
@click.argument("scope")
@_KEK_FILE
def create(store: str, scope: str, kek_file: str | None) -> None:
    """Create the data key of SCOPE in STORE (saves create it on first use); print its id."""
    from ckptguard import keyring

    key = keyring.obtain(require_dir(store, "store"), scope, keyring.resolve_kek(kek_file))
    echo(key.key_id)


@command.command("rotate")
@click.argument("store")
@click.option("--new-kek-file", required=True, help="The new KEK's key file.")
@_KEK_FILE
def rotate(store: str, new_kek_file: str, kek_file: str | None) -> None:
    """Re-wrap every data key of STORE under the KEK of --new-kek-file (data is not
    rewritten). Run it again after an interruption: keys already under the new KEK are
    skipped. Afterwards, destroy the old KEK once no backup of the keyring needs it."""
    from ckptguard import keyring

    old, new = keyring.resolve_kek(kek_file), keyring.Kek.from_file(new_kek_file)
    done, already = keyring.rotate(require_dir(store, "store"), old, new)
    echo(f"re-wrapped {done} key(s) under KEK {new.kek_id} ({already} already were)")
