"""Load planning: which chunks of which saved shards a rank reads, and where each tensor goes.

A load asks for a box (offsets, lengths) of each tensor it rebuilds. A saved shard's bytes are
C-ordered, so the rows [a, b) of its first dimension that meet the box are one contiguous byte
range; only the chunks overlapping that range are read. The selection runs on the index table
with numpy (a rank that wants 1/N of every tensor builds about 1/N of the rows), then groups the
chunks it keeps into one ``Piece`` per saved shard.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import CheckpointError
from .format import index
from .format.index import Row, int_lists
from .tree import flatten

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, lengths)

NEEDING: contextvars.ContextVar[Callable[[str, set[str]], None] | None] = contextvars.ContextVar(
    "ckptguard_needing", default=None
)


@contextlib.contextmanager
def needing(hook: Callable[[str, set[str]], None]) -> Generator[None, None, None]:
    """Within this block, every load of a checkpoint directory calls ``hook(path, files)`` with
    the data files it is about to read, before it checks them: a node-local load fetches the
    ones its node lacks (``redundancy.fetch``)."""
    token = NEEDING.set(hook)
    try:
        yield
    finally:
        NEEDING.reset(token)


def intersect(a: Box, b: Box) -> Box | None:
    """The overlap of two boxes, or None if they do not meet (or either is empty)."""
    offs, lens = [], []
    for oa, na, ob, nb in zip(a[0], a[1], b[0], b[1], strict=True):
        lo, hi = max(oa, ob), min(oa + na, ob + nb)
        if hi <= lo:
            return None
        offs.append(lo)
        lens.append(hi - lo)
    return tuple(offs), tuple(lens)


@dataclass
class Piece:
    """Part of one saved shard that a wanted box needs: its first-dimension rows [row0, row1),
    read as the chunks in ``rows``."""

    shard: Box
    overlap: Box
    elem_size: int
    row0: int
    row1: int
    rows: list[Row] = field(default_factory=list)

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shard[1][1:]) * self.elem_size

    @property
    def span(self) -> tuple[int, int]:
        """Byte range of the needed rows within the saved shard."""
        if not self.shard[1]:  # 0-d tensor: the single element
            return 0, self.elem_size
        return self.row0 * self.row_bytes, self.row1 * self.row_bytes

    @property
    def chunk_span(self) -> tuple[int, int]:
        """Byte range of the saved shard that the chunks read cover (whole chunks)."""
        lo = min(r.shard_byte_offset for r in self.rows)
        return lo, max(r.shard_byte_offset + r.raw_len for r in self.rows)


def _wanted(tensors: Sequence[dict], boxes: dict[int, Box]) -> tuple[np.ndarray, ...]:
    """The boxes as flat arrays: each tensor's start in them, and the offsets and lengths."""
    w_start = np.zeros(len(tensors), dtype=np.int64)
    w_off: list[int] = []
    w_len: list[int] = []
    for gid in sorted(boxes):
        o, n = boxes[gid]
        nd = len(tensors[gid]["shape"])
        if len(o) != nd or len(n) != nd:
            raise ValueError(f"box of tensor {gid} has the wrong number of dimensions")
        w_start[gid] = len(w_off)
        w_off += o
        w_len += n
    return w_start, np.array(w_off, dtype=np.int64), np.array(w_len, dtype=np.int64)


