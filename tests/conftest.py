"""Shared fixtures and helpers: a store directory, a small state, and tools that damage or
re-sign a checkpoint on disk (written from docs/format.md, via tests/independent_reader.py)."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import independent_reader as ir  # noqa: E402

# slurm, job; filled; mlflow_server; moto_server, s3
pytest_plugins = ["slurmkit", "clikit", "mlflowkit", "s3kit"]

# Files whose tests the pure-Python pass of `make test` (CKPTGUARD_NATIVE=0) leaves out: static
# checks of the source, tests that run each backend themselves, and units that never encode or
# read a record (planning, placement, the rank report, sizes, CLI arguments). Single tests
# elsewhere carry the marker where they start no save or load.
BACKEND_INDEPENDENT_FILES = {
    "test_architecture.py",
    "test_native.py",
    "test_cli_run.py",
    "test_inventory.py",
    "test_place.py",
    "test_plan.py",
    "test_report.py",
    "test_select.py",
    "test_units.py",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "backend_independent: the result does not depend on CKPTGUARD_NATIVE; run on one backend",
    )
    config.addinivalue_line(
        "markers",
        "framework_job: a framework's training job in processes of its own (torchrun, DDP); "
        "its saves and loads take the paths the rest of the suite runs on both backends, so the "
        "pure-Python pass of `make test` leaves it out. Each framework keeps a bitwise resume or "
        "its in-process tests on both backends",
    )
    config.addinivalue_line(
        "markers",
        "rank_job: a job of several processes (mpiexec, srun, the agent) whose ranks encode, "
        "write and read through the functions the in-process tests run on both backends, and "
        "whose subject (coordination, collectives, a handover, a launcher) is the backend's "
        "neither; the pure-Python pass of `make test` leaves it out and keeps representatives: "
        "a sharded save, the resharding loads, a parallel verify finding a flipped byte, a "
        "disk that fills during a save and the fault cases inside the backend's writes",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in BACKEND_INDEPENDENT_FILES:
            item.add_marker(pytest.mark.backend_independent)


def run_command(
    args: list[Any],
    timeout: float,
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    echo: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` outside any Slurm job or MPI world of the test run itself (``clean_env``,
    with ``env``'s variables set over it) in ``cwd``; fail the test if it does not finish in
    ``timeout`` s. Its output is shown on failure unless ``echo`` is false (a poll repeated
    hundreds of times would push the output that matters out of the report)."""
    from slurmkit import clean_env  # a plugin (below): imported once pytest loaded it

    cmd = [str(a) for a in args]
    full = {**clean_env(), **(env or {})}
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=full, cwd=cwd
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s: {exc.stderr!r}")
    if echo:
        print(f"$ {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A store path inside a fresh temporary directory (not yet created)."""
    return str(tmp_path / "store")


def small_state(seed: int = 0) -> dict[str, Any]:
    """A few small tensors of different dtypes plus plain values."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "w": torch.randn(8, 16, generator=g),
            "b": torch.arange(16, dtype=torch.int64),
        },
        "opt": {"lr": 0.1, "step": seed},
        "mask": torch.rand(33, generator=g) > 0.5,
    }


def free_port() -> int:
    """A TCP port free on this host now (for MASTER_PORT of a gloo job started by a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flip_byte(path: str | os.PathLike, offset: int, mask: int = 0x01) -> None:
    """XOR one byte of a file in place (negative offsets count from the end)."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        pos = offset if offset >= 0 else size + offset
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ mask]))


def read_body(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed manifest body (framing and checksum checked)."""
    return ir.parse_manifest(ir.read_manifest_bytes(str(ckpt_dir)))


def resign_manifest(
    ckpt_dir: str | os.PathLike, body_mutator: Callable[[dict[str, Any]], Any]
) -> None:
    """Rewrite MANIFEST.json with ``body_mutator`` applied to its body (in place, or returning a
    new body), correctly framed and checksummed per format.md section 3."""
    import json

    raw = ir.read_manifest_bytes(str(ckpt_dir))
    _, a, b = ir.manifest_span(raw)
    body = json.loads(raw[a:b])
    new = body_mutator(body)
    body = body if new is None else new
    data = json.dumps(body, separators=(",", ":")).encode()
    Path(ckpt_dir, ir.MANIFEST).write_bytes(ir.frame_manifest(data))


def rewrite_index(
    ckpt_dir: str | os.PathLike,
    table_mutator: Callable[[pa.Table], pa.Table],
    body_mutator: Callable[[dict[str, Any]], Any] | None = None,
) -> None:
    """Rewrite index.parquet with ``table_mutator`` and re-sign the manifest (index size and
    hash, then ``body_mutator`` if given), so a reader gets past the hashes to the rules."""
    path = Path(ckpt_dir, ir.INDEX)
    table = table_mutator(pq.read_table(path))
    pq.write_table(table, path)
    data = path.read_bytes()

    def fix(body: dict[str, Any]) -> Any:
        body["index"]["size"] = len(data)
        body["index"]["xxh3_128"] = ir.xxh3_128_hex(data)
        if body_mutator is not None:
            new = body_mutator(body)
            body = body if new is None else new
        relocate(ckpt_dir, body, table)
        return body

    resign_manifest(ckpt_dir, fix)


def relocate(ckpt_dir: str | os.PathLike, body: dict[str, Any], table: pa.Table) -> None:
    """Make ``body``'s locator (format.md 4.5) agree with the index rows ``table`` and the data
    files' footers, as a forger who knows the format would; where they give none (rows of
    unknown tensors, an unreadable footer), drop the feature and the member instead."""
    if "locator" not in body:
        return
    loc = body["locator"]
    try:
        by_tensor: dict[int, dict] = collections.defaultdict(lambda: collections.defaultdict(set))
        position = {f["name"]: i for i, f in enumerate(body["files"])}
        for r in table.to_pylist():
            box = (tuple(r["shard_offsets"]), tuple(r["shard_lengths"]))
            by_tensor[r["tensor"]][box].add(position[r["file"]])
        assert set(by_tensor) <= set(range(len(body["tensors"])))
        grids = [
            ir.expected_grid(t["shape"], by_tensor.get(i, {}))
            for i, t in enumerate(body["tensors"])
        ]
        footers = [
            ir.scan_data_file(os.path.join(ckpt_dir, f["name"])).footer for f in body["files"]
        ]
    except (AssertionError, KeyError, TypeError, OSError, ir.SpecViolation):
        body["features"] = [f for f in body["features"] if f != "locator"]
        del body["locator"]
        return
    loc["grids"] = [g for g in grids if g is not None]
    refs = iter(range(len(loc["grids"])))
    loc["tensors"] = [None if g is None else next(refs) for g in grids]
    loc["footers"] = [ir.xxh3_128_hex(f) for f in footers]
    if "footer_sha256" in loc:
        loc["footer_sha256"] = [hashlib.sha256(f).hexdigest() for f in footers]


def reorder_footer(footer: bytes) -> bytes:
    """The same footer with its ``rank`` and ``uuid`` members swapped: other bytes of the same
    length, the same rows."""
    head, rows = footer.split(b',"rows":', 1)
    rank, uuid = head[1:].split(b",", 1)
    return b"{" + uuid + b"," + rank + b',"rows":' + rows


def rewrite_rows(
    ckpt_dir: str | os.PathLike,
    rows_mutator: Callable[[list[dict[str, Any]]], Any],
    body_mutator: Callable[[dict[str, Any]], Any] | None = None,
) -> None:
    """``rewrite_index`` on the rows as Python dicts (schema kept)."""

    def mut(table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        new = rows_mutator(rows)
        return pa.Table.from_pylist(rows if new is None else new, schema=table.schema)

    rewrite_index(ckpt_dir, mut, body_mutator)


# Paths opened while a recorder is active (sys.audit "open" events: open(), os.open(), ...).
_recorders: list[list[str]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _recorders and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        p = os.fsdecode(args[0])
        for rec in _recorders:
            rec.append(p)


sys.addaudithook(_audit)


@contextlib.contextmanager
def record_opens() -> Iterator[list[str]]:
    """Collect the paths (as given, maybe relative to a dir_fd) Python code opens in the block."""
    rec: list[str] = []
    _recorders.append(rec)
    try:
        yield rec
    finally:
        _recorders.remove(rec)


def opened_outside(opened: list[str], ckpt: str, allowed: tuple[str, ...] = ()) -> list[str]:
    """The paths of ``opened`` (from ``record_opens``) that leave the checkpoint directory
    ``ckpt``. A relative path is relative to a dir_fd inside it, so only a '/' or a '..' leaves
    it; an absolute one leaves it when it is neither ``ckpt``, inside it, nor in ``allowed`` and
    lies beside the store (where the tests put their decoys) or names a decoy."""
    beside = os.path.dirname(os.path.dirname(ckpt))
    bad = []
    for p in opened:
        if not os.path.isabs(p):
            if "/" in p or p == "..":
                bad.append(p)
            continue
        q = os.path.normpath(p)
        if q == ckpt or q.startswith(ckpt + os.sep) or q in allowed:
            continue
        if q.startswith(beside) or "passwd" in p or "x.ckg" in p:
            bad.append(p)
    return bad


def snapshot(root: str, *, staging: bool = False) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root`` (LATEST included): a file with its size, mtime and a hash of its
    bytes, a symlink with its target, a directory by name. ``.staging`` is left out unless
    ``staging``: a failed save may leave garbage there for gc; a failed read may not even create it.
    ``.events`` is always left out: a failed save or load records that it failed there (its
    event, docs/operations.md), which is what an operator's metrics are made of.
    """
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if not staging and rel.split(os.sep)[0] == ".staging":
            continue
        if rel.split(os.sep)[0] == ".events":
            continue
        for f in dirnames + filenames:
            if rel == "." and f == ".events":
                continue
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                entry: tuple[Any, ...] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                entry = ("dir",)
            else:
                with open(p, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
                entry = ("file", st.st_size, st.st_mtime_ns, digest)
            out[os.path.relpath(p, root)] = entry
    return out


def commit_one(store: str, name: str = "c1", **kw: Any) -> str:
    """Save a small multi-chunk checkpoint; return its path."""
    import ckptguard

    path = os.path.join(store, name)
    ckptguard.save(small_state(), path, chunk_size=128, **kw)
    return path


def assert_store_is(store: str, names: list[str], latest: str) -> None:
    """The store holds exactly ``names`` (plus LATEST and .staging), LATEST loads and verifies."""
    import ckptguard

    s = ckptguard.Store(store)
    assert [i.name for i in s.list()] == names
    assert ir.list_store(store) == sorted(names)
    latest_info = s.latest()
    assert latest_info is not None and latest_info.name == latest
    assert set(os.listdir(store)) - {".staging", ".events"} == {*names, "LATEST"}
    ckptguard.load(store)
    assert ckptguard.verify(store).ok
    ir.read_checkpoint(store)


def assert_refused(path: str, error: type[BaseException]) -> None:
    """load raises ``error``; verify raises it too or reports a problem."""
    import ckptguard

    with pytest.raises(error):
        ckptguard.load(path)
    try:
        report = ckptguard.verify(path)
    except error:
        return
    assert not report.ok and report.problems


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """``mount(opts)`` mounts a fresh tmpfs and returns it; all unmounted at teardown. Skips
    the test where this process may not mount."""
    mounted: list[str] = []

    def mount(opts: str) -> str:
        d = str(tmp_path / f"mnt{len(mounted)}")
        os.mkdir(d)
        if os.geteuid() != 0 or not succeeds(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", d]):
            pytest.skip("needs root and permission to mount a tmpfs")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        succeeds(["umount", "-l", d])


def succeeds(args: list[Any], timeout: float = 120) -> bool:
    """Whether the command ``args`` (run by ``run_command``) exits 0."""
    return run_command(args, timeout).returncode == 0
