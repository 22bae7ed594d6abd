"""Legal holds (docs/operations.md; docs/format.md section 1): ``<store>/.holds/<name>.json``,
one marker per held checkpoint, created whole and read as hostile input.

A hold stops ckptguard's own delete, prune and overwrite of the checkpoint it names (``check``),
also a concurrent one: the store writes a marker and then checks the checkpoint, and a delete
or overwrite checks for a marker again right after its rename (and undoes it). A marker that
cannot be read holds too (fail closed); ``remove`` takes it away whatever it is.
"""

from __future__ import annotations

import datetime as dt
import errno
import getpass
import os
import re
import socket
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .audit.canon import CanonicalError, decode, encode
from .errors import (
    CheckpointError,
    CheckpointHeldError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StoreError,
    brief,
    from_oserror,
    warn_after_commit,
)
from .format.layout import check_name, is_name, is_uuid
from .fsutil import NewFiles, UnsafeFileError, fsync_dir, group_shared, read_manifest, read_regular
from .readonly import immutable, set_immutable

__all__ = [
    "HOLDS",
    "MAX_HOLD_BYTES",
    "Hold",
    "check",
    "listing",
    "place",
    "read",
    "release",
    "remove",
    "undo_if_held",
    "write",
]

HOLDS = ".holds"
SUFFIX = ".json"
MAX_HOLD_BYTES = 4096  # a marker's whole size
MAX_REASON = 1024  # characters of a hold's reason
_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
_TYPES = {
    "name": str,
    "uuid": str,
    "reason": str,
    "created": str,
    "user": str,
    "host": str,
    "immutable": bool,
}


@dataclass(frozen=True)
class Hold:
    """One hold: the checkpoint (``name`` and the ``uuid`` it had when held), why, when (UTC),
    by whom (informative), and whether the immutable attribute was set with it."""

    name: str
    uuid: str
    reason: str
    created: str
    user: str
    host: str
    immutable: bool = False

    def describe(self) -> str:
        why = self.reason or "no reason given"
        return f"held since {self.created} by {self.user}@{self.host}: {why}"


def marker(store: str, name: str) -> str:
    """The path of ``name``'s hold marker in ``store``."""
    return os.path.join(store, HOLDS, check_name(name) + SUFFIX)


def read(store: str, name: str) -> Hold | None:
    """The hold on ``name``, None if there is none. A marker that is not a small regular file
    of strict JSON with exactly the members of a ``Hold`` (``.holds`` a link or not a
    directory, the marker a link, FIFO, device, over ``MAX_HOLD_BYTES``) is a
    CorruptCheckpointError; one that cannot be read a StoreError."""
    where = marker(store, name)
    try:
        fd = os.open(os.path.dirname(where), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise CorruptCheckpointError(f"{HOLDS} is not a directory", path=store) from None
        raise from_oserror(e, where, "cannot read the hold") from None
    try:
        raw = read_regular(os.path.basename(where), dir_fd=fd, max_size=MAX_HOLD_BYTES)
    except FileNotFoundError:
        return None
    except UnsafeFileError as e:
        raise CorruptCheckpointError(f"the hold marker {e.reason}", path=where) from None
    except OSError as e:
        raise from_oserror(e, where, "cannot read the hold") from None
    finally:
        os.close(fd)
    return _parse(raw, name, where)


def _parse(raw: bytes, name: str, where: str) -> Hold:
    try:
        doc = decode(raw.removesuffix(b"\n"), MAX_HOLD_BYTES)
    except CanonicalError as e:
        raise CorruptCheckpointError(f"the hold marker is not JSON: {e}", path=where) from None
    bad = set(doc) ^ set(_TYPES) or [k for k, t in _TYPES.items() if type(doc[k]) is not t]
    if bad or not raw.endswith(b"\n"):
        raise CorruptCheckpointError(f"the hold marker is malformed ({sorted(bad)})", path=where)
    if doc["name"] != name or not is_uuid(doc["uuid"]) or not _TIME.match(doc["created"]):
        raise CorruptCheckpointError("the hold marker names another checkpoint", path=where)
    if len(doc["reason"]) > MAX_REASON or max(len(doc["user"]), len(doc["host"])) > 256:
        raise CorruptCheckpointError("the hold marker is malformed (too long)", path=where)
    return Hold(**doc)


def check(store: str, name: str, doing: str = "deleted") -> None:
    """Raise CheckpointHeldError if ``name`` is held (or its marker cannot be read: held)."""
    try:
        hold = read(store, name)
    except (CorruptCheckpointError, StoreError) as e:
        raise CheckpointHeldError(
            f"{name} is not {doing}: its hold marker cannot be read ({e}), so it counts as "
            "held; `ckptguard release` removes the marker",
            name,
            "an unreadable hold marker",
        ) from None
    if hold is not None:
        raise CheckpointHeldError(
            f"{name} is under a legal hold ({hold.describe()}): not {doing}; release the hold "
            "first (`ckptguard release`)",
            name,
            hold.reason,
        )


def write(store: str, name: str, uuid: str, reason: str, immutable: bool = False) -> Hold:
    """Create ``name``'s marker whole and durably (never replacing one: an existing hold is a
    CheckpointHeldError). The caller checks the checkpoint afterwards (``Store.hold``)."""
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise ValueError(f"a hold's reason is text of at most {MAX_REASON} characters")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    hold = Hold(name, uuid, reason, now, user[:256], socket.gethostname()[:256], immutable)
    where = marker(store, name)
    _make_dir(store)
    files = NewFiles(os.path.dirname(where))
    try:
        files.remove_stale(lambda n: n.endswith(SUFFIX))
        with open(files.new(os.path.basename(where)), "wb") as f:
            f.write(encode(asdict(hold)) + b"\n")
        files.commit()
    except FileExistsError:
        check(store, name, "held again")
        raise  # unreachable: check raises for an existing marker
    finally:
        files.discard()
    return hold


def _make_dir(store: str) -> None:
    d = os.path.join(store, HOLDS)
    try:
        os.mkdir(d, 0o775 if group_shared(store) else 0o755)
    except FileExistsError:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode):
            raise CorruptCheckpointError(f"{HOLDS} is not a directory", path=store) from None
        return
    fsync_dir(store)


