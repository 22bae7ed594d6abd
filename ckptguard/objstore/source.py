"""Reading checkpoints in a bucket: a checkpoint's objects as the members ``CheckpointReader``
reads (``ObjectCheckpoint``), and a store's LATEST and listing.

``ObjectCheckpoint`` stands in for a checkpoint directory as a one-file checkpoint does: the
manifest and index are fetched whole (capped), each data file is downloaded with ranged GETs
into an anonymous private file (``O_TMPFILE`` under ``$TMPDIR``: gone when closed) whose
descriptor the reader then checks exactly as a local file (header, footer, every chunk's hash).
The object sizes are checked against the manifest's before any download. A checkpoint exists in
a bucket iff its ``MANIFEST.json`` object does (docs/format.md, "Checkpoints in an object
store"); objects without one are never listed or read.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    SignatureError,
    StoreError,
)
from ..format.layout import INDEX, LATEST, MANIFEST, MAX_LATEST_BYTES, SIGNATURE, is_name
from ..format.manifest import MAX_MANIFEST_BYTES, CheckpointInfo
from ..fsutil import decode_manifest
from ..io import pwrite_all
from ..sign import MAX_SIGNATURE_BYTES
from .s3 import Bucket, ObjectTooLarge
from .url import ObjectURL, parse

__all__ = [
    "BLOCK_BYTES",
    "ObjectCheckpoint",
    "ObjectScan",
    "latest_name",
    "names",
    "open_checkpoint",
    "read_info",
    "resolve",
    "scan",
    "targets",
]

BLOCK_BYTES = 8 << 20
"""One ranged GET of a download (each thread holds one)."""


class ObjectCheckpoint:
    """The checkpoint at ``url`` (``PREFIX/<name>``) in ``bucket``, read as ``CheckpointReader``
    reads a one-file checkpoint's members. ``manifest_raw``: use these manifest bytes instead of
    the bucket's MANIFEST.json (a drain verifies its upload before that object exists)."""

    kind = "a checkpoint in an object store"

    def __init__(
        self, url: ObjectURL, bucket: Bucket, manifest_raw: bytes | None = None, jobs: int = 4
    ) -> None:
        self.url, self.bucket, self.jobs = url, bucket, jobs
        self.path = str(url)
        self.manifest_raw = manifest_raw or b""
        self._given = manifest_raw is not None
        self._files: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._fds: dict[str, int] = {}
        self.uuid = ""

    def corrupt(self, msg: str, file: str | None = None) -> CorruptCheckpointError:
        return CorruptCheckpointError(msg, path=self.path, file=file)

    def key(self, name: str) -> str:
        """The object key of file ``name`` of this checkpoint (manifest: beside its uuid's
        objects; the rest under ``<uuid>/``)."""
        if name == MANIFEST:
            return self.url.key(MANIFEST)
        return self.url.key(self.uuid, name)

    def manifest(self) -> dict:
        """The checked manifest body (MANIFEST.json of at most 256 MiB)."""
        if not self._given:
            try:
                raw = self.bucket.get(self.key(MANIFEST), MAX_MANIFEST_BYTES)
            except ObjectTooLarge:
                raise self.corrupt(
                    "MANIFEST.json is larger than the 256 MiB limit", MANIFEST
                ) from None
            if raw is None:
                raise CheckpointNotFoundError(f"no checkpoint at {self.path}")
            self.manifest_raw = raw
        body = decode_manifest(self.manifest_raw, self.path)
        self.uuid = body["uuid"]
        self._files = {f["name"]: f["size"] for f in body["files"]}
        return body

    def index(self, size: int) -> bytes:
        """index.parquet's bytes: an object of exactly ``size`` bytes."""
        try:
            data = self.bucket.get(self.key(INDEX), size)
        except ObjectTooLarge as e:
            raise self.corrupt(
                f"index.parquet has {e.size} bytes, {size} expected", INDEX
            ) from None
        if data is None:
            raise self.corrupt("index.parquet is missing", INDEX)
        return data

    def member_size(self, name: str) -> int | None:
        """The size of data file ``name``'s object (None: the manifest names no such file);
        a missing object is corruption."""
        if name not in self._files:
            return None
        if name not in self._sizes:
            got = self.bucket.head(self.key(name))
            if got is None:
                raise self.corrupt("data file is missing from the bucket", name)
            self._sizes[name] = got
        return self._sizes[name]

    def data_fd(self, name: str, size: int, what: str) -> int:
        """A descriptor of a private local copy of data file ``name`` (``size`` bytes), which
        the caller closes; downloaded once per reader."""
        got = self.member_size(name)
        if got is None:
            raise self.corrupt(f"{what} is not in the checkpoint", name)
        if got != size:
            raise self.corrupt(f"{what} has {got} bytes in the bucket, {size} expected", name)
        if name not in self._fds:
            self._fds[name] = self._download(name, size)
        return os.dup(self._fds[name])

    def _download(self, name: str, size: int) -> int:
        """Object ``name`` into a new anonymous file, ``jobs`` ranged GETs at once."""
        try:
            with tempfile.TemporaryFile(prefix="ckptguard-s3-") as f:  # O_TMPFILE: no name
                fd = os.dup(f.fileno())
        except OSError as e:
            raise StoreError(f"cannot create a temporary file for {self.path}: {e}") from None
        key = self.key(name)

        def one(off: int) -> None:
            data = self.bucket.get_range(key, off, min(BLOCK_BYTES, size - off))
            try:
                pwrite_all(fd, [memoryview(data)], off)
            except OSError as e:
                raise StoreError(
                    f"cannot write the local copy of {self.path}/{name}: {e}"
                ) from None

        try:
            offsets = range(0, size, BLOCK_BYTES)
            if self.jobs <= 1 or len(offsets) <= 1:
                for off in offsets:
                    one(off)
            else:
                with ThreadPoolExecutor(min(self.jobs, len(offsets))) as pool:
                    list(pool.map(one, offsets))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def signature(self) -> bytes | None:
        """SIGNATURE.json's bytes (None: the checkpoint has none)."""
        try:
            return self.bucket.get(self.key(SIGNATURE), MAX_SIGNATURE_BYTES)
        except ObjectTooLarge:
            raise SignatureError(
                f"checkpoint {self.path} has a {SIGNATURE} of more than "
                f"{MAX_SIGNATURE_BYTES} bytes",
                self.path,
            ) from None

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> ObjectCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- a store in a bucket ------------------------------------------------------------------------


