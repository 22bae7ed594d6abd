"""The read side of incremental checkpoints (docs/format.md section 4.3, feature ``incremental``):
linked data files, rows with a ``base``, the manifest's ``incremental`` member.

The checkpoints are made by hand: a full save ``a`` and a full save ``b`` of a state whose
``frozen*`` tensors equal ``a``'s, then ``b`` rewritten to use ``a``'s records of them through a
hard link of ``a``'s data file (what an incremental save writes), or hostile variants of that.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import independent_reader as ir
import pytest
import torch
import xxhash

import ckptguard
from ckptguard.errors import CorruptCheckpointError
from ckptguard.format import datafile, index, manifest
from ckptguard.format.layout import INDEX, MANIFEST, linked_file, linked_name, looks_like_checkpoint

OWN = "rank-00000.ckg"


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(11)
    frozen = torch.randn(300, 200, generator=g)  # 240 KB each: records of their own, unpacked
    state = {
        "frozen_a": frozen,
        "frozen_b": frozen * 2,
        "train": torch.randn(300, 200, generator=torch.Generator().manual_seed(step)),
        "step": step,
    }
    if step == 1:  # a record of the base that the incremental one does not use
        state["gone"] = torch.randn(600, 200, generator=g)
    return state


def _rows(ckpt: Path) -> list[index.Row]:
    return index.rows_from_table(index.read_table((ckpt / INDEX).read_bytes()))


def _body(ckpt: Path) -> dict:
    return manifest.decode((ckpt / MANIFEST).read_bytes())


def _write_manifest(ckpt: Path, body: dict) -> None:
    """Write ``body`` framed with its checksum, unchecked (hostile bodies too)."""
    (ckpt / MANIFEST).write_bytes(manifest.encode(body))


def _relayout(path: Path, rank: int, uuid: str, rows: list[index.Row]) -> int:
    """Rewrite data file ``path`` to hold only the records of ``rows`` (single-row records),
    back to back from the header with new sequence numbers, and their footer; the rows get their
    new offsets. Returns the new file size."""
    data = path.read_bytes()
    out = bytearray(data[: datafile.HEADER_SIZE])
    for seq, r in enumerate(sorted(rows, key=lambda r: r.offset)):
        rec = bytearray(data[r.offset : r.extent])
        rec[40:44] = struct.pack("<I", seq)
        rec[56:64] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(rec[:56])))
        r.offset = len(out)
        out += rec
    table = index.to_table(sorted(rows, key=lambda r: r.offset))
    if not rows:
        table = table.select(index.names_of(False, False))
    footer = index.footer(rank, uuid, table, False)
    out += footer + datafile.pack_trailer(len(out), footer)
    path.write_bytes(bytes(out))
    return len(out)


def _publish(
    ckpt: Path,
    body: dict,
    rows: list[index.Row],
    files: list[dict],
    member: dict | None = {"base": "a", "depth": 1},  # noqa: B006 (read only)
    features: set[str] | None = None,
) -> None:
    """Write ``rows`` as ``ckpt``'s index and a manifest of ``files`` that matches them."""
    data = index.write_table(index.to_table(rows))
    (ckpt / INDEX).write_bytes(data)
    feats = set(body["features"]) | {"incremental"} if features is None else features
    feats = feats - {"locator"}  # never with linked files (format.md 4.5)
    body = {k: v for k, v in body.items() if k not in ("incremental", "locator")}
    body["features"] = sorted(feats)
    if member is not None:
        body["incremental"] = member
    body["files"] = files
    body["index"] = index.member(data, "sha256" in body["index"])
    body["totals"] = manifest.totals(index.read_table(data), len(body["tensors"]), len(files))
    _write_manifest(ckpt, body)


def _incremental(store: Path, digests: bool = False, name: str = "b") -> Path:
    """``a`` and an incremental ``name`` whose frozen tensors are rows of ``a``'s data file,
    linked into it."""
    kw = {"digests": digests, "compress": "none"}
    if not (store / "a").exists():
        ckptguard.save(_state(1), str(store / "a"), **kw)
    b = store / name
    ckptguard.save(_state(2), str(b), **kw)
    a_body, body = _body(store / "a"), _body(b)
    link = linked_name(0, a_body["uuid"])
    os.link(store / "a" / OWN, b / link)
    theirs = {(r.key, r.chunk): r for r in _rows(store / "a")}
    own, linked = [], []
    for r in _rows(b):
        held = theirs.get((r.key, r.chunk))
        if r.key.startswith("frozen") and held is not None and held.hash == r.hash:
            r.file, r.offset, r.stored_len, r.codec, r.base = (
                link,
                held.offset,
                held.stored_len,
                held.codec,
                "a",
            )
            r.digest = held.digest
            linked.append(r)
        else:
            own.append(r)
    assert len(linked) >= 2 and own
    size = _relayout(b / OWN, 0, body["uuid"], own)
    files = [
        {"name": OWN, "rank": 0, "size": size, "chunks": len(own)},
        {"name": link, "rank": 0, "size": (b / link).stat().st_size, "chunks": len(linked)},
    ]
    _publish(b, body, own + linked, files)
    return b


