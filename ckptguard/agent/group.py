"""The agents' world: MPI among the agents (mpi4py, imported here only), or one lone agent.

Collectives move JSON bytes or int64 vectors, never pickles. ``exchange`` is a MAX all-reduce that
keeps calling ``wait`` (the control socket) until it completes.
"""

from __future__ import annotations

import json
import time
from array import array
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import AgentError


class PeersLostError(AgentError):
    """The agents' agreement did not complete in time: another agent is gone or stuck."""


class Group:
    """One agent alone: collectives are identities."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    name = "none"

    def bcast_json(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (JSON-able) on every rank."""
        return json.loads(json.dumps(obj))

    def exchange(
        self, values: list[int], wait: Callable[[], object], timeout: float | None = None
    ) -> list[int]:
        """The element-wise maximum of every rank's ``values``; ``PeersLostError`` if the other
        agents have not all answered within ``timeout`` seconds."""
        return list(values)

    def abort(self, code: int) -> None:
        """End every agent of the job (after this one lost contact with the others)."""
        raise SystemExit(code)

    def close(self) -> None:
        pass


class MPIGroup(Group):
    """The agents' MPI world, on a duplicate of COMM_WORLD."""

    name = "mpi"

    def __init__(self) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()

    def bcast_json(self, obj: Any) -> Any:
        data = json.dumps(obj).encode() if self.rank == 0 else b""
        n = array("q", [len(data)])
        self.comm.Bcast([n, self.MPI.INT64_T], root=0)
        buf = bytearray(data) if self.rank == 0 else bytearray(n[0])
        self.comm.Bcast([buf, self.MPI.BYTE], root=0)
        return json.loads(bytes(buf))

    def exchange(
        self, values: list[int], wait: Callable[[], object], timeout: float | None = None
    ) -> list[int]:
        send, recv = array("q", values), array("q", [0] * len(values))
        req = self.comm.Iallreduce(
            [send, self.MPI.INT64_T], [recv, self.MPI.INT64_T], op=self.MPI.MAX
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        while not req.Test():
            if deadline is not None and time.monotonic() > deadline:
                raise PeersLostError(
                    f"the other agents did not answer within {timeout:g} s (an agent died or hangs)"
                )
            wait()
        return list(recv)

    def abort(self, code: int) -> None:
        self.MPI.COMM_WORLD.Abort(code)

    def close(self) -> None:
        self.comm.Free()


def open_group(env: Mapping[str, str]) -> Group:
    """MPI among the agents when mpi4py is installed; a lone agent only where that is the world."""
    try:
        import mpi4py  # noqa: F401 - imported for its presence; MPI starts in MPIGroup
    except ImportError:
        for var in ("SLURM_NTASKS", "PMI_SIZE", "PMIX_SIZE", "OMPI_COMM_WORLD_SIZE"):
            if env.get(var, "1").isdigit() and int(env.get(var, "1")) > 1:
                raise AgentError(
                    f"{var}={env[var]} ranks but mpi4py is missing: the agents cannot agree "
                    "(pip install 'ckptguard[mpi]')"
                ) from None
        return Group()
    return MPIGroup()
