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
from conftest import flip_byte, reorder_footer, resign_manifest, small_state

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


def without_locator(path: str) -> None:
    """Drop the locator (format.md 4.5): the checkpoint is then opened through its index."""

    def mut(body: dict) -> None:
        body["features"].remove("locator")
        del body["locator"]

    resign_manifest(path, mut)


@pytest.mark.parametrize("located", [True, False])
def test_rank_0_reads_the_metadata_for_every_rank(store, located):
    info = ckptguard.save(small_state(1), os.path.join(store, "c1"))
    if not located:
        without_locator(info.path)
    got = open_all(store)
    assert all(not isinstance(x, BaseException) for x in got), got
    assert {x for x in got} == {(info.uuid, got[0][1], info.path)}
    assert opens(0, MANIFEST) == 1 and opens(0, INDEX) == (0 if located else 1)
    assert opens(1, MANIFEST, INDEX) == 0 and opens(2, MANIFEST, INDEX) == 0
    assert (got[0][1] == 0) == located  # located: no rows until a load says which it reads


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
    without_locator(info.path)
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


# ------------------------------------------------- loads that use the locator (format.md 4.5)

BLOCK = torch.arange(64, dtype=torch.float32).reshape(8, 8)


def _sharded(path: str, block: bool = True) -> torch.Tensor:
    """A checkpoint of 4 ranks, each holding 4 rows of a 16 x 8 tensor ``w`` (and a quarter of
    the 8 x 8 ``BLOCK``, as ``b``); the full ``w``."""
    full = torch.arange(16 * 8, dtype=torch.float32).reshape(16, 8)

    def body(c: Coordinator) -> Any:
        r = c.rank
        i, j = 4 * (r // 2), 4 * (r % 2)
        state: dict[str, Any] = {
            "w": ckptguard.Shard(full[4 * r : 4 * r + 4].clone(), (16, 8), (4 * r, 0)),
            "step": 5,
        }
        if block:
            state["b"] = ckptguard.Shard(BLOCK[i : i + 4, j : j + 4].clone(), (8, 8), (i, j))
        return ckptguard.save(state, path, coordinator=c)

    got = run_ranks(4, body)
    assert all(not isinstance(x, BaseException) for x in got), got
    return full


def _local(x: Any) -> torch.Tensor:
    return (x.local if isinstance(x, ckptguard.Shard) else x).clone()


def _load_rows(store: str, size: int, rows: int) -> list:
    """A collective load by ``size`` ranks, rank r wanting rows r*rows.. of ``w`` (and the
    rest of the tree whole)."""

    def body(c: Coordinator) -> Any:
        w = ckptguard.Shard(torch.zeros(rows, 8), (16, 8), (c.rank * rows, 0))
        out = ckptguard.load(store, template={"w": w}, coordinator=c, collective=True, timeout=10)
        return _local(out["w"]), out.get("b"), out["step"]

    return run_ranks(size, body)


def test_a_resharding_load_reads_only_the_files_of_its_cells(store):
    full = _sharded(os.path.join(store, "c1"), block=False)
    got = _load_rows(store, 2, 6)  # rank 0: rows 0-5 (files 0, 1); rank 1: rows 6-11 (1, 2)
    for r, out in enumerate(got):
        assert not isinstance(out, BaseException), out
        assert torch.equal(out[0], full[6 * r : 6 * r + 6]) and out[2] == 5
    assert opens(0, INDEX) == opens(1, INDEX) == 0
    assert opens(0, MANIFEST) == 1 and opens(1, MANIFEST) == 0
    assert opens(0, "rank-00002.ckg", "rank-00003.ckg") == 0
    assert opens(1, "rank-00000.ckg", "rank-00003.ckg") == 0
    # each file once: the descriptor that read its footer reads its records
    assert [opens(0, f"rank-0000{f}.ckg") for f in (0, 1)] == [1, 1]
    assert [opens(1, f"rank-0000{f}.ckg") for f in (1, 2)] == [1, 1]


def test_a_tensor_loaded_whole_reads_every_file_of_its_grid(store):
    _sharded(os.path.join(store, "c1"))
    got = _load_rows(store, 2, 8)
    for out in got:
        assert not isinstance(out, BaseException), out
        assert torch.equal(_local(out[1]), BLOCK)
    assert all(opens(r, f"rank-0000{f}.ckg") >= 1 for r in (0, 1) for f in range(4))


def test_a_located_load_reads_no_index_so_verify_finds_its_damage(store):
    path = os.path.join(store, "c1")
    full = _sharded(path, block=False)
    flip_byte(os.path.join(path, INDEX), 100)
    got = _load_rows(store, 2, 8)
    assert all(torch.equal(out[0], full[8 * r : 8 * r + 8]) for r, out in enumerate(got)), got
    assert not ckptguard.verify(path).ok


def test_a_footer_the_manifest_did_not_hash_fails_the_ranks_that_read_it(store):
    """A footer rewritten with a matching trailer hash, rows unchanged (members reordered):
    the ranks that read its file refuse it; the others load."""
    import xxhash

    path = os.path.join(store, "c1")
    _sharded(path, block=False)
    f = os.path.join(path, "rank-00003.ckg")
    os.chmod(f, 0o644)
    with open(f, "rb") as fh:
        data = bytearray(fh.read())
    off, end = int.from_bytes(data[-32:-24], "little"), len(data) - 32
    footer = reorder_footer(bytes(data[off:end]))
    assert len(footer) == end - off
    data[off:end] = footer
    data[-16:-8] = xxhash.xxh3_64_intdigest(footer).to_bytes(8, "little")
    with open(f, "wb") as fh:
        fh.write(bytes(data))
    got = _load_rows(store, 2, 8)  # rank 0: files 0 and 1; rank 1: files 2 and 3
    assert not isinstance(got[0], BaseException), got
    assert isinstance(got[1], CorruptCheckpointError), got
    assert "locator" in str(got[1]) and "rank-00003.ckg" in str(got[1])


def test_a_grid_that_names_the_wrong_file_is_caught(store):
    path = os.path.join(store, "c1")
    _sharded(path, block=False)

    def mut(body: dict) -> None:
        t = next(i for i, e in enumerate(body["tensors"]) if e["key"] == "w")
        g = body["locator"]["grids"][body["locator"]["tensors"][t]]
        g["files"][3] = 2  # rows 12-15 said to be in rank 2's file

    resign_manifest(path, mut)
    got = _load_rows(store, 2, 8)
    assert not isinstance(got[0], BaseException), got
    assert isinstance(got[1], CorruptCheckpointError), got
    assert "locator" in str(got[1])
    with pytest.raises(CorruptCheckpointError, match="disagrees with the index"):
        ckptguard.load(path)  # a reader of the whole index compares the grid with it


def test_a_located_load_reads_each_footer_once(store, monkeypatch):
    """The footers a rank reads to locate its rows are not read again when it opens those
    files for their records: it checks their header and that the trailer is the same."""
    from ckptguard import indexread
    from ckptguard import open as opening

    path = os.path.join(store, "c1")
    full = _sharded(path, block=False)
    read: list[int] = []
    real = indexread.footer_rows

    def counted(fd: int, *args: Any) -> Any:
        read.append(fd)
        return real(fd, *args)

    def whole_check(*args: Any) -> None:
        raise AssertionError("a located file's footer read again")

    monkeypatch.setattr(indexread, "footer_rows", counted)
    monkeypatch.setattr(opening, "check_data_file", whole_check)
    got = _load_rows(store, 2, 8)
    assert all(torch.equal(out[0], full[8 * r : 8 * r + 8]) for r, out in enumerate(got)), got
    assert len(read) == 4  # two files per rank


def test_files_past_the_kept_descriptors_are_reopened_and_checked(store, monkeypatch):
    """Past KEPT_OPEN located files a rank closes the rest after their footers and opens them
    again for their records, checking their header and that the trailer is unchanged."""
    from ckptguard import open as opening

    path = os.path.join(store, "c1")
    full = _sharded(path, block=False)
    monkeypatch.setattr(opening, "KEPT_OPEN", 1)
    got = _load_rows(store, 2, 8)
    assert all(torch.equal(out[0], full[8 * r : 8 * r + 8]) for r, out in enumerate(got)), got
    assert sorted(opens(0, f"rank-0000{f}.ckg") for f in (0, 1)) == [1, 2]
