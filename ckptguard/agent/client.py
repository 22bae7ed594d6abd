"""The trainer's side of ``ckptguard run``: is a checkpoint requested? tell the agent of a commit.

Everything here is safe without an agent (``CKPTGUARD_AGENT`` unset): ``checkpoint_requested``
returns False, ``notify_committed`` returns False and a registered callback never fires.
Importing this module registers a commit hook (``ckptguard.hooks``) that calls
``notify_committed`` after each save this process commits. With an
agent, the first call connects to its control socket (docs/agent.md) and a daemon thread listens;
``checkpoint_requested`` then only reads a flag, cheap enough for every training step.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import events, measure
from ..format.manifest import CheckpointInfo
from ..hooks import add_commit_hook
from .protocol import ENV_ADDRESS, LineReader, ProtocolError, decode, encode

CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class CheckpointRequest:
    """What the agents agreed on: why, and by when (unix seconds) the commit must be reported."""

    reason: str
    deadline: float | None


Callback = Callable[[CheckpointRequest], None]


def agent_address() -> str | None:
    """The agent's control socket, or None when this process does not run under an agent."""
    return os.environ.get(ENV_ADDRESS) or None


def _request(msg: dict[str, Any] | None) -> CheckpointRequest | None:
    if not isinstance(msg, dict):
        return None
    deadline = msg.get("deadline")
    return CheckpointRequest(
        str(msg.get("reason", "")), None if deadline is None else float(deadline)
    )


def _roundtrip(
    sock: socket.socket, message: bytes, reader: LineReader
) -> tuple[dict[str, Any], list[bytes]]:
    """Send one message; the first reply, and any lines that came with it."""
    sock.sendall(message)
    while True:
        data = sock.recv(65536)
        if not data:
            raise ProtocolError("the agent closed the connection")
        lines = reader.feed(data)
        if lines:
            reply = decode(lines[0])
            if reply["op"] == "error":
                raise ProtocolError(f"the agent refused: {reply.get('message')}")
            return reply, lines[1:]


