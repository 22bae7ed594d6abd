"""What every reader of another format shares: the names of the kinds, the safe open of their
files, plain member names, the device tensors land on, and the typed errors (a damaged file, a
pickled global the weights-only unpickler refuses).

Files are opened by ``fsutil.open_regular`` (no blocking on a FIFO, no final symbolic link,
regular files only) and handed to torch or safetensors as ``/proc/self/fd/N``: the library reads
the very file that was checked, not whatever the name leads to a moment later.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import ForeignFormatError, UnsafePickleError, brief, from_oserror
from ..fsutil import UnsafeFileError, open_regular, read_regular
from ..place import MapLocation, device

TORCH_ZIP = "torch.save (zip)"
TORCH_LEGACY = "torch.save (legacy)"
SAFETENSORS = "safetensors"
SAFETENSORS_SET = "safetensors (sharded)"
DCP = "DCP"

_PROC_FD = "/proc/self/fd"
_MAX_NAME = 255
# torch's refusal: "Weights only load failed. ... Unsupported global: GLOBAL mod.Name was not ..."
# (or "... unsupported GLOBAL mod.name whose module mod is blocked"); the sentence naming the
# global, else the unpickler's own line, says why.
_REFUSAL = "Weights only load failed"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_WHY = re.compile(r"[^.\n]*GLOBAL [^\n]*?(?:\.(?= |$)|$)|WeightsUnpickler error: [^\n]*", re.M)


@contextlib.contextmanager
def opened(
    name: str, *, path: str, kind: str, dir_fd: int | None = None, max_size: int | None = None
) -> Iterator[str]:
    """Open ``name`` (relative to ``dir_fd`` where given) by ``open_regular`` and yield a name
    that opens that same file while the block runs; ``path`` is how messages name it."""
    try:
        fd, _ = open_regular(name, dir_fd=dir_fd, max_size=max_size)
    except UnsafeFileError as e:
        raise unsafe(path, kind, e) from None
    except FileNotFoundError:
        raise ForeignFormatError(f"{path} does not exist", path, kind) from None
    except OSError as e:
        raise from_oserror(e, path, "cannot read") from None
    try:
        through = os.path.join(_PROC_FD, str(fd))
        # Without /proc (not Linux) the path is opened again: a small window, checked above.
        yield through if os.path.exists(through) else path
    finally:
        os.close(fd)


def read_small(
    name: str, *, path: str, kind: str, max_size: int, dir_fd: int | None = None
) -> bytes:
    """The whole of a small file (an index, DCP's ``.metadata``) by ``fsutil.read_regular``,
    with ``opened``'s errors."""
    try:
        return read_regular(name, dir_fd=dir_fd, max_size=max_size)
    except UnsafeFileError as e:
        raise unsafe(path, kind, e) from None
    except FileNotFoundError:
        raise ForeignFormatError(f"{path} does not exist", path, kind) from None
    except OSError as e:
        raise from_oserror(e, path, "cannot read") from None


def unsafe(path: str, kind: str, e: UnsafeFileError) -> ForeignFormatError:
    """The error for a file that is not a regular file of bounded size; a link's names its
    target: it is never followed (not to read outside what the caller named)."""
    try:
        target = f" (to {os.readlink(path)})" if os.path.islink(path) else ""
    except OSError:
        target = ""
    why = f"{e.reason}{target}: files of another format are read only under their own names"
    return ForeignFormatError(f"{path} {why if target else e.reason}", path, kind)


def open_dir(path: str, kind: str) -> int:
    """A descriptor of directory ``path`` (never through a final link) to open members by."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if os.path.islink(path):
            raise ForeignFormatError(f"{path} is a symbolic link", path, kind) from None
        raise from_oserror(e, path, "cannot open") from None


def plain_name(name: Any, *, path: str, kind: str, what: str) -> str:
    """``name``, a file named inside ``path`` by the file's own content, if it is a plain name
    in that directory (no separator, not ``.`` or ``..``): else ForeignFormatError."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\0" in name
        or len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME
    ):
        raise ForeignFormatError(
            f"{path}: {what} names the file {name!r}, which is not a plain name in that "
            "directory: nothing outside it is read",
            path,
            kind,
        )
    return name


def damaged(path: str, kind: str, e: BaseException, key: str = "") -> ForeignFormatError:
    """The error for a file that ``kind``'s reader could not read (``key``: the value it was
    reading, where known); the first line of ``e`` says why."""
    if isinstance(e, EOFError):
        why = "the data ends early (a truncated file?)"
    else:
        why = brief(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
    at = f", key {key!r}" if key else ""
    return ForeignFormatError(f"cannot read {path}{at} as {kind}: {why[:300]}", path, kind)


def refused(e: BaseException, path: str, kind: str, key: str = "") -> UnsafePickleError | None:
    """torch's weights-only refusal ``e`` as an UnsafePickleError naming the global and how to
    opt in; None if ``e`` is something else."""
    text = str(e)
    if _REFUSAL not in text:
        return None
    found = _GLOBAL.search(text)
    why = _WHY.search(text)
    return unsafe_pickle(path, kind, found[1] if found else "", why[0].strip() if why else "", key)


def unsafe_pickle(
    path: str, kind: str, global_name: str, why: str, key: str = ""
) -> UnsafePickleError:
    """The refusal of a pickle that needs ``global_name`` (in the value of ``key``, where
    known), saying how to opt in and what that risks."""
    what = f"the global {global_name}" if global_name else "a construct"
    at = f", key {key!r}," if key else ""
    detail = f" ({why[:200]})" if why else ""
    return UnsafePickleError(
        f"{path} ({kind}){at} needs {what}, which the weights-only unpickler does not "
        f"allow{detail}. If you trust the file, read it with allow_pickle=True (ckptguard import "
        "--allow-pickle): full pickle can run arbitrary code from it",
        path,
        kind,
        global_name,
    )


def target_device(map_location: MapLocation, path: str) -> torch.device:
    """Where tensors of a format that stores host tensors (safetensors, DCP) load: the CPU,
    mapped by ``map_location`` as a ckptguard checkpoint's would be."""
    return device({"device": "cpu", "key": os.path.basename(path)}, map_location)


def to_device(obj: Any, dev: torch.device) -> Any:
    """``obj`` with every tensor in its dicts, lists and tuples moved to ``dev``."""
    if dev.type == "cpu":
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = to_device(v, dev)
        return obj
    if isinstance(obj, list):
        obj[:] = [to_device(v, dev) for v in obj]
        return obj
    if type(obj) is tuple:
        return tuple(to_device(v, dev) for v in obj)
    return obj
