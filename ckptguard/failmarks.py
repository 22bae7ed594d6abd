"""Markers of checkpoints that failed validation (docs/operations.md, "Validation after each
commit"; docs/format.md section 1): ``<store>/.validation/<name>.json``, written whole, read as
hostile input.

A marker says: the checkpoint ``<name>`` with this ``uuid`` was read back from storage and did
not verify. It is only advice to a resume that asks for it (``load(skip_failed_validation=True)``):
a marker that cannot be read, or names another uuid than the checkpoint's now (a deleted or
overwritten checkpoint), is ignored, so a planted file can never make a reader skip a checkpoint
that it would not skip with a valid marker of that checkpoint's uuid.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .audit.canon import CanonicalError, decode, encode
from .format.layout import check_name, is_name, is_uuid
from .fsutil import NewFiles, UnsafeFileError, fsync_dir, group_shared, read_regular

__all__ = [
    "DIR",
    "MAX_MARKER_BYTES",
    "MAX_PROBLEMS",
    "Mark",
    "MarkError",
    "listing",
    "read",
    "remove",
    "write",
]

DIR = ".validation"
SUFFIX = ".json"
MAX_MARKER_BYTES = 16384  # a marker's whole size, its newline included
MAX_PROBLEMS = 16  # problems a marker names (the first ones found)
MAX_PROBLEM_CHARS = 512
FAILED = "failed"
_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
_TYPES = {"name": str, "uuid": str, "result": str, "time": str, "problems": list}


class MarkError(Exception):
    """A marker that is not one (a link, FIFO, oversized, malformed, or naming another
    checkpoint): ``reason`` says which. Readers ignore such a marker."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Mark:
    """One failed validation: the checkpoint (``name``, ``uuid``), ``result`` (always
    ``"failed"``), when (UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``) and the first problems found."""

    name: str
    uuid: str
    result: str
    time: str
    problems: tuple[str, ...]


def write(store: str, name: str, uuid: str, problems: Sequence[str]) -> Mark:
    """Write ``name``'s marker whole and durably (temporary, fsync, rename over any older
    marker of the name, fsync of the directory); the mark written."""
    if not is_uuid(uuid):
        raise ValueError(f"not a checkpoint uuid: {uuid!r}")
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    kept = tuple(str(p)[:MAX_PROBLEM_CHARS] for p in problems[:MAX_PROBLEMS])
    mark = Mark(check_name(name), uuid, FAILED, now, kept)
    data = encode({**asdict(mark), "problems": list(kept)}) + b"\n"
    while len(data) > MAX_MARKER_BYTES:  # escaped text can grow: drop problems until it fits
        kept = kept[:-1]
        mark = Mark(mark.name, uuid, FAILED, now, kept)
        data = encode({**asdict(mark), "problems": list(kept)}) + b"\n"
    where = _make_dir(store)
    files = NewFiles(where, replace=True)
    try:
        files.remove_stale(lambda n: n.endswith(SUFFIX))
        with open(files.new(name + SUFFIX), "wb") as f:
            f.write(data)
        files.commit()
    finally:
        files.discard()
    return mark


def _make_dir(store: str) -> str:
    d = os.path.join(store, DIR)
    try:
        os.mkdir(d, 0o775 if group_shared(store) else 0o755)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(d).st_mode):  # a link or a file: never written through
            raise NotADirectoryError(errno.ENOTDIR, f"{DIR} is not a directory", d) from None
        return d
    fsync_dir(store)
    return d


def _open_dir(store: str) -> int | None:
    """``.validation`` opened without following a link; None if there is none."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        return os.open(os.path.join(store, DIR), flags)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise MarkError(f"{DIR} is a link or not a directory") from None
        raise


def read(store: str, name: str) -> Mark | None:
    """``name``'s marker, None if there is none; MarkError for one that is not a marker of
    ``name`` (see the module), OSError where it cannot be read."""
    check_name(name)
    fd = _open_dir(store)
    if fd is None:
        return None
    try:
        return _read_at(fd, name)
    finally:
        os.close(fd)


def _read_at(dir_fd: int, name: str) -> Mark | None:
    try:
        raw = read_regular(name + SUFFIX, dir_fd=dir_fd, max_size=MAX_MARKER_BYTES)
    except FileNotFoundError:
        return None
    except UnsafeFileError as e:
        raise MarkError(f"the marker of {name} {e.reason}") from None
    return parse(raw, name)


def parse(raw: bytes, name: str) -> Mark:
    """The mark the bytes ``raw`` of ``name``'s marker hold; MarkError unless they are exactly
    one canonical JSON object of the marker's members and types, and a newline."""
    try:
        doc = decode(raw.removesuffix(b"\n"), MAX_MARKER_BYTES)
    except CanonicalError as e:
        raise MarkError(f"the marker of {name} is not canonical JSON: {e}") from None
    bad = set(doc) ^ set(_TYPES) or [k for k, t in _TYPES.items() if type(doc[k]) is not t]
    if bad or not raw.endswith(b"\n"):
        raise MarkError(f"the marker of {name} is malformed ({sorted(bad)})")
    problems = doc["problems"]
    if (
        doc["name"] != name
        or not is_uuid(doc["uuid"])
        or doc["result"] != FAILED
        or not _TIME.match(doc["time"])
        or len(problems) > MAX_PROBLEMS
        or not all(type(p) is str and len(p) <= MAX_PROBLEM_CHARS for p in problems)
    ):
        raise MarkError(f"the marker of {name} is malformed (its values)")
    return Mark(name, doc["uuid"], FAILED, doc["time"], tuple(problems))


def listing(store: str) -> tuple[dict[str, Mark], list[str]]:
    """Every readable marker of ``store`` by checkpoint name, and why each other one was
    ignored (a link, FIFO, oversized or malformed marker, ``.validation`` itself a link).
    Names starting with ``.`` are temporaries of markers being written."""
    marks: dict[str, Mark] = {}
    ignored: list[str] = []
    try:
        fd = _open_dir(store)
    except MarkError as e:
        return marks, [e.reason]
    if fd is None:
        return marks, ignored
    try:
        for n in sorted(os.listdir(fd)):
            name = n.removesuffix(SUFFIX)
            if n.startswith(".") or not n.endswith(SUFFIX) or not is_name(name):
                continue
            try:
                mark = _read_at(fd, name)
            except (MarkError, OSError) as e:
                ignored.append(e.reason if isinstance(e, MarkError) else f"{n}: {e}")
                continue
            if mark is not None:  # else removed meanwhile
                marks[name] = mark
    finally:
        os.close(fd)
    return marks, ignored


def remove(store: str, name: str, uuid: str | None = None) -> bool:
    """Remove ``name``'s marker (a link is removed, not followed), durably; with ``uuid``, only
    a readable marker of that uuid. False if none was removed."""
    if uuid is not None:
        try:
            mark = read(store, name)
        except (MarkError, OSError):
            return False
        if mark is None or mark.uuid != uuid:
            return False
    try:
        fd = _open_dir(store)
    except MarkError:
        return False  # .validation is a link: nothing is removed through it
    if fd is None:
        return False
    try:
        os.unlink(check_name(name) + SUFFIX, dir_fd=fd)
        os.fsync(fd)
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
    return True
