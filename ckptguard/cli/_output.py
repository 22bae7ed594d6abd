"""What every command prints with: escaped lines, table cells, the rich console, and the two ways
a command ends early (``fail`` for an error, ``CheckFailed`` for a check that did not pass).

Names, keys, paths and messages come from checkpoints and stores that may be hostile: every line a
command prints goes out through ``echo``, ``fail`` or ``cell`` (rich tables and status lines),
which escape control characters with ``terminal_safe``.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import NoReturn

import click
from rich.console import Console
from rich.markup import escape

# C0 controls, DEL, C1 controls, and the Unicode format characters that reorder or break lines:
# bidi marks, embeddings, overrides and isolates, and the line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def terminal_safe(text: object) -> str:
    """``str(text)`` with each control or reordering character written as a visible escape
    (``\\x1b``, ``\\u202e``): what the CLI prints can never drive the terminal."""
    return _UNSAFE.sub(
        lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}",
        str(text),
    )


def echo(*lines: object, err: bool = False) -> None:
    """Print ``lines`` (each escaped whole, so a newline inside one is shown, not obeyed)."""
    click.echo("\n".join(terminal_safe(line) for line in lines), err=err)


def cell(text: object) -> str:
    """``text`` for rich (a table cell, a title, a status): escaped, and never markup."""
    return escape(terminal_safe(text))


class CheckFailed(Exception):
    """Raised by a command that already printed why its check failed; the CLI exits 1."""


def fail(message: str) -> NoReturn:
    """Print one ``error: message`` line on stderr and exit 2."""
    echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(2)


def console() -> Console:
    """Rich console on stdout; wide when piped so tables are not folded."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=max(probe.width, 200))


def ratio(raw: int, stored: int) -> str:
    """The compression ratio ``raw / stored`` as ``2.00x``; ``-`` when nothing is stored."""
    return f"{raw / stored:.2f}x" if stored else "-"


def when(created: datetime) -> str:
    """A checkpoint's creation time as the CLI shows it (UTC, to the second)."""
    return created.strftime("%Y-%m-%d %H:%M:%S UTC")