def _check_loads(b: Path) -> None:
    back = ckptguard.load(str(b))
    want = _state(2)
    for k in ("frozen_a", "frozen_b", "train"):
        assert torch.equal(back[k], want[k]), k
    assert back["step"] == 2
    report = ckptguard.verify(str(b))
    assert report.ok, report.problems
    ic = ir.read_checkpoint(str(b))
    assert bytes(ic.tensors["frozen_b"].data) == want["frozen_b"].numpy().tobytes()
    assert bytes(ic.tensors["train"].data) == want["train"].numpy().tobytes()


@pytest.mark.parametrize("digests", [False, True])
def test_an_incremental_checkpoint_loads_verifies_and_reads_independently(
    tmp_path: Path, digests: bool
) -> None:
    b = _incremental(tmp_path, digests)
    body = _body(b)
    assert "incremental" in body["features"] and body["incremental"] == {"base": "a", "depth": 1}
    info = ckptguard.describe(str(b)).info
    assert (info.base, info.depth) == ("a", 1)
    _check_loads(b)


def test_deleting_the_base_leaves_the_incremental_checkpoint_whole(tmp_path: Path) -> None:
    b = _incremental(tmp_path)
    ckptguard.Store(str(tmp_path)).delete("a")
    assert not (tmp_path / "a").exists()
    _check_loads(b)


def test_seq_of_a_linked_row_before_its_file_is_opened(tmp_path: Path) -> None:
    """The sequence number of a record in a linked file is its place in that file's footer, not
    among this checkpoint's rows: asked first, it is read from the footer."""
    b = _incremental(tmp_path)
    from ckptguard.open import CheckpointReader

    a_rows = {
        r.offset: i for i, r in enumerate(sorted(_rows(tmp_path / "a"), key=lambda r: r.offset))
    }
    with CheckpointReader(str(b)) as rd:
        for r in rd.rows:
            if r.base is not None:
                assert rd.seq(r) == a_rows[r.offset]


def test_names() -> None:
    u = "0123456789abcdef" * 2
    assert linked_name(3, u) == f"rank-00003.{u}.ckg"
    assert linked_file(linked_name(3, u)) == (3, u)
    assert linked_file("rank-00003.ckg") is None and linked_file(f"rank-3.{u}.ckg") is None
    assert looks_like_checkpoint([linked_name(0, u)])


# ---------------------------------------------------------------------- hostile variants


def _variant(tmp_path: Path, change: Callable[[Path, dict, list[index.Row]], None]) -> Path:
    """An incremental ``b`` changed by ``change(b, body, rows)``, which rewrites what it needs."""
    b = _incremental(tmp_path)
    change(b, _body(b), _rows(b))
    return b


def _files(b: Path, rows: list[index.Row]) -> list[dict]:
    """File entries of the own data file and every linked file ``rows`` use, as on disk."""
    names = [OWN] + sorted({r.file for r in rows} - {OWN})
    return [
        {
            "name": n,
            "rank": 0 if n == OWN else linked_file(n)[0],  # type: ignore[index]
            "size": (b / n).stat().st_size,
            "chunks": sum(r.file == n for r in rows),
        }
        for n in names
    ]


def _relink(b: Path, body: dict, rows: list[index.Row], name: str) -> None:
    """Move the linked file to ``name`` (its rows and entry follow)."""
    old = next(f["name"] for f in body["files"] if f["name"] != OWN)
    os.rename(b / old, b / name)
    for r in rows:
        if r.file == old:
            r.file = name
    _publish(b, body, rows, _files(b, rows), body["incremental"])


def _first_linked(rows: list[index.Row]) -> index.Row:
    return min((r for r in rows if r.base is not None), key=lambda r: r.offset)


def _wrong_header_uuid(b: Path, body: dict, rows: list[index.Row]) -> None:
    _relink(b, body, rows, linked_name(0, "f" * 32))


def _own_uuid(b: Path, body: dict, rows: list[index.Row]) -> None:
    _relink(b, body, rows, linked_name(0, body["uuid"]))


