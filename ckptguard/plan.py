"""Save planning on rank 0: one global tensor table from every rank's local description.

Checks that ranks agree (dtype, global shape, kind), that the shards of each sharded tensor
neither overlap nor leave gaps, and that replicated tensors are equal (by hash); then picks one
writer for each replicated tensor, balancing bytes across ranks. Pure functions on plain data.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from .format.datafile import FormatError
from .format.validate import check_cover


class PlanError(ValueError):
    """The ranks' states do not fit together; the message names the key and ranks."""


@dataclass
class Plan:
    tensors: list[dict]  # manifest tensor entries, by global id
    assign: list[list[tuple[int, bool]]]  # per rank, per local id: (global id, this rank writes)
    bytes_per_rank: list[int]


def make_plan(descs: list[list[dict]], check_replicated: bool = True) -> Plan:
    """``descs[r]`` lists rank r's local tensors: key, dtype, global_shape, offsets, shape, kind,
    device, requires_grad, parameter, sharded, nbytes, hash (replicated candidates only)."""
    order: list[str] = []
    holders: dict[str, list[tuple[int, int]]] = {}
    for rank, desc in enumerate(descs):
        for lid, d in enumerate(desc):
            if d["key"] not in holders:
                holders[d["key"]] = []
                order.append(d["key"])
            holders[d["key"]].append((rank, lid))
    gid = {k: i for i, k in enumerate(order)}
    tensors = []
    assign = [[(-1, False)] * len(desc) for desc in descs]
    load = [0] * len(descs)
    replicated = []
    for key in order:
        entries = [(r, descs[r][lid]) for r, lid in holders[key]]
        first_rank, first = entries[0]
        for r, d in entries[1:]:
            for field in ("dtype", "global_shape", "kind", "sharded"):
                if d[field] != first[field]:
                    raise PlanError(
                        f"tensor {key!r}: {field} is {first[field]!r} on rank "
                        f"{first_rank} but {d[field]!r} on rank {r}"
                    )
        tensors.append(
            {
                "key": key,
                "dtype": first["dtype"],
                "shape": list(first["global_shape"]),
                "kind": first["kind"],
                "device": first["device"],
                "requires_grad": first["requires_grad"],
                "parameter": first["parameter"],
            }
        )
        if first["sharded"]:
            offs = [d["offsets"] for _, d in entries]
            lens = [d["shape"] for _, d in entries]
            try:
                check_cover(key, first["global_shape"], offs, lens)
            except FormatError as e:
                raise PlanError(f"{e} (shards from ranks {[r for r, _ in entries]})") from None
            for r, lid in holders[key]:
                assign[r][lid] = (gid[key], True)
                load[r] += descs[r][lid]["nbytes"]
        else:
            if check_replicated:
                hashes = {d["hash"] for _, d in entries}
                if len(hashes) > 1:
                    ranks = [r for r, _ in entries]
                    raise PlanError(
                        f"tensor {key!r} is replicated on ranks {ranks} but their "
                        "values differ (pass check_replicated=False to write rank "
                        "0's copy)"
                    )
            replicated.append(key)
    # Largest first onto the least-loaded holder: a greedy balance of bytes across ranks.
    replicated.sort(key=lambda k: -descs[holders[k][0][0]][holders[k][0][1]]["nbytes"])
    for key in replicated:
        ranks = holders[key]
        if not check_replicated:
            ranks = ranks[:1]
        heap = [(load[r], r, lid) for r, lid in ranks]
        heapq.heapify(heap)
        _, r, lid = heap[0]
        for r2, lid2 in holders[key]:
            assign[r2][lid2] = (gid[key], r2 == r and lid2 == lid)
        load[r] += descs[r][lid]["nbytes"]
    return Plan(tensors, assign, load)


def describe_local(refs: list, hasher) -> list[dict]:  # noqa: ANN001
    """The per-rank description that make_plan takes (hash only for replicated candidates)."""
    out = []
    for ref in refs:
        nbytes = math.prod(ref.shape) * _elem(ref.dtype)
        out.append(
            {
                "key": ref.key,
                "dtype": ref.dtype,
                "global_shape": list(ref.global_shape),
                "offsets": list(ref.offsets),
                "shape": list(ref.shape),
                "kind": ref.kind,
                "device": ref.device,
                "requires_grad": ref.requires_grad,
                "parameter": ref.parameter,
                "sharded": ref.sharded,
                "nbytes": nbytes,
                "hash": None if ref.sharded or hasher is None else hasher(ref),
            }
        )
    return out


def _elem(dtype: str) -> int:
    from .format.dtypes import SIZES

    return SIZES[dtype]
