"""Checks and parsers for command arguments shared by several commands."""

from __future__ import annotations

import os
import re

import click

import ckptguard
from ckptguard.format.layout import looks_like_checkpoint


def require_dir(path: str, what: str) -> str:
    """``path`` if it is a directory; else a StoreError naming it as the ``what`` expected."""
    if not os.path.isdir(path):
        raise ckptguard.StoreError(f"no such {what}: {path}", path=path)
    return path


def is_checkpoint_dir(path: str) -> bool:
    """Whether directory ``path`` is one checkpoint (rather than a store of them)."""
    return looks_like_checkpoint(os.listdir(path))


def is_one_file(path: str) -> bool:
    """Whether ``path`` is there but not a directory: a one-file checkpoint, or something else
    that the reader then names (a link, a FIFO, a file of another kind)."""
    return os.path.lexists(path) and not os.path.isdir(path)


def require_checkpoint(path: str, what: str) -> str:
    """``path`` if it is a directory or a one-file checkpoint (``is_one_file``); else a
    StoreError naming it as the ``what`` expected."""
    return path if is_one_file(path) else require_dir(path, what)


def is_one_checkpoint(path: str) -> bool:
    """Whether ``path`` (``require_checkpoint``'s) is one checkpoint rather than a store."""
    return is_one_file(path) or is_checkpoint_dir(path)


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1h``, ``2d`` (or ``1h30m``) as seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise click.BadParameter(f"{text!r} is not a duration like 0, 90s, 30m, 1h or 2d")
    return sum(float(n) * units[u] for n, u in parts)
