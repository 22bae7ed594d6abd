"""Rank coordination for the harness: a one-rank stand-in, and MPI (mpi4py) under ``mpiexec`` or
``srun``; and the choice of launcher for ``--ranks N``."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

MPI_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALRANKID")
LAUNCHERS = ("auto", "mpiexec", "srun")


def _int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def slurm_task(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``(rank, size)`` of a task that ``srun`` started (``SLURM_PROCID`` of ``SLURM_NTASKS``), or
    None outside an srun step.

    Only srun sets ``SLURM_STEP_NUM_TASKS``: a batch script or an ``salloc`` shell also has
    ``SLURM_PROCID=0`` and ``SLURM_NTASKS`` (the allocation's), but it is not one of N ranks and
    must still launch them.
    """
    env = os.environ if env is None else env
    step_tasks = _int(env.get("SLURM_STEP_NUM_TASKS"))
    rank = _int(env.get("SLURM_PROCID"))
    if step_tasks is None or rank is None:
        return None
    size = step_tasks or _int(env.get("SLURM_NTASKS")) or 1
    return rank, size


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


def under_mpi(env: Mapping[str, str] | None = None) -> bool:
    """True when this process was started by a launcher as one of its ranks: an MPI launcher's
    variables, or srun's task variables (see :func:`slurm_task`)."""
    env = os.environ if env is None else env
    return any(k in env for k in MPI_ENV) or slurm_task(env) is not None


def make_comm() -> LocalComm:
    """MPIComm under a launcher with more than one rank, else LocalComm.

    One srun task without MPI variables runs alone (mpi4py is not needed). Raises RuntimeError
    when srun started several tasks but they got no MPI world (no PMI, or no mpi4py): each task
    would otherwise run the whole benchmark alone, all at once in the same directory.
    """
    task = slurm_task()
    tasks = task[1] if task is not None else 1
    if any(k in os.environ for k in MPI_ENV) or tasks > 1:
        try:
            comm = MPIComm()
        except ImportError as exc:
            raise RuntimeError(
                f"started by an MPI launcher but mpi4py does not import ({exc}): install "
                "ckptguard[mpi]"
            ) from None
        if comm.size > 1:
            return comm
        if tasks > 1:
            raise RuntimeError(
                f"srun started {tasks} tasks but gave them no MPI world (no PMI): launch with "
                "`srun --mpi=pmi2 ...` (ckptguard bench --ranks N --launcher srun does)"
            )
    return LocalComm()


def choose_launcher(
    choice: str, env: Mapping[str, str], found: Mapping[str, str | None]
) -> tuple[str, str]:
    """The launcher for ``--ranks N``: ``(name, path)``. Pure: ``env`` is the environment and
    ``found`` maps ``"srun"`` and ``"mpiexec"`` to where they were found (None: not found).

    ``auto`` picks srun inside a Slurm allocation (``SLURM_JOB_ID`` set and srun found), else
    mpiexec. Raises ValueError when the launcher asked for (or any, for auto) is missing.
    """
    if choice not in LAUNCHERS:
        raise ValueError(f"unknown launcher {choice!r}; choose from {', '.join(LAUNCHERS)}")
    srun, mpiexec = found.get("srun"), found.get("mpiexec")
    if choice == "srun" or (choice == "auto" and env.get("SLURM_JOB_ID") and srun):
        if not srun:
            raise ValueError("--launcher srun: srun is not on PATH")
        return "srun", srun
    if not mpiexec:
        hint = " (or run inside a Slurm allocation, where srun is used)" if choice == "auto" else ""
        raise ValueError(f"--ranks > 1 needs mpiexec on PATH (pip install mpich){hint}")
    return "mpiexec", mpiexec


def launch_command(
    launcher: str, path: str, ranks: int, args: Sequence[str], python: str | None = None
) -> list[str]:
    """The command that runs ``python -m ckptguard.bench ARGS`` as ``ranks`` ranks."""
    tail = [python or sys.executable, "-m", "ckptguard.bench", *args]
    if launcher == "srun":  # PMI2 gives the tasks one MPI world (mpi4py with MPICH)
        return [path, "-n", str(ranks), "--mpi=pmi2", *tail]
    return [path, "-n", str(ranks), *tail]


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
