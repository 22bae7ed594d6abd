"""The coordinator's plan of a DCP save as a ckptguard checkpoint: from DCP's global save plans
(every rank's write items, replicas already given to one rank each), the manifest's tensor
entries, a tensor id per DCP key, where each key sits in the object tree, and the tree itself
once the values are known.

DCP writes a tensor as chunks (boxes of the global tensor); each chunk is a shard of the
ckptguard tensor of that key, written by the rank that holds it: the ranks' chunks of one key
cover it exactly (DCP's plan validation and the index validation both check it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

from ..errors import UnsupportedObjectError
from ..tree import TORCH_DTYPES, key_path
from .nesting import NestingError, ObjPath, build, leaf_paths


def tensor_node(gid: int) -> dict:
    """The tree's reference to tensor ``gid``."""
    return {"$tensor": gid}


def is_tensor_node(node: Any) -> bool:
    """Whether a node of a tree this module built references a tensor (they all are torch's)."""
    return type(node) is dict and len(node) == 1 and type(node.get("$tensor")) is int


@dataclass
class Layout:
    """A DCP save as a checkpoint: ``paths`` (every key, tensors and values, in plan order:
    where it sits in the tree), ``tensors`` (the manifest's entries, by id), ``gids`` (the id
    of each tensor's key), ``owned`` (each rank's tensor keys)."""

    paths: dict[str, ObjPath]
    tensors: list[dict]
    gids: dict[str, int]
    owned: list[list[str]] = field(default_factory=list)

    def rank_part(self, rank: int) -> dict[str, list]:
        """What rank ``rank`` needs to write its tensors: key -> [tensor id, tensor key]."""
        return {f: [self.gids[f], self.tensors[self.gids[f]]["key"]] for f in self.owned[rank]}

    def tree(self, values: Mapping[str, Any]) -> dict:
        """The object tree: each tensor's reference and each value's node (``values``: key ->
        tree node, the rank that wrote it reported it) at its path."""
        missing = [f for f in self.paths if f not in self.gids and f not in values]
        if missing:
            raise UnsupportedObjectError(
                f"no rank reported the value of {missing[0]!r} ({len(missing)} missing)",
                missing[0],
            )
        nodes = {f: tensor_node(self.gids[f]) if f in self.gids else values[f] for f in self.paths}
        return build(self.paths, nodes, is_tensor_node)


def plan_layout(plans: Sequence[SavePlan]) -> Layout:
    """The layout of the save of these global plans (rank r's is ``plans[r]``)."""
    first: dict[str, WriteItem] = {}
    owned: list[list[str]] = []
    for plan in plans:
        mine: list[str] = []
        for item in plan.items:
            f = item.index.fqn
            first.setdefault(f, item)
            if item.type != WriteItemType.BYTE_IO and f not in mine:
                mine.append(f)
        owned.append(mine)
    paths = _paths(list(first), plans, first)
    tensors: list[dict] = []
    gids: dict[str, int] = {}
    for f, item in first.items():
        if item.type == WriteItemType.BYTE_IO:
            continue
        gids[f] = len(tensors)
        tensors.append(_entry(f, key_path(paths[f]), item))
    return Layout(paths, tensors, gids, owned)


def _paths(
    fqns: list[str], plans: Sequence[SavePlan], first: Mapping[str, WriteItem]
) -> dict[str, ObjPath]:
    """Each key's path: nested by DCP's flattening mappings where they nest, else flat."""
    maps = [p.planner_data for p in plans]
    merged: dict | None = {}
    for m in maps:
        if not isinstance(m, Mapping) or merged is None:
            merged = None
            continue
        for k, v in m.items():
            merged.setdefault(k, v)
    holders = {f: {"$placeholder": i} for i, f in enumerate(fqns)}
    nodes = {
        f: tensor_node(0) if first[f].type != WriteItemType.BYTE_IO else holders[f] for f in fqns
    }
    for paths in (leaf_paths(fqns, merged), leaf_paths(fqns, None)):
        try:
            build(paths, nodes, is_tensor_node)
            return paths
        except NestingError:
            continue
    bad = next((f for f in fqns if f.startswith("$")), fqns[0] if fqns else "")
    raise UnsupportedObjectError(
        f"the state dict's keys cannot form a ckptguard object tree (a key such as {bad!r} "
        "starting with '$' is reserved for the tree's tags): rename it",
        bad,
    )


def _entry(f: str, key: str, item: WriteItem) -> dict:
    """The manifest's tensor entry of key ``f`` (its device: what the writing ranks report)."""
    td = item.tensor_data
    if td is None:
        raise UnsupportedObjectError(f"DCP's write item of {f!r} describes no tensor", f)
    dtype = TORCH_DTYPES.get(td.properties.dtype)
    if dtype is None:
        raise UnsupportedObjectError(
            f"tensor {f!r} has dtype {td.properties.dtype}, which ckptguard does not store", f
        )
    return {
        "key": key,
        "dtype": dtype,
        "shape": [int(n) for n in td.size],
        "kind": "torch",
        "device": "cpu",
        "requires_grad": bool(td.properties.requires_grad),
        "parameter": False,
    }


def check_metadata(layout: Layout, state_dict_metadata: Mapping[str, Any]) -> None:
    """Refuse a commit whose keys are not those of DCP's own metadata of the save (a planner
    that wrote other items than it described)."""
    ours, theirs = set(layout.paths), set(state_dict_metadata)
    if ours != theirs:
        odd = sorted(ours ^ theirs)
        raise UnsupportedObjectError(
            f"DCP's metadata of the save and its write items disagree on {len(odd)} key(s), "
            f"such as {odd[0]!r}: nothing was committed",
            odd[0],
        )
    for f, gid in layout.gids.items():
        size = getattr(state_dict_metadata[f], "size", None)
        if size is None or [int(n) for n in size] != layout.tensors[gid]["shape"]:
            raise UnsupportedObjectError(
                f"DCP's metadata gives tensor {f!r} another shape than its write items", f
            )
