"""Uploading one file of a checkpoint from an open descriptor: one PUT up to the part size,
else a multipart upload whose parts are read from the descriptor as they are sent (each thread
holds at most botocore's send buffer, never a whole part or file), ``jobs`` parts at once.

The part size is ``CKPTGUARD_S3_PART_BYTES`` (default 64 MiB; at least S3's 5 MiB, at most
5 GiB) and grows for a file that would need more than 10,000 parts. A failed upload is aborted
(its parts are not kept); an upload a killed process left is removed by ``objstore.gc``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

from ..errors import CheckpointError
from .s3 import MAX_PART_BYTES, MAX_PARTS, MIN_PART_BYTES, Bucket, FdRange

__all__ = ["DEFAULT_PART_BYTES", "PART_ENV", "part_bytes", "upload"]

DEFAULT_PART_BYTES = 64 << 20
PART_ENV = "CKPTGUARD_S3_PART_BYTES"


def part_bytes(size: int) -> int:
    """The part size for a file of ``size`` bytes (``PART_ENV`` or the default, within S3's
    limits, large enough for at most 10,000 parts)."""
    raw = os.environ.get(PART_ENV, "")
    try:
        want = int(raw) if raw else DEFAULT_PART_BYTES
    except ValueError:
        raise ValueError(f"{PART_ENV} must be a number of bytes, not {raw!r}") from None
    want = max(MIN_PART_BYTES, min(MAX_PART_BYTES, want))
    return max(want, -(-size // MAX_PARTS))


def upload(
    bucket: Bucket,
    key: str,
    fd: int,
    size: int,
    jobs: int,
    on_part: Callable[[], None] | None = None,
) -> None:
    """Write bytes ``[0, size)`` of ``fd`` as object ``key`` (replacing one there: objects
    under a checkpoint's uuid are only ever written with the same bytes). ``on_part`` runs after
    each part of a multipart upload (a failpoint)."""
    step = part_bytes(size)
    if size <= step:
        bucket._call(
            key, "cannot write", bucket.client.put_object, Key=key, Body=FdRange(fd, 0, size)
        )
        return
    r = bucket._call(key, "cannot write", bucket.client.create_multipart_upload, Key=key)
    upload_id = r["UploadId"]
    done = False
    try:
        parts = _send_parts(bucket, key, upload_id, fd, size, step, jobs, on_part)
        bucket._call(
            key,
            "cannot write",
            bucket.client.complete_multipart_upload,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
        done = True
    finally:
        if not done:
            with contextlib.suppress(CheckpointError):  # else gc removes it
                bucket.abort(key, upload_id)


def _send_parts(
    bucket: Bucket,
    key: str,
    upload_id: str,
    fd: int,
    size: int,
    step: int,
    jobs: int,
    on_part: Callable[[], None] | None,
) -> list[dict]:
    """Upload every part (``jobs`` at once; the first error stops the rest); their numbers and
    ETags in order."""

    def one(number: int) -> dict:
        off = (number - 1) * step
        body = FdRange(fd, off, min(step, size - off))
        r = bucket._call(
            key,
            "cannot write",
            bucket.client.upload_part,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
        )
        if on_part is not None:
            on_part()
        return {"PartNumber": number, "ETag": r["ETag"]}

    numbers = range(1, -(-size // step) + 1)
    if jobs <= 1:
        return [one(n) for n in numbers]
    with ThreadPoolExecutor(min(jobs, len(numbers)), thread_name_prefix="ckptguard-s3") as pool:
        futures = [pool.submit(one, n) for n in numbers]
        wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                for g in futures:
                    g.cancel()
                raise f.exception()  # type: ignore[misc]
        return [f.result() for f in futures]
