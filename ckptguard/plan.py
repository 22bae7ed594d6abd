"""Save planning on rank 0: one global tensor table from every rank's local description.

Checks that ranks agree (dtype, global shape, kind), that the shards of each sharded tensor
neither overlap nor leave gaps, and that replicated tensors are equal (by hash); then picks one
writer for each replicated tensor, balancing bytes across ranks. A shard whose box (offsets and
shape) several ranks hold, as on a mesh with a Replicate and a Shard dimension (HSDP), is a
replicated box: checked and written once like a replicated tensor. Descriptions travel as Arrow
tables and are checked column-wise, so rank 0's work stays linear in ranks x tensors.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .format.datafile import FormatError
from .format.dtypes import SIZES
from .format.index import int_lists
from .format.validate import check_cover

SHARDED = -1  # writer of a sharded tensor: every rank writes its own piece

DESC_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("dtype", pa.string()),
        ("kind", pa.string()),
        ("device", pa.string()),
        ("requires_grad", pa.bool_()),
        ("parameter", pa.bool_()),
        ("sharded", pa.bool_()),
        ("per_rank", pa.bool_()),
        ("nbytes", pa.int64()),
        ("hash", pa.binary(16)),
        ("global_shape", pa.list_(pa.int64())),
        ("offsets", pa.list_(pa.int64())),
        ("shape", pa.list_(pa.int64())),
    ]
)


class PlanError(ValueError):
    """The ranks' states do not fit together; the message names the key and ranks."""


@dataclass
class Plan:
    """``writer[g]`` is the rank writing replicated tensor g, SHARDED when every rank writes its
    piece of sharded tensor g, or (a sharded tensor with replicated boxes) a string: the base64
    bitmap of the ranks that write their piece (bit r of byte r // 8), one per distinct box."""

    tensors: list[dict]  # manifest tensor entries, by global id
    keys: list[str]  # key of each global id
    writer: list[int | str]  # per global id, see above (JSON-ready)
    bytes_per_rank: list[int]
    differing: list[str] = field(default_factory=list)
    """Unchecked replicas (``check_replicated=False``) whose copies differ: one rank's is saved."""


def bind_per_rank(refs: list, rank: int, world: int) -> None:
    """Make each ``PerRank`` tensor of this rank row ``rank`` of a tensor of ``world`` rows: a
    shard of shape (1, *shape) at (rank, 0, ...), the only copy of its box."""
    for ref in refs:
        if ref.per_rank:
            shape = tuple(ref.shape)
            ref.shape, ref.global_shape = (1, *shape), (world, *shape)
            ref.offsets = (rank,) + (0,) * len(shape)
            ref.sharded = ref.unique_box = True


def describe_local(refs: list, hasher) -> pa.Table:  # noqa: ANN001
    """This rank's tensors as a table (hash only for replicated candidates, when given: every
    tensor and shard but those known to be the only copy of their box, ``ref.unique_box``)."""
    cols: dict[str, list] = {name: [] for name in DESC_SCHEMA.names}
    for ref in refs:
        cols["key"].append(ref.key)
        cols["dtype"].append(ref.dtype)
        cols["kind"].append(ref.kind)
        cols["device"].append(ref.device)
        cols["requires_grad"].append(ref.requires_grad)
        cols["parameter"].append(ref.parameter)
        cols["sharded"].append(ref.sharded)
        cols["per_rank"].append(ref.per_rank)
        cols["nbytes"].append(math.prod(ref.shape) * SIZES[ref.dtype])
        cols["hash"].append(None if ref.unique_box or hasher is None else hasher(ref))
        cols["global_shape"].append(list(ref.global_shape))
        cols["offsets"].append(list(ref.offsets))
        cols["shape"].append(list(ref.shape))
    return pa.table(cols, schema=DESC_SCHEMA)


def assignment(
    plan_keys: list[str], writer: list[int], refs: list, rank: int
) -> list[tuple[int, bool]]:
    """For each local tensor: (global id, whether this rank writes it)."""
    gid = {k: i for i, k in enumerate(plan_keys)}
    out = []
    for r in refs:
        g = gid[r.key]
        w = writer[g]
        if isinstance(w, str):  # bitmap of the ranks writing their piece
            bits = base64.b64decode(w)
            out.append((g, rank >> 3 < len(bits) and bool(bits[rank >> 3] >> (rank & 7) & 1)))
        else:
            out.append((g, w in (SHARDED, rank)))
    return out


