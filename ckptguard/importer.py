"""A checkpoint of another format (torch.save, safetensors, DCP) made a verified ckptguard
checkpoint: read by ``ckptguard.foreign``, saved by ``ckptguard.save`` in this process alone,
then every byte verified. ``ckptguard import`` is this function."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from . import foreign
from .api import save, verify
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from .format.manifest import CheckpointInfo
from .options import SaveOptions
from .read import VerifyReport
from .store import Store


@dataclass
class ImportReport:
    """What ``import_checkpoint`` read and wrote: the source, its kind, the committed
    checkpoint and its verification."""

    source: str
    kind: str
    info: CheckpointInfo
    verified: VerifyReport


def import_checkpoint(
    src: str | os.PathLike, dest: str | os.PathLike, *, allow_pickle: bool = False, **options: Any
) -> ImportReport:
    """Save the checkpoint of another format at ``src`` as ckptguard checkpoint ``dest``.

    ``src`` is what ``ckptguard.load`` reads besides its own checkpoints (a torch.save file, a
    safetensors file or sharded set, a DCP directory), read unverified onto the CPU; pickles go
    through torch's weights-only unpickler unless ``allow_pickle`` (full pickle: arbitrary code
    from the file; it also lets ``save`` pickle values it cannot store otherwise). ``options``
    are ``save``'s (``step``, ``compress``, ``overwrite``, ...); ``metadata`` defaults to the
    source's (safetensors' ``__metadata__``). The checkpoint is then verified; if it is not
    whole it is deleted and CorruptCheckpointError raised. Any failure leaves no ``dest``.
    """
    SaveOptions.from_kwargs({**options, "allow_pickle": allow_pickle})  # before a long read
    source = foreign.detect(src)
    if source is None:
        where = os.path.abspath(os.fspath(src))
        if not os.path.lexists(where):
            raise CheckpointNotFoundError(f"nothing to import at {where}: it does not exist")
        raise CheckpointError(f"{where} is a ckptguard checkpoint or store already")
    got = foreign.read(source, map_location="cpu", allow_pickle=allow_pickle)
    options.setdefault("metadata", got.metadata)
    info = save(got.state, dest, coordinator="local", allow_pickle=allow_pickle, **options)
    try:
        report = verify(info.path)
    except CheckpointError:
        _remove(info)
        raise
    if not report.ok:
        _remove(info)
        raise CorruptCheckpointError(
            f"the imported checkpoint failed its verification ({report.problems[0]}); it was "
            "deleted",
            path=info.path,
        )
    return ImportReport(source.path, source.kind, info, report)


def _remove(info: CheckpointInfo) -> None:
    """Delete a committed checkpoint that did not verify: the import promises a whole one."""
    Store(os.path.dirname(info.path)).delete(info.name)
