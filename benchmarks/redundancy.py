"""Node-local protection beside a drain: what each costs in time, bytes moved and bytes stored.

    python benchmarks/redundancy.py [--ranks 4] [--hosts a,a,b,c] [--mib 64] [--trials 3]

Runs itself under ``mpiexec -n RANKS`` (oversubscribed on a small machine). The ranks are
grouped into simulated nodes by ``--hosts``; each node's store is a directory of its own. Each
rank has ``--mib`` MiB of incompressible float32. Interleaved in every trial:

- ``local commit``: a node-local save (``node_local=``): each node's store keeps its part;
- ``xor``: protect with XOR parity (one set of all nodes);
- ``partner``: protect with partner copies;
- ``node drain``: ``ckptguard.nodedrain.drain_nodes`` of the node-local checkpoint to a store
  every node sees, each node copying its own files (as ``ckptguard run --drain-to`` does for a
  node-local checkpoint), the copy verified;
- ``rebuild-xor``: the last node's store deleted, rebuilt on a node of another name;
- ``shared save``: the same state saved to one store every rank sees (the parallel file
  system's stand-in);
- ``drain``: ``ckptguard.drain`` of that checkpoint to another store (one process, as the
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
    from ckptguard.format.layout import REDUNDANCY
    from ckptguard.fsutil import read_manifest
    from ckptguard.nodedrain import drain_nodes
    from ckptguard.redundancy.protect import protect
    from ckptguard.redundancy.rebuild import rebuild

    comm = MPI.COMM_WORLD
    me, n = comm.Get_rank(), comm.Get_size()
    hosts = args.hosts.split(",")
    base = args.base
    rng = np.random.default_rng(me)
    state = {f"w{me}": rng.standard_normal(args.mib << 18, dtype=np.float32)}
    coord = MPICoordinator()
    leader = hosts.index(hosts[me]) == me
    times: dict[str, list[float]] = {}
    stored: dict[str, int] = {}

    def timed(step: str, run) -> None:  # noqa: ANN001 - a step of this trial
        comm.Barrier()
        t0 = time.perf_counter()
        run()
        comm.Barrier()
        times.setdefault(step, []).append(time.perf_counter() - t0)

    def node_store(host: str) -> str:
        return os.path.join(base, host, "store")

    def fresh(host: str) -> None:
        if leader:
            shutil.rmtree(os.path.join(base, host), ignore_errors=True)
        comm.Barrier()

    def save_local() -> None:
        path = os.path.join(node_store(hosts[me]), NAME)
        ckptguard.save(state, path, coordinator=coord, compress="none", node_local=hosts[me])

    def save_shared() -> None:
        path = os.path.join(base, "shared", NAME)
        ckptguard.save(state, path, coordinator=coord, compress="none", overwrite=True)

    def protect_with(scheme: str) -> None:
        path = os.path.join(node_store(hosts[me]), NAME)
        p = protect(path, comm, node=hosts[me], scheme=scheme)
        stored[scheme] = sum(comm.allgather(p.stored_bytes))
        if leader:
            shutil.rmtree(os.path.join(node_store(hosts[me]), REDUNDANCY), ignore_errors=True)

    def drain_local() -> None:
        dst = os.path.join(base, "durable-nodes")
        if me == 0:
            shutil.rmtree(dst, ignore_errors=True)
        comm.Barrier()
        drain_nodes(os.path.join(node_store(hosts[me]), NAME), dst, comm, node=hosts[me])

    def drain_shared() -> None:
        if me == 0:
            dst = os.path.join(base, "durable")
            shutil.rmtree(dst, ignore_errors=True)
            drain(os.path.join(base, "shared"), dst, names=[NAME])

    last = hosts[-1]
    new = hosts[me] + "-new" if hosts[me] == last else hosts[me]
    save_shared()  # untimed: the first save of a process pays its imports and pools
    for _ in range(args.trials):
        fresh(hosts[me])
        timed("local commit", save_local)
        timed("xor", lambda: protect_with("xor"))
        timed("partner", lambda: protect_with("partner"))
        timed("node drain", drain_local)
        protect(os.path.join(node_store(hosts[me]), NAME), comm, node=hosts[me], scheme="xor")
        fresh(last if hosts[me] == last else "-")  # the last node is lost with its disk
        timed("rebuild-xor", lambda: rebuild(node_store(new), NAME, comm, node=new))
        fresh(new if hosts[me] == last else "-")
        timed("shared save", save_shared)
        timed("drain", drain_shared)
    _, body = read_manifest(os.path.join(base, "shared", NAME))
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
            "bytes_moved": {
                "xor": payload,
                "partner": payload,
                "node drain": payload,
                "drain": payload,
            },
            "bytes_stored": {
                **stored,
                "node drain": payload,
                "shared save": payload,
                "drain": payload,
            },
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