def _bitmap(ranks: np.ndarray, world: int) -> str:
    mask = np.zeros(world, dtype=bool)
    mask[ranks] = True
    return base64.b64encode(np.packbits(mask, bitorder="little").tobytes()).decode()


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


def _codes(col: pa.ChunkedArray) -> np.ndarray:
    """A string column as integer codes: equal strings, equal codes."""
    return pc.dictionary_encode(col.combine_chunks()).indices.to_numpy(zero_copy_only=False)


def _hashes(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """The hash column as (valid mask, n x 16 bytes)."""
    arr = col.combine_chunks()
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    data = arr.buffers()[1]
    if data is None:  # every hash null
        return valid, np.zeros((len(arr), 16), dtype=np.uint8)
    raw = np.frombuffer(data, dtype=np.uint8)[arr.offset * 16 : (arr.offset + len(arr)) * 16]
    return valid, raw.reshape(len(arr), 16)


def _differing(
    members: np.ndarray, starts: np.ndarray, valid: np.ndarray, hashes: np.ndarray
) -> int | None:
    """The first replica set (``members[starts[j]:starts[j + 1]]``, rows of the description) whose
    copies are not all hashed and equal, or None."""
    counts = np.diff(np.append(starts, len(members)))
    head = members[np.repeat(starts, counts)]  # each member's set's first copy
    bad = ~valid[members] | ~valid[head] | (hashes[members] != hashes[head]).any(axis=1)
    bad &= np.repeat(counts > 1, counts)  # a tensor on one rank only has nothing to match
    if not bad.any():
        return None
    return int(np.searchsorted(starts, np.flatnonzero(bad)[0], side="right") - 1)


def make_plan(descs: list[pa.Table], check_replicated: bool = True) -> Plan:
    """Merge every rank's description (``descs[r]`` is rank r's) into one plan."""
    table = pa.concat_tables(descs)
    n = table.num_rows
    rank = np.repeat(np.arange(len(descs)), [d.num_rows for d in descs])
    enc = pc.dictionary_encode(table.column("key").combine_chunks())
    gid = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    keys = enc.dictionary.to_pylist()  # in order of first appearance
    if n == 0:
        return Plan([], [], [], [0] * len(descs))
    order = np.argsort(gid, kind="stable")  # each key's rows, in rank order
    bounds = np.searchsorted(gid[order], np.arange(len(keys) + 1))
    first = order[bounds[:-1]]

    def disagree(mask: np.ndarray, name: str) -> None:
        bad = np.flatnonzero(mask)
        if len(bad):
            i = int(bad[0])
            g = int(gid[i])
            a, b = table.column(name)[int(first[g])].as_py(), table.column(name)[i].as_py()
            hint = " (wrap it in ckptguard.PerRank on every rank)" if name == "per_rank" else ""
            raise PlanError(
                f"tensor {keys[g]!r}: {name} is {a!r} on rank {rank[first[g]]} but "
                f"{b!r} on rank {rank[i]}{hint}"
            )

    head = first[gid]  # each row's key's first row
    for name in ("dtype", "kind"):
        codes = _codes(table.column(name))
        disagree(codes != codes[head], name)
    per_rank = table.column("per_rank").to_numpy(zero_copy_only=False)
    disagree(per_rank != per_rank[head], "per_rank")  # before the sharding it implies
    sharded = table.column("sharded").to_numpy(zero_copy_only=False)
    disagree(sharded != sharded[head], "sharded")
    gflat, glen = int_lists(table.column("global_shape"))
    disagree(glen != glen[head], "global_shape")
    gstart = np.cumsum(glen) - glen
    within = np.arange(len(gflat)) - np.repeat(gstart, glen)
    differ = np.flatnonzero(gflat != gflat[np.repeat(gstart[head], glen) + within])
    bad = np.zeros(n, dtype=bool)
    bad[np.searchsorted(gstart, differ, side="right") - 1] = True  # the rows holding them
    disagree(bad, "global_shape")

    nbytes = table.column("nbytes").to_numpy().astype(np.int64)
    oflat, _ = int_lists(table.column("offsets"))
    sflat, _ = int_lists(table.column("shape"))
    volume = np.ones(n, dtype=np.int64)  # elements in each row's box
    for d in range(int(glen.max())):
        has = np.flatnonzero(glen > d)
        volume[has] *= sflat[gstart[has] + d]
    hashes = None  # (valid, bytes) of the hash column, once a replica set needs checking
    fixed = sharded.copy()  # rows their own rank writes whatever the balance: shard pieces
    differing: list[str] = []  # keys of unchecked replicas whose copies differ
    sets = []  # per key with copies: (bytes, global id, rows of its replica sets, set starts)
    for g, key in enumerate(keys):
        rows = order[bounds[g] : bounds[g + 1]]
        if sharded[rows[0]]:
            idx = gstart[rows][:, None] + np.arange(glen[rows[0]])
            shape, offs, lens = gflat[idx[0]].tolist(), oflat[idx], sflat[idx]
            local = starts = np.zeros(0, dtype=np.int64)
            cover = offs, lens
            if volume[rows].sum() > math.prod(shape):  # more elements than the tensor
                local, starts = replica_groups(offs, lens)
                keep = np.ones(len(rows), dtype=bool)
                keep[local] = False
                keep[local[starts]] = True  # one box of each replica set counts for the cover
                cover = offs[keep], lens[keep]
            try:
                check_cover(key, shape, *cover)
            except FormatError as e:
                raise PlanError(
                    f"{e} (shards from ranks {sorted(set(rank[rows].tolist()))})"
                ) from None
            if not len(local):
                continue
            members = rows[local]
            fixed[members] = False
        else:
            members, starts = rows, np.zeros(1, dtype=np.int64)
        j = None
        if len(members) > 1:
            hashes = hashes or _hashes(table.column("hash"))
            j = _differing(members, starts, *hashes)
        if j is not None and not check_replicated:
            if hashes[0][members].all():  # hashed copies that differ (unhashed: unknown)
                differing.append(key)
            j = None
        if j is not None:
            copies = members[starts[j] : np.append(starts, len(members))[j + 1]]
            what = repr(key)
            if sharded[rows[0]]:
                i = local[starts[j]]
                what += f": its shard at offsets {offs[i].tolist()} of shape {lens[i].tolist()}"
            raise PlanError(
                f"tensor {what} is replicated on ranks {rank[copies].tolist()} but their values "
                "differ. If each rank's value is its own (an RNG state), wrap it in "
                "ckptguard.PerRank and every rank gets its own back; pass check_replicated=False "
                "only to save the lowest rank's copy for every rank"
            )
        sets.append((int(nbytes[members].max()), g, members, starts))
    load = np.zeros(len(descs), dtype=np.int64)
    np.add.at(load, rank[fixed], nbytes[fixed])
    writer: list[int | str] = [SHARDED] * len(keys)
    # Largest first onto the least-loaded holder: a greedy balance of bytes across ranks. The
    # replica sets of one key have disjoint holders (a rank holds one box of a key), so they are
    # placed together.
    for _, g, members, starts in sorted(sets, key=lambda x: -x[0]):
        if len(members) == 1:  # one holder (every tensor of a one-rank save): no choice
            r = int(rank[members[0]])
            load[r] += nbytes[members[0]]
            writer[g] = r
            continue
        if check_replicated:
            set_of = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(members))))
            by_load = np.lexsort((load[rank[members]], set_of))  # stable: lowest rank on ties
            chosen = members[by_load[starts]]
        else:  # unchecked copies may differ: always write the lowest rank's
            chosen = members[starts]
        np.add.at(load, rank[chosen], nbytes[chosen])
        rows = order[bounds[g] : bounds[g + 1]]
        if sharded[rows[0]]:
            writes = np.concatenate([rank[rows[fixed[rows]]], rank[chosen]])
            writer[g] = _bitmap(writes, len(descs))
        else:
            writer[g] = int(rank[chosen[0]])
    tensors = []
    cols = {c: table.column(c) for c in ("dtype", "kind", "device", "requires_grad", "parameter")}
    for g, key in enumerate(keys):
        i = int(first[g])
        entry = {
            "key": key,
            "dtype": cols["dtype"][i].as_py(),
            "shape": gflat[gstart[i] : gstart[i] + glen[i]].tolist(),
            "kind": cols["kind"][i].as_py(),
            "device": cols["device"][i].as_py(),
            "requires_grad": cols["requires_grad"][i].as_py(),
            "parameter": cols["parameter"][i].as_py(),
        }
        if per_rank[i]:
            entry["per_rank"] = True
        tensors.append(entry)
    return Plan(tensors, keys, writer, load.tolist(), differing)
