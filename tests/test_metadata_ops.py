"""benchmarks/syscall_trace.py and metadata_ops.py: parsing and classifying strace lines (no
strace needed: the lines are ones strace printed for a ckptguard save and load), and the fit."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType
from typing import Any

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
S = "/w/store"
LINES = f"""\
11 newfstatat(AT_FDCWD</w>, "/ckg-phase-marker/save", 0x7ffc, 0) = -1 ENOENT (No such file)
11 mkdir("{S}/.staging/c.1", 0755) = 0
11 openat(AT_FDCWD</w>, "{S}/.staging", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 3<{S}/.staging>
11 fsync(3<{S}/.staging>)              = 0
11 close(3<{S}/.staging>)              = 0
12 openat(AT_FDCWD</w>, "{S}/.staging/c.1/rank-00000.ckg", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, \
0644 <unfinished ...>
11 newfstatat(AT_FDCWD</w>, "/usr/lib/x.so", {{st_mode=S_IFREG|0644, ...}}, 0) = 0
12 <... openat resumed>) = 3<{S}/.staging/c.1/rank-00000.ckg>
12 fsync(3<{S}/.staging/c.1/rank-00000.ckg>) = 0
11 chmod("{S}/.staging/c.1/rank-00000.ckg", 0444) = 0
11 rename("{S}/.staging/c.1", "{S}/c") = 0
11 newfstatat(AT_FDCWD</w>, "/ckg-phase-marker/load", 0x7ffc, 0) = -1 ENOENT (No such file)
11 openat(AT_FDCWD</w>, "{S}/c", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 4<{S}/c>
11 newfstatat(4<{S}/c>, "rank-00000.ckg", {{st_mode=S_IFREG|0444, st_size=9000, ...}}, \
AT_SYMLINK_NOFOLLOW) = 0
11 openat(4<{S}/c>, "rank-00000.ckg", O_RDONLY|O_NONBLOCK|O_NOFOLLOW|O_CLOEXEC) \
= 5<{S}/c/rank-00000.ckg>
11 newfstatat(5<{S}/c/rank-00000.ckg>, "", {{st_mode=S_IFREG|0444, ...}}, AT_EMPTY_PATH) = 0
11 pread64(5<{S}/c/rank-00000.ckg>, ""..., 4096, 0) = 4096
11 pread64(5<{S}/c/rank-00000.ckg>, ""..., 4096, 4096) = 4096
11 pread64(5<{S}/c/rank-00000.ckg>, ""..., 808, 8192) = 808
11 openat(4<{S}/c>, "MANIFEST.json", O_RDONLY|O_NONBLOCK|O_NOFOLLOW|O_CLOEXEC) \
= 6<{S}/c/MANIFEST.json>
11 read(6<{S}/c/MANIFEST.json>, ""..., 3929) = 3928
11 close(5<{S}/c/rank-00000.ckg>) = 0
"""


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def trace() -> ModuleType:
    return _load("syscall_trace")


@pytest.fixture(scope="module")
def bench(trace: ModuleType) -> ModuleType:
    return _load("metadata_ops")


def test_split_args_keeps_structs_and_quoted_commas(trace: Any) -> None:
    got = trace.split_args('3<"/a,b">, "x, y", {st_mode=S_IFREG, st_size=1}, AT_EMPTY_PATH')
    assert got == ['3<"/a,b">', '"x, y"', "{st_mode=S_IFREG, st_size=1}", "AT_EMPTY_PATH"]


def test_unfinished_call_is_stitched_and_paths_resolved(trace: Any) -> None:
    calls = trace.parse_lines(LINES.splitlines())
    create = [c for c in calls if c.name == "openat" and c.pid == 12]
    assert len(create) == 1 and create[0].ret == 3
    assert trace.call_path(create[0]) == f"{S}/.staging/c.1/rank-00000.ckg"
    stat = next(c for c in calls if c.name == "newfstatat" and c.args[0].startswith("4<"))
    assert trace.call_path(stat) == f"{S}/c/rank-00000.ckg"


def test_kinds_roles_and_bytes_per_phase(trace: Any) -> None:
    calls = trace.parse_lines(LINES.splitlines())
    dirs = {S, f"{S}/.staging", f"{S}/.staging/c.1", f"{S}/c"}
    # footer at 8192, file size 9000 (808 bytes of footer and trailer)
    phases = trace.tally(calls, S, dirs, {f"{S}/c/rank-00000.ckg": (8192, 9000)})
    save, load = phases["save"], phases["load"]
    assert save.ops == {
        "mkdir": 1,
        "open_dir": 1,
        "fsync_dir": 1,
        "create": 1,
        "fsync_file": 1,
        "setattr": 1,
        "rename": 1,
    }
    assert save.by_role["create:data"] == 1 and save.by_role["rename:dir"] == 1
    assert load.ops == {"open_dir": 1, "stat": 1, "open": 2, "fstat": 1, "close": 1}
    assert load.by_role["open:manifest"] == 1
    # the header (4096) and the footer with its trailer (808) are metadata, the record payload
    assert load.read == {"data_meta": 4096 + 808, "data_payload": 4096, "manifest": 3928}
    assert "/usr/lib/x.so" not in str(phases)


def test_staged_paths_map_to_committed_ones(trace: Any) -> None:
    staged = f"{S}/.staging/step-2.{'ab' * 16}/rank-00003.ckg"
    assert trace.committed(staged) == f"{S}/step-2/rank-00003.ckg"
    assert trace.committed(f"{S}/step-2/index.parquet") == f"{S}/step-2/index.parquet"


def test_fit_is_exact_on_a_line_and_says_when_not(bench: Any) -> None:
    line = bench.fit({2: 7, 4: 11, 8: 19})
    assert (line["per_job"], line["per_rank"], line["linear"]) == (3, 2, True)
    assert line["at_10000"] == 20003
    assert bench.fit({2: 7, 4: 12, 8: 19})["linear"] is False
