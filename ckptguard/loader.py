"""Load: turn a checkpoint's chunks back into tensors and the saved object.

open (validate manifest and index) -> select (the boxes this rank wants, the chunks that meet
them) -> place (allocate the targets) -> read.read_into (each file once, its records checked)
-> place (copy the pieces into their tensors, move them to their devices) -> unflatten.
"""

from __future__ import annotations

import os
from typing import Any

from . import collector, place, select
from .errors import UnsupportedObjectError, WorldSizeError
from .format.index import Row
from .format.layout import MANIFEST
from .format.manifest import PER_RANK_TENSORS
from .format.ranktrees import rank_tree
from .onefile import OneFile
from .open import CheckpointReader
from .place import Landing, MapLocation
from .read import read_into, read_packed
from .select import Target
from .tree import TreeError, tensor_ids, unflatten

__all__ = ["MapLocation", "load_checkpoint"]


def load_checkpoint(
    path: str | OneFile,
    map_location: MapLocation = None,
    verify: bool = True,
    allow_pickle: bool = False,
    template: Any = None,
    rank: int = 0,
    world: int | None = None,
) -> Any:
    """Read, verify and rebuild the object saved at ``path`` (or in the one-file checkpoint
    open as ``path``) as rank ``rank`` sees it.

    Tensors in ``template`` (plain, ``Shard`` or DTensor, found by key) are filled in place with
    the part of the global tensor they cover, whatever the saved sharding; the others load whole.
    Per-rank tensors load rank ``rank``'s own value; ``world``, this job's number of ranks, must
    then be the saved one (None: the caller chose ``rank`` itself).
    """
    with collector.paused(), CheckpointReader(path) as rd:
        if "pickle" in rd.features and not allow_pickle:
            raise UnsupportedObjectError(
                f"{rd.path} contains pickled objects; load it with allow_pickle=True only if you "
                "trust where it came from"
            )
        tree = rank_tree(rd.manifest, rank)
        ids = _tensor_ids(rd, tree)
        if PER_RANK_TENSORS in rd.features:
            _check_rank(rd, rank, world)
        targets = (
            select.template_targets(template, rd.tensors, rd.path, rank)
            if template is not None
            else {}
        )
        # Tensors without a template load whole, in tree order, each once.
        fresh = {gid: select.whole_box(rd.tensors[gid], rank) for gid in ids if gid not in targets}
        boxes = {gid: tg.box for gid, tg in targets.items()} | fresh
        pieces = select.plan_reads(rd.table, rd.tensors, boxes)
        # The index ties each tensor's bytes to records inside its files; the files on disk must
        # be that large before their tensors are allocated (I6).
        rd.check_sizes({r.file for ps in pieces.values() for p in ps for r in p.rows})
        for gid, box in fresh.items():
            targets[gid] = place.fresh_target(rd.tensors[gid], box)
        copies = _read(rd, targets, pieces, verify)
        for gid, landing in copies:
            place.copy_block(targets[gid], rd.tensors[gid], landing)
        values: list[Any] = [None] * len(rd.tensors)
        for gid, tg in targets.items():
            values[gid] = place.finish(tg, rd.tensors[gid], map_location) if tg.fresh else tg.result
        try:
            return unflatten(tree, values, allow_pickle=allow_pickle)
        except TreeError as e:
            raise rd.corrupt(f"object tree is malformed: {e}", file=MANIFEST) from None


def _tensor_ids(rd: CheckpointReader, tree: Any) -> list[int]:
    """The tensor ids the object tree references, each checked to exist."""
    ids = tensor_ids(tree)
    for gid in ids:
        if not 0 <= gid < len(rd.tensors):
            raise rd.corrupt(
                f"object tree references tensor {gid}, which does not exist", file=MANIFEST
            )
    return ids


def _read(
    rd: CheckpointReader,
    targets: dict[int, Target],
    pieces: dict[int, list[select.Piece]],
    verify: bool,
) -> list[tuple[int, Landing]]:
    """Read every piece's chunks where they land, each file once with its records in offset
    order; the landings still to be copied into their targets."""
    copies: list[tuple[int, Landing]] = []
    by_file: dict[str, list[tuple[Row, Landing]]] = {}
    for gid, tg in targets.items():
        for p in pieces.get(gid, []):
            landing, copy = place.land(rd.tensors[gid]["key"], p, tg)
            if copy:
                copies.append((gid, landing))
            for r in p.rows:
                by_file.setdefault(r.file, []).append((r, landing))
    for name in sorted(by_file):
        work = sorted(by_file[name], key=lambda rl: rl[0].offset)
        fd = rd.open_file(name)
        try:
            groups: dict[int, list[tuple[Row, Landing]]] = {}
            packed: list[tuple[Row, Landing]] = []
            for r, landing in work:
                if r.packed:  # slices of shared records: each record read once for all
                    packed.append((r, landing))
                else:
                    groups.setdefault(id(landing), []).append((r, landing))
            for group in groups.values():
                landing = group[0][1]
                rows = [r for r, _ in group]
                offsets = [landing.dest_offset(r) for r in rows]
                read_into(rd, fd, rows, landing.buf, offsets, verify)
            if packed:
                packed.sort(key=lambda rl: (rl[0].offset, rl[0].record_byte_offset))
                rows = [r for r, _ in packed]
                bufs = [landing.buf for _, landing in packed]
                offsets = [landing.dest_offset(r) for r, landing in packed]
                read_packed(rd, fd, rows, bufs, offsets, verify)
        finally:
            os.close(fd)
    return copies


def _check_rank(rd: CheckpointReader, rank: int, world: int | None) -> None:
    """A checkpoint with per-rank tensors loads as one of its saved ranks, and in a job only at
    the saved world size: another rank's value is never handed over unasked."""
    saved = rd.manifest["world_size"]
    keys = [t["key"] for t in rd.tensors if t.get("per_rank")]
    what = f"per-rank tensors ({', '.join(map(repr, keys[:4]))}{', ...' if len(keys) > 4 else ''})"
    if world is not None and world != saved:
        raise WorldSizeError(
            f"{rd.path} holds {what} of each of its {saved} ranks, but {world} ranks load it: "
            "pass rank=<saved rank> to load to choose whose values this rank gets"
        )
    if not 0 <= rank < saved:
        raise WorldSizeError(
            f"{rd.path} holds {what} of its {saved} ranks; there is no rank {rank} among them"
        )
