"""The agent's control socket: a Unix stream socket in a private directory, served without threads.

The runner calls ``serve`` between its collective steps. Clients say ``hello`` (and then hear of a
checkpoint request) or report ``committed``; see docs/agent.md for the messages.
"""

from __future__ import annotations

import contextlib
import os
import queue
import selectors
import shutil
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from .persist import Persister
from .protocol import HandoffError, LineReader, ProtocolError, decode, encode

_MAX_PATH = 107  # sun_path holds 108 bytes on Linux, NUL included


@dataclass(frozen=True)
class Commit:
    """A commit a client reported: when (monotonic seconds), where and at which step."""

    at: float
    path: str
    step: int | None


@dataclass
class _Client:
    id: int
    reader: LineReader = field(default_factory=LineReader)
    subscribed: bool = False
    fds: list[int] = field(default_factory=list)  # passed with messages, claimed by "pool"


def _private_dir() -> str:
    """A fresh mode-0700 directory for the socket, under $TMPDIR if its path is short enough."""
    for base in (os.environ.get("TMPDIR"), "/tmp"):
        if base and os.path.isdir(base) and len(base) + 40 <= _MAX_PATH:
            return tempfile.mkdtemp(prefix="ckptguard-agent-", dir=base)
    return tempfile.mkdtemp(prefix="ckptguard-agent-")


class ControlServer:
    """Accepts any number of local clients; records commits; broadcasts the request."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.request: dict[str, Any] | None = None
        self.commits: list[Commit] = []
        # The trainer's first training step, once reported: (wall time, step, store).
        self.first_step: tuple[float, int | None, str | None] | None = None
        self.dir = _private_dir()
        self.address = os.path.join(self.dir, "control.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.address)
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._clients: dict[socket.socket, _Client] = {}
        self._next_id = 0
        self.persister: Persister | None = None  # set by the runner when handoff is possible
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)

    def serve(self, timeout: float) -> int:
        """Handle what is ready, waiting up to ``timeout`` seconds for something to be; returns
        how many sources were ready."""
        events = self._sel.select(max(timeout, 0.0))
        for key, _ in events:
            sock = key.fileobj
            if sock is self._listener:
                self._accept()
            elif sock == self._wake_r:
                self._send_results()
            else:
                assert isinstance(sock, socket.socket)
                self._read(sock)
        return len(events)

    def drain(self) -> None:
        """Read everything clients have already sent (before deciding that nothing is pending)."""
        while self.serve(0):
            pass

    def finished(self, token: tuple[socket.socket, int], reply: dict[str, Any]) -> None:
        """A handed-over save ended (called on the persist thread)."""
        self._results.put((token, reply))
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _send_results(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        while not self._results.empty():
            (sock, ident), reply = self._results.get()
            if reply.get("ok"):
                info = reply["info"]
                self.commits.append(Commit(time.monotonic(), info["path"], info["step"]))
            self._send(sock, encode("saved", id=ident, **reply))

    def announce(self, reason: str, deadline: float | None) -> None:
        """Record the checkpoint request and tell every subscribed client."""
        self.request = {"reason": reason, "deadline": deadline}
        line = encode("checkpoint", **self.request)
        for sock, client in list(self._clients.items()):
            if client.subscribed:
                self._send(sock, line)

    def committed_since(self, t: float) -> Commit | None:
        """The latest commit reported at or after monotonic time ``t``."""
        return next((c for c in reversed(self.commits) if c.at >= t), None)

    def close(self) -> None:
        for sock in list(self._clients):
            self._drop(sock)
        self._sel.close()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if hasattr(socket, "SO_PEERCRED"):
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid != os.getuid():
                sock.close()
                return
        sock.setblocking(False)
        self._next_id += 1
        self._clients[sock] = _Client(self._next_id)
        self._sel.register(sock, selectors.EVENT_READ, None)

    def _read(self, sock: socket.socket) -> None:
        client = self._clients.get(sock)
        if client is None:  # dropped by an earlier event of the same select (a failed send)
            return
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        client.fds += fds
        if not data:
            self._drop(sock)
            return
        try:
            for line in client.reader.feed(data):
                self._send(sock, self._handle(client, sock, decode(line)))
        except ProtocolError as exc:
            self._send(sock, encode("error", message=str(exc)))
            self._drop(sock)

    def _handle(self, client: _Client, sock: socket.socket, msg: dict[str, Any]) -> bytes:
        op = msg["op"]
        if op == "hello":
            client.subscribed = True
            return encode(
                "welcome",
                rank=self.rank,
                world_size=self.world_size,
                agent_pid=os.getpid(),
                request=self.request,
                handoff=self.persister is not None,
            )
        if op == "committed":
            path, step = msg.get("path"), msg.get("step")
            if not isinstance(path, str) or not (step is None or isinstance(step, int)):
                raise ProtocolError(
                    "'committed' needs a string 'path' and an integer or null 'step'"
                )
            self.commits.append(Commit(time.monotonic(), path, step))
            return encode("ack")
        if op == "step":
            at, step, store = msg.get("time"), msg.get("step"), msg.get("store")
            if not (
                isinstance(at, (int, float))
                and not isinstance(at, bool)
                and (step is None or type(step) is int)
                and (store is None or isinstance(store, str))
            ):
                raise ProtocolError(
                    "'step' needs a number 'time', an integer or null 'step' "
                    "and a string or null 'store'"
                )
            if self.first_step is None:
                self.first_step = (float(at), step, store)
            return encode("ack")
        if op in ("pool", "save"):
            return self._handoff(client, sock, msg)
        raise ProtocolError(f"unknown op {op!r}")

    def _handoff(self, client: _Client, sock: socket.socket, msg: dict[str, Any]) -> bytes:
        """``pool``: map the memfd passed with it; ``save``: queue a snapshot's save."""
        ident = msg.get("id") if msg["op"] == "save" else msg.get("pool")
        if type(ident) is not int:
            raise ProtocolError(f"'{msg['op']}' needs an integer id")
        if self.persister is None:
            return encode("refused", id=ident, message="this agent cannot take snapshots")
        try:
            if msg["op"] == "pool":
                if not client.fds or type(msg.get("bytes")) is not int:
                    raise HandoffError("'pool' needs a memfd passed with it and integer 'bytes'")
                self.persister.add_pool(client.id, ident, client.fds.pop(0), msg["bytes"])
                return encode("pool", id=ident)
            self.persister.submit(client.id, (sock, ident), msg)
            return encode("accepted", id=ident)
        except (HandoffError, OSError, ValueError) as exc:
            return encode("refused", id=ident, message=str(exc))

    def _send(self, sock: socket.socket, line: bytes) -> None:
        """Send a short line; a client too slow to take it whole is dropped."""
        if sock not in self._clients:
            return
        try:
            if sock.send(line) == len(line):
                return
        except OSError:
            pass
        self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        client = self._clients.pop(sock, None)
        if client is not None:
            self._sel.unregister(sock)
            for fd in client.fds:
                os.close(fd)
            if self.persister is not None:
                self.persister.forget(client.id)
        with contextlib.suppress(OSError):
            sock.close()