def rows_for(table: pa.Table, tensors: Sequence[dict], boxes: dict[int, Box]) -> list[Row]:
    """The rows of index ``table`` that a load of ``boxes`` (tensor id -> the box wanted) reads:
    of each saved shard that meets its tensor's box, the chunks overlapping the bytes of the
    shard's first-dimension rows that the box needs (a 0-d tensor's chunks always). The ids
    must be those of ``tensors`` (the manifest's; the caller checks the range)."""
    if not boxes:
        return []
    t = table
    tid = t.column("tensor").to_numpy().astype(np.int64)
    wanted = np.zeros(len(tensors), dtype=bool)
    wanted[np.fromiter(boxes, dtype=np.int64, count=len(boxes))] = True
    sel = np.flatnonzero(wanted[tid])
    if len(sel) < t.num_rows:
        t = t.take(pa.array(sel))
        tid = tid[sel]
    # Each row's shard box and its tensor's wanted box, as flat per-dimension arrays.
    offs, nd = int_lists(t.column("shard_offsets"))
    lens, _ = int_lists(t.column("shard_lengths"))
    w_start, w_off, w_len = _wanted(tensors, boxes)
    starts = np.cumsum(nd) - nd
    within = np.arange(len(offs)) - np.repeat(starts, nd)
    w_idx = np.repeat(w_start[tid], nd) + within
    lo = np.maximum(offs, w_off[w_idx])
    hi = np.minimum(offs + lens, w_off[w_idx] + w_len[w_idx])
    row_of = np.repeat(np.arange(t.num_rows), nd)
    misses = np.bincount(row_of, weights=hi <= lo, minlength=t.num_rows)
    keep = misses == 0  # every dimension overlaps (a 0-d shard always)
    # The overlap's first-dimension rows are one byte range of the C-ordered shard; keep the
    # chunks that meet it.
    multi = np.flatnonzero(keep & (nd > 0))
    if len(multi):
        first = starts[multi]
        factor = lens.copy()
        factor[starts[nd > 0]] = 1
        row_elems = np.multiply.reduceat(factor, starts[nd > 0]) if len(factor) else factor
        row_elems = row_elems[np.searchsorted(np.flatnonzero(nd > 0), multi)]
        row_bytes = row_elems * t.column("elem_size").to_numpy()[multi].astype(np.int64)
        b_lo = (lo[first] - offs[first]) * row_bytes
        b_hi = (hi[first] - offs[first]) * row_bytes
        sbo = t.column("shard_byte_offset").to_numpy()[multi]
        raw = t.column("raw_len").to_numpy()[multi]
        keep[multi] = (sbo < b_hi) & (sbo + raw > b_lo)
    return index.rows_from_table(t.filter(pa.array(keep)))


def plan_reads(
    table: pa.Table, tensors: Sequence[dict], boxes: dict[int, Box]
) -> dict[int, list[Piece]]:
    """The pieces each tensor of ``boxes`` needs, each with the chunks it reads (those of
    ``rows_for``), one per saved shard that meets the box."""
    shards: dict[tuple[int, Box], list[Row]] = {}
    for r in rows_for(table, tensors, boxes):
        shards.setdefault((r.tensor, (r.shard_offsets, r.shard_lengths)), []).append(r)
    out: dict[int, list[Piece]] = {gid: [] for gid in boxes}
    for (gid, shard), rows in shards.items():
        want = boxes[gid]
        # A shard that is the box wanted (a whole tensor loaded whole) is its own overlap.
        ov = shard if not shard[1] or shard == want else intersect(shard, want)
        assert ov is not None  # rows_for kept only rows whose shard meets the box
        row0 = ov[0][0] - shard[0][0] if shard[1] else 0
        row1 = row0 + ov[1][0] if shard[1] else 1
        out[gid].append(Piece(shard, ov, rows[0].elem_size, row0, row1, rows))
    return out


@dataclass
class Packs:
    """Tensors a load rebuilds whole that are each one slice of a packed record (docs/format.md
    section 4.1), as columns in file, record and slice order: the ``tensor`` ids, the ``record``
    each lies in (an index into ``rows``), and where its bytes lie in that record's raw bytes
    (``at``, ``length``). ``rows`` holds one index row per record, its first member's: the
    record's file, offset and fields, and what an error about the record names; ``dtypes``
    the dtypes among the members."""

    tensor: np.ndarray
    record: np.ndarray
    at: np.ndarray
    length: np.ndarray
    rows: list[Row]
    dtypes: set[str] = field(default_factory=set)

    def members(self, k: int) -> slice:
        """The positions in the columns of record ``k``'s members."""
        lo, hi = np.searchsorted(self.record, [k, k + 1])
        return slice(int(lo), int(hi))


