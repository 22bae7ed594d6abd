"""The non-tensor values of a DCP save (DCP's "bytes" items: a learning rate, a step, a list of
parameter names), stored in the object tree without pickle where they can be.

DCP's default planner hands a storage writer ``torch.save(value)``: a pickle. The writer asks
the planner for the value itself instead and stores it as a plain tree value (format.md section
6) when it is one: JSON scalars, lists, tuples, bytes, dtypes, sets, registered dataclasses,
and the like, with no tensor inside. What is not (an object of an unregistered class, a value
holding tensors or arrays, any value under a planner that transforms what it writes) is stored
as the bytes DCP handed over, in a ``Pickled``: ckptguard never unpickles them; DCP's reader
does, with full pickle, at ``dcp.load``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError, RegisteredTypeError
from ..tree import flatten
from ..treeload import TreeError, unflatten
from ..treetypes import register_types
from .nesting import is_container


@dataclass(frozen=True, repr=False)
class Pickled:
    """A value of a DCP save kept as the bytes DCP's planner made of it (``torch.save``'s
    pickle): ``ckptguard.load`` gives this object back and never unpickles ``data``; DCP's
    reader unpickles it at ``dcp.load`` (full pickle: load only checkpoints you trust)."""

    data: bytes

    def __repr__(self) -> str:
        return f"Pickled(<{len(self.data)} bytes of DCP's pickle>)"


register_types(Pickled)


def _no_tensor(node: Any) -> bool:
    return False


def plain_node(value: Any) -> tuple[bool, Any]:
    """(True, the tree node of ``value``) if it is a plain value that is a leaf of the tree (no
    tensor, array or pickle inside, not an object stored through its ``state_dict``); else
    (False, None)."""
    try:
        node, refs, used_pickle = flatten(value, allow_pickle=False, stateful=False)
    except (CheckpointError, TypeError, ValueError, RecursionError):
        return False, None
    if refs or used_pickle or is_container(node, _no_tensor):
        return False, None
    return True, node


def pickled_node(data: bytes) -> Any:
    """The tree node of DCP's own bytes for a value (a ``Pickled``)."""
    return flatten(Pickled(bytes(data)))[0]


def value_bytes(
    node: Any, tensors: list[Any], types: bool, error: Callable[[str], Exception]
) -> io.BytesIO:
    """What DCP's ``load_bytes`` takes for a leaf of the tree: the bytes of a ``Pickled`` as
    they were handed over, any other value ``torch.save``d (the value was stored without
    pickle; this pickle is made here, of it). ``tensors``: the loaded tensors the node
    references, by id; ``types``: the checkpoint lists ``tree-types``. A node that cannot be
    rebuilt (a pickled leaf of ``ckptguard.save(allow_pickle=True)``) raises ``error(why)``."""
    try:
        value = unflatten(node, tensors, allow_pickle=False, types=types)
    except (TreeError, RegisteredTypeError, CheckpointError) as e:
        raise error(str(e)) from None
    if isinstance(value, Pickled):
        return io.BytesIO(value.data)
    buf = io.BytesIO()
    torch.save(value, buf)
    buf.seek(0)
    return buf
