"""The job's own events, written by rank 0's agent into the store its trainer saves to: when the
job (this incarnation of it) started, when a checkpoint was requested (a preemption), when it
ended and how, and when the trainer took its first training step. With the saves' and loads'
events they give the recovery times (MTTR) from records, not estimates (docs/operations.md).

The store is known from ``ckptguard run --store``, or from the trainer: its first commit, or its
``client.training_step(step, store=...)``. Events wait in memory until it is known; an agent that
ends without ever learning it says so on stderr.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from .. import events
from ..format.layout import is_name


class Timeline:
    """Rank 0's agent's events, each stamped with the wall-clock time it happened."""

    def __init__(self, rank: int, world_size: int, store: str | None) -> None:
        self.rank = rank
        self.store = os.path.abspath(store) if store else None
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._stepped = False
        self.add("start", world_size=world_size, at=time.time())

    def add(self, kind: str, **fields: Any) -> None:
        """Record ``kind`` now, or once the store is known (rank 0 only)."""
        if self.rank != 0:
            return
        fields.setdefault("at", time.time())
        self._pending.append((kind, fields))
        self.flush()

    def learn(self, checkpoint_path: str) -> None:
        """A commit the trainer reported: its store is where the events go, if none was given."""
        if self.store is None:
            parent, name = os.path.split(os.path.normpath(checkpoint_path))
            if is_name(name) and os.path.isdir(parent):
                self.store = parent
                self.flush()

    def first_step(self, step: int | None, store: str | None, at: float) -> None:
        """The trainer's first training step (``client.training_step``), once per incarnation."""
        if self._stepped:
            return
        self._stepped = True
        if self.store is None and store and os.path.isdir(store):
            self.store = os.path.abspath(store)
        self.add("first_step", step=step, at=at)

    def flush(self) -> None:
        if self.store is None or not self._pending:
            return
        pending, self._pending = self._pending, []
        for kind, fields in pending:
            problem = events.record(self.store, kind, rank=0, **fields)
            if problem is not None:
                _log(problem)

    def close(self) -> None:
        """At the agent's end: what could not be written is said, not silently dropped."""
        self.flush()
        if self._pending:
            kinds = ", ".join(k for k, _ in self._pending)
            _log(
                f"events not recorded ({kinds}): no store is known (ckptguard run --store, or "
                "a commit or training_step(store=...) of the trainer)"
            )
            self._pending = []


def _log(message: str) -> None:
    print(f"ckptguard run [rank 0]: {message}", file=sys.stderr, flush=True)


__all__ = ["Timeline"]
