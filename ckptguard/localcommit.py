"""The commit of a node-local save: every node keeps the checkpoint in its own store.

Each rank passes its own node's store (a local NVMe or RAM disk, the same path string on every
node or not) and writes its data file there. Rank 0 commits as for any save (it checks the
reports and writes index.parquet, MANIFEST.json and any SIGNATURE.json, in its own staging
directory), then the nodes settle in three rounds, each ending with every rank learning one
outcome (I8):

1. prepare: rank 0 sends those files to every node's first rank (its leader), which writes them
   into its node's staging directory and checks its ranks' data files against the manifest;
2. rename: once every node is prepared, each leader renames its staging directory into place;
   if one cannot, the others withdraw theirs, so that no node shows a checkpoint another lacks
   after a failure it survived;
3. LATEST: once every node holds the checkpoint, each leader moves its LATEST to it.

A node's directory then holds the manifest, the index and the data files of its own ranks
(docs/format.md section 12): the checkpoint is "local" once every node holds its part.
``redundancy.protect`` makes it "protected". A kill between the renames can leave some nodes
holding a part the others lack; LATEST has not moved on any of them, and ``redundancy.resume``
finds and drops such parts.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable

from . import commit
from .coord import Coordinator
from .errors import StoreError
from .failpoints import failpoint
from .format import manifest
from .format.layout import INDEX, MANIFEST, SIGNATURE, STAGING, datafile_name
from .format.manifest import CheckpointInfo
from .fsutil import fsync_dir, write_new_file
from .keys import PrivateKey
from .readonly import FILE_MODE, remove_tree, unseal
from .report import dump_json, pack, unpack
from .target import Target

MAX_NODE = 255
"""The longest node name (a host name is at most 255 bytes)."""


def node_name(node: str | bool) -> str:
    """The node a rank runs on: ``node`` if a name, else ``CKPTGUARD_NODE`` or the host name."""
    if isinstance(node, str):
        name = node
    else:
        name = os.environ.get("CKPTGUARD_NODE") or os.uname().nodename
    if not name or len(name) > MAX_NODE or not name.isprintable():
        raise ValueError(f"a node name must be 1 to {MAX_NODE} printable characters, not {name!r}")
    return name


NODE_LOCAL = commit.Flavour(
    staged=True,
    move_latest=lambda store, info: None,
    after_rename=lambda: failpoint("nodelocal.renamed"),
    sealed_by_writers=True,
)
"""One node's part: its manifest is already staged, and LATEST moves only once every node
holds its part (``settle``)."""


class NodeLocal(Target):
    """A checkpoint directory ``<store>/<name>`` in every node's own store, for one save on rank
    ``rank`` of node ``node`` (True: ``node_name``'s). ``nodes[r]`` is rank r's node; a node's
    leader is its lowest rank."""

    def __init__(self, node: str | bool, rank: int) -> None:
        self.node, self.rank = node, rank
        self.nodes: list[str] = []  # every rank's node, from the plan
        self.leader = rank == 0  # rank 0 leads its node; the others learn it from the plan
        self.staging: str | None = None
        self.final: str | None = None
        self.late: list[str] = []  # what failed after this node's rename

    def describe(self) -> dict:
        return {"node": node_name(self.node)}  # a bad name fails the save on every rank

    # -- the save's own steps (saver._Save) --------------------------------------------------
    def open(self, store: str, name: str, overwrite: bool) -> tuple[str, str]:
        uid, self.staging = super().open(store, name, overwrite)
        self.final = os.path.join(store, name)
        return uid, self.staging

    def rank_staging(self, store: str, name: str, plan: dict, rank: int, overwrite: bool) -> str:
        """This rank's staging directory: the same name as rank 0's, in this node's store,
        created by whichever of the node's ranks comes first. The leader checks the target."""
        self.final = os.path.join(store, name)
        self.nodes = plan["nodes"]
        self.leader = self.nodes.index(self.nodes[rank]) == rank
        if rank == 0:
            return plan["staging"]
        path = os.path.join(commit.staging_area(store), f"{name}.{plan['uuid']}")
        if self.leader:
            self.staging = path
            commit.check_target(self.final, overwrite)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o755)
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise StoreError(f"{path} is not a directory", path)
        return path

    def cleanup(self, rank: int, staging: str | None) -> None:
        if self.leader and self.staging is not None:
            self.discard(self.staging)

    def publish(
        self,
        store: str,
        name: str,
        staging: str,
        body: dict,
        overwrite: bool,
        deadline: float | None,
        signer: PrivateKey | None = None,
    ) -> CheckpointInfo:
        """Rank 0's part of the commit: the manifest (and signature) in its staging directory.
        The renames follow in ``settle``, on every node."""
        commit.write_manifest(staging, body, signer)
        commit.check_deadline(deadline)
        return CheckpointInfo.from_manifest(body, os.path.join(store, name))

    # -- the rounds after rank 0's commit --------------------------------------------------
    def settle(self, coord: Coordinator, outcome: dict, timeout: float) -> dict:
        """Prepare, rename and move LATEST on every node; the outcome every rank returns."""
        if not outcome["ok"]:
            return outcome
        files = None
        if coord.rank == 0:
            try:
                files = self._own_files()
            except OSError as e:  # carried to every rank, which all fail alike (I8)
                files = pack({"error": f"{type(e).__name__}: {e}"})
        head, parts = unpack(coord.broadcast(files, timeout))
        if "error" in head:
            return {"ok": False, "rank": 0, "error": head["error"]}
        body = manifest.decode(bytes(parts[head["names"].index(MANIFEST)]))  # rank 0 checked it
        done = _round(coord, timeout, lambda: self._prepare(head, parts, body))
        if not done["ok"]:
            return done
        renamed = _round(coord, timeout, lambda: self._rename(body))
        if not renamed["ok"]:
            with contextlib.suppress(OSError):  # else gc reclaims it; see resume
                self._withdraw()
            return renamed
        moved = _round(coord, timeout, self._move_latest)
        if not moved["ok"]:
            return moved
        info = dict(outcome["info"], path=self.final)
        info["warnings"] = [*info.get("warnings", ()), *renamed["warnings"], *moved["warnings"]]
        return {"ok": True, "info": info}

    def _own_files(self) -> bytes:
        assert self.staging is not None
        there = os.listdir(self.staging)
        names = [n for n in (MANIFEST, INDEX, SIGNATURE) if n in there]
        data = []
        for n in names:
            with open(os.path.join(self.staging, n), "rb") as f:
                data.append(f.read())
        return pack({"names": names}, *data)

    def _prepare(self, head: dict, parts: list[memoryview], body: dict) -> list[str]:
        if not self.leader:
            return []
        assert self.staging is not None
        if self.rank != 0:
            for n, data in zip(head["names"], parts, strict=True):
                path = os.path.join(self.staging, n)
                write_new_file(path, bytes(data))
                os.chmod(path, FILE_MODE)
        mine = {r for r, n in enumerate(self.nodes) if n == self.nodes[self.rank]}
        for f in body["files"]:
            if f["rank"] in mine and f["name"] == datafile_name(f["rank"]):
                path = os.path.join(self.staging, f["name"])
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or st.st_size != f["size"]:
                    raise StoreError(f"{path} is not the {f['size']}-byte file reported", path)
        fsync_dir(self.staging)
        failpoint("nodelocal.prepared")
        return []

    def _rename(self, body: dict) -> list[str]:
        if not self.leader:
            return []
        assert self.staging is not None and self.final is not None
        store, name = os.path.split(self.final)
        failpoint("nodelocal.renaming")
        info = commit.publish(store, name, self.staging, body, overwrite=False, flavour=NODE_LOCAL)
        self.staging = None  # in place: nothing of ours to discard
        self.late = list(info.warnings)  # e.g. the rename may not be durable: LATEST stays
        return self.late

    def _withdraw(self) -> None:
        """Take this node's part back out of view after another node failed to rename."""
        if not self.leader or self.staging is not None or self.final is None:
            return
        store, name = os.path.split(self.final)
        gone = os.path.join(store, STAGING, f"{name}.withdrawn-{os.getpid()}")  # gc's if killed
        unseal(self.final)
        os.rename(self.final, gone)
        fsync_dir(store)
        remove_tree(gone)

    def _move_latest(self) -> list[str]:
        if not self.leader or self.late:
            return []
        assert self.final is not None
        store, name = os.path.split(self.final)
        try:
            commit.write_latest(store, name)
            failpoint("nodelocal.latest_moved")
        except OSError as e:
            return [f"{self.final} is committed, but LATEST was not moved to it ({e})"]
        return []


def _round(coord: Coordinator, timeout: float, step: Callable[[], list[str]]) -> dict:
    """Run ``step`` on every rank (its warnings, or an exception), then agree: rank 0 sends
    every rank the first failure, or success with everybody's warnings."""
    try:
        mine: dict = {"ok": True, "warnings": step()}
    except Exception as e:  # carried as data: every rank must reach the gather (I8)
        mine = {"ok": False, "rank": coord.rank, "error": f"{type(e).__name__}: {e}"}
    got = coord.gather(dump_json(mine), timeout)
    decision = None
    if got is not None:
        docs = [json.loads(bytes(g)) for g in got]
        failed = [d for d in docs if not d["ok"]]
        warned = [w for d in docs if d["ok"] for w in d["warnings"]]
        decision = dump_json(failed[0] if failed else {"ok": True, "warnings": warned})
    return json.loads(coord.broadcast(decision, timeout))
