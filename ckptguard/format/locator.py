"""The locator (docs/format.md section 4.5, feature ``locator``): the grid of each tensor's
shards, with the data file that holds each cell, and the hash of every data file's footer.

A reader that wants some boxes of some tensors finds the cells they overlap, reads the footers
of the files holding those cells (checked against the hashes here, so bound to the manifest) and
takes their rows, instead of reading the whole index: on a job of 10,000 ranks each rank parses
its few thousand rows, not ten million. A writer derives the member from the index it checked
(``member``); a reader of the whole index checks that it agrees (``check_against``).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xxhash

from .datafile import FormatError
from .layout import is_uuid
from .validate import Shards

LOCATOR = "locator"
"""Feature: the manifest has a ``locator`` member (format.md section 4.5)."""

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

Grid = tuple[list[np.ndarray], np.ndarray]
"""A tensor's cut points per dimension and the position in ``files`` of each cell's file."""


def grids(shards: Shards | None, tensors: list[dict]) -> list[Grid | None]:
    """Each tensor's grid (section 4.5), None where it has none: no rows (no elements, a view),
    shards that are not the cells of one grid, or a shard whose rows lie in several files."""
    out: list[Grid | None] = [None] * len(tensors)
    if shards is None:
        return out
    count = np.diff(shards.bounds)
    fit = (count > 0) & ~shards.mixed
    whole = fit & (shards.ways == 0) & (count == 1)
    one = fit & (shards.ways == 1) & ~shards.irregular
    file_of = shards.file_code[shards.firsts]  # each shard's file
    for t in np.flatnonzero(whole).tolist():
        shape = tensors[t]["shape"]
        cuts = [np.array([0, n], dtype=np.int64) for n in shape]
        out[t] = (cuts, file_of[shards.bounds[t] : shards.bounds[t] + 1])
    sel = np.flatnonzero(one[shards.tid])  # the shards of those tensors, by tensor then start
    if len(sel):
        starts = shards.cut_at[sel]
        t_sel = shards.tid[sel]
        # The haystack's own type: numpy would otherwise widen all of it on every search.
        edges = np.searchsorted(t_sel, np.arange(len(tensors) + 1, dtype=t_sel.dtype)).tolist()
        for t in np.flatnonzero(one).tolist():
            lo, hi = edges[t], edges[t + 1]
            shape, d = tensors[t]["shape"], int(shards.along[t])
            cuts = [np.array([0, n], dtype=np.int64) for n in shape]
            cuts[d] = np.append(starts[lo:hi], shape[d]).astype(np.int64)
            out[t] = (cuts, file_of[shards.bounds[t] : shards.bounds[t + 1]])
    for t in np.flatnonzero(fit & ~whole & ~one).tolist():
        out[t] = _general(shards, t, tensors[t]["shape"], file_of)
    return out


def _general(shards: Shards, t: int, shape: list[int], file_of: np.ndarray) -> Grid | None:
    """The grid of tensor ``t`` whose shards cut several dimensions, if they are its cells:
    by start (C order) the shards of a grid are its cells in row-major order."""
    at = slice(int(shards.bounds[t]), int(shards.bounds[t + 1]))
    offs, lens = shards.boxes.box(t, shards.firsts[at])
    cuts = [np.append(np.unique(offs[:, d]), n).astype(np.int64) for d, n in enumerate(shape)]
    dims = tuple(len(c) - 1 for c in cuts)
    if any(c[0] != 0 for c in cuts) or math.prod(dims) != len(offs):
        return None
    idx = np.unravel_index(np.arange(len(offs)), dims)
    for d, c in enumerate(cuts):
        if (offs[:, d] != c[idx[d]]).any() or (lens[:, d] != c[idx[d] + 1] - c[idx[d]]).any():
            return None
    return cuts, file_of[at]


def _key(cuts: Sequence[Any], files: Any) -> bytes:
    """A grid's identity: its cut points and files as one int64 byte string."""
    head = [len(cuts), *map(len, cuts), len(files)]
    parts = [np.asarray(head, dtype=np.int64)]
    parts += [np.asarray(c, dtype=np.int64) for c in cuts]
    parts.append(np.asarray(files, dtype=np.int64))
    return np.concatenate(parts).tobytes()


