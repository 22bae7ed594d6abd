"""``s3://bucket/prefix`` addresses of a store in an object store, parsed strictly.

A store in a bucket is named by the bucket and an optional key prefix; its checkpoints are the
objects ``PREFIX/<name>/<file>`` (docs/format.md, "Checkpoints in an object store"). Every part
is checked before any request is made: a bucket name of the S3 rules, prefix segments that are
non-empty, not ``.`` or ``..``, of plain characters, so a key built from them can never name an
object outside the store, and a whole key of at most 1024 bytes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TypeGuard

from ..errors import InvalidNameError
from ..format.layout import check_name

__all__ = ["SCHEME", "ObjectURL", "is_url", "parse"]

SCHEME = "s3://"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=@~-]{0,254}")
MAX_PREFIX = 512
"""Bytes of a store's prefix: room is left for ``/<name>/<file>`` under S3's 1024-byte keys."""


def is_url(x: object) -> TypeGuard[str]:
    """Whether ``x`` is a string naming an object store (``s3://...``), not a local path."""
    return isinstance(x, str) and x.startswith(SCHEME)


@dataclass(frozen=True)
class ObjectURL:
    """A store (``prefix``: its keys' common prefix, ``""`` or segments joined by ``/``) in
    ``bucket``."""

    bucket: str
    prefix: str = ""

    def key(self, *parts: str) -> str:
        """The object key of ``parts`` under the prefix (each part already checked)."""
        return "/".join(p for p in (self.prefix, *parts) if p)

    def child(self, name: str) -> ObjectURL:
        """The address of checkpoint ``name`` of this store."""
        return ObjectURL(self.bucket, self.key(check_name(name)))

    def parent(self) -> ObjectURL:
        """The store holding the checkpoint this address names (its last segment)."""
        return ObjectURL(self.bucket, self.prefix.rpartition("/")[0])

    @property
    def last(self) -> str:
        """The last segment of the prefix (a checkpoint's name), ``""`` for a bucket's root."""
        return self.prefix.rpartition("/")[2]

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"


def parse(text: str | os.PathLike) -> ObjectURL:
    """The ``ObjectURL`` of ``s3://bucket[/prefix]`` (one trailing ``/`` allowed);
    InvalidNameError saying what is wrong with anything else."""
    if not is_url(text):
        raise InvalidNameError(f"not an object store address (s3://bucket/prefix): {text!r}")
    s = str(text)
    rest = s[len(SCHEME) :]
    if rest.endswith("/"):
        rest = rest[:-1]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _IPV4.fullmatch(bucket):
        raise InvalidNameError(
            f"invalid bucket name {bucket!r} in {s!r}: 3 to 63 lowercase letters, digits, "
            "'.' and '-', starting and ending with a letter or digit, no '..', not an IP address"
        )
    if prefix:
        for seg in prefix.split("/"):
            if not _SEGMENT.fullmatch(seg):
                raise InvalidNameError(
                    f"invalid prefix segment {seg!r} in {s!r}: segments are non-empty, not '.' "
                    "or '..', of letters, digits and . _ + = @ ~ - (not starting with '.' "
                    "or '-'), at most 255 each"
                )
        if len(prefix.encode()) > MAX_PREFIX:
            raise InvalidNameError(f"prefix of {s!r} is longer than {MAX_PREFIX} bytes")
    return ObjectURL(bucket, prefix)
