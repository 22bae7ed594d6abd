"""PyTorch DCP (``torch.distributed.checkpoint``) with ckptguard checkpoints underneath.

    dcp.save(state_dict, storage_writer=ckptguard.dcp.Writer("/ckpt/store/step-100"))
    dcp.load(state_dict, storage_reader=ckptguard.dcp.Reader("/ckpt/store"))  # its LATEST

``Writer`` (``writer``) saves what DCP plans as a ckptguard checkpoint: one atomic commit once
every rank has written, every chunk hashed and compressed, non-tensor values without pickle
where they have a plain form. ``Reader`` (``reader``) loads one at any world size, DCP's
metadata rebuilt from the checkpoint, every chunk read checked. ``Pickled`` (``values``): a
value DCP's planner pickled, kept as its bytes (registered here, so that ``ckptguard.load``
gives it back once ``ckptguard.dcp`` is imported). ``failure_cause(e)``: the error a rank raised
inside DCP's ``CheckpointException`` (e.g. ``CheckpointExistsError``). The writer and reader
are loaded on first use, and with them ``torch.distributed.checkpoint``; ``import
ckptguard.dcp`` alone imports neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .values import Pickled

if TYPE_CHECKING:
    from ..foreign.dcp import failure_cause
    from .reader import Reader
    from .writer import Writer

_LAZY = {"Writer": ".writer", "Reader": ".reader", "failure_cause": "..foreign.dcp"}

__all__ = ["Pickled", "Reader", "Writer", "failure_cause"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptguard.dcp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
