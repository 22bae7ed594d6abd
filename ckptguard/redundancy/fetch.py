"""A load from node-local parts: the data files a rank reads that its node lacks are copied
from the nodes that hold them, over MPI, before the load reads them.

A node-local checkpoint's parts hold each node's own ranks' data files. A rank's load also
reads other ranks' files: replicated tensors are written once (by whichever rank the plan
balanced them to), and a job restarted with another sharding reads across shards. Inside
``fetching(checkpoint, comm)``, every rank's ``ckptguard.load`` of its node's part names the
files it is about to read (``loader.needing``); the ranks then exchange, in one collective
step, what each node lacks and holds, and each missing file moves once per node that needs it,
from the lowest node holding it, in blocks. A received file is checked chunk by chunk against
the index in a staging directory, then renamed into the node's part: a part holds copies of
other nodes' files only whole and verified (docs/format.md section 12). Every rank leaves with
the same outcome: the load goes on, or every rank raises the same RebuildError.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Generator, Iterable
from typing import Any

import numpy as np

from ..commit import staging_area
from ..errors import CheckpointError, RebuildError, brief
from ..failpoints import failpoint
from ..format.layout import INDEX, MANIFEST, file_rank
from ..fsutil import UnsafeFileError, fsync_dir, read_manifest, read_regular, write_new_file
from ..localcommit import node_name
from ..readonly import remove_tree, seal_dir, seal_files
from ..select import needing
from . import exchange
from .payload import Payload, Rebuilt
from .protect import TIMEOUT
from .rebuild import MAX_OWN, verify_files


def fetch(
    checkpoint: str,
    comm: Any,
    needed: Iterable[str],
    *,
    node: str | bool = True,
    timeout: float = TIMEOUT,
) -> list[str]:
    """On every rank: make the data files ``needed`` (names the checkpoint's manifest lists)
    present in this node's part ``checkpoint``; the files this node received."""
    world = exchange.SetComm.duplicate(comm, timeout)
    try:
        hosts = [b.decode() for b in world.allgather_bytes(node_name(node).encode())]
        leader = hosts.index(hosts[world.rank]) == world.rank
        mine = _state(checkpoint, set(needed), leader)
        docs = [json.loads(b) for b in world.allgather_bytes(json.dumps(mine).encode())]
        moves = _plan(docs, hosts)  # the same on every rank, or the same error
        got = _move(world, checkpoint, docs[world.rank].get("sizes", {}), moves)
        failed = [json.loads(b) for b in world.allgather_bytes(json.dumps(got).encode())]
        errors = [f"node {hosts[r]}: {d['error']}" for r, d in enumerate(failed) if "error" in d]
        if errors:
            raise RebuildError(f"the files a load needs could not be fetched: {errors[0]}")
        return got["received"]
    finally:
        world.close()


def _state(checkpoint: str, needed: set[str], leader: bool) -> dict:
    """This rank's files: the uuid of its node's part, what it needs and lacks, and (on a
    leader) which of the part's data files are here whole."""
    try:
        _, body = read_manifest(checkpoint)
    except (CheckpointError, OSError) as e:
        return {"error": f"{checkpoint}: {brief(e)}"}
    sizes = {f["name"]: f["size"] for f in body["files"] if file_rank(f["name"]) is not None}
    unknown = sorted(needed - sizes.keys())
    if unknown:
        return {"error": f"{checkpoint} names no data file {unknown[0]!r}"}
    here = {n for n in sizes if _whole(os.path.join(checkpoint, n), sizes[n])}
    doc = {"uuid": body["uuid"], "lack": sorted(needed - here), "sizes": sizes}
    if leader:
        doc["have"] = sorted(here)
    return doc


def _whole(path: str, size: int) -> bool:
    try:
        return os.lstat(path).st_size == size
    except OSError:
        return False


def _plan(docs: list[dict], hosts: list[str]) -> list[tuple[str, int, int, int]]:
    """(file, size, from rank, to rank): each file a node lacks, once, from the lowest leader
    holding it to the node's leader. Raises the same RebuildError on every rank."""
    bad = [(r, d["error"]) for r, d in enumerate(docs) if "error" in d]
    if bad:
        raise RebuildError(f"rank {bad[0][0]} cannot load from its node's part: {bad[0][1]}")
    if len({d["uuid"] for d in docs}) != 1:
        raise RebuildError("the nodes hold different checkpoints under this name: resume first")
    leaders = {h: hosts.index(h) for h in hosts}
    holders: dict[str, int] = {}
    for r in sorted(leaders.values()):
        for f in docs[r]["have"]:
            holders.setdefault(f, r)
    moves = []
    for h, dst in sorted(leaders.items(), key=lambda kv: kv[1]):
        lack = sorted({f for r, d in enumerate(docs) if hosts[r] == h for f in d["lack"]})
        for f in lack:
            if f not in holders:
                raise RebuildError(f"no node holds {f} whole: rebuild, or load a drained copy")
            moves.append((f, docs[dst]["sizes"][f], holders[f], dst))
    return moves


def _move(
    world: exchange.SetComm, checkpoint: str, sizes: dict, moves: list[tuple[str, int, int, int]]
) -> dict:
    """Send and receive ``moves`` (every rank walks them all, in order); a receiver keeps going
    after a failure of its own, so that the senders are never left waiting."""
    mine = [(f, n) for f, n, _, dst in moves if dst == world.rank]
    staging, out, error = None, None, None
    try:
        if mine:
            store, name = os.path.split(os.path.abspath(checkpoint))
            staging = os.path.join(staging_area(store), f"{name}.fetch-{os.getpid()}")
            os.mkdir(staging, 0o700)
            for own in (MANIFEST, INDEX):  # what the check of the received files reads
                data = read_regular(os.path.join(checkpoint, own), max_size=MAX_OWN)
                write_new_file(os.path.join(staging, own), data)
            out = Rebuilt(staging, mine)
    except (CheckpointError, OSError, UnsafeFileError) as e:
        error = brief(e)
    pos = 0
    for f, n, src, dst in moves:
        if world.rank == src:
            try:
                payload: Payload | None = Payload(checkpoint, [(f, n)])
            except (CheckpointError, OSError) as e:  # zeros keep the exchange in step
                payload, error = None, brief(e)
            try:
                exchange.transfer(world, src, dst, _reader(payload), n, None)
            finally:
                if payload is not None:
                    payload.close()
        elif world.rank == dst:
            exchange.transfer(world, src, dst, None, n, _keeper(out, pos))
            pos += n
    if not mine:
        return {"error": error} if error else {"received": []}
    try:
        if error is None and out is not None and staging is not None:
            out.commit()
            failpoint("fetch.received")
            verify_files(staging, [f for f, _ in mine])
            _install(staging, checkpoint, [f for f, _ in mine])
    except (CheckpointError, OSError) as e:
        error = brief(e)
    finally:
        if out is not None:
            out.discard()
        if staging is not None:
            with contextlib.suppress(OSError):
                remove_tree(staging)
    return {"error": error} if error else {"received": [f for f, _ in mine]}


def _reader(payload: Payload | None) -> Callable[[int, int], Any]:
    """A sender's blocks of a file: its bytes, or zeros where it could not be opened."""

    def read(offset: int, size: int) -> Any:
        return payload.read(offset, size) if payload is not None else np.zeros(size, np.uint8)

    return read


def _keeper(out: Rebuilt | None, base: int) -> Callable[[int, Any], None]:
    """Where the blocks of a file starting at ``base`` of the received files go."""

    def keep(offset: int, data: Any) -> None:
        if out is not None:
            with contextlib.suppress(OSError):  # the check then finds the file damaged
                out.write(base + offset, data)

    return keep


def _install(staging: str, checkpoint: str, names: list[str]) -> None:
    """Rename the checked files into the node's part, which is read-only again after."""
    seal_files(staging)
    fsync_dir(staging)
    os.chmod(checkpoint, 0o755)
    try:
        for n in names:
            os.rename(os.path.join(staging, n), os.path.join(checkpoint, n))
        fsync_dir(checkpoint)
    finally:
        seal_dir(checkpoint)


@contextlib.contextmanager
def fetching(
    checkpoint: str, comm: Any, *, node: str | bool = True, timeout: float = TIMEOUT
) -> Generator[None, None, None]:
    """Within this block, a load of ``checkpoint`` (this node's part) on every rank first
    fetches the data files its node lacks (``fetch``). Every rank must load it, once."""
    mine = os.path.abspath(checkpoint)

    def hook(path: str, files: set[str]) -> None:
        if os.path.abspath(path) == mine:
            fetch(mine, comm, files, node=node, timeout=timeout)

    with needing(hook):
        yield
