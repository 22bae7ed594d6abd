"""The trainer process: started in its own process group, stopped with SIGTERM then SIGKILL.

The child starts with SIGUSR1 ignored (Slurm may signal every process of the step; the request is
the agent's business) and with SIGKILL as its parent-death signal, so a trainer never outlives its
agent. Its stdin, stdout and stderr are the agent's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence

_PR_SET_PDEATHSIG = 1


def exit_status(returncode: int) -> int:
    """A shell's view of a return code: 128 + N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _prepare(parent: int) -> None:  # runs in the child between fork and exec
    os.setpgid(0, 0)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the agent died before the death signal was armed
        os._exit(137)


class Child:
    """The trainer. ``status`` is its shell exit status once it ended (127/126 if it never ran)."""

    def __init__(self, cmd: Sequence[str], env: Mapping[str, str]) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.status: int | None = None
        self.error: str | None = None
        self.stopping_since: float | None = None  # monotonic time of the agent's SIGTERM
        self.killed = False
        parent = os.getpid()
        try:
            self.proc = subprocess.Popen(
                list(cmd), env=dict(env), preexec_fn=lambda: _prepare(parent)
            )
        except FileNotFoundError as exc:
            self.status, self.error = 127, f"command not found: {exc.filename or cmd[0]}"
        except PermissionError as exc:
            self.status, self.error = 126, f"cannot execute {exc.filename or cmd[0]}: {exc}"
        except (OSError, ValueError) as exc:
            self.status, self.error = 126, f"cannot start {cmd[0]}: {exc}"

    @property
    def alive(self) -> bool:
        return self.poll() is None

    def poll(self) -> int | None:
        if self.status is None and self.proc is not None:
            code = self.proc.poll()
            if code is not None:
                self.status = exit_status(code)
        return self.status

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the trainer's process group (its own children too)."""
        if self.proc is not None and self.status is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def stop(self, term_timeout: float) -> None:
        """SIGTERM now (once); SIGKILL when ``term_timeout`` has passed. Call on every tick."""
        if not self.alive:
            return
        now = time.monotonic()
        if self.stopping_since is None:
            self.stopping_since = now
            self.signal(signal.SIGTERM)
        elif not self.killed and now - self.stopping_since >= term_timeout:
            self.killed = True
            self.signal(signal.SIGKILL)

    @property
    def stopped_by_agent(self) -> bool:
        return self.stopping_since is not None
