"""Node-local protection beside a drain: what each costs in time, bytes moved and bytes stored.

    python benchmarks/redundancy.py [--ranks 4] [--hosts a,a,b,c] [--mib 64] [--trials 3]

Runs itself under ``mpiexec -n RANKS`` (oversubscribed on a small machine). The ranks are
grouped into simulated nodes by ``--hosts``; each node's store is a directory of its own. Each
rank saves ``--mib`` MiB of incompressible float32 (the local commit, to a store every rank
sees), each node keeps its ranks' files of it (the layout a node-local save leaves), and then,
interleaved in every trial:

- ``xor``: protect with XOR parity (one set of all nodes);
- ``partner``: protect with partner copies;
- ``rebuild-xor``: the last node's store deleted, rebuilt on a node of another name;
- ``drain``: ``ckptguard.drain`` of the checkpoint to another store (one process, as the
  agent's drain runs), the copy verified.

On one machine every "network" transfer is a copy through MPI's shared memory and every node's
disk is the same disk, so these are ratios between schemes on this machine, not a cluster's
figures: a cluster moves the same bytes over its network to other disks, in parallel. Prints
one JSON object (medians, ranges, bytes) and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

NAME = "step-1"


def _worker(args: argparse.Namespace) -> None:
    import numpy as np
    from mpi4py import MPI

    import ckptguard
    from ckptguard.coord.mpi import MPICoordinator
    from ckptguard.drain import drain
    from ckptguard.fsutil import read_manifest
    from ckptguard.redundancy.protect import REDUNDANCY, node_files, protect
    from ckptguard.redundancy.rebuild import rebuild

    comm = MPI.COMM_WORLD
    me, n = comm.Get_rank(), comm.Get_size()
    hosts = args.hosts.split(",")
    base = args.base
    rng = np.random.default_rng(me)
    state = {f"w{me}": rng.standard_normal(args.mib << 18, dtype=np.float32)}
    shared = os.path.join(base, "shared", NAME)
    comm.Barrier()
    t0 = time.perf_counter()
    ckptguard.save(state, shared, coordinator=MPICoordinator(), compress="none")
    comm.Barrier()
    times: dict[str, list[float]] = {"local commit": [time.perf_counter() - t0]}
    leader = hosts.index(hosts[me]) == me
    _, body = read_manifest(shared)
    mine = node_files(body, hosts)[hosts[me]]

    def lay_out(host: str) -> str:
        store = os.path.join(base, host, "store")
        if leader:
            shutil.rmtree(os.path.join(base, host), ignore_errors=True)
            os.makedirs(os.path.join(store, NAME))
            for f in ["MANIFEST.json", "index.parquet", *[m for m, _ in mine]]:
                shutil.copyfile(os.path.join(shared, f), os.path.join(store, NAME, f))
        comm.Barrier()
        return store

    stored: dict[str, int] = {}
    for _ in range(args.trials):
        for step in ("xor", "partner", "rebuild-xor", "drain"):
            store = lay_out(hosts[me])
            if step == "rebuild-xor":
                protect(os.path.join(store, NAME), comm, node=hosts[me], scheme="xor")
                last = hosts[-1]
                if hosts[me] == last and leader:
                    shutil.rmtree(os.path.join(base, last))
                comm.Barrier()
                node = hosts[me] + "-new" if hosts[me] == last else hosts[me]
                store = os.path.join(base, node, "store")
            comm.Barrier()
            t0 = time.perf_counter()
            if step in ("xor", "partner"):
                p = protect(os.path.join(store, NAME), comm, node=hosts[me], scheme=step)
                stored[step] = sum(comm.allgather(p.stored_bytes))
            elif step == "rebuild-xor":
                rebuild(store, NAME, comm, node=node)
            elif me == 0:
                dst = os.path.join(base, "durable")
                shutil.rmtree(dst, ignore_errors=True)
                drain(os.path.join(base, "shared"), dst, names=[NAME])
            comm.Barrier()
            times.setdefault(step, []).append(time.perf_counter() - t0)
            if leader:
                shutil.rmtree(os.path.join(store, REDUNDANCY), ignore_errors=True)
            if step == "rebuild-xor" and leader:
                shutil.rmtree(os.path.join(base, node), ignore_errors=True)
    if me == 0:
        payload = sum(f["size"] for f in body["files"])
        nodes = len(dict.fromkeys(hosts))
        out = {
            "ranks": n,
            "nodes": nodes,
            "hosts": hosts,
            "checkpoint_bytes": payload,
            "trials": args.trials,
            "seconds": {
                k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                for k, v in times.items()
            },
            # the payload bytes entering each exchange: every node's files once (to its partner,
            # or as segments into its set's reduce-scatter, whose algorithm moves up to twice
            # that between nodes); a drain reads and writes the checkpoint once
            "bytes_moved": {"xor": payload, "partner": payload, "drain": payload},
            "bytes_stored": {**stored, "drain": payload},
        }
        print(json.dumps(out, indent=1))
        print("\n| step | median s | range s | bytes moved | bytes stored extra |")
        print("|---|---|---|---|---|")
        for k, v in out["seconds"].items():
            moved = out["bytes_moved"].get(k, "")
            kept = out["bytes_stored"].get(k, "")
            print(f"| {k} | {v['median']:.2f} | {v['min']:.2f}-{v['max']:.2f} | {moved} | {kept} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--hosts", default="a,a,b,c")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--base", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    if len(args.hosts.split(",")) != args.ranks:
        ap.error("--hosts needs one host name per rank")
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or "mpiexec"
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as base:
        cmd = [mpiexec, "-n", str(args.ranks), sys.executable, os.path.abspath(__file__)]
        cmd += ["--worker", "--base", base, "--hosts", args.hosts]
        cmd += ["--mib", str(args.mib), "--trials", str(args.trials)]
        sys.exit(subprocess.run(cmd, check=False).returncode)


if __name__ == "__main__":
    main()
