"""``ckptguard.dcp.Reader``: a DCP ``StorageReader`` of ckptguard checkpoints.

DCP's ``Metadata`` is rebuilt from the checkpoint itself, never unpickled: its keys and the
nesting DCP flattened them from (``planner_data``) from the object tree (``nesting.leaves``),
each tensor's dtype and shape from the manifest, its chunks (the boxes DCP plans its reads by)
from the index: the saved shards. The manifest and the index are checked first, as every load
checks them (``open``); each chunk a rank reads is checked against its hash (``loader.fill``):
only the chunks that meet that rank's part of each tensor, at any world size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..api import resolve
from ..errors import CheckpointError, CorruptCheckpointError, UnsupportedObjectError
from ..format.index import int_lists
from ..format.layout import LATEST, MANIFEST
from ..format.treeids import TREE_TYPES, tensor_ids
from ..loader import fill, iter_tensors
from ..open import CheckpointReader
from ..select import Target
from ..tree import TORCH_BY_NAME
from .nesting import NestingError, ObjPath, fqn, leaves
from .values import value_bytes

DCP_VERSION = "1.0.0"
"""The version of DCP's metadata that the rebuilt ``Metadata`` says it is (FileSystemWriter's)."""


class Reader(StorageReader):
    """Load a ckptguard checkpoint through ``dcp.load`` (``path``: a checkpoint, or a store
    meaning its LATEST; or the ``checkpoint_id`` given to ``dcp.load``), resharded to the
    loading job's layout, every chunk read checked (``verify``). Reads checkpoints that
    ``ckptguard.dcp.Writer`` wrote, and those of ``ckptguard.save`` whose state is a dict."""

    def __init__(self, path: str | os.PathLike | None = None, *, verify: bool = True) -> None:
        super().__init__()
        self.path = None if path is None else os.fspath(path)
        self.verify = verify
        self._rd: CheckpointReader | None = None
        self._leaves: dict[str, Any] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self._close()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        p = os.fspath(checkpoint_id)
        return os.path.isfile(os.path.join(p, MANIFEST)) or os.path.isfile(os.path.join(p, LATEST))

    def read_metadata(self) -> Metadata:
        if self.path is None:
            raise ValueError(
                "ckptguard.dcp.Reader has no path: pass Reader(path) or dcp.load(..., "
                "checkpoint_id=path)"
            )
        self._close()
        rd = CheckpointReader(resolve(self.path))
        try:
            metadata, self._leaves = _metadata(rd)
        except BaseException:
            rd.close()
            raise
        self._rd = rd
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        rd = self._rd
        if rd is None:
            raise RuntimeError("ckptguard.dcp.Reader.read_data before read_metadata")
        try:
            self._read(rd, plan.items, planner)
        finally:
            self._close()
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read(self, rd: CheckpointReader, items: Sequence[ReadItem], planner: LoadPlanner) -> None:
        """Values to the planner as bytes; tensors read into the planner's targets in place
        (through a copy of the saved dtype where the target's differs), then committed."""
        targets: list[tuple[int, Target]] = []
        landed: list[tuple[ReadItem, torch.Tensor, torch.Tensor | None]] = []
        types = TREE_TYPES in rd.features
        for item in items:
            if item.storage_index.fqn not in self._leaves:
                raise CheckpointError(f"{rd.path} has no key {item.storage_index.fqn!r}")
            node = self._leaves[item.storage_index.fqn]
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, _value(rd, node, types, self.verify))
                continue
            gid = node["$tensor"]
            dest, tmp, box = _destination(rd, gid, item, planner)
            into = dest if tmp is None else tmp
            if all(box[1]):  # an empty box reads nothing
                targets.append((gid, Target(into, into, box, False)))
            landed.append((item, dest, tmp))
        fill(rd, targets, self.verify)
        for item, dest, tmp in landed:
            if tmp is not None:
                dest.copy_(tmp)
            planner.commit_tensor(item, dest)

    def _close(self) -> None:
        if self._rd is not None:
            self._rd.close()
            self._rd = None


