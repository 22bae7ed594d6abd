"""Commit hooks: functions called on every rank after a save has committed.

The save path calls ``run_commit_hooks`` once the outcome is known to be a commit; it knows
nothing of who listens. The ``ckptguard run`` client registers one (to tell its agent of the
commit) when it is imported. A hook's failure is a ``CheckpointWarning``: the checkpoint is
committed and stays so, whatever a hook does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .errors import warn_after_commit
from .format.manifest import CheckpointInfo

CommitHook = Callable[[CheckpointInfo], object]

_hooks: list[CommitHook] = []
_lock = threading.Lock()


def add_commit_hook(fn: CommitHook) -> None:
    """Call ``fn(info)`` after each save that commits (once per function, however often added)."""
    with _lock:
        if fn not in _hooks:
            _hooks.append(fn)


def remove_commit_hook(fn: CommitHook) -> None:
    """Stop calling ``fn``; a function never added is ignored."""
    with _lock:
        if fn in _hooks:
            _hooks.remove(fn)


def registered() -> list[CommitHook]:
    """The hooks, in the order they run."""
    with _lock:
        return list(_hooks)


def run_commit_hooks(info: CheckpointInfo) -> None:
    """Call every hook with the committed checkpoint's ``info``, in the order they were added.

    A hook that raises is reported as a ``CheckpointWarning`` naming it; the others still run
    and the commit stands.
    """
    with _lock:
        hooks = list(_hooks)
    for fn in hooks:
        try:
            fn(info)
        except Exception as e:
            name = getattr(fn, "__qualname__", repr(fn))
            warn_after_commit(
                f"{info.path} is committed, but the commit hook {name} failed: "
                f"{type(e).__name__}: {e}",
                stacklevel=2,
            )
