"""Load: turn a checkpoint's chunks back into tensors and the saved object.

open (validate manifest and index) -> select (the boxes this rank wants, the chunks that meet
them; the tensors that are one slice of a packed record, as columns) -> place (allocate the
targets, one buffer per packed record) -> read (each file once, its records checked) -> place
(copy the pieces into their tensors, views of the packed records' buffers, devices) ->
unflatten.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from . import collector, measure, place, select
from .errors import ScopeShreddedError, UnsupportedObjectError, WorldSizeError
from .format.index import Row
from .format.layout import MANIFEST
from .format.manifest import PER_RANK_TENSORS
from .format.ranktrees import rank_tree
from .format.treeids import TREE_TYPES, tensor_ids
from .format.views import TENSOR_VIEWS, storage_of
from .open import CheckpointReader, Members
from .place import Landing, MapLocation
from .read import read_into, read_packed, read_record, read_whole_records
from .select import Target
from .sign import TrustSet
from .tree import TORCH_BY_NAME, TreeError, unflatten

__all__ = ["MapLocation", "fill", "iter_tensors", "load_checkpoint"]


def load_checkpoint(
    path: str | Members | CheckpointReader,
    map_location: MapLocation = None,
    verify: bool = True,
    allow_pickle: bool = False,
    template: Any = None,
    rank: int = 0,
    world: int | None = None,
    trust: TrustSet | None = None,
    shredded: str = "raise",
) -> Any:
    """Read, verify and rebuild the object saved at ``path`` (a checkpoint, ``Members`` open: one
    file or one in an object store, or a reader open: closed here) as rank ``rank`` sees it; under
    ``trust``, only if its signature verifies (SignatureError). ``shredded="meta"``: a tensor
    (without a template) whose bytes are sealed under a shredded scope is a meta tensor of its shape
    and dtype (its data is gone for good); ``"raise"``: ScopeShreddedError.

    Tensors in ``template`` (plain, ``Shard`` or DTensor, found by key) are filled in place with
    the part of the global tensor they cover, whatever the saved sharding; the others load whole.
    Per-rank tensors load rank ``rank``'s own value; ``world``, this job's number of ranks, must
    then be the saved one (None: the caller chose ``rank`` itself)."""
    opened = path if isinstance(path, CheckpointReader) else CheckpointReader(path, trust)
    with collector.paused(), opened as rd:
        if "pickle" in rd.features and not allow_pickle:
            raise UnsupportedObjectError(
                f"{rd.path} contains pickled objects; load it with allow_pickle=True only if you "
                "trust where it came from"
            )
        tree = rank_tree(rd.manifest, rank)
        ids = _tensor_ids(rd, tree)
        _check_rank(rd, rank, world)
        targets = select.template_targets(template, rd.tensors, rd.path, rank)
        rd.locate(_wanted(rd, ids, targets, rank))  # (a reader that uses the locator)
        gone = _shredded(rd, [g for g in ids if g not in targets], shredded)
        ids = [g for g in ids if g not in gone]
        # Tensors without a template load whole, in tree order, each once: those that are one
        # slice of a packed record as views of its buffer, the others into their own targets
        # (all of them where torch.load's f(storage, location) is to place each one's storage).
        # A view has no bytes: its storage loads into memory of its own, which its views share.
        viewed = _views(rd, ids)
        stores = dict.fromkeys(viewed.values())
        whole = (
            []
            if place.torch_style(map_location)
            else [g for g in ids if g not in targets and g not in viewed and g not in stores]
        )
        packs = select.whole_packed(rd.table, rd.tensors, whole)
        in_pack = set(packs.tensor.tolist())
        fresh = {
            gid: select.whole_box(rd.tensors[gid], rank)
            for gid in [*ids, *stores]
            if gid not in targets and gid not in in_pack and gid not in viewed
        }
        boxes = {gid: tg.box for gid, tg in targets.items()} | fresh
        pieces = select.plan_reads(rd.table, rd.tensors, boxes)
        # The index ties each tensor's bytes to records inside its files; the files on disk must
        # be that large before their tensors are allocated (I6).
        files = {r.file for ps in pieces.values() for p in ps for r in p.rows}
        _sized(rd, files, pieces, packs)
        for gid, box in fresh.items():
            targets[gid] = place.fresh_target(rd.tensors[gid], box)
        # As a tensor of its own would be before it is allocated, each dtype is checked.
        place.check_dtypes(packs.dtypes, (rd.tensors[g] for g in ids if g in in_pack))
        bufs = [place.pack_buffer(r.key, r.record_raw_len) for r in packs.rows]
        copies = _read(rd, targets, pieces, verify, (packs.rows, bufs))
        for gid, landing in copies:
            place.copy_block(targets[gid], rd.tensors[gid], landing)
        values: list[Any] = [None] * len(rd.tensors)
        for gid, tg in targets.items():
            values[gid] = place.finish(tg, rd.tensors[gid], map_location) if tg.fresh else tg.result
        _pack_values(rd, packs, bufs, map_location, values)
        for gid, meta in gone.items():
            values[gid] = meta
        _view_values(rd, viewed, targets, values, (map_location, verify))
        try:
            return unflatten(
                tree, values, allow_pickle=allow_pickle, types=TREE_TYPES in rd.features
            )
        except TreeError as e:
            raise rd.corrupt(f"object tree is malformed: {e}", file=MANIFEST) from None


def _sized(
    rd: CheckpointReader,
    files: set[str],
    pieces: dict[int, list[select.Piece]],
    packs: select.Packs,
) -> None:
    """Check the sizes of the files a load reads (once ``select.needing``'s hook made them present);
    then the checkpoint is open and checked: the figures of its load's event (``measure``)."""
    files = files | {r.file for r in packs.rows}
    hook = select.NEEDING.get()
    if hook is not None and rd.one is None:
        hook(rd.path, files)
    rd.check_sizes(files)
    if rd.one is None:
        planned = sum(r.raw_len for ps in pieces.values() for p in ps for r in p.rows)
        planned += sum(r.record_raw_len for r in packs.rows)
        measure.load_opened(rd.path, rd.manifest["uuid"], rd.manifest["step"], planned)


def iter_tensors(
    rd: CheckpointReader, ids: Sequence[int], rank: int = 0, verify: bool = True
) -> Generator[tuple[int, Any], None, None]:
    """Tensors ``ids`` of open checkpoint ``rd``, each whole on the host as a load without a
    template builds it (its saved shards assembled; of a per-rank tensor, rank ``rank``'s row),
    yielded one at a time in the order given, with every record read checked (``verify``).

    The memory held is the tensor being built and one saved shard's chunks (or one packed
    record), never the whole checkpoint: a caller that drops each tensor before taking the next
    holds one at a time. A view (format.md section 3.2) is built on its storage, read whole and
    kept while the views that follow it share it (order them by their storage's bytes, as
    ``read_order`` does). Each data file is opened and checked once; tensors that share a packed
    record, given one after another, read it once (order them by where their bytes lie). The
    ids must exist (one given twice is read twice) and ``rank`` be a saved rank."""
    viewed = _views(rd, ids)
    stores = set(viewed.values())
    wanted = [g for g in dict.fromkeys([*ids, *stores]) if g not in viewed]
    boxes = {gid: select.whole_box(rd.tensors[gid], rank) for gid in wanted}
    pieces = select.plan_reads(rd.table, rd.tensors, boxes)
    rd.check_sizes({r.file for ps in pieces.values() for p in ps for r in p.rows})
    files = _Files(rd, verify)
    held: tuple[int, Any] | None = None  # a storage, while the views that follow share it
    try:
        for gid in ids:
            sid = viewed.get(gid, gid)
            if held is not None and held[0] == sid:
                value = held[1]
            else:
                held = None  # one storage held at a time
                value = files.whole(rd.tensors[sid], boxes[sid], pieces[sid])
                held = (sid, value) if sid in stores else None
            yield gid, value if sid == gid else place.view_of(value, rd.tensors[gid])
            del value  # a caller done with the tensor frees it before the next is allocated
    finally:
        files.close()


def fill(rd: CheckpointReader, targets: Sequence[tuple[int, Target]], verify: bool = True) -> None:
    """Fill each of ``targets`` (tensor id, ``select.Target``: ``fill`` covers ``box`` of that
    saved tensor, in place) from the saved shards it overlaps: only their chunks are read, each
    record checked (``verify``), each file once per round. Several targets of one tensor (a
    rank's part of it in pieces) are filled in rounds, one target of a tensor per round."""
    rounds: list[dict[int, Target]] = []
    for gid, tg in targets:
        free = next((r for r in rounds if gid not in r), None)
        if free is None:
            rounds.append({gid: tg})
        else:
            free[gid] = tg
    for batch in rounds:
        boxes = {gid: tg.box for gid, tg in batch.items()}
        pieces = select.plan_reads(rd.table, rd.tensors, boxes)
        rd.check_sizes({r.file for ps in pieces.values() for p in ps for r in p.rows})
        for gid, landing in _read(rd, batch, pieces, verify):
            place.copy_block(batch[gid], rd.tensors[gid], landing)


class _Files:
    """The data files of one ``iter_tensors``, each opened once, and the last packed record
    read (the tensors of a pack are read one by one, the record once for them all)."""

    def __init__(self, rd: CheckpointReader, verify: bool) -> None:
        self.rd, self.verify = rd, verify
        self.fds: dict[str, int] = {}
        self.record: tuple[tuple[str, int], memoryview] | None = None

    def fd(self, name: str) -> int:
        if name not in self.fds:
            self.fds[name] = self.rd.open_file(name)
        return self.fds[name]

    def whole(self, entry: dict, box: select.Box, pieces: list[select.Piece]) -> Any:
        """A tensor read whole (``box``: all of it, or a per-rank tensor's row) on the host."""
        target = place.fresh_target(entry, box)
        for piece in pieces:
            self.read_piece(target, entry, piece)
        return place.finish(target, entry, "cpu")

    def read_piece(self, target: Target, entry: dict, piece: select.Piece) -> None:
        """Read one saved shard's chunks into ``target`` (through a buffer of that shard's
        chunks unless they land in place)."""
        landing, copy = place.land(entry["key"], piece, target)
        by_file: dict[str, list[Row]] = {}
        for r in sorted(piece.rows, key=lambda r: (r.offset, r.record_byte_offset)):
            by_file.setdefault(r.file, []).append(r)
        for name, rows in sorted(by_file.items()):
            fd = self.fd(name)
            whole = [r for r in rows if not r.packed]
            if whole:
                offsets = [landing.dest_offset(r) for r in whole]
                read_into(self.rd, fd, whole, landing.buf, offsets, self.verify)
            for r in rows:
                if r.packed:
                    at, off = r.record_byte_offset, landing.dest_offset(r)
                    landing.buf[off : off + r.raw_len] = self.packed(fd, r)[at : at + r.raw_len]
        if copy:
            place.copy_block(target, entry, landing)

    def packed(self, fd: int, r: Row) -> memoryview:
        """The raw bytes of the packed record that row ``r`` is a slice of, checked whole."""
        where = (r.file, r.offset)
        if self.record is None or self.record[0] != where:
            self.record = None  # one record held at a time
            self.record = (where, memoryview(read_record(self.rd, fd, r, self.verify)))
        return self.record[1]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _pack_values(
    rd: CheckpointReader,
    packs: select.Packs,
    bufs: list[torch.Tensor],
    map_location: MapLocation,
    values: list[Any],
) -> None:
    """Put the objects of the packed tensors, views of their records' buffers, in ``values``."""
    for k, (r, buf) in enumerate(zip(packs.rows, bufs, strict=True)):
        m = packs.members(k)
        gids = packs.tensor[m].tolist()
        entries = [rd.tensors[g] for g in gids]
        objs = place.pack_values(
            buf, r.elem_size, entries, packs.at[m], packs.length[m], map_location
        )
        for g, obj in zip(gids, objs, strict=True):
            values[g] = obj


def _wanted(
    rd: CheckpointReader, ids: Sequence[int], targets: dict[int, Target], rank: int
) -> dict[int, select.Box]:
    """The box of each tensor of ``ids`` (and of each view's storage) that a load reads; for a
    reader that uses the locator, which then reads the rows of just those (none otherwise)."""
    if not rd.located:
        return {}
    want = [*ids, *_views(rd, ids).values()]
    return {
        g: targets[g].box if g in targets else select.whole_box(rd.tensors[g], rank) for g in want
    }


def _views(rd: CheckpointReader, ids: Sequence[int]) -> dict[int, int]:
    """The views among tensors ``ids`` (format.md section 3.2), each with its storage's id."""
    if TENSOR_VIEWS not in rd.features:
        return {}
    return {g: sid for g in ids if (sid := storage_of(rd.tensors[g])) is not None}


def _view_values(
    rd: CheckpointReader,
    viewed: dict[int, int],
    targets: dict[int, Target],
    values: list[Any],
    how: tuple[MapLocation, bool],
) -> None:
    """Put each view's object in ``values``: a view of its storage's object (which it shares);
    a view that a template names fills it. A storage that a template fills is never aliased:
    its views get a copy of their own, read whole once more."""
    again = sorted({sid for sid in viewed.values() if sid in targets and not targets[sid].fresh})
    own = _fresh_values(rd, again, *how) if again else {}
    for gid, sid in viewed.items():
        obj = place.view_of(own[sid] if sid in own else values[sid], rd.tensors[gid])
        tg = targets.get(gid)
        if tg is not None:
            place.fill_from(tg, obj)
            obj = tg.result
        values[gid] = obj


def _fresh_values(
    rd: CheckpointReader, ids: Sequence[int], map_location: MapLocation, verify: bool
) -> dict[int, Any]:
    """Tensors ``ids`` (none per-rank) loaded whole into targets of their own, as ``finish``
    makes them."""
    boxes = {gid: select.whole_box(rd.tensors[gid], 0) for gid in ids}
    pieces = select.plan_reads(rd.table, rd.tensors, boxes)
    rd.check_sizes({r.file for ps in pieces.values() for p in ps for r in p.rows})
    targets = {gid: place.fresh_target(rd.tensors[gid], boxes[gid]) for gid in ids}
    for gid, landing in _read(rd, targets, pieces, verify):
        place.copy_block(targets[gid], rd.tensors[gid], landing)
    return {gid: place.finish(tg, rd.tensors[gid], map_location) for gid, tg in targets.items()}


def _shredded(rd: CheckpointReader, ids: list[int], shredded: str) -> dict[int, Any]:
    """Under ``shredded="meta"``, the tensors of ``ids`` whose bytes (or, of a view, its
    storage's) are sealed under a shredded scope, each as a meta tensor of its shape and dtype
    (of a per-rank tensor, one rank's row); none under ``"raise"``."""
    if shredded not in ("raise", "meta"):
        raise ValueError(f"shredded must be 'raise' or 'meta', not {shredded!r}")
    if shredded == "raise":
        return {}
    gone_ids = []
    for kid in rd.key_scopes:
        try:
            rd.scope(kid)
        except ScopeShreddedError:
            gone_ids.append(kid)
    if not gone_ids:
        return {}
    hit = pc.is_in(rd.table.column("key_id"), value_set=pa.array(gone_ids, pa.string()))
    tids = set(pc.unique(rd.table.column("tensor").filter(hit)).to_pylist())
    out = {}
    for g in ids:
        entry = rd.tensors[g]
        if storage_of(entry) in tids or g in tids:
            shape = entry["shape"][1:] if entry.get("per_rank") else entry["shape"]
            out[g] = torch.empty(shape, dtype=TORCH_BY_NAME[entry["dtype"]], device="meta")
    return out


def _tensor_ids(rd: CheckpointReader, tree: Any) -> list[int]:
    """The tensor ids the object tree references, each checked to exist."""
    ids = tensor_ids(tree)
    if ids and not 0 <= min(ids) <= max(ids) < len(rd.tensors):
        gid = next(g for g in ids if not 0 <= g < len(rd.tensors))
        raise rd.corrupt(
            f"object tree references tensor {gid}, which does not exist", file=MANIFEST
        )
    return ids


def _read(
    rd: CheckpointReader,
    targets: dict[int, Target],
    pieces: dict[int, list[select.Piece]],
    verify: bool,
    records: tuple[Sequence[Row], Sequence[torch.Tensor]] = ((), ()),
) -> list[tuple[int, Landing]]:
    """Read every piece's chunks where they land, and each packed record of ``records`` (a row
    of each, and its buffer) whole into its buffer: each file once, its records in offset
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
    whole: dict[str, tuple[list[Row], list[torch.Tensor]]] = {}
    for r, buf in zip(*records, strict=True):
        rows, bufs = whole.setdefault(r.file, ([], []))
        rows.append(r)
        bufs.append(buf)
    for name in sorted(by_file.keys() | whole.keys()):
        fd = rd.open_file(name)
        try:
            _read_file(rd, fd, sorted(by_file.get(name, []), key=lambda rl: rl[0].offset), verify)
            if name in whole:
                read_whole_records(rd, fd, *whole[name], verify)
        finally:
            os.close(fd)
    return copies


def _read_file(
    rd: CheckpointReader, fd: int, work: list[tuple[Row, Landing]], verify: bool
) -> None:
    """Read the chunks of one open data file (``work``: in offset order) where they land."""
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


def _check_rank(rd: CheckpointReader, rank: int, world: int | None) -> None:
    """A checkpoint with per-rank tensors loads as one of its saved ranks, and in a job only at
    the saved world size: another rank's value is never handed over unasked."""
    if PER_RANK_TENSORS not in rd.features:
        return
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
