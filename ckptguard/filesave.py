"""One-file saves (docs/format.md section 10): ``save(obj, "model.pt")`` and ``save(obj, f)``.

The save is the ordinary one (``saver.save_state``) of one process, with a ``FileTarget``: its
data file is written straight to a hidden temporary beside the target (same directory, so the
rename is atomic), the index, manifest, TOC and trailer are appended, the file is fsynced and
renamed over the target (``commit.publish_file``), and the directory fsynced. Whatever was at the
target keeps its bytes until the rename; a kill leaves it, or the new file, and at most the
temporary, named after its target, host, pid namespace and pid (``temps``): the next save to
that target removes those whose process is provably gone.

A file object gets the container built in a private temporary directory (TMPDIR), then copied
into it: no atomic replace is possible for an open file (docs/onefile.md says what is promised).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from . import commit
from .coord import Coordinator, LocalCoordinator, current
from .errors import InvalidNameError, OneFileError, from_oserror
from .failpoints import failpoint
from .format import index
from .format.layout import is_name
from .format.manifest import CheckpointInfo
from .fsutil import makedirs_durably
from .onefile import is_file_object, regular_fd
from .options import SaveOptions
from .saver import save_state
from .sources import DIRECT, ByteSource
from .target import Target
from .temps import remove_stale_temps, temp_name

ONE_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".ckg", ".bin", ".tar", ".pkl")
"""A path whose last component ends with one of these (in any case) is saved as one file."""

TORCH_SAVE_KEYWORDS = (
    "pickle_module",
    "pickle_protocol",
    "_use_new_zipfile_serialization",
    "_disable_byteorder_record",
)
"""``torch.save`` keywords that ``save`` accepts and ignores: they choose how torch pickles and
zips, and ckptguard writes no pickle of tensors and has one format, so nothing is left for them
to choose (refusing them would break call sites that only pin torch's defaults)."""

_COPY = 16 << 20


def wants_one_file(path: Any, one_file: bool | None) -> bool:
    """Whether ``save(obj, path, one_file=...)`` makes a one-file checkpoint: a file object
    always; a path as ``one_file`` says, or (None) when its last component ends with one of
    ``ONE_FILE_SUFFIXES``."""
    if one_file is not None and not isinstance(one_file, bool):
        raise TypeError(f"one_file must be True, False or None, not {one_file!r}")
    if is_file_object(path):
        if one_file is False:
            raise ValueError("one_file=False needs a path: a file object takes one file")
        return True
    if one_file is not None:
        return one_file
    name = os.path.basename(os.fsdecode(os.fspath(path)))
    return os.path.splitext(name)[1].lower() in ONE_FILE_SUFFIXES


def drop_torch_save_keywords(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` without the ``TORCH_SAVE_KEYWORDS`` (accepted, and ignored)."""
    return {k: v for k, v in options.items() if k not in TORCH_SAVE_KEYWORDS}


def manifest_name(filename: str) -> str:
    """The manifest ``name`` of a one-file checkpoint saved as ``filename``: the file name with
    each character a checkpoint name does not allow replaced by ``_`` and the leading
    punctuation dropped (``"step 10 final.pt"`` -> ``"step_10_final.pt"``), at most 200
    characters; ``"checkpoint"`` if nothing is left."""
    text = re.sub(r"[^A-Za-z0-9._+=-]", "_", filename).lstrip("._+=-")[:200]
    return text if is_name(text) else "checkpoint"


def save_file(
    obj: Any,
    path: Any,
    coordinator: Coordinator | str | None,
    opt: SaveOptions,
    source: ByteSource = DIRECT,
    on_read: Callable[[], None] | None = None,
) -> CheckpointInfo:
    """Save ``obj`` as the one-file checkpoint ``path`` (a path, or a writable binary file
    object). One process's save: it waits on no other rank. A coordinator of several ranks is
    refused before anything is written (OneFileError). ``source`` and ``on_read`` as for
    ``saver.save_state`` (a path only). A one-file checkpoint is never signed, pruned or
    incremental or encrypted: ``sign_key``, ``keep``, ``base`` and ``encrypt`` are refused
    (OneFileError)."""
    refused = {
        "sign_key": "cannot be signed",
        "keep": "has no store",
        "base": "holds all of its bytes",
        "encrypt": "has no keyring",
    }
    for option, why in refused.items():
        if getattr(opt, option) is not None:
            raise OneFileError(
                f"a one-file checkpoint {why} ({option}): save a checkpoint directory"
            )
    coord = single_process(coordinator)
    if is_file_object(path):
        return _save_fileobj(obj, path, coord, opt)
    target = os.path.abspath(os.fsdecode(os.fspath(path)))
    filename = os.path.basename(target)
    if not filename:
        raise InvalidNameError(f"{os.fspath(path)!r} names no file")
    directory = os.path.dirname(target)
    name = manifest_name(filename)
    return save_state(obj, directory, name, coord, opt, source, on_read, FileTarget(target))


def single_process(coordinator: Coordinator | str | None) -> Coordinator:
    """The coordinator of a one-file save: the one given if it has one rank, else local;
    OneFileError for one of several ranks (asked without any collective)."""
    if coordinator is None:
        return LocalCoordinator()
    if not isinstance(coordinator, Coordinator) and coordinator not in ("local", "mpi", "torch"):
        raise ValueError(f"unknown coordinator {coordinator!r}: use 'local', 'mpi' or 'torch'")
    size = coordinator.size if isinstance(coordinator, Coordinator) else current(coordinator)[1]
    if size > 1:
        raise OneFileError(
            f"a one-file save holds one process's state, but the coordinator has {size} ranks: "
            "save from one rank without a coordinator (if rank == 0: ckptguard.save(...)), or "
            "save every rank's part as a directory checkpoint with one_file=False"
        )
    return coordinator if isinstance(coordinator, Coordinator) else LocalCoordinator()


class FileTarget(Target):
    """A one-file checkpoint at ``path``: the data file is written to a temporary beside it
    (``data_path`` is the staging path itself), the index kept in memory until the commit. The
    commit hooks do not hear of it: their listeners (the agent's drain) take a store's
    checkpoint directories, and a file outside any store is the user's to place. Its data file
    keeps the mode it was created with (``data_mode``): the commit reopens it to append the
    tail, and the finished file is the user's, with the mode of any it replaces."""

    announce = False
    data_mode = None

    def __init__(self, path: str) -> None:
        self.path = path
        self.mode: int | None = None  # the permission bits of the file replaced, to keep
        self.index_data = b""

    def open(self, store: str, name: str, overwrite: bool) -> tuple[str, str]:
        self.mode = commit.check_file_target(self.path)
        directory, filename = os.path.split(self.path)
        try:
            failpoint("save.start")
            makedirs_durably(directory)
        except OSError as e:
            raise from_oserror(e, directory, f"cannot save {filename} in") from None
        remove_stale_temps(directory, filename)
        return uuidlib.uuid4().hex, os.path.join(directory, temp_name(filename))

    def data_path(self, staging: str, rank: int) -> str:
        return staging

    def write_index(self, staging: str, table: pa.Table) -> dict:
        self.index_data = index.write_table(table)
        return index.member(self.index_data, index.has_digests(table))

    def publish(
        self,
        store: str,
        name: str,
        staging: str,
        body: dict,
        overwrite: bool,
        deadline: float | None,
        signer: object = None,
    ) -> CheckpointInfo:
        return commit.publish_file(staging, self.path, self.index_data, body, mode=self.mode)

    def discard(self, staging: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)


class _FileObjectTarget(FileTarget):
    """A one-file checkpoint built in a private directory for a file object."""


# ---- file objects ----------------------------------------------------------------------------


def _save_fileobj(obj: Any, f: Any, coord: Coordinator, opt: SaveOptions) -> CheckpointInfo:
    """Build the container in a private temporary directory, then copy it into ``f``, flush,
    and fsync it when it has a regular file's descriptor."""
    writable = getattr(f, "writable", None)
    if not callable(getattr(f, "write", None)) or (callable(writable) and not writable()):
        raise TypeError(f"save needs a path or a writable binary file object, not {f!r}")
    given = getattr(f, "name", None)
    where = given if isinstance(given, str) else f"<{type(f).__name__}>"
    name = manifest_name(os.path.basename(where)) if isinstance(given, str) else "checkpoint"
    with tempfile.TemporaryDirectory(prefix="ckptguard-save-") as d:
        built = os.path.join(d, "checkpoint.ckg")
        info = save_state(obj, d, name, coord, opt, target=_FileObjectTarget(built))
        _copy_into(built, f)
    return dataclasses.replace(info, name=name, path=where)


def _copy_into(built: str, f: Any) -> None:
    buf = bytearray(_COPY)
    with open(built, "rb", buffering=0) as src:
        while n := src.readinto(buf):
            view = memoryview(buf)[:n]
            while view:
                wrote = f.write(view)
                if not isinstance(wrote, int) or wrote >= len(view):
                    break  # None from a file object that does not count: all of it
                view = view[wrote:]
    if callable(getattr(f, "flush", None)):
        f.flush()
    fd = regular_fd(f)
    if fd is not None:
        os.fsync(fd)
