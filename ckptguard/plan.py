"""Save planning on rank 0: one global tensor table from every rank's description.

Checks that ranks agree (dtype, global shape, kind), that the shards of each sharded tensor
neither overlap nor leave gaps, and that replicated tensors are equal (by hash); then picks one
writer for each replicated tensor, balancing bytes across ranks. A shard whose box (offsets and
shape) several ranks hold, as on a mesh with a Replicate and a Shard dimension (HSDP), is a
replicated box: checked and written once like a replicated tensor. Descriptions (``describe``)
are checked column-wise, so rank 0's work stays linear in ranks x tensors.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import ReplicaMismatchWarning
from .format.cover import check_cover
from .format.datafile import FormatError
from .format.index import int_lists
from .tree import TensorRef


class PlanError(ValueError):
    """The ranks' states do not fit together; the message names the key and ranks."""


# -- who writes each tensor -----------------------------------------------------------------------
@dataclass(frozen=True)
class OneRank:
    """A replicated tensor (or any tensor of a one-rank save): rank ``rank`` writes it whole."""

    rank: int

    def writes(self, rank: int) -> bool:
        return rank == self.rank

    def to_json(self) -> int:
        return self.rank


@dataclass(frozen=True)
class EveryRank:
    """A sharded tensor: every rank writes its own piece."""

    def writes(self, rank: int) -> bool:
        return True

    def to_json(self) -> int:
        return -1


@dataclass(frozen=True)
class SomeRanks:
    """A sharded tensor with replicated boxes: the ranks that write their piece, one per
    distinct box, as a bitmap (bit r of byte r // 8) that stays small at any world size."""

    bitmap: bytes

    @classmethod
    def of(cls, ranks: np.ndarray | Sequence[int], world: int) -> SomeRanks:
        mask = np.zeros(world, dtype=bool)
        mask[np.asarray(ranks, dtype=np.int64)] = True
        return cls(np.packbits(mask, bitorder="little").tobytes())

    def writes(self, rank: int) -> bool:
        return rank >> 3 < len(self.bitmap) and bool(self.bitmap[rank >> 3] >> (rank & 7) & 1)

    def to_json(self) -> str:
        return base64.b64encode(self.bitmap).decode()


Writer = OneRank | EveryRank | SomeRanks
SHARDED = EveryRank()


@functools.lru_cache(maxsize=1 << 16)
def one_rank(rank: int) -> OneRank:
    """The ``OneRank`` of ``rank``, made once: a plan has one per key, and building a frozen
    dataclass per key is a measurable part of planning many small tensors."""
    return OneRank(rank)


def writer_from_json(value: Any) -> Writer:
    """The ``Writer`` that ``to_json`` gave ``value`` (-1, a rank, or a base64 bitmap)."""
    if isinstance(value, str):
        return SomeRanks(base64.b64decode(value))
    if type(value) is int and value >= -1:
        return SHARDED if value == -1 else one_rank(value)
    raise ValueError(f"not a plan writer: {value!r}")


@dataclass
class Plan:
    """The global tensor table: ``tensors[g]`` (a manifest entry) is written by ``writer[g]``."""

    tensors: list[dict]  # manifest tensor entries, by global id
    keys: list[str]  # key of each global id
    writer: list[Writer]  # who writes each global id
    bytes_per_rank: list[int]
    differing: list[str] = field(default_factory=list)
    """Unchecked replicas (``check_replicated=False``) whose copies differ: one rank's is saved."""


def assignment(
    plan_keys: list[str], writer: Sequence[Writer], refs: Sequence[TensorRef], rank: int
) -> list[tuple[int, bool]]:
    """For each local tensor: (global id, whether this rank writes it)."""
    names = [r.key for r in refs]
    if names == plan_keys[: len(names)]:  # rank 0's keys, and any rank's that are the same
        ids: Sequence[int] = range(len(names))
    else:
        gid = {k: i for i, k in enumerate(plan_keys)}
        ids = [gid[k] for k in names]
    return [(g, writer[g].writes(rank)) for g in ids]


