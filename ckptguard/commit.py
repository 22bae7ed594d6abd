"""The commit protocol (docs/format.md section 2): staging, index, manifest, rename, LATEST."""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import os
import shutil
import time
import uuid as uuidlib

import pyarrow as pa
import xxhash

from .errors import CheckpointExistsError, CoordinationTimeoutError, StoreError, brief
from .failpoints import failpoint
from .format import index, manifest
from .format.layout import INDEX, LATEST, MANIFEST, STAGING
from .fsutil import (
    UnsafeFileError,
    fsync_dir,
    read_regular,
    write_file_durably,
    write_new_file,
)

OLD_SUFFIX = ".old"  # the replaced checkpoint during an overwrite without renameat2
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def new_staging(store: str, name: str) -> tuple[str, str]:
    """Create ``<store>/.staging/<name>.<uuid>/``; return (uuid hex, its path)."""
    uid = uuidlib.uuid4().hex
    staging_root = os.path.join(store, STAGING)
    os.makedirs(staging_root, exist_ok=True)
    path = os.path.join(staging_root, f"{name}.{uid}")
    os.mkdir(path, 0o755)
    return uid, path


def write_index(staging: str, table: pa.Table) -> dict:
    """Write index.parquet durably; return the manifest's ``index`` member."""
    data = index.write_table(table)
    path = os.path.join(staging, INDEX)
    write_new_file(path, data)
    try:  # verify what we wrote before it is referenced
        back = read_regular(path, size=len(data))
    except UnsafeFileError as e:
        raise StoreError(f"{path} {e.reason} after it was written", path) from None
    if back != data:
        raise StoreError(f"{path} reads back differently from what was written", path)
    return {"file": INDEX, "size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}


def commit(
    store: str, name: str, staging: str, body: dict, overwrite: bool, deadline: float | None = None
) -> tuple[str, list[str]]:
    """Make a fully written staging directory visible as ``<store>/<name>``; move LATEST.

    ``body`` is the manifest body without ``created``; it is filled in here. Returns the final
    path and what failed after the rename (the commit point), which cannot undo the commit:
    LATEST is only moved once the rename is durable (I3), and a replaced checkpoint's files left
    behind are staging garbage for ``gc``. Past ``deadline`` (wall clock), the rename is not
    made: other ranks may have stopped waiting for the outcome (I8), so the save aborts.
    """
    body["created"] = manifest.format_time(dt.datetime.now(dt.timezone.utc))
    data = manifest.encode(body)
    manifest.decode(data)  # never commit a manifest we could not read back
    write_file_durably(os.path.join(staging, MANIFEST), data)
    failpoint("commit.manifest_written")
    fsync_dir(staging)
    failpoint("commit.before_rename")
    if deadline is not None and time.time() > deadline:
        raise CoordinationTimeoutError(
            f"the commit came {time.time() - deadline:.1f} s after the other ranks' deadline to "
            "learn its outcome (the save's timeout): not committed, so that every rank reports "
            "the same outcome"
        )
    final = os.path.join(store, name)
    replaced = _rename_into_place(staging, final, overwrite)
    problems: list[str] = []
    try:
        fsync_dir(store)
        failpoint("commit.after_rename")
    except OSError as e:
        problems.append(
            f"{final} is committed, but fsync of {store} failed ({brief(e)}): the rename may not "
            "survive a crash of the file system, so LATEST was not moved"
        )
    if not problems:
        try:
            write_latest(store, name)
            failpoint("commit.after_latest")
        except OSError as e:
            problems.append(f"{final} is committed, but LATEST was not moved to it ({brief(e)})")
    if replaced is not None:
        try:
            failpoint("overwrite.before_remove_old")
            remove_tree(replaced)
        except OSError as e:
            problems.append(
                f"the replaced checkpoint's files remain at {replaced} ({brief(e)}); gc removes "
                "them"
            )
    return final, problems


def _rename_into_place(staging: str, final: str, overwrite: bool) -> str | None:
    """Rename; with overwrite, replace the existing one. Returns where the replaced checkpoint
    now lives (to be removed), or None if there was none."""
    try:
        os.rename(staging, final)
        return None
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not overwrite:
            raise CheckpointExistsError(
                f"checkpoint {final} already exists (pass overwrite=True to replace it)"
            ) from None
    if _exchange(staging, final):
        return staging
    # No renameat2 (e.g. some parallel file systems): two renames. Between them the name is
    # absent; a crash there leaves <staging>.old beside the whole new <staging>, and Store.gc
    # rolls the overwrite forward (format.md section 2). An error there puts the old one back.
    old = staging + OLD_SUFFIX
    os.rename(final, old)
    try:
        failpoint("overwrite.fallback_old_moved")
        os.rename(staging, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(old, final)
        raise
    return old


def _exchange(a: str, b: str) -> bool:
    if os.environ.get("CKPTGUARD_RENAME_EXCHANGE") == "0":  # the fallback, on any file system
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def write_latest(store: str, name: str | None) -> None:
    """Point LATEST at ``name`` (or remove it when None), durably."""
    path = os.path.join(store, LATEST)
    if name is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
    else:
        tmp = os.path.join(store, f".LATEST.{uuidlib.uuid4().hex}.tmp")
        write_new_file(tmp, (name + "\n").encode())
        failpoint("commit.latest_tmp_written")
        os.rename(tmp, path)
    fsync_dir(store)


def remove_tree(path: str) -> None:
    """Remove a directory tree (never following symlinks), ignoring a missing path."""
    shutil.rmtree(path, ignore_errors=False, onerror=_ignore_missing)


def _ignore_missing(func, path, exc_info) -> None:  # noqa: ANN001
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]
