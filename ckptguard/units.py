"""Byte sizes in and out: ``1GiB`` -> 1073741824 for options, 1073741824 -> ``1.0 GiB`` for
people. The CLI, the demo and the benchmark reports all print sizes through ``format_size``."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

GB = 1e9  # rates are reported in GB/s (10^9 bytes per second), sizes in binary units


def parse_size(text: str | int) -> int:
    """``64MiB``, ``1GiB``, ``1.5GB``, ``4096`` -> bytes (binary units for *iB, decimal else)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size like 64MiB, 1GiB or 4096")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float | None, places: int = 1) -> str:
    """``n`` bytes in the largest binary unit that keeps it at or above 1 (up to TiB), with
    ``places`` decimals: ``512 B``, ``1.5 KiB``, ``1.0 GiB``; None (not measured) is ``-``.

    Whole bytes are never given decimals. The benchmark reports ask for two places, so that
    close measurements stay apart; the CLI and the demo print one.
    """
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.{places}f} {unit}"
        n /= 1024
    return f"{n:.{places}f} TiB"