# -- the merged descriptions ----------------------------------------------------------------------
class _Rows:
    """Every rank's description as one table, with each key's rows found column-wise.

    ``rows(g)`` are key g's rows in rank order; ``first[g]`` the first of them, ``head[i]`` the
    first row of row i's key. Shapes are flattened: row i's global shape is
    ``gflat[gstart[i] : gstart[i] + glen[i]]``, its box's offsets and lengths likewise in
    ``oflat`` and ``sflat``.
    """

    def __init__(self, descs: list[pa.Table]) -> None:
        self.table = table = pa.concat_tables(descs)
        self.world = len(descs)
        self.n = table.num_rows
        self.rank = np.repeat(np.arange(len(descs)), [d.num_rows for d in descs])
        enc = pc.dictionary_encode(table.column("key").combine_chunks())
        self.gid = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        self.keys: list[str] = enc.dictionary.to_pylist()  # in order of first appearance
        self.order = np.argsort(self.gid, kind="stable")
        self.bounds = np.searchsorted(self.gid[self.order], np.arange(len(self.keys) + 1))
        self.first = self.order[self.bounds[:-1]]
        self.head = self.first[self.gid]
        self.per_rank = self.column("per_rank")
        self.sharded = self.column("sharded")
        self.nbytes = table.column("nbytes").to_numpy().astype(np.int64)
        self.gflat, self.glen = int_lists(table.column("global_shape"))
        self.gstart = np.cumsum(self.glen) - self.glen
        self.oflat, _ = int_lists(table.column("offsets"))
        self.sflat, _ = int_lists(table.column("shape"))

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy(zero_copy_only=False)

    def rows(self, g: int) -> np.ndarray:
        return self.order[self.bounds[g] : self.bounds[g + 1]]

    def box(self, rows: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(global shape, offsets, lengths) of the boxes of ``rows`` (rows of one sharded key)."""
        idx = self.gstart[rows][:, None] + np.arange(self.glen[rows[0]])
        return self.gflat[idx[0]].tolist(), self.oflat[idx], self.sflat[idx]

    def volume(self) -> np.ndarray:
        """Elements in each row's box."""
        volume = np.ones(self.n, dtype=np.int64)
        for d in range(int(self.glen.max())):
            has = np.flatnonzero(self.glen > d)
            volume[has] *= self.sflat[self.gstart[has] + d]
        return volume

    def hashes(self) -> tuple[np.ndarray, np.ndarray]:
        """The hash column as (valid mask, n x 16 bytes)."""
        arr = self.table.column("hash").combine_chunks()
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        data = arr.buffers()[1]
        if data is None:  # every hash null
            return valid, np.zeros((len(arr), 16), dtype=np.uint8)
        raw = np.frombuffer(data, dtype=np.uint8)[arr.offset * 16 : (arr.offset + len(arr)) * 16]
        return valid, raw.reshape(len(arr), 16)


# -- agreement ------------------------------------------------------------------------------------
def check_agreement(d: _Rows) -> None:
    """Raise PlanError naming the first key whose rows disagree on dtype, kind, per_rank,
    sharded, global shape or view (of which storage, where: format.md section 3.2), and the
    two ranks that differ."""
    for name in ("dtype", "kind", "view"):
        col = d.table.column(name)
        if col.null_count < len(col):  # all null (no views, the usual case): all agree
            codes = _codes(col.fill_null(""))
            _disagree(d, codes != codes[d.head], name)
    _disagree(d, d.per_rank != d.per_rank[d.head], "per_rank")  # before the sharding it implies
    _disagree(d, d.sharded != d.sharded[d.head], "sharded")
    _disagree(d, d.glen != d.glen[d.head], "global_shape")
    within = np.arange(len(d.gflat)) - np.repeat(d.gstart, d.glen)
    differ = np.flatnonzero(d.gflat != d.gflat[np.repeat(d.gstart[d.head], d.glen) + within])
    bad = np.zeros(d.n, dtype=bool)
    bad[np.searchsorted(d.gstart, differ, side="right") - 1] = True  # the rows holding them
    _disagree(d, bad, "global_shape")


def _disagree(d: _Rows, mask: np.ndarray, name: str) -> None:
    bad = np.flatnonzero(mask)
    if not len(bad):
        return
    i = int(bad[0])
    g = int(d.gid[i])
    first = int(d.first[g])
    a, b = d.table.column(name)[first].as_py(), d.table.column(name)[i].as_py()
    hint = " (wrap it in ckptguard.PerRank on every rank)" if name == "per_rank" else ""
    raise PlanError(
        f"tensor {d.keys[g]!r}: {name} is {a!r} on rank {d.rank[first]} but "
        f"{b!r} on rank {d.rank[i]}{hint}"
    )


def _codes(col: pa.ChunkedArray) -> np.ndarray:
    """A string column as integer codes: equal strings, equal codes."""
    return pc.dictionary_encode(col.combine_chunks()).indices.to_numpy(zero_copy_only=False)


# -- coverage and replica groups ------------------------------------------------------------------
def replica_groups(offs: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (one box each: ``offs[i]``, ``lens[i]``) that hold the same non-empty box as another.

    Returns ``(members, starts)``: the row numbers of such boxes, grouped by box and in row order
    within a group, and where each group begins in ``members``. Empty boxes are never grouped.
    """
    offs, lens = np.asarray(offs, dtype=np.int64), np.asarray(lens, dtype=np.int64)
    boxes = np.concatenate([offs, lens], axis=1)
    live = np.flatnonzero(lens.prod(axis=1) > 0)
    o = live[np.lexsort(boxes[live].T[::-1])] if boxes.shape[1] else live  # lexsort is stable
    b = boxes[o]
    new = np.ones(len(o), dtype=bool)
    new[1:] = (b[1:] != b[:-1]).any(axis=1)
    start = np.flatnonzero(new)
    count = np.diff(np.append(start, len(o)))
    multi = count > 1
    members = o[np.repeat(multi, count)]
    return members, np.cumsum(count[multi]) - count[multi]


@dataclass
class _Copies:
    """The rows of one key that hold copies of the same data, in replica sets.

    ``members[starts[j]:starts[j + 1]]`` are the rows of set j (rows of the description); for a
    sharded key ``local`` are the same as positions among the key's rows, and ``offs``/``lens``
    every row's box (to name a set's box in an error).
    """

    g: int
    members: np.ndarray
    starts: np.ndarray
    local: np.ndarray | None = None
    offs: np.ndarray | None = None
    lens: np.ndarray | None = None


def covered_copies(d: _Rows, g: int, volume: np.ndarray) -> _Copies | None:
    """Check that the shards of sharded key ``g`` cover it exactly, counting each replicated box
    once; return its replicated boxes (None when every box is on one rank only)."""
    rows = d.rows(g)
    shape, offs, lens = d.box(rows)
    local = starts = np.zeros(0, dtype=np.int64)
    cover = offs, lens  # one box of each replica set counts for the cover
    if volume[rows].sum() > math.prod(shape):  # more elements than the tensor
        local, starts = replica_groups(offs, lens)
        keep = np.ones(len(rows), dtype=bool)
        keep[local], keep[local[starts]] = False, True
        cover = offs[keep], lens[keep]
    try:
        check_cover(d.keys[g], shape, *cover)
    except FormatError as e:
        raise PlanError(f"{e} (shards from ranks {sorted(set(d.rank[rows].tolist()))})") from None
    if not len(local):
        return None
    return _Copies(g, rows[local], starts, local, offs, lens)


def differing_sets(
    members: np.ndarray, starts: np.ndarray, valid: np.ndarray, hashes: np.ndarray
) -> np.ndarray:
    """Which replica sets (``members[starts[j]:starts[j + 1]]``, rows of the description) have
    copies that are not all hashed and equal: a bool per set."""
    counts = np.diff(np.append(starts, len(members)))
    head = members[np.repeat(starts, counts)]  # each member's set's first copy
    bad = ~valid[members] | ~valid[head] | (hashes[members] != hashes[head]).any(axis=1)
    bad &= np.repeat(counts > 1, counts)  # a tensor on one rank only has nothing to match
    out = np.zeros(len(starts), dtype=bool)
    out[np.searchsorted(starts, np.flatnonzero(bad), side="right") - 1] = True
    return out


def first_differing(
    members: np.ndarray, starts: np.ndarray, valid: np.ndarray, hashes: np.ndarray
) -> int | None:
    """The first replica set (``members[starts[j]:starts[j + 1]]``, rows of the description) whose
    copies are not all hashed and equal, or None."""
    bad = np.flatnonzero(differing_sets(members, starts, valid, hashes))
    return int(bad[0]) if len(bad) else None


def _replica_error(d: _Rows, c: _Copies, j: int) -> PlanError:
    copies = c.members[c.starts[j] : np.append(c.starts, len(c.members))[j + 1]]
    what = repr(d.keys[c.g])
    if c.local is not None and c.offs is not None and c.lens is not None:
        i = c.local[c.starts[j]]
        what += f": its shard at offsets {c.offs[i].tolist()} of shape {c.lens[i].tolist()}"
    return PlanError(
        f"tensor {what} is replicated on ranks {d.rank[copies].tolist()} but their values "
        "differ. If each rank's value is its own (an RNG state), wrap it in "
        "ckptguard.PerRank and every rank gets its own back; pass check_replicated=False "
        "only to save the lowest rank's copy for every rank"
    )


@dataclass
class _Sets:
    """Every key's replica sets: ``alone`` the keys written whole by their only holder (row
    ``alone_row``), ``shared`` one ``_Copies`` per other key with copies, in key order."""

    alone: np.ndarray
    alone_row: np.ndarray
    shared: list[_Copies]


def _plain_sets(d: _Rows, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For unsharded ``keys`` each held by several ranks (one replica set each): the rows of
    their sets back to back in key order, and where each set starts."""
    counts = np.diff(d.bounds)[keys]
    starts = np.cumsum(counts) - counts
    at = np.repeat(d.bounds[keys] - starts, counts) + np.arange(int(counts.sum()))
    return d.order[at], starts


