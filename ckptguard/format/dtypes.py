"""The element types of format v1 (docs/format.md section 5) and their sizes."""

from __future__ import annotations

SIZES: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
}


def elem_size(dtype: str) -> int | None:
    """Element size in bytes, or None for a dtype the format does not know."""
    return SIZES.get(dtype)


QUANTIZED: dict[str, str] = {"quint8": "uint8", "qint8": "int8", "qint32": "int32"}
"""The quantized dtypes a tree's ``$quantized`` holds (section 6.2), each with the dtype of its
integer values (``int_repr``)."""
QUANTIZED_NAMES = (*QUANTIZED, "quint4x2", "quint2x4")
"""The quantized dtypes a tree's ``$dtype`` may name (feature ``tree-types``)."""
