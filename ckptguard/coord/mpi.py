"""MPI backend (mpi4py) on a duplicated communicator, so ckptguard never sees the app's messages."""

from __future__ import annotations

import numpy as np

from .base import Coordinator, poll

_default: MPICoordinator | None = None


class MPICoordinator(Coordinator):
    name = "mpi"

    def __init__(self, comm=None) -> None:  # noqa: ANN001 - an mpi4py communicator
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = (comm if comm is not None else MPI.COMM_WORLD).Dup()
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    @classmethod
    def default(cls) -> MPICoordinator:
        global _default
        if _default is None:
            _default = cls()
        return _default

    def _wait(self, req, timeout: float, what: str) -> None:  # noqa: ANN001
        poll(req.Test, timeout, what)

    def broadcast(self, data: bytes | None, timeout: float) -> bytes:
        n = np.array([len(data) if self.rank == 0 else 0], dtype=np.int64)
        self._wait(self.comm.Ibcast(n, root=0), timeout, "broadcast")
        if self.rank == 0:
            buf = np.frombuffer(data, dtype=np.uint8).copy()
        else:
            buf = np.empty(int(n[0]), dtype=np.uint8)
        self._wait(self.comm.Ibcast(buf, root=0), timeout, "broadcast")
        return buf.tobytes()

    def gather(self, data: bytes, timeout: float) -> list[bytes] | None:
        n = np.array([len(data)], dtype=np.int64)
        counts = np.empty(self.size, dtype=np.int64) if self.rank == 0 else None
        self._wait(self.comm.Igather(n, counts, root=0), timeout, "gather")
        send = np.frombuffer(data, dtype=np.uint8)
        if self.rank == 0:
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
            recv = np.empty(int(counts.sum()), dtype=np.uint8)
            spec = [recv, (counts.tolist(), displs.tolist()), self.MPI.BYTE]
        else:
            spec = None
        self._wait(self.comm.Igatherv(send, spec, root=0), timeout, "gather")
        if self.rank != 0:
            return None
        return [recv[d : d + c].tobytes() for d, c in zip(displs, counts, strict=True)]
