"""Where a restarted job resumes from: the newest node-local checkpoint every node holds, or
one the nodes can rebuild, or else the newest drained one.

Every rank of the restarted job calls ``resume`` with its node's store. The nodes' first ranks
list what their stores hold; every rank then walks the same list of candidates, newest first:

- a checkpoint whose part every node holds whole (each node's own data files, of the ranks it
  runs now) is chosen as it is;
- one that some node lacks, but whose protection a node recorded, is rebuilt (``rebuild``);
  if the set cannot rebuild it (every rank gets the same RebuildError), the next is tried;
- one that can be neither (lost with a node and not protected, or left by a save killed
  between the nodes' renames) can never load. Those newer than the chosen one are deleted on
  the nodes holding parts of them, so that the job can save under their names again.

With no candidate left, ``fallback`` (a shared store the agent drains to) gives its newest
checkpoint, and the outcome says why. Every rank returns the same outcome (but its own path).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..commit import write_latest
from ..errors import CheckpointError, RebuildError, brief
from ..failpoints import set_rank
from ..format.layout import datafile_rank
from ..fsutil import read_manifest
from ..localcommit import node_name
from ..store import Store
from . import exchange
from .protect import TIMEOUT, marked
from .rebuild import rebuild


@dataclass(frozen=True)
class Resumed:
    """What ``resume`` chose. ``path``: this rank's checkpoint to load (its node's part, or
    the fallback store's checkpoint); None with ``level`` "none". ``level``: "local",
    "protected", "drained" or "none". ``rebuilt``: the nodes given their part back;
    ``dropped``: the unusable checkpoints deleted; ``note``: why this one, for the log."""

    path: str | None
    name: str | None
    level: str
    note: str
    rebuilt: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def parts(store: str, ranks: list[int]) -> list[dict]:
    """What a node's store holds: each committed checkpoint's name, uuid, commit time, world
    size, protection, and whether this node's part is whole for the ranks it runs now (their
    data files present at their recorded sizes, and no other rank's file missing from it)."""
    out: list[dict] = []
    if not os.path.lexists(store):  # a new node's empty disk
        return out
    for info in Store(store).list():
        try:
            _, body = read_manifest(info.path)
        except (CheckpointError, OSError):
            continue
        sizes = {f["name"]: f["size"] for f in body["files"] if datafile_rank(f["name"]) in ranks}
        whole = len(sizes) == len(ranks)
        for n, size in sizes.items():
            try:
                whole = whole and os.lstat(os.path.join(info.path, n)).st_size == size
            except OSError:
                whole = False
        out.append(
            {
                "name": info.name,
                "uuid": body["uuid"],
                "created": body["created"],
                "world": body["world_size"],
                "whole": whole,
                "protected": marked(store, info.name, body["uuid"]),
            }
        )
    return out


def candidates(held: dict[str, list[dict]], world: int) -> list[dict]:
    """Every checkpoint some node holds, newest first: its name and uuid, the nodes holding a
    whole part of it for ``world`` ranks (``holders``) or any part (``present``), and whether
    any recorded its protection. ``held``: node -> ``parts``."""
    found: dict[tuple[str, str], dict] = {}
    for node, items in held.items():
        for p in items:
            c = found.setdefault(
                (p["name"], p["uuid"]),
                {
                    "name": p["name"],
                    "uuid": p["uuid"],
                    "created": p["created"],
                    "world": p["world"],
                    "holders": [],
                    "present": [],
                    "protected": False,
                },
            )
            c["present"].append(node)
            if p["whole"] and p["world"] == world:
                c["holders"].append(node)
            c["protected"] = c["protected"] or p["protected"]
    return sorted(found.values(), key=lambda c: (c["created"], c["name"]), reverse=True)


