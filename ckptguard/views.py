"""Which saved tensors are views of one storage, and the bytes that storage keeps (the save side
of docs/format.md section 3.2; ``place.view_of`` builds the views back).

torch tensors that share memory (a weight and its transpose, slices of a fused weight, tied
weights reached through views) and tensors that are not contiguous (transposed, strided,
expanded, channels_last) are grouped by the storage they live in. A group keeps the span of
that storage its members reach, ``[lo, hi)`` bytes with ``lo`` rounded down to the largest
element size among them: never more than the storage (which is what torch.save writes) and as
little as the members need. A member that is contiguous and covers the span exactly is the
group's storage itself; otherwise a new 1-D tensor holds the span. Every other member becomes a
view: an element offset into the span and its own strides.

numpy arrays keep what numpy's pickle (and so torch.save) keeps: Fortran order, as a view of
its bytes in memory order; any other array is stored in C order and shares with nothing.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .format.views import MAX_STEP

STORAGE_SUFFIX = "%storage"
"""A new storage's key is its first member's followed by this: a key path never holds a "%"
that is not "%25" or "%2F" (format.md section 6), so it names no tensor of the tree."""


@dataclass(frozen=True)
class View:
    """How a saved tensor reads its values from a storage (the manifest's ``view`` member):
    ``storage``, the key of the tensor that holds the bytes; an element offset and strides."""

    storage: str
    offset: int
    stride: tuple[int, ...]

    def to_json(self) -> dict:
        """The ``view`` member with the storage named by key (the plan turns it into an id)."""
        return {"storage": self.storage, "offset": self.offset, "stride": list(self.stride)}


@dataclass
class Group:
    """Tensors of one storage (``members``: their positions in ``_group``'s list): ``base`` is
    the member that holds the span, or None when ``storage`` (a new 1-D tensor of the span)
    does; ``views`` maps each other member to its (element offset, element strides) in it."""

    members: list[int]
    base: int | None
    storage: Any
    views: dict[int, tuple[int, tuple[int, ...]]]


class Storages:
    """What the tree's walk notes of the tensors it finds (``note``; Fortran-ordered arrays in
    ``fortran``), so that ``assign`` looks only at the tensors that need a view: the walk's
    cost per tensor is one dictionary step and one contiguity check."""

    def __init__(self) -> None:
        self.first: dict[Hashable, int] = {}  # each storage's first tensor
        self.groups: dict[Hashable, list[int]] = {}  # storages of several, or of one strided
        self.fortran: list[int] = []

    def note(self, storage: Hashable, i: int, t: torch.Tensor) -> None:
        """Tensor ``i`` of the walk (with elements, no lazy conjugate or negative bit) lives in
        ``storage`` (its device and address)."""
        first = self.first.setdefault(storage, i)
        if first != i:
            self.groups.setdefault(storage, [first]).append(i)
        elif not t.is_contiguous():
            self.groups[storage] = [i]

    def assign(self, refs: Sequence[Any]) -> list[tuple[str, Any, Any]]:
        """Set ``view`` on each ref (``tree.TensorRef``) that is saved as a view, and return
        the new storages to add as (key, value, the member whose kind and device it has). Only
        tensors the tree holds directly take part: a Shard's, DTensor's or PerRank's piece is a
        piece of a global tensor, stored in C order as it is loaded into any layout."""
        out: list[tuple[str, Any, Any]] = []
        for found in self.groups.values():
            members = [i for i in found if _groupable(refs[i])]
            if not members or len(members) == 1 and refs[members[0]].value.is_contiguous():
                continue
            g = _group([refs[i].value for i in members])
            first = refs[members[0]]
            if g.base is None:
                key = first.key + STORAGE_SUFFIX
                out.append((key, g.storage, first))
            else:
                key = refs[members[g.base]].key
            for m, (offset, stride) in g.views.items():
                refs[members[m]].view = View(key, offset, stride)
        for r in (refs[i] for i in self.fortran):
            fortran = fortran_storage(r.value) if r.outer is r.value else None
            if fortran is not None:
                key = r.key + STORAGE_SUFFIX
                out.append((key, fortran[0], r))
                r.view = View(key, 0, fortran[1])
        return out


def _groupable(r: Any) -> bool:
    return r.outer is r.value and not r.sharded and not r.per_rank and bool(r.value.numel())


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` of its storage a non-empty tensor reaches."""
    size, at = t.element_size(), int(t.storage_offset())
    last = sum((int(n) - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return at * size, (at + last + 1) * size


def _group(tensors: Sequence[torch.Tensor]) -> Group:
    """The group of ``tensors``, all in one storage: its span, its storage, its views."""
    extents = [_extent(t) for t in tensors]
    widest = max(t.element_size() for t in tensors)
    lo = min(a for a, _ in extents) // widest * widest
    hi = max(b for _, b in extents)
    members = range(len(tensors))
    base = next((i for i in members if extents[i] == (lo, hi) and tensors[i].is_contiguous()), None)
    storage = None
    if base is None:
        first = tensors[0]
        dtype = first.dtype if len({t.dtype for t in tensors}) == 1 else torch.uint8
        size = torch.empty(0, dtype=dtype).element_size()
        storage = torch.empty(0, dtype=dtype, device=first.device)
        with torch.no_grad():
            storage.set_(first.untyped_storage(), lo // size, ((hi - lo) // size,), (1,))
    views = {
        i: ((extents[i][0] - lo) // tensors[i].element_size(), tuple(tensors[i].stride()))
        for i in members
        if i != base
    }
    return Group(list(members), base, storage, views)


def fortran_storage(a: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """A Fortran-ordered array (F-contiguous, not C-contiguous, with elements) as (its bytes in
    memory order as a 1-D array, its element strides); None for any other array."""
    if not a.size or a.flags.c_contiguous or not a.flags.f_contiguous:
        return None
    strides, step = [], 1
    for n in a.shape:  # Fortran strides (a length-1 dimension's own stride is any number)
        strides.append(step)
        step *= n
    if step > MAX_STEP:
        return None
    return a.reshape(-1, order="F"), tuple(strides)
