"""The entries of a store's keyring (docs/format.md section 1.1), one file per encryption scope
in ``<store>/.keys/``: their names, their strict reading (hostile input, fail closed: anything
but a well-formed entry is a KeyUnavailableError), wrapping and unwrapping a data key under a
KEK (AES-256-GCM from ``cryptography``), writing an entry whole, and the keyring's lock.
``keyring`` builds the operations on these.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .audit.canon import CanonicalError, decode, encode
from .errors import KeyUnavailableError, ScopeShreddedError, StoreError, from_oserror
from .format.manifest import format_time
from .fsutil import (
    NewFiles,
    UnsafeFileError,
    fsync_dir,
    group_shared,
    lockf_until,
    makedirs_durably,
    read_regular,
)
from .kek import Kek

KEYS = ".keys"
COPIES = "COPIES"
LOCK = ".lock"
MAX_ENTRY_BYTES = 4096
MAX_COPIES_BYTES = 1 << 20
MAX_SCOPE = 256
MAX_REASON = 1024
LOCK_TIMEOUT = 60.0  # seconds a writer waits for another's rotation or shred
NO_KEY = "0" * 32  # key_id of the tombstone of a scope that never had a key
_AAD = b"ckptguard keyring v1\0"
_LIVE = {"scope": None, "key_id": 32, "created": None, "kek_id": 32, "nonce": 24, "wrapped": 96}
_DEAD = {"scope": None, "key_id": 32, "shredded": None, "reason": None, "user": None, "host": None}
_ENTRY = re.compile(r"^[0-9a-f]{32}\.json$")
_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class DataKey:
    """A scope's 32-byte data key and its id; the repr hides the key."""

    key_id: str
    scope: str
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class Entry:
    """A keyring entry as listed (never its key): a live one has ``kek_id`` and ``created``, a
    tombstone ``shredded``, ``reason``, ``user`` and ``host``; a damaged one only ``sid`` and
    ``problem``."""

    sid: str
    scope: str = ""
    key_id: str = ""
    kek_id: str | None = None
    created: str | None = None
    shredded: str | None = None
    reason: str = ""
    user: str = ""
    host: str = ""
    problem: str = ""

    @property
    def live(self) -> bool:
        return not self.problem and self.shredded is None


def scope_id(scope: str) -> str:
    """The file name stem of ``scope``'s entry: 32 hex of SHA-256(b"ckptguard scope\\0" +
    scope), so that any scope name makes a safe file name."""
    return hashlib.sha256(b"ckptguard scope\0" + scope.encode("utf-8")).hexdigest()[:32]


def check_scope(scope: str) -> None:
    """ValueError unless ``scope`` is 1..256 characters of UTF-8 text without control
    characters (C0, DEL, C1) and not only whitespace."""
    if not isinstance(scope, str) or not 1 <= len(scope) <= MAX_SCOPE:
        raise ValueError(f"a scope name is text of 1 to {MAX_SCOPE} characters: {scope!r:.80}")
    if _CONTROL.search(scope):
        raise ValueError(f"the scope name {scope!r:.80} holds a control character")
    if not scope.strip():
        raise ValueError(f"the scope name {scope!r} is only whitespace")
    try:
        scope.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"the scope name {scope!r:.80} is not valid Unicode") from None


def entry_path(store: str, sid: str) -> str:
    return os.path.join(store, KEYS, sid + ".json")


def _aad(key_id: str, scope: str) -> bytes:
    return _AAD + key_id.encode("ascii") + b"\0" + scope.encode("utf-8")


def utc_now() -> str:
    return format_time(dt.datetime.now(dt.timezone.utc))


def _damaged(where: str, why: str) -> KeyUnavailableError:
    return KeyUnavailableError(f"keyring entry {where} is damaged: {why}")


