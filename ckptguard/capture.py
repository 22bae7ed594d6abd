"""The capture step of an async save: copy a state's tensors into a reusable host pool.

The state is first flattened (``tree.flatten``: the one tree walk, tensor identity rule and
depth limit of every save); a snapshot is that ``Flat`` with each tensor's value replaced by a
plain host copy in one region of the pool (same dtype and shape, conjugate and negative views
resolved). Torch tensors and numpy arrays are copied, CPU ones too, so the caller may change its
own tensors as soon as the snapshot is complete; other values are already JSON (or pickled) in
the tree.

The snapshot lies in one region of the host pool (``pool.HostPool``). Device-to-host copies run
on a dedicated CUDA stream per device, ordered after the caller's stream, and an event per device
marks the snapshot complete.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from .pool import Region, aligned
from .sources import CopyStreams
from .tree import Flat, TensorRef, flatten


def refs_bytes(refs: list[TensorRef]) -> int:
    """Host bytes a snapshot of these tensors takes in the pool (each 64-byte aligned; a view
    takes none: its storage holds its bytes)."""
    return sum(aligned(_nbytes(r.value)) for r in refs if r.view is None)


def _nbytes(v: Any) -> int:
    return v.nbytes if isinstance(v, np.ndarray) else v.numel() * v.element_size()


def state_bytes(obj: Any) -> int:
    """Host bytes a snapshot of ``obj`` takes in the pool: its tensors as ``flatten`` finds them
    (the same tensor reached twice counted once)."""
    return refs_bytes(flatten(obj, tensors_only=True)[1])


class Snapshot:
    """A state copied into a pool region; ``wait()`` returns once every copy has landed."""

    def __init__(self, state: Any, region: Region | None, events: list) -> None:
        self.state = state
        self.region = region
        self.events = events

    def wait(self) -> None:
        for e in self.events:
            e.synchronize()
        self.events = []


class _HostCopier:
    """Copies tensors and arrays into a region; CUDA copies go on ``streams``' copy streams."""

    def __init__(self, region: Region, streams: CopyStreams) -> None:
        self.region = region
        self.streams = streams

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A plain host copy of ``t``'s values (conjugate and negative bits resolved by copy_)."""
        src = t.detach()
        dst = self.region.take(src.numel() * src.element_size())
        dst = (
            dst.view(src.dtype).view(src.shape)
            if src.numel()
            else torch.empty(src.shape, dtype=src.dtype)
        )
        if src.device.type == "cuda" and src.numel():
            with torch.cuda.stream(self.streams.get(src.device)):
                dst.copy_(src, non_blocking=True)
        elif src.numel():
            if src.device.type != "cpu":
                src = src.cpu()
            dst.copy_(src)
        return dst

    def array(self, a: np.ndarray) -> np.ndarray:
        raw = self.region.take(a.nbytes).numpy()
        dst = raw.view(a.dtype).reshape(a.shape) if a.nbytes else np.empty_like(a)
        np.copyto(dst, a)
        return dst

    def ref(self, r: TensorRef) -> TensorRef:
        """``r`` with its value replaced by the copy (type facts, key and box unchanged); a
        view's by None (what it holds is its storage's copy, and no save reads it)."""
        if r.view is not None:
            return dataclasses.replace(r, value=None, outer=None)
        v = self.array(r.value) if isinstance(r.value, np.ndarray) else self.tensor(r.value)
        return dataclasses.replace(r, value=v, outer=v)


def capture(
    flat: Flat,
    region: Region,
    streams: dict | None = None,
    caller_streams: dict | None = None,
) -> Snapshot:
    """Copy the tensors of ``flat`` (``tree.flatten``'s result) into ``region``; CUDA copies are
    queued on ``streams`` (see ``Snapshot``). The snapshot's state is a ``Flat`` the saver takes
    as it is: the tree walk, the tensor identity rule and the depth limit are flatten's alone."""
    copy_streams = CopyStreams(streams, caller_streams)
    c = _HostCopier(region, copy_streams)
    state = Flat(flat.tree, [c.ref(r) for r in flat.refs], flat.used_pickle)
    events = []
    for s in copy_streams.used.values():
        e = torch.cuda.Event()
        e.record(s)
        events.append(e)
    return Snapshot(state, region, events)


def caller_streams() -> dict | None:
    """The calling thread's current CUDA stream per device (copies are ordered after them)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return {i: torch.cuda.current_stream(i) for i in range(torch.cuda.device_count())}
