"""Megatron-Core ``dist_checkpointing`` save and load strategies over ckptguard.

Every rank's main replicas of its ``ShardedTensor``s are saved as ``ckptguard.Shard``s (key:
the tensor's key, offsets and global shape its own), and its ``ShardedObject``s as plain values
under their unique keys, in one ``ckptguard.save``: one global commit, every chunk hashed. A load
fills each requested ``ShardedTensor``'s data in place from whatever shards overlap it (any
sharding, any number of ranks) and reads each requested object from the rank that saved it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
from megatron.core.dist_checkpointing.mapping import (
    CheckpointingException,
    ShardedObject,
    ShardedTensor,
    is_main_replica,
)
from megatron.core.dist_checkpointing.strategies.base import (
    LoadShardedStrategy,
    SaveShardedStrategy,
    StrategyAction,
    register_default_strategy,
)

from .. import api
from ..errors import UnsupportedObjectError
from ..failpoints import failpoint
from ..loader import fill
from ..open import CheckpointReader
from ..parts import Parts
from ..select import Target, template_targets
from ..shard import Shard
from ..tree import TORCH_BY_NAME

BACKEND, VERSION = "ckptguard", 1
CHECKPOINT = "ckptguard"
"""The checkpoint's name in Megatron's checkpoint directory (a ckptguard store)."""
TENSORS, OBJECTS = "tensors", "objects"
"""The two top-level entries of each rank's saved tree."""


def checkpoint_path(checkpoint_dir: str | Path) -> str:
    return os.path.join(os.fspath(checkpoint_dir), CHECKPOINT)


def as_shard(sh_ten: ShardedTensor) -> Shard:
    """The ``Shard`` a ShardedTensor's data is: its prepended axes as leading dimensions of 1
    (a view: a load fills the ShardedTensor's own data)."""
    if sh_ten.flattened_range is not None:
        raise UnsupportedObjectError(
            f"ShardedTensor {sh_ten.key!r} has a flattened_range, which Megatron-Core no longer "
            "supports and ckptguard cannot store as one box",
            sh_ten.key,
        )
    local = sh_ten.data
    for _ in range(sh_ten.prepend_axis_num):
        local = local.unsqueeze(0)
    return Shard(local, tuple(sh_ten.global_shape), tuple(sh_ten.global_offset))


class SaveStrategy(SaveShardedStrategy):
    """Saves a rank's sharded state through ``ckptguard.save``: pass it as ``sharded_strategy``
    to ``dist_checkpointing.save``. ``options`` are ``ckptguard.save``'s (compress, timeout)."""

    def __init__(self, backend: str = BACKEND, version: int = VERSION, **options: Any) -> None:
        super().__init__(backend, version)
        self.options = options

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict: dict, checkpoint_dir: str | Path) -> None:
        tensors: dict[str, Shard] = {}
        objects: dict[str, Any] = {}
        for item in nested_values(sharded_state_dict):
            if not is_main_replica(item.replica_id):
                continue  # another rank saves this copy
            if isinstance(item, ShardedObject):
                objects[item.unique_key] = item.data
            elif isinstance(item, ShardedTensor):
                if item.key in tensors:
                    raise UnsupportedObjectError(
                        f"this rank holds two main replicas of ShardedTensor {item.key!r}; "
                        "ckptguard stores one shard of a tensor per rank",
                        item.key,
                    )
                tensors[item.key] = as_shard(item)
            else:
                raise UnsupportedObjectError(
                    f"cannot save a {type(item).__name__} ({getattr(item, 'key', '?')!r}): "
                    "apply Megatron's factories first (dist_checkpointing.save does)",
                    str(getattr(item, "key", "")),
                )
        failpoint("megatron.before_commit")
        state = {TENSORS: tensors, OBJECTS: objects}
        api.save(state, checkpoint_path(checkpoint_dir), one_file=False, **self.options)


