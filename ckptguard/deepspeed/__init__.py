"""DeepSpeed integration: its checkpoint files saved and loaded through ckptguard.

    engine, optimizer, _, _ = deepspeed.initialize(...)
    ckptguard.deepspeed.install(engine)
    engine.save_checkpoint(save_dir, tag)     # every rank's files: one atomic, verified commit
    engine.load_checkpoint(save_dir)          # the tag in `latest`, read and verified

``CheckpointEngine`` (DeepSpeed's checkpoint engine interface) and ``load_file`` import
DeepSpeed on first use; ``import ckptguard.deepspeed`` alone does not. docs/integrations.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import CheckpointEngine, load_file

__all__ = ["CheckpointEngine", "install", "load_file"]
_LAZY = ("CheckpointEngine", "load_file")


def install(engine: Any, **options: Any) -> Any:
    """Make DeepSpeed ``engine`` save and load its checkpoints through ckptguard; ``options``
    are ``CheckpointEngine``'s. Returns the checkpoint engine installed."""
    from .engine import CheckpointEngine

    ckpt_engine = CheckpointEngine(getattr(engine, "_config", None), **options)
    engine.checkpoint_engine = ckpt_engine
    return ckpt_engine


def __getattr__(name: str) -> Any:
    """Import the engine module (and DeepSpeed) when one of its names is first used."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".engine", __name__), name)
    globals()[name] = value
    return value