def latest_name(bucket: Bucket, store: ObjectURL) -> str | None:
    """The name ``PREFIX/LATEST`` holds (None: no such object); CorruptCheckpointError for
    anything but a checkpoint name and one newline."""
    try:
        raw = bucket.get(store.key(LATEST), MAX_LATEST_BYTES)
    except ObjectTooLarge:
        raise CorruptCheckpointError("LATEST is too large", path=str(store), file=LATEST) from None
    if raw is None:
        return None
    name = raw.decode("utf-8", "replace").removesuffix("\n")
    if not raw.endswith(b"\n") or not is_name(name):
        raise CorruptCheckpointError("LATEST is damaged", path=str(store), file=LATEST)
    return name


def read_info(bucket: Bucket, ckpt: ObjectURL) -> CheckpointInfo:
    """What the checkpoint at ``ckpt`` is, from its manifest (CheckpointNotFoundError: none)."""
    body = ObjectCheckpoint(ckpt, bucket).manifest()
    return CheckpointInfo.from_manifest(body, str(ckpt))


def resolve(text: str, bucket: Bucket | None = None) -> tuple[ObjectURL, Bucket]:
    """The checkpoint ``text`` names (``s3://bucket/prefix/name``), or the one the LATEST of
    the store it names points at; and its bucket."""
    url = parse(text)
    b = bucket or Bucket(url.bucket)
    if url.prefix and is_name(url.last) and b.head(url.key(MANIFEST)) is not None:
        return url, b
    name = latest_name(b, url)
    if name is None:
        raise CheckpointNotFoundError(f"no checkpoint or store with LATEST at {url}")
    ckpt = url.child(name)
    if b.head(ckpt.key(MANIFEST)) is None:
        raise CorruptCheckpointError(
            f"LATEST names {name!r}, which is not a committed checkpoint",
            path=str(url),
            file=LATEST,
        )
    return ckpt, b


@dataclass
class ObjectScan:
    """A store in a bucket: its committed checkpoints (oldest first), and the names holding a
    MANIFEST.json that does not read, with the reason."""

    listed: list[CheckpointInfo] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def names(bucket: Bucket, store: ObjectURL) -> list[str]:
    """The checkpoint names under the store's prefix (each ``PREFIX/<name>/``), committed or
    not, sorted."""
    top = store.key("") + "/" if store.prefix else ""
    out = []
    for dirs, _ in bucket.listing(top, "/"):
        for d in dirs:
            n = d[len(top) :].removesuffix("/")
            if is_name(n):
                out.append(n)
    return sorted(out)


def scan(bucket: Bucket, store: ObjectURL) -> ObjectScan:
    """The store's checkpoints: each name whose MANIFEST.json exists and reads (the others,
    drains that have not finished, are not checkpoints)."""
    out = ObjectScan()
    for n in names(bucket, store):
        try:
            out.listed.append(read_info(bucket, store.child(n)))
        except CheckpointNotFoundError:
            continue
        except (CorruptCheckpointError, FormatVersionError) as e:
            out.skipped.append((n, str(e)))
    out.listed.sort(key=lambda i: (i.created, i.name))
    return out


def open_checkpoint(text: str, jobs: int = 4) -> ObjectCheckpoint:
    """The checkpoint ``text`` names (or its store's LATEST), ready for ``CheckpointReader``."""
    ckpt, bucket = resolve(text)
    return ObjectCheckpoint(ckpt, bucket, jobs=jobs)


def targets(text: str, latest_only: bool) -> tuple[list[str], list[str]]:
    """What ``ckptguard verify`` checks at ``text``: the checkpoint it names, else the store's
    LATEST (``latest_only``) or every checkpoint of the store and every one whose manifest
    does not read; and the store's own problems (a damaged LATEST)."""
    url = parse(text)
    bucket = Bucket(url.bucket)
    if url.prefix and is_name(url.last) and bucket.head(url.key(MANIFEST)) is not None:
        return [str(url)], []
    problems: list[str] = []
    try:
        latest = resolve(str(url), bucket)[0] if latest_name(bucket, url) is not None else None
    except CorruptCheckpointError as e:
        latest, problems = None, [f"FAIL {url.key(LATEST)}", f"  problem: {e}"]
    if latest_only:
        return ([] if latest is None else [str(latest)]), problems
    found = scan(bucket, url)
    damaged = [str(url.child(n)) for n, _ in found.skipped]
    return [i.path for i in found.listed] + damaged, problems
