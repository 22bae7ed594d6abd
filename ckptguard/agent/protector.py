"""The agents' protection of node-local checkpoints (``ckptguard run --protect SCHEME``).

Every trainer reports its commits to its own agent. On each tick the agents vote on the next
commit in order: whether every rank has reported it, and whether each rank's directory of it
is a node-local part (it lacks data files of ranks on other nodes) or a whole checkpoint (a
shared store). Once every rank has reported it and every rank holds a part, every agent asks
``redundancy.background.protect_async`` for it in the same tick, on the agents' communicator:
the protections run one after another on a thread of each agent, in the order of the saves,
while the trainers train on. A checkpoint saved whole (to a shared store, or on one node) is
left alone. An agent waits for its protections before it exits; each outcome is logged, and a
failed protection leaves its checkpoint committed, local only (docs/operations.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple

from ..errors import CheckpointError
from ..fsutil import read_manifest

# The slots the protector adds to the agents' MAX-reduced vector, from its first slot on:
# the next commit is missing here, a node-local part here, whole here; commits here undecided.
MISSING, PART, WHOLE, UNDECIDED = range(4)
SLOTS = 4


class ProtectOptions(NamedTuple):
    """What ``ckptguard run --protect`` was asked to do (``protect_async``'s options)."""

    scheme: str
    node: str | None = None  # None: CKPTGUARD_NODE or the host name, as a node-local save's
    set_size: int | None = None  # None: protect's default
    rate: float | None = None  # bytes a second per node; None: no cap


def is_part(checkpoint: str) -> bool:
    """Whether ``checkpoint`` is a node-local part: its manifest lists a data file it lacks."""
    _, body = read_manifest(checkpoint)
    return any(not os.path.lexists(os.path.join(checkpoint, f["name"])) for f in body["files"])


class Protector:
    """One agent's side of ``--protect``; ``vote`` and ``decide`` are called on every tick."""

    def __init__(
        self, comm: Any, rank: int, options: ProtectOptions, log: Callable[[str], None]
    ) -> None:
        from ..localcommit import node_name

        self.comm, self.rank, self.options, self.log = comm, rank, options, log
        self.node = node_name(options.node if options.node is not None else True)  # ValueError
        self.next = 0  # the index of the next commit to decide on, the same on every agent
        self._looked: tuple[int, int] | None = None  # (index, PART or WHOLE) of a commit seen
        self.pending: list[tuple[str, Future]] = []

    def vote(self, paths: Sequence[str]) -> list[int]:
        """This rank's view of the next commit: missing, a node-local part, or whole."""
        vec = [0] * SLOTS
        if len(paths) <= self.next:
            vec[MISSING] = 1
            return vec
        vec[UNDECIDED] = 1  # the agents go on until every commit reported is decided
        if self._looked is None or self._looked[0] != self.next:  # once per commit
            try:
                kind = PART if is_part(paths[self.next]) else WHOLE
            except (CheckpointError, OSError) as e:  # gone or damaged: nothing to protect here
                self.log(f"{paths[self.next]}: cannot read its manifest ({e}); not protected")
                kind = WHOLE
            self._looked = (self.next, kind)
        vec[self._looked[1]] = 1
        return vec

    def decide(self, votes: Sequence[int], paths: Sequence[str], trainers_done: bool) -> None:
        """Act on every agent's votes (the same on every rank): protect the next commit if
        every rank holds a part of it, skip it otherwise. Once every trainer has ended, a
        commit some rank never reported never will be: it is skipped."""
        if votes[MISSING]:
            if trainers_done and votes[UNDECIDED]:
                self.next += 1
                if self.rank == 0:
                    self.log(f"commit {self.next} was not reported by every rank; not protected")
            return
        path = paths[self.next]
        self.next += 1
        if votes[WHOLE]:
            if votes[PART] and self.rank == 0:
                self.log(f"{path}: a node-local part on some ranks only; not protected")
            return
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
