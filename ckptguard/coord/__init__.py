"""Coordinators: the few collectives a distributed save needs, each with a deadline.

A coordinator moves bytes only (never pickled objects): ``broadcast`` from rank 0 and ``gather``
to rank 0. Backends: ``local`` (one process), ``mpi`` (mpi4py, on a duplicated communicator) and
``torch`` (torch.distributed, on a dedicated gloo group).
"""

from __future__ import annotations

import os
import sys

from .base import Coordinator, LocalCoordinator

__all__ = ["Coordinator", "LocalCoordinator", "auto", "current"]

_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def _launched_by_mpi() -> bool:
    for var in _MPI_SIZE_VARS:
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            continue
    return False


def auto(coordinator: Coordinator | str | None = None, timeout: float | None = None) -> Coordinator:
    """Pick a coordinator: the one given, an initialized torch.distributed group, an MPI world of
    size > 1 (only if mpi4py is already imported or an MPI launcher started us), else local.

    Making the ``mpi`` or ``torch`` coordinator's communicator is a collective too: with
    ``timeout`` (the save's), it completes here within that many seconds or raises
    ``CoordinationTimeoutError``; without, the coordinator's first collective waits for it, within
    that collective's timeout. MPI starts it here either way (``Comm.Idup``), on this thread.
    """
    if isinstance(coordinator, Coordinator):
        return coordinator
    if coordinator not in (None, "local", "mpi", "torch"):
        raise ValueError(f"unknown coordinator {coordinator!r}: use 'local', 'mpi' or 'torch'")
    if coordinator == "local":
        return LocalCoordinator()
    if coordinator == "torch" or coordinator is None and _torch_initialized():
        from .torchdist import TorchCoordinator

        return TorchCoordinator.default(timeout)
    if coordinator == "mpi" or "mpi4py.MPI" in sys.modules or _launched_by_mpi():
        from .mpi import MPICoordinator

        c = MPICoordinator.default(timeout)
        if coordinator == "mpi" or c.size > 1:
            return c
    return LocalCoordinator()


def _torch_initialized() -> bool:
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current(coordinator: Coordinator | str | None = None) -> tuple[int, int]:
    """(rank, size) of this process in the job ``coordinator`` names (None: whichever of torch
    and MPI is set up), without creating groups or communicators (for loading); (0, 1) alone."""
    if isinstance(coordinator, Coordinator):
        return coordinator.rank, coordinator.size
    if coordinator in (None, "torch") and _torch_initialized():
        import torch.distributed as dist

        return dist.get_rank(), dist.get_world_size()
    if coordinator in (None, "mpi") and ("mpi4py.MPI" in sys.modules or _launched_by_mpi()):
        from mpi4py import MPI

        return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    return 0, 1
