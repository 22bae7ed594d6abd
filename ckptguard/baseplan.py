"""The base of an incremental save (docs/format.md section 4.3; ``reuse`` links its files): which
checkpoint of the store, and which of its data files each rank links."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from .format.layout import INDEX, check_name, linked_file, linked_name
from .fsutil import read_manifest, read_member
from .store import Store

__all__ = ["link_plan"]


def link_plan(store: str, base: str | None, max_depth: int) -> dict | None:
    """The base of an incremental save into ``store`` (format.md section 4.3; ``reuse``): for
    ``base`` ``"auto"`` the checkpoint LATEST names, else the one named; None for a full save
    (no base, ``"auto"`` without a readable LATEST checkpoint, or a base whose depth is
    already ``max_depth``). CheckpointNotFoundError or CorruptCheckpointError for a named base
    that is missing or damaged."""
    if base is None or max_depth <= 0:
        return None
    auto = base == "auto"
    try:
        name = Store(store).latest_name() if auto else check_name(base)
        if name is None:
            return None
        path = os.path.join(os.path.abspath(store), name)
        try:
            _, body = read_manifest(path)
        except (FileNotFoundError, NotADirectoryError):
            raise CheckpointNotFoundError(f"base checkpoint {path} does not exist") from None
        depth = body["incremental"]["depth"] if "incremental" in body else 0
        if depth >= max_depth:
            return None
        holders = _holders(path, body) if any(linked_file(f["name"]) for f in body["files"]) else {}
    except (CheckpointError, OSError):
        if auto:
            return None  # nothing to compare with: a full save, as without a base
        raise
    files: dict[str, list[list[str]]] = {}
    for f in body["files"]:
        linked = linked_file(f["name"])
        dst = f["name"] if linked else linked_name(f["rank"], body["uuid"])
        holder = holders.get(f["name"], name) if linked else name
        files.setdefault(str(f["rank"]), []).append([f["name"], dst, holder])
    return {"name": name, "uuid": body["uuid"], "depth": depth, "path": path, "files": files}


def _holders(path: str, body: dict) -> dict[str, str]:
    """Which checkpoint wrote each linked data file of a base (its index's ``base`` column)."""
    data = read_member(path, INDEX, size=body["index"]["size"])
    if xxhash.xxh3_128_hexdigest(data) != body["index"]["xxh3_128"]:
        raise CorruptCheckpointError(
            "index.parquet does not match the hash in the manifest", path=path, file=INDEX
        )
    table = pq.read_table(pa.BufferReader(data), columns=["file", "base"])
    pairs = pc.unique(pc.binary_join_element_wise(table.column("file"), table.column("base"), "/"))
    return dict(p.split("/", 1) for p in pairs.drop_null().to_pylist())
