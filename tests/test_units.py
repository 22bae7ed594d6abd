"""Byte sizes in and out (ckptguard/units.py): the one parser of size options and the one
formatter the CLI, the demo and the benchmark reports print sizes with."""

from __future__ import annotations

import pytest

from ckptguard.units import format_size, parse_size


def test_parse_and_format_sizes() -> None:
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("64MiB") == 64 << 20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("12 parsecs")
    assert format_size(1 << 30, places=2) == "1.00 GiB"
    assert format_size(None) == "-"


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (3 << 20, "3.0 MiB"),
        (1 << 30, "1.0 GiB"),
        (5 << 40, "5.0 TiB"),
        (3 << 50, "3072.0 TiB"),  # TiB is the largest unit
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_size_picks_the_largest_unit_at_or_above_one(n: int, text: str) -> None:
    assert format_size(n) == text


def test_format_size_places_apply_to_units_not_to_bytes() -> None:
    assert format_size(1000, places=2) == "1000 B"
    assert format_size(1536, places=2) == "1.50 KiB"
    assert format_size(1536, places=0) == "2 KiB"
