"""Named failure points for crash and fault-injection tests.

``CKPTGUARD_FAILPOINT=<point>[:<rank>[:<action>]][,...]`` makes the process fail when it reaches
``<point>``: ``kill`` (SIGKILL itself, the default), ``eio`` / ``enospc`` (raise that OSError),
``hang`` (sleep until killed), ``sleep<N>`` (sleep N seconds, then go on: a slow step).
``<rank>`` is a rank number or ``*``. Unset, each call is one dict lookup. A point that fires says
so on stderr first (``ckptguard: failpoint <point> on rank <r>: <action>``), so that a test can
tell a hang it caused from a stuck process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time

ENV = "CKPTGUARD_FAILPOINT"
_rank = 0


def set_rank(rank: int) -> None:
    """Tell failpoints which rank this process is (the coordinator calls this)."""
    global _rank
    _rank = rank


def failpoint(point: str) -> None:
    """Fail here if the environment asks for it."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for entry in spec.split(","):
        parts = entry.strip().split(":")
        if parts[0] != point:
            continue
        rank = parts[1] if len(parts) > 1 and parts[1] else "*"
        if rank != "*" and int(rank) != _rank:
            continue
        action = parts[2] if len(parts) > 2 else "kill"
        _act(point, action)


def _act(point: str, action: str) -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):  # stderr closed or None
        sys.stderr.write(f"ckptguard: failpoint {point} on rank {_rank}: {action}\n")
        sys.stderr.flush()
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "eio":
        raise OSError(errno.EIO, f"injected EIO at failpoint {point}")
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"injected ENOSPC at failpoint {point}")
    elif action == "hang":
        while True:
            time.sleep(3600)
    elif action.startswith("sleep") and action[5:].replace(".", "", 1).isdigit():
        time.sleep(float(action[5:]))
    else:
        raise ValueError(f"{ENV}: unknown action {action!r} for point {point!r}")