def replica_sets(d: _Rows, check_replicated: bool) -> tuple[_Sets, list[str], np.ndarray]:
    """Every key's copies, checked: equal by hash (else PlanError, for the first key in key
    order that fails a check), or with ``check_replicated=False`` the keys whose hashed copies
    differ. Also returns the rows their own rank writes whatever the balance (the pieces of
    sharded keys that have no copies). Unsharded keys are checked column-wise, all at once."""
    hashes = None  # (valid, bytes) of the hash column, once a replica set needs checking
    fixed = d.sharded.copy()
    key_sharded = d.sharded[d.first]
    counts = np.diff(d.bounds)
    plain = np.flatnonzero(~key_sharded & (counts > 1))
    differing: list[tuple[int, str]] = []
    first_bad = len(d.keys)  # the first unsharded key whose copies differ (checked replicas)
    if len(plain):
        hashes = d.hashes()
        members, starts = _plain_sets(d, plain)
        bad = differing_sets(members, starts, *hashes)
        if check_replicated and bad.any():
            first_bad = int(plain[np.flatnonzero(bad)[0]])
        elif bad.any():
            hashed = np.logical_and.reduceat(hashes[0][members], starts)
            differing += [(g, d.keys[g]) for g in plain[bad & hashed].tolist()]
    shared = {int(g): _Copies(int(g), d.rows(int(g)), np.zeros(1, dtype=np.int64)) for g in plain}
    volume = d.volume() if key_sharded.any() else np.zeros(0, dtype=np.int64)
    for g in np.flatnonzero(key_sharded[:first_bad]).tolist():
        c = covered_copies(d, g, volume)
        if c is None:
            continue
        fixed[c.members] = False
        hashes = hashes or d.hashes()
        j = first_differing(c.members, c.starts, *hashes)
        if j is not None and check_replicated:
            raise _replica_error(d, c, j)
        if j is not None and hashes[0][c.members].all():  # unhashed: unknown
            differing.append((g, d.keys[g]))
        shared[g] = c
    if first_bad < len(d.keys):
        raise _replica_error(d, shared[first_bad], 0)
    alone = np.flatnonzero(~key_sharded & (counts == 1))
    sets = _Sets(alone, d.first[alone], [shared[g] for g in sorted(shared)])
    return sets, [key for _, key in sorted(differing)], fixed


