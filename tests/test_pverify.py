"""Parallel verify (ckptguard.pverify): the split of the rows, the merged report (equal to the
single-process one, checked in-process with thread ranks over many kinds of damage), and the real
command under `mpiexec -n 4` and `srun -n 4 --mpi=pmi2`."""

from __future__ import annotations

import errno
import importlib
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import flip_byte, run_command
from forgery import forge_chunk, set_first_float
from mpikit import MPIEXEC, need_mpi
from threadcoord import rank_results

import ckptguard
from ckptguard.cli import cli
from ckptguard.format.index import Row
from ckptguard.open import CheckpointReader
from ckptguard.pverify import ParallelVerifyError, Segment, split, verify_parallel
from ckptguard.read import read_record, verify_checkpoint

BIN = Path(sys.executable).parent
CLI = (
    [str(BIN / "ckptguard")]
    if (BIN / "ckptguard").exists()
    else [sys.executable, "-m", "ckptguard.cli"]
)
TIMEOUT = 90  # seconds for one launch of 4 ranks (each imports torch)

pytestmark = pytest.mark.timeout(240)

# Saves one checkpoint from every rank of an MPI job: a tensor sharded across the ranks (8 chunks of
# 4 KiB per rank, some compressible), a replicated one (written once) and plain values.
SAVE = """\
import sys, torch, ckptguard
from mpi4py import MPI
from ckptguard import Shard

rank, world = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
w = torch.randn(world * 32, 256, generator=torch.Generator().manual_seed(3))
w[:, 128:] = 0.5  # half of each row compresses
a = rank * 32
state = {
    "model": {"w": Shard(w[a : a + 32].clone(), tuple(w.shape), (a, 0)), "b": torch.arange(3000.0)},
    "step": 5,
}
ckptguard.save(state, sys.argv[1], step=5, chunk_size=4096, coordinator="mpi", timeout=60)
"""


