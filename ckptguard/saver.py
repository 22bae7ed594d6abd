"""The save protocol, for one process or many: plan -> write -> report -> commit -> outcome.

Every rank takes part in every collective, carrying a local failure as data instead of raising
early, so all ranks leave with the same outcome (I8), in O(1) collectives per save:
gather(descriptions) -> broadcast(plan) -> write -> gather(reports) -> broadcast(outcome).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import lz4
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import xxhash

from . import collector, commit, lineage, measure, sign
from .adapt import AUTO, merge_stats
from .baseplan import link_plan
from .coord import Coordinator
from .encode import parse_compress
from .errors import CheckpointAbortedError, CheckpointError, OptionsMismatchError, from_oserror
from .failpoints import failpoint, set_rank
from .format import manifest
from .format.datafile import FormatError
from .format.index import DIGESTS, unify
from .format.layout import linked_file
from .format.locator import footer_digests, for_save
from .format.manifest import CheckpointInfo
from .format.validate import Shards, check_table
from .hooks import run_commit_hooks
from .inventory import bind_per_rank, describe_local
from .localcommit import NodeLocal
from .options import COMPRESS, SaveOptions, check_options, shaping_options
from .pack import Packer
from .plan import PlanError, assignment, make_plan, warn_differing, writer_from_json
from .report import (
    dump_json,
    from_ipc,
    info_from_json,
    info_to_json,
    merge_trees,
    pack,
    pack_report,
    to_ipc,
    unpack,
    unpack_report,
)
from .reuse import LinkPlan, Reuse
from .seal import Sealing
from .sealplan import key_scopes, seal_plan
from .sources import DIRECT, ByteSource
from .store import prune_after_commit
from .target import DIRECTORY, Target
from .tree import Flat, TensorRef, flatten
from .version import __version__
from .writer import RankWriter

LAST_TIMINGS: dict[str, float] = {}  # rank 0's marks of the last save (commit benchmark)


class FailedState:
    """What a rank saves when it failed before the save began: it still takes part in every
    collective and reports ``error``, so all ranks raise the same error naming it (I8)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _RankFailed(Exception):
    """The save's outcome on every rank: rank ``rank`` failed with the message given."""

    def __init__(self, rank: int, text: str) -> None:
        super().__init__(text)
        self.rank = rank


def writer_versions(zstd: list[str] | None = None) -> dict[str, str]:
    """The manifest's ``writer`` member: the versions that wrote it (``zstd``: its zstd's)."""
    versions = {
        "ckptguard": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "lz4": lz4.__version__,
        "xxhash": xxhash.VERSION,
        "pyarrow": pa.__version__,
    }
    if zstd:
        versions["zstd"] = ", ".join(sorted(set(zstd)))
    return versions


def _text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


@dataclass
class Staged:
    """What rank 0 keeps between planning and the commit: the manifest's parts (``tensors``:
    the manifest's tensor entries; ``pickle``: whether some tree holds a pickled value)."""

    uuid: str
    staging: str
    tree: Any
    rank_trees: dict[str, Any]
    tensors: list[dict]
    pickle: bool
    signer: sign.PrivateKey | None = None  # the key that signs the commit (sign_key)
    base: dict | None = None  # an incremental save's base (``baseplan.link_plan``)
    seal: dict | None = None  # an encrypted save's keys (``sealplan.seal_plan``)
    lineage: dict | None = None  # the MLflow run to record (``lineage.resolve``)


