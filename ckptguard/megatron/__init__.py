"""Megatron-Core integration: ``dist_checkpointing`` strategies that save and load sharded
state through ckptguard.

    import ckptguard.megatron
    ckptguard.megatron.register()   # load finds the strategy by the checkpoint's metadata.json
    strategy = ckptguard.megatron.SaveStrategy()
    dist_checkpointing.save(sharded_sd, ckpt_dir, sharded_strategy=strategy)
    state = dist_checkpointing.load(sharded_sd, ckpt_dir)   # any sharding, any number of ranks

``SaveStrategy``, ``LoadStrategy`` and ``register`` import Megatron-Core on first use;
``import ckptguard.megatron`` alone does not. docs/integrations.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .strategy import LoadStrategy, SaveStrategy, register

__all__ = ["LoadStrategy", "SaveStrategy", "register"]


def __getattr__(name: str) -> Any:
    """Import the strategy module (and Megatron-Core) when one of its names is first used."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".strategy", __name__), name)
    globals()[name] = value
    return value
