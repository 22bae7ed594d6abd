"""A protected node-local checkpoint under `mpiexec -n N`: ranks grouped into simulated nodes,
each node with its own store directory BASE/<host>/store standing for its local disk.

    nodelocal.py save BASE HOSTS              save node-local: each node's store keeps its part
    nodelocal.py save-mixed BASE HOSTS        the same, but rank 3 does not ask for node-local
    nodelocal.py protect SCHEME BASE HOSTS     save node-local, then protect the checkpoint
    nodelocal.py reprotect SCHEME BASE HOSTS   protect the saved checkpoint again
    nodelocal.py rebuild BASE HOSTS            rebuild what the nodes lack (a node of a new name
                                               with an empty disk takes a lost node's place)
    nodelocal.py train SCHEME BASE HOSTS       save node-local, protect, then run on until killed
                                               (BASE/out/pid-R: each rank's pid, once protected)
    nodelocal.py resume BASE HOSTS             choose what to resume from, rebuilding if need be
    nodelocal.py resume-load BASE HOSTS        the same, then load it and compare with the save

HOSTS is a comma-separated host name per rank; node h's store is BASE/h/store. Each rank
writes its outcome to BASE/out/rank-R.json. NODELOCAL_NAME: the checkpoint's name (step-10);
NODELOCAL_FALLBACK: the shared store a resume falls back to. NODELOCAL_TIMEOUT: the
collectives' deadline (60 s).
"""

from __future__ import annotations

import json
import os
import sys
import time

from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ckptguard  # noqa: E402
from ckptguard.coord.mpi import MPICoordinator  # noqa: E402
from ckptguard.redundancy.fetch import fetching  # noqa: E402
from ckptguard.redundancy.protect import level, protect  # noqa: E402
from ckptguard.redundancy.rebuild import rebuild  # noqa: E402
from ckptguard.redundancy.resume import resume  # noqa: E402

NAME = os.environ.get("NODELOCAL_NAME", "step-10")


def load_back(got, comm, node: str, timeout: float) -> bool:
    """Load what ``resume`` chose, as a restarted trainer would (its template), fetching what
    the node lacks; whether every value is bitwise what this rank saved."""
    from scenarios import check_loaded, template

    me, n = comm.Get_rank(), comm.Get_size()
    coord = MPICoordinator()
    with fetching(got.path, comm, node=node, timeout=timeout):
        out = ckptguard.load(got.path, template=template(me, n), coordinator=coord)
    check_loaded(out, me, n, n)
    return True


def main() -> None:
    comm = MPI.COMM_WORLD
    me, n = comm.Get_rank(), comm.Get_size()
    cmd, base, hosts = sys.argv[1], sys.argv[-2], sys.argv[-1].split(",")
    assert len(hosts) == n
    timeout = float(os.environ.get("NODELOCAL_TIMEOUT", "60"))
    store = os.path.join(base, hosts[me], "store")
    try:
        if cmd in ("protect", "save", "save-mixed", "train"):
            from scenarios import local_state  # torch: only a save needs it

            path = os.path.join(store, NAME)
            local = hosts[me] if cmd != "save-mixed" or me != 3 else False
            state = local_state(me, n)
            info = ckptguard.save(
                state, path, coordinator=MPICoordinator(), node_local=local, timeout=timeout
            )
        if cmd in ("save", "save-mixed"):
            out: dict = {"level": level(os.path.join(store, NAME)), "path": info.path}
        elif cmd in ("protect", "reprotect", "train"):
            scheme = sys.argv[2]
            p = protect(
                os.path.join(store, NAME), comm, node=hosts[me], scheme=scheme, timeout=timeout
            )
            out = {"level": level(os.path.join(store, NAME)), "stored": p.stored_bytes}
            if cmd == "train":  # a trainer past its checkpoint, until a node is lost
                os.makedirs(os.path.join(base, "out"), exist_ok=True)
                with open(os.path.join(base, "out", f"pid-{me}"), "w") as f:
                    f.write(f"{os.getpid()}\n")
                time.sleep(600)
        elif cmd in ("resume", "resume-load"):
            fallback = os.environ.get("NODELOCAL_FALLBACK")
            got = resume(store, comm, node=hosts[me], fallback=fallback, timeout=timeout)
            out = {k: getattr(got, k) for k in ("path", "name", "level", "note", "rebuilt")}
            out["dropped"] = got.dropped
            if cmd == "resume-load":
                out["loaded"] = load_back(got, comm, hosts[me], timeout)
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
