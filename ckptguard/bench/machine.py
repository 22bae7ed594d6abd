"""What the run measured on: the machine description, and peak RSS / pinned-memory probes."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import threading
from datetime import datetime, timezone
from importlib import metadata

from .disk import can_drop_global, fs_type


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, rest = line.split(":", 1)
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (other work on the machine skews every figure)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _ckptguard_version() -> str | None:
    try:
        import ckptguard

        return getattr(ckptguard, "__version__", None)
    except Exception:  # the core library does not import: the bench still runs its peers
        return None


def describe_machine(directory: str) -> dict[str, object]:
    """CPU, memory, kernel, the directory's filesystem, library versions, GPU, date (UTC)."""
    import numpy
    import torch

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_bytes": props.total_memory,
            "cuda": torch.version.cuda,
        }
    affinity: int | None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    mem = _meminfo()
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": _cpu_model(),
        "mem_total_bytes": mem.get("MemTotal"),
        "mem_available_bytes": mem.get("MemAvailable"),
        "loadavg": load_average(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "directory": os.path.abspath(directory),
        "filesystem": fs_type(directory),
        "drop_caches_writable": can_drop_global(),
        "python": sys.version.split()[0],
        "versions": {
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "ckptguard": _version("ckptguard") or _ckptguard_version(),
            "safetensors": _version("safetensors"),
            "h5py": _version("h5py"),
            "lz4": _version("lz4"),
        },
        "gpu": gpu,
    }


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc malloc_trim) so RSS deltas mean something."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim(0)


class PeakRSS:
    """Peak resident memory of this process over a region, via VmHWM reset by clear_refs.

    Falls back to sampling VmRSS in a thread where clear_refs is not writable.
    """

    def __init__(self) -> None:
        self.base = 0
        self._thread: threading.Thread | None = None
        self._peak = 0
        self._stop = False

    def __enter__(self) -> PeakRSS:
        trim_heap()
        self.base = _status_kib("VmRSS") or 0
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5\n")
        except OSError:
            self._peak = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        import time

        while not self._stop:
            self._peak = max(self._peak, _status_kib("VmRSS") or 0)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop = True
            self._thread.join()
        else:
            self._peak = _status_kib("VmHWM") or 0

    @property
    def peak(self) -> int:
        """Highest RSS seen in the region (bytes)."""
        return self._peak

    @property
    def extra(self) -> int:
        """Peak minus the RSS at the start of the region (bytes)."""
        return max(0, self._peak - self.base)


def _host_stats() -> dict | None:
    """torch's caching host (pinned) allocator counters, or None without CUDA or counters."""
    import torch

    if not torch.cuda.is_available():
        return None
    stats_fn = getattr(torch.cuda.memory, "host_memory_stats", None)
    return stats_fn() if stats_fn is not None else None


def pinned_bytes() -> int | None:
    """Pinned host memory in use in torch's caching host allocator (None without CUDA).

    In use, not reserved: freed blocks the allocator keeps cached are not counted.
    """
    stats = _host_stats()
    if stats is None:
        return None
    for key in ("allocated_bytes.current", "reserved_bytes.current"):
        if key in stats:
            return int(stats[key])
    for key, value in stats.items():
        if "bytes" in key and key.endswith("current"):
            return int(value)
    return None


def reset_peak_pinned() -> None:
    """Reset torch's pinned-memory peak counters where this torch has them."""
    import torch

    fn = getattr(torch.cuda.memory, "reset_peak_host_memory_stats", None)
    if fn is not None and torch.cuda.is_available():
        fn()


def peak_pinned_bytes() -> int | None:
    """Peak pinned host memory since the last reset (None without CUDA or counters)."""
    stats = _host_stats()
    if stats is None:
        return None
    for key in ("allocated_bytes.peak", "reserved_bytes.peak"):
        if key in stats:
            return int(stats[key])
    return None
