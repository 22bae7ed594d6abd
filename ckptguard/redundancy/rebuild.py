"""Rebuild the files of lost nodes of a protected node-local checkpoint, on their replacements.

A restarted job whose rank ``r`` runs on ``hosts[r]`` calls ``rebuild`` on every rank. The nodes
agree on what each still holds (the checkpoint's uuid, its own data files, its protection).
A node missing any of that is lost. It is rebuilt when its set survives the loss: XOR sets lose
at most one member, and a partner ring loses no two neighbours. Its files come back from the
parity of its set or from its partner's copy, and every chunk of them is checked against the
index. Then the checkpoint directory is renamed into place on that node, and its own part of
the set's protection is made again. Otherwise every rank gets the same RebuildError and nothing
is written: load the newest drained checkpoint instead.

Identity is by ranks, not host names: a replacement node runs the ranks the lost node ran.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, NamedTuple

from ..commit import staging_area, write_latest
from ..errors import CheckpointError, RebuildError, brief
from ..failpoints import failpoint, set_rank
from ..format.layout import INDEX, LATEST, MANIFEST, SIGNATURE
from ..fsutil import UnsafeFileError, fsync_dir, read_manifest, read_regular, write_new_file
from ..open import CheckpointReader
from ..read import VerifyReport, verify_rows
from ..readonly import remove_tree, seal_dir, seal_files
from . import exchange, parity
from .payload import Payload, Rebuilt
from .protect import (
    PARITY_FILE,
    TIMEOUT,
    WARD_DIR,
    ParityFile,
    finish,
    install_record,
    layout_of,
    marked,
    member_files,
    new_record_tmp,
    read_record,
    record_dir,
)

MAX_OWN = 1 << 34  # the largest MANIFEST.json or index.parquet a survivor sends (16 GiB)


class RebuildReport(NamedTuple):
    """What ``rebuild`` found and did: the nodes that were rebuilt (by their new names)."""

    name: str
    uuid: str
    scheme: str
    rebuilt: list[str]
    rebuilt_bytes: int  # on this node
    seconds: float


def _state(store: str, name: str) -> dict:
    """What this node holds of checkpoint ``name``: its uuid, its set record and whether the
    protection was recorded, and whether its own data files are whole in size."""
    checkpoint = os.path.join(store, name)
    try:
        _, body = read_manifest(checkpoint)
    except (CheckpointError, OSError):
        return {"present": os.path.lexists(checkpoint)}
    rec = read_record(store, name, body["uuid"])
    if rec is None:
        return {"present": True, "uuid": body["uuid"]}
    protected = marked(store, name, body["uuid"])
    whole = True
    try:
        with Payload(checkpoint, member_files(rec, rec["member"])):
            pass
    except (CheckpointError, OSError):
        whole = False
    return {
        "present": True,
        "uuid": body["uuid"],
        "set": rec,
        "protected": protected,
        "whole": whole,
    }


def _agree(
    states: list[dict], hosts: list[str], name: str
) -> tuple[str, list[dict], dict[tuple[int, int], str]]:
    """From every node's state: the uuid, the sets (each as the record of one survivor) and
    the lost members ((set index, member) -> the node that replaces it)."""
    uuids = {s["uuid"] for s in states if s.get("set")}
    if len(uuids) != 1:
        what = "no node holds" if not uuids else "the nodes hold different checkpoints named"
        raise RebuildError(f"{what} a protected checkpoint {name!r}: nothing to rebuild from")
    uid = uuids.pop()
    if not any(s.get("protected") for s in states if s.get("uuid") == uid):
        raise RebuildError(f"checkpoint {name!r} ({uid}) was never recorded as protected")
    leaders = {h: s for h, s in zip(dict.fromkeys(hosts), states, strict=True)}
    sets: dict[tuple, dict] = {}
    for s in states:
        rec = s.get("set")
        if rec and s.get("uuid") == uid:
            sets.setdefault(tuple(tuple(m["ranks"]) for m in rec["members"]), rec)
    lost: dict[tuple[int, int], str] = {}
    out = list(sets.values())
    schemes = {s["set"]["scheme"] for s in states if s.get("set") and s.get("uuid") == uid}
    if len(schemes) > 1:
        raise RebuildError(
            f"the nodes' records of {name!r} name different schemes ({', '.join(sorted(schemes))}):"
            " a protection with another scheme did not finish; protect it again first"
        )
    covered = sorted(r for rec in out for m in rec["members"] for r in m["ranks"])
    if covered != list(range(len(hosts))):
        raise RebuildError(
            f"checkpoint {name!r} cannot be rebuilt: the survivors' records cover ranks "
            f"{_spans(covered)} of the {len(hosts)} here (a whole set is lost, or the job "
            "runs with another number of ranks than the save)"
        )
    for k, rec in enumerate(out):
        for m, member in enumerate(rec["members"]):
            now = {hosts[r] for r in member["ranks"]}
            if len(now) != 1:
                raise RebuildError(
                    f"ranks {member['ranks']} ran on one node at the save and now run on "
                    f"{', '.join(sorted(now))}: restart with the same ranks on each node"
                )
            node = now.pop()
            st = leaders[node]
            if not (st.get("uuid") == uid and st.get("whole") and st.get("set")):
                if st.get("present") and st.get("uuid") != uid:
                    raise RebuildError(
                        f"node {node} holds another checkpoint {name!r}: remove it, then rebuild"
                    )
                lost[(k, m)] = node
    return uid, out, lost


def _spans(ranks: list[int]) -> str:
    """``0-3, 8-11`` for ranks 0 to 3 and 8 to 11 (``none`` for no ranks)."""
    out: list[str] = []
    for r in ranks:
        if out and int(out[-1].split("-")[-1]) == r - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ", ".join(out) or "none"


def _check_survivable(sets: list[dict], lost: dict[tuple[int, int], str]) -> None:
    for k, rec in enumerate(sets):
        gone = [m for m in range(len(rec["members"])) if (k, m) in lost]
        n = len(rec["members"])
        if rec["scheme"] == "xor" and len(gone) > 1:
            bad = f"{len(gone)} of the {n} nodes of an XOR set are lost; it survives one"
        elif rec["scheme"] == "partner" and any((m + 1) % n in gone for m in gone):
            bad = "a node and its partner are both lost"
        else:
            continue
        nodes = ", ".join(rec["members"][m]["node"] for m in gone)
        raise RebuildError(f"checkpoint {rec['name']!r} cannot be rebuilt: {bad} ({nodes})")


def rebuild(
    store: str,
    name: str,
    comm: Any,
    *,
    node: str,
    timeout: float = TIMEOUT,
    block: int = parity.BLOCK,
) -> RebuildReport:
    """Rebuild the lost nodes' files of checkpoint ``name`` of the node-local store ``store``
    (this node's), on every rank of the restarted job (``comm``, ``node`` as in ``protect``)."""
    started = time.monotonic()
    world = exchange.SetComm.duplicate(comm, timeout)
    set_rank(world.rank)
    try:
        return _rebuild(world, store, name, node, block, started)
    finally:
        world.close()


def _rebuild(
    world: exchange.SetComm, store: str, name: str, node: str, block: int, started: float
) -> RebuildReport:
    hosts = [b.decode() for b in world.allgather_bytes(node.encode())]
    leader = hosts.index(node) == world.rank
    state = _state(store, name) if leader else {}
    states = [
        json.loads(b) for b in world.allgather_bytes(json.dumps(state).encode()) if b != b"{}"
    ]
    uid, sets, lost = _agree(states, hosts, name)  # the same outcome on every rank
    _check_survivable(sets, lost)
    scheme = sets[0]["scheme"]
    if node not in lost.values() and state.get("whole") and not state.get("protected"):
        # Intact with its record, but not marked (a rebuild or protection that stopped
        # between the agreement and this node's marker): another node's marker holds for all.
        finish(store, name, uid, scheme, ok=True)
    if not lost:
        return RebuildReport(name, uid, scheme, [], 0, time.monotonic() - started)
    root = next(r for r, h in enumerate(hosts) if h not in lost.values() and hosts.index(h) == r)
    files = _own_files(store, name, world, root, leader and node in lost.values())
    failpoint("rebuild.agreed")
    error, done = "", 0
    try:
        done = _exchange(world, store, name, uid, sets, lost, hosts, node, leader, files, block)
    except Exception as e:  # a bug too: still agree, so no rank waits out its deadline
        error = f"{node}: {brief(e)}"
    world.timeout *= 2  # a node's part may take up to the timeout to fail
    failed = [o.decode() for o in world.allgather_bytes(error.encode()) if o]
    if leader and node in lost.values() and not failed:
        # Never removed on failure: a record is installed only with the checkpoint, both whole.
        finish(store, name, uid, scheme, ok=True)
    failpoint("rebuild.marked")
    world.all_ok(True)  # every node's record is final when any rank returns
    if failed:
        raise RebuildError(f"rebuilding {name!r} failed: " + "; ".join(failed[:8]))
    rebuilt = sorted(set(lost.values()))
    return RebuildReport(name, uid, scheme, rebuilt, done, time.monotonic() - started)


def _own_files(store: str, name: str, world: exchange.SetComm, root: int, need: bool) -> dict:
    """MANIFEST.json, index.parquet and SIGNATURE.json (if any) of a survivor, on every rank
    (kept where ``need``); the same RebuildError on every rank if the survivor cannot read them."""
    out = {}
    for member in (MANIFEST, INDEX, SIGNATURE):
        data = None
        if world.rank == root:
            path = os.path.join(store, name, member)
            try:
                data = b"\1" + read_regular(path, max_size=MAX_OWN)
            except FileNotFoundError:
                data = b"\0" if member == SIGNATURE else b"\2" + f"{path} is missing".encode()
            except (OSError, UnsafeFileError) as e:
                data = b"\2" + f"{path}: {brief(e)}".encode()
        got = world.bcast_bytes(data, root)
        if got[:1] == b"\2":
            raise RebuildError(f"the survivor cannot give its {member}: {got[1:].decode()}")
        if need and got[:1] == b"\1":
            out[member] = got[1:]
    return out


def _exchange(
    world: exchange.SetComm,
    store: str,
    name: str,
    uid: str,
    sets: list[dict],
    lost: dict[tuple[int, int], str],
    hosts: list[str],
    node: str,
    leader: bool,
    files: dict,
    block: int,
) -> int:
    """Every set's rebuild; this node's rebuilt bytes."""
    groups = [[hosts[m["ranks"][0]] for m in rec["members"]] for rec in sets]
    sc = exchange.set_comm(world.comm, groups, node if leader else None, world.timeout)
    if sc is None:
        return 0
    try:
        return _exchange_set(sc, store, name, uid, sets, lost, groups, node, files, block)
    finally:
        sc.close()


def _exchange_set(
    sc: exchange.SetComm,
    store: str,
    name: str,
    uid: str,
    sets: list[dict],
    lost: dict[tuple[int, int], str],
    groups: list[list[str]],
    node: str,
    files: dict,
    block: int,
) -> int:
    """This node's set's rebuild (a survivor's part, or a lost node's)."""
    k = next(i for i, g in enumerate(groups) if node in g)
    rec, me = sets[k], groups[k].index(node)
    gone = [m for m in range(len(rec["members"])) if (k, m) in lost]
    if not gone:
        return 0
    if me in gone:
        return _rebuild_here(sc, store, name, uid, rec, me, gone, files, node, block)
    rdir, n = record_dir(store, name, uid), len(rec["members"])
    with Payload(os.path.join(store, name), member_files(rec, me)) as own:
        if rec["scheme"] == "xor":
            with Payload(rdir, [(PARITY_FILE, layout_of(rec).segment)]) as par:
                _run_set(sc, rec, gone, Roles(own=own.read, parity=par.read), block)
        elif (me - 1) % n in gone:  # this node keeps its lost ward's copy
            ward = member_files(rec, (me - 1) % n)
            with Payload(os.path.join(rdir, WARD_DIR), ward) as copy:
                _run_set(sc, rec, gone, Roles(own=own.read, ward=copy.read), block)
        else:
            _run_set(sc, rec, gone, Roles(own=own.read), block)
    return 0


class Roles(NamedTuple):
    """What this member reads from (a survivor) or writes to (a lost member) in a set's rebuild."""

    own: exchange.Reader | None = None  # its data files
    parity: exchange.Reader | None = None  # its parity segment (XOR)
    ward: exchange.Reader | None = None  # its copy of its ward's files (partner)
    out: exchange.Writer | None = None  # its data files, rebuilt
    new_parity: exchange.Writer | None = None
    new_ward: exchange.Writer | None = None


def _run_set(sc: exchange.SetComm, rec: dict, gone: list[int], r: Roles, block: int) -> None:
    """The steps of a set's rebuild, in the same order on every member: XOR, the lost member's
    data then its parity; partner, for each lost member, its data from its partner, then its
    ward's files from the ward (neither is lost: no two neighbours are)."""
    n, me = len(rec["members"]), sc.rank
    if rec["scheme"] == "xor":
        lay = layout_of(rec)
        exchange.rebuild(sc, lay, gone[0], r.own, r.parity, r.out, block)
        exchange.reencode(sc, lay, gone[0], r.own, r.new_parity, block)
        return
    for m in gone:
        size = sum(s for _, s in member_files(rec, m))
        holder, ward = (m + 1) % n, (m - 1) % n
        wsize = sum(s for _, s in member_files(rec, ward))
        exchange.transfer(
            sc, holder, m, r.ward if me == holder else None, size, r.out if me == m else None, block
        )
        exchange.transfer(
            sc,
            ward,
            m,
            r.own if me == ward else None,
            wsize,
            r.new_ward if me == m else None,
            block,
        )


def _rebuild_here(
    sc: exchange.SetComm,
    store: str,
    name: str,
    uid: str,
    rec: dict,
    me: int,
    gone: list[int],
    files: dict,
    node: str,
    block: int,
) -> int:
    """A lost node's part: its files into a staging directory, checked against the index and
    renamed into place, and its part of the set's protection made again beside it."""
    final, n = os.path.join(store, name), len(rec["members"])
    if os.path.lexists(final):
        raise RebuildError(f"{final} exists but is not whole: remove it, then rebuild")
    staging = os.path.join(staging_area(store), f"{name}.{uid}.rebuild-{os.getpid()}")
    os.mkdir(staging, 0o755)
    tmp = new_record_tmp(store, name, uid)
    mine = {**rec, "member": me}
    mine["members"] = [dict(m) for m in rec["members"]]
    mine["members"][me]["node"] = node
    try:
        for member, data in files.items():
            write_new_file(os.path.join(staging, member), data)
        out = Rebuilt(staging, member_files(rec, me))
        new_parity, new_ward = None, None
        try:
            if rec["scheme"] == "xor":
                new_parity = ParityFile(os.path.join(tmp, PARITY_FILE))
                roles = Roles(out=out.write, new_parity=new_parity.write)
            else:
                os.mkdir(os.path.join(tmp, WARD_DIR), 0o700)
                ward = member_files(rec, (me - 1) % n)
                new_ward = Rebuilt(os.path.join(tmp, WARD_DIR), ward)
                roles = Roles(out=out.write, new_ward=new_ward.write)
            _run_set(sc, rec, gone, roles, block)
            out.commit()
            if new_parity is not None:
                mine["parity_xxh3_128"] = new_parity.close()
                new_parity = None
            if new_ward is not None:
                new_ward.commit()
        finally:
            out.discard()
            if new_parity is not None:
                new_parity.close()
            if new_ward is not None:
                new_ward.discard()
        failpoint("rebuild.files_rebuilt")
        verify_files(staging, [f for f, _ in member_files(rec, me)])
        install_record(store, tmp, mine)
        seal_files(staging)
        fsync_dir(staging)
        os.rename(staging, final)
        seal_dir(final)
        fsync_dir(store)
        failpoint("rebuild.installed")
    except BaseException:
        remove_tree(staging)
        remove_tree(tmp)
        raise
    if not os.path.lexists(os.path.join(store, LATEST)):
        write_latest(store, name)
    return sum(s for _, s in member_files(rec, me))


def verify_files(staging: str, names: list[str]) -> None:
    """Every chunk of the rebuilt files against the index: a damaged survivor is caught here."""
    rd = CheckpointReader(staging)
    try:
        report = VerifyReport(staging)
        verify_rows(rd, [(f, rd.rows_of_file(f)) for f in names], report)
    finally:
        rd.close()
    if report.problems:
        raise RebuildError(
            f"the rebuilt files do not match the checkpoint's hashes ({len(report.problems)} "
            f"problems; first: {report.problems[0]}): a survivor's copy or parity is damaged"
        )
