"""A node-local checkpoint drained by its nodes together into one shared store.

No directory holds a node-local checkpoint whole: each node's part holds the manifest, the index
and its own ranks' data files (docs/format.md section 12), so ``drain`` of one part refuses it.
``drain_nodes`` puts the checkpoint together in a store every node sees (the parallel file
system) under the drain's commit protocol (docs/format.md section 2), each node copying what it
holds. Every rank of the job calls it, with its node's part:

1. each node's lowest rank (its leader) opens its part (``CheckpointReader``: manifest and index
   checked, nothing outside the directory read) and lists the data files it holds whole; the
   ranks exchange these and plan the same copies: each data file once, from the lowest node
   holding it. The parts must be of one checkpoint (one uuid) and hold every data file;
2. rank 0 checks DST: a checkpoint of that name with the same uuid is already drained (only
   LATEST may move forward), with another uuid it is a DrainConflictError. Otherwise it creates
   ``DST/.staging/<name>.<uuid>/``, which every leader must then see (DST shared by the nodes);
3. every leader copies its data files into it (``drain.copy``: each checked against the index
   before it is copied, in pieces by ``jobs`` threads, fsynced);
4. rank 0 copies the index, the signature if any, and MANIFEST.json last;
5. every leader verifies every chunk of the files it copied; where a copy fails, its source is
   verified too, to name the damaged side;
6. rank 0 publishes the directory as a drain does (one rename; LATEST only moves forward).

Each step ends with one outcome on every rank: the drained checkpoint's info, or an error (the
rank that failed raises its own; the others a StoreError naming its node). On failure rank 0
removes the staging directory: DST's checkpoints and LATEST are unchanged. Every collective has
a deadline (``timeout``): a node that died or stalled is a CoordinationTimeoutError on the
others, and the staging directory it leaves is ``gc``'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .commit import discard_staging, new_staging, publish, read_info
from .drain import DRAIN, advance_latest, check_jobs, lustre_tool
from .drain.copy import CheckpointCopier, SourceFile, copy_files
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    DrainConflictError,
    StoreError,
    brief,
    from_oserror,
    warn_after_commit,
)
from .failpoints import failpoint, set_rank
from .format.layout import INDEX, check_name, file_rank
from .format.manifest import CheckpointInfo
from .fsutil import UnsafeFileError, fsync_dir, makedirs_durably
from .localcommit import node_name
from .open import CheckpointReader
from .read import VerifyReport, damaged_side, verify_rows
from .redundancy import exchange
from .redundancy.protect import TIMEOUT
from .store import Store

__all__ = ["drain_nodes", "drain_nodes_async"]

_FAILURES = (CheckpointError, OSError, UnsafeFileError)
_CONFLICT = "delete that one (ckptguard delete), or drain into another store"


def drain_nodes(
    checkpoint: str | os.PathLike,
    dst: str | os.PathLike,
    comm: Any,
    *,
    node: str | bool = True,
    jobs: int = 4,
    stripe: bool = True,
    timeout: float = TIMEOUT,
) -> CheckpointInfo:
    """On every rank of ``comm`` (an mpi4py communicator): drain the node-local checkpoint whose
    part on this node is ``checkpoint`` into store ``dst``, a directory every node sees; return
    its info in ``dst`` (the same on every rank). ``node``: this rank's node, as for a
    node-local save (True: ``CKPTGUARD_NODE`` or the host name). A checkpoint ``dst`` already
    holds is not copied again. ``jobs``: copy threads per node (capped at 32); on Lustre, data
    files are striped unless ``stripe`` is False. ``timeout``: each collective step's deadline
    in seconds."""
    jobs = check_jobs(jobs)
    world = exchange.SetComm.duplicate(comm, timeout)
    return _drain_on(world, checkpoint, dst, node, jobs, stripe)


def drain_nodes_async(
    checkpoint: str | os.PathLike,
    dst: str | os.PathLike,
    comm: Any,
    *,
    node: str | bool = True,
    jobs: int = 4,
    stripe: bool = True,
    timeout: float = TIMEOUT,
) -> Future[CheckpointInfo]:
    """``drain_nodes`` in the background: every rank calls it, in the same order as its other
    calls on ``comm`` (it duplicates ``comm`` here, a collective); returns at once with the
    future of the drained checkpoint's info (or of the error). Drains run one after another
    on one thread per process, in the order asked; a process that ends waits for them. Needs
    MPI initialized with MPI_THREAD_MULTIPLE (StoreError otherwise)."""
    from mpi4py import MPI

    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise StoreError(
            "a drain in the background needs MPI initialized with MPI_THREAD_MULTIPLE "
            "(mpi4py's default): call drain_nodes instead"
        )
    jobs = check_jobs(jobs)
    world = exchange.SetComm.duplicate(comm, timeout)
    with _worker_lock:
        global _worker
        if _worker is None:
            _worker = ThreadPoolExecutor(1, thread_name_prefix="ckptguard-nodedrain")
        return _worker.submit(_drain_on, world, checkpoint, dst, node, jobs, stripe)


_worker: ThreadPoolExecutor | None = None
_worker_lock = threading.Lock()


def _drain_on(
    world: exchange.SetComm,
    checkpoint: str | os.PathLike,
    dst: str | os.PathLike,
    node: str | bool,
    jobs: int,
    stripe: bool,
) -> CheckpointInfo:
    """``drain_nodes`` on the duplicate ``world``, which it frees."""
    path = os.path.abspath(os.fspath(checkpoint))
    dst_root = os.path.abspath(os.fspath(dst))
    rd: CheckpointReader | None = None
    set_rank(world.rank)
    try:
        try:
            here, bad_node = node_name(node), ""
        except ValueError as e:  # a name of its own: this rank leads, and says what is wrong
            here, bad_node = f"\0{world.rank}", str(e)
        hosts = [b.decode() for b in world.allgather_bytes(here.encode())]
        doc: dict = {}
        if hosts.index(hosts[world.rank]) == world.rank:  # the node's leader
            try:
                if bad_node:
                    raise StoreError(f"this rank's node: {bad_node}")
                check_name(os.path.basename(path))
                rd = CheckpointReader(path)
                doc = {"uuid": rd.manifest["uuid"], **_held(rd)}
            except _FAILURES as e:
                doc = {"error": f"{path}: {brief(e)}"}
        docs = [json.loads(b) for b in world.allgather_bytes(json.dumps(doc).encode())]
        mine = _plan(docs, hosts, world.rank)
        return _Drain(world, hosts, rd, dst_root, jobs, stripe).run(mine)
    finally:
        if rd is not None:
            rd.close()
        world.close()


def _held(rd: CheckpointReader) -> dict[str, list[str]]:
    """The data files of the open part that are here whole ("have": their size as listed), and
    those that are not ("lack")."""
    have: list[str] = []
    lack: list[str] = []
    for f in rd.manifest["files"]:
        try:
            st = os.stat(f["name"], dir_fd=rd.dir_fd, follow_symlinks=False)
            whole = file_rank(f["name"]) is not None and st.st_size == f["size"]
        except OSError:
            whole = False
        (have if whole else lack).append(f["name"])
    return {"have": have, "lack": lack}


def _plan(docs: list[dict], hosts: list[str], me: int) -> list[str]:
    """The data files rank ``me`` copies: each file once, by the lowest leader holding it. The
    same StoreError on every rank where the parts do not make one whole checkpoint."""
    bad = [(r, d["error"]) for r, d in enumerate(docs) if "error" in d]
    if bad:
        r, why = bad[0]
        raise StoreError(f"node {hosts[r]} (rank {r}) cannot open its part: {why}")
    if len({d["uuid"] for d in docs if d}) != 1:
        raise StoreError("the nodes hold different checkpoints under this name: resume first")
    holders: dict[str, int] = {}
    for r, d in enumerate(docs):
        for f in d.get("have", []):
            holders.setdefault(f, r)
    missing = sorted({f for d in docs for f in d.get("lack", [])} - holders.keys())
    if missing:
        raise StoreError(
            f"no node holds {missing[0]} whole ({len(missing)} data files held nowhere): "
            "rebuild the lost nodes' parts (resume) first"
        )
    return sorted(f for f, r in holders.items() if r == me)


def _in_dst(dst: Store, name: str) -> CheckpointInfo | None:
    try:
        return read_info(dst.path(name))
    except CheckpointNotFoundError:
        return None


class _Drain:
    """The steps after the plan; each ends with one outcome on every rank."""

    def __init__(
        self,
        world: exchange.SetComm,
        hosts: list[str],
        rd: CheckpointReader | None,
        dst: str,
        jobs: int,
        stripe: bool,
    ) -> None:
        self.world, self.hosts, self.rd, self.dst = world, hosts, rd, dst
        self.jobs, self.stripe = jobs, stripe
        self.staging = ""

    def run(self, mine: list[str]) -> CheckpointInfo:
        said, error = self._start()
        start = json.loads(self.world.bcast_bytes(said, 0))
        if error is not None:
            raise error
        if "error" in start:
            raise StoreError(start["error"])
        if "done" in start:
            return self._info(start["done"])
        self.staging = start["staging"]
        try:
            self._step(lambda: self._copy(mine))
            self._step(self._own)
            self._step(lambda: self._verify(mine))
            self._step(self._publish)
        except BaseException:
            if self.world.rank == 0:
                with contextlib.suppress(OSError):  # else gc reclaims it; DST is unchanged
                    discard_staging(self.staging)
            raise
        return self._info(os.path.join(self.dst, self._name()) if self.world.rank == 0 else "")

    def _name(self) -> str:
        assert self.rd is not None
        return os.path.basename(self.rd.path)

    def _start(self) -> tuple[bytes | None, CheckpointError | None]:
        """On rank 0: check DST and create the staging directory (or find the copy made);
        what to tell the others, and the error to raise."""
        if self.world.rank != 0:
            return None, None
        assert self.rd is not None  # rank 0 leads its node
        name, m = self._name(), self.rd.manifest
        try:
            if os.path.realpath(os.path.dirname(self.rd.path)) == os.path.realpath(self.dst):
                raise StoreError(f"source and destination are the same store: {self.dst}")
            makedirs_durably(self.dst)
            dst = Store(self.dst)
            dst.latest()  # a damaged LATEST: said before anything is copied
            have = _in_dst(dst, name)
            if have is not None:
                if have.uuid != m["uuid"]:
                    raise DrainConflictError(
                        name, self.rd.path, m["uuid"], have.path, have.uuid, fix=_CONFLICT
                    )
                advance_latest(self.dst, have)
                return json.dumps({"done": have.path}).encode(), None
            _, staging = new_staging(self.dst, name)
            return json.dumps({"staging": staging}).encode(), None
        except CheckpointError as e:  # first: some are OSErrors too
            error: CheckpointError = e
        except OSError as e:
            error = from_oserror(e, self.dst, "cannot drain into")
        return json.dumps({"error": f"rank 0: {brief(error)}"}).encode(), error

    def _step(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` where it applies; raise on every rank if it failed on any."""
        error: BaseException | None = None
        try:
            fn()
        except _FAILURES as e:
            error = e
        said = json.dumps({"error": brief(error)} if error is not None else {}).encode()
        docs = [json.loads(b) for b in self.world.allgather_bytes(said)]
        if error is not None:
            raise error
        bad = [(r, d["error"]) for r, d in enumerate(docs) if "error" in d]
        if bad:
            r, why = bad[0]
            raise StoreError(f"the drain into {self.dst} failed on node {self.hosts[r]}: {why}")

    def _copier(self) -> CheckpointCopier:
        assert self.rd is not None
        if not os.path.isdir(self.staging):
            raise StoreError(
                f"{self.staging} is not there on this node: {self.dst} must be a directory "
                "every node sees (the parallel file system)",
                self.dst,
            )
        lfs = lustre_tool(self.dst) if self.stripe else None
        return CheckpointCopier(self.rd, self.staging, lfs)

    def _copy(self, mine: list[str]) -> None:
        if not mine:
            return
        assert self.rd is not None
        sizes = {f["name"]: f["size"] for f in self.rd.manifest["files"]}
        copier = self._copier()
        try:
            copy_files(copier, [SourceFile(f, sizes[f], True) for f in mine], self.jobs)
        finally:
            copier.close()

    def _own(self) -> None:
        """On rank 0: the index, the signature and the manifest, last."""
        if self.world.rank != 0:
            return
        assert self.rd is not None
        copier = self._copier()
        try:
            copy_files(copier, [SourceFile(INDEX, self.rd.manifest["index"]["size"], False)], 1)
            copier.copy_signature()
            copier.copy_manifest(self.rd.manifest["uuid"])
            fsync_dir(self.staging)
        finally:
            copier.close()

    def _verify(self, mine: list[str]) -> None:
        """Every chunk of the files this node copied, read back from DST."""
        if not mine:
            return
        assert self.rd is not None
        copy = CheckpointReader(self.staging)
        try:
            report = VerifyReport(self.staging)
            verify_rows(copy, [(f, copy.rows_of_file(f)) for f in mine], report)
        finally:
            copy.close()
        if not report.ok:
            source = VerifyReport(self.rd.path)
            verify_rows(self.rd, [(f, self.rd.rows_of_file(f)) for f in mine], source)
            why = "the destination returned other bytes than were written"
            raise damaged_side(report, source, f"the copy in {self.staging}", why)

    def _publish(self) -> None:
        failpoint("nodedrain.verified")  # every node's copy verified; nothing visible yet
        if self.world.rank != 0:
            return
        assert self.rd is not None
        out = publish(
            self.dst,
            self._name(),
            self.staging,
            self.rd.manifest,
            overwrite=False,
            flavour=DRAIN,
            audit_detail={"source": self.rd.path, "nodes": sorted(set(self.hosts))},
        )
        for w in out.warnings:
            warn_after_commit(w, stacklevel=4)

    def _info(self, final: str) -> CheckpointInfo:
        """The drained checkpoint's info, from rank 0's manifest (one broadcast)."""
        said = None
        if self.world.rank == 0:
            assert self.rd is not None
            said = json.dumps({"path": final, "manifest": self.rd.manifest}).encode()
        got = json.loads(self.world.bcast_bytes(said, 0))
        return CheckpointInfo.from_manifest(got["manifest"], got["path"])
