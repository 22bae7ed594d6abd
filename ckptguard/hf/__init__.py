"""Hugging Face ``Trainer`` through ckptguard: ``ckptguard.hf.Trainer`` where you used
``transformers.Trainer`` (or ``CheckpointMixin`` first among a Trainer subclass's bases).

Each checkpoint is one atomic ckptguard commit holding everything a resume needs
(docs/integrations.md). The names load on first use (PEP 562): ``import ckptguard.hf`` imports
no transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .trainer import CheckpointMixin, Trainer, check_transformers

__all__ = ["CheckpointMixin", "Trainer", "check_transformers"]


def __getattr__(name: str) -> Any:
    """Import transformers, and the module that needs it, on first use of a name."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".trainer", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
