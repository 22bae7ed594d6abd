"""One rank's side of an incremental save (docs/format.md section 4.3): its base's data files
linked into the staging directory, and the chunks of this save whose bytes a record of theirs
already holds.

A rank links each of its base's data files of its rank (``link(2)``: the kernel's link count is
the reference count, so no other checkpoint's delete, prune, overwrite or gc can take the bytes
away), then reads only what it links: header, trailer and footer, checked as a reader checks
them. A file that cannot be linked or does not check out is dropped, and its chunks are written
as in a full save. A chunk is reused when a footer row that is alone in its record describes the
same piece of the same tensor and its hash (or, under ``digests``, its SHA-256) equals the hash
of the chunk's bytes. Links that no row uses are removed before the report.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import xxhash

from . import backend as _backend
from .encode import parallel_map
from .filecheck import check_linked
from .format.datafile import (
    FormatError,
)
from .format.index import Row
from .format.layout import linked_file
from .fsutil import UnsafeFileError, open_regular
from .seal import Scope
from .tree import TensorRef

LinkPlan = dict[str, Any]
"""What rank 0 gives every rank of an incremental save (``bases.resolve``): the base's
``name``, ``uuid``, ``depth`` and ``path``, and per rank (a decimal string) the base's data
files of that rank as ``[source name, name in this checkpoint, holder's name]``."""


@dataclass(frozen=True)
class Linked:
    """A base data file linked into the staging directory: its name there, rank, size, holder
    (the checkpoint that wrote it), and the records its footer describes by offset: the one
    row of each record that holds one, and each record's sequence number."""

    name: str
    rank: int
    size: int
    holder: str
    rows: dict[int, Row]


def _open_dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


class Reuse:
    """The base's data files of one rank, linked into ``staging``, and the lookup of their
    reusable records by (key, shard offsets): ``match`` decides per chunk."""

    def __init__(self, staging: str, rank: int, plan: LinkPlan, digests: bool) -> None:
        self.rank, self.digests = rank, digests
        self.staging = staging
        self.files: dict[str, Linked] = {}
        self.used: dict[str, int] = {}  # linked file -> rows of this save in it
        self._by_piece: dict[tuple[str, tuple[int, ...]], dict[int, tuple[Linked, Row]]] = {}
        entries = plan["files"].get(str(rank), [])
        if not entries:
            return
        try:
            src_fd = _open_dir(plan["path"])
        except OSError:
            return  # the base went away: a full save
        dst_fd = _open_dir(staging)
        try:
            for source, name, holder in entries:
                linked = self._link(src_fd, dst_fd, source, name, holder)
                if linked is not None:
                    self.files[name] = linked
        finally:
            os.close(src_fd)
            os.close(dst_fd)
        for linked in self.files.values():
            for row in linked.rows.values():
                piece = (row.key, row.shard_offsets)
                self._by_piece.setdefault(piece, {})[row.chunk] = (linked, row)

    def _link(self, src_fd: int, dst_fd: int, source: str, name: str, holder: str) -> Linked | None:
        """Link ``source`` of the base as ``name`` and check it; None (and no link) if either
        fails: those chunks are then written."""
        linked = linked_file(name)
        if linked is None or linked[0] != self.rank:
            return None  # a plan that names no linked file of this rank: nothing to link
        holder_uuid = linked[1]
        try:
            os.link(source, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.EEXIST:
                raise  # the staging directory is this save's own: never expected
            return None
        try:
            fd, st = open_regular(name, dir_fd=dst_fd)
            try:
                footer = check_linked(fd, st.st_size, self.rank, holder_uuid)
            finally:
                os.close(fd)
        except (OSError, UnsafeFileError, FormatError):
            os.unlink(name, dir_fd=dst_fd)
            return None
        alone = {o: r for o, r in footer.alone.items() if r.rank == self.rank}
        if self.digests:
            alone = {o: r for o, r in alone.items() if r.digest is not None}
        return Linked(name, self.rank, st.st_size, holder, alone)

    def candidates(self, ref: TensorRef) -> dict[int, tuple[Linked, Row]] | None:
        """The records that may hold chunks of this rank's piece of ``ref``, by chunk number."""
        if not self._by_piece:
            return None
        found = self._by_piece.get((ref.key, tuple(ref.offsets)))
        if not found:
            return None
        row = next(iter(found.values()))[1]
        if (row.dtype, row.global_shape, row.shard_lengths) != (
            ref.dtype,
            tuple(ref.global_shape),
            tuple(ref.shape),
        ):
            return None
        return found

    def match(
        self,
        tid: int,
        ref: TensorRef,
        view: memoryview,
        first: int,
        step: int,
        threads: int,
        scope: Scope | None = None,
    ) -> list[Row | None]:
        """For each chunk of ``view`` (chunk numbers from ``first``, ``step`` bytes each but the
        last), the row that stores it from a linked file, or None: it is written. A chunk of a
        sealed tensor (``scope``) matches only a record sealed under the same data key, by its
        fingerprint; any other chunk only a record in the clear (references never cross
        scopes)."""
        n = -(-len(view) // step)
        found = self.candidates(ref)
        if found is None:
            return [None] * n
        todo = []
        for i in range(n):
            hit = found.get(first + i)
            a, b = i * step, min(len(view), (i + 1) * step)
            if (
                hit
                and hit[1].shard_byte_offset == (first + i) * step
                and hit[1].raw_len == b - a
                and hit[1].key_id == (scope.key_id if scope is not None else None)
            ):
                todo.append((i, hit, view[a:b]))
        sums = parallel_map(lambda t: self._sum(t[2], scope), todo, threads)
        out: list[Row | None] = [None] * n
        for (i, (linked, row), _), got in zip(todo, sums, strict=True):
            if got != (row.digest if self.digests and scope is None else row.hash):
                continue
            out[i] = replace(
                row,
                tensor=tid,
                file=linked.name,
                base=linked.holder,
                key_id=row.key_id,
                record_byte_offset=0,
                record_raw_len=row.raw_len,
                digest=row.digest if self.digests else None,
            )
            self.used[linked.name] = self.used.get(linked.name, 0) + 1
        return out

    def _sum(self, data: memoryview, scope: Scope | None = None) -> bytes:
        """The hash a reused record must have for these bytes (both release the GIL): under a
        scope, their fingerprint (a sealed record's digest covers its ciphertext)."""
        if scope is not None:
            return scope.fingerprint(xxhash.xxh3_128_digest(data))
        if self.digests:
            return hashlib.sha256(data).digest()
        if _backend.active():
            return bytes(_backend.native().hash128(data))
        return xxhash.xxh3_128_digest(data)

    def finish(self) -> list[dict]:
        """Remove the links no row uses; the file entries of the others (format.md 4.3)."""
        entries = []
        for name, linked in sorted(self.files.items()):
            if name in self.used:
                used = self.used[name]
                entries.append(
                    {"name": name, "rank": linked.rank, "size": linked.size, "chunks": used}
                )
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.staging, name))
        return entries


def spans(matched: Sequence[Row | None], length: int, step: int) -> list[tuple[int, int, int]]:
    """Runs of chunks to write: (first chunk index, start byte, end byte) of each maximal run of
    unmatched chunks in ``matched``, over ``length`` bytes of ``step``-byte chunks."""
    out: list[tuple[int, int, int]] = []
    i, n = 0, len(matched)
    while i < n:
        if matched[i] is not None:
            i += 1
            continue
        j = i
        while j < n and matched[j] is None:
            j += 1
        out.append((i, i * step, min(length, j * step)))
        i = j
    return out
