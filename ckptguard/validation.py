"""Validation after each commit (docs/operations.md, "Validation after each commit"): a committed
checkpoint read back from storage and checked as ``ckptguard.verify`` checks it (every byte; the
signature under trusted keys), its outcome a ``validation`` event, a failure also a marker
(``failmarks``) that a resume may ask to skip (``latest_valid``).

``validate`` is what ``ckptguard validate``, the agent's ``run --validate`` (a child process
per commit) and slurm/validate.sbatch run. A checkpoint is marked only when its bytes are shown
wrong (a problem in the report, a damaged manifest or index, a signature that does not verify);
one that cannot be read at all (permission, EIO, no key-encryption key) is an error: recorded as
a failed event, raised, and not marked, since nothing is known of its bytes.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

from . import events, failmarks
from .commit import read_info
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    SignatureError,
    ValidationFailedError,
    warn_after_commit,
)
from .format.layout import MANIFEST, is_name
from .format.manifest import CheckpointInfo
from .open import using_kek
from .read import verify_checkpoint
from .sign import Trusted, trust_set
from .store import Store, note_read

__all__ = [
    "BY",
    "Validation",
    "describe_failure",
    "failed",
    "latest_valid",
    "target",
    "validate",
]

BY = ("agent", "process", "slurm")
"""Who ran a validation (the event's ``by``): the agent's child, a command, a Slurm job."""

_BAD_BYTES = (CorruptCheckpointError, FormatVersionError, SignatureError)


@dataclass
class Validation:
    """The outcome of one validation."""

    path: str
    name: str
    uuid: str
    ok: bool
    seconds: float
    problems: list[str] = field(default_factory=list)
    error: str | None = None
    """The type of the error that stopped the check (a damaged manifest, a bad signature)."""
    bytes_checked: int = 0
    chunks_checked: int = 0
    marker: str | None = None
    """The marker written for a failure; None when ok (or the marker could not be written)."""


def target(path: str | os.PathLike) -> CheckpointInfo:
    """The committed checkpoint ``path`` names: itself, or a store's LATEST.
    CheckpointNotFoundError where there is none; CorruptCheckpointError for a manifest that
    does not parse or a LATEST naming no committed checkpoint."""
    p = os.path.abspath(os.fspath(path))
    if os.path.lexists(os.path.join(p, MANIFEST)):
        return read_info(p)
    info = Store(p).latest()
    if info is None:
        raise CheckpointNotFoundError(f"no committed checkpoint at {p} (and no LATEST)")
    return info


def validate(
    path: str | os.PathLike,
    *,
    trusted_keys: Trusted | None = None,
    kek: Any = None,
    by: str = "process",
) -> Validation:
    """Re-read checkpoint ``path`` (or a store's LATEST) from storage and check every byte.

    Records a ``validation`` event in its store. A failure writes (or replaces) the store's
    marker of the checkpoint, ``.validation/<name>.json``; a success removes a marker of the
    same uuid. Errors that leave the bytes unknown (StoreError, KeyUnavailableError, OSError)
    are recorded as a failed event and raised; ``trusted_keys`` that cannot be loaded raise
    KeyFileError before anything is read."""
    if by not in BY:
        raise ValueError(f"by must be one of {', '.join(BY)}, not {by!r}")
    trust = trust_set(trusted_keys)
    try:
        info = target(path)
    except _BAD_BYTES as e:  # no manifest to name a uuid: recorded, not marked
        return _unreadable(os.path.abspath(os.fspath(path)), e, by)
    store = os.path.dirname(info.path)
    t0 = time.monotonic()
    try:
        with using_kek(kek):
            out = _check(info, trust)
    except (CheckpointError, OSError) as e:
        seconds = time.monotonic() - t0
        _record(store, info, "failed", seconds, by, error=type(e).__name__)
        raise
    out.seconds = time.monotonic() - t0
    if out.ok:
        with contextlib.suppress(OSError):  # a read-only store: the verdict stands
            failmarks.remove(store, info.name, info.uuid)
    else:
        out.marker = _mark(store, info, out.problems)
    _record(
        store,
        info,
        "ok" if out.ok else "failed",
        out.seconds,
        by,
        error=out.error,
        problems=len(out.problems),
        bytes=out.bytes_checked,
    )
    detail = {"result": "ok" if out.ok else "failed", "problems": len(out.problems)}
    note_read(info.path, "verify", {**detail, "validation": by})
    return out


def _unreadable(path: str, e: CheckpointError, by: str) -> Validation:
    """The failed validation of a checkpoint whose manifest (or a store's LATEST) is damaged."""
    one = os.path.lexists(os.path.join(path, MANIFEST))
    store, name = os.path.split(path) if one else (path, "")
    events.note(
        store,
        "validation",
        checkpoint=name if is_name(name) else None,
        result="failed",
        seconds=0.0,
        by=by,
        error=type(e).__name__,
        problems=1,
    )
    return Validation(path, name, "", False, 0.0, [str(e)], type(e).__name__)


def _check(info: CheckpointInfo, trust: Any) -> Validation:
    """Verify the checkpoint; the outcome (not yet timed or marked)."""
    out = Validation(info.path, info.name, info.uuid, False, 0.0)
    try:
        report = verify_checkpoint(info.path, None, trust)
    except _BAD_BYTES as e:
        out.problems, out.error = [str(e)], type(e).__name__
        return out
    now = read_info(info.path)  # the checkpoint read is the one named: not replaced meanwhile
    if now.uuid != info.uuid:
        raise CheckpointNotFoundError(f"{info.path} was replaced while being validated")
    out.ok = report.ok
    out.problems = [str(p) for p in report.problems]
    out.bytes_checked, out.chunks_checked = report.bytes_checked, report.chunks_checked
    return out


def _mark(store: str, info: CheckpointInfo, problems: list[str]) -> str | None:
    try:
        failmarks.write(store, info.name, info.uuid, problems)
    except (OSError, ValueError) as e:
        warn_after_commit(f"{info.path} failed validation, but its marker was not written: {e}")
        return None
    return os.path.join(store, failmarks.DIR, info.name + failmarks.SUFFIX)


def _record(
    store: str, info: CheckpointInfo, result: str, seconds: float, by: str, **extra: Any
) -> None:
    events.note(
        store,
        "validation",
        checkpoint=info.name,
        uuid=info.uuid,
        result=result,
        seconds=seconds,
        by=by,
        **{k: v for k, v in extra.items() if v is not None},
    )


def failed(store: str | os.PathLike) -> dict[str, failmarks.Mark]:
    """The committed checkpoints of ``store`` whose current uuid failed validation, by name.
    Markers that cannot be read, or are stale (the checkpoint is gone or now another uuid),
    are left out; unreadable ones are warned of (CheckpointWarning)."""
    root = os.path.abspath(os.fspath(store))
    marks, ignored = failmarks.listing(root)
    for why in ignored:
        warn_after_commit(f"{root}: a validation marker is ignored: {why}", stacklevel=2)
    out = {}
    for name, mark in marks.items():
        try:
            uuid = read_info(os.path.join(root, name)).uuid
        except (CheckpointError, OSError):
            continue
        if uuid == mark.uuid:
            out[name] = mark
    return out


def latest_valid(store: str | os.PathLike) -> CheckpointInfo | None:
    """The checkpoint a resume that skips failed validations loads: the store's LATEST, or if
    that failed validation, the newest committed checkpoint no newer than it (``Store.list``'s
    order) that did not, with a CheckpointWarning naming those skipped. None for a store
    without LATEST; ValidationFailedError when every candidate failed."""
    st = Store(store)
    latest = st.latest()
    if latest is None:
        return None
    bad = failed(st.root)
    if latest.name not in bad:
        return latest
    newest = (latest.created, latest.name)
    skipped: list[str] = []
    for info in reversed(st.list()):
        if (info.created, info.name) > newest:
            continue
        if info.name not in bad:
            warn_after_commit(
                f"{st.root}: skipped checkpoint(s) that failed validation: "
                f"{', '.join(skipped)}; loading {info.name}",
                stacklevel=3,
            )
            return info
        skipped.append(info.name)
    raise ValidationFailedError(
        f"every checkpoint of {st.root} up to LATEST failed validation: {', '.join(skipped)} "
        f"(markers in {os.path.join(st.root, failmarks.DIR)})",
        tuple(skipped),
    )


def describe_failure(out: Validation) -> list[str]:
    """The lines that say what failed, for a log or the command line."""
    uuid = f" (uuid {out.uuid})" if out.uuid else ""
    lines = [f"validation FAILED: {out.path}{uuid}: {len(out.problems)} problem(s)"]
    lines += [f"  problem: {p}" for p in out.problems[:20]]
    if out.marker is not None:
        lines.append(f"  marked failed: {out.marker}")
    return lines
