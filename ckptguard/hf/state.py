"""What the Hugging Face integration keeps in a checkpoint besides tensors, and its store.

The parts of a Trainer checkpoint that need no transformers import: the names of checkpoints
in the store (``step-<global step>``), the random number generators of this process, and the
rotation of old checkpoints through ``Store.delete`` (LATEST moves first, each delete atomic).
"""

from __future__ import annotations

import os
import random
import re
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, brief, warn_after_commit
from ..format.layout import LATEST, MANIFEST
from ..shard import PerRank
from ..store import Store

__all__ = [
    "PREFIX",
    "checkpoint_name",
    "checkpoint_source",
    "is_checkpoint",
    "keep_only",
    "rng_state",
    "rotate",
    "set_rng_state",
]

PREFIX = "step-"
"""A checkpoint of global step N is ``<output_dir>/step-N``: a name Hugging Face's own
``checkpoint-*`` globbing (its rotation and clean-up, which delete with ``rmtree``) never sees."""
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step}"


def is_checkpoint(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a committed ckptguard checkpoint directory."""
    return path is not None and os.path.isfile(os.path.join(path, MANIFEST))


def checkpoint_source(resume: Any, output_dir: str) -> str | None:
    """The ckptguard checkpoint that ``train(resume_from_checkpoint=resume)`` means, or None
    where it means none or one of Hugging Face's own (which its loader reads).

    ``True``: the LATEST of the store ``output_dir``. A path: that checkpoint, or the LATEST of
    the store it is."""
    if resume is None or resume is False:
        return None
    where = output_dir if resume is True else os.fspath(resume)
    if is_checkpoint(where):
        return os.path.abspath(where)
    if not os.path.lexists(os.path.join(where, LATEST)):
        return None
    name = Store(where).latest_name()
    return None if name is None else os.path.join(os.path.abspath(where), name)


def rng_state(distributed: bool) -> dict[str, Any]:
    """This process's generators, as the Trainer's ``rng_state.pth`` holds them; each tensor a
    ``PerRank`` (each rank of a job restores its own)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": PerRank(key), "pos": pos, "gauss": [has_gauss, gauss]},
        "cpu": PerRank(torch.random.get_rng_state()),
    }
    if torch.cuda.is_available():
        if distributed:
            state["cuda"] = [PerRank(s) for s in torch.cuda.random.get_rng_state_all()]
        else:
            state["cuda"] = PerRank(torch.cuda.random.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any], distributed: bool) -> None:
    """Restore what ``rng_state`` took (CUDA's where it was saved and is available)."""
    random.setstate(_python_state(state["python"]))
    n = state["numpy"]
    has_gauss, gauss = n["gauss"]
    np.random.set_state((n["kind"], np.asarray(n["key"]), int(n["pos"]), has_gauss, gauss))
    torch.random.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and "cuda" in state:
        if distributed:
            torch.cuda.random.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.random.set_rng_state(state["cuda"])


def _python_state(value: Any) -> tuple:
    """``random.setstate`` wants tuples where a stored tree may give lists."""
    version, internal, gauss = value
    return (version, tuple(internal), gauss)


def _steps(store: Store) -> list[str]:
    """The store's ``step-N`` checkpoints, oldest commit first."""
    return [i.name for i in store.list() if _NAME.match(i.name)]


def rotate(output_dir: str, limit: int | None, best: str | None) -> None:
    """Keep at most ``limit`` checkpoints of the store ``output_dir``, as Hugging Face's
    ``save_total_limit`` does: the most recently committed and ``best`` are always kept, the
    oldest others deleted first. A delete that fails is a ``CheckpointWarning``: training goes
    on, and the next save tries again."""
    if limit is None or limit <= 0:
        return
    store = Store(output_dir)
    names = _steps(store)
    if len(names) <= limit:
        return
    protected = {names[-1]} | _own(store, best)
    remaining = len(names)
    for name in names:
        if remaining <= max(limit, len(protected)):
            break
        if name not in protected:
            _delete(store, name)
            remaining -= 1


def keep_only(output_dir: str, best: str) -> None:
    """Delete every checkpoint but ``best`` (``save_total_limit=1`` at the end of training, as
    Hugging Face does once the best model is loaded)."""
    store = Store(output_dir)
    mine = _own(store, best)
    if not mine:
        return
    for name in _steps(store):
        if name not in mine:
            _delete(store, name)


def _own(store: Store, path: str | None) -> set[str]:
    """``{name}`` if ``path`` is a checkpoint of ``store``, else the empty set."""
    if path is None:
        return set()
    parent, name = os.path.split(os.path.abspath(path))
    return {name} if parent == store.root else set()


def _delete(store: Store, name: str) -> None:
    try:
        store.delete(name, prune=True)
    except (CheckpointError, OSError) as e:
        warn_after_commit(f"save_total_limit: could not delete {store.path(name)} ({brief(e)})")