def flip_payload(ckpt: Path, file: str, nth: int = 0) -> str:
    """Flip one byte in the payload of the ``nth`` record of ``file``; the tensor key it holds."""
    rows = sorted(
        (r for r in pq.read_table(ckpt / "index.parquet").to_pylist() if r["file"] == file),
        key=lambda r: r["offset"],
    )
    row = rows[nth]
    flip_byte(ckpt / file, row["offset"] + 64 + row["stored_len"] // 2, 0xFF)
    return row["key"]


# ---- the split ----


def _check_split(files: list[tuple[str, list[int]]], n: int) -> list[list[Segment]]:
    shares = split(files, n)
    assert len(shares) == n
    assert split(files, n) == shares  # deterministic
    # in rank order, the segments walk the files in order, each row exactly once
    walked = [s for share in shares for s in share]
    assert [s.file for s in walked] == sorted(
        [s.file for s in walked], key=[f for f, _ in files].index
    )
    for name, w in files:
        mine = [s for s in walked if s.file == name]
        assert mine, f"{name} checked by no rank"
        assert mine[0].start == 0 and mine[-1].stop == len(w)
        assert all(a.stop == b.start for a, b in zip(mine, mine[1:], strict=False))  # no gap
        assert all(s.start < s.stop for s in mine) or (len(w) == 0 and len(mine) == 1)
        owners = [r for r, share in enumerate(shares) for s in share if s.file == name]
        assert len(owners) == len(set(owners))  # one run of each file per rank: sequential reads
    # balanced: each rank within one row of an even share
    total = sum(sum(w) for _, w in files)
    biggest = max((x for _, w in files for x in w), default=0)
    for share in shares:
        load = sum(sum(dict(files)[s.file][s.start : s.stop]) for s in share)
        assert abs(load - total / n) <= biggest, (load, total / n, biggest)
    return shares


def test_split_covers_every_row_once_and_balances() -> None:
    rng = random.Random(5)
    for trial in range(200):
        files = [
            (f"rank-{i:05d}.ckg", [rng.choice(sizes) for _ in range(rng.randrange(0, 40))])
            for i in range(rng.randrange(1, 9))
            for sizes in [[4096, 8192, rng.randrange(4096, 1 << 20)]]
        ]
        _check_split(files, rng.randrange(1, 12) if trial else 1)


def test_split_edge_cases() -> None:
    assert split([], 3) == [[], [], []]
    # no rows at all: rank 0 opens every file
    assert split([("a", []), ("b", [])], 3) == [[Segment("a", 0, 0), Segment("b", 0, 0)], [], []]
    # equal rows deal evenly; more ranks than rows leaves some idle
    assert _check_split([("a", [4096] * 8)], 4) == [
        [Segment("a", 2 * r, 2 * r + 2)] for r in range(4)
    ]
    shares = _check_split([("a", [4096] * 2), ("b", []), ("c", [4096])], 6)
    assert shares == [
        [],
        [Segment("a", 0, 1)],
        [],
        [Segment("a", 1, 2)],
        [Segment("b", 0, 0)],
        [Segment("c", 0, 1)],
    ]
    # one huge row cannot be split: its neighbours go to the other ranks
    _check_split([("a", [100, 10_000_000, 100]), ("b", [100] * 10)], 4)
    with pytest.raises(ValueError):
        split([("a", [1])], 0)


# ---- the merged report, in-process: thread ranks over a shared coordinator ----


def run_ranks(n: int, path: Callable[[int], str]) -> list[object]:
    """verify_parallel on ``n`` thread ranks; each rank's report, or the exception it raised."""
    return rank_results(n, lambda c: verify_parallel(path(c.rank), c, timeout=30))


@pytest.fixture(scope="module")
def one_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint saved by one process: one data file of many chunks, split across ranks."""
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(40, 256, generator=g), "z": torch.zeros(5000), "step": 1}
    path = tmp_path_factory.mktemp("one") / "store" / "ck"
    ckptguard.save(state, str(path), chunk_size=4096)
    return path


@pytest.fixture(scope="module")
def incremental(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An incremental checkpoint (format.md 4.3): its own data file and its base's, linked."""
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(40, 256, generator=g), "z": torch.zeros(5000), "step": 1}
    store = tmp_path_factory.mktemp("incr") / "store"
    ckptguard.save(state, str(store / "a"), chunk_size=4096)
    state["w"][7] += 1.0  # two records of its own: chunks 1 and 7
    state["w"][30] += 1.0
    ckptguard.save(state, str(store / "ck"), chunk_size=4096, base="a")
    assert ckptguard.describe(store / "ck").info.files == 2
    return store / "ck"


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint saved by 4 MPI ranks (one data file each)."""
    need_mpi()
    base = tmp_path_factory.mktemp("four")
    script = base / "save.py"
    script.write_text(SAVE)
    path = base / "store" / "step-5"
    proc = run_command([MPIEXEC, "-n", 4, sys.executable, script, path], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ckptguard.describe(path).info.files == 4
    return path


def _damage_none(d: Path) -> None:
    pass


def _damage_payload(d: Path) -> None:
    flip_payload(d, sorted(p.name for p in d.glob("*.ckg"))[-1], nth=1)


def _damage_two_payloads(d: Path) -> None:
    names = sorted(p.name for p in d.glob("*.ckg"))
    flip_payload(d, names[0], nth=0)
    flip_payload(d, names[-1], nth=-1)


def _damage_footer(d: Path) -> None:  # the file cannot be opened: one problem, however many ranks
    flip_byte(d / sorted(p.name for p in d.glob("*.ckg"))[0], -1)


def _damage_missing_file(d: Path) -> None:
    (d / sorted(p.name for p in d.glob("*.ckg"))[-1]).unlink()


def _damage_manifest(d: Path) -> None:  # rank 0 cannot open the checkpoint: nothing is split
    flip_byte(d / "MANIFEST.json", 100)


DAMAGE = {
    f.__name__[len("_damage_") :]: f
    for f in (
        _damage_none,
        _damage_payload,
        _damage_two_payloads,
        _damage_footer,
        _damage_missing_file,
        _damage_manifest,
    )
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("which", ["one_file", "four", "incremental"])
def test_merged_report_equals_single_process(
    which: str, damage: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ck"
    shutil.copytree(request.getfixturevalue(which), ckpt)
    DAMAGE[damage](ckpt)
    want = verify_checkpoint(str(ckpt))
    assert want.ok == (damage == "none")
    for n in (1, 2, 3, 4, 7):
        got = run_ranks(n, lambda rank: str(ckpt))
        assert got == [want] * n, (n, got)


def test_a_rank_seeing_another_checkpoint_fails_every_rank(one_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    ckptguard.save({"x": torch.ones(3)}, str(other))
    got = run_ranks(3, lambda rank: str(other if rank == 2 else one_file))
    assert all(isinstance(e, ParallelVerifyError) for e in got), got
    assert "rank 2 could not check its share" in str(got[0])
    assert "another checkpoint" in str(got[0])
    assert all(str(got[0]) in str(e) for e in got[1:])


@pytest.mark.parametrize("where", ["first", "last"])
def test_an_io_error_on_one_rank_fails_every_rank(
    where: str, one_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As an I/O error stops the one-process verify: rank 0 raises its own error as it is, or
    names the rank that failed; every rank raises."""
    rows = verify_rows_of(one_file)
    bad = rows[0] if where == "first" else rows[-1]

    def read_chunk(rd: CheckpointReader, fd: int, r: Row, verify: bool = True) -> bytes:
        if r.offset == bad.offset:
            raise OSError(errno.EIO, "injected EIO", bad.file)
        return read_record(rd, fd, r, verify)

    # importlib: the attribute ckptguard.verify is the public function, not this module
    monkeypatch.setattr(importlib.import_module("ckptguard.read"), "read_record", read_chunk)
    got = run_ranks(3, lambda rank: str(one_file))
    if where == "first":
        assert isinstance(got[0], OSError) and got[0].strerror == "injected EIO"
    else:
        assert isinstance(got[0], ParallelVerifyError)
        assert str(got[0]).startswith("rank 2 could not check its share: OSError:")
    assert all(isinstance(e, ParallelVerifyError) for e in got[1:])
    assert all("injected EIO" in str(e) for e in got)