def resume(
    store: str,
    comm: Any,
    *,
    node: str | bool = True,
    fallback: str | None = None,
    timeout: float = TIMEOUT,
) -> Resumed:
    """Choose (and rebuild where needed) the checkpoint to resume from, on every rank of the
    restarted job (``comm``: its MPI communicator; ``node``: this rank's node, as in a
    node-local save). Raises only where the ranks cannot agree (a timeout)."""
    world = exchange.SetComm.duplicate(comm, timeout)
    set_rank(world.rank)
    try:
        hosts = [b.decode() for b in world.allgather_bytes(node_name(node).encode())]
        me = hosts[world.rank]
        leader = hosts.index(me) == world.rank
        ranks = [r for r, h in enumerate(hosts) if h == me]
        mine: dict = {}
        if leader:
            try:
                mine = {"parts": parts(store, ranks)}
            except (CheckpointError, OSError) as e:  # as holding nothing, and said so
                mine = {"error": f"{store}: {brief(e)}"}
        docs = [json.loads(b) for b in world.allgather_bytes(json.dumps(mine).encode())]
    finally:
        world.close()
    nodes = list(dict.fromkeys(hosts))
    states = dict(zip(nodes, [d for d in docs if d], strict=True))
    here = _Here(store, me, leader, comm, timeout)
    return here.choose(nodes, states, len(hosts), fallback)


@dataclass
class _Here:
    """This rank's side of the choice: its node's store, name, and whether it leads the node."""

    store: str
    node: str
    leader: bool
    comm: Any
    timeout: float

    def choose(
        self, nodes: list[str], states: dict[str, dict], world: int, fallback: str | None
    ) -> Resumed:
        """Walk the candidates (the same walk on every rank); rebuild the first that needs it
        and can be."""
        held = {n: s.get("parts", []) for n, s in states.items()}
        why = [
            f"node {n} could not list its store ({s['error']})"
            for n, s in states.items()
            if "error" in s
        ]
        unusable: list[dict] = []
        for c in candidates(held, world):
            missing = [n for n in nodes if n not in c["holders"]]
            rebuilt: list[str] = []
            if missing and not c["protected"]:
                why.append(f"{c['name']} is missing on {', '.join(missing)} and not protected")
                unusable.append(c)
                continue
            if missing:
                try:
                    rebuilt = rebuild(
                        self.store, c["name"], self.comm, node=self.node, timeout=self.timeout
                    ).rebuilt
                except RebuildError as e:
                    why.append(f"{c['name']} could not be rebuilt: {e}")
                    unusable.append(c)
                    continue
            dropped = self.drop(held[self.node], unusable, world)
            self.point_latest(c["name"])
            level = "protected" if c["protected"] else "local"
            note = "; ".join([*why, f"resuming from {c['name']} ({level})"])
            return Resumed(
                os.path.join(self.store, c["name"]), c["name"], level, note, rebuilt, dropped
            )
        dropped = self.drop(held[self.node], unusable, world)
        return _fallen_back(fallback, why, dropped)

    def drop(self, mine: list[dict], unusable: list[dict], world: int) -> list[str]:
        """Delete this node's parts of the checkpoints that can never load (``_lost``; one
        under a hold stays: the hold is the operator's word)."""
        lost = [c for c in unusable if _lost(c, world)]
        names = [c["name"] for c in lost]
        if self.leader:
            gone = {(c["name"], c["uuid"]) for c in lost}
            for p in mine:
                if (p["name"], p["uuid"]) in gone:
                    with contextlib.suppress(CheckpointError, OSError):
                        Store(self.store).delete(p["name"])
        return names

    def point_latest(self, name: str) -> None:
        if self.leader and Store(self.store).latest_name() != name:
            write_latest(self.store, name)


def _lost(c: dict, world: int) -> bool:
    """Whether an unusable checkpoint can never load: saved by this job's number of ranks,
    and the nodes without a whole part hold none of it at all (a node whose ranks moved still
    holds its files, and a job restarted at another size may come back: those stay)."""
    return c["world"] == world and set(c["present"]) == set(c["holders"])


def _fallen_back(fallback: str | None, why: list[str], dropped: list[str]) -> Resumed:
    """The newest checkpoint of the shared store ``fallback``, when no node-local one can load."""
    latest = None
    if fallback is not None:
        with contextlib.suppress(CheckpointError, OSError):
            latest = Store(fallback).latest()
    if latest is None:
        where = f" and {fallback} holds none" if fallback else ""
        note = "; ".join([*why, f"no node-local checkpoint can load{where}: starting afresh"])
        return Resumed(None, None, "none", note, [], dropped)
    note = "; ".join(
        [*why, f"no node-local checkpoint can load: resuming from {latest.name} in {fallback}"]
    )
    return Resumed(latest.path, latest.name, "drained", note, [], dropped)
