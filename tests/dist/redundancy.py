"""Node-local redundancy under `mpiexec -n N`: one rank per simulated node, each with its own
directory BASE/<host>/ standing for that node's local disk.

    redundancy.py protect SCHEME BASE BLOCK          every node writes its files, then protects
    redundancy.py rebuild SCHEME BASE BLOCK LOST NEW  node LOST is gone; NEW takes its place with
                                                      an empty disk and gets its files back

SCHEME is xor or partner. Each node's files are made from a seed (any rank can make any node's),
so the test checks the rebuilt bytes exactly. What each node knows of the set (members, files)
is written to BASE/<host>/set.json at protect time; a replacement learns it from a survivor.
"""

from __future__ import annotations

import json
import os
import random
import sys

import numpy as np
from mpi4py import MPI

from ckptguard.redundancy import exchange, parity
from ckptguard.redundancy.payload import Payload, Rebuilt


def files_of(member: int) -> dict[str, bytes]:
    rng = random.Random(member)
    sizes = [rng.choice([0, 1, 4095, 70_000, 300_000]), rng.randrange(0, 5000)]
    return {
        f"rank-{member:05d}.ckg": rng.randbytes(sizes[0]),
        f"extra-{member}": rng.randbytes(sizes[1]),
    }


def file_writer(path: str, mode: str = "wb"):
    f = open(path, mode)  # noqa: SIM115 - closed by the caller through .close

    def keep(pos: int, data: np.ndarray) -> None:
        f.seek(pos)
        f.write(data.tobytes())

    keep.close = f.close  # type: ignore[attr-defined]
    return keep


def file_reader(path: str):
    data = open(path, "rb").read()  # noqa: SIM115 - small test files

    def read(pos: int, size: int) -> np.ndarray:
        out = np.zeros(size, dtype=np.uint8)
        part = data[pos : pos + size]
        out[: len(part)] = np.frombuffer(part, dtype=np.uint8)
        return out

    return read


def protect(scheme: str, base: str, block: int) -> None:
    comm = MPI.COMM_WORLD
    me, n = comm.Get_rank(), comm.Get_size()
    host = f"h{me}"
    home = os.path.join(base, host)
    os.makedirs(home)
    mine = files_of(me)
    for name, data in mine.items():
        with open(os.path.join(home, name), "wb") as f:
            f.write(data)
    files = [(k, len(v)) for k, v in mine.items()]
    sc = exchange.set_comm(comm, [[f"h{r}" for r in range(n)]], host, 60)
    assert sc is not None
    every = comm.allgather(files)
    with Payload(home, files) as p:
        if scheme == "xor":
            lay = parity.layout(sc.lengths(p.length))
            keep = file_writer(os.path.join(home, "parity.bin"))
            exchange.encode(sc, lay, p.read, keep, block)
            keep.close()
        else:
            ward = (me - 1) % n
            os.makedirs(os.path.join(home, "ward"))
            out = Rebuilt(os.path.join(home, "ward"), every[ward])
            lengths = sc.lengths(p.length)
            exchange.copy_ring(sc, p.read, p.length, lengths[ward], out.write, block)
            out.commit()
    with open(os.path.join(home, "set.json"), "w") as f:
        json.dump({"members": [f"h{r}" for r in range(n)], "files": every}, f)


def rebuild(scheme: str, base: str, block: int, lost: int, new: str) -> None:
    comm = MPI.COMM_WORLD
    me, n = comm.Get_rank(), comm.Get_size()
    host = new if me == lost else f"h{me}"
    home = os.path.join(base, host)
    known = None
    if me != lost:
        with open(os.path.join(home, "set.json")) as f:
            known = json.load(f)
    known = comm.bcast(known, root=(lost + 1) % n)
    members = list(known["members"])
    members[lost] = host if me == lost else new  # the replacement takes the lost member's place
    sc = exchange.set_comm(comm, [members], host, 60)
    assert sc is not None
    files = [tuple(x) for x in known["files"]]
    if me == lost:
        os.makedirs(home)
        out = Rebuilt(home, files[lost])
    lengths = [sum(s for _, s in f) for f in files]
    if scheme == "xor":
        lay = parity.layout(lengths)
        if me == lost:
            exchange.rebuild(sc, lay, lost, None, None, out.write, block)
        else:
            with Payload(home, files[me]) as p:
                par = file_reader(os.path.join(home, "parity.bin"))
                exchange.rebuild(sc, lay, lost, p.read, par, None, block)
    else:
        holder = (lost + 1) % n
        if me == holder:
            with Payload(os.path.join(home, "ward"), files[lost]) as p:
                exchange.transfer(sc, holder, lost, p.read, lengths[lost], None, block)
        elif me == lost:
            exchange.transfer(sc, holder, lost, None, lengths[lost], out.write, block)
        else:
            exchange.transfer(sc, holder, lost, None, lengths[lost], None, block)
    if me == lost:
        out.commit()
        for name, data in files_of(lost).items():
            with open(os.path.join(home, name), "rb") as f:
                assert f.read() == data, name
        print(f"rebuilt {host} as member {lost}: {lengths[lost]} bytes", flush=True)


if __name__ == "__main__":
    cmd, scheme, base, block = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if cmd == "protect":
        protect(scheme, base, block)
    else:
        rebuild(scheme, base, block, int(sys.argv[5]), sys.argv[6])
