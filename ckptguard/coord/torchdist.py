"""torch.distributed backend, on a dedicated gloo group (works beside NCCL, for torchrun jobs).

Creating the group (``dist.new_group``) is itself a collective. The coordinator of
``default()`` creates it at its first collective, within that collective's ``timeout`` (a save's
``timeout``), or at once with ``default(timeout)``; a rank that does not come in time makes the
others raise ``CoordinationTimeoutError`` (gloo's rendezvous error is wrapped) instead of waiting
torch's default 30 minutes. The group's collectives then get torch's default timeout again, as
before: each wait is bounded by its own ``timeout`` (``work.wait``), and the outcome's wait may
be longer than the creation's.

After a ``CoordinationTimeoutError`` that coordinator gives up its group (and leaves the cache):
work still pending on it could otherwise pair with the next save's. The next save creates a new
group; every rank that timed out does the same, so torch's group names (a counter) still agree.
The old group is not destroyed (destroying it waits for its pending work); torch keeps it until
``destroy_process_group()``. A coordinator on a group given by the caller keeps it. The group
in use is destroyed by an exit handler, before the interpreter is torn down.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from ..errors import CoordinationTimeoutError
from .base import Coordinator

_groups: dict[int, TorchCoordinator] = {}


def _destroy_groups() -> None:
    """Destroy the gloo groups this process created and still uses, while the interpreter is
    whole. torch keeps every group until finalization otherwise, and a ProcessGroupGloo whose
    last work held tensors made in Python, torn down then, can abort a process that finished
    its work (SIGABRT, "terminate called without an active exception"). Every work on these
    groups was waited for, so destroying them is local and does not block; a group given up
    after a timeout may still hold pending work and is left to torch."""
    for coordinator in list(_groups.values()):
        group = coordinator.group
        if coordinator.owned and group is not None and coordinator._alive():
            coordinator.group = None
            with contextlib.suppress(RuntimeError, ValueError):  # torch forgot it already
                dist.destroy_process_group(group)
    _groups.clear()


atexit.register(_destroy_groups)


class TorchCoordinator(Coordinator):
    name = "torch"

    def __init__(self, group=None, *, timeout: float | None = None) -> None:  # noqa: ANN001
        """On ``group``, or on a gloo group of all ranks created at the first collective (or at
        once, within ``timeout`` s, if given)."""
        self.owned = group is None
        self.group = group
        self.world = dist.group.WORLD  # the default group this coordinator belongs to
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if self.owned and timeout is not None:
            self._connect(timeout)

    @classmethod
    def default(cls, timeout: float | None = None) -> TorchCoordinator:
        """One coordinator per default process group; with ``timeout``, its group is created
        now (creating it is itself a collective), else at its first collective."""
        key = id(dist.group.WORLD)
        cached = _groups.get(key)
        if cached is not None and not cached._alive():
            del _groups[key]  # destroy_process_group ran since (and id() may be reused)
        if key not in _groups:
            _groups[key] = cls()
        if timeout is not None:
            _groups[key]._connect(timeout)
        return _groups[key]

    def _connect(self, timeout: float):  # noqa: ANN202 - a ProcessGroup
        """Our group, created within ``timeout`` s if it is not yet."""
        if self.group is None:
            try:
                group = dist.new_group(backend="gloo", timeout=dt.timedelta(seconds=timeout))
            except RuntimeError as e:  # DistStoreError, gloo's connect errors
                self._give_up()
                raise CoordinationTimeoutError(
                    f"ranks did not all reach the creation of ckptguard's gloo group (new_group) "
                    f"within {timeout:g} s: a rank died, stalled or took another path "
                    f"({type(e).__name__}: {_first_line(e)})"
                ) from None
            set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
            if set_timeout is not None:  # collectives: torch's default, as without a timeout
                set_timeout(default_pg_timeout, group)
            self.group = group
        return self.group

    def _give_up(self) -> None:
        """After a timeout: forget our group (torch keeps it), so the next save makes one."""
        if not self.owned:
            return
        self.group = None
        key = id(self.world)
        if _groups.get(key) is self:
            del _groups[key]

    def _alive(self) -> bool:
        return self.world is dist.group.WORLD and (self.group is None or _alive(self.group))

    def _run(self, work, timeout: float, what: str) -> None:  # noqa: ANN001
        try:
            work.wait(timeout=dt.timedelta(seconds=timeout))
        except RuntimeError as e:
            self._give_up()
            raise CoordinationTimeoutError(
                f"ranks did not all reach {what} within {timeout:g} s: {e}"
            ) from None

    def broadcast(self, data: bytes | None, timeout: float) -> bytes:
        self._connect(timeout)
        own = data if self.rank == 0 else b""
        if own is None:
            raise TypeError("rank 0 must broadcast bytes, not None")
        n = torch.tensor([len(own)], dtype=torch.int64)
        self._run(
            dist.broadcast(n, src=self._src(), group=self.group, async_op=True),
            timeout,
            "broadcast",
        )
        if self.rank == 0:
            buf = (
                torch.frombuffer(bytearray(own), dtype=torch.uint8)
                if own
                else torch.empty(0, dtype=torch.uint8)
            )
        else:
            buf = torch.empty(int(n.item()), dtype=torch.uint8)
        if buf.numel():
            self._run(
                dist.broadcast(buf, src=self._src(), group=self.group, async_op=True),
                timeout,
                "broadcast",
            )
        return buf.numpy().tobytes()

    def gather(self, data: bytes, timeout: float) -> list[bytes] | None:
        self._connect(timeout)
        n = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.empty(1, dtype=torch.int64) for _ in range(self.size)]
        self._run(dist.all_gather(sizes, n, group=self.group, async_op=True), timeout, "gather")
        longest = max(int(s.item()) for s in sizes)
        buf = torch.zeros(max(longest, 1), dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        outs = [torch.empty_like(buf) for _ in range(self.size)] if self.rank == 0 else None
        self._run(
            dist.gather(buf, outs, dst=self._src(), group=self.group, async_op=True),
            timeout,
            "gather",
        )
        if self.rank != 0 or outs is None:
            return None
        return [o[: int(s.item())].numpy().tobytes() for o, s in zip(outs, sizes, strict=True)]

    def _src(self) -> int:
        """Global rank of this group's rank 0 (torch's collectives take global ranks)."""
        return dist.get_global_rank(self.group, 0)


def _alive(group) -> bool:  # noqa: ANN001 - a ProcessGroup
    """Whether torch still knows ``group`` (destroy_process_group forgets every group)."""
    try:
        return dist.is_initialized() and dist.get_world_size(group) > 0
    except (RuntimeError, ValueError):
        return False


def _first_line(e: BaseException) -> str:
    """The first line of a torch error (its C++ traceback follows)."""
    return (str(e).strip().splitlines() or [""])[0]
