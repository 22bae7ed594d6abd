"""Removing what drains into a bucket left behind: the objects of checkpoints that never got
their MANIFEST.json (a killed drain, or the loser of two drains of one name), and unfinished
multipart uploads.

Only keys of the layout are touched (``PREFIX/<name>/<uuid>/<file>`` with a checkpoint name, a
32-hex uuid and a file name of the format), never a committed checkpoint's objects (those under
the uuid its MANIFEST.json names), never a checkpoint whose MANIFEST.json does not read (its
objects are left for a person to look at), and only objects older than ``older_than``: the age
must exceed the longest drain, whose objects wait for their manifest meanwhile.
"""

from __future__ import annotations

import datetime as dt
import time

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError
from ..format.layout import INDEX, SIGNATURE, file_rank, is_uuid
from .s3 import Bucket
from .source import names, read_info
from .url import ObjectURL, parse

__all__ = ["gc"]


def _ours(rest: str) -> str | None:
    """The uuid of a key's tail ``<uuid>/<file>`` of the layout, else None."""
    uuid, _, file = rest.partition("/")
    if not is_uuid(uuid) or not (file in (INDEX, SIGNATURE) or file_rank(file) is not None):
        return None
    return uuid


def _committed_uuid(bucket: Bucket, ckpt: ObjectURL) -> str | None:
    """The uuid of the committed checkpoint at ``ckpt`` ("" if its manifest does not read:
    keep everything; None if there is none)."""
    try:
        return read_info(bucket, ckpt).uuid
    except CheckpointNotFoundError:
        return None
    except (CorruptCheckpointError, FormatVersionError):
        return ""


def gc(store: str, older_than: float | dt.timedelta = 3600.0) -> list[str]:
    """Remove orphan objects and unfinished uploads under the store ``store`` (``s3://...``)
    untouched for ``older_than`` seconds; return the ``s3://`` addresses removed."""
    if isinstance(older_than, dt.timedelta):
        older_than = older_than.total_seconds()
    url = parse(store)
    bucket = Bucket(url.bucket)
    cutoff = time.time() - older_than
    removed: list[str] = []
    for name in names(bucket, url):
        ckpt = url.child(name)
        keep = _committed_uuid(bucket, ckpt)
        if keep == "":
            continue
        top = ckpt.key("") + "/"
        victims = []
        for _, objs in bucket.listing(top):
            for o in objs:
                uuid = _ours(o.key[len(top) :])
                if uuid is not None and uuid != keep and o.mtime <= cutoff:
                    victims.append(o.key)
        bucket.delete(victims)
        removed += [bucket.where(k) for k in victims]
        for key, upload_id, started in bucket.uploads(top):
            uuid = _ours(key[len(top) :])
            if uuid is not None and uuid != keep and started <= cutoff:
                bucket.abort(key, upload_id)
                removed.append(f"{bucket.where(key)} (unfinished upload {upload_id[:16]})")
    return removed
