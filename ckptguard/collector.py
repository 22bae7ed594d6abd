"""Python's cyclic garbage collector, paused while a save or a load builds many objects.

A save or load of many small tensors keeps several objects per tensor alive until it returns
(descriptions, manifest entries, index rows, the tensors it fills); each allocation count the
collector reaches starts a pass, and its full passes walk every object of the process, the
caller's tensors included: most of such a call's time, measured. None of these objects form
cycles, so the passes find nothing. The pause covers CPU phases only, never a wait on other ranks.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_pause_lock = threading.Lock()
_pauses = 0  # pauses in progress in this process
_resume = False  # whether the collector was enabled when the first of them began


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Pause the collector for the block. Its state (enabled or not) at the start of the first
    of concurrent pauses (saves, loads, threads) is restored when the last one ends, however it
    ends."""
    global _pauses, _resume
    with _pause_lock:
        if _pauses == 0:
            _resume = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0 and _resume:
                gc.enable()