def remove(store: str, name: str) -> bool:
    """Remove ``name``'s marker, whatever it is (a link is removed, not followed), durably;
    False if there was none."""
    where = marker(store, name)
    try:
        os.unlink(where)
    except FileNotFoundError:
        return False
    fsync_dir(os.path.dirname(where))
    return True


def listing(store: str) -> list[tuple[str, Hold | None, str]]:
    """Every hold of ``store`` by name: (name, the hold or None, why it cannot be read)."""
    try:
        names = sorted(os.listdir(os.path.join(store, HOLDS)))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out: list[tuple[str, Hold | None, str]] = []
    for n in names:
        name = n.removesuffix(SUFFIX)
        if n.startswith(".") or not n.endswith(SUFFIX) or not is_name(name):
            continue  # a temporary of a hold being written, or not a marker
        try:
            hold = read(store, name)
        except (CorruptCheckpointError, StoreError) as e:
            out.append((name, None, str(e)))
            continue
        if hold is not None:  # else released meanwhile
            out.append((name, hold, ""))
    return out


def held_uuids(store: str) -> set[str]:
    """The uuids of the checkpoints ``store``'s readable holds hold (empty without holds)."""
    return {hold.uuid for _, hold, _ in listing(store) if hold is not None}


def place(
    store: str, name: str, reason: str, uuid_of: Callable[[], str], frozen: str | None = None
) -> Hold:
    """Hold ``name``: its marker is written durably first, then the checkpoint is checked
    (``uuid_of``: its uuid now, CheckpointNotFoundError if it is gone). A checkpoint deleted or
    replaced meanwhile takes the marker away again: the hold fails, unless the delete or
    overwrite saw the marker and put the checkpoint back (then it is tried again). ``frozen``:
    the checkpoint directory, given the immutable attribute; where that cannot be done, a
    CheckpointWarning (the hold stands without it)."""
    uuid = uuid_of()
    for _ in range(3):
        hold = write(store, name, uuid, reason, frozen is not None)
        try:
            now: str | None = uuid_of()
        except CheckpointNotFoundError:
            now = None
        except BaseException:
            remove(store, name)
            raise
        if now == uuid:
            break
        remove(store, name)
        if uuid_of() != uuid:  # CheckpointNotFoundError if it is gone
            raise CheckpointNotFoundError(f"{name} was replaced meanwhile: not held")
    else:
        raise CheckpointNotFoundError(f"{name} keeps being removed and put back: not held")
    if frozen is not None:
        try:
            set_immutable(frozen, True)
        except OSError as e:
            warn_after_commit(f"{name} is held, but not immutable: {brief(e)}", stacklevel=3)
    return hold


def release(store: str, name: str, path: str) -> Hold | None:
    """Release ``name``'s hold (also one whose marker cannot be read: None is returned then),
    clearing the immutable attribute of the checkpoint directory ``path`` first where it has
    one; CheckpointNotFoundError if it is not held, StoreError if the attribute stays."""
    try:
        hold = read(store, name)
    except (CorruptCheckpointError, StoreError):
        hold = None
    if immutable(path):
        try:
            set_immutable(path, False)
        except OSError as e:
            raise from_oserror(e, path, "cannot clear the immutable attribute of") from None
    if not remove(store, name):
        raise CheckpointNotFoundError(f"{name} is not held in {store}")
    return hold


def undo_if_held(store: str, name: str, undo: Callable[[], object], doing: str) -> None:
    """After a delete or an overwrite moved checkpoint ``name`` away (its commit point): if a
    hold appeared meanwhile, ``undo`` puts it back and CheckpointHeldError is raised. With
    ``place``'s write-then-check, a hold and a removal never both succeed."""
    try:
        check(store, name, doing)
    except CheckpointHeldError:
        undo()
        raise


def holds_another(tree: str) -> bool:
    """Whether ``tree`` (``.staging/<name>.<uuid>``) holds a committed checkpoint other than
    the save of that uuid."""
    ours = os.path.basename(tree).rsplit(".", 1)[-1]
    return (tree_uuid(tree) or ours) != ours


def tree_uuid(tree: str) -> str | None:
    """The uuid of the checkpoint whose valid manifest ``tree`` holds, None if none."""
    try:
        return read_manifest(tree)[1]["uuid"]
    except (OSError, CheckpointError):
        return None
