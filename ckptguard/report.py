"""What ranks send each other during a save, and how rank 0 merges it.

A message is a JSON header followed by opaque parts (JSON texts, Arrow IPC streams), each
length-prefixed; nothing is pickled, so a rank never runs what another sent. Rank ``r``'s
description is ``(header, [tree JSON, description table])``; its report after writing is
``(header, [index rows])`` (no rows when it failed). The outcome rank 0 broadcasts carries the
committed checkpoint's ``CheckpointInfo`` as JSON (``info_to_json`` / ``info_from_json``), also
the form the agent returns a handed-over save's result in.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import xxhash

from .errors import warn_after_commit
from .format.manifest import CheckpointInfo, format_time, parse_time
from .format.ranktrees import TextDiffer
from .format.treeids import remap_tensor_ids

_HEAD = struct.Struct("<QI")  # header length, number of parts
_PART = struct.Struct("<Q")  # part length


def dump_json(doc: Any) -> bytes:
    """Compact JSON (no NaN: every value must read back as it was)."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def pack(doc: dict, *parts: bytes) -> bytes:
    """A message between ranks: the JSON header ``doc``, then ``parts``."""
    head = dump_json(doc)
    out = [_HEAD.pack(len(head), len(parts)), head]
    for p in parts:
        out += [_PART.pack(len(p)), p]
    return b"".join(out)


def unpack(data: bytes) -> tuple[dict, list[memoryview]]:
    """``pack``'s header and parts (views into ``data``, not copies)."""
    view = memoryview(data)
    n, count = _HEAD.unpack_from(view)
    pos = _HEAD.size + n
    doc = json.loads(bytes(view[_HEAD.size : pos]))
    parts = []
    for _ in range(count):
        (k,) = _PART.unpack_from(view, pos)
        parts.append(view[pos + _PART.size : pos + _PART.size + k])
        pos += _PART.size + k
    return doc, parts


def to_ipc(table: pa.Table) -> bytes:
    """A table as one Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: memoryview | bytes) -> pa.Table:
    """The table of an Arrow IPC stream (``to_ipc``)."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def pack_report(doc: dict, rows: pa.Table | None) -> bytes:
    """A rank's report after writing: its status and, when it wrote, its index rows."""
    return pack(doc, *([to_ipc(rows)] if rows is not None else []))


def unpack_report(data: bytes) -> tuple[dict, pa.Table | None]:
    """``pack_report``'s status and index rows (None when the rank sent none)."""
    doc, parts = unpack(data)
    return doc, (from_ipc(parts[0]) if parts else None)


def merge_trees(
    blobs: list[memoryview], descs: list[pa.Table], keys: list[str]
) -> tuple[Any, dict[str, list]]:
    """Rank 0's tree with global tensor ids, and for each rank whose tree differs a diff against
    it (the manifest's ``rank_trees`` under the rank-tree-diffs feature, format.md section 6.1).

    A tree equal to rank 0's as JSON text (the usual case) costs one comparison. A rank whose
    tensors have rank 0's keys in rank 0's order maps local ids to the same global ids, so its
    text is diffed against rank 0's as sent (only the differing values are parsed, then
    remapped); equal texts share one diff. Other ranks' trees are remapped, then diffed against
    rank 0's global tree. Diffs are exact: they are taken on the JSON texts.
    """
    gid: dict[str, int] = {}

    def ids_of(names: list[str]) -> list[int]:
        if names == keys[: len(names)]:  # rank 0's, always: its keys come first in the plan
            return list(range(len(names)))
        if not gid:
            gid.update((k, i) for i, k in enumerate(keys))
        return [gid[k] for k in names]

    key0 = descs[0].column("key")
    ids0 = ids_of(key0.to_pylist())
    blob0 = bytes(blobs[0])
    tree0 = json.loads(blob0)
    if ids0 != list(range(len(ids0))):
        tree0 = remap_tensor_ids(tree0, ids0)
    differs = _Differs(blob0, tree0, ids0)
    seen: dict[bytes, list] = {}  # diffs by the xxh3-128 of a tree's text (rank 0's keys)
    diffs: dict[str, list] = {}
    for r in range(1, len(blobs)):
        b = bytes(blobs[r])
        if descs[r].column("key").equals(key0):
            if b == blob0:
                continue
            h = xxhash.xxh3_128_digest(b)
            if h not in seen:
                seen[h] = differs.diff(b, local=True)
            d = seen[h]
        else:
            ids = ids_of(descs[r].column("key").to_pylist())
            d = differs.diff(dump_json(remap_tensor_ids(json.loads(b), ids)), local=False)
        if d:
            diffs[str(r)] = d
    return tree0, diffs


class _Differs:
    """Diffs against rank 0's tree: as sent (``local``: rank 0's ids) or with global ids.

    Each ``TextDiffer`` is built on first use; a base too deep for this stack to diff against
    gives whole-tree entries instead."""

    def __init__(self, blob0: bytes, tree0: Any, ids0: list[int]) -> None:
        self.blob0, self.tree0, self.ids0 = blob0, tree0, ids0
        self.differs: dict[bool, TextDiffer | None] = {}

    def diff(self, text: bytes, local: bool) -> list:
        d = None
        try:
            if local not in self.differs:
                self.differs[local] = None
                base = self.blob0 if local else dump_json(self.tree0)
                self.differs[local] = TextDiffer(base.decode())
            differ = self.differs[local]
            if differ is not None:
                d = differ.diff(text.decode())
        except (RecursionError, ValueError, IndexError):  # deeper than this stack
            pass
        if d is None:  # the whole tree
            d = [[[], json.loads(text)]]
        return [[p, remap_tensor_ids(v, self.ids0)] for p, v in d] if local else d


def info_to_json(info: CheckpointInfo) -> dict:
    """``info`` as plain JSON (``created`` as the manifest writes it)."""
    doc = asdict(info)
    doc["created"] = format_time(info.created)
    doc["warnings"] = list(info.warnings)
    return doc


def info_from_json(doc: dict) -> CheckpointInfo:
    """The CheckpointInfo that a save's outcome carries; warns of what failed after the commit."""
    late = tuple(str(w) for w in doc.get("warnings") or ())
    for w in late:
        warn_after_commit(w, stacklevel=3)
    return CheckpointInfo(**{**doc, "created": parse_time(doc["created"]), "warnings": late})
