"""Drain into a store in an object store (``s3://bucket/prefix``): the bucket layout of
docs/format.md, "Checkpoints in an object store".

For each checkpoint to drain, read from SRC as a drain into a directory reads it (the
checkpoint opened and checked, files read with O_NOFOLLOW, each data file's header, trailer and
footer checked against the index before upload):

1. its data files, index.parquet and SIGNATURE.json (if signed) are uploaded as
   ``PREFIX/<name>/<uuid>/<file>``: one PUT each, or a multipart upload of parts read from the
   file as they are sent (``objstore.upload``);
2. every uploaded object is read back from the bucket and the checkpoint verified chunk by chunk
   (``read.verify_checkpoint`` over ``objstore.ObjectCheckpoint`` with the source's manifest
   bytes: the manifest object does not exist yet); a failure names the damaged side;
3. ``PREFIX/<name>/MANIFEST.json`` is created with the source's exact bytes by a conditional
   create (``If-None-Match: *``), the commit point: the checkpoint is visible iff it exists,
   and of two drains of one name exactly one creates it;
4. ``PREFIX/LATEST`` moves to it if it is newer (later ``created``, ties by name).

A failure or kill before step 3 leaves only objects no manifest names (a re-run uploads them
again and commits; ``objstore.gc`` removes them); after it, the drain stands, and a failure
moving LATEST is a CheckpointWarning. A bucket checkpoint is never replaced (no overwrite), and
encrypted checkpoints are refused (the keyring does not travel to a bucket).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable

from .. import audit
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
from ..format.layout import INDEX, LATEST, MANIFEST, SIGNATURE
from ..format.manifest import CheckpointInfo
from ..fsutil import UnsafeFileError, read_manifest, read_regular
from ..objstore.s3 import Bucket
from ..objstore.source import ObjectCheckpoint, latest_name, read_info
from ..objstore.upload import upload
from ..objstore.url import ObjectURL, parse
from ..open import CheckpointReader
from ..read import damaged_side, verify_checkpoint
from ..sign import MAX_SIGNATURE_BYTES
from ..sign import parse as parse_signature
from ..store import Store

__all__ = ["drain_to_bucket"]


def _latest(bucket: Bucket, url: ObjectURL) -> CheckpointInfo | None:
    """The checkpoint the store's LATEST names (None: no LATEST); CorruptCheckpointError if it
    names no committed checkpoint."""
    name = latest_name(bucket, url)
    if name is None:
        return None
    try:
        return read_info(bucket, url.child(name))
    except CheckpointNotFoundError:
        raise CorruptCheckpointError(
            f"LATEST names {name!r}, which is not a committed checkpoint",
            path=str(url),
            file=LATEST,
        ) from None


def _advance_latest(bucket: Bucket, url: ObjectURL, info: CheckpointInfo) -> None:
    """Point the store's LATEST at ``info`` if it is newer than what LATEST names."""
    current = _latest(bucket, url)
    if current is None or (info.created, info.name) > (current.created, current.name):
        bucket.put(url.key(LATEST), f"{info.name}\n".encode())


def _upload_files(
    rd: CheckpointReader, bucket: Bucket, ckpt: ObjectCheckpoint, jobs: int
) -> tuple[int, bytes | None]:
    """Upload the data files, index.parquet and SIGNATURE.json of open checkpoint ``rd``;
    return the bytes uploaded and the signature's (None: not signed)."""
    m, sent = rd.manifest, 0
    for f in m["files"]:
        fd = rd.open_file(f["name"])  # header, trailer and footer checked against the index
        try:
            upload(bucket, ckpt.key(f["name"]), fd, f["size"], jobs, _part_uploaded)
        finally:
            os.close(fd)
        sent += f["size"]
    fd = rd.open_member(INDEX, m["index"]["size"], "index.parquet")
    try:
        upload(bucket, ckpt.key(INDEX), fd, m["index"]["size"], jobs)
    finally:
        os.close(fd)
    sent += m["index"]["size"]
    try:
        raw = read_regular(SIGNATURE, dir_fd=rd.dir_fd, max_size=MAX_SIGNATURE_BYTES)
    except FileNotFoundError:
        return sent, None
    except UnsafeFileError as e:
        raise rd.corrupt(f"{SIGNATURE} {e.reason}", file=SIGNATURE) from None
    try:
        parse_signature(raw)
    except ValueError as e:
        raise rd.corrupt(f"{SIGNATURE} is malformed: {e}", file=SIGNATURE) from None
    bucket.put(ckpt.key(SIGNATURE), raw)
    return sent + len(raw), raw


def _part_uploaded() -> None:
    failpoint("s3.part_uploaded")


def _check_upload(src_path: str, opener: Callable[[], ObjectCheckpoint], where: str) -> None:
    """Verify every chunk of the uploaded objects; on failure, say which side is damaged."""
    report = verify_checkpoint(opener)
    if not report.ok:
        why = "the bucket returned other bytes than were uploaded"
        copied = f"the objects uploaded to {where}"
        raise damaged_side(report, verify_checkpoint(src_path), copied, why)


