"""Files on disk: fsync a tree, measure it, and evict it from the page cache (and check that)."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import numpy as np

from ..fsutil import fsync_dir

PAGE = mmap.PAGESIZE
DROP_CACHES = "/proc/sys/vm/drop_caches"


def files_under(path: str) -> list[str]:
    """Every regular file at or under ``path`` (a file or a directory), sorted."""
    if os.path.isfile(path):
        return [path]
    out: list[str] = []
    for root, _dirs, names in os.walk(path):
        out.extend(os.path.join(root, n) for n in names)
    return sorted(p for p in out if os.path.isfile(p) and not os.path.islink(p))


def tree_bytes(paths: list[str]) -> int:
    """Apparent size of every file at or under ``paths``."""
    return sum(os.path.getsize(f) for p in paths if os.path.exists(p) for f in files_under(p))


def fsync_tree(paths: list[str], up_to: str) -> None:
    """fsync every file and directory at or under ``paths``, then their parents up to ``up_to``.

    This is what makes a peer's save durable: torch.save, safetensors and h5py do not fsync.
    """
    dirs: set[str] = set()
    for p in paths:
        if not os.path.exists(p):
            continue
        for f in files_under(p):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(os.path.dirname(f))
        if os.path.isdir(p):
            dirs.update(root for root, _d, _n in os.walk(p))
        d = os.path.dirname(os.path.abspath(p))
        stop = os.path.abspath(up_to)
        while d.startswith(stop):
            dirs.add(d)
            if d == stop:
                break
            d = os.path.dirname(d)
    for d in sorted(dirs, key=len, reverse=True):
        fsync_dir(d)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_sync_file_range = getattr(_libc, "sync_file_range", None)  # Linux only
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 2  # start writeback of the dirty pages in the range, do not wait


def start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Start writeback of ``[offset, offset + nbytes)`` of ``fd`` without waiting for it
    (sync_file_range(SYNC_FILE_RANGE_WRITE)); False where the call is not available here."""
    if _sync_file_range is None:
        return False
    return _sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) == 0


def resident_bytes(path: str) -> int | None:
    """How many bytes of ``path`` are in the page cache (mincore), or None if it cannot tell."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = (size + PAGE - 1) // PAGE
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(addr, size, vec) != 0:
                return None
            return int((np.frombuffer(vec.raw, dtype=np.uint8) & 1).sum()) * PAGE
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_fraction(paths: list[str]) -> float | None:
    """Fraction of the bytes at or under ``paths`` that are cached; None if unknown."""
    total = cached = 0
    for p in paths:
        for f in files_under(p):
            r = resident_bytes(f)
            if r is None:
                return None
            total += os.path.getsize(f)
            cached += min(r, os.path.getsize(f))
    return cached / total if total else 0.0


def fadvise_dontneed(paths: list[str]) -> None:
    """Ask the kernel to drop the (clean) cached pages of every file at or under ``paths``."""
    for p in paths:
        for f in files_under(p):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def can_drop_global() -> bool:
    """True when this process may write /proc/sys/vm/drop_caches (root, writable /proc/sys)."""
    return os.geteuid() == 0 and os.access(DROP_CACHES, os.W_OK)


def drop_global() -> bool:
    """sync, then drop the whole page cache; False if not permitted."""
    try:
        os.sync()
        with open(DROP_CACHES, "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def evict_by_reading(scratch: str, nbytes: int, block: int = 16 << 20) -> None:
    """Push other files out of the cache by reading a file of ``nbytes`` (made once, kept)."""
    path = os.path.join(scratch, ".evict")
    if not os.path.exists(path) or os.path.getsize(path) < nbytes:
        buf = os.urandom(block)
        with open(path, "wb") as f:
            for _ in range((nbytes + block - 1) // block):
                f.write(buf)
    with open(path, "rb", buffering=0) as f:
        chunk = bytearray(block)
        while f.readinto(chunk):
            pass


def make_cold(
    paths: list[str], scratch: str, evict_bytes: int = 0, threshold: float = 0.05
) -> dict[str, object]:
    """Evict ``paths`` from the page cache by the first method that works; say which.

    Order: posix_fadvise(DONTNEED) per file; the global drop_caches (root with writable /proc/sys);
    reading an unrelated file of ``evict_bytes`` (only if > 0). Returns ``{"method", "resident"}``
    where ``resident`` is the fraction still cached afterwards (None if mincore is unavailable) and
    method ``"none"`` means the load below was measured warm.
    """
    fadvise_dontneed(paths)
    resident = resident_fraction(paths)
    if resident is not None and resident <= threshold:
        return {"method": "fadvise", "resident": resident}
    if can_drop_global() and drop_global():
        return {"method": "drop_caches", "resident": resident_fraction(paths)}
    if evict_bytes > 0:
        evict_by_reading(scratch, evict_bytes)
        return {"method": "evict-file", "resident": resident_fraction(paths)}
    return {"method": "fadvise" if resident is None else "none", "resident": resident}


def fs_type(path: str) -> dict[str, str]:
    """Filesystem type, device and mount point of ``path`` from /proc/mounts."""
    real = os.path.realpath(path)
    best = {"fstype": "unknown", "device": "unknown", "mount": "/"}
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                mnt = mnt.replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best["mount"]):
                    best = {"fstype": fstype, "device": dev, "mount": mnt}
    except OSError:
        pass
    return best
