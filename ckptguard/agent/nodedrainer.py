"""The agents' drain of node-local checkpoints (``ckptguard run --drain-to`` when the trainers
save node-local).

No agent holds a node-local checkpoint whole, so every agent takes part: when the agents' vote
(``votes``) makes such a commit due, each agent asks ``nodedrain.drain_nodes_async`` for it in
the same tick, on the agents' communicator, and its node's files go to the shared store from a
thread of the agent while the trainers train on. One drain at a time: while one is still
running on any agent, the next due waits, and a newer one replaces it (a backlog never grows,
as with rank 0's drain of whole checkpoints). When the job ends, the agents wait for the drain
running and then drain the one still due.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class NodeDrainer:
    """One agent's side of the drain of node-local checkpoints into ``dst``."""

    def __init__(
        self, comm: Any, rank: int, node: str, dst: str, jobs: int, log: Callable[[str], None]
    ) -> None:
        self.comm, self.rank, self.node, self.dst, self.jobs = comm, rank, node, dst, jobs
        self.log = log
        self.due: str | None = None  # the newest checkpoint due, not started
        self.running: tuple[str, float, Future] | None = None

    def busy(self) -> int:
        """This agent's vote: 1 while its drain is running."""
        return int(self.running is not None and not self.running[2].done())

    def start(self, busy_anywhere: bool) -> None:
        """Start the due drain if no agent's drain is running (the same on every agent: the
        votes and what is due are)."""
        self.reap()
        if self.due is None or busy_anywhere:
            return
        from ..errors import CheckpointError
        from ..nodedrain import drain_nodes_async

        path, self.due = self.due, None
        try:
            future = drain_nodes_async(path, self.dst, self.comm, node=self.node, jobs=self.jobs)
        except CheckpointError as e:  # refused alike on every rank
            self._log(f"{path} not drained: {e}")
            return
        self.running = (path, time.monotonic(), future)

    def reap(self) -> None:
        """Log the drain that has ended (rank 0: every agent has the same outcome)."""
        if self.running is None or not self.running[2].done():
            return
        path, t0, future = self.running
        self.running = None
        e = future.exception()
        if e is None:
            info = future.result()
            self._log(f"drained {path} to {info.path} in {time.monotonic() - t0:.1f} s")
        else:  # the job goes on; the next due checkpoint is tried
            self._log(f"drain of {path} to {self.dst} failed: {type(e).__name__}: {e}")

    def close(self, finish: bool) -> None:
        """Wait for the drain running; with ``finish`` (every agent ended its loop alike),
        then drain the one still due and wait for it."""
        if self.running is not None:
            self.running[2].exception()  # waits
            self.reap()
        if finish and self.due is not None:
            self.start(busy_anywhere=False)
            if self.running is not None:
                self.running[2].exception()
                self.reap()

    def _log(self, message: str) -> None:
        if self.rank == 0:
            self.log(message)
