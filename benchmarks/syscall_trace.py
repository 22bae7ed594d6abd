"""Parse and classify ``strace -f -y`` output: file-system metadata calls per kind and file.

Used by benchmarks/metadata_ops.py. A call counts when it acts on a path under the directory
watched (the path strace -y shows for a descriptor, or an ``*at`` call's path joined to its
directory's); a stat of ``MARKER`` + name starts phase ``name`` in a trace.
"""

from __future__ import annotations

import collections
import os
import re
import struct
from dataclasses import dataclass, field

TRACED = (
    "%file,fsync,fdatasync,fstat,fstatfs,getdents64,close,read,pread64,readv,preadv,preadv2,"
    "lseek,write,pwrite64,writev,pwritev,pwritev2,fchmod,fchown,ftruncate,fallocate"
)
MARKER = "/ckg-phase-marker/"  # a stat of MARKER + phase starts that phase in a rank's trace
FOOTER_TRAILER = 32
HEADER = 4096

_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+|\?)(?:<(.*)>)?(?:\s+(E[A-Z]+).*)?$")
_UNFINISHED = re.compile(r"^(\d+)\s+(.*)\s+<unfinished \.\.\.>$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$")
_STAGED = re.compile(r"/\.staging/([^/]+)\.[0-9a-f]{32}/")
_FD = re.compile(r"^(-?\d+|AT_FDCWD)(?:<(.*)>)?$")
_STAT_PATH = {"stat", "lstat", "newfstatat", "statx", "access", "faccessat", "faccessat2"}
_STAT_PATH |= {"readlink", "readlinkat", "statfs"}
_SETATTR = {"chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown"}
_SETATTR |= {"fchownat", "utimensat", "ftruncate", "truncate", "fallocate"}
_READS = {"read", "pread64", "readv", "preadv", "preadv2"}
_WRITES = {"write", "pwrite64", "writev", "pwritev", "pwritev2"}


@dataclass
class Call:
    """One completed system call of a trace: name, arguments (top-level, as text), result."""

    pid: int
    name: str
    args: list[str]
    ret: int
    ret_path: str | None = None
    error: str | None = None


def split_args(text: str) -> list[str]:
    """Top-level comma-separated arguments of a strace call, quotes and brackets respected."""
    out, depth, cur, quoted, i = [], 0, [], False, 0
    while i < len(text):
        ch = text[i]
        if quoted:
            cur.append(ch)
            if ch == "\\":
                cur.append(text[i + 1])
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
            cur.append(ch)
        elif ch in "{[<(":
            depth += 1
            cur.append(ch)
        elif ch in "}]>)":
            depth -= 1
            cur.append(ch)
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        i += 1
    if cur or out:
        out.append("".join(cur).strip())
    return out


def parse_lines(lines: list[str]) -> list[Call]:
    """The completed calls of a ``strace -f -y`` output, unfinished/resumed pairs stitched."""
    pending: dict[int, str] = {}
    calls = []
    for raw in lines:
        line = raw.rstrip("\n")
        m = _UNFINISHED.match(line)
        if m:
            pending[int(m.group(1))] = m.group(2)
            continue
        m = _RESUMED.match(line)
        if m:
            pid = int(m.group(1))
            line = f"{pid} {pending.pop(pid, m.group(2) + '(')}{m.group(3)}"
        m = _LINE.match(line)
        if not m or m.group(4) == "?":
            continue
        calls.append(
            Call(
                int(m.group(1)),
                m.group(2),
                split_args(m.group(3)),
                int(m.group(4)),
                m.group(5),
                m.group(6),
            )
        )
    return calls


def _unquote(s: str) -> str:
    return s[1:-1].encode().decode("unicode_escape") if s.startswith('"') else s


def _fd_path(arg: str) -> tuple[str, str | None]:
    """(fd text, the path strace -y shows for it)."""
    m = _FD.match(arg)
    if not m:
        return arg, None
    path = m.group(2)
    if path and path.endswith(" (deleted)"):
        path = path[: -len(" (deleted)")]
    return m.group(1), path


def call_path(c: Call) -> str | None:
    """The absolute path a call acts on (the first path for a rename or link)."""
    if not c.args:
        return None
    if c.name in ("openat", "newfstatat", "statx", "mkdirat", "unlinkat", "renameat", "renameat2"):
        _, base = _fd_path(c.args[0])
        rel = _unquote(c.args[1]) if len(c.args) > 1 else ""
        if rel == "" and c.name in ("newfstatat", "statx"):
            return base  # AT_EMPTY_PATH: the descriptor itself
        return os.path.normpath(os.path.join(base or "/", rel))
    if c.name in ("fchmodat", "fchownat", "faccessat", "faccessat2", "readlinkat", "linkat"):
        _, base = _fd_path(c.args[0])
        return os.path.normpath(os.path.join(base or "/", _unquote(c.args[1])))
    if c.args[0].startswith('"'):
        return os.path.normpath(_unquote(c.args[0]))
    return _fd_path(c.args[0])[1]


