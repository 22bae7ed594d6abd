"""The agent's side of the snapshot handoff: map the trainer's pools, persist what it hands over.

A trainer under ``ckptguard run`` captures into memory it shares with its agent (a memfd it
passes over the control socket) and hands over a description of the snapshot (docs/agent.md,
"save"). The agent saves it with the other agents, on its own thread and communicator, in the
order received, so a snapshot handed over is committed even if the trainer dies right after.
The save itself (``handover``, with torch) is imported once a trainer hands over its first pool.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..failpoints import failpoint, set_rank
from .protocol import HandoffError

if TYPE_CHECKING:
    from ..coord import Coordinator
    from ..tree import Flat

__all__ = ["DEFAULT_TIMEOUT", "HandoffError", "Persister"]

DEFAULT_TIMEOUT = 600.0
_WARM = "warm"  # a job that only imports the save's machinery, ahead of the first save


class Persister:
    """Saves handed-over snapshots in order on one thread; ``busy`` while any is pending.

    ``done(token, reply)`` is called on the worker thread with the reply for each save (a dict:
    ``ok`` and ``info``, or ``type`` and ``error``). ``sign_key`` (``ckptguard run
    --sign-key``) signs every save whose options name no key of their own.
    """

    def __init__(
        self, coord: Coordinator, done: Callable[[Any, dict], None], sign_key: str | None = None
    ) -> None:
        self.coord = coord
        self.done = done
        self.sign_key = sign_key
        set_rank(coord.rank)  # for failpoints reached before the first save
        self.pools: dict[tuple[int, int], mmap.mmap] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._warmed = False
        self._pending = 0
        self.finished = 0  # saves done (committed or failed), in order
        self._running: tuple[int, float, float] | None = None  # (number, timeout, start)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="ckptguard-agent-persist")
        self._thread.daemon = True
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._pending > 0

    def running(self) -> tuple[int, float, float] | None:
        """The save in progress: its number (1, 2, ... on every rank), timeout and monotonic
        start; None when idle."""
        with self._lock:
            return self._running

    def add_pool(self, client: int, pool: int, fd: int, nbytes: int) -> None:
        """Map the trainer's pool ``pool`` (a memfd of ``nbytes`` bytes); the fd is closed."""
        try:
            if os.fstat(fd).st_size < nbytes or nbytes <= 0:
                raise HandoffError(f"pool {pool}: the shared memory is smaller than {nbytes} bytes")
            self.pools[(client, pool)] = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
            if not self._warmed:  # a trainer that hands over pools will save soon
                self._warmed = True
                self._jobs.put(_WARM)
        finally:
            os.close(fd)

    def forget(self, client: int) -> None:
        """The client went away: drop its pools (saves already queued keep their mapping)."""
        for key in [k for k in self.pools if k[0] == client]:
            del self.pools[key]

    def submit(self, client: int, token: Any, msg: dict) -> None:
        """Queue a save; raises ``HandoffError`` (nothing queued) if the message is unusable."""
        flat, path, options = self._parse(client, msg)
        with self._lock:
            self._pending += 1
        self._jobs.put((token, flat, path, options))

    def close(self) -> None:
        """Finish the saves queued and stop the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _parse(self, client: int, msg: dict) -> tuple[Flat, str, dict]:
        m = self.pools.get((client, msg.get("pool")))  # type: ignore[arg-type]
        if m is None:
            raise HandoffError(f"unknown pool {msg.get('pool')!r}")
        try:
            from . import handover
        except ImportError as e:  # torch or the save path cannot load here: the trainer is told
            raise HandoffError(f"this agent cannot save a handed-over snapshot: {e}") from None
        return handover.parse(m, msg)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job == _WARM:
                with contextlib.suppress(ImportError):  # the first save's parse reports it
                    from . import handover  # noqa: F401 - imported ahead of the first save
                continue
            token, flat, path, options = job
            timeout = _timeout(options)
            with self._lock:
                self._running = (self.finished + 1, timeout, time.monotonic())
            from . import handover

            reply = handover.save(flat, path, options, self.coord, self.sign_key, timeout)
            del job, flat  # the pool's memory is the trainer's again once no view holds it
            try:
                failpoint("handoff.before_reply")
            except Exception as e:  # the save's outcome stands; a failure here is reported with it
                if reply["ok"]:
                    reply["info"]["warnings"].append(f"after the commit: {type(e).__name__}: {e}")
            with self._lock:
                self._pending -= 1
                self.finished += 1
                self._running = None
            self.done(token, reply)


def _timeout(options: dict) -> float:
    """The save's timeout as the trainer passed it, when it is one (else the default)."""
    t = options.get("timeout")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < math.inf:
        return float(t)
    return DEFAULT_TIMEOUT
