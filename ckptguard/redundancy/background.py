"""Protection in the background: ``protect_async`` for one checkpoint, ``protect_saves`` for
every checkpoint a job commits into its node-local store, while the job trains on.

A protection runs on one thread per process, over a private duplicate of the job's
communicator made on the caller's thread. Protections queue on that thread in the order they
were asked for, the same on every rank, so their collectives never cross; the job's own
collectives run on its own communicator beside them (MPI_THREAD_MULTIPLE).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

from ..errors import CheckpointError, CheckpointWarning, RedundancyError
from ..format.manifest import CheckpointInfo
from ..hooks import add_commit_hook, remove_commit_hook
from . import exchange, parity
from .protect import TIMEOUT, Job, Protection, protect_on
from .sets import DEFAULT_SET_SIZE

_worker: ThreadPoolExecutor | None = None
_worker_lock = threading.Lock()


def _background() -> ThreadPoolExecutor:
    """The process's one protection thread (concurrent.futures joins it before MPI finalizes)."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = ThreadPoolExecutor(1, thread_name_prefix="ckptguard-protect")
        return _worker


def _need_thread_multiple() -> None:
    from mpi4py import MPI

    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise RedundancyError(
            "protection in the background needs MPI initialized with MPI_THREAD_MULTIPLE "
            "(mpi4py's default, changed here by mpi4py.rc.thread_level or "
            "MPI4PY_RC_THREAD_LEVEL): call protect instead, or let mpi4py initialize MPI"
        )


def protect_async(
    checkpoint: str,
    comm: Any,
    *,
    node: str,
    scheme: str = "xor",
    domains: Mapping[str, str] | None = None,
    set_size: int = DEFAULT_SET_SIZE,
    timeout: float = TIMEOUT,
    rate: float | None = None,
    block: int = parity.BLOCK,
) -> Future[Protection]:
    """``protect`` in the background: every rank calls it, in the same order as its other calls
    on ``comm``; returns at once with the future of the ``Protection`` (or of the
    RedundancyError ``protect`` raises). A process that ends waits for its protections first,
    so a job that saves and exits still leaves its checkpoint protected, or says why not."""
    _need_thread_multiple()
    where = os.path.abspath(checkpoint)  # as the caller meant it, whatever its later chdir
    job = Job(where, node, scheme, domains, set_size, rate, block)
    world = exchange.SetComm.duplicate(comm, timeout)
    return _background().submit(protect_on, world, job)


def protect_saves(
    store: str | os.PathLike[str], comm: Any, *, node: str, **options: Any
) -> ProtectedSaves:
    """Protect, in the background, every checkpoint this job commits into ``store`` (this
    node's node-local store) from now on, with ``protect_async``'s options; every rank calls
    it with the same options. A failed protection is a ``CheckpointWarning`` when it ends (the
    checkpoint stays committed, local only) and the error of ``wait``::

        with protect_saves("/local/ckpts", MPI.COMM_WORLD, node=host, rate=500e6):
            for step in ...:
                ckptguard.save(state, f"/local/ckpts/step-{step}", node_local=host)
        # leaving waits for every protection

    The job's saves into ``store`` must be collective over ``comm``'s ranks, as node-local
    saves are, and commit one at a time. The protections run on a private duplicate of
    ``comm``, made here (a collective).
    """
    return ProtectedSaves(store, comm, node, options)


class ProtectedSaves:
    """The saves into a store that ``protect_saves`` protects, and their protections."""

    def __init__(
        self, store: str | os.PathLike[str], comm: Any, node: str, options: dict[str, Any]
    ) -> None:
        _need_thread_multiple()
        unknown = set(options) - {"scheme", "domains", "set_size", "timeout", "rate", "block"}
        if unknown:
            raise TypeError(f"protect_saves got unknown options: {', '.join(sorted(unknown))}")
        self.store = os.path.realpath(store)
        self.node, self.options = node, options
        # A communicator of its own: a save's commit hooks may run on the thread of an async
        # save while the job's collectives go on on ``comm``.
        self._own = exchange.SetComm.duplicate(comm, options.get("timeout", TIMEOUT))
        self._pending: list[Future[Protection]] = []
        self._lock, self._asking = threading.Lock(), threading.Lock()
        add_commit_hook(self._committed)

    def _committed(self, info: CheckpointInfo) -> None:
        if os.path.realpath(os.path.dirname(info.path)) != self.store:
            return
        with self._asking:
            fut = protect_async(info.path, self._own.comm, node=self.node, **self.options)
        fut.add_done_callback(_warn_on_failure)
        with self._lock:
            self._pending.append(fut)

    def wait(self, timeout: float | None = None) -> list[Protection]:
        """Wait for every protection asked so far (each within ``timeout`` s); their
        Protections in order, or the first one's error once all have ended."""
        with self._lock:
            pending, self._pending = self._pending, []
        done, first = [], None
        for fut in pending:
            try:
                done.append(fut.result(timeout))
            except CheckpointError as e:
                first = first or e
        if first is not None:
            raise first
        return done

    def close(self) -> list[Protection]:
        """Protect no further saves; ``wait`` for those asked."""
        remove_commit_hook(self._committed)
        try:
            return self.wait()
        finally:
            self._own.close()

    def __enter__(self) -> ProtectedSaves:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
            return
        with contextlib.suppress(CheckpointError):  # the job failed: its protections end first
            self.close()


def _warn_on_failure(fut: Future[Protection]) -> None:
    e = fut.exception()
    if e is not None:
        warnings.warn(f"a background protection failed: {e}", CheckpointWarning, stacklevel=1)
