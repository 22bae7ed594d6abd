"""Protect a node-local checkpoint: each node's data files copied to its partner node, or
covered by the XOR parity of its set; and the protection level a node's store records.

A node-local checkpoint is one checkpoint (one manifest, one index) whose data files lie on the
nodes of the ranks that wrote them: each node's ``<store>/<name>/`` holds MANIFEST.json,
index.parquet and the data files of its own ranks. What protects it lies beside it on each node
(docs/format.md section 12)::

    <store>/.redundancy/<name>.<uuid>/
        SET.json      the set: scheme, members (node, ranks, files), this node's place in it
        parity        XOR: this member's parity segment
        ward/         partner: a copy of the previous node's data files
        PROTECTED     written once every set of the job is complete

Every rank of the job calls ``protect`` together; the lowest rank of each node does the node's
part, the others only join the agreement at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import xxhash

from ..audit import canon
from ..errors import CheckpointError, RedundancyError, brief, from_oserror, warn_after_commit
from ..failpoints import failpoint, set_rank
from ..format.layout import REDUNDANCY
from ..fsutil import (
    UnsafeFileError,
    fsync_dir,
    makedirs_durably,
    read_manifest,
    read_regular,
    write_new_file,
)
from ..io import pwrite_all
from . import exchange, parity
from .payload import Payload, Rebuilt, check_names
from .sets import DEFAULT_SET_SIZE, partner_ring, xor_sets

SCHEMES = ("partner", "xor")
SET_FILE, PARITY_FILE, WARD_DIR, PROTECTED = "SET.json", "parity", "ward", "PROTECTED"
MAX_SET_BYTES = 64 << 20
TIMEOUT = 300.0


class Protection(NamedTuple):
    """What ``protect`` did on this rank's node (zeros on a rank that is not a node's first)."""

    name: str
    uuid: str
    scheme: str
    level: str  # "protected"
    sets: list[list[str]]
    stored_bytes: int  # this node's parity segment or copy of its ward's files
    seconds: float


def record_dir(store: str, name: str, uuid: str) -> str:
    """Where a node keeps the protection of checkpoint ``name`` (of ``uuid``)."""
    return os.path.join(store, REDUNDANCY, f"{name}.{uuid}")


def node_files(body: dict, hosts: Sequence[str]) -> dict[str, list[tuple[str, int]]]:
    """Each node's data files ((name, size), by rank then name) of a checkpoint whose manifest is
    ``body``, saved by a job whose rank ``r`` ran on ``hosts[r]``."""
    if body["world_size"] != len(hosts):
        raise RedundancyError(
            f"checkpoint {body['name']!r} was saved by {body['world_size']} ranks; "
            f"{len(hosts)} take part here: protect it from the job that saved it"
        )
    out: dict[str, list[tuple[str, int]]] = {h: [] for h in hosts}
    for f in sorted(body["files"], key=lambda f: (f["rank"], f["name"])):
        out[hosts[f["rank"]]].append((f["name"], f["size"]))
    return out


def plan_sets(
    scheme: str, hosts: Sequence[str], domains: Mapping[str, str] | None, set_size: int
) -> list[list[str]]:
    """The sets of nodes for ``scheme``: one ring for partner, XOR sets of about ``set_size``."""
    if scheme == "partner":
        return [partner_ring(hosts, domains).order]
    if scheme == "xor":
        return xor_sets(hosts, domains, set_size)
    raise RedundancyError(f"redundancy scheme {scheme!r} is not one of {', '.join(SCHEMES)}")


def set_record(body: dict, scheme: str, members: list[str], hosts: Sequence[str], me: int) -> dict:
    """The SET.json body of member ``me`` of the set ``members`` (nodes, in set order)."""
    files = node_files(body, hosts)
    rec: dict[str, Any] = {
        "v": 1,
        "name": body["name"],
        "uuid": body["uuid"],
        "scheme": scheme,
        "member": me,
        "members": [
            {
                "node": n,
                "ranks": [r for r, h in enumerate(hosts) if h == n],
                "files": [[f, s] for f, s in files[n]],
            }
            for n in members
        ],
    }
    if scheme == "xor":
        rec["segment"] = parity.layout([sum(s for _, s in files[n]) for n in members]).segment
    return rec


_HEX = frozenset("0123456789abcdef")


def check_record(rec: dict, name: str, uid: str) -> dict:
    """``rec`` if it is a SET.json body of checkpoint ``name`` (``uid``) as format.md section 12
    allows, else RedundancyError naming what is wrong: a record is read from a node's disk."""

    def bad(what: str) -> RedundancyError:
        return RedundancyError(f"the SET.json of {name!r} is damaged: {what}")

    xor = rec.get("scheme") == "xor"
    keys = {"v", "name", "uuid", "scheme", "member", "members"}
    if set(rec) != keys | ({"segment", "parity_xxh3_128"} if xor else set()):
        raise bad(f"members {sorted(rec)}")
    if rec["v"] != 1 or rec["name"] != name or rec["uuid"] != uid or rec["scheme"] not in SCHEMES:
        raise bad("version, name, uuid or scheme")
    members = rec["members"]
    if not isinstance(members, list) or len(members) < 2:
        raise bad("fewer than 2 members")
    if not _count(rec["member"]) or rec["member"] >= len(members):
        raise bad(f"member {rec['member']!r}")
    for m in members:
        if not isinstance(m, dict) or set(m) != {"node", "ranks", "files"}:
            raise bad("a member is not {node, ranks, files}")
        ranks, files = m["ranks"], m["files"]
        if not isinstance(m["node"], str) or not isinstance(ranks, list) or not ranks:
            raise bad("a member's node or ranks")
        if not all(_count(r) for r in ranks) or ranks != sorted(set(ranks)):
            raise bad("a member's ranks are not ascending rank numbers")
        if not isinstance(files, list) or not all(
            isinstance(f, list) and len(f) == 2 and isinstance(f[0], str) and _count(f[1])
            for f in files
        ):
            raise bad("a member's files are not [name, size] pairs")
        check_names([(f, z) for f, z in files])
    if xor:
        if rec["segment"] != layout_of(rec).segment:
            raise bad(f"segment {rec['segment']!r} does not fit the members' files")
        h = rec["parity_xxh3_128"]
        if not isinstance(h, str) or len(h) != 32 or not set(h) <= _HEX:
            raise bad("parity_xxh3_128 is not 32 lowercase hex digits")
    return rec