def classify(c: Call, dir_fds: set[str]) -> str | None:
    """The metadata kind of a call, or None for calls that move bytes (or are not counted).

    ``dir_fds``: descriptors opened with O_DIRECTORY and not yet closed (kept up to date here),
    so that an fsync of one counts as a directory fsync."""
    n, a = c.name, c.args
    if n in ("open", "openat", "creat"):
        flags = a[2] if n == "openat" else (a[1] if len(a) > 1 else "")
        if "O_DIRECTORY" in flags and c.ret >= 0:
            dir_fds.add(str(c.ret))
        if n == "creat" or "O_CREAT" in flags:
            return "create"
        return "open_dir" if "O_DIRECTORY" in flags else "open"
    if n == "close":
        fd = _fd_path(a[0])[0]
        dir_fds.discard(fd)
        return "close"
    if n in ("mkdir", "mkdirat"):
        return "mkdir"
    if n in ("rename", "renameat", "renameat2"):
        return "rename"
    if n in ("unlink", "unlinkat"):
        return "rmdir" if n == "unlinkat" and "AT_REMOVEDIR" in a[-1] else "unlink"
    if n in ("link", "linkat", "symlink", "symlinkat"):
        return "link"
    if n in ("fsync", "fdatasync"):
        return "fsync_dir" if _fd_path(a[0])[0] in dir_fds else "fsync_file"
    if n == "fstat" or (n in ("newfstatat", "statx") and _unquote(a[1]) == ""):
        return "fstat"
    if n in _STAT_PATH:
        return "stat"
    if n == "fstatfs":
        return "stat"
    if n in _SETATTR:
        return "setattr"
    if n == "getdents64":
        return "readdir"
    return None


def role(path: str, root: str, dirs: set[str]) -> str:
    """What a path in the store or checkpoint directory is, for the breakdown."""
    base = os.path.basename(path)
    rel = os.path.relpath(path, root)
    if path in dirs or path == root:
        return "dir"
    if rel.startswith(".events"):
        return "events"
    if re.fullmatch(r"rank-\d+(\.[0-9a-f]{32})?\.ckg", base) or base.endswith(".distcp"):
        return "data"
    if base == "index.parquet":
        return "index"
    if base.startswith("MANIFEST.json") or base.startswith(".metadata"):
        return "manifest"
    if base == "LATEST" or (base.startswith(".LATEST.") and base.endswith(".tmp")):
        return "latest"
    return "other"


def footer_spans(root: str) -> dict[str, tuple[int, int]]:
    """Each ckptguard data file under ``root`` by its committed path: (footer offset, file
    size), from its trailer."""
    spans = {}
    for d, _, names in os.walk(root):
        for n in names:
            if n.endswith(".ckg"):
                p = os.path.join(d, n)
                with open(p, "rb") as f:
                    f.seek(-FOOTER_TRAILER, os.SEEK_END)
                    off = struct.unpack("<QQQ8s", f.read(FOOTER_TRAILER))[0]
                spans[p] = (off, os.path.getsize(p))
    return spans


def committed(path: str) -> str:
    """The path a file written in a staging directory has once its checkpoint is committed."""
    return _STAGED.sub(r"/\1/", path)


@dataclass
class Tally:
    """One rank's counts in one phase: ops by kind, by (kind, role), bytes read and written."""

    ops: collections.Counter = field(default_factory=collections.Counter)
    by_role: collections.Counter = field(default_factory=collections.Counter)
    failed: collections.Counter = field(default_factory=collections.Counter)
    read: collections.Counter = field(default_factory=collections.Counter)
    written: collections.Counter = field(default_factory=collections.Counter)


def _data_split(off: int, n: int, span: tuple[int, int] | None) -> tuple[int, int]:
    """(metadata, payload) bytes of a read of ``n`` bytes at ``off`` of a data file."""
    if span is None:  # a DCP data file: its items are payload
        return 0, n
    foot = span[0]
    meta = max(0, min(off + n, HEADER) - off) + max(0, off + n - max(off, foot))
    return meta, n - meta


def tally(
    calls: list[Call], root: str, dirs: set[str], spans: dict[str, tuple[int, int]]
) -> dict[str, Tally]:
    """Per phase (split at MARKER stats), the counts of the calls on paths under ``root``."""
    phases: dict[str, Tally] = {}
    cur = phases.setdefault("start", Tally())
    dir_fds: set[str] = set()
    pos: dict[str, int] = {}
    inside = root.rstrip("/") + "/"
    for c in calls:
        path = call_path(c)
        if path and path.startswith(MARKER):
            cur = phases.setdefault(path[len(MARKER) :], Tally())
            continue
        kind = classify(c, dir_fds)
        if not path or not (path == root or path.startswith(inside)):
            continue
        r = role(path, root, dirs)
        fd = _fd_path(c.args[0])[0] if c.args else ""
        if kind in ("open", "create", "open_dir") and c.ret >= 0:
            pos[str(c.ret)] = 0
        if c.name == "lseek" and c.ret >= 0:
            pos[fd] = c.ret
        if c.name in _READS and c.ret > 0:
            off = int(c.args[-1]) if c.name in ("pread64", "preadv", "preadv2") else pos.get(fd, 0)
            if c.name in ("read", "readv"):
                pos[fd] = off + c.ret
            if r == "data":
                meta, payload = _data_split(off, c.ret, spans.get(committed(path)))
                cur.read["data_meta"] += meta
                cur.read["data_payload"] += payload
            else:
                cur.read[r] += c.ret
        if c.name in _WRITES and c.ret > 0:
            cur.written[r] += c.ret
        if kind is None or (kind == "close" and r == "dir"):
            continue
        cur.ops[kind] += 1
        cur.by_role[f"{kind}:{r}"] += 1
        if c.ret < 0:
            cur.failed[f"{kind}:{c.error}"] += 1
    return phases


def dirs_of(root: str, calls: list[Call]) -> set[str]:
    """Directories under ``root``: those there now, and those any rank created or opened as one."""
    dirs = {d for d, _, _ in os.walk(root)}
    for c in calls:
        flags = c.args[2] if c.name == "openat" and len(c.args) > 2 else ""
        if c.name in ("mkdir", "mkdirat") or "O_DIRECTORY" in flags:
            p = call_path(c)
            if p:
                dirs.add(p)
    return dirs