def _not_in_footer(b: Path, body: dict, rows: list[index.Row]) -> None:
    gone = next(x for x in _rows(b.parent / "a") if x.key == "gone")
    _first_linked(rows).offset = gone.offset + datafile.HEADER_SIZE  # inside a record of a's
    _publish(b, body, rows, body["files"], body["incremental"])


def _field_mismatch(b: Path, body: dict, rows: list[index.Row]) -> None:
    r = _first_linked(rows)
    r.hash = bytes(16)
    _publish(b, body, rows, body["files"], body["incremental"])


def _overlap(b: Path, body: dict, rows: list[index.Row]) -> None:
    linked = sorted((r for r in rows if r.base is not None), key=lambda r: r.offset)
    linked[1].offset = linked[0].offset + datafile.HEADER_SIZE
    _publish(b, body, rows, body["files"], body["incremental"])


def _without_feature(b: Path, body: dict, rows: list[index.Row]) -> None:
    feats = set(body["features"]) - {"incremental"}
    _publish(b, body, rows, body["files"], None, feats)


def _base_null(b: Path, body: dict, rows: list[index.Row]) -> None:
    _first_linked(rows).base = None
    _publish(b, body, rows, body["files"], body["incremental"])


def _base_on_own(b: Path, body: dict, rows: list[index.Row]) -> None:
    next(r for r in rows if r.base is None).base = "a"
    _publish(b, body, rows, body["files"], body["incremental"])


def _symlink(b: Path, body: dict, rows: list[index.Row]) -> None:
    name = next(f["name"] for f in body["files"] if f["name"] != OWN)
    os.unlink(b / name)
    os.symlink(b.parent / "a" / OWN, b / name)


def _rank_beyond(b: Path, body: dict, rows: list[index.Row]) -> None:
    _relink(b, body, rows, linked_name(1, _body(b.parent / "a")["uuid"]))
    for r in rows:
        if r.base is not None:
            r.rank = 1
    _publish(b, body, rows, _files(b, rows), body["incremental"])


def _depth_zero(b: Path, body: dict, rows: list[index.Row]) -> None:
    body["incremental"] = {"base": "a", "depth": 0}
    _write_manifest(b, body)


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (_wrong_header_uuid, "file header|uuid"),
        (_own_uuid, "own uuid"),
        (_not_in_footer, "footer row"),
        (_field_mismatch, "footer row"),
        (_overlap, "overlap"),
        (_without_feature, "files"),
        (_base_null, "without a base"),
        (_base_on_own, "not in a linked data file"),
        (_symlink, "link"),
        (_rank_beyond, "rank"),
        (_depth_zero, "incremental"),
    ],
)
def test_hostile_incremental_checkpoints_are_refused(
    tmp_path: Path, change: Callable, where: str
) -> None:
    b = _variant(tmp_path, change)
    with pytest.raises(CorruptCheckpointError) as e:
        ckptguard.load(str(b))
    assert e.value.file is not None, e.value
    import re

    assert re.search(where, str(e.value)), e.value
    with pytest.raises(ir.SpecViolation):
        ir.read_checkpoint(str(b))
    assert not ckptguard.verify(str(b)).ok


# ---------------------------------------------------------------------- the reference writer


@pytest.mark.parametrize("digests", [False, True])
def test_incremental_saves_read_back_after_their_bases_go(tmp_path: Path, digests: bool) -> None:
    """``save(..., base=)`` end to end: a chain a <- b <- c (c's base found through LATEST)
    loads bit-exactly, verifies and reads independently, and still does once a and b are
    deleted."""
    state = _state(1)
    kw = {"digests": digests, "compress": "none"}
    ckptguard.save(state, str(tmp_path / "a"), **kw)
    states = {"a": state}
    for name, base in (("b", "a"), ("c", "auto")):
        states[name] = dict(states["a"], train=torch.randn(300, 200), step=ord(name))
        info = ckptguard.save(states[name], str(tmp_path / name), base=base, **kw)
        assert info.base == {"b": "a", "c": "b"}[name] and info.depth == {"b": 1, "c": 2}[name]
    c = tmp_path / "c"
    assert any(linked_file(n) for n in os.listdir(c)) and "incremental" in _body(c)["features"]
    for gone in ("a", "b"):
        back = ckptguard.load(str(c))
        for k in ("frozen_a", "frozen_b", "gone", "train"):
            assert torch.equal(back[k], states["c"][k]), k
        assert ckptguard.verify(str(c)).ok
        assert bytes(ir.read_checkpoint(str(c)).tensors["train"].data) == (
            states["c"]["train"].numpy().tobytes()
        )
        ckptguard.Store(str(tmp_path)).delete(gone)