def member(
    shards: Shards | None, tensors: list[dict], footers: list[str], sha256: list[str] | None
) -> dict:
    """The manifest's ``locator`` member of a checkpoint whose index the checks that returned
    ``shards`` passed; ``footers`` (and ``sha256`` under ``digests``): each data file's footer
    hash, in the order of ``files``. Equal grids are listed once."""
    found: dict[bytes, int] = {}
    listed: list[dict] = []
    refs: list[int | None] = []
    for g in grids(shards, tensors):
        if g is None:
            refs.append(None)
            continue
        k = _key(*g)
        i = found.get(k)
        if i is None:
            i = found[k] = len(listed)
            listed.append({"cuts": [c.tolist() for c in g[0]], "files": g[1].tolist()})
        refs.append(i)
    out: dict[str, Any] = {"footers": footers, "grids": listed, "tensors": refs}
    if sha256 is not None:
        out["footer_sha256"] = sha256
    return out


def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(type(x) is int for x in v)


def check_member(loc: Any, files: int, tensors: list[dict], digests: bool) -> None:
    """Check a manifest's ``locator`` member on its own (section 4.5): its members and their
    types, one footer hash per data file, grids of cut points from 0 up and of files listed,
    one entry per tensor naming a grid of its shape, and no grid that no tensor names.
    Raises FormatError."""
    want = {"footers", "grids", "tensors", *(["footer_sha256"] if digests else [])}
    if not isinstance(loc, dict) or set(loc) != want:
        raise FormatError(f"manifest.locator must have exactly the members {sorted(want)}")
    foot = loc["footers"]
    if not isinstance(foot, list) or len(foot) != files or not all(map(is_uuid, foot)):
        raise FormatError("manifest.locator.footers: not one xxh3-128 (32 hex) per data file")
    if digests:
        sha = loc["footer_sha256"]
        if not isinstance(sha, list) or len(sha) != files:
            raise FormatError("manifest.locator.footer_sha256: not one SHA-256 per data file")
        if not all(isinstance(h, str) and _SHA256_HEX.fullmatch(h) for h in sha):
            raise FormatError("manifest.locator.footer_sha256: not 64 lowercase hex digits")
    listed = loc["grids"]
    if not isinstance(listed, list):
        raise FormatError("manifest.locator.grids is not a list")
    for i, g in enumerate(listed):
        _check_grid(g, files, f"manifest.locator.grids[{i}]")
    refs = loc["tensors"]
    if not isinstance(refs, list) or len(refs) != len(tensors):
        raise FormatError("manifest.locator.tensors: not one entry per tensor")
    used = np.zeros(len(listed), dtype=bool)
    for t, (ref, entry) in enumerate(zip(refs, tensors, strict=True)):
        if ref is None:
            continue
        if type(ref) is not int or not 0 <= ref < len(listed):
            raise FormatError(f"manifest.locator.tensors[{t}] is not null or a grid's position")
        cuts, shape = listed[ref]["cuts"], entry["shape"]
        if (
            "view" in entry
            or len(cuts) != len(shape)
            or any(c[-1] != n for c, n in zip(cuts, shape, strict=True))
        ):
            raise FormatError(f"manifest.locator.tensors[{t}]: a grid of another shape")
        used[ref] = True
    if not used.all():
        raise FormatError("manifest.locator.grids: a grid that no tensor names")


