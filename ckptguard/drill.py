"""Restore drills (docs/operations.md, "Restore drills"): a committed checkpoint restored the way
a resume restores it, timed, and recorded as a ``drill`` event in its store.

The drill loads the checkpoint with ``ckptguard.load`` onto the device (every chunk verified,
the signature too under trusted keys, sealed chunks decrypted with the environment's KEK) and,
with a scratch directory, also copies its files into a fresh directory there (as a restore from
durable storage to node-local scratch would), verifies the copy, and removes it. A drill fails
when the checkpoint's bytes are shown wrong; an error that leaves them unknown (unreadable file,
no KEK, no CUDA device) is recorded as a failed drill and raised.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from . import events, measure
from .api import load
from .drain.copy import copy_checkpoint
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    SignatureError,
    StoreError,
)
from .format.layout import check_name
from .format.manifest import CheckpointInfo
from .open import CheckpointReader, using_kek
from .read import verify_checkpoint
from .readonly import remove_tree
from .sign import Trusted, TrustSet, trust_set
from .store import Store

__all__ = ["DEVICES", "DrillResult", "choose", "drill"]

DEVICES = ("auto", "cpu", "cuda")
COPY_JOBS = 4  # threads that copy files into the scratch directory

_BAD_BYTES = (CorruptCheckpointError, FormatVersionError, SignatureError)


@dataclass
class DrillResult:
    """The outcome of one drill; ``seconds`` is the whole drill, ``load_s`` the load alone."""

    store: str
    checkpoint: str
    path: str
    uuid: str
    device: str
    ok: bool = False
    seconds: float = 0.0
    load_s: float = 0.0
    bytes: int = 0
    """The checkpoint's stored bytes (its manifest's total): what the load read and verified."""
    problems: list[str] = field(default_factory=list)
    error: str | None = None
    """The type of the error that failed the drill."""
    scratch: str | None = None
    scratch_s: float | None = None
    scratch_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def choose(
    store: str | os.PathLike, name: str | None = None, seed: int | None = None
) -> CheckpointInfo:
    """The checkpoint to drill: ``name``, or one of the store's committed checkpoints at random
    (``seed`` makes the choice repeatable). CheckpointNotFoundError if there is none."""
    st = Store(store)
    if name is not None:
        path = st.path(check_name(name))
        for info in st.list():
            if info.name == name:
                return info
        raise CheckpointNotFoundError(f"no committed checkpoint {name!r} at {path}")
    listed = st.list()
    if not listed:
        raise CheckpointNotFoundError(f"no committed checkpoint in {st.root}")
    return random.Random(seed).choice(listed)


def device_for(device: str) -> str:
    """``auto``: ``cuda`` where torch sees a CUDA device, else ``cpu``; ``cuda`` without one is
    a ValueError (nothing to restore onto)."""
    import torch

    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here")
    return device


def drill(
    store: str | os.PathLike,
    *,
    name: str | None = None,
    seed: int | None = None,
    device: str = "auto",
    scratch: str | os.PathLike | None = None,
    trusted_keys: Trusted | None = None,
    kek: Any = None,
) -> DrillResult:
    """Drill one committed checkpoint of ``store`` (``choose``'s); record a ``drill`` event.

    Returns the result, ``ok`` False when the checkpoint's bytes (or signature) failed a check;
    other errors are recorded and raised. ``scratch``: a directory to restore a copy into."""
    trust = trust_set(trusted_keys)  # a bad key: before any work
    info = choose(store, name, seed)
    root = os.path.dirname(info.path)
    out = DrillResult(root, info.name, info.path, info.uuid, device_for(device))
    out.bytes = info.stored_bytes
    if scratch is not None:
        out.scratch = os.path.abspath(os.fspath(scratch))
        if not os.path.isdir(out.scratch):
            raise StoreError(f"no scratch directory {out.scratch}", out.scratch)
    t0 = time.monotonic()
    try:
        with using_kek(kek):
            _run(out, trust)
        out.ok = not out.problems
    except _BAD_BYTES as e:
        out.problems, out.error = [str(e)], type(e).__name__
    except (CheckpointError, OSError, RuntimeError) as e:
        out.seconds, out.error = time.monotonic() - t0, type(e).__name__
        _record(out)
        raise
    out.seconds = time.monotonic() - t0
    _record(out)
    return out


def _run(out: DrillResult, trust: TrustSet | None) -> None:
    """The load onto the device, then the scratch copy; problems go into ``out``."""
    import torch

    t0 = time.monotonic()
    with measure.unrecorded():  # the drill's own event says what it read
        state = load(out.path, map_location=out.device, rank=0, trusted_keys=trust)
    if out.device == "cuda":
        torch.cuda.synchronize()
    out.load_s = time.monotonic() - t0
    del state
    if out.device == "cuda":
        torch.cuda.empty_cache()
    if out.scratch is not None:
        _scratch_copy(out, trust)


def _scratch_copy(out: DrillResult, trust: TrustSet | None) -> None:
    """Copy the checkpoint into a fresh directory under ``out.scratch``, verify the copy (as
    stored, for sealed chunks: the copy holds no keyring), remove it."""
    assert out.scratch is not None
    t0 = time.monotonic()
    where = tempfile.mkdtemp(prefix="ckptguard-drill-", dir=out.scratch)
    try:
        copy = os.path.join(where, out.checkpoint)
        os.mkdir(copy)
        with CheckpointReader(out.path) as rd:
            if rd.manifest["uuid"] != out.uuid:
                raise CheckpointNotFoundError(f"{out.path} was replaced during the drill")
            out.scratch_bytes = copy_checkpoint(rd, copy, None, COPY_JOBS)
        report = verify_checkpoint(copy, None, trust)
        out.problems += [f"the scratch copy: {p}" for p in report.problems]
    finally:
        with contextlib.suppress(OSError):
            remove_tree(where)
    out.scratch_s = time.monotonic() - t0


def _record(out: DrillResult) -> None:
    fields: dict[str, Any] = {
        "result": "ok" if out.ok else "failed",
        "seconds": out.seconds,
        "load_s": out.load_s,
        "bytes": out.bytes,
        "device": out.device,
        "problems": len(out.problems),
    }
    if out.error is not None:
        fields["error"] = out.error
    if out.scratch is not None:
        fields.update(scratch=out.scratch, scratch_s=out.scratch_s, scratch_bytes=out.scratch_bytes)
    events.note(out.store, "drill", checkpoint=out.checkpoint, uuid=out.uuid, **fields)