# -- load balance ---------------------------------------------------------------------------------
def balance(
    d: _Rows, sets: _Sets, fixed: np.ndarray, check_replicated: bool
) -> tuple[list[Writer], np.ndarray]:
    """Pick a writer for each replica set: largest first onto the least-loaded holder (a greedy
    balance of bytes across ranks), the lowest rank's copy when unchecked copies may differ.
    The replica sets of one key have disjoint holders (a rank holds one box of a key), so they
    are placed together. A key with one holder has no choice: those between two placements
    with a choice are added to the load at once. Returns each key's writer and rank's bytes."""
    load = np.zeros(d.world, dtype=np.int64)
    np.add.at(load, d.rank[fixed], d.nbytes[fixed])
    writer: list[Writer] = [SHARDED] * len(d.keys)
    for g, r in zip(sets.alone.tolist(), d.rank[sets.alone_row].tolist(), strict=True):
        writer[g] = one_rank(r)
    shared_max = [int(d.nbytes[c.members].max()) for c in sets.shared]
    keys = np.concatenate([sets.alone, [c.g for c in sets.shared]]).astype(np.int64)
    biggest = np.concatenate([d.nbytes[sets.alone_row], shared_max]).astype(np.int64)
    order = np.lexsort((keys, -biggest))  # largest first; key order among equals
    n_alone = len(sets.alone)
    done = 0  # placements in ``order`` before this one are in ``load``
    for at in np.flatnonzero(order >= n_alone).tolist():
        rows = sets.alone_row[order[done:at]]
        np.add.at(load, d.rank[rows], d.nbytes[rows])
        _place(d, sets.shared[int(order[at]) - n_alone], fixed, check_replicated, load, writer)
        done = at + 1
    rows = sets.alone_row[order[done:]]
    np.add.at(load, d.rank[rows], d.nbytes[rows])
    return writer, load


