"""One S3 bucket through boto3: bounded reads, conditional creates, multipart uploads from a
file descriptor, listings; every failure a typed error naming the ``s3://`` address.

The endpoint, region and credentials come from boto3's standard chain (``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
``~/.aws/config``, instance roles). boto3 is imported only when a bucket is first used: it is
the optional extra ``ckptguard[s3]``.

What a bucket returns is untrusted: a read asks for at most the bytes it can use, refuses an
object larger than its cap before reading it, and checks that it got exactly the length the
response announced (a cut transfer is a StoreError, never short data).
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError, StoreError, StoreNotWritableError
from .url import SCHEME

__all__ = ["MIN_PART_BYTES", "Bucket", "ObjectTooLarge", "Stat", "client_for"]

MIN_PART_BYTES = 5 << 20
"""S3's smallest part of a multipart upload (all but the last)."""
MAX_PART_BYTES = 5 << 30
MAX_PARTS = 10_000

_ABSENT = {"NoSuchKey", "404", "NotFound"}
_DENIED = {
    "AccessDenied",
    "403",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


class ObjectTooLarge(CheckpointError):
    """An object is larger than the reader's cap for it (``size``: what the bucket says)."""

    def __init__(self, where: str, size: int, cap: int) -> None:
        super().__init__(f"{where} has {size} bytes, more than the {cap} allowed")
        self.size = size


@dataclass(frozen=True)
class Stat:
    """An object of a listing: its key, size and last modification (seconds since the epoch)."""

    key: str
    size: int
    mtime: float


def client_for(pool: int) -> Any:
    """A boto3 S3 client of the environment's endpoint and credentials, with a connection pool
    of ``pool`` (one per configuration and pool size: clients are thread-safe)."""
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    with _clients_lock:
        c = _clients.get((env, pool))
        if c is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise StoreError(
                    "object stores (s3://) need boto3: pip install 'ckptguard[s3]'"
                ) from None
            cfg = Config(
                max_pool_connections=pool,
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=30,
                read_timeout=120,
            )
            c = _clients[(env, pool)] = boto3.session.Session().client("s3", config=cfg)
        return c


def _code(e: Exception) -> tuple[str, int | None]:
    """(error code, HTTP status) of a botocore ClientError ("" and None for others)."""
    resp = getattr(e, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    return code, resp.get("ResponseMetadata", {}).get("HTTPStatusCode")


class Bucket:
    """One bucket; ``jobs``: requests at once (the connection pool is sized for them)."""

    def __init__(self, bucket: str, jobs: int = 4) -> None:
        self.name = bucket
        self.client = client_for(max(10, jobs + 2))

    def where(self, key: str) -> str:
        return f"{SCHEME}{self.name}/{key}"

    def error(self, e: Exception, key: str, action: str) -> StoreError:
        """The typed error of a failed request on ``key``: permission (StoreNotWritableError),
        anything else (network, server, throttling past the retries) a StoreError."""
        code, status = _code(e)
        where = self.where(key)
        what = f"{code} (HTTP {status})" if code else f"{type(e).__name__}: {e}"
        if code in _DENIED or status == 403:
            return StoreNotWritableError(f"{action} {where}: permission denied ({what})", where)
        if type(e).__name__ == "NoCredentialsError":
            what += "; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        return StoreError(f"{action} {where}: {what}", where)

    def _call(self, key: str, action: str, fn: Callable[..., Any], **kw: Any) -> Any:
        try:
            return fn(Bucket=self.name, **kw)
        except Exception as e:
            if type(e).__module__.startswith(("botocore", "boto3", "urllib3")):
                raise self.error(e, key, action) from None
            raise

    # ---- reads ---------------------------------------------------------------------------------

    def head(self, key: str) -> int | None:
        """The size of object ``key``, or None if there is none."""
        try:
            r = self.client.head_object(Bucket=self.name, Key=key)
        except Exception as e:
            code, status = _code(e)
            if code in _ABSENT or status == 404:
                return None
            if type(e).__module__.startswith(("botocore", "boto3", "urllib3")):
                raise self.error(e, key, "cannot stat") from None
            raise
        return int(r["ContentLength"])

    def get(self, key: str, cap: int) -> bytes | None:
        """The bytes of object ``key`` (None: no such object); ObjectTooLarge before its body is
        read if it is larger than ``cap``."""
        try:
            r = self.client.get_object(Bucket=self.name, Key=key)
        except Exception as e:
            code, status = _code(e)
            if code != "NoSuchBucket" and (code in _ABSENT or status == 404):
                return None
            if type(e).__module__.startswith(("botocore", "boto3", "urllib3")):
                raise self.error(e, key, "cannot read") from None
            raise
        size = int(r["ContentLength"])
        body = r["Body"]
        try:
            if size > cap:
                raise ObjectTooLarge(self.where(key), size, cap)
            return self._read_body(body, size, key)
        finally:
            body.close()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Exactly ``length`` bytes of object ``key`` from ``start`` (a StoreError if the bucket
        returns another range or fewer bytes: the object changed or the transfer was cut)."""
        end = start + length - 1
        r = self._call(
            key, "cannot read", self.client.get_object, Key=key, Range=f"bytes={start}-{end}"
        )
        body = r["Body"]
        try:
            got = str(r.get("ContentRange", ""))
            if int(r["ContentLength"]) != length or not got.startswith(f"bytes {start}-{end}/"):
                raise StoreError(
                    f"cannot read {self.where(key)}: asked for bytes {start}-{end}, got "
                    f"{got or 'the whole object'}",
                    self.where(key),
                )
            return self._read_body(body, length, key)
        finally:
            body.close()

    def _read_body(self, body: Any, size: int, key: str) -> bytes:
        try:
            data = body.read(size + 1)
        except Exception as e:
            raise self.error(e, key, "cannot read") from None
        if len(data) != size:
            raise StoreError(
                f"cannot read {self.where(key)}: {len(data)} bytes arrived, {size} were announced",
                self.where(key),
            )
        return data

    def listing(self, prefix: str, delimiter: str = "") -> Iterator[tuple[list[str], list[Stat]]]:
        """The pages of a listing of keys under ``prefix``: (common prefixes, objects)."""
        token = None
        while True:
            kw: dict[str, Any] = {"Prefix": prefix}
            if delimiter:
                kw["Delimiter"] = delimiter
            if token:
                kw["ContinuationToken"] = token
            r = self._call(prefix, "cannot list", self.client.list_objects_v2, **kw)
            dirs = [p["Prefix"] for p in r.get("CommonPrefixes", [])]
            objs = [
                Stat(o["Key"], int(o["Size"]), o["LastModified"].timestamp())
                for o in r.get("Contents", [])
            ]
            yield dirs, objs
            if not r.get("IsTruncated"):
                return
            token = r.get("NextContinuationToken")

    # ---- writes --------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, if_absent: bool = False) -> bool:
        """Write object ``key``; with ``if_absent`` only if there is none (S3's conditional
        create, ``If-None-Match: *``): False if one exists (or another writer's create won)."""
        kw: dict[str, Any] = {"Key": key, "Body": data}
        if if_absent:
            kw["IfNoneMatch"] = "*"
        try:
            self.client.put_object(Bucket=self.name, **kw)
        except Exception as e:
            code, status = _code(e)
            if if_absent and (code in _PRECONDITION or status in (409, 412)):
                return False
            if type(e).__module__.startswith(("botocore", "boto3", "urllib3")):
                raise self.error(e, key, "cannot write") from None
            raise
        return True

    def delete(self, keys: list[str]) -> None:
        """Remove objects (1000 per request)."""
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            r = self._call(
                keys[i],
                "cannot delete",
                self.client.delete_objects,
                Delete={"Objects": batch, "Quiet": True},
            )
            if r.get("Errors"):
                err = r["Errors"][0]
                raise StoreError(
                    f"cannot delete {self.where(err.get('Key', ''))}: {err.get('Code')}",
                    self.where(err.get("Key", "")),
                )

    def uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        """The unfinished multipart uploads under ``prefix``: (key, upload id, start time)."""
        r = self._call(prefix, "cannot list", self.client.list_multipart_uploads, Prefix=prefix)
        return [(u["Key"], u["UploadId"], u["Initiated"].timestamp()) for u in r.get("Uploads", [])]

    def abort(self, key: str, upload_id: str) -> None:
        self._call(
            key, "cannot abort", self.client.abort_multipart_upload, Key=key, UploadId=upload_id
        )


class FdRange(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file as a seekable stream (the body of one
    part: botocore reads it as it sends, and seeks back to retry), without holding them."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        super().__init__()
        self.fd, self.offset, self.length, self.pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, min(self.length, base + pos))
        return self.pos

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = min(len(view), self.length - self.pos)
        if n <= 0:
            return 0
        got = os.preadv(self.fd, [view[:n]], self.offset + self.pos)
        if got == 0:
            raise OSError(5, "file shrank while being uploaded")
        self.pos += got
        return got

    def __len__(self) -> int:
        return self.length