def _count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def member_files(rec: dict, m: int) -> list[tuple[str, int]]:
    return [(f, s) for f, s in rec["members"][m]["files"]]


def layout_of(rec: dict) -> parity.Layout:
    return parity.layout(
        [sum(s for _, s in member_files(rec, m)) for m in range(len(rec["members"]))]
    )


def protect(
    checkpoint: str,
    comm: Any,
    *,
    node: str,
    scheme: str = "xor",
    domains: Mapping[str, str] | None = None,
    set_size: int = DEFAULT_SET_SIZE,
    timeout: float = TIMEOUT,
    rate: float | None = None,
    block: int = parity.BLOCK,
) -> Protection:
    """Protect the committed node-local checkpoint ``checkpoint`` (this node's directory of it),
    called by every rank of the job that saved it, on ``comm`` (an mpi4py communicator of those
    ranks, in rank order); ``node`` is this rank's node; ``rate`` caps the bytes a second each
    node reads and sends (None: no cap). Returns once every set is complete and every node has
    recorded it, or raises the same RedundancyError on every rank (naming the nodes that failed)
    with each node's partial protection removed: a checkpoint is either recorded as protected,
    or its protection is absent."""
    job = Job(checkpoint, node, scheme, domains, set_size, rate, block)
    return protect_on(exchange.SetComm.duplicate(comm, timeout), job)


class Job(NamedTuple):
    """What one protection is asked to do (``protect``'s arguments but the communicator)."""

    checkpoint: str
    node: str
    scheme: str
    domains: Mapping[str, str] | None
    set_size: int
    rate: float | None
    block: int


def protect_on(world: exchange.SetComm, job: Job) -> Protection:
    """``protect`` on ``world``, a private communicator of the job's ranks, which it frees."""
    started, sc, checkpoint, node = time.monotonic(), None, job.checkpoint, job.node
    set_rank(world.rank)
    try:
        hosts = [b.decode() for b in world.allgather_bytes(node.encode())]
        sets = _agree(world, job, hosts)
        leader = hosts.index(node) == world.rank
        store, name = os.path.split(os.path.abspath(checkpoint))
        if world.all_ok(not leader or _protected_as(checkpoint, job.scheme)):
            return Protection(name, "", job.scheme, "protected", sets, 0, 0.0)  # nothing to do
        error, stored, uid = "", 0, ""
        try:
            sc = exchange.set_comm(world.comm, sets, node if leader else None, world.timeout)
            if sc is not None:
                _, body = read_manifest(checkpoint)
                uid = body["uuid"]
                members = next(s for s in sets if node in s)
                rec = set_record(body, job.scheme, members, hosts, members.index(node))
                stored = _protect_node(sc, store, rec, checkpoint, job)
        except Exception as e:  # a bug too: still agree, so no rank waits out its deadline
            error = f"{node}: {brief(e)}"
        world.timeout *= 2  # a node's part may take up to `timeout` to fail
        failed = [o.decode() for o in world.allgather_bytes(error.encode()) if o]
        failpoint("protect.agreed")
        if leader and uid:
            finish(store, name, uid, job.scheme, ok=not failed)
        failpoint("protect.marked")
        world.all_ok(True)  # every node's record is final when any rank returns
    finally:
        for c in (sc, world):
            if c is not None:
                c.close()
    if failed:
        raise RedundancyError(
            f"protecting {checkpoint} ({job.scheme}) failed; it stays local-committed only: "
            + "; ".join(failed[:8])
        )
    return Protection(name, uid, job.scheme, "protected", sets, stored, time.monotonic() - started)


