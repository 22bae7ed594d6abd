"""A protected node-local checkpoint under `mpiexec -n N`: ranks grouped into simulated nodes,
each node with its own store directory BASE/<host>/store standing for its local disk.

    nodelocal.py layout BASE HOSTS             save, lay the checkpoint out per node
    nodelocal.py protect SCHEME BASE HOSTS     save, lay the checkpoint out per node, protect it
    nodelocal.py reprotect SCHEME BASE HOSTS   protect the laid-out checkpoint again
    nodelocal.py rebuild BASE HOSTS            rebuild what the nodes lack (a node of a new name
                                               with an empty disk takes a lost node's place)

HOSTS is a comma-separated host name per rank. The save goes to BASE/shared (a store every rank
sees); each node then keeps MANIFEST.json, index.parquet and its own ranks' data files of it in
its own store: the layout a node-local save leaves. Each rank writes its outcome to
BASE/out/rank-R.json. NODELOCAL_TIMEOUT: the collectives' deadline (60 s).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ckptguard  # noqa: E402
from ckptguard.coord.mpi import MPICoordinator  # noqa: E402
from ckptguard.fsutil import read_manifest  # noqa: E402
from ckptguard.redundancy.protect import level, node_files, protect  # noqa: E402
from ckptguard.redundancy.rebuild import rebuild  # noqa: E402

NAME = "step-10"


def lay_out(base: str, hosts: list[str], me: int) -> str:
    """This node's store with its part of the shared checkpoint (on the node's first rank)."""
    shared = os.path.join(base, "shared", NAME)
    store = os.path.join(base, hosts[me], "store")
    if hosts.index(hosts[me]) == me:
        _, body = read_manifest(shared)
        ours = [n for n, _ in node_files(body, hosts)[hosts[me]]]
        os.makedirs(os.path.join(store, NAME))
        for f in ["MANIFEST.json", "index.parquet", *ours]:
            shutil.copy2(os.path.join(shared, f), os.path.join(store, NAME, f))
        with open(os.path.join(store, "LATEST"), "w") as f:
            f.write(NAME + "\n")
    MPI.COMM_WORLD.Barrier()
    return store


def main() -> None:
    comm = MPI.COMM_WORLD
    me, n = comm.Get_rank(), comm.Get_size()
    cmd, base, hosts = sys.argv[1], sys.argv[-2], sys.argv[-1].split(",")
    assert len(hosts) == n
    timeout = float(os.environ.get("NODELOCAL_TIMEOUT", "60"))
    store = os.path.join(base, hosts[me], "store")
    if cmd in ("protect", "layout"):
        from scenarios import local_state  # torch: only a save needs it

        shared = os.path.join(base, "shared", NAME)
        ckptguard.save(local_state(me, n), shared, coordinator=MPICoordinator())
        lay_out(base, hosts, me)
    try:
        if cmd == "layout":
            out: dict = {"level": level(os.path.join(store, NAME))}
        elif cmd in ("protect", "reprotect"):
            scheme = sys.argv[2]
            p = protect(
                os.path.join(store, NAME), comm, node=hosts[me], scheme=scheme, timeout=timeout
            )
            out = {"level": level(os.path.join(store, NAME)), "stored": p.stored_bytes}
        else:
            r = rebuild(store, NAME, comm, node=hosts[me], timeout=timeout)
            out = {"rebuilt": r.rebuilt, "bytes": r.rebuilt_bytes}
            out["level"] = level(os.path.join(store, NAME))
    except (ckptguard.CheckpointError, OSError) as e:
        out = {"error": type(e).__name__, "message": str(e)}
    os.makedirs(os.path.join(base, "out"), exist_ok=True)
    with open(os.path.join(base, "out", f"rank-{me}.json"), "w") as f:
        json.dump({"rank": me, **out}, f)


if __name__ == "__main__":
    main()
