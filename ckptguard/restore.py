"""Restore: turn a checkpoint's chunks back into tensors and the saved object; verify reports."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from .errors import (
    CheckpointError,
    CorruptCheckpointError,
    OutOfMemoryError,
    UnsupportedObjectError,
    WorldSizeError,
    location,
)
from .format.dtypes import SIZES
from .format.index import Row
from .format.manifest import PER_RANK_TENSORS
from .format.ranktrees import RANK_TREE_DIFFS, apply_diff, diff_anchor, rank_tree
from .reader import CheckpointReader
from .reshard import Box, Piece, plan_reads
from .tree import (
    NUMPY_BY_NAME,
    TORCH_BY_NAME,
    TreeError,
    check_tree,
    flatten,
    tensor_ids,
    unflatten,
)

MapLocation = str | torch.device | dict | Callable | None
T = TypeVar("T")


def _out_of_memory(e: BaseException) -> bool:
    """Whether an allocator's exception means that the memory was not there: numpy raises
    MemoryError, torch OutOfMemoryError (device) or a RuntimeError from its CPU allocator."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and "memory" in str(e).lower()


def allocate(key: str, nbytes: int, where: str, make: Callable[[], T]) -> T:
    """``make()``: the one place where a load allocates memory for tensor ``key`` (``nbytes`` of
    ``where``: host, pinned or a device). An allocation failure becomes OutOfMemoryError naming
    the tensor and the bytes; nothing else is caught."""
    try:
        return make()
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        raise OutOfMemoryError(
            f"cannot allocate {nbytes} bytes ({nbytes / 2**20:.1f} MiB) of {where} memory for "
            f"tensor {key!r} while loading: {str(e).strip()[:300] or type(e).__name__} (free "
            "memory, raise the limit, or load with a template/map_location that needs less)",
            key,
            nbytes,
            where,
        ) from e


def _host_empty(entry: dict) -> Any:
    """A fresh host tensor/array for a manifest tensor entry (its global shape; one rank's row
    of a per-rank tensor)."""
    shape = tuple(entry["shape"][1:] if entry.get("per_rank") else entry["shape"])
    key = entry["key"]
    if entry["kind"] == "numpy":
        dt = NUMPY_BY_NAME.get(entry["dtype"])
        if dt is None:
            raise UnsupportedObjectError(f"numpy has no dtype {entry['dtype']!r}", key)
        return allocate(key, _nbytes(shape, entry), "host", lambda: np.empty(shape, dtype=dt))
    dtype = TORCH_BY_NAME.get(entry["dtype"])
    if dtype is None:
        raise UnsupportedObjectError(
            f"this torch has no dtype {entry['dtype']!r} (tensor {key!r})", key
        )
    return allocate(key, _nbytes(shape, entry), "host", lambda: torch.empty(shape, dtype=dtype))


def _nbytes(shape: Sequence[int], entry: dict) -> int:
    return math.prod(shape) * SIZES[entry["dtype"]]


def _rank_box(entry: dict, rank: int) -> Box:
    """Rank ``rank``'s row of a per-rank tensor: the box it saved."""
    rest = tuple(entry["shape"][1:])
    return (rank, *(0,) * len(rest)), (1, *rest)


def _byte_view(t: Any) -> np.ndarray | None:
    """A writable uint8 view of a contiguous host tensor/array, else None."""
    if isinstance(t, np.ndarray):
        return t.reshape(-1).view(np.uint8) if t.flags.c_contiguous else None
    if t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad:
        return t.reshape(-1).view(torch.uint8).numpy()
    return None