class _Save:
    """One save on one rank. ``own`` keeps this rank's exception so one process re-raises it."""

    def __init__(
        self,
        coord: Coordinator,
        opt: SaveOptions,
        store: str,
        name: str,
        source: ByteSource,
        on_read: Callable[[], None] | None,
        target: Target = DIRECTORY,
    ) -> None:
        self.coord, self.opt, self.store, self.name = coord, opt, store, name
        self.source, self.on_read, self.target = source, on_read, target
        self.own: BaseException | None = None
        self.staging: str | None = None
        self.refs: list[TensorRef] = []
        self.rank0: Staged | None = None
        self.options = shaping_options(opt, store, name)

    def fail(self, e: BaseException) -> dict:
        self.own = e
        return {"ok": False, "rank": self.coord.rank, "error": _text(e)}

    def run(self, obj: Any) -> CheckpointInfo:
        c, timeout = self.coord, self.opt.timeout
        try:
            with collector.paused():  # CPU phases only, never a wait (ckptguard.collector)
                described = self.describe(obj)
            gathered = c.gather(described, timeout)
            with collector.paused():
                plan = self.plan([unpack(g) for g in gathered or ()]) if c.rank == 0 else None
            plan = json.loads(c.broadcast(dump_json(plan) if c.rank == 0 else None, timeout))
            self.staging = plan.get("staging")
            if not plan["ok"]:
                if "option" in plan:  # the same error on every rank, naming the option
                    values = {int(r): v for r, v in plan["values"].items()}
                    raise OptionsMismatchError(plan["error"], plan["option"], values)
                raise _RankFailed(plan["rank"], plan["error"])
            with collector.paused():
                report = pack_report(*self.write(plan))
            gathered = c.gather(report, timeout)
            outcome = None
            if c.rank == 0:
                with collector.paused():
                    reports, gathered = [unpack_report(g) for g in gathered or ()], None
                    outcome = self.commit(reports)  # frees the messages once their rows are read
            # Rank 0 renames only within `timeout` of the first report (commit's deadline); the
            # others wait twice that, so none gives up on a save that then commits (I8).
            outcome = json.loads(
                c.broadcast(dump_json(outcome) if c.rank == 0 else None, 2 * timeout)
            )
            outcome = self.target.settle(c, outcome, timeout)
            if not outcome["ok"]:
                raise _RankFailed(outcome["rank"], outcome["error"])
        except _RankFailed as f:
            self.cleanup()
            if c.size == 1 and self.own is not None:
                raise self.own from None
            raise CheckpointAbortedError(
                f"save of {self.name!r} aborted: rank {f.rank} failed: {f}", rank=f.rank
            ) from self.own
        except BaseException:
            self.cleanup()
            raise
        if plan.get("differing"):  # committed: say whose copy every rank will load
            warn_differing(plan["differing"], c.size)
        return info_from_json(outcome["info"])

    def cleanup(self) -> None:
        with contextlib.suppress(OSError):  # else gc reclaims it; the store is unchanged
            self.target.cleanup(self.coord.rank, self.staging)

    # -- phase 1: every rank describes its state ------------------------------------------------
    def describe(self, obj: Any) -> bytes:
        """This rank's message: status, its object tree (JSON) and its tensors (Arrow)."""
        try:
            if isinstance(obj, FailedState):
                raise obj.error
            if isinstance(obj, Flat):
                tree, self.refs, used_pickle = obj.tree, obj.refs, obj.used_pickle
            else:
                tree, self.refs, used_pickle = flatten(obj, self.opt.allow_pickle)
            bind_per_rank(self.refs, self.coord.rank, self.coord.size)
            source = self.source
            hasher = (lambda ref: source.digest(ref.value)) if self.coord.size > 1 else None
            desc = describe_local(self.refs, hasher)
            head = {"ok": True, "pickle": used_pickle, "options": self.options}
            head.update(self.target.describe())
            return pack(head, dump_json(tree), to_ipc(desc))
        except Exception as e:
            self.refs = []
            return pack(self.fail(e))

    # -- phase 2: rank 0 plans and opens the staging directory ----------------------------------
    def plan(self, msgs: list[tuple[dict, list[memoryview]]]) -> dict:
        for m, _ in msgs:
            if not m["ok"]:
                return m
        try:
            check_options([m["options"] for m, _ in msgs])
        except OptionsMismatchError as e:
            return {"ok": False, "error": str(e), "option": e.option, "values": e.values}
        try:
            descs = [from_ipc(parts[1]) for _, parts in msgs]
            plan = make_plan(descs, self.opt.check_replicated)
            tree0, rank_trees = merge_trees([parts[0] for _, parts in msgs], descs, plan.keys)
            signer = sign.signer(self.opt.sign_key)  # the committer's key: before any file
            base = link_plan(self.store, self.opt.base, self.opt.max_depth)
            run = lineage.resolve(self.opt.mlflow_run)
            uid, self.staging = self.open_staging()  # creates the store, for its keyring
            seal = seal_plan(self.store, self.opt, plan.keys)
        except Exception as e:
            return self.fail(e)
        pickle = any(m["pickle"] for m, _ in msgs)
        self.rank0 = Staged(
            uid, self.staging, tree0, rank_trees, plan.tensors, pickle, signer, base, seal, run
        )
        return {
            "ok": True,
            "uuid": uid,
            "staging": self.staging,
            "keys": plan.keys,
            "writer": [w.to_json() for w in plan.writer],
            "differing": plan.differing,
            "nodes": [m.get("node") for m, _ in msgs],
            "digests": self.opt.digests or signer is not None,  # a signature needs them
            "base": base,
            "seal": seal,
        }

    def open_staging(self) -> tuple[str, str]:
        """Check the target (again at the rename: a race), then create the staging directory."""
        try:
            return self.target.open(self.store, self.name, self.opt.overwrite)
        except CheckpointError:  # before OSError: CheckpointExistsError is one too
            raise
        except OSError as e:
            raise from_oserror(e, self.store, "cannot create a staging directory in") from None

    # -- phase 3: every rank writes its own data file -------------------------------------------
    def write(self, plan: dict) -> tuple[dict, pa.Table | None]:
        rank = self.coord.rank
        try:
            writers = [writer_from_json(w) for w in plan["writer"]]
            mine_all = assignment(plan["keys"], writers, self.refs, rank)
            # A view has no bytes of its own: its storage's are written (format.md 3.2).
            todo = [
                (g, r) for r, (g, m) in zip(self.refs, mine_all, strict=True) if m and not r.view
            ]
            staging = self.target.rank_staging(
                self.store, self.name, plan, rank, self.opt.overwrite
            )
            return write_data_file(
                self.target,
                staging,
                plan["uuid"],
                rank,
                replace(self.opt, digests=plan["digests"]),
                todo,
                self.source,
                self.on_read,
                plan["base"],
                Sealing.from_plan(self.opt.encrypt or {}, plan["seal"]) if plan["seal"] else None,
            )
        except Exception as e:
            return self.fail(e), None

    # -- phase 4: rank 0 validates the reports and commits --------------------------------------
    def commit(self, reports: list[tuple[dict, pa.Table | None]]) -> dict:
        for r, _ in reports:
            if not r["ok"]:
                return r
        assert self.rank0 is not None and self.staging is not None
        try:
            info = commit_reports(
                self.target, self.store, self.name, self.coord.size, self.opt, self.rank0, reports
            )
            self.staging = None  # committed: nothing of ours to clean up
        except Exception as e:
            return self.fail(e)
        return {"ok": True, "info": info_to_json(info)}