class LoadStrategy(LoadShardedStrategy):
    """Loads what ``SaveStrategy`` saved, at any sharding. ``dist_checkpointing.load`` picks it
    from the checkpoint's metadata.json once ``register()`` ran; ``verify`` checks every chunk
    read; ``allow_pickle`` is ``ckptguard.load``'s."""

    def __init__(self, verify: bool = True, allow_pickle: bool = False) -> None:
        super().__init__()
        self.verify = verify
        self.allow_pickle = allow_pickle

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def check_backend_compatibility(self, loaded_backend: str) -> None:
        if loaded_backend != BACKEND:
            raise CheckpointingException(f"{BACKEND} cannot load a {loaded_backend!r} checkpoint")

    def check_version_compatibility(self, loaded_version: int) -> None:
        if loaded_version != VERSION:
            raise CheckpointingException(f"{BACKEND} cannot load version {loaded_version}")

    def load(self, sharded_state_dict: dict, checkpoint_dir: str | Path) -> dict:
        ckpt = checkpoint_path(checkpoint_dir)
        items = list(nested_values(sharded_state_dict))
        wanted = [i for i in items if isinstance(i, ShardedTensor)]
        with CheckpointReader(ckpt) as rd:
            targets: list[tuple[int, Target]] = []
            for sh_ten in wanted:
                template = {TENSORS: {sh_ten.key: as_shard(sh_ten)}}
                targets.extend(template_targets(template, rd.tensors, rd.path, 0).items())
            fill(rd, targets, self.verify)
        names = [i.unique_key for i in items if isinstance(i, ShardedObject)]
        loaded: dict[str, Any] = {}
        if names:
            with Parts(ckpt, self.verify, self.allow_pickle, within=OBJECTS) as parts:
                loaded = parts.load(names)

        def value(item: Any) -> Any:
            if isinstance(item, ShardedObject):
                return loaded[item.unique_key]
            return item.data if isinstance(item, ShardedTensor) else item

        return dict_list_map_inplace(value, sharded_state_dict)

    def load_tensors_metadata(self, checkpoint_dir: str | Path) -> dict:
        """Each saved tensor's global shape and dtype, as a ShardedTensor without data."""
        out = {}
        with CheckpointReader(checkpoint_path(checkpoint_dir)) as rd:
            for entry in rd.tensors:
                key = saved_key(entry["key"])
                if key is None:
                    continue
                meta = torch.empty(
                    entry["shape"], dtype=TORCH_BY_NAME[entry["dtype"]], device="meta"
                )
                out[key] = ShardedTensor.from_rank_offsets(key, meta).without_data()
        return out

    def load_sharded_metadata(self, checkpoint_dir: str | Path) -> dict:
        """The tensors' metadata and every saved object's, without data."""
        out = self.load_tensors_metadata(checkpoint_dir)
        with Parts(checkpoint_path(checkpoint_dir), self.verify, True, within=OBJECTS) as parts:
            for unique_key in parts.owners:
                obj = ShardedObject.empty_from_unique_key(unique_key)
                out[obj.unique_key] = obj
        return out


def saved_key(path: str) -> str | None:
    """The ShardedTensor key of a saved tensor's key path (``tensors/<key>``, with ``%`` and
    ``/`` escaped as docs/format.md section 6 says), or None for an object's tensor."""
    head, sep, rest = path.partition("/")
    if head != TENSORS or not sep or "/" in rest:
        return None
    return rest.replace("%2F", "/").replace("%25", "%")


def register() -> None:
    """Make ``dist_checkpointing.load`` (and save by backend name) find these strategies for
    checkpoints whose metadata.json names the ckptguard backend."""
    register_default_strategy(StrategyAction.LOAD_SHARDED, BACKEND, VERSION, LoadStrategy())
    register_default_strategy(StrategyAction.SAVE_SHARDED, BACKEND, VERSION, SaveStrategy())