def _check_grid(g: Any, files: int, where: str) -> None:
    if not isinstance(g, dict) or set(g) != {"cuts", "files"}:
        raise FormatError(f"{where} must have exactly the members ['cuts', 'files']")
    cuts, owners = g["cuts"], g["files"]
    if not isinstance(cuts, list) or not all(_ints(c) and len(c) >= 2 for c in cuts):
        raise FormatError(f"{where}.cuts: not lists of at least two integers")
    cells = 1
    for c in cuts:
        if c[0] != 0 or any(b <= a for a, b in itertools.pairwise(c)):
            raise FormatError(f"{where}.cuts: a list that does not rise strictly from 0")
        cells *= len(c) - 1
    if not _ints(owners) or len(owners) != cells:
        raise FormatError(f"{where}.files: not one integer per cell")
    if owners and (min(owners) < 0 or max(owners) >= files):
        raise FormatError(f"{where}.files: a position outside manifest.files")


def check_against(loc: dict, shards: Shards | None, tensors: list[dict]) -> None:
    """That the ``locator`` member (checked by ``check_member``) agrees with the index whose
    checks returned ``shards``: each tensor names the grid its shards form, or none exactly
    when they form none. Raises FormatError naming the tensor."""
    keys: dict[int, bytes] = {}
    for t, (g, ref) in enumerate(zip(grids(shards, tensors), loc["tensors"], strict=True)):
        if g is None and ref is None:
            continue
        key = tensors[t]["key"]
        if g is None or ref is None:
            raise FormatError(
                f"manifest.locator: tensor {key!r} has a grid exactly if its shards form one"
            )
        if ref not in keys:
            listed = loc["grids"][ref]
            keys[ref] = _key(listed["cuts"], listed["files"])
        if keys[ref] != _key(*g):
            raise FormatError(
                f"manifest.locator: the grid of tensor {key!r} disagrees with the index"
            )


def cells(grid: dict, offsets: Sequence[int], lengths: Sequence[int]) -> list[int]:
    """The positions (row-major) of the cells of ``grid`` that the box at ``offsets`` with
    ``lengths`` overlaps (an empty box overlaps none)."""
    return Cells({"grids": [grid]}).overlapped(0, offsets, lengths)


