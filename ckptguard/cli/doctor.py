"""``ckptguard doctor``: which codec path is active and why (docs/native.md)."""

from __future__ import annotations

import click

from ._output import echo


@click.command("doctor")
def command() -> None:
    """Say which codec path is active (native or pure Python) and why, with threads and libs."""
    from ckptguard import backend

    info = backend.info()
    echo(f"codec path: {info['backend']}")
    echo(f"reason:     {info['reason']}")
    echo(f"threads:    {info['threads']} (CPUs usable: {info['cpus']})")
    echo(f"O_DIRECT:   {info['o_direct']} (CKPTGUARD_ODIRECT; auto: chosen during each save)")
    libraries = info.get("libraries")  # absent on the pure-Python path
    if isinstance(libraries, dict):
        for name, version in sorted(libraries.items()):
            echo(f"native {name}: {version}")
    echo(f"python lz4: {info['python_lz4']}")
    echo(f"python zstd: {info['python_zstd']}")
