"""ckptguard: atomic, verified checkpoints for PyTorch training on HPC clusters.

Use ``save``/``load`` where you used ``torch.save``/``torch.load``; ``verify`` checks every
byte of a checkpoint against its hashes; ``Store`` lists, deletes and garbage-collects a
directory of them.
"""

from .api import (
    CheckpointDescription,
    Problem,
    TensorSummary,
    VerifyReport,
    describe,
    load,
    save,
    verify,
)
from .errors import (
    CheckpointAbortedError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    InvalidNameError,
    StoreError,
    StoreFullError,
    StoreNotWritableError,
    UnsupportedObjectError,
)
from .format.manifest import CheckpointInfo
from .shard import Shard
from .store import Store

__version__ = "0.1.0"

__all__ = [
    "CheckpointAbortedError",
    "CheckpointDescription",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "InvalidNameError",
    "Problem",
    "Shard",
    "Store",
    "StoreError",
    "StoreFullError",
    "StoreNotWritableError",
    "TensorSummary",
    "UnsupportedObjectError",
    "VerifyReport",
    "__version__",
    "describe",
    "load",
    "save",
    "verify",
]
