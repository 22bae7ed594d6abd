"""Temporary files named for their target and their process, so that a later run can tell a
dead process's leftover from a live one's: ``.<name>.ckptguard-tmp.<hash of the name>.<host>.
<pid namespace>.<pid>.<random>``. A one-file save (``filesave``) and an export's files
(``fsutil.NewFiles``) are written under such names and renamed when whole; the next save to the
same target, or the next export to the same directory, removes those whose process is provably
gone (made on this host, in this pid namespace, by a pid that no longer exists). A live
process's temporary, here or on another host, is never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import uuid as uuidlib
from collections.abc import Callable

import xxhash

TEMP_MARK = ".ckptguard-tmp."
_TEMP = re.compile(
    r"\.(?P<stem>.*)\.ckptguard-tmp\.(?P<key>[0-9a-f]{16})\.(?P<host>[A-Za-z0-9-]{1,63})"
    r"\.(?P<ns>[0-9]{1,20})\.(?P<pid>[0-9]{1,10})\.(?P<rand>[0-9a-f]{8})",
    re.DOTALL,
)
_STEM_BYTES = 80  # of the target's name in its temporary's (NAME_MAX is 255 bytes)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def _pid_namespace() -> int:
    """This process's pid namespace (its inode): a pid means a process only within one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _key(filename: str) -> str:
    return xxhash.xxh3_64_hexdigest(os.fsencode(filename))


def temp_name(filename: str) -> str:
    """A new name for a temporary of ``filename``, in its directory: hidden, saying what it is
    and for which target, with this host, pid namespace and pid."""
    stem = os.fsdecode(os.fsencode(filename)[:_STEM_BYTES])
    who = f"{_host()}.{_pid_namespace()}.{os.getpid()}.{uuidlib.uuid4().hex[:8]}"
    return f".{stem}{TEMP_MARK}{_key(filename)}.{who}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process, writing to the same target now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: a process of another user has this pid
        return True
    return True


def _of(m: re.Match, target: str | Callable[[str], bool]) -> bool:
    """Whether temporary ``m`` is one of ``target`` (a file name, or a test of a whole name:
    then only temporaries whose name holds their target's whole name, as its hash says)."""
    if isinstance(target, str):
        return m["key"] == _key(target)
    return m["key"] == _key(m["stem"]) and target(m["stem"])


def remove_stale_temps(
    directory: str, target: str | Callable[[str], bool], dirs: bool = False
) -> list[str]:
    """Remove the temporaries in ``directory`` of ``target`` (a file name, or a test of file
    names) whose process is provably gone: made on this host, in this pid namespace, by a pid
    that no longer exists. ``dirs``: temporary directories too (removed whole, no link inside
    followed). Returns those removed."""
    host, ns = _host(), str(_pid_namespace())
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for n in names:
        m = _TEMP.fullmatch(n)
        if m is None or (m["host"], m["ns"]) != (host, ns) or not _of(m, target):
            continue
        if _alive(int(m["pid"])):
            continue
        path = os.path.join(directory, n)
        with contextlib.suppress(OSError):
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                os.unlink(path)
                removed.append(path)
            elif dirs and stat.S_ISDIR(mode):
                shutil.rmtree(path)
                removed.append(path)
    return removed
