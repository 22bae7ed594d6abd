"""Ranks as threads of one process, for tests that need a multi-rank save without MPI."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ckptguard.coord.base import Coordinator


class ThreadGroup:
    """What the threads of one simulated job share: a barrier and one slot per rank."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n)
        self.slots: list[Any] = [None] * n


class ThreadCoordinator(Coordinator):
    """Rank ``rank`` of ``group`` (each collective is two barriers)."""

    name = "threads"

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.g, self.rank, self.size = group, rank, group.n

    def broadcast(self, data: bytes | None, timeout: float) -> bytes:
        if self.rank == 0:
            self.g.slots[0] = data
        self.g.barrier.wait(timeout)
        out = self.g.slots[0]
        self.g.barrier.wait(timeout)
        return out

    def gather(self, data: bytes, timeout: float) -> list[bytes] | None:
        self.g.slots[self.rank] = data
        self.g.barrier.wait(timeout)
        out = list(self.g.slots) if self.rank == 0 else None
        self.g.barrier.wait(timeout)
        return out


def run_ranks(n: int, rank_main: Callable[[ThreadCoordinator], None]) -> None:
    """Run ``rank_main(coordinator)`` for ranks 0..n-1 on threads; re-raise the first error."""
    group = ThreadGroup(n)
    errors: list[BaseException] = []

    def one(r: int) -> None:
        try:
            rank_main(ThreadCoordinator(group, r))
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
