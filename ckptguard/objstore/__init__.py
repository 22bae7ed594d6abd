"""Stores in an object store (S3 and S3-compatible buckets): addresses, the bucket client,
reading checkpoints from a bucket and removing what killed drains left (docs/format.md,
"Checkpoints in an object store"; docs/operations.md, "Drain to object storage (S3)").

Drains into a bucket are ``ckptguard.drain``'s (``drain.s3``). boto3 is imported only when a
bucket is first used (the extra ``ckptguard[s3]``).
"""

from __future__ import annotations

from .gc import gc
from .s3 import Bucket
from .source import ObjectCheckpoint, ObjectScan, latest_name, open_checkpoint, read_info, scan
from .url import ObjectURL, is_url, parse

__all__ = [
    "Bucket",
    "ObjectCheckpoint",
    "ObjectScan",
    "ObjectURL",
    "gc",
    "is_url",
    "latest_name",
    "open_checkpoint",
    "parse",
    "read_info",
    "scan",
]
