"""Lustre striping of drained data files: one stripe per started GiB, at most 16.

A data file copied to Lustre is created with ``lfs setstripe`` before its bytes are written, so
that a large rank file spreads over several OSTs (docs/operations.md). Anywhere else, or without
``lfs``, files get the directory's default layout.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess

__all__ = ["LUSTRE_SUPER_MAGIC", "lustre_tool", "on_lustre", "set_stripe", "stripe_count"]

log = logging.getLogger(__name__)

LUSTRE_SUPER_MAGIC = 0x0BD00BD0
STRIPE_UNIT = 1 << 30
"""One Lustre stripe per started GiB of a data file ..."""
MAX_STRIPES = 16
"""... capped at 16 stripes."""


def stripe_count(size: int) -> int:
    """The stripe count for a data file of ``size`` bytes: one per started GiB, 1 to 16."""
    return max(1, min(MAX_STRIPES, -(-size // STRIPE_UNIT)))


def _statfs_type(path: str) -> int | None:
    """``f_type`` of statfs(2) for ``path``, or None where it cannot be asked."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).statfs
    except (OSError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(512)  # struct statfs is 120 bytes on 64-bit Linux
    if fn(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF  # f_type is the first member


def on_lustre(path: str, lfs: str) -> bool:
    """Whether ``path`` is on Lustre: the statfs magic, else ``lfs getstripe -d PATH`` works."""
    kind = _statfs_type(path)
    if kind is not None:
        return kind == LUSTRE_SUPER_MAGIC
    try:
        done = subprocess.run(
            [lfs, "getstripe", "-d", path],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def lustre_tool(path: str) -> str | None:
    """The ``lfs`` to stripe files under ``path`` with, or None (no lfs, or not Lustre)."""
    lfs = shutil.which("lfs")
    if lfs is None or not on_lustre(path, lfs):
        return None
    return lfs


def set_stripe(lfs: str, path: str, size: int) -> None:
    """Create ``path`` with a layout for ``size`` bytes; on failure the directory's default."""
    cmd = [lfs, "setstripe", "-c", str(stripe_count(size)), path]
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("%s failed (%s); the directory's default layout is used", " ".join(cmd), e)
        return
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        log.warning("%s failed (%s); the default layout is used", " ".join(cmd), err)
