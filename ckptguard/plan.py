"""Save planning on rank 0: one global tensor table from every rank's local description.

Checks that ranks agree (dtype, global shape, kind), that the shards of each sharded tensor
neither overlap nor leave gaps, and that replicated tensors are equal (by hash); then picks one
writer for each replicated tensor, balancing bytes across ranks. Descriptions travel as Arrow
tables and are checked column-wise, so rank 0's work stays linear in ranks x tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .format.datafile import FormatError
from .format.dtypes import SIZES
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
    tensors: list[dict]  # manifest tensor entries, by global id
    keys: list[str]  # key of each global id
    writer: list[int]  # per global id: the rank writing a replicated tensor, or SHARDED
    bytes_per_rank: list[int]


def describe_local(refs: list, hasher) -> pa.Table:  # noqa: ANN001
    """This rank's tensors as a table (hash only for replicated candidates, when given)."""
    cols: dict[str, list] = {name: [] for name in DESC_SCHEMA.names}
    for ref in refs:
        cols["key"].append(ref.key)
        cols["dtype"].append(ref.dtype)
        cols["kind"].append(ref.kind)
        cols["device"].append(ref.device)
        cols["requires_grad"].append(ref.requires_grad)
        cols["parameter"].append(ref.parameter)
        cols["sharded"].append(ref.sharded)
        cols["nbytes"].append(math.prod(ref.shape) * SIZES[ref.dtype])
        cols["hash"].append(None if ref.sharded or hasher is None else hasher(ref))
        cols["global_shape"].append(list(ref.global_shape))
        cols["offsets"].append(list(ref.offsets))
        cols["shape"].append(list(ref.shape))
    return pa.table(cols, schema=DESC_SCHEMA)


def assignment(
    plan_keys: list[str], writer: list[int], refs: list, rank: int
) -> list[tuple[int, bool]]:
    """For each local tensor: (global id, whether this rank writes it)."""
    gid = {k: i for i, k in enumerate(plan_keys)}
    return [(gid[r.key], writer[gid[r.key]] in (SHARDED, rank)) for r in refs]


def _lists(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    col = col.combine_chunks()
    lens = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
    return pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64), lens


def make_plan(descs: list[pa.Table], check_replicated: bool = True) -> Plan:
    """Merge every rank's description (``descs[r]`` is rank r's) into one plan."""
    table = pa.concat_tables(descs)
    n = table.num_rows
    rank = np.repeat(np.arange(len(descs)), [d.num_rows for d in descs])
    enc = pc.dictionary_encode(table.column("key").combine_chunks())
    gid = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    keys = enc.dictionary.to_pylist()  # in order of first appearance
    _, first = np.unique(gid, return_index=True)
    if n == 0:
        return Plan([], [], [], [0] * len(descs))

    def disagree(mask: np.ndarray, field: str) -> None:
        bad = np.flatnonzero(mask)
        if len(bad):
            i = int(bad[0])
            g = int(gid[i])
            a, b = table.column(field)[int(first[g])].as_py(), table.column(field)[i].as_py()
            raise PlanError(
                f"tensor {keys[g]!r}: {field} is {a!r} on rank {rank[first[g]]} but "
                f"{b!r} on rank {rank[i]}"
            )

    firsts = pa.array(first[gid])
    for field in ("dtype", "kind", "sharded"):
        col = table.column(field)
        disagree(~pc.equal(col, col.take(firsts)).to_numpy(zero_copy_only=False), field)
    gflat, glen = _lists(table.column("global_shape"))
    disagree(glen != glen[first[gid]], "global_shape")
    gstart = np.cumsum(glen) - glen
    within = np.arange(len(gflat)) - np.repeat(gstart, glen)
    same = gflat == gflat[np.repeat(gstart[first[gid]], glen) + within]
    bad = np.zeros(n, dtype=bool)
    np.logical_or.at(bad, np.repeat(np.arange(n), glen), ~same)
    disagree(bad, "global_shape")

    sharded = table.column("sharded").to_numpy(zero_copy_only=False)
    nbytes = table.column("nbytes").to_numpy().astype(np.int64)
    load = np.zeros(len(descs), dtype=np.int64)
    np.add.at(load, rank[sharded], nbytes[sharded])
    writer = [SHARDED] * len(keys)
    order = np.argsort(gid, kind="stable")
    bounds = np.searchsorted(gid[order], np.arange(len(keys) + 1))
    oflat, _ = _lists(table.column("offsets"))
    sflat, _ = _lists(table.column("shape"))
    hashes = table.column("hash")
    replicated = []
    for g, key in enumerate(keys):
        rows = order[bounds[g] : bounds[g + 1]]
        if sharded[rows[0]]:
            idx = gstart[rows][:, None] + np.arange(glen[rows[0]])
            try:
                check_cover(key, gflat[idx[0]].tolist(), oflat[idx], sflat[idx])
            except FormatError as e:
                raise PlanError(
                    f"{e} (shards from ranks {sorted(set(rank[rows].tolist()))})"
                ) from None
        else:
            if check_replicated and len(rows) > 1:
                h = hashes.take(pa.array(rows))
                if pc.count_distinct(h).as_py() > 1 or h.null_count:
                    raise PlanError(
                        f"tensor {key!r} is replicated on ranks "
                        f"{rank[rows].tolist()} but their values differ (pass "
                        "check_replicated=False to write one rank's copy)"
                    )
            replicated.append((int(nbytes[rows[0]]), g, rows))
    # Largest first onto the least-loaded holder: a greedy balance of bytes across ranks.
    for size, g, rows in sorted(replicated, key=lambda x: -x[0]):
        holders = rank[rows] if check_replicated else rank[rows[:1]]
        r = int(holders[np.argmin(load[holders])])
        writer[g] = r
        load[r] += size
    tensors = []
    cols = {c: table.column(c) for c in ("dtype", "kind", "device", "requires_grad", "parameter")}
    for g, key in enumerate(keys):
        i = int(first[g])
        tensors.append(
            {
                "key": key,
                "dtype": cols["dtype"][i].as_py(),
                "shape": gflat[gstart[i] : gstart[i] + glen[i]].tolist(),
                "kind": cols["kind"][i].as_py(),
                "device": cols["device"][i].as_py(),
                "requires_grad": cols["requires_grad"][i].as_py(),
                "parameter": cols["parameter"][i].as_py(),
            }
        )
    return Plan(tensors, keys, writer, load.tolist())