def whole_packed(table: pa.Table, tensors: Sequence[dict], ids: Sequence[int]) -> Packs:
    """Of the tensors ``ids`` (loaded whole, none per-rank-selected), those whose one index row
    is a slice of a packed record: a load gives each record one buffer and these tensors views
    of it. The others (several rows, a record of their own, per-rank) are ``plan_reads``'s."""
    none = np.zeros(0, dtype=np.int64)
    if not len(ids) or not index.is_packed(table):
        return Packs(none, none, none, none, [])
    n = len(tensors)
    tid = table.column("tensor").to_numpy().astype(np.int64)
    raw = table.column("raw_len").to_numpy()
    one = np.zeros(n, dtype=bool)
    one[np.asarray(ids, dtype=np.int64)] = True
    one &= np.bincount(tid, minlength=n) == 1
    # A per-rank tensor's row is one rank's value: its shape is not the entry's.
    one &= ~np.fromiter(("per_rank" in t for t in tensors), dtype=bool, count=n)
    sel = np.flatnonzero(one[tid] & (table.column("record_raw_len").to_numpy() != raw))
    if not len(sel):
        return Packs(none, none, none, none, [])
    sub = table.take(pa.array(sel))
    names = pc.dictionary_encode(sub.column("file").combine_chunks())
    rank_of = np.argsort(np.argsort(np.asarray(names.dictionary.to_pylist(), dtype=object)))
    fcode = rank_of[names.indices.to_numpy()]  # files in name order
    off = sub.column("offset").to_numpy()
    at = sub.column("record_byte_offset").to_numpy()
    order = np.lexsort((at, off, fcode))
    fcode, off, at = fcode[order], off[order], at[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (fcode[1:] != fcode[:-1]) | (off[1:] != off[:-1])
    heads = sub.take(pa.array(order[first]))
    return Packs(
        tid[sel][order],
        np.cumsum(first) - 1,
        at.astype(np.int64),
        raw[sel][order].astype(np.int64),
        index.rows_from_table(heads),
        set(pc.unique(sub.column("dtype")).to_pylist()),
    )


def rank_box(entry: dict, rank: int) -> Box:
    """Rank ``rank``'s row of a per-rank tensor: the box it saved."""
    rest = tuple(entry["shape"][1:])
    return (rank, *(0,) * len(rest)), (1, *rest)


def whole_box(entry: dict, rank: int) -> Box:
    """The box a load without a template wants of a tensor: all of it (of a per-rank tensor,
    rank ``rank``'s row)."""
    if entry.get("per_rank"):
        return rank_box(entry, rank)
    shape = tuple(entry["shape"])
    return (0,) * len(shape), shape


@dataclass
class Target:
    """Where one saved tensor goes on this rank: ``fill`` covers ``box`` of the global tensor;
    ``result`` is what the loaded object holds (``fresh``: allocated by the load)."""

    result: Any
    fill: Any
    box: Box
    fresh: bool


def template_targets(template: Any, tensors: Sequence[dict], path: str, rank: int) -> dict:
    """The targets of a template's tensors (found by key in ``tensors``, the manifest's), each
    checked against the saved dtype and shape: tensor id -> Target (none without a template)."""
    if template is None:
        return {}
    _, refs, _ = flatten(template, tensors_only=True)
    by_key = {t["key"]: i for i, t in enumerate(tensors)}
    out: dict[int, Target] = {}
    filled = {_same_view(r.value) for r in refs if r.key in by_key}
    for ref in refs:
        gid = by_key.get(ref.key)
        if gid is None and _same_view(ref.value) in filled:
            continue  # a template tensor filled through another that is the same view of memory
        if gid is None:
            raise CheckpointError(f"template tensor {ref.key!r} is not in checkpoint {path}")
        entry = tensors[gid]
        if entry.get("per_rank"):  # this rank's own value: a plain (or PerRank) tensor
            if ref.sharded or ref.dtype != entry["dtype"] or list(ref.shape) != entry["shape"][1:]:
                raise CheckpointError(
                    f"template tensor {ref.key!r} is {ref.dtype}{list(ref.shape)}, the "
                    f"checkpoint holds per-rank values of {entry['dtype']}{entry['shape'][1:]}"
                )
            out[gid] = Target(ref.outer, ref.value[None], rank_box(entry, rank), False)
            continue
        if ref.dtype != entry["dtype"] or list(ref.global_shape) != entry["shape"]:
            raise CheckpointError(
                f"template tensor {ref.key!r} is {ref.dtype}{list(ref.global_shape)}, the "
                f"checkpoint holds {entry['dtype']}{entry['shape']}"
            )
        out[gid] = Target(ref.outer, ref.value, (ref.offsets, ref.shape), False)
    return out


def _same_view(t: Any) -> tuple:
    """What two template tensors that are the same view of one memory share: a checkpoint may
    hold one tensor for both, under the first one's key, which fills both. Distinct for
    anything else."""
    if isinstance(t, np.ndarray) or not t.numel():
        return ("object", id(t))
    ptr = t.untyped_storage().data_ptr()
    return (t.device, ptr, t.storage_offset(), t.shape, t.stride(), t.dtype, t.is_conj())