def write_data_file(
    target: Target,
    staging: str,
    uuid: str,
    rank: int,
    opt: SaveOptions,
    todo: list[tuple[int, TensorRef]],
    source: ByteSource = DIRECT,
    on_read: Callable[[], None] | None = None,
    base: LinkPlan | None = None,
    seal: Sealing | None = None,
) -> tuple[dict, pa.Table]:
    """Write rank ``rank``'s data file of the save staged at ``staging``: the tensors ``todo``
    (global id, ref), chunked, encoded by ``opt.compress``, fsynced and checked; its report
    (file entry, write statistics, the ``base``'s files it links) and index rows; ``seal``:
    the tensors it seals and their keys (feature ``encryption``). A failure
    removes the file and raises (an OSError as a typed error naming the file)."""
    writer = None
    try:
        where = target.data_path(staging, rank)
        reuse = Reuse(staging, rank, base, opt.digests) if base else None
        failpoint("save.base_linked")
        writer = RankWriter(staging, rank, uuid, opt.chunk_size, where, opt.digests, reuse, seal)
        codec, level = parse_compress(opt.compress, COMPRESS)
        if opt.compress == "auto":
            codec = AUTO
        Packer(writer, todo, codec, level).write(source)
        if on_read is not None:
            on_read()
        rows = writer.finish(target.data_mode)
        own = rows.num_rows
        reused = writer.reused_table()
        linked = reuse.finish() if reuse is not None else []
        if reused is not None:
            rows = unify([rows, reused])
        failpoint("save.data_written")
    except Exception as e:
        if writer is not None:
            writer.abort()
        if isinstance(e, OSError):  # name this rank's file, even if it could not be created
            raise from_oserror(e, target.data_path(staging, rank), "cannot write") from None
        raise
    file = {"name": writer.name, "rank": rank, "size": writer.size, "chunks": own}
    doc = {"ok": True, "written_at": time.time(), "file": file, "stats": writer.stats}
    doc.update(linked=linked, footer=footer_digests(writer.footer, opt.digests))
    return {**doc, "zstd": writer.zstd_version()}, rows


def commit_reports(
    target: Target,
    store: str,
    name: str,
    world: int,
    opt: SaveOptions,
    staged: Staged,
    reports: list[tuple[dict, pa.Table | None]],
) -> CheckpointInfo:
    """Commit the save staged as ``staged`` from every rank's report (``write_data_file``'s):
    check the index rows, write the index and the manifest, publish under ``<store>/<name>``.
    Raises a typed error (the staging directory is then the caller's to discard)."""
    LAST_TIMINGS.clear()
    LAST_TIMINGS["last_rank_written"] = max(r["written_at"] for r, _ in reports)
    LAST_TIMINGS["reports_received"] = time.time()
    try:
        body = manifest_body(target, name, world, opt, staged, reports)
        deadline = None
        if world > 1:  # wall clocks of the ranks: skew must stay well under timeout
            deadline = min(r["written_at"] for r, _ in reports) + opt.timeout
        info = target.publish(
            store, name, staged.staging, body, opt.overwrite, deadline, staged.signer
        )
        info = replace(info, write_stats=merge_stats(r["stats"] for r, _ in reports))
        LAST_TIMINGS["visible"] = time.time()
    except FormatError as e:
        raise PlanError(f"reports do not form a valid checkpoint: {e}") from None
    except CheckpointError:  # before OSError: CheckpointExistsError is one too
        raise
    except OSError as e:
        raise from_oserror(e, staged.staging, "cannot commit in") from None
    return info


