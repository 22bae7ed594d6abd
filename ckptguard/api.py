"""The public functions: save, load, verify, describe."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lz4
import numpy as np
import pyarrow
import torch
import xxhash

from . import commit as _commit
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    UnsupportedObjectError,
    from_oserror,
)
from .failpoints import failpoint
from .format import FORMAT_VERSION
from .format.layout import LATEST, MANIFEST, split_path
from .format.manifest import CheckpointInfo
from .reader import CheckpointReader
from .restore import MapLocation, Problem, VerifyReport, load_checkpoint, verify_checkpoint
from .store import Store, read_info
from .tree import flatten
from .writer import DEFAULT_CHUNK, RankWriter

__all__ = [
    "CheckpointDescription",
    "Problem",
    "TensorSummary",
    "VerifyReport",
    "describe",
    "load",
    "save",
    "verify",
]

_COMPRESS = {"auto": True, "lz4": True, "none": False}


def _writer_versions() -> dict[str, str]:
    from . import __version__

    return {
        "ckptguard": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "lz4": lz4.__version__,
        "xxhash": xxhash.VERSION,
        "pyarrow": pyarrow.__version__,
    }


def save(
    obj: Any,
    path: str | os.PathLike,
    *,
    compress: str = "auto",
    metadata: Any = None,
    overwrite: bool = False,
    step: int | None = None,
    allow_pickle: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
) -> CheckpointInfo:
    """Save ``obj`` atomically as checkpoint ``<store>/<name>``; whole and verified, or absent.

    ``compress``: "auto"/"lz4" (byte-plane shuffle + LZ4 per chunk where it saves >= 5%) or
    "none". An existing name is an error unless ``overwrite``, which commits the new checkpoint
    first and removes the old one after. LATEST then names this checkpoint.
    """
    store, name = split_path(path)
    if compress not in _COMPRESS:
        raise ValueError(f"compress must be one of {sorted(_COMPRESS)}, not {compress!r}")
    if step is not None and (type(step) is not int):
        raise TypeError("step must be an int or None")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UnsupportedObjectError(f"metadata must be plain JSON: {e}", "metadata") from None
    tree, refs, used_pickle = flatten(obj, allow_pickle)
    final = os.path.join(store, name)
    if not overwrite and os.path.exists(os.path.join(final, MANIFEST)):
        raise CheckpointExistsError(f"checkpoint {final} already exists (pass overwrite=True)")
    try:
        os.makedirs(store, exist_ok=True)
    except OSError as e:
        raise from_oserror(e, store, "cannot create store") from None
    failpoint("save.start")
    staging = writer = None
    try:
        uid, staging = _commit.new_staging(store, name)
        failpoint("save.staging_created")
        writer = RankWriter(staging, 0, uid, chunk_size)
        for tid, ref in enumerate(refs):
            writer.add(tid, ref, _COMPRESS[compress])
        rows = writer.finish()
        failpoint("save.data_written")
        index_entry = _commit.write_index(staging, rows)
        failpoint("commit.index_written")
        body = {
            "format": "ckptguard",
            "format_version": FORMAT_VERSION,
            "features": ["pickle"] if used_pickle else [],
            "name": name,
            "uuid": uid,
            "created": "",
            "step": step,
            "world_size": 1,
            "writer": _writer_versions(),
            "metadata": metadata,
            "tree": tree,
            "tensors": [r.entry() for r in refs],
            "files": [{"name": writer.name, "rank": 0, "size": writer.size, "chunks": len(rows)}],
            "index": index_entry,
            "totals": {
                "tensors": len(refs),
                "chunks": len(rows),
                "raw_bytes": sum(r.raw_len for r in rows),
                "stored_bytes": sum(r.stored_len for r in rows),
                "files": 1,
            },
        }
        final = _commit.commit(store, name, staging, body, overwrite)
    except BaseException as e:
        if writer is not None:
            writer.abort()
        if staging is not None and os.path.isdir(staging):
            with contextlib.suppress(OSError):  # else gc reclaims it; the store is unchanged
                _commit.remove_tree(staging)
        if isinstance(e, OSError) and not isinstance(e, CheckpointError):
            raise from_oserror(e, staging or store, "cannot save checkpoint in") from None
        raise
    return read_info(final)


def resolve(path: str | os.PathLike) -> str:
    """A checkpoint directory for ``path``: itself, or its LATEST if ``path`` is a store."""
    p = os.path.abspath(os.fspath(path))
    if os.path.isfile(os.path.join(p, MANIFEST)):
        return p
    if os.path.lexists(os.path.join(p, LATEST)):
        name = Store(p).latest_name()
        return os.path.join(p, name)
    if not os.path.isdir(p):
        raise CheckpointNotFoundError(f"no checkpoint or store at {p}")
    looks_like_ckpt = any(n == "index.parquet" or n.endswith(".ckg") for n in os.listdir(p))
    if not looks_like_ckpt:
        raise CheckpointNotFoundError(
            f"{p} is neither a committed checkpoint nor a store with LATEST"
        )
    return p  # a damaged checkpoint: the reader says what is missing


def load(
    path: str | os.PathLike,
    *,
    map_location: MapLocation = None,
    verify: bool = True,
    allow_pickle: bool = False,
) -> Any:
    """Load what ``save`` stored at ``path`` (a checkpoint, or a store meaning its LATEST).

    Every chunk is checked against its hash unless ``verify=False``; a mismatch raises
    CorruptCheckpointError naming the file, tensor and chunk.
    """
    return load_checkpoint(resolve(path), map_location, verify, allow_pickle)


def verify(
    path: str | os.PathLike, progress: Callable[[int, int], None] | None = None
) -> VerifyReport:
    """Check every byte of a checkpoint (or a store's LATEST); report all problems found."""
    return verify_checkpoint(resolve(path), progress)


@dataclass
class TensorSummary:
    key: str
    dtype: str
    shape: tuple[int, ...]
    raw_bytes: int = 0
    stored_bytes: int = 0
    chunks: int = 0
    codecs: dict[str, int] = field(default_factory=dict)


@dataclass
class CheckpointDescription:
    info: CheckpointInfo
    tensors: list[TensorSummary]


def describe(path: str | os.PathLike) -> CheckpointDescription:
    """Tensors, sizes and codecs of a checkpoint, from its manifest and index (no data read)."""
    p = resolve(path)
    with CheckpointReader(p) as rd:
        out = [TensorSummary(t["key"], t["dtype"], tuple(t["shape"])) for t in rd.tensors]
        for r in rd.rows:
            s = out[r.tensor]
            s.raw_bytes += r.raw_len
            s.stored_bytes += r.stored_len
            s.chunks += 1
            s.codecs[r.codec] = s.codecs.get(r.codec, 0) + 1
        return CheckpointDescription(CheckpointInfo.from_manifest(rd.manifest, p), out)
