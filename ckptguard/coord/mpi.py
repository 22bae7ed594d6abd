"""MPI backend (mpi4py) on a duplicated communicator, so ckptguard never sees the app's messages.

Duplicating a communicator is itself a collective, so it has a deadline too. A coordinator on
``COMM_WORLD`` (``MPICoordinator()``, ``default()``) starts ``Comm.Idup`` when it is made, on
the calling thread (so the duplication is ordered with the application's own collectives on
``COMM_WORLD`` exactly as a blocking ``Dup`` there would be), and waits for it at its first
collective, within that collective's ``timeout`` (a save's ``timeout``); ``default(timeout)``
waits at once. An MPI library without ``MPI_Comm_idup`` (before MPI-3) gets a blocking ``Dup``
instead, which no deadline bounds.

After a ``CoordinationTimeoutError`` such a coordinator gives up its communicator (and leaves
the cache of ``default()``): the requests still pending on it could otherwise be matched with
the next save's messages. The next save duplicates ``COMM_WORLD`` afresh; every rank that timed
out does the same, so their duplications pair up. The old communicator and its pending requests
are never freed: MPI forbids freeing or cancelling a pending collective request, and freeing
the communicator would not end them. They are kept in ``_abandoned`` until the process ends (a
small leak per timeout), which also keeps their buffers alive for MPI to write into.

A coordinator on a communicator given by the caller (``MPICoordinator(comm)``) duplicates it at
once with a blocking ``Dup``, as a collective of its creator, and keeps its communicator after a
timeout: re-duplicating ``comm`` later, from whichever thread saves, could cross the caller's
own collectives on ``comm``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CoordinationTimeoutError
from .base import Coordinator, poll

_default: MPICoordinator | None = None
# What timed-out collectives left pending (requests, communicators, buffers): kept, never freed.
_abandoned: list = []

_CREATE = "the creation of ckptguard's MPI communicator (Comm.Idup)"


class MPICoordinator(Coordinator):
    name = "mpi"

    def __init__(self, comm=None, *, timeout: float | None = None) -> None:  # noqa: ANN001
        from mpi4py import MPI

        self.MPI = MPI
        self.owned = comm is None  # duplicates COMM_WORLD, afresh after a timeout
        self.parent = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.parent.Get_rank()
        self.size = self.parent.Get_size()
        self.comm = None
        self._idup: Any = None  # (communicator, request) of a duplication not yet complete
        if not self.owned:
            self.comm = self._ready(self.parent.Dup())
        else:
            self._start()
            if timeout is not None:
                self._connect(timeout)

    @classmethod
    def default(cls, timeout: float | None = None) -> MPICoordinator:
        """The coordinator on ``COMM_WORLD``, made on first use (and again after a timeout).

        With ``timeout``, waits that long for the duplication; else the first collective does.
        """
        global _default
        if _default is None:
            _default = cls(timeout=timeout)
        elif timeout is not None:
            _default._connect(timeout)
        return _default

    def _start(self) -> None:
        """Start duplicating COMM_WORLD (a collective: every rank starts it in the same order)."""
        if self.size == 1:  # nothing to wait for
            self.comm = self._ready(self.parent.Dup())
            return
        try:
            self._idup = self.parent.Idup()
        except (NotImplementedError, AttributeError):  # no MPI_Comm_idup: no deadline here
            self.comm = self._ready(self.parent.Dup())

    def _ready(self, comm):  # noqa: ANN001, ANN202
        comm.Set_errhandler(self.MPI.ERRORS_RETURN)
        return comm

    def _connect(self, timeout: float):  # noqa: ANN202 - an mpi4py communicator
        """Our communicator, waiting up to ``timeout`` s for its duplication to complete."""
        if self.comm is None:
            if self._idup is None:  # it was given up at a timeout: duplicate afresh
                self._start()
            if self._idup is not None:
                comm, req = self._idup
                try:
                    poll(req.Test, timeout, _CREATE)
                except CoordinationTimeoutError:
                    self._give_up()
                    raise
                self._idup = None
                self.comm = self._ready(comm)
        return self.comm

    def _give_up(self, *pending) -> None:  # noqa: ANN002
        """After a timeout: keep what is pending alive, and drop the communicator if ours."""
        global _default
        if not self.owned:
            _abandoned.append(pending)
            return
        _abandoned.append((self.comm, self._idup, pending))
        self.comm, self._idup = None, None
        if _default is self:
            _default = None

    def _wait(self, req, timeout: float, what: str, *buffers) -> None:  # noqa: ANN001, ANN002
        try:
            poll(req.Test, timeout, what)
        except CoordinationTimeoutError:
            self._give_up(req, buffers)
            raise

    def broadcast(self, data: bytes | None, timeout: float) -> bytes:
        comm = self._connect(timeout)
        own = data if self.rank == 0 else b""
        if own is None:
            raise TypeError("rank 0 must broadcast bytes, not None")
        n = np.array([len(own)], dtype=np.int64)
        self._wait(comm.Ibcast(n, root=0), timeout, "broadcast", n)
        if self.rank == 0:
            buf = np.frombuffer(own, dtype=np.uint8).copy()
        else:
            buf = np.empty(int(n[0]), dtype=np.uint8)
        self._wait(comm.Ibcast(buf, root=0), timeout, "broadcast", buf)
        return buf.tobytes()

    def gather(self, data: bytes, timeout: float) -> list[bytes] | None:
        comm = self._connect(timeout)
        n = np.array([len(data)], dtype=np.int64)
        counts = np.empty(self.size, dtype=np.int64) if self.rank == 0 else None
        self._wait(comm.Igather(n, counts, root=0), timeout, "gather", n, counts)
        send = np.frombuffer(data, dtype=np.uint8)
        if self.rank == 0:
            assert counts is not None
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
            recv = np.empty(int(counts.sum()), dtype=np.uint8)
            spec = [recv, (counts.tolist(), displs.tolist()), self.MPI.BYTE]
        else:
            spec = None
        self._wait(comm.Igatherv(send, spec, root=0), timeout, "gather", send, spec)
        if self.rank != 0 or counts is None:
            return None
        return [recv[d : d + c].tobytes() for d, c in zip(displs, counts, strict=True)]
