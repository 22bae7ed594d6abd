"""Reproducible congestion for the loaded half of a run (``ckptguard bench --congestion``).

A competing writer on the same file system, started before and stopped after each loaded trial
(and each loaded limit trial):

- ``dd``: ckptguard's own writer process (loadwriter.py): 4 MiB O_DIRECT writes in a loop through
  a file of ``nbytes``, as ``dd oflag=direct`` does; buffered with fdatasync per block where the
  file system refuses O_DIRECT. Needs nothing installed.
- ``stress``: ``stress-ng --hdd 1 --hdd-opts direct,wr-seq``, where stress-ng is installed.

The writer runs in its own session (a Ctrl-C at the terminal reaches the bench, which stops it)
and is always stopped and its files removed: on return, on an exception, on Ctrl-C; when the
bench itself is killed, the kernel sends the dd writer SIGTERM (PR_SET_PDEATHSIG) and it removes
its file.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import TracebackType
from typing import Any

KINDS = ("none", "dd", "stress")
LOADWRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loadwriter.py")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def describe(kind: str) -> str:
    """The competing writer in words, for the reports."""
    if kind == "stress":
        return "stress-ng --hdd 1 --hdd-opts direct,wr-seq on the same file system"
    return "a dd-like writer process on the same file system (4 MiB O_DIRECT writes in a loop)"


def unavailable(kind: str) -> str | None:
    """Why competing writer ``kind`` cannot run here, or None."""
    if kind not in KINDS:
        return f"unknown congestion {kind!r}; choose from {', '.join(KINDS)}"
    if kind == "stress" and shutil.which("stress-ng") is None:
        return "stress-ng is not installed (--congestion dd needs nothing installed)"
    return None


def command(kind: str, directory: str, nbytes: int) -> list[str]:
    """The writer's command line."""
    if kind == "dd":
        return [sys.executable, LOADWRITER, os.path.join(directory, "load.bin"), str(nbytes)]
    if kind == "stress":
        opts = ["--hdd-bytes", str(nbytes), "--hdd-opts", "direct,wr-seq"]
        return ["stress-ng", "--hdd", "1", *opts, "--temp-path", directory, "--quiet"]
    raise ValueError(f"no competing writer for congestion {kind!r}")


class CompetingWriter:
    """One competing writer, as a context manager: running inside the ``with`` block, stopped
    and its directory removed when the block is left, however it is left. ``result`` then holds
    what the writer reported (bytes, seconds, gbps, direct; for ``stress``, seconds only)."""

    def __init__(self, kind: str, directory: str, nbytes: int) -> None:
        why = unavailable(kind)
        if why or kind == "none":
            raise ValueError(why or "congestion 'none' has no writer")
        self.kind = kind
        self.parent = directory
        self.nbytes = nbytes
        self.proc: subprocess.Popen[str] | None = None
        self.workdir: str | None = None
        self.result: dict[str, Any] = {}
        self._t0 = 0.0

    def __enter__(self) -> CompetingWriter:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the writer and return once it is writing."""
        self.workdir = tempfile.mkdtemp(prefix="congestion-", dir=self.parent)
        try:
            self.proc = subprocess.Popen(
                command(self.kind, self.workdir, self.nbytes),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            self._t0 = time.perf_counter()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        if self.kind == "stress":  # no signal of its own: give it a moment, check it lives
            time.sleep(0.5)
            if proc.poll() is not None:
                raise RuntimeError(f"stress-ng exited at once: {self._stderr(proc)[-500:]!r}")
            return
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
        line = proc.stdout.readline() if ready else ""
        if not line.strip():
            proc.poll()
            raise RuntimeError(
                f"the competing writer did not start within {START_TIMEOUT_S:.0f} s "
                f"(exit {proc.returncode}): {self._stderr(proc)[-500:]!r}"
            )

    @staticmethod
    def _stderr(proc: subprocess.Popen[str]) -> str:
        if proc.poll() is None or proc.stderr is None:
            return ""
        return proc.stderr.read()

    def stop(self) -> dict[str, Any]:
        """Stop the writer (SIGTERM to its session, SIGKILL after STOP_TIMEOUT_S), remove its
        directory, and return what it reported. Safe to call more than once."""
        proc, self.proc = self.proc, None
        try:
            if proc is not None:
                self.result = self._end(proc)
        finally:
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None
        return self.result

    def _end(self, proc: subprocess.Popen[str]) -> dict[str, Any]:
        seconds = time.perf_counter() - self._t0
        with contextlib.suppress(ProcessLookupError):  # the whole session: stress-ng forks
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        result: dict[str, Any] = {"kind": self.kind, "seconds": seconds}
        lines = [ln for ln in (out or "").splitlines() if ln.startswith("{")]
        if self.kind == "dd" and lines:
            result.update(json.loads(lines[-1]))
        clean = (0, -signal.SIGTERM) if self.kind == "dd" else (0, -signal.SIGTERM, 1, 2)
        if proc.returncode not in clean or (self.kind == "dd" and not lines):
            result["error"] = f"exit {proc.returncode}: {(err or '').strip()[-300:]}"
        return result
