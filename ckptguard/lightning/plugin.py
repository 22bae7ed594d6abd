"""Lightning's ``CheckpointIO`` through ckptguard: each checkpoint is one file at Lightning's path.

Lightning treats a checkpoint as a file: ``ModelCheckpoint`` names ``epoch=3-step=40.ckpt``,
links or copies it to ``last.ckpt``, finds ``last*.ckpt`` by listing the directory, compares
modification times, and removes files beyond its top k through ``remove_checkpoint``. A one-file
ckptguard checkpoint (docs/onefile.md) keeps all of that working while the file itself is
written atomically (the previous file stays until the new one is whole and fsynced) and every
chunk is verified when read. Lightning's strategies call ``save_checkpoint`` on global rank 0
only (DDP's replicated state, FSDP's full state dict), so a save here is one process's save.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO as LightningCheckpointIO

from .. import api
from ..errors import IntegrationError, OneFileError, brief, from_oserror, warn_after_commit
from ..failpoints import failpoint
from ..fsutil import fsync_dir
from ..options import SaveOptions

__all__ = ["RELINK_MARK", "CheckpointIO", "load_from_checkpoint", "local_path"]

RELINK_MARK = ".ckptguard-relink"
"""A save to a path that is a symbolic link (Lightning's ``last.ckpt`` with ``save_last="link"``)
writes ``.<name>.ckptguard-relink`` beside it, then renames it over the link."""


class CheckpointIO(LightningCheckpointIO):
    """Lightning checkpoints as one-file ckptguard checkpoints: atomic, verified, compressed.

    ``Trainer(plugins=[ckptguard.lightning.CheckpointIO()])``. Keyword arguments are options of
    ``ckptguard.save`` (``compress="zstd"``, ``allow_pickle=True`` for hyperparameters that
    are not plain data, ...), checked here; ``trainer.save_checkpoint(path,
    storage_options={...})`` overrides them for one save. Loads verify every chunk; a
    ``torch.save`` checkpoint (Lightning's default format) loads too, unverified, so a run
    started without the plugin resumes with it.
    """

    def __init__(self, **save_options: Any) -> None:
        SaveOptions.from_kwargs(save_options)  # a misspelt or invalid option fails here
        if save_options.get("sign_key") is not None:  # fail at setup, not at the first save
            raise OneFileError(
                "sign_key: Lightning's checkpoints are one-file checkpoints, which cannot be "
                "signed; sign directory checkpoints (ckptguard.save, docs/security.md)"
            )
        self.save_options = save_options

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        """Write ``checkpoint`` as the one-file checkpoint ``path``, replacing what is there
        only once the new file is whole. A symbolic link at ``path`` is replaced by the file
        (the checkpoint it named is left as it is)."""
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError(
                "storage_options must be a dict of ckptguard.save options, not "
                f"{type(storage_options).__name__}"
            )
        options = {**self.save_options, **(storage_options or {})}
        step = checkpoint.get("global_step")
        if "step" not in options and type(step) is int:
            options["step"] = step
        target = local_path(path)
        if os.path.islink(target):
            _replace_link(checkpoint, target, options)
        else:
            api.save(checkpoint, target, one_file=True, **options)

    def load_checkpoint(
        self, path: Any, map_location: Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at ``path`` (through ``last.ckpt``'s link, if it is one), every chunk
        verified, its tensors on the CPU unless ``map_location`` says otherwise (as Lightning's
        own loader). ``weights_only=False`` also unpickles values saved with
        ``allow_pickle=True``."""
        target = _follow_link(local_path(path))
        state = api.load(target, map_location=map_location, weights_only=weights_only, rank=0)
        if not isinstance(state, dict):
            raise IntegrationError(
                f"{target} holds a {type(state).__name__}, not a Lightning checkpoint (a dict)"
            )
        return state

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the checkpoint file (or link) ``path``; nothing there is not an error.

        A directory is refused: this plugin writes files, and removes only what it could have
        written."""
        target = local_path(path)
        if not os.path.lexists(target):
            return
        if os.path.isdir(target) and not os.path.islink(target):
            raise IntegrationError(
                f"{target} is a directory: ckptguard.lightning.CheckpointIO writes each "
                "checkpoint as one file and removes only files and links"
            )
        try:
            failpoint("lightning.remove.start")
            os.unlink(target)
        except FileNotFoundError:
            return
        except OSError as e:
            raise from_oserror(e, target, "cannot remove") from None
        parent = os.path.dirname(target)
        try:
            fsync_dir(parent)
        except OSError as e:  # removed, but the removal may not survive a crash
            warn_after_commit(f"{target} is removed, but fsync of {parent} failed ({brief(e)})")


def local_path(path: Any) -> str:
    """``path`` as an absolute local path; a remote URL is refused (ckptguard's atomic replace
    is a rename within one file system)."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        raise IntegrationError(
            f"{text}: ckptguard writes checkpoints to a local or parallel file system, not to a "
            "URL (drain a store to remote storage instead, docs/operations.md)"
        )
    return os.path.abspath(text)


def _follow_link(path: str) -> str:
    """The file a link such as Lightning's ``last.ckpt`` names (one level; ckptguard refuses a
    link to a link, by name), or ``path`` itself."""
    if not os.path.islink(path):
        return path
    try:
        target = os.readlink(path)
    except OSError as e:
        raise from_oserror(e, path, "cannot read the link") from None
    return os.path.join(os.path.dirname(path), target)


def _replace_link(checkpoint: dict[str, Any], link: str, options: dict[str, Any]) -> None:
    """Save ``checkpoint`` beside ``link``, then rename it over the link: ``link`` names the
    old checkpoint or is the new file, at every instant."""
    parent, name = os.path.split(link)
    staged = os.path.join(parent, f".{name}{RELINK_MARK}")
    api.save(checkpoint, staged, one_file=True, **options)
    try:
        failpoint("lightning.relink.saved")
        os.replace(staged, link)
    except OSError as e:
        with contextlib.suppress(OSError):  # the link still names the previous checkpoint
            os.unlink(staged)
        raise from_oserror(e, link, "cannot replace the link") from None
    try:
        fsync_dir(parent)
    except OSError as e:
        warn_after_commit(f"{link} is replaced, but fsync of {parent} failed ({brief(e)})")


def load_from_checkpoint(
    cls: Any, checkpoint_path: Any, map_location: Any = None, **kwargs: Any
) -> Any:
    """``cls.load_from_checkpoint(checkpoint_path, ...)`` for a ckptguard checkpoint.

    ``cls``: a ``LightningModule`` or ``LightningDataModule`` class. The checkpoint is read and
    verified by ckptguard (its tensors placed by ``map_location``, the CPU by default), then
    handed to Lightning's own ``load_from_checkpoint`` as the file object it accepts, with
    ``map_location`` and the other arguments (``hparams_file``, ``strict``, ``weights_only``,
    overrides of hyperparameters): Lightning's migrations, hooks and device placement apply as
    for its own files. The checkpoint is held twice in memory while Lightning reads it.
    """
    where = "cpu" if map_location is None else map_location
    state = CheckpointIO().load_checkpoint(checkpoint_path, map_location=where)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    del state
    buffer.seek(0)
    return cls.load_from_checkpoint(buffer, map_location=map_location, **kwargs)
