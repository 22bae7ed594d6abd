"""``CheckpointEngine``: DeepSpeed's checkpoint engine interface over ckptguard.

DeepSpeed's ``save_checkpoint`` calls ``create``, then ``save`` once per file this rank writes,
then ``commit`` on every rank, then writes ``latest`` on rank 0. Here ``save`` holds each
file's state (and writes its stub, layout.py) and ``commit`` saves all of this rank's files in
one ``ckptguard.save`` with every other rank's: one global commit, the tag's checkpoint whole or
absent. Only after every rank's files are committed does rank 0 point ``latest`` at the tag, so
``load_checkpoint`` without a tag resumes from a whole checkpoint wherever a save was killed.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import (
    CheckpointCommitInfo,
)
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import (
    CheckpointEngine as _Base,
)
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from .. import api
from ..errors import CheckpointNotFoundError
from ..failpoints import failpoint
from ..parts import Parts
from ..treetypes import register_types
from . import layout
from .objects import PlainObject, from_plain, qualified_name, to_plain

ENGINE_NAME = "ckptguard"
PLAIN_CLASSES: dict[str, type] = {qualified_name(c): c for c in (LossScaler, DynamicLossScaler)}
"""The ordinary classes of DeepSpeed's state saved by their attributes (objects.py)."""
TREE_CLASSES = (PlainObject, ZeroStageEnum, fragment_address)
"""The dataclasses and enums of DeepSpeed's state, registered for the tree (register_types)."""


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class CheckpointEngine(_Base):
    """Saves and loads DeepSpeed's per-rank checkpoint files through ckptguard.

    Install it on an initialized engine (``ckptguard.deepspeed.install(engine)``). ``compress``,
    ``timeout`` and ``allow_pickle`` are ``ckptguard.save``'s; ``verify`` checks every chunk a
    load reads; ``overwrite`` lets a tag be saved again (its new checkpoint replaces the old one
    atomically), as DeepSpeed's own engine overwrites files.
    """

    def __init__(
        self,
        config_params: Any = None,
        *,
        compress: str = "auto",
        verify: bool = True,
        allow_pickle: bool = False,
        overwrite: bool = True,
        timeout: float = 600.0,
    ) -> None:
        super().__init__(config_params)
        self.name = ENGINE_NAME
        register_types(*TREE_CLASSES)
        self.options: dict[str, Any] = {
            "compress": compress,
            "allow_pickle": allow_pickle,
            "overwrite": overwrite,
            "timeout": timeout,
        }
        self.verify = verify
        self.allow_pickle = allow_pickle
        self._info: CheckpointCommitInfo | None = None
        self._files: dict[str, Any] = {}

    def create(self, info: CheckpointCommitInfo) -> None:
        """Start the save of ``info.tag``: nothing is held from an earlier, failed one."""
        self._info = info
        self._files = {}

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        """Hold one file's state until ``commit`` and put its stub at ``path``."""
        info = self._info
        if info is None:
            raise RuntimeError("CheckpointEngine.save before create: DeepSpeed calls create first")
        tag_dir = os.path.abspath(os.path.join(info.save_dir, str(info.tag)))
        where, name = os.path.split(os.path.abspath(path))
        if where != tag_dir:
            raise ValueError(
                f"DeepSpeed saves {path!r} outside the tag directory {tag_dir!r}; ckptguard's "
                "engine stores the files of a tag directory only (docs/integrations.md)"
            )
        self._files[name] = to_plain(state_dict, PLAIN_CLASSES, name)
        layout.write_stub(path)
        failpoint("deepspeed.file_held")

    def commit(self, info: CheckpointCommitInfo) -> bool:
        """Commit every rank's files of ``info.tag`` at once; then, on rank 0, ``latest``."""
        tag_dir = os.path.join(info.save_dir, str(info.tag))
        os.makedirs(tag_dir, exist_ok=True)
        layout.sync_dir(tag_dir)  # the stubs of the files committed below are durable
        failpoint("deepspeed.before_commit")
        files, self._files, self._info = self._files, {}, None
        ckpt = layout.checkpoint_path(tag_dir)
        meta = {"deepspeed": {"tag": str(info.tag)}}
        api.save(files, ckpt, one_file=False, metadata=meta, **self.options)
        failpoint("deepspeed.committed")
        if _rank() == 0:
            with Parts(ckpt, verify=False, allow_pickle=True) as parts:
                layout.remove_stale_stubs(tag_dir, set(parts.owners))
            if info.save_latest:
                layout.write_latest(info.save_dir, str(info.tag))
                failpoint("deepspeed.latest_written")
        return True

    def load(self, path: str, map_location: Any = None) -> Any:
        """The state DeepSpeed saved as file ``path``, read from its tag's checkpoint (each
        chunk verified), tensors on the CPU unless ``map_location`` names a device."""
        return load_file(path, map_location, verify=self.verify, allow_pickle=self.allow_pickle)

    def preserves_storage_sharing(self) -> bool:
        # Each tensor is stored with its own bytes, never its whole storage: DeepSpeed need not
        # clone the state before handing it over.
        return False


def load_file(
    path: str | os.PathLike,
    map_location: Any = None,
    *,
    verify: bool = True,
    allow_pickle: bool = False,
) -> Any:
    """What ``torch.load`` returned for DeepSpeed's file ``path`` had DeepSpeed written it.

    A stub (or a name DeepSpeed expects) of a tag saved through ckptguard reads from the tag's
    checkpoint; a file DeepSpeed's own engine wrote is read by ``ckptguard.load`` as a foreign
    torch.save file (unverified; its objects need ``allow_pickle=True``).
    """
    path = os.path.abspath(os.fspath(path))
    tag_dir, name = os.path.split(path)
    ckpt = layout.checkpoint_path(tag_dir)
    if not os.path.isdir(ckpt) and os.path.isfile(path) and not layout.is_stub(path):
        return api.load(path, map_location=map_location, allow_pickle=allow_pickle)
    if not os.path.isdir(ckpt):
        raise CheckpointNotFoundError(
            f"{tag_dir} holds no committed ckptguard checkpoint ({layout.CHECKPOINT}/) for "
            f"{name!r}: the save of this tag did not finish (load the tag in "
            f"{layout.LATEST_FILE!r}, which names the newest whole one)"
        )
    register_types(*TREE_CLASSES)
    with Parts(ckpt, verify=verify, allow_pickle=allow_pickle) as parts:
        state = parts.load([name])[name]
    state = from_plain(state, PLAIN_CLASSES, name)
    if isinstance(map_location, (str, torch.device)):
        device = torch.device(map_location)
        if device.type != "cpu":
            state = _to_device(state, device)
    return state


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        out = {k: _to_device(v, device) for k, v in obj.items()}
        return type(obj)(out) if type(obj) is not dict else out
    if type(obj) in (list, tuple):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj
