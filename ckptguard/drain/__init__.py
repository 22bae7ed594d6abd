"""Drain: copy committed checkpoints from fast staging storage to durable storage.

A multi-level setup saves to a fast, nearby store (node-local NVMe, a burst buffer) and drains
to the durable one (the parallel file system) in the background, as SCR's flush does. A drained
checkpoint follows the commit protocol of docs/format.md section 2 on the destination:

1. only committed checkpoints of SRC are candidates (``Store.list``: a valid manifest);
2. their files (exactly those the manifest names: data files, index.parquet, MANIFEST.json) are
   read relative to the checkpoint directory with O_NOFOLLOW, so a symbolic link or anything
   outside the directory is refused; each data file's header, trailer and footer are checked
   against the index before its bytes are copied;
3. they are written into ``DST/.staging/<name>.<uuid>/`` (``commit.new_staging``: ``gc``
   reclaims a torn drain), in pieces by up to ``jobs`` threads, and each file is fsynced;
   MANIFEST.json comes last, byte for byte (the uuid and ``created`` are the source's)
   (``drain.copy``; data files are striped on Lustre, ``drain.lustre``);
   an encrypted checkpoint's data keys are copied into DST's keyring first, still wrapped
   (``keyring.copy_to``: each store then lists the other, so that a shred reaches both; a
   scope shredded in DST is refused, never revived);
4. every chunk of the staged copy is verified (``read.verify_checkpoint``; a sealed chunk as
   stored, which needs no key: the copy is of its ciphertext). If it fails, the
   source is verified too, to name the side that is damaged: a damaged source raises
   CorruptCheckpointError naming the source file, tensor and chunk; nothing becomes visible;
5. ``commit.publish`` renames the staging directory to ``DST/<name>`` (the atomic exchange of
   ``overwrite``) and fsyncs DST, as a save's commit does;
6. LATEST of DST moves to the drained checkpoint only if it is newer than the one LATEST names.

"Newer" is a later ``created`` (the commit time in the manifest, which the copy keeps), ties
broken by name: the order of ``Store.list`` and of ``Store.delete``'s LATEST rule. ``step`` is
not used: it may be null, and a restarted or forked run can reuse steps.

Run one drain per destination at a time (LATEST is read, compared and then written).

A destination ``s3://bucket/prefix`` is a store in an object store: ``drain.s3`` uploads,
verifies from the bucket and commits by a conditional create of the manifest object instead
(docs/format.md section 11).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence

from .. import audit, keyring, sign
from ..audit import WITNESS_SUBDIR
from ..commit import (
    Flavour,
    discard_staging,
    manifest_sha256,
    new_staging,
    publish,
    read_info,
    write_latest,
)
from ..errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    CorruptCheckpointError,
    DrainConflictError,
    StoreError,
    brief,
    from_oserror,
    warn_after_commit,
)
from ..failpoints import failpoint
from ..format.encryption import key_scopes
from ..format.layout import check_name
from ..format.manifest import CheckpointInfo
from ..fsutil import makedirs_durably
from ..keys import PrivateKey
from ..objstore.url import is_url
from ..open import CheckpointReader
from ..read import damaged_side, verify_checkpoint
from ..sign import SignKey
from ..store import Store
from .copy import Held, copy_checkpoint, held_files
from .lustre import lustre_tool, on_lustre, stripe_count

__all__ = [
    "DEFAULT_JOBS",
    "DRAIN",
    "MAX_JOBS",
    "DrainConflictError",
    "advance_latest",
    "check_jobs",
    "drain",
    "lustre_tool",
    "on_lustre",
    "stripe_count",
]

DEFAULT_JOBS = 4
"""Files (pieces of files) copied at once by default: like SCR's flush width, enough to keep a
parallel file system busy without overloading it from one node."""
MAX_JOBS = 32
"""``jobs`` is capped here."""

DrainedCallback = Callable[[CheckpointInfo, int, float], None]
"""Called after each checkpoint is committed in DST: (its info in DST, bytes copied, seconds)."""


def advance_latest(dst_root: str, info: CheckpointInfo) -> None:
    """Point DST's LATEST at ``info`` if it is newer than what LATEST names (or there is none)."""
    current = Store(dst_root).latest()
    if current is None or (info.created, info.name) > (current.created, current.name):
        write_latest(dst_root, info.name)


DRAIN = Flavour(
    staged=True,
    move_latest=advance_latest,
    after_rename=lambda: failpoint("drain.after_rename"),
    sealed_by_writers=False,
)
"""A drain's commit tail: the manifest is the source's (already copied and verified), and LATEST
only moves forward. Every file of its staging directory is made read-only at the publish: the
copier writes a file in pieces, each reopening it for writing."""


# ---- one checkpoint ----------------------------------------------------------------------------


def _check_copy(src_path: str, staging: str) -> None:
    """Verify every chunk of the staged copy; on failure, say which side is damaged."""
    report = verify_checkpoint(staging)
    if not report.ok:
        why = "the destination returned other bytes than were written"
        raise damaged_side(report, verify_checkpoint(src_path), f"the copy in {staging}", why)


def _drain_one(
    info: CheckpointInfo,
    dst_root: str,
    jobs: int,
    overwrite: bool,
    lfs: str | None,
    signer: PrivateKey | None,
    held: Held | None = None,
) -> tuple[CheckpointInfo, int]:
    """Copy, verify and commit one checkpoint; return its info in DST and the bytes copied
    (``held``: DST's data files, linked where the checkpoint has the same).

    What fails after the commit point is a ``CheckpointWarning`` and in the info's ``warnings``.
    """
    with CheckpointReader(info.path) as rd:  # manifest and index checked, O_NOFOLLOW
        if rd.manifest["uuid"] != info.uuid:
            raise CheckpointReplacedError(
                f"{info.path} was replaced while being drained", info.path
            )
        scopes = key_scopes(rd.manifest)
        if scopes:  # its data keys go first: a drained copy is never without them
            keyring.copy_to(os.path.dirname(info.path), dst_root, {s: k for k, s in scopes.items()})
        try:
            _, staging = new_staging(dst_root, info.name)
        except OSError as e:
            raise from_oserror(e, dst_root, "cannot create a staging directory in") from None
        committed = False
        try:
            copied = copy_checkpoint(rd, staging, lfs, jobs, signer, held)
            _check_copy(info.path, staging)
            failpoint("drain.verified")
            out = publish(
                dst_root,
                info.name,
                staging,
                rd.manifest,
                overwrite=overwrite,
                flavour=DRAIN,
                audit_detail={"source": info.path},
            )
            committed = True
        except CheckpointError:
            raise
        except OSError as e:
            raise from_oserror(e, dst_root, "cannot drain into") from None
        finally:
            if not committed:
                with contextlib.suppress(OSError):  # else gc reclaims it; DST is unchanged
                    discard_staging(staging)
    for w in out.warnings:
        warn_after_commit(w, stacklevel=3)
    return out, copied


# ---- the API -----------------------------------------------------------------------------------


def _select(
    available: list[CheckpointInfo], names: Sequence[str] | None, root: str
) -> list[CheckpointInfo]:
    if names is None:
        return available
    by_name = {i.name: i for i in available}
    out = []
    for name in dict.fromkeys(names):
        check_name(name)
        if name not in by_name:
            raise CheckpointNotFoundError(f"no committed checkpoint {name!r} in {root}")
        out.append(by_name[name])
    return sorted(out, key=lambda i: (i.created, i.name))


def _in_dst(dst: Store, name: str, overwrite: bool) -> CheckpointInfo | None:
    try:
        return read_info(dst.path(name))
    except CheckpointNotFoundError:
        return None
    except CorruptCheckpointError:
        if overwrite:  # a damaged directory in the way: the drained copy replaces it
            return None
        raise


def _plan(
    todo: list[CheckpointInfo], dst: Store, overwrite: bool
) -> list[tuple[CheckpointInfo, CheckpointInfo | None]]:
    """Pair each checkpoint to drain with its copy already in DST (None: to be copied). A name
    DST holds with another uuid is a DrainConflictError, unless ``overwrite``."""
    plan: list[tuple[CheckpointInfo, CheckpointInfo | None]] = []
    conflicts = []
    for info in todo:
        have = _in_dst(dst, info.name, overwrite)
        if have is not None and have.uuid != info.uuid:
            if not overwrite:
                conflicts.append((info, have))
                continue
            have = None
        plan.append((info, have))
    if conflicts:
        info, have = conflicts[0]
        raise DrainConflictError(
            info.name, info.path, info.uuid, have.path, have.uuid, more=len(conflicts) - 1
        )
    return plan


def _note_drained(src_root: str, info: CheckpointInfo, dst_root: str) -> None:
    """The source's ``drain`` entry of ``info``, its new tree head also written to
    ``DST/.audit/witness`` (the destination witnesses the source's log); a failure is a
    CheckpointWarning: the drain stands."""
    if not audit.enabled(src_root):
        return
    witness = os.path.join(dst_root, audit.AUDIT_DIR, WITNESS_SUBDIR)
    try:
        makedirs_durably(witness)
        digest = manifest_sha256(info.path)
    except (OSError, CheckpointError) as e:
        warn_after_commit(f"the audit log of {src_root} has no entry for the drain: {brief(e)}")
        return
    for late in audit.note(
        src_root,
        "drain",
        checkpoint=info.name,
        uuid=info.uuid,
        manifest_sha256=digest,
        detail={"dest": os.path.join(dst_root, info.name)},
        witnesses=(witness,),
    ):
        warn_after_commit(late, stacklevel=3)


def check_jobs(jobs: int) -> int:
    """``jobs`` checked (a positive integer: ValueError otherwise) and capped at MAX_JOBS."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, not {jobs!r}")
    return min(jobs, MAX_JOBS)


def _drain_to_bucket(
    src: str | os.PathLike,
    dst: str,
    names: Sequence[str] | None,
    jobs: int,
    overwrite: bool,
    on_drained: DrainedCallback | None,
    sign_key: SignKey | None,
) -> list[CheckpointInfo]:
    """``drain`` into a store in an object store (``drain.s3``)."""
    if overwrite:
        raise StoreError(
            f"overwrite is not supported for an object store ({dst}): a checkpoint in a bucket "
            "is never replaced; drain under another name",
            dst,
        )
    if sign_key is not None:
        raise StoreError(
            f"sign_key is not supported for an object store ({dst}): sign the checkpoint when "
            "it is saved (a signed checkpoint keeps its signature in the bucket)",
            dst,
        )
    from .s3 import drain_to_bucket

    src_store = Store(src)
    todo = _select(src_store.list(), names, src_store.root)
    return drain_to_bucket(src_store, dst, todo, jobs, on_drained)


def drain(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    names: Sequence[str] | None = None,
    jobs: int = DEFAULT_JOBS,
    overwrite: bool = False,
    *,
    stripe: bool = True,
    on_drained: DrainedCallback | None = None,
    sign_key: SignKey | None = None,
) -> list[CheckpointInfo]:
    """Copy committed checkpoints of store ``src`` into store ``dst``; return those copied.

    ``names``: the checkpoints to drain (each must be committed in ``src``); None means every
    committed checkpoint of ``src``. Those ``dst`` already holds (same name and uuid) are skipped;
    one with the same name and another uuid is a DrainConflictError (nothing is copied) unless
    ``overwrite``, which replaces it atomically. Checkpoints are drained oldest first, each
    verified chunk by chunk in ``dst`` before it becomes visible; LATEST of ``dst`` moves to the
    newest of them if it is newer (later ``created``) than the one it names, also for a skipped
    one (so a drain interrupted after its rename is completed by the next). ``jobs`` threads
    (capped at MAX_JOBS) copy files; on Lustre each data file is striped first (``stripe_count``)
    unless ``stripe`` is False. ``dst`` is created if missing. ``sign_key``: sign each copy
    that is not signed already (it needs chunk digests: SignatureError otherwise, before its
    commit); a signed checkpoint keeps its signature. A bad key is a KeyFileError before
    anything is copied.

    ``dst`` may be a store in an object store, ``s3://bucket/prefix`` (``drain.s3``; the
    endpoint and credentials are boto3's, from the environment): each checkpoint is uploaded,
    read back and verified, then committed by creating its MANIFEST.json object only if there
    is none. A bucket checkpoint is never replaced (``overwrite`` is refused), nor signed on
    its way (``sign_key`` is refused; a signed checkpoint keeps its signature), and encrypted
    checkpoints are refused.
    """
    jobs = check_jobs(jobs)
    if isinstance(names, str):
        names = [names]
    if is_url(dst):
        return _drain_to_bucket(src, str(dst), names, jobs, overwrite, on_drained, sign_key)
    signer = sign.signer(sign_key)
    src_store = Store(src)
    dst_root = os.path.abspath(os.fspath(dst))
    if os.path.realpath(src_store.root) == os.path.realpath(dst_root):
        raise StoreError(f"source and destination are the same store: {dst_root}", dst_root)
    todo = _select(src_store.list(), names, src_store.root)
    try:
        makedirs_durably(dst_root)
    except OSError as e:
        raise from_oserror(e, dst_root, "cannot create the store") from None
    dst_store = Store(dst_root)
    dst_store.latest()  # a damaged LATEST: say so before copying anything
    plan = _plan(todo, dst_store, overwrite)

    lfs = lustre_tool(dst_root) if stripe and any(h is None for _, h in plan) else None
    drained = []
    held = held_files((i.path, i.uuid) for i in dst_store.list())
    for info, have in plan:
        if have is not None:
            advance_latest(dst_root, have)
            continue
        t0 = time.monotonic()
        out, nbytes = _drain_one(info, dst_root, jobs, overwrite, lfs, signer, held)
        held.update(held_files([(out.path, out.uuid)]))
        drained.append(out)
        _note_drained(src_store.root, info, dst_root)
        if on_drained is not None:
            on_drained(out, nbytes, time.monotonic() - t0)
    return drained
