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
        assert out is not None, "rank 0 broadcast nothing"
        return out

    def gather(self, data: bytes, timeout: float) -> list[bytes] | None:
        self.g.slots[self.rank] = data
        self.g.barrier.wait(timeout)
        out = list(self.g.slots) if self.rank == 0 else None
        self.g.barrier.wait(timeout)
        return out


def rank_results(
    n: int, rank_main: Callable[[ThreadCoordinator], Any], abort_on_error: bool = False
) -> list[Any]:
    """Run ``rank_main(coordinator)`` for ranks 0..n-1 on threads; each rank's return value, or
    the exception it raised. ``abort_on_error`` breaks the barrier when a rank raises, so the
    others fail at their next collective instead of waiting out its timeout."""
    group = ThreadGroup(n)
    results: list[Any] = [None] * n

    def one(r: int) -> None:
        try:
            results[r] = rank_main(ThreadCoordinator(group, r))
        except BaseException as e:  # handed to the caller
            results[r] = e
            if abort_on_error:
                group.barrier.abort()

    threads = [threading.Thread(target=one, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a rank did not finish in 120 s"
    return results


def run_ranks(
    n: int, rank_main: Callable[[ThreadCoordinator], None], abort_on_error: bool = False
) -> None:
    """``rank_results``, re-raising the first rank's error that is not a broken barrier."""
    errors = [r for r in rank_results(n, rank_main, abort_on_error) if isinstance(r, BaseException)]
    root = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if errors:
        raise (root or errors)[0]