def manifest_body(
    target: Target,
    name: str,
    world: int,
    opt: SaveOptions,
    p: Staged,
    reports: list[tuple[dict, pa.Table | None]],
) -> dict:
    """Check the ranks' index rows, write the index, and build the whole manifest body
    (``created``: now, the moment it is handed to the commit). Takes the rows out of ``reports``
    once they are in one table: the messages they are views of (as large as the index) go."""
    table = unify([t for _, t in reports if t is not None])
    reports[:] = [(doc, None) for doc, _ in reports]
    files = [rep["file"] for rep, _ in reports]
    footers = [rep.get("footer") for rep, _ in reports]
    files += [f for rep, _ in reports for f in rep.get("linked", ())]
    features = set(manifest.features(p.pickle, p.rank_trees, p.tensors, table, p.tree))
    sizes = {f["name"]: f["size"] for f in files}
    index_entry, shards = validate_and_index(
        p.staging, table, p.tensors, sizes, features, target.write_index
    )
    failpoint("commit.index_written")
    return manifest.build(
        name=name,
        uuid=p.uuid,
        world_size=world,
        step=opt.step,
        writer=writer_versions([r["zstd"] for r, _ in reports if r.get("zstd")]),
        metadata=lineage.merged(opt.metadata, p.lineage),
        tree=p.tree,
        rank_trees=p.rank_trees,
        tensors=p.tensors,
        files=files,
        index=index_entry,
        table=table,
        pickle=p.pickle,
        created=dt.datetime.now(dt.timezone.utc),
        incremental=incremental_member(p.base, files),
        encryption=key_scopes(p.seal, pc.unique(table.column("key_id")).to_pylist()),
        locator=for_save(shards, p.tensors, files, footers, DIGESTS in features),
    )


def incremental_member(base: dict | None, files: list[dict]) -> dict | None:
    """The manifest's ``incremental`` member: present exactly when a base file is linked."""
    if base is None or not any(linked_file(f["name"]) for f in files):
        return None
    return {"base": base["name"], "depth": base["depth"] + 1}


def validate_and_index(
    staging: str,
    table: pa.Table,
    tensors: list[dict],
    sizes: dict[str, int],
    features: set,
    write: Callable[[str, pa.Table], dict] = commit.write_index,
) -> tuple[dict, Shards | None]:
    """Check every row and write index.parquet (``write``) at the same time (both release the
    GIL). The index is only referenced by a manifest if validation passed; otherwise it is
    staging garbage like the rest. Returns the manifest's ``index`` member and the shards."""
    with ThreadPoolExecutor(1, thread_name_prefix="ckptguard-index") as pool:
        written = pool.submit(write, staging, table)
        try:
            shards = check_table(table, tensors, sizes, features)
        finally:
            entry = written.result()
    return entry, shards


def save_state(
    obj: Any,
    store: str,
    name: str,
    coord: Coordinator,
    opt: SaveOptions,
    source: ByteSource = DIRECT,
    on_read: Callable[[], None] | None = None,
    target: Target = DIRECTORY,
) -> CheckpointInfo:
    """Run the save on this rank; every rank returns the same CheckpointInfo or raises.

    ``source`` is where tensor bytes are read from (in place, or through bounded buffers);
    ``on_read`` is called once this rank has read every byte it writes (the caller's state is
    then free); ``target``: where the checkpoint goes (a directory in a store by default). Once
    committed, the commit hooks run on every rank (``hooks``), then rank 0 prunes by ``keep``.
    """
    set_rank(coord.rank)
    clock = measure.clock() or measure.Clock()
    if opt.node_local and target is DIRECTORY:
        target = NodeLocal(opt.node_local, coord.rank)
    try:
        info = _Save(coord, opt, store, name, source, on_read, target).run(obj)
    except BaseException as e:
        if coord.rank == 0 and target.announce:
            measure.record_save_failure(store, name, e, clock)
        raise
    if target.announce:
        if coord.rank == 0:
            sealed = {"signed": opt.sign_key is not None, "encrypted": bool(opt.encrypt)}
            measure.record_save(store, info, clock, **sealed)
        run_commit_hooks(info)
        if opt.keep is not None and coord.rank == 0:
            prune_after_commit(store, opt.keep)
    if opt.mlflow_run is not None and coord.rank == 0:
        digest = functools.partial(commit.manifest_sha256, info.path)  # read when tagging
        lineage.tag_run(opt.mlflow_run, info.path, info.step, digest)
    return info