def _copy_block(target: Any, entry: dict, piece: Piece, origin: tuple[int, ...]) -> None:
    """Copy a piece's overlap into ``target`` (whose element 0 is at ``origin``)."""
    lens = piece.overlap[1]
    block = np.ascontiguousarray(piece.block())
    sl = tuple(
        slice(o - b, o - b + n) for o, b, n in zip(piece.overlap[0], origin, lens, strict=True)
    )
    if isinstance(target, np.ndarray):
        target[sl] = block.view(target.dtype).reshape(lens)
        return
    src = torch.from_numpy(block).view(TORCH_BY_NAME[entry["dtype"]]).reshape(lens)
    with torch.no_grad():
        target[sl].copy_(src)


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
    try:
        dev = torch.device(loc)
    except (RuntimeError, TypeError, ValueError) as e:  # a string torch knows no device by
        raise CheckpointError(
            f"tensor {entry['key']!r} was saved on {saved!r}, which maps to {loc!r}: not a "
            f"device this torch knows ({e}); pass map_location"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(
            f"tensor {entry['key']!r} was saved on {saved} but CUDA is not available; "
            "pass map_location='cpu'"
        )
    return dev


@dataclass
class _Target:
    """Where one saved tensor goes on this rank: ``fill`` covers ``box`` of the global tensor."""

    result: Any
    fill: Any
    box: Box
    fresh: bool


def _template_targets(template: Any, rd: CheckpointReader, rank: int) -> dict[int, _Target]:
    _, refs, _ = flatten(template, tensors_only=True)
    by_key = {t["key"]: i for i, t in enumerate(rd.tensors)}
    out = {}
    for ref in refs:
        gid = by_key.get(ref.key)
        if gid is None:
            raise CheckpointError(f"template tensor {ref.key!r} is not in checkpoint {rd.path}")
        entry = rd.tensors[gid]
        if entry.get("per_rank"):  # this rank's own value: a plain (or PerRank) tensor
            if ref.sharded or ref.dtype != entry["dtype"] or list(ref.shape) != entry["shape"][1:]:
                raise CheckpointError(
                    f"template tensor {ref.key!r} is {ref.dtype}{list(ref.shape)}, the "
                    f"checkpoint holds per-rank values of {entry['dtype']}{entry['shape'][1:]}"
                )
            out[gid] = _Target(ref.outer, ref.value[None], _rank_box(entry, rank), False)
            continue
        if ref.dtype != entry["dtype"] or list(ref.global_shape) != entry["shape"]:
            raise CheckpointError(
                f"template tensor {ref.key!r} is {ref.dtype}{list(ref.global_shape)}, the "
                f"checkpoint holds {entry['dtype']}{entry['shape']}"
            )
        out[gid] = _Target(ref.outer, ref.value, (ref.offsets, ref.shape), False)
    return out


def load_checkpoint(
    path: str,
    map_location: MapLocation = None,
    verify: bool = True,
    allow_pickle: bool = False,
    template: Any = None,
    rank: int = 0,
    world: int | None = None,
) -> Any:
    """Read, verify and rebuild the object saved at ``path`` as rank ``rank`` sees it.

    Tensors in ``template`` (plain, ``Shard`` or DTensor, found by key) are filled in place with
    the part of the global tensor they cover, whatever the saved sharding; the others load whole.
    Per-rank tensors load rank ``rank``'s own value; ``world``, this job's number of ranks, must
    then be the saved one (None: the caller chose ``rank`` itself).
    """
    with CheckpointReader(path) as rd:
        if "pickle" in rd.features and not allow_pickle:
            raise UnsupportedObjectError(
                f"{path} contains pickled objects; load it with allow_pickle=True only if you "
                "trust where it came from"
            )
        tree = rank_tree(rd.manifest, rank)
        ids = tensor_ids(tree)
        for gid in ids:
            if not 0 <= gid < len(rd.tensors):
                raise rd.corrupt(
                    f"object tree references tensor {gid}, which does not exist",
                    file="MANIFEST.json",
                )
        if PER_RANK_TENSORS in rd.features:
            _check_rank(rd, rank, world)
        targets = _template_targets(template, rd, rank) if template is not None else {}
        fresh: dict[int, None] = {}  # in tree order, each once; a dict keeps the lookups O(1)
        for gid in ids:
            if gid not in targets:
                fresh[gid] = None
        boxes = {gid: tg.box for gid, tg in targets.items()}
        for gid in fresh:
            entry = rd.tensors[gid]
            shape = tuple(entry["shape"])
            boxes[gid] = (
                _rank_box(entry, rank) if entry.get("per_rank") else ((0,) * len(shape), shape)
            )
        # Only the chunks that meet this rank's boxes become rows (selected on the index table).
        mine = rd.rows_for(boxes)
        # The index ties each tensor's bytes to records inside its files; the files on disk must
        # be that large before their tensors are allocated (I6).
        rd.check_sizes({r.file for r in mine})
        for gid in fresh:
            t = _host_empty(rd.tensors[gid])
            fill = t[None] if rd.tensors[gid].get("per_rank") else t  # a view: the rank's row
            targets[gid] = _Target(t, fill, boxes[gid], True)
        rows_by_tensor: dict[int, list[Row]] = {}
        for r in mine:
            rows_by_tensor.setdefault(r.tensor, []).append(r)
        pieces: list[tuple[int, Piece]] = []
        by_file: dict[str, list[tuple[Row, Piece]]] = {}
        for gid, tg in targets.items():
            for p in plan_reads(rows_by_tensor.get(gid, []), tg.box):
                view = _byte_view(tg.fill) if p.shard == p.overlap == tg.box else None
                if view is not None:
                    p.buf = view  # the chunks land straight in the destination
                else:
                    key = rd.tensors[gid]["key"]
                    allocate(key, p.buffer_bytes, "host", p.allocate)
                    pieces.append((gid, p))
                for r in p.rows:
                    by_file.setdefault(r.file, []).append((r, p))
        for name in sorted(by_file):  # each file once, its records in offset order
            work = sorted(by_file[name], key=lambda rp: rp[0].offset)
            fd = rd.open_file(name)
            try:
                groups: dict[int, list[tuple[Row, Piece]]] = {}
                for r, p in work:
                    groups.setdefault(id(p), []).append((r, p))
                for group in groups.values():
                    p = group[0][1]
                    rows = [r for r, _ in group]
                    rd.read_into(fd, rows, p.buf, [p.dest_offset(r) for r in rows], verify)
            finally:
                os.close(fd)
        for gid, p in pieces:
            _copy_block(targets[gid].fill, rd.tensors[gid], p, targets[gid].box[0])
        values: list[Any] = [None] * len(rd.tensors)
        for gid, tg in targets.items():
            values[gid] = _finish(tg, rd.tensors[gid], map_location) if tg.fresh else tg.result
        try:
            return unflatten(tree, values, allow_pickle=allow_pickle)
        except TreeError as e:
            raise rd.corrupt(f"object tree is malformed: {e}", file="MANIFEST.json") from None


def _check_rank(rd: CheckpointReader, rank: int, world: int | None) -> None:
    """A checkpoint with per-rank tensors loads as one of its saved ranks, and in a job only at
    the saved world size: another rank's value is never handed over unasked."""
    saved = rd.manifest["world_size"]
    keys = [t["key"] for t in rd.tensors if t.get("per_rank")]
    what = f"per-rank tensors ({', '.join(map(repr, keys[:4]))}{', ...' if len(keys) > 4 else ''})"
    if world is not None and world != saved:
        raise WorldSizeError(
            f"{rd.path} holds {what} of each of its {saved} ranks, but {world} ranks load it: "
            "pass rank=<saved rank> to load to choose whose values this rank gets"
        )
    if not 0 <= rank < saved:
        raise WorldSizeError(
            f"{rd.path} holds {what} of its {saved} ranks; there is no rank {rank} among them"
        )


def _finish(tg: _Target, entry: dict, map_location: MapLocation) -> Any:
    obj = tg.result
    if entry["kind"] != "torch":
        return obj
    dev = _device(entry, map_location)
    if dev.type != "cpu":
        nbytes = _nbytes(obj.shape, entry)
        obj = allocate(entry["key"], nbytes, str(dev), lambda: obj.to(dev))
    if entry["parameter"]:
        return torch.nn.Parameter(obj, requires_grad=entry["requires_grad"])
    if entry["requires_grad"] and (obj.is_floating_point() or obj.is_complex()):
        obj.requires_grad_(True)
    return obj


@dataclass(frozen=True)
class Problem:
    """One thing verify found wrong, with where it is."""

    message: str
    file: str | None = None
    key: str | None = None
    chunk: int | None = None
    offset: int | None = None

    def __str__(self) -> str:
        return self.message + location(self.file, self.key, self.chunk, self.offset)


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
        verify_rows(
            rd, [(name, rd.rows_of_file(name)) for name in sorted(rd.files)], report, progress
        )
        check_trees(rd, report)
    return report


def verify_rows(
    rd: CheckpointReader,
    parts: Sequence[tuple[str, Sequence[Row]]],
    report: VerifyReport,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Check the data files named in ``parts`` (each opened and checked whole: header, footer
    against the index), then the given rows of each; add what is wrong to ``report``. A file that
    is missing or not a safe regular file gives one problem without a chunk, and its rows are
    skipped; one that cannot be read (permission denied, EIO) raises the reader's StoreError, as
    nothing is known of its bytes. ``progress`` counts the stored bytes of these rows."""
    total = sum(r.stored_len for _, rows in parts for r in rows)
    done = 0
    for name, rows in parts:
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


def check_trees(rd: CheckpointReader, report: VerifyReport) -> None:
    """Check the manifest's object trees against the tensor list (once per checkpoint)."""
    m, n = rd.manifest, len(rd.tensors)
    try:
        check_tree(m["tree"], n)
        for value in m["rank_trees"].values():
            if RANK_TREE_DIFFS not in rd.features:
                check_tree(value, n)
                continue
            # Only the values a diff replaces (or the tagged value around them) are new: each is
            # checked once, at its depth, in the rank's tree; the rest is rank 0's, checked above.
            tree = apply_diff(m["tree"], value)
            anchors = {}
            for path, _ in value:
                k, depth = diff_anchor(m["tree"], path)
                anchors[tuple(path[:k])] = depth
            for prefix, depth in anchors.items():
                node = tree
                for step in prefix:
                    node = node[step]
                check_tree(node, n, depth)
    except TreeError as e:
        report.problems.append(Problem(f"object tree is malformed: {e}", "MANIFEST.json"))
