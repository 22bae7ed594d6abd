"""Checkpoints of other formats, read as they are: torch.save files (zip and legacy), safetensors
files and sharded sets, PyTorch DCP directories. ``ckptguard.load`` returns what they hold and
``ckptguard import`` saves it as a verified ckptguard checkpoint; neither is verified on the way
in: these formats carry no ckptguard hashes.

The kind is told by content: a zip's ``PK\\x03\\x04`` (torch.save), a pickle's protocol byte
(legacy torch.save), safetensors' 8-byte little-endian header length followed by ``{``, JSON
with a ``weight_map`` (a safetensors index), a directory with ``.metadata`` (DCP). A path that
is a symbolic link is read only if it leads to a ckptguard checkpoint or store.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import (
    CheckpointNotFoundError,
    ForeignCheckpointError,
    ForeignFormatError,
    from_oserror,
)
from ..format.datafile import FILE_MAGIC
from ..format.layout import LATEST, MANIFEST, looks_like_checkpoint
from ..fsutil import UnsafeFileError, check_regular
from .source import (
    DCP,
    SAFETENSORS,
    SAFETENSORS_SET,
    TORCH_LEGACY,
    TORCH_ZIP,
    opened,
    read_small,
    target_device,
    to_device,
)

if TYPE_CHECKING:
    from ..place import MapLocation

KINDS_TRIED = (
    "a ckptguard checkpoint or store, a torch.save file (zip or legacy), a safetensors file or "
    "index (*.safetensors.index.json), a DCP directory (.metadata)"
)
_INDEX_SUFFIX = ".safetensors.index.json"
_MAX_HEADER = 100_000_000  # safetensors' own limit on its JSON header
_SNIFF = 16


@dataclass(frozen=True)
class Source:
    """A checkpoint of another format: its kind and absolute path (of a sharded safetensors set:
    the directory, and ``index`` the index file's name in it)."""

    kind: str
    path: str
    index: str = ""


@dataclass
class Foreign:
    """What a checkpoint of another format holds: the state, and the metadata it carries (plain
    JSON: safetensors' ``__metadata__``; None for the others)."""

    source: Source
    state: Any
    metadata: Any = None


def detect(path: str | os.PathLike) -> Source | None:
    """The checkpoint of another format at ``path``; None where ckptguard's own reading applies
    (a ckptguard checkpoint or store, or nothing at all there). A file or directory that is none
    of the kinds is a CheckpointNotFoundError naming them; a FIFO, device or socket, or a link
    to anything but a ckptguard directory, a ForeignFormatError (nothing is opened or waited
    on)."""
    p = os.path.abspath(os.fspath(path))
    try:
        st = os.lstat(p)
    except OSError:
        return None  # ckptguard's resolve says what is missing
    if stat.S_ISLNK(st.st_mode):
        if not os.path.exists(p) or _ckptguard_dir(p) or _ckptguard_file(os.path.realpath(p)):
            return None
        raise ForeignFormatError(
            f"{p} is a symbolic link (to {os.readlink(p)}): a checkpoint of another format is "
            f"read only under its own name; pass {os.path.realpath(p)}",
            p,
        )
    if stat.S_ISDIR(st.st_mode):
        return None if _ckptguard_dir(p) else _foreign_dir(p)
    try:
        check_regular(st)
    except UnsafeFileError as e:
        raise ForeignFormatError(f"{p} {e.reason}", p) from None
    return _foreign_file(p)


def read(
    source: Source, *, map_location: MapLocation = None, allow_pickle: bool = False
) -> Foreign:
    """Read what ``source`` holds, tensors placed by ``map_location`` (``ckptguard.load``'s
    meaning); pickles through a weights-only unpickler unless ``allow_pickle``, which can run
    arbitrary code. A damaged file is a ForeignFormatError naming it, a refused pickle global
    an UnsafePickleError naming the global."""
    if source.kind in (TORCH_ZIP, TORCH_LEGACY):
        from . import torchfile

        return Foreign(source, torchfile.read(source.path, source.kind, map_location, allow_pickle))
    if source.kind == SAFETENSORS:
        from . import safetensors

        return Foreign(source, *safetensors.read_file(source.path, map_location))
    if source.kind == SAFETENSORS_SET:
        from . import safetensors

        return Foreign(source, *safetensors.read_set(source.path, source.index, map_location))
    from . import dcp

    dev = target_device(map_location, source.path)
    return Foreign(source, to_device(dcp.read(source.path, allow_pickle), dev))


def load(source: Source, *, map_location: MapLocation, allow_pickle: bool, template: Any) -> Any:
    """``ckptguard.load`` of a checkpoint of another format: its state, unverified."""
    if template is not None:
        raise ValueError(
            f"{source.path} is a {source.kind} checkpoint: template= fills tensors from a "
            "ckptguard checkpoint; load it without one, or `ckptguard import` it first"
        )
    return read(source, map_location=map_location, allow_pickle=allow_pickle).state


def not_ckptguard(source: Source) -> ForeignCheckpointError:
    """The refusal to verify a checkpoint of another format: it has no ckptguard hashes."""
    return ForeignCheckpointError(
        f"{source.path} is a {source.kind} checkpoint, not a ckptguard checkpoint: it has no "
        "ckptguard hashes to verify. `ckptguard import SRC DEST` saves it as a verified "
        "ckptguard checkpoint",
        source.path,
        source.kind,
    )


def _ckptguard_dir(p: str) -> bool:
    """Whether directory ``p`` is ckptguard's: a checkpoint (maybe damaged) or a store."""
    if not os.path.isdir(p):
        return False
    if os.path.lexists(os.path.join(p, MANIFEST)) or os.path.lexists(os.path.join(p, LATEST)):
        return True
    try:
        return looks_like_checkpoint(os.listdir(p))
    except OSError as e:
        raise from_oserror(e, p, "cannot read") from None


def _foreign_dir(p: str) -> Source:
    names = os.listdir(p)
    if ".metadata" in names:
        return Source(DCP, p)
    indexes = sorted(n for n in names if n.endswith(_INDEX_SUFFIX))
    if len(indexes) == 1:
        return Source(SAFETENSORS_SET, p, indexes[0])
    if indexes:
        raise ForeignFormatError(
            f"{p} holds several safetensors indexes ({', '.join(indexes[:4])}): pass one", p
        )
    files = sorted(n for n in names if n.endswith(".safetensors"))
    if len(files) == 1:
        return Source(SAFETENSORS, os.path.join(p, files[0]))
    if files:
        raise ForeignFormatError(
            f"{p} holds {len(files)} .safetensors files and no {_INDEX_SUFFIX}: pass one file, "
            "or the index of the set",
            p,
        )
    raise CheckpointNotFoundError(
        f"{p} is neither a committed checkpoint nor a store with LATEST, nor any other kind "
        f"ckptguard reads (tried {KINDS_TRIED})"
    )


def _ckptguard_file(p: str) -> bool:
    """Whether ``p`` is a regular file that starts as ckptguard's files do (a one-file
    checkpoint, or a checkpoint's data file): ckptguard's own reading names what it is."""
    if not os.path.isfile(p):
        return False
    with opened(p, path=p, kind="") as name, open(name, "rb") as f:
        return f.read(len(FILE_MAGIC)) == FILE_MAGIC


def _foreign_file(p: str) -> Source | None:
    with opened(p, path=p, kind="") as name, open(name, "rb") as f:
        head = f.read(_SNIFF)
    if head.startswith(FILE_MAGIC):  # ckptguard's own (onefile opens and checks it)
        return None
    if head.startswith(b"PK\x03\x04"):
        return Source(TORCH_ZIP, p)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return Source(TORCH_LEGACY, p)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= _MAX_HEADER:
        return Source(SAFETENSORS, p)
    if head.lstrip()[:1] == b"{":
        from .safetensors import MAX_INDEX_BYTES, is_index

        raw = read_small(p, path=p, kind=SAFETENSORS_SET, max_size=MAX_INDEX_BYTES)
        if is_index(raw):
            return Source(SAFETENSORS_SET, os.path.dirname(p), os.path.basename(p))
    raise CheckpointNotFoundError(
        f"no checkpoint or store at {p}: the file is none of the kinds ckptguard reads "
        f"(tried {KINDS_TRIED})"
    )