def verify_rows_of(ckpt: Path) -> list[Row]:
    with CheckpointReader(str(ckpt)) as rd:
        return [r for name in sorted(rd.files) for r in rd.rows_of_file(name)]


# ---- the command, under mpiexec and srun: rank 0 prints the single-process report ----

# Each rank's stdout, stderr and exit code into files named after its rank.
EACH_RANK = (
    'r=${PMI_RANK:-$SLURM_PROCID}; "$@" > "$OUT/out.$r" 2> "$OUT/err.$r"; echo $? > "$OUT/rc.$r"'
)


def _per_rank(out: Path, n: int) -> list[tuple[int, str, str]]:
    res = []
    for r in range(n):
        rc = out / f"rc.{r}"
        assert rc.exists(), f"rank {r} did not run"
        res.append(
            (int(rc.read_text()), (out / f"out.{r}").read_text(), (out / f"err.{r}").read_text())
        )
    return res


def _launch(launcher: list, n: int, args: list, out: Path) -> list[tuple[int, str, str]]:
    out.mkdir()
    cmd = [*launcher, "-n", n, "sh", "-c", f"OUT={out}; {EACH_RANK}", "sh", *CLI, *args]
    proc = run_command(cmd, TIMEOUT)
    res = _per_rank(out, n)
    print(res)
    assert proc.returncode == 0  # sh itself, whatever ckptguard said
    return res


def _single(ckpt: Path) -> subprocess.CompletedProcess[str]:
    return run_command([*CLI, "verify", ckpt], TIMEOUT)


def _expect_same(res: list[tuple[int, str, str]], single: subprocess.CompletedProcess[str]) -> None:
    assert [rc for rc, _, _ in res] == [single.returncode] * len(res)  # every rank exits alike
    assert res[0][1] == single.stdout  # rank 0 prints the single-process report
    assert all(out == "" for _, out, _ in res[1:])  # the others print nothing
    assert all(err == "" for _, _, err in res)


@pytest.mark.rank_job
def test_mpiexec_verify_good(four: Path, tmp_path: Path) -> None:
    single = _single(four)
    assert single.returncode == 0 and single.stdout.startswith("ok   ")
    _expect_same(_launch([MPIEXEC], 4, ["verify", four], tmp_path / "out"), single)


