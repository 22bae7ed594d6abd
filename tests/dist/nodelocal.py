"""A protected node-local checkpoint under `mpiexec -n N`: ranks grouped into simulated nodes,
each node with its own store directory BASE/<host>/store standing for its local disk.

    nodelocal.py save BASE HOSTS              save node-local: each node's store keeps its part
    nodelocal.py save-mixed BASE HOSTS        the same, but rank 3 does not ask for node-local
    nodelocal.py protect SCHEME BASE HOSTS     save node-local, then protect the checkpoint
    nodelocal.py reprotect SCHEME BASE HOSTS   protect the saved checkpoint again
    nodelocal.py protect-saves SCHEME BASE HOSTS
                                               save step-10 and step-20 node-local under
                                               protect_saves, and step-5 into another store
    nodelocal.py refuse BASE HOSTS             protect with each of NODELOCAL_CASES' options (a
                                               JSON list of [SCHEME, RATE, NAME]), each refused
    nodelocal.py protect-async SCHEME BASE HOSTS
                                               save node-local, protect in the background
                                               while the job saves its next checkpoint
                                               (step-20) and trains on, then wait for it
    nodelocal.py rebuild BASE HOSTS            rebuild what the nodes lack (a node of a new name
                                               with an empty disk takes a lost node's place)
    nodelocal.py train SCHEME BASE HOSTS       save node-local, protect, then run on until killed
                                               (BASE/out/pid-R: each rank's pid, once protected)
    nodelocal.py resume BASE HOSTS             choose what to resume from, rebuilding if need be
    nodelocal.py resume-load BASE HOSTS        the same, then load it and compare with the save
    nodelocal.py drain DST BASE HOSTS          drain the node-local checkpoint into store DST

HOSTS is a comma-separated host name per rank; node h's store is BASE/h/store. Each rank
writes its outcome to BASE/out/rank-R.json. NODELOCAL_NAME: the checkpoint's name (step-10);
NODELOCAL_FALLBACK: the shared store a resume falls back to. NODELOCAL_TIMEOUT: the
collectives' deadline (60 s). SCHEME may be one per rank (comma-separated), NODELOCAL_RATE a
rate (bytes/s) for every rank or one per rank; NODELOCAL_ASYNC=1 makes reprotect use
protect_async.
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
from ckptguard.nodedrain import drain_nodes  # noqa: E402
from ckptguard.redundancy.background import protect_async, protect_saves  # noqa: E402
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


def per_rank(value: str, me: int, n: int) -> str:
    """This rank's ``value``: one for every rank, or a comma-separated one per rank."""
    values = value.split(",")
    return values[me] if len(values) == n else value


def refusals(store: str, comm, node: str, timeout: float) -> list[str]:
    """What protecting with each of NODELOCAL_CASES' (scheme, rate, name) per rank raised."""
    me, n = comm.Get_rank(), comm.Get_size()
    said = []
    for scheme, rates, names in json.loads(os.environ["NODELOCAL_CASES"]):
        given = per_rank(rates, me, n)
        rate = None if given == "none" else float(given)
        try:
            protect(
                os.path.join(store, per_rank(names, me, n)),
                comm,
                node=node,
                scheme=per_rank(scheme, me, n),
                timeout=timeout,
                rate=rate,
            )
            said.append("")
        except ckptguard.CheckpointError as e:
            said.append(f"{type(e).__name__}: {e}")
    return said


def in_background(store: str, comm, node: str, scheme: str, **kw) -> dict:
    """Protect step-10 in the background while saving step-20 and reducing on ``comm``."""
    from scenarios import local_state

    me, n = comm.Get_rank(), comm.Get_size()
    fut = protect_async(os.path.join(store, NAME), comm, node=node, scheme=scheme, **kw)
    ckptguard.save(
        local_state(me, n),
        os.path.join(store, "step-20"),
        coordinator=MPICoordinator(),
        node_local=node,
        timeout=kw["timeout"],
    )
    steps = sum(comm.allreduce(1) for _ in range(50))  # the job's own collectives go on
    p = fut.result()
    return {
        "level": level(os.path.join(store, NAME)),
        "next": level(os.path.join(store, "step-20")),
        "stored": p.stored_bytes,
        "steps": steps,
    }