def _destination(
    rd: CheckpointReader, gid: int, item: ReadItem, planner: LoadPlanner
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[tuple[int, ...], tuple[int, ...]]]:
    """The planner's target of a read item, a host copy of the saved dtype where the target's
    differs (None: read in place), and the box of the saved tensor it covers."""
    entry = rd.tensors[gid]
    lengths = tuple(int(n) for n in item.lengths)
    offsets = tuple(
        int(o) + int(s)
        for o, s in zip(item.storage_index.offset or (), item.storage_offsets, strict=True)
    )
    dest = planner.resolve_tensor(item).detach()
    if tuple(dest.shape) != lengths:
        raise CheckpointError(
            f"tensor {entry['key']!r}: DCP's planner gave a target of shape {list(dest.shape)} "
            f"for {list(lengths)} elements of the saved tensor"
        )
    saved = TORCH_BY_NAME[entry["dtype"]]
    tmp = None if dest.dtype == saved else torch.empty(lengths, dtype=saved)
    return dest, tmp, (offsets, lengths)


def _value(rd: CheckpointReader, node: Any, types: bool, verify: bool) -> Any:
    """The bytes DCP's planner takes for a value leaf (its tensors, if any, read whole)."""
    ids = tensor_ids(node)
    loaded: list[Any] = [None] * len(rd.tensors)
    for gid, t in iter_tensors(rd, ids, verify=verify):
        loaded[gid] = t

    def error(why: str) -> Exception:
        return UnsupportedObjectError(f"{rd.path}: a value cannot be given to DCP: {why}")

    return value_bytes(node, loaded, types, error)


def _metadata(rd: CheckpointReader) -> tuple[Metadata, dict[str, Any]]:
    """DCP's metadata of an open checkpoint, and the tree node of each of its keys."""
    entries = rd.tensors

    def torch_tensor(node: Any) -> bool:
        gid = node.get("$tensor") if type(node) is dict and len(node) == 1 else None
        return type(gid) is int and 0 <= gid < len(entries) and entries[gid]["kind"] == "torch"

    try:
        found = leaves(rd.manifest["tree"], torch_tensor)
    except NestingError as e:
        raise UnsupportedObjectError(f"{rd.path} cannot be read through DCP: {e}") from None
    chunks = _chunks(rd)
    state: dict[str, Any] = {}
    paths: dict[str, ObjPath] = {}
    nodes: dict[str, Any] = {}
    for path, node in found:
        key = fqn(path)
        if key in nodes:
            raise CorruptCheckpointError(
                f"{rd.path}: two values of the object tree have the DCP key {key!r}",
                path=rd.path,
                file=MANIFEST,
            )
        nodes[key], paths[key] = node, path
        state[key] = (
            _tensor_md(entries, chunks, node) if torch_tensor(node) else BytesStorageMetadata()
        )
    meta = StorageMeta(checkpoint_id=rd.path, save_id=rd.manifest["uuid"])
    md = Metadata(state, planner_data=paths, storage_meta=meta, version=DCP_VERSION)
    return md, nodes


def _tensor_md(entries: list[dict], chunks: dict[int, list], node: dict) -> TensorStorageMetadata:
    gid = node["$tensor"]
    e = entries[gid]
    dtype = TORCH_BY_NAME.get(e["dtype"])
    if dtype is None:
        raise UnsupportedObjectError(
            f"this torch has no dtype {e['dtype']!r} (tensor {e['key']!r})", e["key"]
        )
    shape = torch.Size(e["shape"])
    boxes = chunks.get(gid) or [ChunkStorageMetadata(torch.Size([0] * len(shape)), shape)]
    props = TensorProperties(dtype=dtype, requires_grad=bool(e["requires_grad"]))
    return TensorStorageMetadata(props, shape, boxes)


def _chunks(rd: CheckpointReader) -> dict[int, list[ChunkStorageMetadata]]:
    """The saved shards of each tensor (its rows that are a shard's first chunk), as DCP's
    chunks, in index order."""
    t = rd.table
    first = t.filter(pa.array(t.column("chunk").to_numpy() == 0))
    offs, nd = int_lists(first.column("shard_offsets"))
    lens, _ = int_lists(first.column("shard_lengths"))
    starts = np.cumsum(nd) - nd
    out: dict[int, list[ChunkStorageMetadata]] = {}
    for i, gid in enumerate(first.column("tensor").to_numpy().tolist()):
        a, b = int(starts[i]), int(starts[i] + nd[i])
        box = ChunkStorageMetadata(torch.Size(offs[a:b].tolist()), torch.Size(lens[a:b].tolist()))
        out.setdefault(gid, []).append(box)
    return out
