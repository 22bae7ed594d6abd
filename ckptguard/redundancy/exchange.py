"""Moving a set's bytes between nodes over MPI: XOR parity, its rebuild, and partner copies.

One process per node takes part (the node's lowest rank, or its agent), on a communicator of
its set whose rank order is the set's member order (``set_comm``). Every exchange runs block by
block (``parity.BLOCK``), so a member holds at most ``n`` blocks at once whatever its payload,
and every collective has a deadline: a member that died or stalled is a
``CoordinationTimeoutError`` on the others, never a hang.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..coord.base import poll
from ..errors import CoordinationTimeoutError, RebuildError
from . import parity
from .parity import Layout, Reader

# write(position, bytes) of what a member keeps (its parity, a rebuilt payload, a ward's copy)
Writer = Callable[[int, np.ndarray], None]


class SetComm:
    """The collectives of one set on an mpi4py communicator, each within ``timeout`` s."""

    def __init__(self, comm: Any, timeout: float) -> None:
        from mpi4py import MPI

        self.MPI, self.comm, self.timeout = MPI, comm, timeout
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        # Requests a timeout left pending, with their buffers: MPI may still write into them.
        self.abandoned: list = []

    @classmethod
    def duplicate(cls, comm: Any, timeout: float) -> SetComm:
        """A private duplicate of ``comm`` (every rank of it calls this), made within
        ``timeout`` where the MPI library has ``MPI_Comm_idup``."""
        try:
            new, req = comm.Idup()
        except (NotImplementedError, AttributeError):  # before MPI-3: no deadline here
            return cls(comm.Dup(), timeout)
        poll(req.Test, timeout, "the creation of a communicator for node-local redundancy")
        return cls(new, timeout)

    def close(self) -> None:
        """Free the communicator, unless a timeout left requests pending on it (MPI forbids
        freeing those; they are kept until the process ends)."""
        if not self.abandoned and self.comm is not None:
            self.comm.Free()
        self.comm = None

    def _wait(self, req: Any, what: str, *buffers: Any) -> None:
        try:
            poll(req.Test, self.timeout, what)
        except CoordinationTimeoutError:
            self.abandoned.append((req, buffers))
            raise

    def reduce_scatter_xor(self, send: np.ndarray) -> np.ndarray:
        """Row ``rank`` of the XOR of every member's ``(size, b)`` array."""
        recv = np.empty(send.shape[1], dtype=np.uint8)
        req = self.comm.Ireduce_scatter_block(send, recv, op=self.MPI.BXOR)
        self._wait(req, "an XOR parity block", send, recv)
        return recv

    def reduce_xor(self, send: np.ndarray, root: int) -> np.ndarray | None:
        """The XOR of every member's ``send`` on ``root`` (None elsewhere)."""
        recv = np.empty_like(send) if self.rank == root else None
        req = self.comm.Ireduce(send, recv, op=self.MPI.BXOR, root=root)
        self._wait(req, "a rebuild block", send, recv)
        return recv

    def shift(self, send: np.ndarray, dest: int, source: int, size: int) -> np.ndarray:
        """Send ``send`` to ``dest`` while receiving ``size`` bytes from ``source``."""
        recv = np.empty(size, dtype=np.uint8)
        reqs = [self.comm.Irecv(recv, source=source, tag=77), self.comm.Isend(send, dest, 77)]
        self._wait(_All(reqs, self.MPI), "a partner copy block", send, recv)
        return recv

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Every member's ``data``, in member order."""
        sizes = self.lengths(len(data))
        out = np.empty(sum(sizes), dtype=np.uint8)
        send = np.frombuffer(data, dtype=np.uint8)
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
        req = self.comm.Iallgatherv(send, [out, (sizes, displs), self.MPI.BYTE])
        self._wait(req, "an exchange of node states", send, out)
        return [out[d : d + n].tobytes() for d, n in zip(displs, sizes, strict=True)]

    def bcast_bytes(self, data: bytes | None, root: int) -> bytes:
        """Member ``root``'s ``data`` on every member."""
        n = np.array([len(data) if self.rank == root and data is not None else 0], np.int64)
        self._wait(self.comm.Ibcast(n, root=root), "a broadcast", n)
        buf = (
            np.frombuffer(data or b"", dtype=np.uint8).copy()
            if self.rank == root
            else np.empty(int(n[0]), dtype=np.uint8)
        )
        self._wait(self.comm.Ibcast(buf, root=root), "a broadcast", buf)
        return buf.tobytes()

    def all_ok(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every member."""
        mine, out = np.array([1 if ok else 0], np.int64), np.empty(1, np.int64)
        req = self.comm.Iallreduce(mine, out, op=self.MPI.MIN)
        self._wait(req, "the agreement on an outcome", mine, out)
        return bool(out[0])

    def lengths(self, mine: int) -> list[int]:
        """Every member's ``mine``, in member order."""
        out = np.empty(self.size, dtype=np.int64)
        req = self.comm.Iallgather(np.array([mine], dtype=np.int64), out)
        self._wait(req, "the payload lengths of a set", out)
        return [int(x) for x in out]


class _All:
    """Several requests tested as one."""

    def __init__(self, reqs: list, MPI: Any) -> None:  # noqa: N803 - the module's name
        self.reqs, self.MPI = reqs, MPI

    def Test(self) -> bool:  # noqa: N802 - the request protocol
        return bool(self.MPI.Request.Testall(self.reqs))


def rate_problem(rate: float | None, block: int, timeout: float) -> str:
    """What is wrong with ``rate`` (bytes a second; None: no limit) as a node's bandwidth for
    moving blocks of ``block`` bytes whose collectives each have ``timeout`` s; "" if nothing."""
    if rate is None:
        return ""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < math.inf:
        return f"rate {rate!r} is not a positive number of bytes a second (or None: no limit)"
    if rate * timeout < 2 * block:
        need = math.ceil(2 * block / timeout)
        return (
            f"rate {rate:g} bytes/s takes over half the {timeout:g} s deadline to move one "
            f"{block}-byte block, so the other nodes would time out: give at least {need} bytes/s "
            "or a longer timeout"
        )
    return ""


class Pace:
    """At most ``rate`` bytes a second read through ``reader`` (None: no limit): what a node's
    protection may take of its disk and network while the job trains on. One block passes at
    once; each after it waits until the bytes before it fit the rate."""

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate, self.clock, self.sleep = rate, clock, sleep
        self.start: float | None = None
        self.moved = 0

    def wait(self, size: int) -> None:
        """Sleep until ``size`` more bytes keep within the rate, and count them."""
        if self.rate is None:
            return
        now = self.clock()
        if self.start is None:
            self.start = now
        self.start = max(self.start, now - self.moved / self.rate)  # idle time earns no burst
        ahead = self.moved / self.rate - (now - self.start)
        self.moved += size
        if ahead > 0:
            self.sleep(ahead)

    def reader(self, read: Reader) -> Reader:
        """``read``, paced."""
        if self.rate is None:
            return read

        def paced(position: int, size: int) -> np.ndarray:
            self.wait(size)
            return read(position, size)

        return paced


def set_comm(comm: Any, sets: list[list[str]], node: str | None, timeout: float) -> SetComm | None:
    """Split ``comm`` (one process per node taking part, ``node`` its node or None for a process
    that sits out) into the communicators of ``sets``; this process's, or None."""
    index = {n: (k, sets[k].index(n)) for k in range(len(sets)) for n in sets[k]}
    if node is not None and node not in index:
        raise RebuildError(f"node {node!r} is in no redundancy set of this job")
    color, key = index[node] if node is not None else (-1, 0)
    sub = comm.Split(color if color >= 0 else _undefined(), key)
    return None if node is None else SetComm(sub, timeout)


def _undefined() -> int:
    from mpi4py import MPI

    return int(MPI.UNDEFINED)


def encode(sc: SetComm, lay: Layout, read: Reader, keep: Writer, block: int = parity.BLOCK) -> None:
    """Compute this member's parity segment, block by block, handing each to ``keep``."""
    for offset, size in parity.blocks(lay, block):
        keep(offset, sc.reduce_scatter_xor(parity.encode_block(lay, sc.rank, read, offset, size)))


def rebuild(
    sc: SetComm,
    lay: Layout,
    lost: int,
    read: Reader | None,
    parity_read: Reader | None,
    keep: Writer | None,
    block: int = parity.BLOCK,
) -> None:
    """Rebuild member ``lost``'s payload: the survivors give ``read`` (their payload) and
    ``parity_read`` (their parity segment); member ``lost`` gives ``keep``, which receives the
    payload's bytes by position (padding dropped)."""
    if not 0 <= lost < lay.n:
        raise RebuildError(f"member {lost} is not in a set of {lay.n}")
    for offset, size in parity.blocks(lay, block):
        if sc.rank == lost:
            send = np.zeros((lay.n - 1, size), dtype=np.uint8)
        else:
            assert read is not None and parity_read is not None
            send = parity.rebuild_block(lay, lost, sc.rank, read, parity_read, offset, size)
        got = sc.reduce_xor(send, lost)
        if got is None:
            continue
        assert keep is not None
        for s in range(lay.n - 1):
            pos, n = parity.placed(lay, lost, s, offset, size)
            if n:
                keep(pos, got[s, :n])


def reencode(
    sc: SetComm,
    lay: Layout,
    m: int,
    read: Reader | None,
    keep: Writer | None,
    block: int = parity.BLOCK,
) -> None:
    """Compute member ``m``'s parity segment again (its node was replaced): the other members
    give ``read``, member ``m`` gives ``keep``, which receives the segment block by block."""
    for offset, size in parity.blocks(lay, block):
        if sc.rank == m:
            send = np.zeros(size, dtype=np.uint8)
        else:
            assert read is not None
            send = read(parity.covered_segment(m, sc.rank, lay.n) * lay.segment + offset, size)
        got = sc.reduce_xor(send, m)
        if got is not None:
            assert keep is not None
            keep(offset, got)


def copy_ring(
    sc: SetComm, read: Reader, mine: int, theirs: int, keep: Writer, block: int = parity.BLOCK
) -> None:
    """Partner copies on a ring: send this member's payload (``mine`` bytes) to the next member
    while receiving the previous member's (``theirs`` bytes) into ``keep``."""
    nxt, prev = (sc.rank + 1) % sc.size, (sc.rank - 1) % sc.size
    for offset in range(0, max(sc.lengths(mine)), block):
        out = read(offset, max(0, min(block, mine - offset)))
        got = sc.shift(out, nxt, prev, max(0, min(block, theirs - offset)))
        if len(got):
            keep(offset, got)


def transfer(
    sc: SetComm,
    src: int,
    dst: int,
    read: Reader | None,
    length: int,
    keep: Writer | None,
    block: int = parity.BLOCK,
) -> None:
    """Member ``src`` sends ``length`` bytes (read by ``read``) to member ``dst``, which
    ``keep``s them: a partner's copy back to a replaced node, or a ward's files to its new
    partner. The other members take no part."""
    if not (0 <= src < sc.size and 0 <= dst < sc.size) or src == dst:
        raise RebuildError(f"no transfer from member {src} to member {dst} in a set of {sc.size}")
    if sc.rank not in (src, dst):
        return
    for offset in range(0, length, block):
        size = min(block, length - offset)
        if sc.rank == src:
            assert read is not None
            data = read(offset, size)
            sc._wait(sc.comm.Isend(data, dst, 78), "a partner copy block", data)
        else:
            assert keep is not None
            got = np.empty(size, dtype=np.uint8)
            sc._wait(sc.comm.Irecv(got, source=src, tag=78), "a partner copy block", got)
            keep(offset, got)
