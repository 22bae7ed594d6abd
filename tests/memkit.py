"""Allocation bounds for tests: what a call allocated at its peak, so that "refused before
anything is allocated" is asserted as bytes rather than as wall-clock time."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable


def peak_allocation(fn: Callable[[], object]) -> int:
    """Bytes allocated at the peak of ``fn()`` beyond what was live before it (tracemalloc: Python
    objects, numpy buffers, and the bytes objects the extension returns)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        if started:
            tracemalloc.stop()
