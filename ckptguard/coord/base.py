"""The Coordinator interface and the one-process backend."""

from __future__ import annotations

import time
from collections.abc import Callable


class Coordinator:
    """Rank, size, and two collectives on bytes. Every call takes a deadline in seconds."""

    rank: int = 0
    size: int = 1
    name: str = "local"

    def broadcast(self, data: bytes | None, timeout: float) -> bytes:
        """Rank 0's ``data`` on every rank."""
        raise NotImplementedError

    def gather(self, data: bytes, timeout: float) -> list[bytes] | None:
        """Every rank's ``data``, in rank order, on rank 0 (None elsewhere)."""
        raise NotImplementedError


class LocalCoordinator(Coordinator):
    """A single process: collectives are identities."""

    def broadcast(self, data: bytes | None, timeout: float) -> bytes:
        assert data is not None
        return data

    def gather(self, data: bytes, timeout: float) -> list[bytes] | None:
        return [data]


def poll(test: Callable[[], bool], timeout: float, what: str) -> None:
    """Spin on ``test`` with a growing sleep until it is true or the deadline passes."""
    from ..errors import CoordinationTimeoutError

    deadline = time.monotonic() + timeout
    pause = 0.0002
    while not test():
        if time.monotonic() > deadline:
            raise CoordinationTimeoutError(
                f"timed out after {timeout:g} s waiting for all ranks at {what}: a rank died, "
                "stalled or took another path"
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.002)
