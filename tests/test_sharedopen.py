"""A collective load's open (``sharedopen``): ranks played by threads of one process, whose
coordinator passes bytes between them, so that each path (rank 0's error, a rank that cannot
open, ranks that disagree, bytes damaged in transit, messages in pieces) runs in one test. Real
MPI and gloo jobs load collectively in test_distributed.py."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import flip_byte, small_state

import ckptguard
from ckptguard import sharedopen
from ckptguard.api import resolve
from ckptguard.coord import Coordinator
from ckptguard.errors import (
    CheckpointAbortedError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    OptionsMismatchError,
)
from ckptguard.format.layout import INDEX, MANIFEST
from ckptguard.open import CheckpointReader


class ThreadJob:
    """The collectives of ``size`` ranks that are threads of this process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slot: Any = None
        self.slots: list[Any] = [None] * size
        self.tamper: Callable[[int, bytes], bytes] | None = None

    def rank(self, r: int) -> Coordinator:
        job = self

        class Rank(Coordinator):
            rank, size, name = r, job.size, "threads"

            def broadcast(self, data: bytes | None, timeout: float) -> bytes:
                if r == 0:
                    job.slot = data
                job.barrier.wait(timeout)
                out = job.slot
                job.barrier.wait(timeout)
                return job.tamper(r, out) if job.tamper is not None and r else out

            def gather(self, data: bytes, timeout: float) -> list[bytes] | None:
                job.slots[r] = data
                job.barrier.wait(timeout)
                out = list(job.slots) if r == 0 else None
                job.barrier.wait(timeout)
                return out

        return Rank()


_opened: dict[str, list[str]] = {}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and args and isinstance(args[0], str):
        name = threading.current_thread().name
        if name in _opened:
            _opened[name].append(os.path.basename(args[0]))


sys.addaudithook(_audit)


def run_ranks(size: int, body: Callable[[Coordinator], Any], job: ThreadJob | None = None) -> list:
    """``body(coordinator)`` on ``size`` threads; each one's result or exception, by rank."""
    job = job or ThreadJob(size)
    out: list[Any] = [None] * size

    def one(r: int) -> None:
        try:
            out[r] = body(job.rank(r))
        except BaseException as e:
            out[r] = e

    threads = [threading.Thread(target=one, args=(r,), name=f"rank-{r}") for r in range(size)]
    for t in threads:
        _opened[t.name] = []
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def opens(r: int, *names: str) -> int:
    return sum(_opened[f"rank-{r}"].count(n) for n in names)


def open_all(where: str, job_size: int = 3, **kw: Any) -> list:
    def body(c: Coordinator) -> Any:
        rd = sharedopen.open_for_job(c, where, lambda: resolve(where), None, 10)
        with rd:
            return rd.manifest["uuid"], rd.table.num_rows, rd.path

    return run_ranks(job_size, body, **kw)


def test_rank_0_reads_the_metadata_for_every_rank(store):
    info = ckptguard.save(small_state(1), os.path.join(store, "c1"))
    got = open_all(store)
    assert all(not isinstance(x, BaseException) for x in got), got
    assert {x for x in got} == {(info.uuid, got[0][1], info.path)}
    assert opens(0, MANIFEST) == 1 and opens(0, INDEX) == 1
    assert opens(1, MANIFEST, INDEX) == 0 and opens(2, MANIFEST, INDEX) == 0


def test_the_load_rebuilds_the_same_state_on_every_rank(store):
    state = small_state(2)
    ckptguard.save(state, os.path.join(store, "c1"))

    def body(c: Coordinator) -> Any:
        return ckptguard.load(store, coordinator=c, collective=True, timeout=10)

    for out in run_ranks(3, body):
        assert not isinstance(out, BaseException), out
        assert torch.equal(out["model"]["w"], state["model"]["w"])
        assert torch.equal(out["mask"], state["mask"]) and out["opt"] == state["opt"]


def test_rank_0s_error_is_raised_on_every_rank(tmp_path):
    got = open_all(str(tmp_path / "nothing-here"))
    assert all(isinstance(x, CheckpointNotFoundError) for x in got), got
    assert "on rank 0" in str(got[1])


