"""Restore: turn a checkpoint's chunks back into tensors and the saved object; verify reports."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, CorruptCheckpointError, UnsupportedObjectError
from .format.index import Row
from .reader import CheckpointReader
from .tree import NUMPY_BY_NAME, TORCH_BY_NAME, TreeError, check_tree, unflatten

MapLocation = str | torch.device | dict | Callable | None


def _empty(entry: dict) -> tuple[Any, np.ndarray]:
    """Allocate a host tensor/array for a manifest tensor entry; return it and a uint8 view."""
    shape = tuple(entry["shape"])
    if entry["kind"] == "numpy":
        dt = NUMPY_BY_NAME.get(entry["dtype"])
        if dt is None:
            raise UnsupportedObjectError(f"numpy has no dtype {entry['dtype']!r}", entry["key"])
        a = np.empty(shape, dtype=dt)
        return a, a.reshape(-1).view(np.uint8)
    dtype = TORCH_BY_NAME.get(entry["dtype"])
    if dtype is None:
        raise UnsupportedObjectError(
            f"this torch has no dtype {entry['dtype']!r} (tensor {entry['key']!r})", entry["key"]
        )
    t = torch.empty(shape, dtype=dtype)
    return t, t.reshape(-1).view(torch.uint8).numpy()


def _place(dest: np.ndarray, entry: dict, r: Row, raw: bytes, shards: dict) -> None:
    """Copy one chunk's bytes into the destination tensor's bytes."""
    src = np.frombuffer(raw, dtype=np.uint8)
    if r.shard_lengths == r.global_shape:
        dest[r.shard_byte_offset : r.shard_byte_offset + r.raw_len] = src
        return
    key = (r.tensor, r.shard_offsets)
    buf = shards.setdefault(key, np.empty(math.prod(r.shard_lengths) * r.elem_size, np.uint8))
    buf[r.shard_byte_offset : r.shard_byte_offset + r.raw_len] = src
    if r.shard_byte_offset + r.raw_len == len(buf):  # last chunk of the shard: place it
        full = dest.reshape(*entry["shape"], r.elem_size)
        box = tuple(slice(o, o + n) for o, n in zip(r.shard_offsets, r.shard_lengths, strict=True))
        full[box] = buf.reshape(*r.shard_lengths, r.elem_size)
        del shards[key]


def _device(entry: dict, map_location: MapLocation) -> torch.device:
    saved = entry["device"]
    if map_location is None:
        loc = saved
    elif isinstance(map_location, dict):
        loc = map_location.get(saved, saved)
    elif callable(map_location):
        loc = map_location(saved)
    else:
        loc = map_location
    dev = torch.device(loc)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(
            f"tensor {entry['key']!r} was saved on {saved} but CUDA is not available; "
            "pass map_location='cpu'"
        )
    return dev


def load_checkpoint(
    path: str, map_location: MapLocation = None, verify: bool = True, allow_pickle: bool = False
) -> Any:
    """Read, verify and rebuild the object saved at checkpoint directory ``path``."""
    with CheckpointReader(path) as rd:
        if "pickle" in rd.features and not allow_pickle:
            raise UnsupportedObjectError(
                f"{path} contains pickled objects; load it with allow_pickle=True only if you "
                "trust where it came from"
            )
        dests = [_empty(e) for e in rd.tensors]
        shards: dict = {}
        for r, raw in rd.read_chunks(rd.rows, verify=verify):
            _place(dests[r.tensor][1], rd.tensors[r.tensor], r, raw, shards)
        values = []
        for (obj, _), entry in zip(dests, rd.tensors, strict=True):
            if entry["kind"] == "torch":
                dev = _device(entry, map_location)
                if dev.type != "cpu":
                    obj = obj.to(dev)
                if entry["parameter"]:
                    obj = torch.nn.Parameter(obj, requires_grad=entry["requires_grad"])
                elif entry["requires_grad"] and obj.is_floating_point():
                    obj.requires_grad_(True)
            values.append(obj)
        try:
            return unflatten(rd.manifest["tree"], values, allow_pickle=allow_pickle)
        except TreeError as e:
            raise rd.corrupt(f"object tree is malformed: {e}", file="MANIFEST.json") from None


@dataclass(frozen=True)
class Problem:
    """One thing verify found wrong, with where it is."""

    message: str
    file: str | None = None
    key: str | None = None
    chunk: int | None = None
    offset: int | None = None

    def __str__(self) -> str:
        where = [
            f"{n}={v}"
            for n, v in (
                ("file", self.file),
                ("tensor", self.key),
                ("chunk", self.chunk),
                ("offset", self.offset),
            )
            if v is not None
        ]
        return self.message + (f" [{', '.join(where)}]" if where else "")


@dataclass
class VerifyReport:
    """Outcome of checking every byte of a checkpoint."""

    path: str
    problems: list[Problem] = field(default_factory=list)
    chunks_checked: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _problem(e: CorruptCheckpointError) -> Problem:
    return Problem(e.reason, e.file, e.key, e.chunk, e.offset)


def verify_checkpoint(
    path: str, progress: Callable[[int, int], None] | None = None
) -> VerifyReport:
    """Check manifest, index and every chunk; collect all problems rather than stop at one."""
    report = VerifyReport(path)
    try:
        rd = CheckpointReader(path)
    except CorruptCheckpointError as e:
        report.problems.append(_problem(e))
        return report
    with rd:
        total = sum(r.stored_len for r in rd.rows)
        done = 0
        for name, rows in sorted(rd.rows_by_file.items()):
            try:
                fd = rd.open_file(name)
            except CorruptCheckpointError as e:
                report.problems.append(_problem(e))
                continue
            try:
                for r in rows:
                    try:
                        rd.read_chunk(fd, r, verify=True)
                        report.chunks_checked += 1
                        report.bytes_checked += r.raw_len
                    except CorruptCheckpointError as e:
                        report.problems.append(_problem(e))
                    done += r.stored_len
                    if progress:
                        progress(done, total)
            finally:
                os.close(fd)
        try:
            check_tree(rd.manifest["tree"], len(rd.tensors))
        except TreeError as e:
            report.problems.append(Problem(f"object tree is malformed: {e}", "MANIFEST.json"))
    return report
