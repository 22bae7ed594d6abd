"""The agents' protection of node-local checkpoints (``ckptguard run --protect SCHEME``).

Once the agents' vote (``votes``) finds that every rank has reported a commit and holds a
node-local part of it, every agent asks ``redundancy.background.protect_async`` for it in the
same tick, on the agents' communicator: the protections run one after another on a thread of
each agent, in the order of the saves, while the trainers train on. A checkpoint saved whole
(to a shared store, or on one node) is left alone. An agent waits for its protections before it
exits; each outcome is logged, and a failed protection leaves its checkpoint committed, local
only (docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NamedTuple

from ..errors import CheckpointError


class ProtectOptions(NamedTuple):
    """What ``ckptguard run --protect`` was asked to do (``protect_async``'s options)."""

    scheme: str
    set_size: int | None = None  # None: protect's default
    rate: float | None = None  # bytes a second per node; None: no cap


class Protector:
    """One agent's side of ``--protect``."""

    def __init__(
        self,
        comm: Any,
        rank: int,
        options: ProtectOptions,
        node: str,
        log: Callable[[str], None],
    ) -> None:
        self.comm, self.rank, self.options, self.node, self.log = comm, rank, options, node, log
        self.pending: list[tuple[str, Future]] = []

    def protect(self, path: str) -> None:
        """Protect the node-local checkpoint ``path`` in the background (every agent calls
        this for the same commit in the same tick)."""
        from ..redundancy.background import protect_async

        opts = self.options
        extra: dict[str, Any] = {} if opts.set_size is None else {"set_size": opts.set_size}
        try:
            future = protect_async(
                path, self.comm, node=self.node, scheme=opts.scheme, rate=opts.rate, **extra
            )
        except CheckpointError as e:  # refused alike on every rank
            if self.rank == 0:
                self.log(f"{path}: not protected: {e}")
            return
        self.pending.append((path, future))

    def close(self) -> None:
        """Wait for every protection asked for; rank 0 logs how each ended (the same on every
        rank: the nodes agree on each outcome)."""
        for _, future in self.pending:
            future.exception()  # waits
            self._ended(future)
        self.pending.clear()

    def reap(self) -> None:
        """Log the protections that have ended (called on every tick)."""
        while self.pending and self.pending[0][1].done():
            self._ended(self.pending.pop(0)[1])

    def _ended(self, future: Future) -> None:
        if self.rank != 0:
            return
        e = future.exception()
        if e is None:
            p = future.result()
            self.log(f"{p.name} protected ({p.scheme}, {p.seconds:.1f} s)")
        else:  # the checkpoint stays committed, local only
            self.log(f"{type(e).__name__}: {e}")
