"""Vectorized checks of an index table against format.md section 4.

Rank 0 runs them on every save over all ranks' rows, and readers on every open, so they must be
linear (or n log n) in rows: columns are checked as numpy arrays, shard coverage by painting a
grid of the shards' cut points, never by comparing every pair of shards.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import dtypes
from .datafile import CODECS, ZSTD_FEATURE, FormatError, lz4_max_raw_len, zstd_exceeds
from .encryption import TAG_BYTES
from .index import DIGEST, DIGESTS, has_digests, int_lists
from .layout import is_key_id, is_name
from .placement import Records as _Records
from .placement import Rows as _Rows
from .placement import check_placement
from .placement import col as _np
from .placement import sort_order as _sort_order
from .shapes import Shapes
from .views import TENSOR_VIEWS, without_views

MAX_GRID_CELLS = 1 << 22


@dataclass(frozen=True)
class _Boxes:
    """Every row's shard box, flat: row ``i`` has ``nd[i]`` dimensions, its offsets and lengths
    at ``offs[row_start[i] : row_start[i] + nd[i]]`` (likewise ``lens``)."""

    tensors: list[dict]
    shapes: Shapes
    nd_t: np.ndarray  # dimensions of each tensor
    tid: np.ndarray  # the tensor of each row
    nd: np.ndarray  # dimensions of each row (its tensor's)
    row_start: np.ndarray
    offs: np.ndarray
    lens: np.ndarray

    @classmethod
    def of(
        cls,
        tensors: list[dict],
        tid: np.ndarray,
        lists: dict[str, np.ndarray],
        shapes: Shapes | None = None,
    ) -> _Boxes:
        shapes = shapes or Shapes.of(tensors)
        nd_t = shapes.nd
        nd = nd_t[tid]
        return cls(
            tensors,
            shapes,
            nd_t,
            tid,
            nd,
            np.cumsum(nd) - nd,
            lists["shard_offsets"],
            lists["shard_lengths"],
        )


def check_table(table: pa.Table, tensors: list[dict], files: dict[str, int], features: set) -> None:
    """Check every rule of section 4. ``files`` maps data file names to their sizes."""
    rows = _Rows(table)
    views = TENSOR_VIEWS in features
    if views:  # a view (section 3.2) has no rows: its storage's rows hold its bytes
        viewed = np.fromiter(("view" in t for t in tensors), dtype=bool, count=len(tensors))
        tensors = without_views(tensors)
    if rows.n == 0:
        for t in tensors:
            if math.prod(t["shape"]):
                raise FormatError(f"tensor {t['key']!r} has elements but no chunks")
        return
    tid = _np(table, "tensor")
    rows.fail((tid < 0) | (tid >= len(tensors)), "tensor id out of range")
    if views:
        rows.fail(viewed[tid], "a row of a view, which has no bytes of its own")
    names = [t["dtype"] for t in tensors]
    for col, values in (("key", [t["key"] for t in tensors]), ("dtype", names)):
        expect = pa.array(values, pa.string()).take(pa.array(tid))
        same = pc.equal(table.column(col), expect).to_numpy(zero_copy_only=False)
        rows.fail(~same, f"{col} disagrees with the manifest's tensor")
    sizes = np.fromiter(map(dtypes.SIZES.get, names, itertools.repeat(0)), np.int64, len(names))
    elem = _np(table, "elem_size")
    rows.fail(elem != sizes[tid], "elem_size does not match the dtype")
    shapes = Shapes.of(tensors)
    lists = _check_shapes(table, rows, shapes, tid)
    raw, sbo, chunk = _np(table, "raw_len"), _np(table, "shard_byte_offset"), _np(table, "chunk")
    rows.fail(
        (raw <= 0) | (raw % elem != 0) | (sbo < 0) | (chunk < 0),
        "bad raw_len, chunk or shard_byte_offset",
    )
    rec = _Records.of(table, rows, raw, features)
    if has_digests(table) != (DIGESTS in features):
        raise FormatError(f"index: the {DIGEST} column without the {DIGESTS} feature or v.v.")
    codec = pc.index_in(table.column("codec"), value_set=pa.array(list(CODECS)))
    rows.fail(codec.is_null().to_numpy(zero_copy_only=False), "unknown codec")
    rec.codec = codec.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    sealed = table.column("key_id").is_valid().to_numpy(zero_copy_only=False)
    rows.fail(sealed & (rec.stored < TAG_BYTES), "sealed chunk shorter than its tag")
    # A sealed payload is the codec's payload and a 16-byte tag (section 4.4).
    is_raw, rlen, stored = rec.codec == CODECS["raw"], rec.raw_len, rec.stored - TAG_BYTES * sealed
    is_zstd = rec.codec == CODECS["shuffle-zstd"]
    rows.fail(is_raw & (stored != rlen), "raw chunk with stored_len != raw_len")
    rows.fail(~is_raw & ((stored <= 0) | (stored >= rlen)), "compressed chunk with bad stored_len")
    rows.fail(
        (rec.codec == CODECS["shuffle-lz4"]) & (rlen > lz4_max_raw_len(stored))
        | is_zstd & zstd_exceeds(rlen, stored),
        "compressed chunk claims more raw bytes than its payload can hold",
    )
    rows.fail(
        is_zstd & (ZSTD_FEATURE not in features), "shuffle-zstd chunk without the zstd feature"
    )
    check_placement(table, rows, files, rec, elem)
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
    _check_shards(_Boxes.of(tensors, tid, lists, shapes), rows, raw, sbo, chunk, elem)


def _check_shapes(table: pa.Table, rows: _Rows, shapes: Shapes, tid: np.ndarray) -> dict:
    """Shapes, offsets and lengths against the manifest; returns the flat list columns."""
    nd_t, shape_flat, shape_start = shapes.nd, shapes.flat, shapes.start
    cols = {}
    for name in ("global_shape", "shard_offsets", "shard_lengths"):
        flat, lens = int_lists(table.column(name))
        rows.fail(lens != nd_t[tid], f"{name} has the wrong number of dimensions")
        cols[name] = flat
    nd = nd_t[tid]
    row_of = np.repeat(np.arange(rows.n), nd)
    within = np.arange(len(row_of)) - np.repeat(np.cumsum(nd) - nd, nd)
    expect = shape_flat[np.repeat(shape_start[tid], nd) + within]
    g, o, n = cols["global_shape"], cols["shard_offsets"], cols["shard_lengths"]

    def per_row(mask: np.ndarray) -> np.ndarray:
        return np.bincount(row_of, weights=mask, minlength=rows.n) > 0

    rows.fail(per_row(g != expect), "global_shape disagrees with the manifest")
    rows.fail(per_row((o < 0) | (n < 0) | (o + n > g)), "shard lies outside the tensor")
    return cols


def _check_shards(
    boxes: _Boxes,
    rows: _Rows,
    raw: np.ndarray,
    sbo: np.ndarray,
    chunk: np.ndarray,
    elem: np.ndarray,
) -> None:
    """Chunks of each shard are numbered from 0 and contiguous; shards tile their tensor.
    ``raw``, ``sbo``, ``chunk``, ``elem``: each row's raw_len, shard_byte_offset, chunk number
    and element size."""
    tensors, tid, nd, row_start = boxes.tensors, boxes.tid, boxes.nd, boxes.row_start
    o_flat, n_flat = boxes.offs, boxes.lens
    # The C-order linear index of a shard's first element identifies it within its tensor.
    start = np.zeros(rows.n, dtype=np.int64)
    volume = np.ones(rows.n, dtype=np.int64)
    for t_nd in np.unique(nd).tolist():
        if t_nd == 0:
            continue
        sel = np.flatnonzero(nd == t_nd)
        base, t_sel = row_start[sel], tid[sel]
        strides = np.zeros((t_nd, len(tensors)), dtype=np.int64)  # per dimension, per tensor
        ids = np.flatnonzero(boxes.nd_t == t_nd)
        strides[:, ids] = boxes.shapes.strides(ids, t_nd).T
        acc, vol = np.zeros(len(sel), dtype=np.int64), np.ones(len(sel), dtype=np.int64)
        for d in range(t_nd):
            acc += o_flat[base + d] * strides[d][t_sel]
            vol *= n_flat[base + d]
        start[sel], volume[sel] = acc, vol
    if not chunk.any():  # every shard one chunk (the usual case at scale): a row is a shard
        order = _sort_order(tid, start)
        tid_f, s_s = tid[order], start[order]
        if not ((tid_f[1:] == tid_f[:-1]) & (s_s[1:] == s_s[:-1])).any():
            rows.fail(sbo != 0, "chunks of a shard are not numbered from 0 or not contiguous")
            rows.fail(raw != volume * elem, "the chunks of a shard do not hold exactly its bytes")
            _check_cover_all(boxes, volume, order, tid_f)
            return
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
        for t_nd in np.unique(nd[mine]).tolist():
            sel = nd[mine] == t_nd
            a, b = row_start[mine[sel]], row_start[lead[sel]]
            differ = np.zeros(len(a), dtype=bool)
            for d in range(t_nd):
                differ |= n_flat[a + d] != n_flat[b + d]
            other[mine[sel]] = differ
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
    _check_cover_all(boxes, volume, firsts, t_s[group_first])


def _check_cover_all(
    boxes: _Boxes, volume: np.ndarray, firsts: np.ndarray, tid_f: np.ndarray
) -> None:
    """``check_cover`` of every tensor, given one row per shard (``firsts``, sorted by tensor
    then start; ``tid_f`` their tensors). Its checks of the usual layout (pieces along one
    dimension, the others whole, or one whole piece) run here for all tensors at once, in row
    order where they can: the shards' volumes add up to the tensor's; along that dimension, in
    ``firsts`` order (by offset there), the first starts at 0 and each next one where the
    previous one ends. Every other tensor, and any that fails, goes through ``check_cover``."""
    tensors, nd_t, tid, row_start = boxes.tensors, boxes.nd_t, boxes.tid, boxes.row_start
    o_flat, n_flat = boxes.offs, boxes.lens
    n_t = len(tensors)
    bounds = np.searchsorted(tid_f, np.arange(n_t + 1))
    count = np.diff(bounds)
    elems, suspect = boxes.shapes.volumes()  # suspect: beyond int64 sums here
    have = count > 0
    covered = np.zeros(n_t, dtype=np.int64)
    covered[have] = np.add.reduceat(volume[firsts], bounds[:-1][have])
    suspect |= np.where(have, covered != elems, elems != 0)  # as check_cover counts first
    # Per tensor, the dimensions along which some shard is not whole (from every row: the rows
    # of one shard have its box), and the offset and length of each row along the one such
    # dimension of its tensor, if one.
    ways = np.zeros(n_t, dtype=np.int64)
    along = np.zeros(n_t, dtype=np.int64)
    o_row, n_row = np.zeros(len(tid), dtype=np.int64), np.zeros(len(tid), dtype=np.int64)
    for t_nd in np.unique(nd_t).tolist():
        if t_nd == 0:
            continue  # a 0-d tensor: one shard of one element, as the volumes said
        in_grp = nd_t == t_nd
        sel = np.flatnonzero(in_grp[tid])
        base, t_sel = row_start[sel], tid[sel]
        shape = np.zeros((t_nd, n_t), dtype=np.int64)
        ids = np.flatnonzero(in_grp)
        shape[:, ids] = boxes.shapes.matrix(ids, t_nd).T
        split = np.zeros((t_nd, n_t), dtype=bool)
        for d in range(t_nd):
            part = (o_flat[base + d] != 0) | (n_flat[base + d] != shape[d][t_sel])
            split[d] = np.bincount(t_sel, weights=part, minlength=n_t) > 0
        ways[in_grp] = split.sum(axis=0)[in_grp]
        along[in_grp] = np.argmax(split, axis=0)[in_grp]
        at = base + along[t_sel]
        o_row[sel], n_row[sel] = o_flat[at], n_flat[at]
    suspect |= ways > 1  # several: check_cover paints a grid
    one = (ways == 1) & ~suspect
    f = np.flatnonzero(one[tid_f])
    t1, rows1 = tid_f[f], firsts[f]
    o, n = o_row[rows1], n_row[rows1]
    first = np.ones(len(t1), dtype=bool)
    first[1:] = t1[1:] != t1[:-1]
    expect = np.zeros(len(t1), dtype=np.int64)
    expect[1:] = o[:-1] + n[:-1]
    expect[first] = 0
    suspect[np.unique(t1[o != expect])] = True
    for t in np.flatnonzero(suspect).tolist():
        sel = firsts[bounds[t] : bounds[t + 1]]
        idx = row_start[sel][:, None] + np.arange(int(nd_t[t]))
        check_cover(tensors[t]["key"], tensors[t]["shape"], o_flat[idx], n_flat[idx])


def check_cover(key: str, shape: list[int], offs: np.ndarray, lens: np.ndarray) -> None:
    """Boxes (one row per shard) must not overlap and must cover ``shape`` exactly."""
    total = math.prod(shape)
    offs, lens = np.asarray(offs, dtype=np.int64), np.asarray(lens, dtype=np.int64)
    if offs.ndim != 2:  # no shards at all
        offs = lens = np.zeros((0, len(shape)), dtype=np.int64)
    vols = lens.prod(axis=1)
    keep = vols > 0 if len(shape) else np.ones(len(offs), dtype=bool)
    offs, lens = offs[keep], lens[keep]
    covered = int(vols[keep].sum()) if len(shape) else len(offs)
    if covered != total:
        raise FormatError(
            f"tensor {key!r}: shards cover {covered} of {total} elements (a gap or an overlap)"
        )
    if len(offs) <= 1:
        return
    split = [
        d for d in range(len(shape)) if (offs[:, d] != 0).any() or (lens[:, d] != shape[d]).any()
    ]
    if len(split) == 1:  # the usual layout: pieces of one dimension, checked in n log n
        d = split[0]
        order = np.argsort(offs[:, d], kind="stable")
        o, n = offs[order, d], lens[order, d]
        if o[0] != 0 or (o[1:] != o[:-1] + n[:-1]).any():
            raise FormatError(f"tensor {key!r}: shards overlap or leave a gap")
        return
    cuts = [
        np.unique(np.concatenate([offs[:, d], offs[:, d] + lens[:, d]])) for d in range(len(shape))
    ]
    cells = math.prod(len(c) - 1 for c in cuts)
    if cells <= MAX_GRID_CELLS and len(shape) <= 8:
        _paint(key, cuts, offs, lens)
    else:
        _pairwise(key, offs, lens)


def _paint(key: str, cuts: list, offs: np.ndarray, lens: np.ndarray) -> None:
    """Count coverage of every grid cell with an n-d difference array: each must be 1."""
    lo = [np.searchsorted(c, offs[:, d]) for d, c in enumerate(cuts)]
    hi = [np.searchsorted(c, offs[:, d] + lens[:, d]) for d, c in enumerate(cuts)]
    diff = np.zeros(tuple(len(c) for c in cuts), dtype=np.int64)
    for corner in itertools.product((0, 1), repeat=len(cuts)):
        idx = tuple(hi[d] if bit else lo[d] for d, bit in enumerate(corner))
        np.add.at(diff, idx, -1 if sum(corner) % 2 else 1)
    for d in range(len(cuts)):
        diff = np.cumsum(diff, axis=d)
    inner = diff[tuple(slice(0, len(c) - 1) for c in cuts)]
    if (inner != 1).any():
        raise FormatError(f"tensor {key!r}: shards overlap")


def _pairwise(key: str, offs: np.ndarray, lens: np.ndarray) -> None:
    ends = offs + lens
    for i in range(len(offs) - 1):
        hit = np.all((offs[i] < ends[i + 1 :]) & (offs[i + 1 :] < ends[i]), axis=1)
        if hit.any():
            raise FormatError(f"tensor {key!r}: shards overlap")