def _commit(
    bucket: Bucket, ckpt: ObjectCheckpoint, raw: bytes, info: CheckpointInfo, src: str
) -> None:
    """Create the manifest object (the commit point) unless it exists; a manifest of another
    uuid there (a concurrent drain of the name won) is a DrainConflictError."""
    if bucket.put(ckpt.key(MANIFEST), raw, if_absent=True):
        return
    have = read_info(bucket, ckpt.url)
    if have.uuid != info.uuid:
        raise DrainConflictError(info.name, src, info.uuid, ckpt.path, have.uuid, replaceable=False)


def _drain_one(
    info: CheckpointInfo, bucket: Bucket, url: ObjectURL, jobs: int
) -> tuple[CheckpointInfo, int, str]:
    """Upload, verify and commit one checkpoint; its info in the bucket, the bytes sent and
    the SHA-256 of its manifest."""
    where = str(url.child(info.name))
    with CheckpointReader(info.path) as rd:  # manifest and index checked, O_NOFOLLOW
        if rd.manifest["uuid"] != info.uuid:
            raise CheckpointReplacedError(f"{info.path} was replaced while being drained", where)
        if "encryption" in rd.features:
            raise StoreError(
                f"{info.path} is encrypted: an object store has no keyring for its data keys, "
                "so it is not drained there (drain it to a file-system store)",
                where,
            )
        raw = rd.manifest_raw
        ckpt = ObjectCheckpoint(url.child(info.name), bucket, raw, jobs)
        try:
            ckpt.manifest()  # the uuid its objects go under
            sent, signature = _upload_files(rd, bucket, ckpt, jobs)
            failpoint("s3.uploaded")
            _check_upload(info.path, lambda: ObjectCheckpoint(ckpt.url, bucket, raw, jobs), where)
            if signature is not None and ckpt.signature() != signature:
                raise StoreError(
                    f"{ckpt.key(SIGNATURE)} in the bucket differs from what was uploaded", where
                )
            failpoint("s3.verified")
            again, _ = read_manifest(rd.path, dir_fd=rd.dir_fd)
            if again != raw:
                raise CheckpointReplacedError(
                    f"{info.path} was replaced while being drained (its manifest changed)", where
                )
            _commit(bucket, ckpt, raw, info, info.path)
        except CheckpointError:  # typed already (some are OSErrors too: FileExistsError)
            raise
        except OSError as e:
            raise from_oserror(e, where, "cannot drain into") from None
        finally:
            ckpt.close()
        sent += len(raw)
    out = CheckpointInfo.from_manifest(rd.manifest, where)
    try:
        failpoint("s3.manifest_created")
        _advance_latest(bucket, url, out)
        failpoint("s3.latest_written")
    except (OSError, CheckpointError) as e:
        warn_after_commit(f"{where} is drained, but LATEST of {url} was not moved: {brief(e)}")
    return out, sent, hashlib.sha256(raw).hexdigest()


def _plan(
    todo: list[CheckpointInfo], bucket: Bucket, url: ObjectURL
) -> list[tuple[CheckpointInfo, CheckpointInfo | None]]:
    """Each checkpoint with its copy in the bucket (None: to upload); DrainConflictError for a
    name the bucket holds with another uuid."""
    plan, conflicts = [], []
    for info in todo:
        try:
            have: CheckpointInfo | None = read_info(bucket, url.child(info.name))
        except CheckpointNotFoundError:
            have = None
        if have is not None and have.uuid != info.uuid:
            conflicts.append((info, have))
            continue
        plan.append((info, have))
    if conflicts:
        info, have = conflicts[0]
        raise DrainConflictError(
            info.name,
            info.path,
            info.uuid,
            have.path,
            have.uuid,
            more=len(conflicts) - 1,
            replaceable=False,
        )
    return plan


def drain_to_bucket(
    src: Store,
    dst: str,
    todo: list[CheckpointInfo],
    jobs: int,
    on_drained: Callable[[CheckpointInfo, int, float], None] | None = None,
) -> list[CheckpointInfo]:
    """``drain`` of the checkpoints ``todo`` of ``src`` into the store ``dst`` (``s3://``)."""
    url = parse(dst)
    bucket = Bucket(url.bucket, jobs)
    _latest(bucket, url)  # a damaged LATEST: say so before uploading anything
    drained = []
    for info, have in _plan(todo, bucket, url):
        if have is not None:
            try:
                _advance_latest(bucket, url, have)
            except CheckpointError as e:
                warn_after_commit(f"LATEST of {url} was not moved to {have.name}: {brief(e)}")
            continue
        t0 = time.monotonic()
        out, nbytes, digest = _drain_one(info, bucket, url, jobs)
        drained.append(out)
        for late in audit.note(
            src.root,
            "drain",
            checkpoint=info.name,
            uuid=info.uuid,
            manifest_sha256=digest,
            detail={"dest": out.path},
        ):
            warn_after_commit(late, stacklevel=2)
        if on_drained is not None:
            on_drained(out, nbytes, time.monotonic() - t0)
    return drained
