"""The save protocol, for one process or many: plan -> write -> report -> commit -> outcome.

Every rank takes part in every collective, carrying a local failure as data instead of raising
early, so all ranks leave with the same outcome (I8), in O(1) collectives per save:
gather(descriptions) -> broadcast(plan) -> write -> gather(reports) -> broadcast(outcome).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from . import commit as _commit
from .agent.client import notify_committed
from .coord import Coordinator
from .errors import (
    CheckpointAbortedError,
    CheckpointError,
    CheckpointWarning,
    OptionsMismatchError,
    ReplicaMismatchWarning,
    from_oserror,
)
from .failpoints import failpoint, set_rank
from .format import FORMAT_VERSION
from .format.datafile import FormatError
from .format.index import to_table
from .format.layout import datafile_name
from .format.manifest import PER_RANK_TENSORS, CheckpointInfo, parse_time
from .format.ranktrees import RANK_TREE_DIFFS, TextDiffer
from .format.validate import check_table
from .plan import PlanError, assignment, bind_per_rank, describe_local, make_plan
from .staging import DIRECT
from .tree import Flat, flatten, remap_tensor_ids
from .writer import RankWriter


@dataclass
class SaveOptions:
    compress: bool
    metadata: Any
    overwrite: bool
    step: int | None
    allow_pickle: bool
    chunk_size: int
    timeout: float
    check_replicated: bool
    writer_versions: dict
    source: Any = DIRECT
    """Where tensor bytes are read from (``staging``): in place, or through bounded buffers."""
    on_read: Callable[[], None] | None = None
    """Called once this rank has read every tensor byte it needs: the caller's state is free."""


LAST_TIMINGS: dict[str, float] = {}
"""Rank 0's wall-clock marks of the last save (for the commit-overhead benchmark)."""


