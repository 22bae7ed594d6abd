"""torch.distributed backend, on a dedicated gloo group (works beside NCCL, for torchrun jobs)."""

from __future__ import annotations

import atexit
import datetime as dt

import torch
import torch.distributed as dist

from ..errors import CoordinationTimeoutError
from .base import Coordinator

_groups: dict[int, TorchCoordinator] = {}
# Drop our gloo groups while the interpreter is whole: a ProcessGroupGloo destroyed during
# finalization can abort the process ("terminate called without an active exception").
atexit.register(_groups.clear)


class TorchCoordinator(Coordinator):
    name = "torch"

    def __init__(self, group=None) -> None:  # noqa: ANN001 - a ProcessGroup
        self.group = group if group is not None else dist.new_group(backend="gloo")
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)

    @classmethod
    def default(cls) -> TorchCoordinator:
        """One gloo group per default process group (creating it is itself a collective)."""
        key = id(dist.group.WORLD)
        cached = _groups.get(key)
        if cached is not None and not _alive(cached.group):
            del _groups[key]  # destroy_process_group ran since (and id() may be reused)
        if key not in _groups:
            _groups[key] = cls()
        return _groups[key]

    def _run(self, work, timeout: float, what: str) -> None:  # noqa: ANN001
        try:
            work.wait(timeout=dt.timedelta(seconds=timeout))
        except RuntimeError as e:
            raise CoordinationTimeoutError(
                f"ranks did not all reach {what} within {timeout:g} s: {e}"
            ) from None

    def broadcast(self, data: bytes | None, timeout: float) -> bytes:
        n = torch.tensor([len(data) if self.rank == 0 else 0], dtype=torch.int64)
        self._run(
            dist.broadcast(n, src=self._src(), group=self.group, async_op=True),
            timeout,
            "broadcast",
        )
        if self.rank == 0:
            buf = (
                torch.frombuffer(bytearray(data), dtype=torch.uint8)
                if data
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
        if self.rank != 0:
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
