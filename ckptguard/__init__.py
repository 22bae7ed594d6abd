"""ckptguard: atomic, verified checkpoints for PyTorch training on HPC clusters.

Use ``save``/``load`` where you used ``torch.save``/``torch.load`` (``save_async`` or a
``Checkpointer`` to save in the background); ``verify`` checks every
byte of a checkpoint against its hashes; ``Store`` lists, deletes and garbage-collects a
directory of them. Under ``ckptguard run``, ``checkpoint_requested()`` says when to save.
"""

from .agent.client import checkpoint_requested
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
from .checkpointer import Checkpointer, SaveHandle, save_async
from .errors import (
    CheckpointAbortedError,
    CheckpointerClosedError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    CheckpointWarning,
    CorruptCheckpointError,
    FormatVersionError,
    HostPoolTooSmallError,
    InvalidNameError,
    NotACheckpointError,
    OptionsMismatchError,
    OutOfMemoryError,
    ReplicaMismatchWarning,
    SaveCancelledError,
    StoreError,
    StoreFullError,
    StoreNotWritableError,
    UnsupportedObjectError,
    WorldSizeError,
)
from .format.manifest import CheckpointInfo
from .shard import PerRank, Shard
from .store import Store
from .version import __version__

__all__ = [
    "CheckpointAbortedError",
    "Checkpointer",
    "CheckpointerClosedError",
    "CheckpointDescription",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointReplacedError",
    "CheckpointWarning",
    "CorruptCheckpointError",
    "FormatVersionError",
    "HostPoolTooSmallError",
    "InvalidNameError",
    "NotACheckpointError",
    "OptionsMismatchError",
    "OutOfMemoryError",
    "PerRank",
    "Problem",
    "ReplicaMismatchWarning",
    "SaveCancelledError",
    "SaveHandle",
    "Shard",
    "Store",
    "StoreError",
    "StoreFullError",
    "StoreNotWritableError",
    "TensorSummary",
    "UnsupportedObjectError",
    "VerifyReport",
    "WorldSizeError",
    "__version__",
    "checkpoint_requested",
    "describe",
    "load",
    "save",
    "save_async",
    "verify",
]
