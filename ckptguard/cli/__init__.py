"""The ``ckptguard`` command: inspect, verify, restore, export and tidy a store of checkpoints.

Exit codes: 0 success; 1 a check failed (``verify`` found problems, ``latest`` found none);
2 an error (bad path, corrupt manifest, bad arguments), printed as one ``error: ...`` line.
``run`` exits with its trainer's status, or 85/86 after a checkpoint request (docs/agent.md).

One module per command, each defining a click command named ``command``; this module is the
group that registers them and turns ckptguard's errors into exit codes. To add a command, write
``cli/<name>.py`` (``<name>_.py`` for a Python keyword) and add it to ``_COMMANDS``. Everything a
command prints goes through ``_output`` (``echo``, ``fail``, ``cell``), which escapes control
characters with ``terminal_safe``, so that nothing read from a checkpoint can move the cursor,
clear the screen or reorder what the operator sees. Command modules import torch and the heavy
parts of ckptguard inside the command, so that ``ckptguard --help`` stays quick.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import click

import ckptguard
from ckptguard import CheckpointError

from . import (
    advise,
    audit,
    delete,
    demo,
    doctor,
    drain,
    drill,
    export,
    gc,
    hold,
    import_,
    info,
    key,
    keyring,
    latest,
    ls,
    metrics,
    mlflow,
    prune,
    release,
    report,
    restore,
    run,
    shred,
    validate,
    verify,
)
from ._output import CheckFailed, fail, terminal_safe

__all__ = ["cli", "main", "terminal_safe"]

_COMMANDS = (
    ls,
    info,
    verify,
    latest,
    gc,
    delete,
    prune,
    hold,
    release,
    shred,
    restore,
    import_,
    export,
    demo,
    run,
    doctor,
    drain,
    key,
    keyring,
    audit,
    mlflow,
    advise,
    metrics,
    report,
    drill,
    validate,
)


class _CkptGroup(click.Group):
    """Turns ckptguard errors into one ``error:`` line and registers ``bench`` lazily."""

    _lazy = {"bench": "ckptguard.bench.cli"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self._lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self._lazy:
            return super().get_command(ctx, name)
        try:
            return getattr(importlib.import_module(self._lazy[name]), name)
        except Exception as exc:  # an optional part: report it only when it is used
            return _unavailable(name, exc)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except CheckpointError as exc:
            fail(str(exc))
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            fail(f"{exc.strerror or exc}{where}")
        except CheckFailed:
            raise click.exceptions.Exit(1) from None


def _unavailable(name: str, exc: Exception) -> click.Command:
    """A stand-in for optional command ``name`` that could not be imported: says why."""
    why = f"{type(exc).__name__}: {exc}"

    @click.command(
        name, help=f"(unavailable: {why})", context_settings={"ignore_unknown_options": True}
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def stub(args: Sequence[str]) -> None:
        fail(f"'ckptguard {name}' is unavailable: {why}")

    return stub


@click.group(cls=_CkptGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(ckptguard.__version__, prog_name="ckptguard")
def cli() -> None:
    """Atomic, verified checkpoints for PyTorch training.

    Exit codes: 0 success, 1 a check failed, 2 an error (one 'error: ...' line on stderr).
    """


for _module in _COMMANDS:
    cli.add_command(_module.command)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="ckptguard")


if __name__ == "__main__":
    main(sys.argv[1:])
