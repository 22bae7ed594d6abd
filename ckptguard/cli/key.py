"""``ckptguard key generate --out PREFIX``: an Ed25519 key pair for signing (the audit log's
tree heads): PREFIX.key (private, 0600) and PREFIX.pub (public), never replacing a file."""

from __future__ import annotations

import click

from ._output import echo


@click.group("key")
def command() -> None:
    """Signing keys (Ed25519)."""


@command.command("generate")
@click.option(
    "--out",
    "prefix",
    required=True,
    help="Write PREFIX.key (private, mode 0600) and PREFIX.pub (public); neither may exist.",
)
def generate(prefix: str) -> None:
    """Create an Ed25519 key pair; print its key id (SHA-256 of the raw public key)."""
    from ckptguard import keys

    priv, pub, kid = keys.generate(prefix)
    echo(f"private key {priv} (mode 0600: keep it off the store)", f"public key  {pub}")
    echo(f"key id      {kid}")
