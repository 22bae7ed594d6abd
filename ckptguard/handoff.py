"""The trainer's side of the snapshot handoff to its ``ckptguard run`` agent (docs/agent.md).

The Checkpointer's host pool lives in memfds shared with the agent (passed over the control
socket, pinned here for GPU copies). After a snapshot lands in the pool, ``submit`` sends its
description (the object tree and where each tensor's bytes lie in the pool) and returns once the
agent has queued it: from then on the save completes even if this process dies. ``result``
waits for the agent's commit (or its error).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import threading
from typing import Any

import numpy as np
import torch

from . import errors
from .agent.client import agent_address
from .agent.protocol import LineReader, ProtocolError, decode, encode
from .errors import AgentError
from .failpoints import failpoint, set_rank
from .format.manifest import CheckpointInfo
from .report import info_from_json
from .tree import Flat

CONNECT_TIMEOUT = 5.0


class Handoff:
    """One connection to the agent, owned by a Checkpointer."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CONNECT_TIMEOUT)
        try:
            self.sock.connect(address)
            self.sock.sendall(encode("hello", pid=os.getpid()))
            reader = LineReader()
            welcome = self._first_reply(reader)
            if welcome.get("op") != "welcome" or not welcome.get("handoff"):
                raise AgentError(f"the agent at {address} does not take snapshots")
            if type(welcome.get("rank")) is int:  # for failpoints before any save of ours
                set_rank(welcome["rank"])
        except (OSError, ProtocolError) as e:
            self.sock.close()
            raise AgentError(f"cannot reach the agent at {address}: {e}") from None
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(None)
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict[tuple[str, int], dict] = {}
        self._broken: str | None = None
        self._ids = 0
        threading.Thread(
            target=self._listen, args=(reader,), name="ckptguard-handoff", daemon=True
        ).start()

    @classmethod
    def connect(cls) -> Handoff | None:
        """The agent's handoff if this process runs under one, else None."""
        address = agent_address()
        return None if address is None else cls(address)

    # -- the pool ---------------------------------------------------------------------------------
    def allocate(self, nbytes: int, pin: bool) -> tuple[torch.Tensor, int]:
        """``nbytes`` of memory shared with the agent, touched (and pinned with ``pin``)."""
        ident = self._next_id()
        fd = os.memfd_create("ckptguard-pool", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            m = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            with self._lock:
                try:
                    socket.send_fds(self.sock, [encode("pool", pool=ident, bytes=nbytes)], [fd])
                except OSError as e:  # the agent is gone
                    raise AgentError(f"cannot pass the pool to the agent: {e}") from None
        finally:
            os.close(fd)
        self._expect("pool", ident)
        buf = torch.frombuffer(m, dtype=torch.uint8)  # keeps the mapping alive
        buf.zero_()  # touch every page now, not inside a snapshot
        if pin and torch.cuda.is_available():
            rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
            if int(rc) != 0:
                raise AgentError(f"cannot pin the shared pool ({nbytes} bytes): CUDA error {rc}")
        return buf, ident

    # -- saves ------------------------------------------------------------------------------------
    def submit(self, buf: torch.Tensor, pool: int, state: Flat, path: str, options: dict) -> int:
        """Hand over a snapshot (``capture``'s flattened state) that lies in pool ``pool``
        (``buf``); returns the save's id."""
        tree, refs, used_pickle = state.tree, state.refs, state.used_pickle
        base, size = buf.data_ptr(), buf.numel()
        tensors = []
        for r in refs:
            ptr, n = (0, 0) if r.view is not None else _where(r.value)
            if n and not (base <= ptr and ptr + n <= base + size):
                raise AgentError(f"{r.key}: not in the shared pool, cannot be handed over")
            tensors.append(
                {
                    "key": r.key,
                    "dtype": r.dtype,
                    "shape": list(r.shape),
                    "kind": r.kind,
                    "device": r.device,
                    "requires_grad": r.requires_grad,
                    "parameter": r.parameter,
                    "global_shape": list(r.global_shape),
                    "offsets": list(r.offsets),
                    "sharded": r.sharded,
                    "per_rank": r.per_rank,
                    "offset": ptr - base if n else 0,
                    "nbytes": n,
                    "view": None if r.view is None else r.view.to_json(),
                }
            )
        ident = self._next_id()
        msg = encode(
            "save",
            id=ident,
            pool=pool,
            path=path,
            options=options,
            tree=tree,
            tensors=tensors,
            pickle=used_pickle,
        )
        try:  # from the first byte sent, the agent may hold the save and read the pool
            with self._lock:
                try:
                    self.sock.sendall(msg)
                except OSError as e:  # the agent is gone: a typed error, like _wait's
                    raise AgentError(f"cannot hand the save over to the agent: {e}") from None
            self._expect("accepted", ident)
            failpoint("handoff.submitted")
        except BaseException as e:
            e.ckptguard_region_shared = True  # type: ignore[attr-defined]
            raise
        return ident

    def result(self, ident: int) -> CheckpointInfo:
        """The committed checkpoint of save ``ident``, or its error raised here."""
        reply = self._wait("saved", ident)
        if not reply.get("ok"):
            raise _error(str(reply.get("type")), str(reply.get("error")))
        return info_from_json(dict(reply["info"]))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    # -- internals --------------------------------------------------------------------------------
    def _next_id(self) -> int:
        with self._lock:
            self._ids += 1
            return self._ids

    def _first_reply(self, reader: LineReader) -> dict:
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ProtocolError("the agent closed the connection")
            lines = reader.feed(data)
            if lines:
                return decode(lines[0])

    def _listen(self, reader: LineReader) -> None:
        why = "the agent closed the connection"
        try:
            while data := self.sock.recv(1 << 16):
                for line in reader.feed(data):
                    msg = decode(line)
                    op, ident = msg["op"], msg.get("id")
                    if op in ("pool", "accepted", "refused", "saved") and type(ident) is int:
                        with self._cond:
                            key = ("saved" if op == "saved" else "reply", ident)
                            self._replies[key] = msg
                            self._cond.notify_all()
        except (OSError, ProtocolError) as e:
            why = f"the connection to the agent failed: {e}"
        with self._cond:
            self._broken = why
            self._cond.notify_all()

    def _wait(self, kind: str, ident: int) -> dict:
        with self._cond:
            while (kind, ident) not in self._replies:
                if self._broken is not None:
                    raise AgentError(self._broken)
                self._cond.wait(1.0)
            return self._replies.pop((kind, ident))

    def _expect(self, op: str, ident: int) -> None:
        reply = self._wait("reply", ident)
        if reply["op"] != op:
            raise AgentError(f"the agent refused: {reply.get('message')}")


def _where(value: Any) -> tuple[int, int]:
    """(address, bytes) of a snapshot tensor or array (contiguous by construction)."""
    if isinstance(value, np.ndarray):
        return value.__array_interface__["data"][0], value.nbytes
    n = value.numel() * value.element_size()
    return (value.data_ptr() if n else 0), n


def _error(name: str, message: str) -> Exception:
    """The agent's error as the same ckptguard exception type where it can be rebuilt."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.CheckpointError):
        try:
            return cls(message)
        except TypeError:
            pass
    return AgentError(f"the agent's save failed: {name}: {message}")
