"""A handed-over snapshot as the tree a save takes, and its save (the persister's heavy half).

The agent imports this, and torch with it, only once a trainer hands over a pool: an agent that
only supervises starts in a fraction of the time, beside trainers that import torch themselves.
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from typing import Any

import torch

from .. import measure
from ..coord import Coordinator
from ..failpoints import failpoint
from ..format.dtypes import SIZES
from ..format.layout import split_path
from ..options import SaveOptions
from ..report import info_to_json
from ..saver import FailedState, save_state
from ..tree import Flat, TensorRef
from ..views import View
from .protocol import HandoffError

MAX_TENSORS = 10_000_000
_REF_FIELDS = ("key", "dtype", "kind", "device")


def parse(m: mmap.mmap, msg: dict) -> tuple[Flat, str, dict]:
    """The save a ``save`` message asks for, over the pool ``m`` it names: its tree, its absolute
    path and its options. Raises ``HandoffError`` for a message that cannot be saved as it is."""
    path, options, tensors = msg.get("path"), msg.get("options"), msg.get("tensors")
    if not isinstance(path, str) or not os.path.isabs(path):
        raise HandoffError("'path' must be an absolute path")
    if not isinstance(options, dict) or not isinstance(tensors, list):
        raise HandoffError("'options' must be an object and 'tensors' a list")
    if len(tensors) > MAX_TENSORS:
        raise HandoffError(f"more than {MAX_TENSORS} tensors")
    base = _bytes(m)
    refs = [_ref(t, m, base) for t in tensors]
    return Flat(msg.get("tree"), refs, bool(msg.get("pickle"))), path, options


def save(
    flat: Flat, path: str, options: dict, coord: Coordinator, sign_key: str | None, timeout: float
) -> dict[str, Any]:
    """Save ``flat`` at ``path`` with the other agents; the reply for the trainer. Options that
    do not parse still take part in the save as a failure, so every rank reports it."""
    state: Flat | FailedState = flat
    try:
        try:
            failpoint("handoff.accepted")
            store, name = split_path(path)
            if sign_key is not None and options.get("sign_key") is None:
                options = {**options, "sign_key": sign_key}
            opts = SaveOptions.from_kwargs(options)
        except Exception as e:
            store, name = os.path.split(path)
            opts = SaveOptions(timeout=timeout)
            state = FailedState(e)
        with measure.clocked(measure.Clock("handoff")):  # the trainer's stall: unknown
            info = save_state(state, store, name, coord, opts)
        return {"ok": True, "info": info_to_json(info)}
    except BaseException as e:  # the trainer gets the error, as in-process
        return {"ok": False, "type": type(e).__name__, "error": str(e)}
    finally:
        del flat, state


def _bytes(m: mmap.mmap) -> torch.Tensor:
    """The pool as a uint8 tensor (read-only memory: torch warns, and we only read it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.frombuffer(memoryview(m), dtype=torch.uint8)


def _ref(t: Any, m: mmap.mmap, base: torch.Tensor) -> TensorRef:
    if not isinstance(t, dict):
        raise HandoffError("each tensor is an object")
    try:
        off, n = int(t["offset"]), int(t["nbytes"])
        fields = {f: str(t[f]) for f in _REF_FIELDS}
        shape = tuple(int(x) for x in t["shape"])
        global_shape = tuple(int(x) for x in t["global_shape"])
        offsets = tuple(int(x) for x in t["offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise HandoffError(f"tensor description: {e}") from None
    key = fields["key"]
    if fields["dtype"] not in SIZES or any(d < 0 for d in shape):
        raise HandoffError(f"tensor {key!r}: bad dtype or shape")
    view = _view(t.get("view"), key, len(shape))
    if view is not None and n == 0:  # its storage, another tensor of the save, holds its bytes
        grad, param = bool(t.get("requires_grad")), bool(t.get("parameter"))
        kind, device = fields["kind"], fields["device"]
        return TensorRef(key, fields["dtype"], shape, kind, device, grad, param, None, view=view)
    if n != math.prod(shape) * SIZES[fields["dtype"]]:
        raise HandoffError(f"tensor {key!r}: {n} bytes do not hold shape {list(shape)}")
    if off < 0 or off + n > len(m):
        raise HandoffError(f"tensor {key!r}: bytes {off}+{n} outside the pool")
    value = base[off : off + n]
    return TensorRef(
        fields["key"],
        fields["dtype"],
        shape,
        fields["kind"],
        fields["device"],
        bool(t.get("requires_grad")),
        bool(t.get("parameter")),
        value,
        global_shape,
        offsets,
        bool(t.get("sharded")),
        per_rank=bool(t.get("per_rank")),
    )


def _view(doc: Any, key: str, ndim: int) -> View | None:
    """A handed-over tensor's ``view`` (a storage key, an element offset and strides)."""
    if doc is None:
        return None
    try:
        view = View(str(doc["storage"]), int(doc["offset"]), tuple(int(s) for s in doc["stride"]))
    except (KeyError, TypeError, ValueError) as e:
        raise HandoffError(f"tensor {key!r}: view: {e}") from None
    if view.offset < 0 or len(view.stride) != ndim or any(s < 0 for s in view.stride):
        raise HandoffError(f"tensor {key!r}: bad view")
    return view
