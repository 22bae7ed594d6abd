"""Files that are not what they must be, and checkpoints replaced under a reader.

1. A FIFO or a character device in place of MANIFEST.json, LATEST, index.parquet or a data
   file: every command and API call returns a typed error (or names the damage) at once; nothing
   blocks on the FIFO and nothing reads the device. Each call runs in a thread with a timeout,
   so a regression fails (its blocked open is then released) instead of hanging the suite.
2. A load or verify racing an overwrite of the same name never reports corruption: it reads the
   new checkpoint, or raises CheckpointReplacedError.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import small_state

import ckptguard
from ckptguard.cli import cli
from ckptguard.format.manifest import MAX_MANIFEST_BYTES
from ckptguard.open import CheckpointReader

DATA = "rank-00000.ckg"
WAIT = 60.0  # seconds a call may take before it is taken to be blocked


def promptly(fn: Callable[[], Any], release: list[str]) -> tuple[Any, BaseException | None]:
    """(result, exception) of ``fn()`` run in a thread. If it is still running after ``WAIT``
    seconds, a writer opens and closes each FIFO of ``release`` (which unblocks a reader stuck
    in open) and the test fails."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001  # handed to the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(WAIT)
    if t.is_alive():
        for f in release:
            with contextlib.suppress(OSError):
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
        t.join(WAIT)
        pytest.fail(f"{fn} blocked on {release}")
    return out.get("value"), out.get("error")


def cli_run(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.output


def make_fifo(path: str) -> None:
    os.remove(path)
    os.mkfifo(path)


def make_zero_device(path: str) -> None:
    """A character device like /dev/zero (major 1, minor 5) at ``path``; skip if not allowed."""
    os.remove(path)
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot create a character device here: {e}")


@pytest.fixture
def store(tmp_path: Path) -> str:
    """c1 (whole) and c2 (LATEST, to be damaged)."""
    root = str(tmp_path / "store")
    ckptguard.save(small_state(1), os.path.join(root, "c1"), chunk_size=128)
    ckptguard.save(small_state(2), os.path.join(root, "c2"), chunk_size=128)
    return root


SPECIALS = {"fifo": make_fifo, "device": make_zero_device}
KIND = {"fifo": "a FIFO", "device": "a character device"}


def refused(call: Callable[[], Any], release: list[str], kind: str) -> BaseException:
    """``call`` raises a CorruptCheckpointError naming ``kind``, promptly; the error."""
    _, err = promptly(call, release)
    assert isinstance(err, ckptguard.CorruptCheckpointError), err
    assert kind in str(err)
    return err


@pytest.mark.parametrize("special", sorted(SPECIALS))
def test_manifest_that_is_not_a_file(store: str, special: str) -> None:
    """The store lists what is whole and names the damaged one; every command answers."""
    c2 = os.path.join(store, "c2")
    manifest = os.path.join(c2, "MANIFEST.json")
    SPECIALS[special](manifest)
    release, kind = [manifest], KIND[special]
    listed, err = promptly(lambda: ckptguard.Store(store).list(), release)
    assert err is None and [i.name for i in listed] == ["c1"]
    scan, err = promptly(lambda: ckptguard.Store(store).scan(), release)
    assert err is None and [i.name for i in scan.listed] == ["c1"]
    assert [(s.name, kind in s.reason) for s in scan.skipped] == [("c2", True)]
    refused(lambda: ckptguard.Store(store).latest(), release, kind)
    refused(lambda: ckptguard.load(c2), release, kind)
    refused(lambda: ckptguard.describe(c2), release, kind)
    report, err = promptly(lambda: ckptguard.verify(c2), release)
    assert err is None and not report.ok and kind in str(report.problems[0])
    (code, out), err = promptly(lambda: cli_run("ls", store), release)
    assert err is None and code == 0 and "c1" in out
    assert f"skipped c2: MANIFEST.json is {kind}" in out  # not "no committed checkpoints"
    (code, out), err = promptly(lambda: cli_run("verify", store), release)
    assert err is None and code == 1 and kind in out and "ok" in out
    for cmd in (("info", c2), ("latest", store)):
        (code, out), err = promptly(lambda cmd=cmd: cli_run(*cmd), release)
        assert err is None and code == 2 and kind in out, (cmd, out)


@pytest.mark.parametrize("special", sorted(SPECIALS))
def test_latest_that_is_not_a_file(store: str, special: str) -> None:
    latest = os.path.join(store, "LATEST")
    SPECIALS[special](latest)
    release, kind = [latest], KIND[special]
    refused(lambda: ckptguard.Store(store).latest(), release, kind)
    refused(lambda: ckptguard.load(store), release, kind)
    (code, out), err = promptly(lambda: cli_run("latest", store), release)
    assert err is None and code == 2 and kind in out
    (code, out), err = promptly(lambda: cli_run("ls", store), release)
    assert err is None and code == 0 and "c1" in out and "c2" in out and kind in out


@pytest.mark.parametrize("special", sorted(SPECIALS))
@pytest.mark.parametrize("name", ["index.parquet", DATA])
def test_checkpoint_file_that_is_not_a_file(store: str, special: str, name: str) -> None:
    c2 = os.path.join(store, "c2")
    path = os.path.join(c2, name)
    SPECIALS[special](path)
    release, kind = [path], KIND[special]
    err = refused(lambda: ckptguard.load(c2), release, kind)
    assert err.file == name
    report, err = promptly(lambda: ckptguard.verify(c2), release)
    assert err is None and not report.ok
    assert report.problems[0].file == name and kind in str(report.problems[0])
    (code, out), err = promptly(lambda: cli_run("verify", c2), release)
    assert err is None and code == 1 and kind in out
    if name == "index.parquet":
        (code, out), err = promptly(lambda: cli_run("info", c2), release)
        assert err is None and code == 2 and kind in out


def test_oversized_manifest_is_refused_unread(store: str) -> None:
    """A sparse MANIFEST.json larger than any manifest may be is refused by its size."""
    with open(os.path.join(store, "c2", "MANIFEST.json"), "r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)
    with pytest.raises(ckptguard.CorruptCheckpointError, match="bytes, more than"):
        ckptguard.load(os.path.join(store, "c2"))


# ------------------------------------------------------------- a reader racing an overwrite


def state(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2000,), float(seed)), "step": seed}


