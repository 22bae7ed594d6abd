"""The competing writer of a loaded run, as its own process: ``python loadwriter.py FILE BYTES``.

It writes incompressible 4 MiB blocks to FILE with O_DIRECT (buffered with fdatasync of each
block where the file system refuses O_DIRECT), over and over through its first BYTES, the way
``dd oflag=direct`` in a loop does, until SIGTERM or SIGINT, or until its parent is gone. It
prints one JSON line once the first block is on disk (the load is on) and one when it stops
(bytes written, seconds, GB/s), and removes FILE on the way out.

It imports nothing from ckptguard (it is started by path, so that it starts in milliseconds and
never holds the parent's interpreter lock).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import signal
import sys
import time

BLOCK = 4 << 20
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent dies (a killed bench must not leave a writer)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _open(path: str) -> tuple[int, bool]:
    """(fd, direct): O_DIRECT where the file system allows it, else buffered."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


def run(path: str, nbytes: int) -> dict[str, object]:
    """Write until told to stop; the totals."""
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    _die_with_parent()
    parent = os.getppid()
    span = max(BLOCK, nbytes // BLOCK * BLOCK)
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(BLOCK))
    fd, direct = _open(path)
    written, pos, t0 = 0, 0, time.perf_counter()
    try:
        while not stop and os.getppid() == parent:
            try:
                n = os.pwrite(fd, buf, pos)
            except OSError as exc:
                if direct and exc.errno == errno.EINVAL:  # refused at the first write
                    os.close(fd)
                    fd, direct = os.open(path, os.O_WRONLY), False
                    continue
                raise
            if not direct:
                os.fdatasync(fd)  # reach the disk, as an O_DIRECT writer does
            if written == 0:
                print(json.dumps({"ready": True, "direct": direct}), flush=True)
            written += n
            pos = 0 if pos + n >= span else pos + n
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    dt = time.perf_counter() - t0
    return {
        "bytes": written,
        "seconds": dt,
        "gbps": written / dt / 1e9 if dt else 0.0,
        "direct": direct,
    }


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], int(sys.argv[2]))), flush=True)
