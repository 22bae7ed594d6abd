"""The commit protocol (docs/format.md section 2): staging, index, manifest, rename, LATEST."""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import os
import shutil
import uuid as uuidlib

import pyarrow as pa
import xxhash

from .errors import CheckpointExistsError, StoreError
from .failpoints import failpoint
from .format import index, manifest
from .format.layout import INDEX, LATEST, MANIFEST, STAGING
from .fsutil import fsync_dir, write_file_durably, write_new_file

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
    with open(path, "rb") as f:  # verify what we wrote before it is referenced
        if f.read() != data:
            raise StoreError(f"{path} reads back differently from what was written", path)
    return {"file": INDEX, "size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}


def commit(store: str, name: str, staging: str, body: dict, overwrite: bool) -> str:
    """Make a fully written staging directory visible as ``<store>/<name>``; move LATEST.

    ``body`` is the manifest body without ``created``; it is filled in here.
    """
    body["created"] = manifest.format_time(dt.datetime.now(dt.timezone.utc))
    data = manifest.encode(body)
    manifest.decode(data)  # never commit a manifest we could not read back
    write_file_durably(os.path.join(staging, MANIFEST), data)
    failpoint("commit.manifest_written")
    fsync_dir(staging)
    failpoint("commit.before_rename")
    final = os.path.join(store, name)
    replaced = _rename_into_place(staging, final, overwrite)
    fsync_dir(store)
    failpoint("commit.after_rename")
    write_latest(store, name)
    failpoint("commit.after_latest")
    if replaced:
        failpoint("overwrite.before_remove_old")
        remove_tree(staging)  # the old checkpoint now lives at the staging path
    return final


def _rename_into_place(staging: str, final: str, overwrite: bool) -> bool:
    """Rename; with overwrite, atomically exchange with the existing one. True if exchanged."""
    try:
        os.rename(staging, final)
        return False
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not overwrite:
            raise CheckpointExistsError(
                f"checkpoint {final} already exists (pass overwrite=True to replace it)"
            ) from None
    if _exchange(staging, final):
        return True
    # No renameat2 here: a short window where the name is absent (LATEST then names nothing).
    old = staging + ".old"
    os.rename(final, old)
    os.rename(staging, final)
    os.rename(old, staging)
    return True


def _exchange(a: str, b: str) -> bool:
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
