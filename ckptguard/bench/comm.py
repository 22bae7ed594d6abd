"""Rank coordination for the harness: a one-rank stand-in, and MPI (mpi4py) under ``mpiexec``."""

from __future__ import annotations

import os
import socket
from typing import Any

MPI_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALRANKID")


class LocalComm:
    """One rank: every collective is the identity."""

    rank = 0
    size = 1

    def barrier(self) -> None:
        """Wait for every rank."""

    def max(self, x: float) -> float:
        """Largest value over ranks."""
        return x

    def sum(self, x: float) -> float:
        """Sum over ranks."""
        return x

    def any(self, flag: bool) -> bool:
        """True if any rank says True."""
        return bool(flag)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's object on rank 0 (None elsewhere)."""
        return [obj]

    def bcast(self, obj: Any) -> Any:
        """Rank 0's object on every rank."""
        return obj


class MPIComm(LocalComm):
    """COMM_WORLD through mpi4py."""

    def __init__(self) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()

    def barrier(self) -> None:
        self._comm.Barrier()

    def max(self, x: float) -> float:
        return self._comm.allreduce(x, op=self._mpi.MAX)

    def sum(self, x: float) -> float:
        return self._comm.allreduce(x, op=self._mpi.SUM)

    def any(self, flag: bool) -> bool:
        return bool(self._comm.allreduce(int(bool(flag)), op=self._mpi.MAX))

    def gather(self, obj: Any) -> list[Any] | None:
        return self._comm.gather(obj, root=0)

    def bcast(self, obj: Any) -> Any:
        return self._comm.bcast(obj, root=0)


def under_mpi() -> bool:
    """True when this process was started by an MPI launcher."""
    return any(k in os.environ for k in MPI_ENV)


def make_comm() -> LocalComm:
    """MPIComm under an MPI launcher with more than one rank, else LocalComm."""
    if under_mpi():
        comm = MPIComm()
        if comm.size > 1:
            return comm
    return LocalComm()


def init_torch_distributed(comm: LocalComm, device: str) -> bool:
    """Start torch.distributed (gloo, plus nccl on GPUs) for DCP across ranks; False for 1 rank."""
    import torch.distributed as dist

    if comm.size == 1 or dist.is_initialized():
        return dist.is_initialized()
    addr = None
    if comm.rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            addr = (socket.gethostname(), s.getsockname()[1])
    host, port = comm.bcast(addr)
    backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://{host}:{port}", rank=comm.rank, world_size=comm.size
    )
    return True