def swap_during(monkeypatch: pytest.MonkeyPatch, path: str, times: int) -> list[int]:
    """Before the reader opens a data file, overwrite ``path`` (up to ``times`` times); the
    seeds saved."""
    seeds: list[int] = []
    original = CheckpointReader.open_file

    def open_file(self: CheckpointReader, name: str) -> int:
        if len(seeds) < times:
            seeds.append(100 + len(seeds))
            ckptguard.save(state(seeds[-1]), path, overwrite=True, chunk_size=1024)
        return original(self, name)

    monkeypatch.setattr(CheckpointReader, "open_file", open_file)
    return seeds


@pytest.fixture(params=["exchange", "two-renames"])
def rename(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "two-renames":
        monkeypatch.setenv("CKPTGUARD_RENAME_EXCHANGE", "0")
    return request.param


def test_load_and_verify_read_the_checkpoint_that_replaced_theirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rename: str
) -> None:
    path = str(tmp_path / "s" / "c")
    ckptguard.save(state(1), path, chunk_size=1024)
    seeds = swap_during(monkeypatch, path, 1)
    assert ckptguard.load(path)["step"] == 100 and seeds == [100]
    seeds = swap_during(monkeypatch, path, 1)
    report = ckptguard.verify(path)
    assert report.ok and report.chunks_checked and seeds == [100]
    seeds = swap_during(monkeypatch, path, 1)
    assert ckptguard.load(str(tmp_path / "s"))["step"] == 100  # through LATEST


def test_replaced_twice_is_a_replaced_error_not_corruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rename: str
) -> None:
    path = str(tmp_path / "s" / "c")
    ckptguard.save(state(1), path, chunk_size=1024)
    swap_during(monkeypatch, path, 10)
    for read in (ckptguard.load, ckptguard.verify):
        with pytest.raises(ckptguard.CheckpointReplacedError, match="replaced or removed"):
            read(path)
    code, out = cli_run("verify", path)
    assert code == 2 and "replaced or removed" in out and "FAIL" not in out


def test_reader_of_a_deleted_checkpoint(tmp_path: Path) -> None:
    """A checkpoint deleted under an open reader is not reported as damaged."""
    store = tmp_path / "s"
    ckptguard.save(state(1), str(store / "c"), chunk_size=1024)
    ckptguard.save(state(2), str(store / "d"), chunk_size=1024)
    with CheckpointReader(str(store / "c")) as rd:
        ckptguard.Store(str(store)).delete("c")
        with pytest.raises(ckptguard.CheckpointReplacedError):
            rd.open_file(DATA)


def test_missing_file_of_a_checkpoint_in_place_is_corruption(tmp_path: Path) -> None:
    path = str(tmp_path / "s" / "c")
    ckptguard.save(state(1), path, chunk_size=1024)
    with CheckpointReader(path) as rd:
        os.remove(os.path.join(path, DATA))
        with pytest.raises(ckptguard.CorruptCheckpointError, match="data file is missing"):
            rd.open_file(DATA)


OVERWRITER = """
import os, sys, torch, ckptguard
path, stop = sys.argv[1:]
i = 1
while not os.path.exists(stop):
    state = {"w": torch.full((2000,), float(i)), "step": i}
    ckptguard.save(state, path, overwrite=True, chunk_size=1024)
    i += 1
print(i - 1)
"""


def test_real_race_of_reads_and_overwrites(tmp_path: Path) -> None:
    """Another process overwrites the name in a loop; loads and verifies of it never see
    damage: each reads a whole checkpoint, or says it was replaced."""
    path, stop = str(tmp_path / "s" / "c"), str(tmp_path / "stop")
    ckptguard.save(state(0), path, chunk_size=1024)
    writer = subprocess.Popen(
        [sys.executable, "-c", OVERWRITER, path, stop], stdout=subprocess.PIPE, text=True
    )
    outcomes: Counter[str] = Counter()
    try:
        first = ckptguard.Store(os.path.dirname(path)).list()[0].uuid
        while (
            writer.poll() is None and ckptguard.Store(os.path.dirname(path)).list()[0].uuid == first
        ):
            time.sleep(0.05)  # until its first overwrite is committed
        for n in range(200):
            try:
                if n % 2:
                    out = ckptguard.load(path)
                    assert torch.equal(out["w"], torch.full((2000,), float(out["step"])))
                else:
                    report = ckptguard.verify(path)
                    assert report.ok, report.problems
                outcomes["ok"] += 1
            except ckptguard.CheckpointReplacedError:
                outcomes["replaced"] += 1
    finally:
        Path(stop).touch()
        saved, _ = writer.communicate(timeout=120)
    assert writer.returncode == 0 and int(saved) > 0 and outcomes["ok"] > 0, outcomes
