"""ckptguard: atomic, verified checkpoints for PyTorch training on HPC clusters.

Use ``save``/``load`` where you used ``torch.save``/``torch.load`` (``save_async`` or a
``Checkpointer`` to save in the background); ``verify`` checks every byte of a checkpoint
against its hashes; ``export`` writes one as safetensors, HDF5 or a torch.save file;
``import_checkpoint`` saves a torch.save, safetensors or DCP checkpoint as one; ``Store``
lists, deletes and garbage-collects a directory of them. Under ``ckptguard run``,
``checkpoint_requested()`` says when to save.

The names below load on first use (PEP 562), so ``import ckptguard.format`` or
``ckptguard.errors`` costs no torch import; ``from ckptguard import save`` imports what ``save``
needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ArtifactReferenceError,
    AuditError,
    AuditLockTimeoutError,
    AuditRollbackError,
    AuditSignatureError,
    AuditTamperedError,
    CheckpointAbortedError,
    CheckpointerClosedError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointHeldError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    CheckpointWarning,
    CorruptCheckpointError,
    ExportError,
    ExportWarning,
    ForeignCheckpointError,
    ForeignFormatError,
    FormatVersionError,
    HostPoolPrepareError,
    HostPoolPrepareWarning,
    HostPoolTooSmallError,
    IntegrationError,
    InvalidNameError,
    KeyFileError,
    KeyUnavailableError,
    LineageError,
    MlflowBackupError,
    MlflowRestoreError,
    MlflowStoreError,
    NotACheckpointError,
    OneFileError,
    OptionsMismatchError,
    OutOfMemoryError,
    RebuildError,
    RedundancyError,
    RegisteredTypeError,
    ReplicaMismatchWarning,
    RetentionPolicyError,
    SaveCancelledError,
    ScopeShreddedError,
    SignatureError,
    StoreError,
    StoreFullError,
    StoreNotWritableError,
    UnsafePickleError,
    UnsupportedObjectError,
    ValidationFailedError,
    WorldSizeError,
)
from .version import __version__

if TYPE_CHECKING:
    from .agent.client import checkpoint_requested, training_step
    from .api import CheckpointDescription, TensorSummary, describe, export, load, save, verify
    from .checkpointer import Checkpointer, SaveHandle, save_async
    from .exporter import ExportResult
    from .format.manifest import CheckpointInfo
    from .importer import ImportReport, import_checkpoint
    from .read import Problem, VerifyReport
    from .retention import Policy
    from .shard import PerRank, Shard
    from .store import Store
    from .treetypes import register_types, registered_types, unregister_types

# The submodule (relative to this package) that defines each public name loaded on first use;
# the error classes (errors.py imports nothing heavy) are imported above.
_EXPORTS: dict[str, tuple[str, ...]] = {
    ".agent.client": ("checkpoint_requested", "training_step"),
    ".api": (
        "CheckpointDescription",
        "TensorSummary",
        "describe",
        "export",
        "load",
        "save",
        "verify",
    ),
    ".checkpointer": ("Checkpointer", "SaveHandle", "save_async"),
    ".exporter": ("ExportResult",),
    ".format.manifest": ("CheckpointInfo",),
    ".importer": ("ImportReport", "import_checkpoint"),
    ".read": ("Problem", "VerifyReport"),
    ".shard": ("PerRank", "Shard"),
    ".retention": ("Policy",),
    ".store": ("Store",),
    ".treetypes": ("register_types", "registered_types", "unregister_types"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "AuditError",
    "AuditLockTimeoutError",
    "AuditRollbackError",
    "AuditSignatureError",
    "AuditTamperedError",
    "ArtifactReferenceError",
    "KeyFileError",
    "KeyUnavailableError",
    "LineageError",
    "MlflowBackupError",
    "MlflowRestoreError",
    "MlflowStoreError",
    "SignatureError",
    "CheckpointAbortedError",
    "Checkpointer",
    "CheckpointerClosedError",
    "CheckpointDescription",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointHeldError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointReplacedError",
    "CheckpointWarning",
    "CorruptCheckpointError",
    "ExportError",
    "ExportResult",
    "ExportWarning",
    "ForeignCheckpointError",
    "ForeignFormatError",
    "FormatVersionError",
    "HostPoolPrepareError",
    "HostPoolPrepareWarning",
    "HostPoolTooSmallError",
    "ImportReport",
    "IntegrationError",
    "InvalidNameError",
    "NotACheckpointError",
    "OneFileError",
    "OptionsMismatchError",
    "OutOfMemoryError",
    "PerRank",
    "Policy",
    "Problem",
    "RebuildError",
    "RedundancyError",
    "RegisteredTypeError",
    "RetentionPolicyError",
    "ReplicaMismatchWarning",
    "SaveCancelledError",
    "ScopeShreddedError",
    "SaveHandle",
    "Shard",
    "Store",
    "StoreError",
    "StoreFullError",
    "StoreNotWritableError",
    "TensorSummary",
    "UnsafePickleError",
    "UnsupportedObjectError",
    "ValidationFailedError",
    "VerifyReport",
    "WorldSizeError",
    "__version__",
    "checkpoint_requested",
    "describe",
    "export",
    "import_checkpoint",
    "load",
    "register_types",
    "registered_types",
    "save",
    "save_async",
    "training_step",
    "unregister_types",
    "verify",
]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first access and cache the value here."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})