def _agree(world: exchange.SetComm, job: Job, hosts: list[str]) -> list[list[str]]:
    """The sets of ``job``; or the same RedundancyError on every rank if any rank's options are
    unusable (its rate, its scheme) or give other sets than rank 0's."""
    sets: list[list[str]] = []
    problem = exchange.rate_problem(job.rate, job.block, world.timeout)
    if not problem:
        try:
            sets = plan_sets(job.scheme, hosts, job.domains, job.set_size)
        except Exception as e:  # a wrong type too: still agree, so no rank waits out a deadline
            problem = str(e) if isinstance(e, RedundancyError) else brief(e)
    plan = {"scheme": job.scheme, "sets": sets, "block": job.block}
    digest = xxhash.xxh3_64_hexdigest(canon.encode(plan))
    name = os.path.basename(os.path.abspath(job.checkpoint))
    mine = json.dumps([digest, name, problem]).encode()
    said = [json.loads(o) for o in world.allgather_bytes(mine)]
    bad = [f"rank {r}: {p}" for r, (_, _, p) in enumerate(said) if p]
    if not bad:  # one checkpoint: each node's directory of it has the same name
        bad = [
            f"rank {r} protects {n!r}, rank 0 {said[0][1]!r}"
            for r, (_, n, _) in enumerate(said)
            if n != said[0][1]
        ]
    if not bad:
        bad = [
            f"rank {r}'s scheme, set_size, domains or block differ from rank 0's"
            for r, (d, _, _) in enumerate(said)
            if d != said[0][0]
        ]
    if bad:
        raise RedundancyError(f"protecting {job.checkpoint} refused: " + "; ".join(bad[:4]))
    return sets


def _protected_as(checkpoint: str, scheme: str) -> bool:
    """Whether this node records ``checkpoint`` as protected by ``scheme`` already."""
    store, name = os.path.split(os.path.abspath(checkpoint))
    try:
        _, body = read_manifest(checkpoint)
        rec = read_record(store, name, body["uuid"])
    except (CheckpointError, OSError):
        return False
    return rec is not None and rec["scheme"] == scheme and marked(store, name, body["uuid"])


def read_record(store: str, name: str, uid: str) -> dict | None:
    """This node's SET.json of checkpoint ``name`` (``uid``), checked (``check_record``); None
    if it is missing, not a regular file, or not a record this format allows."""
    path = os.path.join(record_dir(store, name, uid), SET_FILE)
    try:
        raw = read_regular(path, max_size=MAX_SET_BYTES)
        return check_record(canon.decode(raw.removesuffix(b"\n"), MAX_SET_BYTES), name, uid)
    except (OSError, UnsafeFileError, canon.CanonicalError, RedundancyError):
        return None


def new_record_tmp(store: str, name: str, uid: str) -> str:
    """A new private directory in ``<store>/.redundancy/`` to build a protection record in."""
    makedirs_durably(os.path.join(store, REDUNDANCY), 0o700)
    tmp = os.path.join(store, REDUNDANCY, f".tmp-{name}.{uid}.{os.getpid()}")
    _remove(tmp)
    os.mkdir(tmp, 0o700)
    return tmp


def install_record(store: str, tmp: str, rec: dict) -> None:
    """Write SET.json into ``tmp`` and rename it into place, whole, replacing an older record
    of the same checkpoint (never marked protected: the marker comes after the agreement)."""
    final = record_dir(store, rec["name"], rec["uuid"])
    write_new_file(os.path.join(tmp, SET_FILE), canon.encode(rec) + b"\n")
    fsync_dir(tmp)
    _remove(final)
    os.rename(tmp, final)
    fsync_dir(os.path.dirname(final))


