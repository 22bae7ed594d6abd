"""Background drain of whole checkpoints to durable storage (``run --drain-to``).

The agents' vote (``votes``) makes every K-th commit due. Rank 0's agent drains one that is
whole (the stores are shared file systems: one copy is enough; the agents drain a node-local
one together, ``nodedrainer``), one drain at a time with ``jobs`` copy threads (the cap on
concurrent writers, like SCR's flush width). When a drain is still running as the next one
comes due, only the newest waits: a backlog never grows.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from ..drain import drain
from ..objstore.url import is_url


class Drainer:
    """Drains the checkpoints made due to store ``dst`` (a directory, or ``s3://bucket/prefix``)
    in a background thread."""

    def __init__(self, dst: str, jobs: int) -> None:
        self.dst = dst if is_url(dst) else os.path.abspath(dst)
        self.jobs = jobs
        self._next: str | None = None
        self._cond = threading.Condition()
        self._stop = False
        self.drained: list[str] = []
        self.failed: list[str] = []
        self._busy = False
        self._thread = threading.Thread(target=self._loop, name="ckptguard-drain", daemon=True)
        self._thread.start()

    def due(self, path: str) -> None:
        """Drain the checkpoint committed at ``path`` (it replaces one due and not started)."""
        with self._cond:
            self._next = path
            self._cond.notify_all()

    def close(self, timeout: float) -> None:
        """Let the drain due or running finish, for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            while (self._busy or self._next) and time.monotonic() < deadline:
                self._cond.wait(min(1.0, max(deadline - time.monotonic(), 0.01)))
            if self._busy or self._next:
                _log(f"drain still running after {timeout:.0f} s; left for the next run")

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._next is None and not self._stop:
                    self._cond.wait()
                if self._next is None:
                    return
                path, self._next, self._busy = self._next, None, True
            try:
                t0 = time.monotonic()
                drain(os.path.dirname(path), self.dst, [os.path.basename(path)], self.jobs)
                self.drained.append(path)
                _log(f"drained {path} to {self.dst} in {time.monotonic() - t0:.1f} s")
            except Exception as e:  # the job goes on; the next due checkpoint is tried
                self.failed.append(path)
                _log(f"drain of {path} to {self.dst} failed: {type(e).__name__}: {e}")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


def _log(message: str) -> None:
    print(f"ckptguard run [rank 0]: {message}", file=sys.stderr, flush=True)
