"""The scalar load planner: the reference that ``ckptguard.select``'s vectorised one must equal.

Row by row in Python, as the definition reads: group one tensor's saved rows by shard, keep the
shards that meet the wanted box, and of each the chunks overlapping the bytes of the
first-dimension rows the box needs (all chunks of a 0-d shard).
"""

from __future__ import annotations

import math

import pyarrow as pa

from ckptguard.format.index import SCHEMA, Row
from ckptguard.select import Box, Piece, intersect


def plan_reads(rows: list[Row], want: Box) -> list[Piece]:
    """Pieces (with the chunks each needs) covering ``want`` from one tensor's saved rows."""
    shards: dict[Box, list[Row]] = {}
    for r in rows:
        shards.setdefault((r.shard_offsets, r.shard_lengths), []).append(r)
    pieces = []
    for shard, srows in shards.items():
        if not shard[1]:
            pieces.append(Piece(shard, shard, srows[0].elem_size, 0, 1, srows))
            continue
        ov = intersect(shard, want)
        if ov is None:
            continue
        row0 = ov[0][0] - shard[0][0]
        p = Piece(shard, ov, srows[0].elem_size, row0, row0 + ov[1][0])
        lo, hi = p.span
        p.rows = [
            r for r in srows if r.shard_byte_offset < hi and r.shard_byte_offset + r.raw_len > lo
        ]
        pieces.append(p)
    return pieces


def index_table(
    tensors: list[tuple[list[int], list[tuple[tuple, tuple]], int]], keys: list[str] | None = None
) -> pa.Table:
    """An index of float32 tensors (shape, saved shard boxes, chunk bytes) of one rank's data
    file, raw codec; tensor ``t`` is named ``keys[t]`` (default ``t<t>``)."""
    rows = []
    for t, (shape, shards, chunk_bytes) in enumerate(tensors):
        for o, n in shards:
            total = math.prod(n) * 4
            for c, pos in enumerate(range(0, max(total, 1), chunk_bytes)):
                raw = min(chunk_bytes, total - pos) if total else 0
                rows.append(
                    {
                        "key": keys[t] if keys else f"t{t}",
                        "tensor": t,
                        "dtype": "float32",
                        "global_shape": shape,
                        "shard_offsets": list(o),
                        "shard_lengths": list(n),
                        "chunk": c,
                        "shard_byte_offset": pos,
                        "raw_len": raw,
                        "rank": 0,
                        "file": "rank-00000.ckg",
                        "offset": 4096 * (len(rows) + 1),
                        "stored_len": raw,
                        "codec": "raw",
                        "elem_size": 4,
                        "hash": bytes(16),
                        "base": None,
                        "key_id": None,
                    }
                )
    return pa.Table.from_pylist(rows, schema=SCHEMA)