def _protect_node(sc: exchange.SetComm, store: str, rec: dict, checkpoint: str, job: Job) -> int:
    """This node's part: its parity or its ward's copy, written whole under a temporary name and
    renamed into place; the bytes it keeps."""
    tmp = new_record_tmp(store, rec["name"], rec["uuid"])
    block, me = job.block, rec["member"]
    try:
        with Payload(checkpoint, member_files(rec, me)) as mine:
            read = exchange.Pace(job.rate).reader(mine.read)
            if rec["scheme"] == "xor":
                kept, digest = _parity(sc, rec, read, os.path.join(tmp, PARITY_FILE), block)
                rec = {**rec, "parity_xxh3_128": digest}
            else:
                ward = (me - 1) % len(rec["members"])
                out = Rebuilt(_mkdir(os.path.join(tmp, WARD_DIR)), member_files(rec, ward))
                try:
                    kept = sum(s for _, s in member_files(rec, ward))
                    exchange.copy_ring(sc, read, mine.length, kept, out.write, block)
                    out.commit()
                finally:
                    out.discard()
        failpoint("protect.record_built")
        install_record(store, tmp, rec)
        failpoint("protect.record_installed")
    except BaseException:
        _remove(tmp)
        raise
    return kept


def _mkdir(path: str) -> str:
    os.mkdir(path, 0o700)
    return path


class ParityFile:
    """A member's parity segment written block by block to a new file, hashed as it goes."""

    def __init__(self, path: str) -> None:
        self.path, self.hash = path, xxhash.xxh3_128()
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def write(self, offset: int, data: Any) -> None:
        self.hash.update(memoryview(data.data))
        pwrite_all(self.fd, [memoryview(data.data)], offset, self.path)

    def close(self) -> str:
        """Fsync and close; the segment's xxh3-128 in hex."""
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
        return self.hash.hexdigest()


def _parity(
    sc: exchange.SetComm, rec: dict, read: parity.Reader, path: str, block: int
) -> tuple[int, str]:
    """Compute and write this member's parity segment from its payload's ``read``; (its size,
    its xxh3-128 in hex)."""
    lay = layout_of(rec)
    out = ParityFile(path)
    try:
        exchange.encode(sc, lay, read, out.write, block)
    finally:
        digest = out.close()
    return lay.segment, digest


def finish(store: str, name: str, uid: str, scheme: str, ok: bool) -> None:
    """After the agreement: record the protection, or remove what this node wrote of it."""
    final = record_dir(store, name, uid)
    if not ok:
        _remove(final)
        return
    marker = {"v": 1, "name": name, "uuid": uid, "scheme": scheme, "time": int(time.time())}
    try:
        write_new_file(os.path.join(final, PROTECTED), canon.encode(marker) + b"\n")
        fsync_dir(final)
    except OSError as e:  # every set is complete: another node's marker says so
        warn_after_commit(f"{from_oserror(e, final, 'cannot record the protection in')}")


def _remove(path: str) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)
        fsync_dir(os.path.dirname(path))


def level(checkpoint: str) -> str:
    """``protected`` if this node's store records the protection of ``checkpoint`` (the uuid
    its manifest has now), else ``local``."""
    store, name = os.path.split(os.path.abspath(checkpoint))
    _, body = read_manifest(checkpoint)
    return "protected" if marked(store, name, body["uuid"]) else "local"


def where(store: str, name: str, uid: str) -> str:
    """This node's protection of checkpoint ``name`` (``uid``) in words, for ``ckptguard ls``:
    ``local``, or the scheme and the nodes that hold what rebuilds this node's files."""
    rec = read_record(store, name, uid)
    if rec is None or not marked(store, name, uid):
        return "local"
    members, me = rec["members"], rec["member"]
    if rec["scheme"] == "partner":
        return f"protected: partner, copy on {members[(me + 1) % len(members)]['node']}"
    others = ", ".join(m["node"] for i, m in enumerate(members) if i != me)
    return f"protected: xor, parity on {others}"


def marked(store: str, name: str, uid: str) -> bool:
    """Whether ``store`` holds the PROTECTED marker of checkpoint ``name`` (``uid``)."""
    marker = os.path.join(record_dir(store, name, uid), PROTECTED)
    try:
        raw = read_regular(marker, max_size=4096)
        rec = canon.decode(raw.removesuffix(b"\n"), 4096)
    except (OSError, UnsafeFileError, canon.CanonicalError):
        return False
    return rec.get("uuid") == uid and rec.get("name") == name