def test_a_damaged_index_found_by_rank_0_fails_every_rank(store):
    info = ckptguard.save(small_state(3), os.path.join(store, "c1"))
    flip_byte(os.path.join(info.path, INDEX), 200)
    got = open_all(store)
    assert all(isinstance(x, CorruptCheckpointError) for x in got), got


def test_ranks_that_ask_for_different_paths_all_raise(store):
    ckptguard.save(small_state(4), os.path.join(store, "c1"))
    c2 = ckptguard.save(small_state(5), os.path.join(store, "c2"))

    def body(c: Coordinator) -> Any:
        where = c2.path if c.rank == 2 else store
        return sharedopen.open_for_job(c, where, lambda: resolve(where), None, 10)

    got = run_ranks(3, body)
    assert all(isinstance(x, OptionsMismatchError) for x in got), got
    assert "rank 2" in str(got[0])


def test_bytes_damaged_on_their_way_to_one_rank_fail_every_rank(store):
    ckptguard.save(small_state(6), os.path.join(store, "c1"))
    job = ThreadJob(3)

    def tamper(r: int, data: bytes) -> bytes:
        if r != 1 or len(data) < 1000:
            return data
        b = bytearray(data)
        b[-100] ^= 1  # inside the index bytes, which come last
        return bytes(b)

    job.tamper = tamper
    got = open_all(store, job=job)
    assert isinstance(got[1], CorruptCheckpointError), got
    for r in (0, 2):
        assert isinstance(got[r], CheckpointAbortedError) and got[r].rank == 1, got


def test_a_rank_that_sees_another_directory_fails_every_rank(store, monkeypatch):
    """The directory a rank opens is not the one rank 0 read (replaced in between)."""
    info = ckptguard.save(small_state(7), os.path.join(store, "c1"))
    real = sharedopen._follow

    def follow(head: dict, body: list[bytes]) -> Any:
        if threading.current_thread().name == "rank-2":
            head = {**head, "ino": head["ino"] + 1}
        return real(head, body)

    monkeypatch.setattr(sharedopen, "_follow", follow)
    got = open_all(store)
    assert isinstance(got[2], ckptguard.CheckpointReplacedError), got
    assert all(isinstance(got[r], CheckpointAbortedError) for r in (0, 1)), got
    assert info.path in str(got[2])


def test_messages_larger_than_a_piece_arrive_whole(store, monkeypatch):
    info = ckptguard.save(small_state(8), os.path.join(store, "c1"))
    monkeypatch.setattr(sharedopen, "_PIECE", 700)
    got = open_all(store)
    assert all(not isinstance(x, BaseException) and x[0] == info.uuid for x in got), got


def test_a_one_file_checkpoint_is_opened_by_each_rank(tmp_path):
    path = str(tmp_path / "model.ckg")
    ckptguard.save(small_state(9), path)
    got = open_all(path)
    assert all(not isinstance(x, BaseException) for x in got), got
    assert all(opens(r, "model.ckg") >= 1 for r in range(3))


def test_collective_load_refuses_a_file_object_and_a_bad_timeout(store):
    ckptguard.save(small_state(11), os.path.join(store, "c1"))
    with pytest.raises(ValueError, match="not a file"), open(__file__, "rb") as f:
        ckptguard.load(f, collective=True)
    with pytest.raises(ValueError, match="timeout"):
        ckptguard.load(store, collective=True, timeout=0)
    out = ckptguard.load(store, collective=True)  # a job of one process: an ordinary load
    assert out["opt"] == small_state(11)["opt"]


def test_reader_from_shared_bytes_matches_a_reader_of_the_files(store):
    info = ckptguard.save(small_state(12), os.path.join(store, "c1"))
    with CheckpointReader(info.path, keep_bytes=True) as a:
        shared = sharedopen.Shared(a.manifest_raw, a.index_raw or b"", os.stat(info.path).st_ino)
        with CheckpointReader(info.path, shared=shared) as b:
            assert b.manifest == a.manifest and b.table.equals(a.table)
            assert b.rows == a.rows
