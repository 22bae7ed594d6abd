"""Lightning through ckptguard: ``Trainer(plugins=[ckptguard.lightning.CheckpointIO()])``.

Every checkpoint Lightning writes (``ModelCheckpoint``'s top-k and ``last.ckpt``,
``trainer.save_checkpoint``) is a one-file ckptguard checkpoint at the path Lightning chose:
whole and verified, or the previous file is still there. ``trainer.fit(ckpt_path=...)``, ``"last"``
included, reads it back verified. ``load_from_checkpoint(cls, path)`` is
``cls.load_from_checkpoint`` for such a file (docs/integrations.md).

The names load on first use (PEP 562): ``import ckptguard.lightning`` imports no Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .plugin import CheckpointIO, load_from_checkpoint

__all__ = ["CheckpointIO", "load_from_checkpoint"]


def __getattr__(name: str) -> Any:
    """Import Lightning, and the module that needs it, on first use of a name."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".plugin", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