def test_mpiexec_verify_finds_a_flipped_byte(four: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "store" / "step-5"
    shutil.copytree(four, ckpt)
    key = flip_payload(ckpt, "rank-00002.ckg", nth=3)
    single = _single(ckpt)
    assert single.returncode == 1
    res = _launch([MPIEXEC], 4, ["verify", ckpt], tmp_path / "out")
    _expect_same(res, single)
    assert "file=rank-00002.ckg" in res[0][1] and f"tensor={key}," in res[0][1]


# The digest check of each backend's read path is tested in-process (test_digests).
@pytest.mark.backend_independent
def test_mpiexec_verify_finds_a_forged_chunk_by_its_digest(tmp_path: Path) -> None:
    """A chunk rewritten with every xxh3 checksum recomputed (tests/forgery.py): the ranks
    that verify it find its SHA-256 digest wrong, and rank 0 reports it as one process would."""
    need_mpi()
    ckpt = tmp_path / "store" / "forged"
    w = torch.ones(64, 1024)  # 16 chunks of 16 KiB: the ranks share them
    ckptguard.save({"w": w}, ckpt, compress="none", digests=True, chunk_size=16 << 10)
    forge_chunk(str(ckpt), "w", set_first_float(666.0), chunk=9)
    single = _single(ckpt)
    assert single.returncode == 1 and "digest mismatch" in single.stdout
    _expect_same(_launch([MPIEXEC], 4, ["verify", ckpt], tmp_path / "out"), single)


@pytest.mark.rank_job
def test_mpiexec_verify_a_store(four: Path, tmp_path: Path) -> None:
    """Each checkpoint of a store in turn, all ranks on each; the same lines and summary."""
    store = tmp_path / "store"
    shutil.copytree(four, store / "a")
    shutil.copytree(four, store / "b")
    flip_payload(store / "a", "rank-00000.ckg", nth=0)
    single = CliRunner().invoke(cli, ["verify", str(store)])  # in-process: one rank
    assert single.exit_code == 1 and "1 of 2 checkpoints ok" in single.stdout
    res = _launch([MPIEXEC], 3, ["verify", store], tmp_path / "out")
    assert [rc for rc, _, _ in res] == [1, 1, 1]
    assert res[0][1] == single.stdout and res[1][1] == res[2][1] == ""


@pytest.mark.rank_job
def test_mpiexec_errors_exit_2_everywhere(tmp_path: Path) -> None:
    need_mpi()
    res = _launch([MPIEXEC], 2, ["verify", tmp_path / "nothing"], tmp_path / "out")
    assert [rc for rc, _, _ in res] == [2, 2]
    assert res[0][2].startswith("error: no such checkpoint or store") and res[1][2] == ""


# ---- under the real Slurm (tests/slurmkit.py) ----


@pytest.mark.rank_job
def test_srun_verify_finds_a_flipped_byte(job: list[str], four: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "store" / "step-5"
    shutil.copytree(four, ckpt)
    key = flip_payload(ckpt, "rank-00001.ckg", nth=2)
    single = _single(ckpt)
    assert single.returncode == 1
    res = _launch(["srun", *job, "--mpi=pmi2"], 4, ["verify", ckpt], tmp_path / "out")
    _expect_same(res, single)
    assert "file=rank-00001.ckg" in res[0][1] and f"tensor={key}," in res[0][1]


@pytest.mark.rank_job
def test_srun_without_mpi_refuses(job: list[str], one_file: Path, tmp_path: Path) -> None:
    """Tasks without a PMI would each verify, and print, everything: they say how to fix it."""
    res = _launch(["srun", *job, "--mpi=none"], 2, ["verify", one_file], tmp_path / "out")
    assert [rc for rc, _, _ in res] == [2, 2]
    assert all("srun --mpi=pmi2" in err and out == "" for _, out, err in res)


def test_an_encrypted_checkpoint_verifies_in_parallel_with_or_without_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranks open sealed records with the key, or check them as stored without it: the merged
    report equals the single-process one, what was not checked counted by scope."""
    from ckptguard.read import verify_checkpoint

    for var in ("CKPTGUARD_KEK_FILE", "CKPTGUARD_KEK_COMMAND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CKPTGUARD_KEK", "6c" * 32)
    g = torch.Generator().manual_seed(3)
    state = {"a": torch.randn(40, 256, generator=g), "b": torch.randn(9000, generator=g)}
    ckpt = tmp_path / "store" / "ck"
    ckptguard.save(state, str(ckpt), chunk_size=4096, encrypt={"a": "s-a", "b": "s-b"})
    for kek in ("6c" * 32, "6d" * 32):  # the KEK, then another one
        monkeypatch.setenv("CKPTGUARD_KEK", kek)
        want = verify_checkpoint(str(ckpt))
        assert want.ok and bool(want.keyless) == (kek != "6c" * 32)
        for n in (1, 3):
            assert run_ranks(n, lambda rank: str(ckpt)) == [want] * n
