"""Quantized tensors in the object tree without pickle (docs/format.md section 6.2, ``$quantized``):
a quantized tensor is its integer values (``int_repr``), an ordinary tensor of the checkpoint,
and its quantization parameters: per tensor, a scale and a zero point in the tree; per channel,
a scale and a zero-point tensor (ordinary tensors too) and the channel axis.

``split`` takes one apart for ``tree``; ``build`` checks a stored one and rebuilds it exactly
(dtype, qscheme, parameters, integer values) for ``treeload``. Both raise ValueError saying what
is wrong, which the tree's two sides turn into their own errors (the save's names the key path).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .format import dtypes
from .format.entries import MAX_DIMS
from .format.treeids import QUANTIZED_PARTS

MEMBERS = frozenset({"$quantized", "qscheme", "axis", *QUANTIZED_PARTS})
"""The members of a ``$quantized`` value."""
PER_TENSOR = "per_tensor_affine"
PER_CHANNEL = "per_channel_affine"
FLOAT_QPARAMS = "per_channel_affine_float_qparams"
# Per channel: the dtypes of the scale and zero-point tensors, as torch holds them.
_CHANNEL_DTYPES = {
    PER_CHANNEL: (torch.float64, torch.int64),
    FLOAT_QPARAMS: (torch.float32, torch.float32),
}
_QSCHEMES = {
    torch.per_tensor_affine: PER_TENSOR,
    torch.per_channel_affine: PER_CHANNEL,
    torch.per_channel_affine_float_qparams: FLOAT_QPARAMS,
}
QDTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in dtypes.QUANTIZED_NAMES}
"""The quantized dtypes by name (a ``$dtype`` may name any; ``$quantized`` those of
``dtypes.QUANTIZED``)."""
DTYPE_NAMES = {d: n for n, d in QDTYPES.items()}
_INT_DTYPES = {getattr(torch, q): getattr(torch, i) for q, i in dtypes.QUANTIZED.items()}
_I64 = 1 << 63


def split(t: torch.Tensor) -> tuple[dict, list[tuple[str, torch.Tensor]]]:
    """The ``$quantized`` node of quantized tensor ``t`` without its tensor members, and those
    members' tensors by name (ValueError for a dtype or qscheme the format does not store)."""
    name = DTYPE_NAMES.get(t.dtype)
    scheme = _QSCHEMES.get(t.qscheme())
    if name not in dtypes.QUANTIZED or scheme is None:
        raise ValueError(f"quantized tensor of dtype {t.dtype} and qscheme {t.qscheme()}")
    data = t.int_repr()
    if scheme == PER_TENSOR:
        scale, zero_point = t.q_scale(), t.q_zero_point()
        node: dict[str, Any] = {"$quantized": name, "qscheme": scheme, "axis": None}
        node["scale"] = scale if math.isfinite(scale) else {"$float": repr(scale)}
        node["zero_point"] = zero_point
        parts = [("int_repr", data)]
    else:
        scales, zero_points = t.q_per_channel_scales(), t.q_per_channel_zero_points()
        node = {"$quantized": name, "qscheme": scheme, "axis": t.q_per_channel_axis()}
        parts = [("int_repr", data), ("scale", scales), ("zero_point", zero_points)]
        check_channels(scheme, node["axis"], data, scales, zero_points)
    return node, parts


def check_channels(scheme: str, axis: Any, data: Any, scale: Any, zero_point: Any) -> None:
    """ValueError unless a per-channel value's parts agree: ``axis`` a dimension of ``data``,
    ``scale`` and ``zero_point`` one-dimensional of its length, of the qscheme's dtypes."""
    want = _CHANNEL_DTYPES[scheme]
    if type(axis) is not int or not 0 <= axis < data.dim():
        raise ValueError(f"{scheme} axis {axis!r} is not a dimension of its {data.dim()}")
    for part, t, dtype in (("scale", scale, want[0]), ("zero_point", zero_point, want[1])):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.layout != torch.strided:
            raise ValueError(f"{scheme} {part} is not a dense torch {dtype} tensor")
        if tuple(t.shape) != (data.shape[axis],):
            raise ValueError(
                f"{scheme} {part} has shape {tuple(t.shape)}, not the {data.shape[axis]} "
                f"channels of axis {axis}"
            )


def build(v: Any, node: dict, value: Callable[[Any], Any], check_only: bool) -> Any:
    """The quantized tensor of a stored ``$quantized`` node (``value``: a stored value built, a
    tensor reference's tensor); with ``check_only`` its structure only, and None."""
    scheme, axis = node["qscheme"], node["axis"]
    if v not in dtypes.QUANTIZED or scheme not in (PER_TENSOR, *_CHANNEL_DTYPES):
        raise ValueError(f"$quantized {str(v)[:40]!r} {str(scheme)[:40]!r} is no stored kind")
    refs = [node[p] for p in QUANTIZED_PARTS[: 1 if scheme == PER_TENSOR else 3]]
    if not all(type(r) is dict and set(r) == {"$tensor"} for r in refs):
        raise ValueError(f"$quantized {scheme} has no tensor reference as {QUANTIZED_PARTS}")
    data, *qparams = (value(r) for r in refs)
    if scheme == PER_TENSOR:
        scale, zero_point = value(node["scale"]), node["zero_point"]
        if type(scale) is not float or type(zero_point) is not int or axis is not None:
            raise ValueError("$quantized per tensor: scale not a float, zero point not an int")
        if not -_I64 <= zero_point < _I64:
            raise ValueError("$quantized zero point outside int64")
    elif type(axis) is not int or not 0 <= axis < MAX_DIMS:
        raise ValueError(f"$quantized {scheme} axis is not an integer in [0, {MAX_DIMS})")
    if check_only:
        return None
    if not isinstance(data, torch.Tensor) or data.dtype != _INT_DTYPES[QDTYPES[v]]:
        raise ValueError(f"$quantized {v} int_repr is not a torch {_INT_DTYPES[QDTYPES[v]]}")
    if data.layout != torch.strided:
        raise ValueError(f"$quantized {v} int_repr is not a dense tensor")
    try:
        if scheme == PER_TENSOR:
            return torch._make_per_tensor_quantized_tensor(data, scale, zero_point)
        scales, zero_points = qparams
        check_channels(scheme, axis, data, scales, zero_points)
        return torch._make_per_channel_quantized_tensor(data, scales, zero_points, axis)
    except RuntimeError as e:  # e.g. a device without quantized tensors
        raise ValueError(f"torch cannot build the quantized tensor on {data.device}: {e}") from None