def _place(
    d: _Rows,
    c: _Copies,
    fixed: np.ndarray,
    check_replicated: bool,
    load: np.ndarray,
    writer: list[Writer],
) -> None:
    """Choose the ranks that write the replica sets of one key (``balance``)."""
    members, starts = c.members, c.starts
    if check_replicated:
        set_of = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(members))))
        by_load = np.lexsort((load[d.rank[members]], set_of))  # stable: lowest rank on ties
        chosen = members[by_load[starts]]
    else:
        chosen = members[starts]
    np.add.at(load, d.rank[chosen], d.nbytes[chosen])
    rows = d.rows(c.g)
    if d.sharded[rows[0]]:
        writes = np.concatenate([d.rank[rows[fixed[rows]]], d.rank[chosen]])
        writer[c.g] = SomeRanks.of(writes, d.world)
    else:
        writer[c.g] = one_rank(int(d.rank[chosen[0]]))


# -- manifest entries -----------------------------------------------------------------------------
def manifest_entries(d: _Rows) -> list[dict]:
    """The manifest's tensor entries (format.md section 3), from each key's first row."""
    first = pa.array(d.first)
    cols = [
        d.table.column(c).take(first).to_pylist()
        for c in ("dtype", "global_shape", "kind", "device", "requires_grad", "parameter")
    ]
    tensors = [
        {
            "key": key,
            "dtype": dtype,
            "shape": shape,
            "kind": kind,
            "device": device,
            "requires_grad": grad,
            "parameter": param,
        }
        for key, dtype, shape, kind, device, grad, param in zip(d.keys, *cols, strict=True)
    ]
    for g in np.flatnonzero(d.per_rank[d.first]).tolist():
        tensors[g]["per_rank"] = True
    views = d.table.column("view").take(first)
    if views.null_count < len(views):
        _add_views(tensors, d.keys, views.to_pylist())
    return tensors


def _add_views(tensors: list[dict], keys: list[str], views: list[str | None]) -> None:
    """The ``view`` member of each view's entry, its storage named by global id."""
    gid = {k: i for i, k in enumerate(keys)}
    for g, text in enumerate(views):
        if text is None:
            continue
        view = json.loads(text)
        if view["storage"] not in gid:
            raise PlanError(f"tensor {keys[g]!r} is a view of {view['storage']!r}, not saved")
        tensors[g]["view"] = {**view, "storage": gid[view["storage"]]}


def make_plan(descs: list[pa.Table], check_replicated: bool = True) -> Plan:
    """Merge every rank's description (``descs[r]`` is rank r's) into one plan."""
    d = _Rows(descs)
    if d.n == 0:
        return Plan([], [], [], [0] * len(descs))
    check_agreement(d)
    sets, differing, fixed = replica_sets(d, check_replicated)
    writer, load = balance(d, sets, fixed, check_replicated)
    return Plan(manifest_entries(d), d.keys, writer, load.tolist(), differing)


def warn_differing(keys: list[str], world: int) -> None:
    """Warn, after the commit, that these replicated tensors differed between the ranks."""
    shown = ", ".join(map(repr, keys[:8])) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    warnings.warn(
        ReplicaMismatchWarning(
            f"check_replicated=False: replicated tensor(s) {shown} differ between the {world} "
            "ranks; the lowest rank's copy is saved and every rank will load it. Wrap values "
            "that are each rank's own in ckptguard.PerRank"
        ),
        stacklevel=5,
    )