class _Subscription:
    """One connection to the agent; a daemon thread records the request and runs callbacks."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.pid = os.getpid()
        self.flag = threading.Event()
        self.request: CheckpointRequest | None = None
        self.callbacks: list[Callback] = []
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(CONNECT_TIMEOUT)
            self.sock.connect(address)
            reader = LineReader()
            welcome, more = _roundtrip(self.sock, encode("hello", pid=self.pid), reader)
            if welcome["op"] != "welcome":
                raise ProtocolError(f"expected 'welcome', got {welcome['op']!r}")
            self._record(_request(welcome.get("request")))
            self._handle(more)
            self.sock.settimeout(None)
        except BaseException:
            self.sock.close()
            raise
        threading.Thread(
            target=self._listen, args=(reader,), name="ckptguard-agent-client", daemon=True
        ).start()

    def _listen(self, reader: LineReader) -> None:
        try:
            while data := self.sock.recv(65536):
                self._handle(reader.feed(data))
        except (OSError, ProtocolError):
            pass  # the agent went away: the flag keeps its last value
        finally:
            self.sock.close()

    def _handle(self, lines: list[bytes]) -> None:
        for line in lines:
            msg = decode(line)
            if msg["op"] == "checkpoint":
                self._record(_request(msg))

    def _record(self, request: CheckpointRequest | None) -> None:
        if request is None:
            return
        with self.lock:
            if self.request is not None:
                return
            self.request = request
            callbacks = list(self.callbacks)
        for callback in callbacks:  # before the flag: a trainer that sees it sees their effects
            _call(callback, request)
        self.flag.set()

    def add(self, callback: Callback) -> None:
        with self.lock:
            request = self.request
            if request is None:
                self.callbacks.append(callback)
        if request is not None:
            _call(callback, request)


def _call(callback: Callback, request: CheckpointRequest) -> None:
    try:
        callback(request)
    except Exception:
        traceback.print_exc()


_lock = threading.Lock()
_sub: _Subscription | None = None
_unreachable: tuple[int, str] | None = None  # (pid, address) already warned about


def _subscription() -> _Subscription | None:
    global _sub, _unreachable
    address = agent_address()
    if address is None:
        return None
    sub = _sub
    if sub is not None and sub.pid == os.getpid() and sub.address == address:
        return sub
    with _lock:
        if _sub is not None and _sub.pid == os.getpid() and _sub.address == address:
            return _sub
        if _unreachable == (os.getpid(), address):
            return None
        try:
            _sub = _Subscription(address)
        except (OSError, ProtocolError) as exc:
            _unreachable = (os.getpid(), address)
            warnings.warn(
                f"ckptguard: cannot reach the agent at {address} ({exc}); "
                "checkpoint requests will not be seen",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        return _sub


def checkpoint_requested() -> bool:
    """True once the agents asked for a checkpoint (preemption, signal or time limit).

    Non-blocking; False without an agent. Ranks may see it turn True at different steps: before a
    collective save, agree on it (e.g. an all_reduce with MAX of this flag).
    """
    sub = _subscription()
    return sub is not None and sub.flag.is_set()


def checkpoint_request() -> CheckpointRequest | None:
    """The request (reason and deadline) once there is one, else None."""
    sub = _subscription()
    return None if sub is None else sub.request


def on_checkpoint_request(callback: Callback) -> None:
    """Call ``callback(request)`` once, when a checkpoint is requested.

    It runs on the client's listener thread (or at once, in the caller's, if the request came
    already), before ``checkpoint_requested`` turns True: keep it short and thread-safe, e.g. set
    a flag. Never called without an agent.
    """
    sub = _subscription()
    if sub is not None:
        sub.add(callback)


def notify_committed(path: str | os.PathLike[str], step: int | None = None) -> bool:
    """Tell the agent that a checkpoint committed at ``path``; True if the agent took it.

    A no-op returning False without an agent. Never raises: a failure to reach the agent is a
    ``RuntimeWarning``. Call it after the commit (on every rank, after a collective save).
    """
    address = agent_address()
    if address is None:
        return False
    where = os.fsdecode(os.path.abspath(os.fspath(path)))
    step = None if step is None else int(step)
    message = encode("committed", path=where, step=step)
    return _tell(address, message, f"the commit of {where}")


def _tell(address: str, message: bytes, what: str) -> bool:
    """Send one message to the agent and expect its ``ack``; a failure is a RuntimeWarning
    (naming ``what`` the agent did not take) and False, never an exception."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(address)
            reply, _ = _roundtrip(sock, message, LineReader())
        if reply["op"] != "ack":
            raise ProtocolError(f"expected 'ack', got {reply['op']!r}")
    except (OSError, ProtocolError) as exc:
        warnings.warn(
            f"ckptguard: the agent at {address} did not take {what}: {exc}",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


_stepped = threading.Event()


def training_step(step: int | None = None, store: str | os.PathLike[str] | None = None) -> None:
    """Mark that training is under way (call it every step; only the first call does anything).

    The first call of the process records the job's ``first_step`` event: the end of a recovery
    after a restart, from which the store's MTTR is computed (docs/operations.md). Under
    ``ckptguard run`` it tells the agent, which records it in the store (``store`` names it if
    the agent does not know it yet); without an agent, rank 0 records it in ``store`` itself
    (none given: nothing is recorded). Never raises: a failure is a ``RuntimeWarning``."""
    if _stepped.is_set():
        return
    _stepped.set()
    at = time.time()
    measure.flush()  # the resume's load, before the step that ends the recovery
    where = None if store is None else os.path.abspath(os.fspath(store))
    step = None if step is None else int(step)
    address = agent_address()
    if address is None:
        if where is not None and events.env_rank() == 0:
            problem = events.record(where, "first_step", rank=0, step=step, at=at)
            if problem is not None:
                warnings.warn(f"ckptguard: {problem}", RuntimeWarning, stacklevel=2)
        return
    _tell(address, encode("step", time=at, step=step, store=where), "the first step")


def notify_agent_of_commit(info: CheckpointInfo) -> None:
    """The commit hook: ``notify_committed`` for a checkpoint this process committed."""
    notify_committed(info.path, info.step)


def register_commit_hook() -> None:
    """Tell the agent of every save this process commits (``hooks``); idempotent. Done when
    this module is imported: any process that saves through ``ckptguard.save`` imports it."""
    add_commit_hook(notify_agent_of_commit)


register_commit_hook()
