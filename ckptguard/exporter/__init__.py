"""Export: a checkpoint as files other tools read (safetensors, HDF5, a torch.save file).

Every tensor comes through ``loader.iter_tensors``: assembled whole from its saved shards, every
record checked against its hash as it is read, one tensor in memory at a time (the torch format
excepted: torch.save pickles the whole object at once). The files are written under temporary
names in the destination and fsynced, then named (an existing file is replaced only with
``force``) and the directory fsynced (``fsutil.NewFiles``): a failure leaves no file under a
final name; a process killed first leaves its temporaries, named for it (``temps``), which the
next export to that destination removes. ``names`` gives the names, ``formats`` writes the
files.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from ..errors import (
    CheckpointError,
    ExportError,
    ExportWarning,
    StoreError,
    StoreNotWritableError,
    UnsupportedObjectError,
    from_oserror,
)
from ..failpoints import failpoint
from ..format.layout import MANIFEST
from ..format.ranktrees import rank_tree
from ..format.treeids import TREE_TYPES
from ..fsutil import NewFiles, makedirs_durably
from ..open import CheckpointReader
from ..tree import TreeError, check_tree
from ..units import parse_size
from .formats import (
    WRITERS,
    ExportResult,
    Settings,
    exists_error,
    is_export_file,
    remove_stale,
)
from .names import children, subtree

__all__ = ["FORMATS", "ExportResult", "export_checkpoint", "left_out_warning"]

FORMATS = tuple(WRITERS)


def export_checkpoint(
    path: str,
    to: str,
    dest: str | os.PathLike,
    *,
    select: str | None = None,
    max_shard_size: int | str | None = None,
    strict: bool = False,
    force: bool = False,
    allow_pickle: bool = False,
    rank: int = 0,
) -> ExportResult:
    """Export the checkpoint directory ``path`` as format ``to`` into directory ``dest``
    (``ckptguard.export`` documents the options; it also warns of what was left out)."""
    shard_size = check_options(to, max_shard_size)
    with CheckpointReader(path) as rd:
        node = subtree(_tree(rd, rank), select, rd.path)
        if to == "torch" and "pickle" in rd.features and not allow_pickle:
            raise UnsupportedObjectError(
                f"{rd.path} contains pickled objects; export it to torch with allow_pickle=True "
                "only if you trust where it came from"
            )
        if to != "torch" and children(node) is None:
            raise ExportError(
                f"{select or 'the saved object'!r} of {rd.path} is a single value, not a tree "
                f"of named tensors: {to} needs names (export to torch, or select its parent)",
                rd.path,
            )
        d, created = prepare_dest(dest, rd.path)
        out = NewFiles(d, replace=force)
        out.remove_stale(is_export_file)  # of earlier exports here that were killed
        result = ExportResult(rd.path, to)
        done = False
        try:
            WRITERS[to](rd, node, out, result, Settings(shard_size, strict, rank, allow_pickle))
            failpoint("export.written")
            result.files = out.commit()
            done = True
            if to == "safetensors" and force:
                remove_stale(out.dest, result.files)
        except FileExistsError as e:  # created meanwhile, after the check before the reads
            raise exists_error([str(e.filename)]) from None
        except OSError as e:
            if isinstance(e, CheckpointError):
                raise
            raise dest_error(e, e.filename or out.dest, "cannot write") from None
        finally:
            out.discard()
            if not done:  # refused or failed: the directories it made go too
                _remove_empty(created)
    return result


def _remove_empty(dirs: list[str]) -> None:
    """Remove the directories of ``dirs`` (created by this export, parents first) that are
    still empty, deepest first."""
    for d in reversed(dirs):
        try:
            os.rmdir(d)
        except OSError:  # not empty (someone else's files) or gone: leave it
            return


def left_out_warning(result: ExportResult) -> ExportWarning | None:
    """The warning naming what ``result``'s export left out; None if nothing."""
    if not result.left_out:
        return None
    names = ", ".join(n for n, _ in result.left_out[:10])
    more = f" and {len(result.left_out) - 10} more" if len(result.left_out) > 10 else ""
    return ExportWarning(
        f"{len(result.left_out)} value(s) of {result.source} left out of the {result.to} export "
        f"(not tensors of a type it has): {names}{more}"
    )


def check_options(to: str, max_shard_size: int | str | None) -> int | None:
    """The format and the shard size checked; the shard size in bytes (None: one file)."""
    if to not in FORMATS:
        raise ExportError(f"cannot export to {to!r}: the formats are {', '.join(FORMATS)}")
    if max_shard_size is None:
        return None
    if to != "safetensors":
        raise ExportError(f"max_shard_size applies to safetensors, not to {to}")
    try:
        size = parse_size(max_shard_size)
    except ValueError as e:
        raise ExportError(f"max_shard_size: {e}") from None
    if size <= 0:
        raise ExportError(f"max_shard_size must be more than 0 bytes, not {max_shard_size!r}")
    return size


def prepare_dest(dest: str | os.PathLike, checkpoint: str) -> tuple[str, list[str]]:
    """``dest`` as an absolute path, created if missing, and the directories created; never a
    file, never inside the checkpoint (a committed checkpoint's directory does not change)."""
    d = os.path.abspath(os.fspath(dest))
    real, ck = os.path.realpath(d), os.path.realpath(checkpoint)
    if real == ck or real.startswith(ck + os.sep):
        raise ExportError(f"cannot export into the checkpoint itself ({d} is inside {ck})", d)
    try:
        created = makedirs_durably(d)
    except (FileExistsError, NotADirectoryError):
        raise ExportError(f"export destination {d} is not a directory", d) from None
    except OSError as e:
        raise dest_error(e, d, "cannot create") from None
    return d, created


def dest_error(e: OSError, path: str, action: str) -> StoreError:
    """The typed error of an OSError on the export destination ``path``."""
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreNotWritableError(
            f"{action} {path}: {e.strerror or e} (the export destination is not writable)",
            path,
            e.errno,
        )
    return from_oserror(e, path, action)


def _tree(rd: CheckpointReader, rank: int) -> Any:
    """Saved rank ``rank``'s object tree of ``rd``, checked."""
    world = rd.manifest["world_size"]
    if type(rank) is not int or not 0 <= rank < world:
        raise ExportError(f"rank must be a saved rank, 0 to {world - 1}, not {rank!r}", rd.path)
    tree = rank_tree(rd.manifest, rank)
    try:
        check_tree(tree, len(rd.tensors), types=TREE_TYPES in rd.features)
    except TreeError as e:
        raise rd.corrupt(f"object tree is malformed: {e}", file=MANIFEST) from None
    return tree