def read_entry(store: str, sid: str) -> dict | None:
    """The checked entry ``sid`` of ``store``'s keyring, None if there is none."""
    where = entry_path(store, sid)
    try:
        fd = os.open(os.path.dirname(where), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            d = os.path.dirname(where)
            raise KeyUnavailableError(f"the keyring {d} is not a directory") from None
        raise from_oserror(e, where, "cannot read the keyring entry") from None
    try:
        raw = read_regular(os.path.basename(where), dir_fd=fd, max_size=MAX_ENTRY_BYTES)
    except FileNotFoundError:
        return None
    except UnsafeFileError as e:
        raise _damaged(where, e.reason) from None
    except OSError as e:
        raise from_oserror(e, where, "cannot read the keyring entry") from None
    finally:
        os.close(fd)
    return _parse(raw, sid, where)


def _parse(raw: bytes, sid: str, where: str) -> dict:
    try:
        doc = decode(raw.removesuffix(b"\n"), MAX_ENTRY_BYTES)
    except CanonicalError as e:
        raise _damaged(where, f"not canonical JSON ({e})") from None
    if not raw.endswith(b"\n"):
        raise _damaged(where, "no final newline")
    form = _LIVE if set(doc) == set(_LIVE) else _DEAD if set(doc) == set(_DEAD) else None
    if form is None:
        raise _damaged(where, f"members {sorted(doc)} are neither a key's nor a tombstone's")
    for k, n in form.items():
        v = doc[k]
        if not isinstance(v, str) or (n and (len(v) != n or v.strip("0123456789abcdef"))):
            raise _damaged(where, f"{k} is not {f'{n} lowercase hex digits' if n else 'text'}")
    try:
        check_scope(doc["scope"])
    except ValueError as e:
        raise _damaged(where, str(e)) from None
    if scope_id(doc["scope"]) != sid:
        raise _damaged(where, "it names another scope than its file name says")
    if not _TIME.match(doc.get("created", doc.get("shredded", ""))):
        raise _damaged(where, "its time is not a UTC time of the required form")
    if form is _DEAD and (
        len(doc["reason"]) > MAX_REASON or max(len(doc["user"]), len(doc["host"])) > MAX_SCOPE
    ):
        raise _damaged(where, "its reason, user or host is too long")
    return doc


def check_live(doc: dict, store: str, key_id: str | None) -> None:
    """Raise unless checked entry ``doc`` is live (ScopeShreddedError) and of ``key_id``
    where given (KeyUnavailableError)."""
    scope = doc["scope"]
    if "shredded" in doc:
        why = f": {doc['reason']}" if doc["reason"] else ""
        raise ScopeShreddedError(
            f"scope {scope!r} was shredded in {store} at {doc['shredded']}{why}; "
            "its data key is destroyed",
            scope,
            doc["key_id"],
        )
    if key_id is not None and doc["key_id"] != key_id:
        raise KeyUnavailableError(
            f"the keyring of {store} holds key {doc['key_id']} for scope {scope!r}, not {key_id}",
            scope,
            key_id,
        )


def open_entry(doc: dict, kek: Kek, store: str, key_id: str | None) -> DataKey:
    """The data key of checked entry ``doc`` under ``kek`` (and of ``key_id`` where given)."""
    check_live(doc, store, key_id)
    scope, where = doc["scope"], entry_path(store, scope_id(doc["scope"]))
    if doc["kek_id"] != kek.kek_id:
        raise KeyUnavailableError(
            f"the key of scope {scope!r} in {store} is wrapped under KEK {doc['kek_id']}, not "
            f"under the KEK given ({kek.kek_id}): use that KEK, or finish `ckptguard keyring "
            "rotate` if a rotation was under way",
            scope,
            doc["key_id"],
        )
    try:
        key = AESGCM(kek.key).decrypt(
            bytes.fromhex(doc["nonce"]),
            bytes.fromhex(doc["wrapped"]),
            _aad(doc["key_id"], scope),
        )
    except InvalidTag:
        raise KeyUnavailableError(
            f"keyring entry {where} is damaged or altered: its key does not authenticate "
            f"under KEK {kek.kek_id}",
            scope,
            doc["key_id"],
        ) from None
    return DataKey(doc["key_id"], scope, key)


def wrap(scope: str, key_id: str, key: bytes, kek: Kek, created: str) -> dict:
    nonce = os.urandom(12)
    wrapped = AESGCM(kek.key).encrypt(nonce, key, _aad(key_id, scope))
    return {
        "scope": scope,
        "key_id": key_id,
        "created": created,
        "kek_id": kek.kek_id,
        "nonce": nonce.hex(),
        "wrapped": wrapped.hex(),
    }


def make_dir(store: str) -> str:
    """``store``'s ``.keys`` directory, created (with the store, as a save would) if missing:
    private to the owner, or to the group in a group-shared store."""
    d = os.path.join(store, KEYS)
    try:
        makedirs_durably(store)
        os.mkdir(d, 0o770 if group_shared(store) else 0o700)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(d).st_mode):
            raise KeyUnavailableError(f"the keyring {d} is not a directory") from None
        return d
    except OSError as e:
        raise from_oserror(e, d, "cannot create the keyring") from None
    fsync_dir(store)
    return d


def put_entry(store: str, doc: dict, replace: bool, before: Callable[[], None]) -> None:
    """Write entry ``doc`` whole and durably: a temporary, fsync, then a link that never
    replaces (FileExistsError) or, with ``replace``, a rename over; the directory fsynced.
    ``before`` runs between writing the temporary and naming it."""
    d, name = make_dir(store), scope_id(doc["scope"]) + ".json"
    files = NewFiles(d, replace=replace)
    try:
        files.remove_stale(lambda n: n == name)
        with open(files.new(name), "wb") as f:
            f.write(encode(doc) + b"\n")
        before()
        files.commit()
    except FileExistsError:
        raise
    except OSError as e:
        raise from_oserror(e, os.path.join(d, name), "cannot write the keyring entry") from None
    finally:
        files.discard()


@contextlib.contextmanager
def locked(store: str) -> Iterator[None]:
    """Hold ``store``'s keyring lock (a POSIX lock on ``.keys/.lock``)."""
    path = os.path.join(make_dir(store), LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise from_oserror(e, path, "cannot open the keyring lock") from None
    try:
        try:
            got = lockf_until(fd, False, time.monotonic() + LOCK_TIMEOUT)
        except OSError as e:  # ENOLCK: a file system mounted without locks
            raise from_oserror(e, path, "cannot lock the keyring") from None
        if not got:
            raise StoreError(f"the keyring of {store} stayed locked for {LOCK_TIMEOUT:.0f} s", path)
        yield
    finally:
        os.close(fd)


def sids(store: str) -> list[str]:
    try:
        names = os.listdir(os.path.join(store, KEYS))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise from_oserror(e, os.path.join(store, KEYS), "cannot list the keyring") from None
    return sorted(n.removesuffix(".json") for n in names if _ENTRY.match(n))


def remove_temps(store: str, which: Callable[[str], bool], older_than: float) -> list[str]:
    d = os.path.join(store, KEYS)
    try:
        names = os.listdir(d)
    except (FileNotFoundError, NotADirectoryError):
        return []
    cutoff, removed = time.time() - older_than, []
    for n in sorted(names):
        p = os.path.join(d, n)
        if n.startswith(".") and n != LOCK and which(n):
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(p).st_mtime <= cutoff:
                    os.unlink(p)
                    removed.append(p)
    if removed:
        fsync_dir(d)
    return removed
