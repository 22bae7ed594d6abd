"""Nested state helpers shared by engines and the runner: flatten, empty copies, comparison."""

from __future__ import annotations

import copy
from typing import Any

import torch


def flatten(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``{"a": {"b": t}, "n": 1}`` -> ``({"a/b": t}, {"n": 1})``: tensors and other leaves."""
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, Any] = {}

    def walk(o: Any, path: str) -> None:
        if isinstance(o, torch.Tensor):
            tensors[path] = o
        elif isinstance(o, dict) and o:
            for k, v in o.items():
                walk(v, f"{path}/{k}" if path else str(k))
        else:
            other[path] = o

    walk(obj, prefix)
    return tensors, other


def empty_like_state(obj: Any) -> Any:
    """The same structure with uninitialised tensors of the same dtype, shape and device."""
    if isinstance(obj, torch.Tensor):
        return torch.empty_like(obj)
    if isinstance(obj, dict):
        return {k: empty_like_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [empty_like_state(v) for v in obj]
    return copy.deepcopy(obj)


def compare(expected: Any, got: Any) -> tuple[bool, str]:
    """Bit-exact comparison of every tensor of ``expected`` with the same path in ``got``."""
    want, _ = flatten(expected)
    have, _ = flatten(got)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        return False, f"keys differ: missing {missing[:3]}, extra {extra[:3]}"
    devices = 0
    for key, a in want.items():
        b = have[key]
        if b.dtype != a.dtype or tuple(b.shape) != tuple(a.shape):
            return False, f"{key}: {b.dtype}{tuple(b.shape)} != {a.dtype}{tuple(a.shape)}"
        if b.device != a.device:
            devices += 1
            b = b.to(a.device)
        if not torch.equal(a, b):
            return False, f"{key}: values differ"
    if devices:
        return True, f"values equal; {devices} tensors restored on another device"
    return True, "bit-exact"
