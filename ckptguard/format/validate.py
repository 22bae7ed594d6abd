"""Vectorized checks of an index table against format.md section 4.

Rank 0 runs them on every save over all ranks' rows, and readers on every open, so they must be
linear (or n log n) in rows: columns are checked as numpy arrays, row-local rules a block of
rows at a time (fresh memory for whole-column temporaries costs more than the checks at ten
million rows), the usual shard layouts of all tensors at once, and any other layout by
``cover``, never by comparing every pair of shards.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import dtypes
from .cover import check_cover
from .datafile import CODECS, ZSTD_FEATURE, FormatError, lz4_max_raw_len, zstd_exceeds
from .encryption import TAG_BYTES
from .index import DIGEST, DIGESTS, has_digests, int_lists, one_array
from .layout import is_key_id, is_name
from .placement import Records as _Records
from .placement import Rows as _Rows
from .placement import blocks, check_placement, per_block
from .placement import col as _np
from .placement import sort_order as _sort_order
from .shapes import Shapes
from .views import TENSOR_VIEWS, without_views

_LISTS = ("shard_offsets", "shard_lengths", "global_shape")
_ALL = slice(None)


@dataclass(frozen=True)
class _Group:
    """The rows whose tensors have ``nd`` dimensions: their row numbers ``rows`` (None: every
    row, in order), their tensors ``tid``, and one row each (``len(tid)`` x ``nd``) of their
    shard offsets, shard lengths and, where given, global shapes; ``shape``: the shape in the
    manifest of every tensor of ``nd`` dimensions (a row per tensor id, zeros for the others).
    Each check reads them a dimension (a column) at a time: numpy reduces and gathers narrow
    rows several times slower than columns."""

    nd: int
    rows: np.ndarray | None
    tid: np.ndarray
    offs: np.ndarray
    lens: np.ndarray
    shape: np.ndarray
    gshape: np.ndarray | None = None


@dataclass(frozen=True)
class _Boxes:
    """Every row's shard box, grouped by the number of dimensions of its tensor. When every
    tensor has as many (the usual case), there is one group and its offsets and lengths are
    the flat list columns reshaped (no copy); otherwise row ``i`` is in group ``group[i]`` at
    position ``at[i]``. Matrices, not per-dimension gathers: each check reads a dimension as a
    column of them."""

    tensors: list[dict]
    shapes: Shapes
    tid: np.ndarray
    groups: list[_Group]
    group: np.ndarray | None
    at: np.ndarray | None

    @classmethod
    def of(
        cls,
        tensors: list[dict],
        tid: np.ndarray,
        lists: dict[str, np.ndarray],
        shapes: Shapes | None = None,
        kinds: list[int] | None = None,
    ) -> _Boxes:
        """The boxes of rows of tensors ``tid`` (in range) whose flat ``shard_offsets`` and
        ``shard_lengths`` (``lists``, and ``global_shape`` if there) have the dimensions of
        their tensors (checked before); ``kinds``: their numbers of dimensions (``_kinds``)."""
        shapes = shapes or Shapes.of(tensors)
        kinds = _kinds(shapes, tid) if kinds is None else kinds
        n = len(tid)
        one = len(kinds) == 1
        nd = None if one else shapes.nd[tid]
        begin = None if nd is None else np.cumsum(nd) - nd
        group = None if one else np.zeros(n, dtype=np.int64)
        at = None if one else np.zeros(n, dtype=np.int64)
        groups = []
        for j, k in enumerate(kinds):
            if k > 64:  # the manifest's limit (format.md section 3); a cut is a bit per dimension
                raise FormatError(f"index: a tensor of {k} dimensions")
            ids = np.flatnonzero(shapes.nd == k)
            whole = np.zeros((len(tensors), k), dtype=np.int64)
            whole[ids] = shapes.matrix(ids, k)
            if one:
                sel, t_sel = None, tid
                mats = [lists[c].reshape(n, k) if c in lists else None for c in _LISTS]
            else:
                assert group is not None and at is not None and begin is not None
                sel = np.flatnonzero(nd == k)
                t_sel, idx = tid[sel], begin[sel][:, None] + np.arange(k)
                mats = [lists[c][idx] if c in lists else None for c in _LISTS]
                group[sel], at[sel] = j, np.arange(len(sel))
            offs, lens, gshape = mats
            assert offs is not None and lens is not None
            groups.append(_Group(k, sel, t_sel, offs, lens, whole, gshape))
        return cls(tensors, shapes, tid, groups, group, at)

    def where(self, rows: np.ndarray) -> list[tuple[_Group, np.ndarray | slice, np.ndarray]]:
        """For each group holding some of ``rows``: the group, which of ``rows`` it holds (a
        mask, or all of them), and their positions in it."""
        if self.group is None or self.at is None:
            return [(self.groups[0], _ALL, rows)]
        mine = self.group[rows]
        out = []
        for j, g in enumerate(self.groups):
            m = mine == j
            if m.any():
                out.append((g, m, self.at[rows[m]]))
        return out

    def along(self, rows: np.ndarray, dims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The offset and length of each of ``rows`` along its dimension ``dims``."""
        found = self.where(rows)
        if len(found) == 1 and len(dims) and found[0][0].nd:
            g, _, pos = found[0]
            if (dims == dims[0]).all():  # the usual layout: gather two columns, nothing else
                return g.offs[:, int(dims[0])][pos], g.lens[:, int(dims[0])][pos]
        o, n = np.zeros(len(rows), dtype=np.int64), np.zeros(len(rows), dtype=np.int64)
        for g, m, pos in found:
            d = dims[m]
            if not g.nd or not len(d):
                continue
            if (d == d[0]).all():  # one dimension for all (the usual layout): columns
                o[m], n[m] = g.offs[:, int(d[0])][pos], g.lens[:, int(d[0])][pos]
            else:  # the matrices are C-contiguous: element (i, d) is at i * nd + d
                flat = pos * g.nd + d
                o[m], n[m] = g.offs.ravel()[flat], g.lens.ravel()[flat]
        return o, n

    def box(self, t: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The offsets and lengths of ``rows`` (rows of tensor ``t``), one row each."""
        k = int(self.shapes.nd[t])
        found = self.where(rows)
        if not len(rows) or not found:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.int64)
        g, _, pos = found[0]
        return g.offs[pos], g.lens[pos]


@dataclass(frozen=True)
class Shards:
    """What the checks learned of the shards, for the locator (section 4.5) to build or check
    its grids without sorting again: one row per shard (``firsts``, by tensor then start;
    ``tid`` their tensors, ``bounds`` each tensor's range of them), per tensor the number of
    dimensions some shard cuts (``ways``), the lowest of them (``along``) and whether its
    layout is other than pieces along one dimension in order (``irregular``), per row its
    file's position in the manifest's ``files`` (``file_code``), and per tensor whether the
    rows of one of its shards lie in more than one file (``mixed``); per shard (as ``firsts``)
    its offset along its tensor's cut dimension where just one is cut (``cut_at``)."""

    boxes: _Boxes
    firsts: np.ndarray
    tid: np.ndarray
    bounds: np.ndarray
    ways: np.ndarray
    along: np.ndarray
    irregular: np.ndarray
    file_code: np.ndarray
    mixed: np.ndarray
    cut_at: np.ndarray


def check_table(
    table: pa.Table, tensors: list[dict], files: dict[str, int], features: set, whole: bool = True
) -> Shards | None:
    """Check every rule of section 4. ``files`` maps data file names to their sizes. Returns
    the shards (``Shards``) of a table with rows. Not ``whole``: the rows of some data files
    only (a reader that uses the locator, section 4.5), checked by every rule but the cover
    rule; then it returns None."""
    rows = _Rows(table)
    views = TENSOR_VIEWS in features
    if views:  # a view (section 3.2) has no rows: its storage's rows hold its bytes
        viewed = np.fromiter(("view" in t for t in tensors), dtype=bool, count=len(tensors))
        tensors = without_views(tensors)
    if rows.n == 0:
        for t in tensors if whole else ():
            if math.prod(t["shape"]):
                raise FormatError(f"tensor {t['key']!r} has elements but no chunks")
        return None
    tid = _np(table, "tensor")
    rows.fail((tid < 0) | (tid >= len(tensors)), "tensor id out of range")
    if views:
        rows.fail(viewed[tid], "a row of a view, which has no bytes of its own")
    names = [t["dtype"] for t in tensors]
    for col, values in (("key", [t["key"] for t in tensors]), ("dtype", names)):
        rows.fail(
            _differs(table.column(col), values, tid), f"{col} disagrees with the manifest's tensor"
        )
    sizes = np.fromiter(map(dtypes.SIZES.get, names, itertools.repeat(0)), np.int32, len(names))
    elem = _np(table, "elem_size")
    rows.fail(elem != sizes[tid], "elem_size does not match the dtype")
    shapes = Shapes.of(tensors)
    boxes = _check_shapes(table, rows, tensors, shapes, tid)
    raw, sbo, chunk = _np(table, "raw_len"), _np(table, "shard_byte_offset"), _np(table, "chunk")
    rows.fail(
        per_block(
            rows.n,
            lambda b: (raw[b] <= 0) | (raw[b] % elem[b] != 0) | (sbo[b] < 0) | (chunk[b] < 0),
        ),
        "bad raw_len, chunk or shard_byte_offset",
    )
    rec = _Records.of(table, rows, raw, features)
    if has_digests(table) != (DIGESTS in features):
        raise FormatError(f"index: the {DIGEST} column without the {DIGESTS} feature or v.v.")
    _check_codecs(table, rows, rec, features)
    file_code = check_placement(table, rows, files, rec, elem)
    for col, feature in (("base", "incremental"), ("key_id", "encryption")):
        values = table.column(col)
        if values.null_count < rows.n:
            rows.fail(
                values.is_valid().to_numpy(zero_copy_only=False) & (feature not in features),
                f"{col} present but the {feature} feature is not declared",
            )
            names = pc.unique(values.drop_null()).to_pylist()
            if col == "base" and not all(is_name(b) for b in names):
                raise FormatError("index: an invalid base checkpoint name")
            if col == "key_id" and not all(is_key_id(k) for k in names):
                raise FormatError("index: a key_id that is not 32 lowercase hex digits")
    return _check_shards(boxes, rows, raw, sbo, chunk, elem, file_code, whole)


def _check_codecs(table: pa.Table, rows: _Rows, rec: _Records, features: set) -> None:
    """Each row's codec is known and its stored length fits its codec and raw length; sets
    ``rec.codec``."""
    codec = pc.index_in(table.column("codec"), value_set=pa.array(list(CODECS)))
    rows.fail(codec.is_null().to_numpy(zero_copy_only=False), "unknown codec")
    c = rec.codec = codec.fill_null(-1).to_numpy(zero_copy_only=False)
    sealed = table.column("key_id").is_valid().to_numpy(zero_copy_only=False)
    rows.fail(sealed & (rec.stored < TAG_BYTES), "sealed chunk shorter than its tag")
    # A sealed payload is the codec's payload and a 16-byte tag (section 4.4).
    stored = rec.stored - TAG_BYTES * sealed if sealed.any() else rec.stored
    rlen, n = rec.raw_len, rows.n
    raw, lz4, zstd = CODECS["raw"], CODECS["shuffle-lz4"], CODECS["shuffle-zstd"]
    rows.fail(
        per_block(n, lambda b: (c[b] == raw) & (stored[b] != rlen[b])),
        "raw chunk with stored_len != raw_len",
    )
    rows.fail(
        per_block(n, lambda b: (c[b] != raw) & ((stored[b] <= 0) | (stored[b] >= rlen[b]))),
        "compressed chunk with bad stored_len",
    )
    rows.fail(
        per_block(
            n,
            lambda b: (
                (c[b] == lz4) & (rlen[b] > lz4_max_raw_len(stored[b]))
                | (c[b] == zstd) & zstd_exceeds(rlen[b], stored[b])
            ),
        ),
        "compressed chunk claims more raw bytes than its payload can hold",
    )
    if ZSTD_FEATURE not in features:
        rows.fail(c == zstd, "shuffle-zstd chunk without the zstd feature")


def _kinds(shapes: Shapes, tid: np.ndarray) -> list[int]:
    """The numbers of dimensions of the tensors ``tid`` names, ascending."""
    if len(tid) and (shapes.nd == shapes.nd[0]).all():  # every tensor has as many (usual)
        return [int(shapes.nd[0])]
    present = np.bincount(tid, minlength=len(shapes.nd))[: len(shapes.nd)] > 0
    return np.unique(shapes.nd[present]).tolist()


def _differs(col: pa.ChunkedArray, values: list[str], tid: np.ndarray) -> np.ndarray:
    """Rows whose string in ``col`` is not ``values[tid]``. A block of rows at a time: the
    expected strings of every row at once would be a whole string column of fresh memory."""
    col = one_array(col)
    if len(set(values)) == 1:  # one dtype for every tensor, the usual case
        return ~pc.equal(col, values[0]).to_numpy(zero_copy_only=False)
    expect, same = pa.array(values, pa.string()), np.empty(len(tid), dtype=bool)
    for b in blocks(len(tid)):
        part = pc.equal(col[b], expect.take(tid[b]))
        same[b] = part.to_numpy(zero_copy_only=False)
    return ~same


def _check_shapes(
    table: pa.Table, rows: _Rows, tensors: list[dict], shapes: Shapes, tid: np.ndarray
) -> _Boxes:
    """Shapes, offsets and lengths against the manifest; returns every row's box."""
    kinds = _kinds(shapes, tid)
    nd = kinds[0] if len(kinds) == 1 else shapes.nd[tid]
    lists = {}
    for name in ("global_shape", "shard_offsets", "shard_lengths"):
        flat, lens = int_lists(table.column(name))
        rows.fail(lens != nd, f"{name} has the wrong number of dimensions")
        lists[name] = flat
    boxes = _Boxes.of(tensors, tid, lists, shapes, kinds)
    wrong, outside = np.zeros(rows.n, dtype=bool), np.zeros(rows.n, dtype=bool)
    for g in boxes.groups:
        assert g.gshape is not None
        at = slice(None) if g.rows is None else g.rows
        w, out = np.zeros(len(g.tid), dtype=bool), np.zeros(len(g.tid), dtype=bool)
        for b in blocks(len(g.tid)):  # row by row: a block's temporaries are reused, not fresh
            t = g.tid[b]
            for d in range(g.nd):
                gs, o, n = g.gshape[b, d], g.offs[b, d], g.lens[b, d]
                w[b] |= gs != g.shape[t, d]
                out[b] |= (o < 0) | (n < 0) | (o + n > gs)
        wrong[at], outside[at] = w, out
    rows.fail(wrong, "global_shape disagrees with the manifest")
    rows.fail(outside, "shard lies outside the tensor")
    return boxes


def _starts(boxes: _Boxes) -> tuple[np.ndarray, np.ndarray]:
    """Each row's shard's start (the C-order linear index of its first element, which
    identifies the shard within its tensor) and volume (elements)."""
    n = len(boxes.tid)
    start, volume = np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)
    for g in boxes.groups:
        if g.nd == 0:
            continue
        strides = np.zeros((len(boxes.tensors), g.nd), dtype=np.int64)
        ids = np.flatnonzero(boxes.shapes.nd == g.nd)
        strides[ids] = boxes.shapes.strides(ids, g.nd)
        s, v = np.zeros(len(g.tid), dtype=np.int64), np.ones(len(g.tid), dtype=np.int64)
        if g.rows is None:  # every row: write in place
            s, v = start, volume
        for b in blocks(len(g.tid)):
            t = g.tid[b]
            for d in range(g.nd):
                s[b] += g.offs[b, d] * strides[t, d]
                v[b] *= g.lens[b, d]
        if g.rows is not None:
            start[g.rows], volume[g.rows] = s, v
    return start, volume


def _by_tensor_then_start(
    tid: np.ndarray, start: np.ndarray, tensors: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows' order by tensor then start, and their tensors and starts in that order. Rows
    of one tensor usually come in order of start already (ranks in order, each holding the
    next piece): then a stable sort by tensor alone is the order, and for up to 65,536
    tensors that is numpy's radix sort of 16-bit keys, a linear pass."""
    if tensors <= 1 << 16:
        order = np.argsort(tid.astype(np.uint16), kind="stable")
        t_s, s_s = tid[order], start[order]
        if not ((t_s[1:] == t_s[:-1]) & (s_s[1:] < s_s[:-1])).any():
            return order, t_s, s_s
    order = _sort_order(tid, start)
    return order, tid[order], start[order]


def _check_shards(
    boxes: _Boxes,
    rows: _Rows,
    raw: np.ndarray,
    sbo: np.ndarray,
    chunk: np.ndarray,
    elem: np.ndarray,
    file_code: np.ndarray,
    whole: bool = True,
) -> Shards | None:
    """Chunks of each shard are numbered from 0 and contiguous; shards tile their tensor.
    ``raw``, ``sbo``, ``chunk``, ``elem``, ``file_code``: each row's raw_len,
    shard_byte_offset, chunk number, element size and file; not ``whole``: no cover check."""
    tid = boxes.tid
    start, volume = _starts(boxes)
    if not chunk.any():  # every shard one chunk (the usual case at scale): a row is a shard
        order, tid_f, s_s = _by_tensor_then_start(tid, start, len(boxes.tensors))
        if not ((tid_f[1:] == tid_f[:-1]) & (s_s[1:] == s_s[:-1])).any():
            rows.fail(sbo != 0, "chunks of a shard are not numbered from 0 or not contiguous")
            rows.fail(
                per_block(rows.n, lambda b: raw[b] != volume[b] * elem[b]),
                "the chunks of a shard do not hold exactly its bytes",
            )
            mixed = np.zeros(len(boxes.tensors), dtype=bool)
            if not whole:
                return None
            return _check_cover_all(boxes, volume, order, tid_f, file_code, mixed)
    order = _sort_order(tid, start, chunk)
    t_s, s_s, c_s = tid[order], start[order], chunk[order]
    new = np.ones(rows.n, dtype=bool)
    new[1:] = (t_s[1:] != t_s[:-1]) | (s_s[1:] != s_s[:-1])
    group = np.cumsum(new) - 1
    group_first = np.flatnonzero(new)
    # Rows starting at the same element of a tensor are one shard: they must agree on its extent
    # (each row against the shard's first row).
    later = np.flatnonzero(~new)
    if len(later):
        mine, lead = order[later], order[group_first[group[later]]]
        other = np.zeros(rows.n, dtype=bool)
        for g, m, pos in boxes.where(mine):
            lead_pos = lead[m] if boxes.at is None else boxes.at[lead[m]]
            differ = np.zeros(len(pos), dtype=bool)
            for d in range(g.nd):
                differ |= g.lens[:, d][pos] != g.lens[:, d][lead_pos]
            other[mine[m]] = differ
        rows.fail(other, "rows of one shard (same tensor and start) disagree on its lengths")
    pos_in_group = np.arange(rows.n) - group_first[group]
    raw_s, sbo_s = raw[order], sbo[order]
    cum = np.cumsum(raw_s) - raw_s
    expect_sbo = cum - cum[group_first][group]
    bad = np.zeros(rows.n, dtype=bool)
    bad[order] = (c_s != pos_in_group) | (sbo_s != expect_sbo)
    rows.fail(bad, "chunks of a shard are not numbered from 0 or not contiguous")
    ends = np.append(group_first[1:], rows.n) - 1
    total = (sbo_s + raw_s)[ends]
    firsts = order[group_first]  # one row per shard (each holds > 0 elements), by tensor, start
    need = volume[firsts] * elem[firsts]
    bad = np.zeros(rows.n, dtype=bool)
    bad[firsts] = total != need
    rows.fail(bad, "the chunks of a shard do not hold exactly its bytes")
    f_s = file_code[order]
    mixed = np.zeros(len(boxes.tensors), dtype=bool)
    mixed[t_s[f_s != f_s[group_first][group]]] = True
    if not whole:
        return None
    return _check_cover_all(boxes, volume, firsts, t_s[group_first], file_code, mixed)


def _check_cover_all(
    boxes: _Boxes,
    volume: np.ndarray,
    firsts: np.ndarray,
    tid_f: np.ndarray,
    file_code: np.ndarray,
    mixed: np.ndarray,
) -> Shards:
    """``check_cover`` of every tensor, given one row per shard (``firsts``, sorted by tensor
    then start; ``tid_f`` their tensors). Its checks of the usual layout (pieces along one
    dimension, the others whole, or one whole piece) run here for all tensors at once, in row
    order where they can: the shards' volumes add up to the tensor's; along that dimension, in
    ``firsts`` order (by offset there), the first starts at 0 and each next one where the
    previous one ends. Every other tensor, and any that fails, goes through ``check_cover``."""
    tensors = boxes.tensors
    n_t = len(tensors)
    bounds = np.searchsorted(tid_f, np.arange(n_t + 1, dtype=tid_f.dtype))
    count = np.diff(bounds)
    elems, suspect = boxes.shapes.volumes()  # suspect: beyond int64 sums here
    have = count > 0
    covered = np.zeros(n_t, dtype=np.int64)
    covered[have] = np.add.reduceat(volume[firsts], bounds[:-1][have])
    suspect |= np.where(have, covered != elems, elems != 0)  # as check_cover counts first
    # Per tensor, the dimensions along which some shard is not whole (from every row, in row
    # order: the rows of one shard have its box), and the lowest of them.
    ways, along = np.zeros(n_t, dtype=np.int64), np.zeros(n_t, dtype=np.int64)
    for g in boxes.groups:
        if g.nd == 0:
            continue  # a 0-d tensor: one shard of one element, as the volumes said
        split = np.zeros((n_t, g.nd), dtype=bool)
        for b in blocks(len(g.tid)):
            tb = g.tid[b]
            for d in range(g.nd):
                split[tb[(g.offs[b, d] != 0) | (g.lens[b, d] != g.shape[tb, d])], d] = True
        ways += split.sum(axis=1)
        along += np.argmax(split, axis=1)  # 0 for the tensors of other groups
    suspect |= ways > 1  # several: check_cover paints a grid
    one = (ways == 1) & ~suspect
    rows1, t1 = firsts, tid_f  # the shards of those tensors (usually all), by tensor and start
    if not one[tid_f].all():
        f = np.flatnonzero(one[tid_f])
        rows1, t1 = firsts[f], tid_f[f]
    o, n = boxes.along(rows1, along[t1])
    first = np.ones(len(t1), dtype=bool)
    first[1:] = t1[1:] != t1[:-1]
    expect = np.zeros(len(t1), dtype=np.int64)
    np.add(o[:-1], n[:-1], out=expect[1:])
    expect[first] = 0
    suspect[np.unique(t1[o != expect])] = True
    for t in np.flatnonzero(suspect).tolist():
        offs, lens = boxes.box(t, firsts[bounds[t] : bounds[t + 1]])
        check_cover(tensors[t]["key"], tensors[t]["shape"], offs, lens)
    cut_at = o
    if len(rows1) < len(firsts):
        cut_at = np.zeros(len(firsts), dtype=np.int64)
        cut_at[f] = o
    return Shards(boxes, firsts, tid_f, bounds, ways, along, suspect, file_code, mixed, cut_at)