class Failed:
    """What a rank saves when it failed before the save began: it still takes part in every
    collective and reports ``error``, so all ranks raise the same error naming it (I8)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Failed(Exception):
    def __init__(self, rank: int, text: str) -> None:
        super().__init__(text)
        self.rank = rank


SHAPING = (
    "path",
    "overwrite",
    "compress",
    "chunk_size",
    "allow_pickle",
    "check_replicated",
    "step",
)
"""The options of a save that shape what is committed, besides ``metadata``: every rank must
pass the same (its ``path``: the checkpoint's absolute path)."""


def shaping_options(opt: SaveOptions, store: str, name: str) -> dict:
    """This rank's options that shape the checkpoint, as JSON (``metadata`` by its xxh3-128,
    so that large metadata does not travel to rank 0 from every rank)."""
    doc = {k: getattr(opt, k) for k in SHAPING if k != "path"}
    doc["path"] = os.path.join(store, name)
    doc["metadata"] = "xxh3:" + xxhash.xxh3_128_hexdigest(_dump(opt.metadata))
    return doc


def check_options(per_rank: list[dict]) -> None:
    """Raise OptionsMismatchError naming the first option the ranks disagree on, with each
    distinct value and the ranks that passed it."""
    for option in (*SHAPING, "metadata"):
        values = [o.get(option) for o in per_rank]
        if all(v == values[0] for v in values):
            continue
        ranks: dict[str, list[int]] = {}
        for r, v in enumerate(values):
            ranks.setdefault(json.dumps(v), []).append(r)
        shown = [f"{_brief(json.loads(v))} on {_ranks(rs)}" for v, rs in ranks.items()]
        more = f", and {len(shown) - 4} other values" if len(shown) > 4 else ""
        raise OptionsMismatchError(
            f"the ranks passed different values of {option!r} to one save: "
            f"{'; '.join(shown[:4])}{more}. Every rank must pass the same; nothing was written",
            option,
            dict(enumerate(values)),
        )


def _brief(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _ranks(rs: list[int]) -> str:
    head = ", ".join(map(str, rs[:8])) + (f", ... ({len(rs)} ranks)" if len(rs) > 8 else "")
    return f"rank {head}" if len(rs) == 1 else f"ranks {head}"


def _warn_differing(keys: list[str], world: int) -> None:
    shown = ", ".join(map(repr, keys[:8])) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
    warnings.warn(
        ReplicaMismatchWarning(
            f"check_replicated=False: replicated tensor(s) {shown} differ between the {world} "
            "ranks; the lowest rank's copy is saved and every rank will load it. Wrap values "
            "that are each rank's own in ckptguard.PerRank"
        ),
        stacklevel=5,
    )


def _text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _dump(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


class _Save:
    """One save on one rank. ``own`` keeps this rank's exception so one process re-raises it."""

    def __init__(self, coord: Coordinator, opt: SaveOptions, store: str, name: str) -> None:
        self.coord, self.opt, self.store, self.name = coord, opt, store, name
        self.own: BaseException | None = None
        self.staging: str | None = None
        self.options = shaping_options(opt, store, name)

    def fail(self, e: BaseException) -> dict:
        self.own = e
        return {"ok": False, "rank": self.coord.rank, "error": _text(e)}

    def run(self, obj: Any) -> CheckpointInfo:
        c = self.coord
        try:
            gathered = c.gather(self.describe(obj), self.opt.timeout)
            plan = self.plan([_unpack(g) for g in gathered]) if c.rank == 0 else None
            plan = json.loads(c.broadcast(_dump(plan) if c.rank == 0 else None, self.opt.timeout))
            self.staging = plan.get("staging")
            if not plan["ok"]:
                if "option" in plan:  # the same error on every rank, naming the option
                    values = {int(r): v for r, v in plan["values"].items()}
                    raise OptionsMismatchError(plan["error"], plan["option"], values)
                raise _Failed(plan["rank"], plan["error"])
            report = self.write(plan)
            gathered = c.gather(
                _pack(report[0], *([_ipc(report[1])] if report[1] is not None else [])),
                self.opt.timeout,
            )
            outcome = self.commit(plan, [_report(g) for g in gathered]) if c.rank == 0 else None
            # Rank 0 renames only within `timeout` of the first report (commit's deadline); the
            # others wait twice that, so none gives up on a save that then commits (I8).
            outcome = json.loads(
                c.broadcast(_dump(outcome) if c.rank == 0 else None, 2 * self.opt.timeout)
            )
            if not outcome["ok"]:
                raise _Failed(outcome["rank"], outcome["error"])
        except _Failed as f:
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
            _warn_differing(plan["differing"], c.size)
        return info_from_json(outcome["info"])

    def cleanup(self) -> None:
        if self.coord.rank == 0 and self.staging and os.path.isdir(self.staging):
            with contextlib.suppress(OSError):  # else gc reclaims it; the store is unchanged
                _commit.discard_staging(self.staging)

    # -- phase 1: every rank describes its state ------------------------------------------------
    def describe(self, obj: Any) -> bytes:
        """This rank's message: status, its object tree (JSON) and its tensors (Arrow)."""
        try:
            if isinstance(obj, Failed):
                raise obj.error
            if isinstance(obj, Flat):
                tree, self.refs, used_pickle = obj.tree, obj.refs, obj.used_pickle
            else:
                tree, self.refs, used_pickle = flatten(obj, self.opt.allow_pickle)
            bind_per_rank(self.refs, self.coord.rank, self.coord.size)
            source = self.opt.source
            hasher = (lambda ref: source.digest(ref.value)) if self.coord.size > 1 else None
            desc = describe_local(self.refs, hasher)
            head = {"ok": True, "pickle": used_pickle, "options": self.options}
            return _pack(head, _dump(tree), _ipc(desc))
        except Exception as e:
            self.refs = []
            return _pack(self.fail(e))

    # -- phase 2: rank 0 plans and opens the staging directory ----------------------------------
    def plan(self, msgs: list[tuple[dict, list]]) -> dict:
        for m, _ in msgs:
            if not m["ok"]:
                return m
        try:
            check_options([m["options"] for m, _ in msgs])
        except OptionsMismatchError as e:
            return {"ok": False, "error": str(e), "option": e.option, "values": e.values}
        try:
            descs = [_from_ipc(parts[1]) for _, parts in msgs]
            plan = make_plan(descs, self.opt.check_replicated)
            tree0, rank_trees = _merge_trees([parts[0] for _, parts in msgs], descs, plan.keys)
            try:  # before any data is written; checked again at the rename (a race)
                _commit.check_target(os.path.join(self.store, self.name), self.opt.overwrite)
                failpoint("save.start")
                uid, self.staging = _commit.new_staging(self.store, self.name)
                failpoint("save.staging_created")
            except CheckpointError:  # before OSError: CheckpointExistsError is one too
                raise
            except OSError as e:
                raise from_oserror(e, self.store, "cannot create a staging directory in") from None
        except Exception as e:
            return self.fail(e)
        self.body = {
            "format": "ckptguard",
            "format_version": FORMAT_VERSION,
            "features": [
                *(["pickle"] if any(m["pickle"] for m, _ in msgs) else []),
                *([RANK_TREE_DIFFS] if rank_trees else []),
                *([PER_RANK_TENSORS] if any("per_rank" in t for t in plan.tensors) else []),
            ],
            "name": self.name,
            "uuid": uid,
            "created": "",
            "step": self.opt.step,
            "world_size": self.coord.size,
            "writer": self.opt.writer_versions,
            "metadata": self.opt.metadata,
            "tree": tree0,
            "rank_trees": rank_trees,
            "tensors": plan.tensors,
        }
        return {
            "ok": True,
            "uuid": uid,
            "staging": self.staging,
            "keys": plan.keys,
            "writer": plan.writer,
            "differing": plan.differing,
        }

    # -- phase 3: every rank writes its own data file -------------------------------------------
    def write(self, plan: dict) -> tuple[dict, pa.Table | None]:
        writer = None
        try:
            writer = RankWriter(plan["staging"], self.coord.rank, plan["uuid"], self.opt.chunk_size)
            mine_all = assignment(plan["keys"], plan["writer"], self.refs, self.coord.rank)
            todo = [(g, r) for r, (g, m) in zip(self.refs, mine_all, strict=True) if m]
            for i, raw in self.opt.source.stream([r.value for _, r in todo]):
                writer.add(todo[i][0], todo[i][1], self.opt.compress, raw)
            if self.opt.on_read is not None:
                self.opt.on_read()
            rows = writer.finish()
            failpoint("save.data_written")
        except Exception as e:
            if writer is not None:
                writer.abort()
            if isinstance(e, OSError):  # name this rank's file, even if it could not be created
                where = os.path.join(plan["staging"], datafile_name(self.coord.rank))
                e = from_oserror(e, where, "cannot write")
            return self.fail(e), None
        return {
            "ok": True,
            "written_at": time.time(),
            "file": {
                "name": writer.name,
                "rank": self.coord.rank,
                "size": writer.size,
                "chunks": len(rows),
            },
        }, to_table(rows)

    # -- phase 4: rank 0 validates the reports and commits --------------------------------------
    def commit(self, plan: dict, reports: list[tuple[dict, pa.Table | None]]) -> dict:
        for r, _ in reports:
            if not r["ok"]:
                return r
        LAST_TIMINGS.clear()
        LAST_TIMINGS["last_rank_written"] = max(r["written_at"] for r, _ in reports)
        LAST_TIMINGS["reports_received"] = time.time()
        try:
            table = pa.concat_tables([t for _, t in reports])
            files = [rep["file"] for rep, _ in reports]
            features = set(self.body["features"])
            sizes = {f["name"]: f["size"] for f in files}
            index_entry = validate_and_index(
                self.staging, table, self.body["tensors"], sizes, features
            )
            failpoint("commit.index_written")
            self.body.update(
                {
                    "files": files,
                    "index": index_entry,
                    "totals": {
                        "tensors": len(self.body["tensors"]),
                        "chunks": table.num_rows,
                        "raw_bytes": int(pc.sum(table.column("raw_len")).as_py() or 0),
                        "stored_bytes": int(pc.sum(table.column("stored_len")).as_py() or 0),
                        "files": len(files),
                    },
                }
            )
            deadline = None
            if self.coord.size > 1:  # wall clocks of the ranks: skew must stay well under timeout
                deadline = min(r["written_at"] for r, _ in reports) + self.opt.timeout
            published = _commit.publish(
                self.store,
                self.name,
                self.staging,
                self.body,
                overwrite=self.opt.overwrite,
                deadline=deadline,
            )
            final, late = published.path, list(published.warnings)
            self.staging = None  # committed: nothing of ours to clean up
            LAST_TIMINGS["visible"] = time.time()
        except FormatError as e:
            return self.fail(PlanError(f"reports do not form a valid checkpoint: {e}"))
        except CheckpointError as e:  # before OSError: CheckpointExistsError is one too
            return self.fail(e)
        except OSError as e:
            return self.fail(from_oserror(e, self.staging or self.store, "cannot commit in"))
        except Exception as e:
            return self.fail(e)
        info = CheckpointInfo.from_manifest(self.body, final)
        doc = asdict(info)
        doc["created"] = self.body["created"]
        doc["warnings"] = late
        return {"ok": True, "info": doc}


def validate_and_index(
    staging: str, table: pa.Table, tensors: list[dict], sizes: dict[str, int], features: set
) -> dict:
    """Check every row and write index.parquet at the same time (both release the GIL).

    The index is only referenced by a manifest if validation passed; otherwise it is staging
    garbage like the rest. Returns the manifest's ``index`` member.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="ckptguard-index") as pool:
        written = pool.submit(_commit.write_index, staging, table)
        try:
            check_table(table, tensors, sizes, features)
        finally:
            entry = written.result()
    return entry


def _pack(doc: dict, *parts: bytes) -> bytes:
    """A message between ranks: a JSON header, then opaque parts (JSON, Arrow IPC); no pickle."""
    head = _dump(doc)
    out = [struct.pack("<QI", len(head), len(parts)), head]
    for p in parts:
        out += [struct.pack("<Q", len(p)), p]
    return b"".join(out)


def _unpack(data: bytes) -> tuple[dict, list[memoryview]]:
    view = memoryview(data)
    n, count = struct.unpack_from("<QI", view)
    pos = 12 + n
    doc = json.loads(bytes(view[12:pos]))
    parts = []
    for _ in range(count):
        (k,) = struct.unpack_from("<Q", view, pos)
        parts.append(view[pos + 8 : pos + 8 + k])
        pos += 8 + k
    return doc, parts


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: memoryview) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def _report(data: bytes) -> tuple[dict, pa.Table | None]:
    doc, parts = _unpack(data)
    return doc, (_from_ipc(parts[0]) if parts else None)


def _merge_trees(
    blobs: list[memoryview], descs: list[pa.Table], keys: list[str]
) -> tuple[Any, dict[str, list]]:
    """Rank 0's tree with global tensor ids, and for each rank whose tree differs a diff against
    it (the manifest's ``rank_trees`` under the rank-tree-diffs feature, format.md section 6.1).

    A tree equal to rank 0's as JSON text (the usual case) costs one comparison. A rank whose
    tensors have rank 0's keys in rank 0's order maps local ids to the same global ids, so its
    text is diffed against rank 0's as sent (only the differing values are parsed, then
    remapped); equal texts share one diff. Other ranks' trees are remapped, then diffed against
    rank 0's global tree. Diffs are exact: they are taken on the JSON texts.
    """
    gid = {k: i for i, k in enumerate(keys)}
    key0 = descs[0].column("key")
    ids0 = [gid[k] for k in key0.to_pylist()]
    blob0 = bytes(blobs[0])
    tree0 = remap_tensor_ids(json.loads(blob0), ids0)
    differs: dict[bool, TextDiffer | None] = {}

    def diff(text: bytes, local: bool) -> list:
        d = None
        try:
            if local not in differs:
                differs[local] = None
                differs[local] = TextDiffer((blob0 if local else _dump(tree0)).decode())
            if differs[local] is not None:
                d = differs[local].diff(text.decode())
        except (RecursionError, ValueError, IndexError):  # deeper than this stack
            pass
        if d is None:  # the whole tree
            d = [[[], json.loads(text)]]
        return [[p, remap_tensor_ids(v, ids0)] for p, v in d] if local else d

    seen: dict[bytes, list] = {}  # diffs by the xxh3-128 of a tree's text (rank 0's keys)
    diffs: dict[str, list] = {}
    for r in range(1, len(blobs)):
        b = bytes(blobs[r])
        if descs[r].column("key").equals(key0):
            if b == blob0:
                continue
            h = xxhash.xxh3_128_digest(b)
            if h not in seen:
                seen[h] = diff(b, True)
            d = seen[h]
        else:
            ids = [gid[k] for k in descs[r].column("key").to_pylist()]
            d = diff(_dump(remap_tensor_ids(json.loads(b), ids)), False)
        if d:
            diffs[str(r)] = d
    return tree0, diffs


def info_from_json(doc: dict) -> CheckpointInfo:
    """The CheckpointInfo that a save's outcome carries; warns of what failed after the commit."""
    late = tuple(str(w) for w in doc.get("warnings") or ())
    for w in late:
        warnings.warn(CheckpointWarning(w), stacklevel=3)
    return CheckpointInfo(**{**doc, "created": parse_time(doc["created"]), "warnings": late})


def save_state(
    obj: Any, store: str, name: str, coord: Coordinator, opt: SaveOptions
) -> CheckpointInfo:
    """Run the save on this rank; every rank returns the same CheckpointInfo or raises."""
    set_rank(coord.rank)
    info = _Save(coord, opt, store, name).run(obj)
    notify_committed(info.path, info.step)  # under `ckptguard run`: this rank has committed
    return info