def saves_protected(base: str, store: str, comm, node: str, scheme: str, **kw) -> dict:
    """Save step-10 and step-20 into ``store`` and step-5 into another store, while every save
    into ``store`` is protected in the background."""
    from scenarios import local_state

    me, n = comm.Get_rank(), comm.Get_size()
    other = os.path.join(base, node, "other")
    with protect_saves(store, comm, node=node, scheme=scheme, **kw) as saves:
        for path in (os.path.join(store, "step-10"), os.path.join(other, "step-5")):
            ckptguard.save(local_state(me, n), path, coordinator=MPICoordinator(), node_local=node)
        ckptguard.save(
            local_state(me, n), os.path.join(store, "step-20"), node_local=node, coordinator="mpi"
        )
    done = [p.name for p in saves.wait()]  # all were waited for on leaving
    levels = {c: level(os.path.join(store, c)) for c in ("step-10", "step-20")}
    return {"levels": levels, "other": level(os.path.join(other, "step-5")), "waited": done}


def main() -> None:
    comm = MPI.COMM_WORLD
    me, n = comm.Get_rank(), comm.Get_size()
    cmd, base, hosts = sys.argv[1], sys.argv[-2], sys.argv[-1].split(",")
    assert len(hosts) == n
    timeout = float(os.environ.get("NODELOCAL_TIMEOUT", "60"))
    store = os.path.join(base, hosts[me], "store")
    given = per_rank(os.environ.get("NODELOCAL_RATE", "none"), me, n)
    rate = None if given == "none" else float(given)
    try:
        if cmd in ("protect", "save", "save-mixed", "train", "protect-async"):
            from scenarios import local_state  # torch: only a save needs it

            path = os.path.join(store, NAME)
            local = hosts[me] if cmd != "save-mixed" or me != 3 else False
            state = local_state(me, n)
            info = ckptguard.save(
                state, path, coordinator=MPICoordinator(), node_local=local, timeout=timeout
            )
        if cmd in ("save", "save-mixed"):
            out: dict = {"level": level(os.path.join(store, NAME)), "path": info.path}
        elif cmd == "protect-saves":
            kw = {"timeout": timeout, "rate": rate}
            out = saves_protected(base, store, comm, hosts[me], sys.argv[2], **kw)
        elif cmd == "refuse":
            out = {"refused": refusals(store, comm, hosts[me], timeout)}
        elif cmd == "protect-async":
            kw = {"timeout": timeout, "rate": rate}
            out = in_background(store, comm, hosts[me], per_rank(sys.argv[2], me, n), **kw)
        elif cmd in ("protect", "reprotect", "train"):
            scheme = per_rank(sys.argv[2], me, n)
            how = protect_async if os.environ.get("NODELOCAL_ASYNC") == "1" else protect
            p = how(
                os.path.join(store, NAME),
                comm,
                node=hosts[me],
                scheme=scheme,
                timeout=timeout,
                rate=rate,
            )
            p = p.result() if how is protect_async else p
            out = {"level": level(os.path.join(store, NAME)), "stored": p.stored_bytes}
            if cmd == "train":  # a trainer past its checkpoint, until a node is lost
                os.makedirs(os.path.join(base, "out"), exist_ok=True)
                with open(os.path.join(base, "out", f"pid-{me}"), "w") as f:
                    f.write(f"{os.getpid()}\n")
                time.sleep(600)
        elif cmd == "drain":
            path = os.path.join(store, NAME)
            got = drain_nodes(path, sys.argv[2], comm, node=hosts[me], timeout=timeout, jobs=2)
            out = {"path": got.path, "uuid": got.uuid, "name": got.name}
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
