"""The distributed part of `make demo`: 4 ranks save, damage is caught, 2 ranks restore.

python examples/distributed_demo.py --store ./ckpts-sharded
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import pyarrow.parquet as pq

import ckptguard

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "sharded_training.py")


def mpiexec(n: int, *args: str) -> None:
    exe = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or "mpiexec"
    cmd = [exe, "-n", str(n), sys.executable, EXAMPLE, *args]
    print(f"   $ mpiexec -n {n} python examples/sharded_training.py {' '.join(args)}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    for line in out.stdout.strip().splitlines():
        print(f"     {line}")
    if out.returncode:
        raise SystemExit(f"failed ({out.returncode}):\n{out.stderr[-2000:]}")


def flip_payload_byte(ckpt: str, rank: int) -> str:
    """Flip one payload byte of the first chunk that ``rank`` wrote; return that tensor's key."""
    rows = pq.read_table(os.path.join(ckpt, "index.parquet")).to_pylist()
    row = next(r for r in rows if r["rank"] == rank)
    with open(os.path.join(ckpt, row["file"]), "r+b") as f:
        f.seek(row["offset"] + 64 + row["stored_len"] // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))
    return row["key"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="./ckpts-sharded")
    store = os.path.abspath(ap.parse_args().store)
    print("\nDistributed: 4 MPI ranks save one sharded checkpoint; 2 ranks restore it")
    print("1. Each of 4 ranks trains the same MLP and saves only its rows of every tensor")
    mpiexec(4, "save", store)
    latest = ckptguard.Store(store).latest()
    report = ckptguard.verify(latest.path)
    print(
        f"2. verify {latest.path}: ok={report.ok}, {report.chunks_checked} chunks from "
        f"{latest.files} rank files"
    )
    scratch = tempfile.mkdtemp(prefix="ckptguard-demo-")
    try:
        copy = os.path.join(scratch, latest.name)
        shutil.copytree(latest.path, copy)
        key = flip_payload_byte(copy, rank=2)
        bad = ckptguard.verify(copy)
        print(f"3. Flip one byte in rank 2's data file of a copy: verify ok={bad.ok}")
        for p in bad.problems:
            print(f"     {p}")
        caught = (
            not bad.ok and bad.problems[0].file == "rank-00002.ckg" and bad.problems[0].key == key
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("4. 2 ranks restore the original, each asking for a different row split")
    mpiexec(2, "load", store)
    print("All distributed checks passed." if caught else "The corruption was NOT caught!")
    return 0 if caught and report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
