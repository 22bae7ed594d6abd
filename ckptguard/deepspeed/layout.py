"""Where a DeepSpeed checkpoint's pieces lie when ckptguard writes it, without DeepSpeed itself.

    <save_dir>/
      latest                     DeepSpeed's pointer: the tag of the newest committed save
      <tag>/                     DeepSpeed's tag directory, a ckptguard store of one checkpoint
        ckptguard/               the checkpoint: every rank's files, committed at once
        LATEST, .staging/        the store's own
        mp_rank_00_model_states.pt, zero_pp_rank_0_..._optim_states.pt, ...
                                 stubs: small text files with DeepSpeed's names, so that its
                                 glob and existence checks find them; their bytes are in the
                                 checkpoint

A stub is written by the rank that saves its file, before that rank reports to the commit, so
every file of a committed checkpoint has its stub; a stub of a file the checkpoint does not hold
(a save that never committed, or an older save of the tag) loads as PartNotFoundError.
"""

from __future__ import annotations

import contextlib
import os
import uuid

from ..fsutil import fsync_dir, write_new_file

CHECKPOINT = "ckptguard"
"""The name of the checkpoint in a tag directory (the store)."""
LATEST_FILE = "latest"
"""DeepSpeed's pointer file in the save directory."""
STUB_MAGIC = b"ckptguard-deepspeed-stub 1\n"
_STUB_TEXT = (
    "This name stands for a file of a DeepSpeed checkpoint. Its contents are in the ckptguard\n"
    "checkpoint beside it (./{checkpoint}), committed with every other rank's files at once.\n"
    "DeepSpeed reads it after ckptguard.deepspeed.install(engine); any tool can read it with\n"
    "ckptguard.deepspeed.load_file(<this path>); `ckptguard verify <this directory>` checks it.\n"
)


def checkpoint_path(tag_dir: str) -> str:
    """The ckptguard checkpoint of a DeepSpeed tag directory."""
    return os.path.join(tag_dir, CHECKPOINT)


def _replace(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` whole (a new file, fsynced, renamed over it)."""
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.{uuid.uuid4().hex}.tmp")
    write_new_file(tmp, data)
    try:
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_stub(path: str) -> None:
    """Put the stub of one DeepSpeed file at ``path`` (not yet durable: see ``sync_dir``)."""
    _replace(path, STUB_MAGIC + _STUB_TEXT.format(checkpoint=CHECKPOINT).encode())


def is_stub(path: str) -> bool:
    """Whether ``path`` is a stub (a regular file starting with the stub's first line)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(STUB_MAGIC)) == STUB_MAGIC
    except OSError:
        return False


def sync_dir(path: str) -> None:
    """Make the names created in a directory durable."""
    fsync_dir(path)


def remove_stale_stubs(tag_dir: str, keep: set[str]) -> list[str]:
    """Remove the stubs of ``tag_dir`` whose names are not in ``keep`` (an older save of the tag
    wrote them); the names removed."""
    gone = []
    for name in sorted(os.listdir(tag_dir)):
        path = os.path.join(tag_dir, name)
        if name not in keep and not name.startswith(".") and is_stub(path):
            os.unlink(path)
            gone.append(name)
    if gone:
        fsync_dir(tag_dir)
    return gone


def write_latest(save_dir: str, tag: str) -> None:
    """Point DeepSpeed's ``latest`` at ``tag`` durably: the new text is whole or absent."""
    _replace(os.path.join(save_dir, LATEST_FILE), tag.encode())
    fsync_dir(save_dir)
