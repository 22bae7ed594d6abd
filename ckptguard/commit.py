"""The commit protocol (docs/format.md section 2): staging, index, manifest, rename, LATEST.

``publish`` is the one commit tail, for a save and a drain alike: the rename into place (with
the atomic exchange, or the intent-record fallback, of an overwrite), the fsync that makes it
durable, LATEST, and the removal of a replaced checkpoint. ``read_info`` is the one reader of a
committed checkpoint's manifest for the store, the save's target check and drain.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import stat
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import pyarrow as pa

from . import audit, holds, sign
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CoordinationTimeoutError,
    CorruptCheckpointError,
    NotACheckpointError,
    StoreError,
    brief,
)
from .failpoints import failpoint
from .format import container, index, manifest
from .format.datafile import FormatError
from .format.layout import INDEX, LATEST, MANIFEST, STAGING
from .format.manifest import CheckpointInfo
from .fsutil import (
    UnsafeFileError,
    fsync_dir,
    group_shared,
    makedirs_durably,
    read_manifest,
    read_member,
    read_regular,
    write_file_durably,
    write_new_file,
)
from .io import pread_exact, pwrite_all
from .keys import PrivateKey
from .onefile import OneFile
from .readonly import remove_tree, seal_dir, seal_files, seal_own, unseal

LATEST_TMP_PREFIX, LATEST_TMP_SUFFIX = ".LATEST.", ".tmp"  # LATEST's temporary: gc removes it
OLD_SUFFIX = ".old"  # the replaced checkpoint during an overwrite without renameat2
INTENT_SUFFIX = ".overwrite"  # that overwrite's intent record, beside its staging directory
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def read_info(path: str) -> CheckpointInfo:
    """The CheckpointInfo of a checkpoint directory, from its manifest (checked, not its data)."""
    try:
        body = read_manifest(path)[1]
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no committed checkpoint at {path}") from None
    try:
        return CheckpointInfo.from_manifest(body, path)
    except FormatError as e:
        raise CorruptCheckpointError(str(e), path=path, file=MANIFEST) from None


def staging_area(store: str) -> str:
    """Create the store and its ``.staging`` where missing; return the ``.staging`` path.

    Every directory created has its parent fsynced (a first save into a new store survives a
    crash) and is never world-writable, whatever the umask. ``.staging`` is private to its owner
    (0o700): nobody else can plant a FIFO, a link or an intent record in it. In a shared store
    (its directory group-writable) it is 0o770 instead, so that the group can save and gc.
    """
    makedirs_durably(store, 0o755)
    root = os.path.join(store, STAGING)
    mode = 0o770 if group_shared(store) else 0o700
    try:
        os.mkdir(root, mode)
    except FileExistsError:
        return root
    os.chmod(root, mode)  # exactly this mode: the umask may have taken the group's bits
    fsync_dir(store)
    return root


def new_staging(store: str, name: str) -> tuple[str, str]:
    """Create ``<store>/.staging/<name>.<uuid>/``; return (uuid hex, its path)."""
    uid = uuidlib.uuid4().hex
    path = os.path.join(staging_area(store), f"{name}.{uid}")
    os.mkdir(path, 0o775 if group_shared(store) else 0o755)
    return uid, path


def discard_staging(staging: str) -> None:
    """Remove the staging directory of a save that did not commit, unless an overwrite intent names
    it, or it holds another checkpoint (an overwrite that could not exchange back a checkpoint held
    meanwhile): then it may hold the only whole copy of a checkpoint, and gc resolves it."""
    if not os.path.lexists(staging + INTENT_SUFFIX) and not holds.holds_another(staging):
        remove_tree(staging)


def check_target(final: str, overwrite: bool, deep: bool = True) -> None:
    """Refuse a save onto ``final`` unless nothing is there (or an empty directory, which the
    rename replaces), or a committed checkpoint that ``overwrite`` replaces (a held one is a
    ``CheckpointHeldError``). Anything else (a directory without a valid manifest, a file, a
    link) is a ``NotACheckpointError`` naming it; nothing is changed. ``deep=False`` (at the
    rename, where time counts) only asks for a directory holding a regular MANIFEST.json
    instead of decoding it."""
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        try:
            if deep:
                read_info(final)
            elif not stat.S_ISREG(os.lstat(os.path.join(final, MANIFEST)).st_mode):
                raise CorruptCheckpointError("MANIFEST.json is not a file", path=final)
        except (CheckpointNotFoundError, CorruptCheckpointError, FileNotFoundError) as e:
            with os.scandir(final) as it:
                if next(it, None) is None:
                    return
            raise NotACheckpointError(
                f"{final} is a directory but not a committed checkpoint ({brief(e)}): a save "
                "never replaces it, even with overwrite=True",
                final,
            ) from None
        if not overwrite:
            raise CheckpointExistsError(
                f"checkpoint {final} already exists (pass overwrite=True to replace it)"
            )
        holds.check(os.path.dirname(final), os.path.basename(final), "overwritten")
        return
    kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
    raise NotACheckpointError(
        f"{final} is {kind}, not a checkpoint: a save never replaces it, even with overwrite=True",
        final,
    )


def write_index(staging: str, table: pa.Table) -> dict:
    """Write index.parquet durably; return the manifest's ``index`` member (with its SHA-256
    where the index has chunk digests: the manifest then binds every digest)."""
    data = index.write_table(table)
    path = os.path.join(staging, INDEX)
    write_new_file(path, data)
    try:  # verify what we wrote before it is referenced
        back = read_regular(path, size=len(data))
    except UnsafeFileError as e:
        raise StoreError(f"{path} {e.reason} after it was written", path) from None
    if back != data:
        raise StoreError(f"{path} reads back differently from what was written", path)
    return index.member(data, index.has_digests(table))


@dataclass(frozen=True)
class Flavour:
    """What differs between publishing a save and a drain; the tail itself is one code path.

    ``staged``: MANIFEST.json is already in the staging directory (a drain copies it byte for
    byte and verifies the copy before publishing); otherwise the manifest is written here.
    ``move_latest(store, info)``: how LATEST follows the new checkpoint (a save's is the newest,
    a drain's may be older than what LATEST names). ``after_rename``: the flavour's failpoint
    once the rename is durable (each scenario has its own in tests/fault_cases.txt).
    """

    staged: bool
    move_latest: Callable[[str, CheckpointInfo], None]
    after_rename: Callable[[], None]
    sealed_by_writers: bool  # the writers made the data files 0444: seal only the own files


def _latest_always(store: str, info: CheckpointInfo) -> None:
    write_latest(store, info.name)
    failpoint("commit.after_latest")


SAVE = Flavour(
    staged=False,
    move_latest=_latest_always,
    after_rename=lambda: failpoint("commit.after_rename"),
    sealed_by_writers=True,
)
"""A save: its manifest is written here, LATEST always moves to it."""


def publish(
    store: str,
    name: str,
    staging: str,
    body: dict,
    *,
    overwrite: bool,
    deadline: float | None = None,
    flavour: Flavour = SAVE,
    audit_detail: dict | None = None,
    signer: PrivateKey | None = None,
) -> CheckpointInfo:
    """Make a fully written staging directory visible as ``<store>/<name>``; move LATEST.

    ``body`` is the whole manifest body (``format.manifest.build``). Unless ``flavour.staged``, it
    is written last, durably, as MANIFEST.json. Past ``deadline`` (wall clock)
    the rename is not made: other ranks may have stopped waiting for the outcome (I8). An error
    raised here leaves nothing visible. Returns the checkpoint's info with ``warnings``: what
    failed after the rename (the commit point), which cannot undo the commit. LATEST is only
    moved once the rename is durable (I3); a replaced checkpoint's files left behind are staging
    garbage for ``gc``. A store with an audit log gets its ``commit`` entry last (with
    ``audit_detail``): a failure there is one of the ``warnings`` (docs/audit.md section 6).
    ``signer``: SIGNATURE.json is written beside the manifest, before the rename (``sign``).
    """
    if not flavour.staged:
        write_manifest(staging, body, signer)
    check_deadline(deadline)
    final = os.path.join(store, name)
    info = CheckpointInfo.from_manifest(body, final)
    seal_own(staging, signer is not None) if flavour.sealed_by_writers else seal_files(staging)
    replaced = _rename_into_place(staging, final, overwrite)
    late: list[str] = []
    durable = False
    try:
        fsync_dir(store)
        durable = True
        flavour.after_rename()
    except OSError as e:
        late.append(
            f"{final} is committed, but fsync of {store} failed ({brief(e)}): the rename may not "
            "survive a crash of the file system, so LATEST was not moved"
        )
    try:
        seal_dir(final)
    except OSError as e:
        late.append(f"{final} is committed, but its directory is not read-only ({brief(e)})")
    if not late:
        try:
            flavour.move_latest(store, info)
        except (OSError, CheckpointError) as e:
            late.append(f"{final} is committed, but LATEST was not moved to it ({brief(e)})")
    if replaced is not None:
        late += remove_replaced(replaced, durable)
    if audit.enabled(store):
        detail = {**(audit_detail or {}), "overwrite": replaced is not None}
        late += audit_commit(store, info, detail, rank=None if flavour.staged else 0)
    return replace(info, warnings=tuple(late))


def manifest_sha256(checkpoint: str) -> str:
    """SHA-256 (hex) of the MANIFEST.json bytes of ``checkpoint`` (a directory, or a one-file
    checkpoint's manifest member), read safely: what an audit entry names a checkpoint's
    content by."""
    if not os.path.isdir(checkpoint):
        with OneFile.open(checkpoint) as one:
            return hashlib.sha256(one.read(one.toc.manifest)).hexdigest()
    raw = read_member(checkpoint, MANIFEST, max_size=manifest.MAX_MANIFEST_BYTES)
    return hashlib.sha256(raw).hexdigest()


def audit_commit(store: str, info: CheckpointInfo, detail: dict, rank: int | None) -> list[str]:
    """The ``commit`` entry of ``info`` in ``store``'s audit log (``rank``: the committing
    rank, the coordinator's 0 for a save); what failed, as warnings."""
    try:
        digest = manifest_sha256(info.path)
    except (OSError, CheckpointError) as e:
        return [f"the audit log of {store} has no entry for the commit of {info.name}: {brief(e)}"]
    return audit.note(
        store,
        "commit",
        checkpoint=info.name,
        uuid=info.uuid,
        manifest_sha256=digest,
        detail=detail,
        rank=rank,
    )


def write_manifest(staging: str, body: dict, signer: PrivateKey | None) -> None:
    """Write MANIFEST.json (``body``, whole: ``manifest.build``'s) durably, and its signature
    with ``signer``, and make the staging directory durable."""
    data = manifest.encode(body)
    manifest.decode(data)  # never commit a manifest we could not read back
    write_file_durably(os.path.join(staging, MANIFEST), data)
    failpoint("commit.manifest_written")
    if signer is not None:
        sign.write_signature(staging, signer, data, body)
    fsync_dir(staging)
    failpoint("commit.before_rename")


def check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.time() > deadline:
        raise CoordinationTimeoutError(
            f"the commit came {time.time() - deadline:.1f} s after the other ranks' deadline to "
            "learn its outcome (the save's timeout): not committed, so that every rank reports "
            "the same outcome"
        )


def remove_replaced(replaced: str, durable: bool = True) -> list[str]:
    """Remove the checkpoint an overwrite replaced, once the new one's rename is ``durable``;
    return what failed (the commit stands). The fallback's intent record goes first, so that gc
    never takes the replaced one for an overwrite stopped between its renames."""
    if not durable:
        return [f"the replaced checkpoint's files remain at {replaced}; gc removes them"]
    try:
        if replaced.endswith(OLD_SUFFIX):
            clear_intent(replaced[: -len(OLD_SUFFIX)])
        failpoint("overwrite.before_remove_old")
        remove_tree(replaced)
    except OSError as e:
        return [f"the replaced checkpoint's files remain at {replaced} ({brief(e)}); gc removes it"]
    return []


def _rename_into_place(staging: str, final: str, overwrite: bool) -> str | None:
    """Rename; with overwrite, replace the existing committed checkpoint. Returns where the
    replaced checkpoint now lives (to be removed), or None if there was none. What is at
    ``final`` is checked again here (``check_target``): another process may have put something
    there since the save began."""
    try:
        os.rename(staging, final)
        return None
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
    check_target(final, overwrite, deep=False)
    unseal(final)  # moved into .staging: its owner must be able to write it (its "..")
    if _exchange(staging, final):
        _undo_if_held(final, lambda: _exchange(staging, final))
        return staging
    # No renameat2 (e.g. some parallel file systems): two renames, between which the name is
    # absent. First a durable intent record (.staging/<name>.<uuid>.overwrite): while it exists,
    # gc may find the overwrite stopped between the renames and complete it (format.md section
    # 2); once the new checkpoint is durably in place it is removed (remove_replaced), and a
    # .old without one is garbage. An error between the renames puts the old one back.
    intent = staging + INTENT_SUFFIX
    old = staging + OLD_SUFFIX
    try:
        write_new_file(intent, f"{os.path.basename(final)}\n".encode())
        fsync_dir(os.path.dirname(staging))
        failpoint("overwrite.intent_written")
        os.rename(final, old)
        _undo_if_held(final, lambda: os.rename(old, final))
    except BaseException:
        with contextlib.suppress(OSError):
            clear_intent(staging)
        raise
    try:
        failpoint("overwrite.fallback_old_moved")
        os.rename(staging, final)
    except BaseException:
        with contextlib.suppress(OSError):  # else intent, old and new stay for gc
            os.rename(old, final)
            clear_intent(staging)
        raise
    return old


def _undo_if_held(final: str, undo: Callable[[], object]) -> None:
    """After the replaced checkpoint left its name: a hold placed meanwhile puts it back."""

    def back() -> None:
        undo()
        with contextlib.suppress(OSError):
            seal_dir(final)

    store, name = os.path.split(final)
    holds.undo_if_held(store, name, back, "overwritten")


def clear_intent(staging: str) -> None:
    """Durably remove the overwrite intent record of ``staging`` (if any)."""
    try:
        os.unlink(staging + INTENT_SUFFIX)
    except FileNotFoundError:
        return
    fsync_dir(os.path.dirname(staging))


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
        tmp = os.path.join(store, f"{LATEST_TMP_PREFIX}{uuidlib.uuid4().hex}{LATEST_TMP_SUFFIX}")
        write_new_file(tmp, (name + "\n").encode())
        failpoint("commit.latest_tmp_written")
        os.rename(tmp, path)
    fsync_dir(store)


def is_latest_tmp(name: str) -> bool:
    """Whether ``name`` (in a store directory) is a temporary of ``write_latest``."""
    return name.startswith(LATEST_TMP_PREFIX) and name.endswith(LATEST_TMP_SUFFIX)


# ---- one-file checkpoints (docs/format.md section 10) ------------------------------------------


def check_file_target(target: str) -> int | None:
    """Refuse a one-file save onto ``target`` unless nothing is there or a regular file, which
    the save replaces as torch.save would (return its permission bits, for the new file to
    keep). A directory, a link, a FIFO, a device is a ``NotACheckpointError`` naming it; nothing
    is changed."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return None
    if stat.S_ISREG(st.st_mode):
        return stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        why = (
            "a directory (a checkpoint directory? save one there with one_file=False and "
            "overwrite=True)"
        )
    elif stat.S_ISLNK(st.st_mode):
        why = (
            f"a symbolic link (to {os.path.realpath(target)}): a save never replaces a link or "
            "writes through one; save to the path it names"
        )
    else:
        why = "a FIFO, device or socket"
    raise NotACheckpointError(
        f"{target} is {why}; a one-file save replaces only a regular file", target
    )


def publish_file(
    tmp: str, target: str, index_data: bytes, body: dict, *, mode: int | None = None
) -> CheckpointInfo:
    """Make ``tmp``, a data file written whole and fsynced beside ``target`` (same directory:
    same file system), the one-file checkpoint ``target``: append the index, ``body`` as
    MANIFEST.json, the TOC and the trailer; fsync; read the appended bytes back; rename over
    ``target`` (the commit point: what was there keeps its bytes until then); fsync the
    directory. ``mode``: permission bits to give it (those of the file it replaces).

    An error before the rename leaves ``target`` as it was (``tmp`` is the caller's to remove);
    one after it cannot undo the save and is reported in the returned info's ``warnings``.
    """
    failpoint("onefile.temp_written")
    (data,) = body["files"]
    raw = manifest.encode(body)
    manifest.decode(raw)  # never commit a manifest we could not read back
    parts = container.tail(data["name"], data["size"], index_data, raw)
    fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size != data["size"]:
            raise StoreError(f"{tmp} is not the data file its manifest describes", tmp)
        pwrite_all(fd, parts, data["size"], tmp)
        failpoint("onefile.appended")
        if mode is not None:
            os.fchmod(fd, mode)
        os.fsync(fd)
        failpoint("onefile.fsynced")
        expected = b"".join(parts)
        if pread_exact(fd, len(expected) + 1, data["size"]) != expected:
            raise StoreError(f"{tmp} reads back differently from what was appended", tmp)
    finally:
        os.close(fd)
    info = CheckpointInfo.from_manifest(body, target)
    check_file_target(target)  # again: something else may have been put there meanwhile
    os.rename(tmp, target)
    try:
        failpoint("onefile.renamed")
        fsync_dir(os.path.dirname(target))
    except OSError as e:
        late = (
            f"{target} is saved, but fsync of its directory failed ({brief(e)}): the rename "
            "may not survive a crash of the file system",
        )
        return replace(info, warnings=late)
    return info
