"""Validation of every committed checkpoint in a low-priority child process (``run --validate``).

Rank 0's agent starts ``ckptguard validate --by agent PATH`` (docs/operations.md, "Validation
after each commit") for each commit it is told of, one child at a time, at the lowest CPU
priority (nice 19, which also gives it the lowest best-effort I/O priority), so that the re-read
competes as little as possible with training. The children's own lines go to the agent's stderr;
a child that exits nonzero is a failed validation, logged, and counted in ``failed``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from .protocol import EXIT_VALIDATION_FAILED

NICE = 19


def validate_command(path: str) -> list[str]:
    """The child's command line for checkpoint ``path``."""
    return [sys.executable, "-m", "ckptguard.cli", "validate", "--by", "agent", path]


class Validator:
    """Validates each committed checkpoint in turn, in a child process, on a thread of its own."""

    def __init__(self, command: Sequence[str] | None = None) -> None:
        self._command = list(command) if command is not None else None  # tests: a stand-in
        self.seen: set[str] = set()
        self.passed: list[str] = []
        self.failed: list[str] = []
        self._todo: collections.deque[str] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._child: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._loop, name="ckptguard-validate", daemon=True)
        self._thread.start()

    def committed(self, path: str) -> None:
        """A checkpoint committed at ``path``: validate it (once)."""
        if path in self.seen:
            return
        self.seen.add(path)
        with self._cond:
            self._todo.append(path)
            self._cond.notify_all()

    def close(self, timeout: float) -> None:
        """Wait for the validations due, for at most ``timeout`` seconds; then stop the one
        still running (logged as not validated, not as failed)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            while (self._todo or self._child is not None) and time.monotonic() < deadline:
                self._cond.wait(min(1.0, max(deadline - time.monotonic(), 0.01)))
            left = list(self._todo)
            self._todo.clear()
            child, self._child = self._child, None  # its end is not a result: logged below
        if child is not None:
            with contextlib.suppress(OSError):
                child.kill()
            left.insert(0, str(child.args[-1]))  # type: ignore[index]
        self._thread.join(5.0)
        for path in left:
            _log(f"validation of {path} not finished within {timeout:.0f} s: not validated")

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._todo and not self._stop:
                    self._cond.wait()
                if not self._todo:
                    return
                path = self._todo.popleft()
                try:
                    self._child = self._start(path)
                except OSError as e:
                    self.failed.append(path)
                    _log(f"validation of {path} could not start: {e}")
                    continue
                child = self._child
            code = child.wait()
            with self._cond:
                if self._child is child:
                    self._child = None
                    self._done(path, code)
                self._cond.notify_all()

    def _start(self, path: str) -> subprocess.Popen[bytes]:
        cmd = [*self._command, path] if self._command is not None else validate_command(path)
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        with contextlib.suppress(OSError):  # the child starts at the agent's priority at worst
            os.setpriority(os.PRIO_PROCESS, child.pid, NICE)
        return child

    def _done(self, path: str, code: int) -> None:
        if code == 0:
            self.passed.append(path)
        elif code < 0:  # killed: by close, or by someone else; nothing is known of the bytes
            _log(f"validation of {path} was stopped (signal {-code}): not validated")
        else:
            self.failed.append(path)
            what = "failed" if code == 1 else f"could not be done (exit {code})"
            _log(f"validation of {path} {what}")


def with_validation(validator: Validator | None, status: int, trainer_failed: bool) -> int:
    """The agent's exit status: ``status``, or EXIT_VALIDATION_FAILED where a validation failed
    and the trainer itself did not (its own failure says more, and comes first)."""
    if validator is None or not validator.failed or trainer_failed:
        return status
    _log(
        f"{len(validator.failed)} checkpoint(s) failed validation ({', '.join(validator.failed)}); "
        f"exiting {EXIT_VALIDATION_FAILED} instead of {status}"
    )
    return EXIT_VALIDATION_FAILED


def _log(message: str) -> None:
    print(f"ckptguard run [rank 0]: {message}", file=sys.stderr, flush=True)