class Cells:
    """The grids of a locator member, each turned into arrays once, for the lookups of a reader
    that uses the locator."""

    def __init__(self, loc: dict) -> None:
        self.loc = loc
        self._cuts: dict[int, list[np.ndarray]] = {}

    def cuts(self, ref: int) -> list[np.ndarray]:
        got = self._cuts.get(ref)
        if got is None:
            got = self._cuts[ref] = [np.asarray(c, dtype=np.int64) for c in self.grid(ref)["cuts"]]
        return got

    def grid(self, ref: int) -> dict:
        return self.loc["grids"][ref]

    def overlapped(self, ref: int, offsets: Sequence[int], lengths: Sequence[int]) -> list[int]:
        """The cells of grid ``ref`` that the box overlaps, in row-major order."""
        cuts = self.cuts(ref)
        ranges = []
        for c, o, n in zip(cuts, offsets, lengths, strict=True):
            if n <= 0:
                return []
            lo = int(np.searchsorted(c, o, side="right")) - 1
            hi = int(np.searchsorted(c, o + n, side="left"))
            ranges.append(np.arange(max(lo, 0), min(hi, len(c) - 1), dtype=np.int64))
        if not ranges:  # a 0-d tensor: one cell
            return [0]
        idx = np.meshgrid(*ranges, indexing="ij")
        dims = [len(c) - 1 for c in cuts]
        return np.ravel_multi_index([i.ravel() for i in idx], dims).tolist()

    def box(self, ref: int, pos: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Cell ``pos`` of grid ``ref``: its offsets and lengths."""
        cuts = self.cuts(ref)
        idx = np.unravel_index(pos, [len(c) - 1 for c in cuts]) if cuts else ()
        offs = tuple(int(c[i]) for c, i in zip(cuts, idx, strict=True))
        ends = tuple(int(c[i + 1]) for c, i in zip(cuts, idx, strict=True))
        return offs, tuple(e - o for o, e in zip(offs, ends, strict=True))

    def cell_of(self, ref: int, offsets: Sequence[int], lengths: Sequence[int]) -> int | None:
        """The cell of grid ``ref`` that is exactly this box, or None."""
        at = self.overlapped(ref, offsets, lengths)
        if len(at) != 1 or self.box(ref, at[0]) != (tuple(offsets), tuple(lengths)):
            return None
        return at[0]


def locatable(doc: dict) -> bool:
    """Whether the manifest ``doc`` has a locator and every tensor with rows has a grid there:
    a reader can then take every row it needs from the footers (section 4.5)."""
    if LOCATOR not in doc["features"]:
        return False
    refs = doc["locator"]["tensors"]
    return all(
        ref is not None or "view" in t or 0 in t["shape"]
        for t, ref in zip(doc["tensors"], refs, strict=True)
    )


def wanted(
    cells_: Cells, tensors: list[dict], boxes: Mapping[int, tuple[Sequence[int], Sequence[int]]]
) -> tuple[set[int], list[tuple[int, tuple, tuple]]]:
    """The files (positions in ``files``) holding the cells the ``boxes`` (tensor id: offsets,
    lengths) overlap, and each such cell as (tensor id, offsets, lengths). Tensors without a
    grid have no rows (``locatable``)."""
    files: set[int] = set()
    out = []
    refs = cells_.loc["tensors"]
    for g, (offs, lens) in boxes.items():
        ref = refs[g]
        if ref is None:
            continue
        owners = cells_.grid(ref)["files"]
        for pos in cells_.overlapped(ref, offs, lens):
            files.add(owners[pos])
            out.append((g, *cells_.box(ref, pos)))
    return files, out


def check_located(
    cells_: Cells, position: int, tid: Sequence[int], offs: Sequence, lens: Sequence
) -> None:
    """That every row of data file ``position`` (its tensors, shard offsets and lengths) is
    of a cell that the locator puts in that file. Raises FormatError."""
    refs = cells_.loc["tensors"]
    seen: set[tuple] = set()
    for t, o, n in zip(tid, offs, lens, strict=True):
        if (t, o, n) in seen:
            continue
        seen.add((t, o, n))
        ref = refs[t] if 0 <= t < len(refs) else None
        pos = None if ref is None else cells_.cell_of(ref, o, n)
        if ref is None or pos is None or cells_.grid(ref)["files"][pos] != position:
            raise FormatError(
                f"a shard of tensor {t} at {list(o)} is not a cell the locator puts in this file"
            )


def footer_digests(footer: bytes, digests: bool) -> dict[str, str]:
    """The hashes of a data file's footer bytes that the locator lists: xxh3-128, and under
    ``digests`` SHA-256 (the one a signature can rest on)."""
    out = {"xxh3_128": xxhash.xxh3_128_hexdigest(footer)}
    if digests:
        out["sha256"] = hashlib.sha256(footer).hexdigest()
    return out


def check_footer(loc: dict, position: int, footer: bytes) -> None:
    """That data file ``position`` of ``files`` has the footer the locator hashed. Raises
    FormatError."""
    if xxhash.xxh3_128_hexdigest(footer) != loc["footers"][position]:
        raise FormatError("footer does not match its hash in the manifest's locator")
    sha = loc.get("footer_sha256")
    if sha is not None and hashlib.sha256(footer).hexdigest() != sha[position]:
        raise FormatError("footer does not match its SHA-256 in the manifest's locator")


def for_save(
    shards: Shards | None,
    tensors: list[dict],
    files: list[dict],
    footers: list[dict | None],
    digests: bool,
) -> dict | None:
    """The ``locator`` member of a save whose ranks wrote ``files`` (in order; the first
    ``len(footers)`` are the ranks' own, with their ``footer_digests``), or None where it
    cannot have one: a linked data file (its footer holds another checkpoint's rows), or a
    file whose footer hashes are unknown."""
    if len(footers) != len(files) or any(f is None for f in footers):
        return None
    xxh = [f["xxh3_128"] for f in footers if f is not None]
    sha = [f.get("sha256", "") for f in footers if f is not None] if digests else None
    return member(shards, tensors, xxh, sha)
