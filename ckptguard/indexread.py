"""The index rows of an open checkpoint (``open.CheckpointReader``): index.parquet read whole
and checked (docs/format.md section 4), or, for a reader that uses the locator (section 4.5),
the rows of just the data files it reads, from their footers.

A reader of the whole index checks every rule of section 4 on every row, and the locator
against them. A reader that uses the locator checks each footer it reads against the hashes the
manifest lists, its rows against every rule but the cover rule (which the writer checked over
all rows before the manifest existed), each of its shards against the grid that puts it in this
file, and that every cell it needs has its rows: what it loads is then whole, never a box with
parts that no row filled.

``rd`` is the ``CheckpointReader`` being opened (this module sits below it on the load path).
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from .filecheck import footer_follows, footer_rows
from .format import index, manifest
from .format.datafile import FormatError
from .format.encryption import key_scopes
from .format.index import DIGESTS, FULL_SCHEMA, PACKED_RECORDS, row_from_json, schema_of
from .format.layout import INDEX, MANIFEST
from .format.locator import LOCATOR, Cells, check_against, check_footer, check_located
from .format.validate import check_table
from .fsutil import read_member


def empty_table(features: set[str]) -> pa.Table:
    """An index table without rows, with the columns of a checkpoint of these ``features``."""
    schema = schema_of(PACKED_RECORDS in features, DIGESTS in features)
    return schema.empty_table()


def located_rows(rd: Any, cells: Cells, names: list[str]) -> pa.Table:
    """The rows of data files ``names`` from their footers, each checked as the module says
    (a file that fails raises CorruptCheckpointError naming it)."""
    schema = schema_of(PACKED_RECORDS in rd.features, DIGESTS in rd.features)
    scopes = set(key_scopes(rd.manifest))
    tables = []
    for name in names:
        pos = rd.positions[name]
        size, rank = rd.files[name], rd.manifest["files"][pos]["rank"]
        fd = rd.open_member(name, size, "data file")
        kept = False
        try:
            check = functools.partial(check_footer, rd.manifest["locator"], pos)
            got = footer_rows(fd, size, rank, rd.manifest["uuid"], check)
            rows = [row_from_json(x) for x in got.rows]
            table = _table(rows, schema)
            check_table(table, rd.tensors, {name: size}, rd.features, whole=False)
            footer_follows(table, got.trailer, size)
            shards = table.select(["tensor", "shard_offsets", "shard_lengths"]).to_pydict()
            check_located(
                cells,
                pos,
                shards["tensor"],
                [tuple(o) for o in shards["shard_offsets"]],
                [tuple(n) for n in shards["shard_lengths"]],
            )
            if not set(pc.unique(table.column("key_id")).to_pylist()) - {None} <= scopes:
                raise FormatError("a key_id that the manifest's encryption member lacks")
            rd.trailers[name] = got.trailer
            kept = rd.keep_open(name, fd)
        except FormatError as e:
            raise rd.corrupt(str(e), file=name) from None
        except OSError as e:
            raise rd.io_error(e, name) from None
        finally:
            if not kept:
                os.close(fd)
        tables.append(table)
    return pa.concat_tables(tables) if tables else empty_table(rd.features)


def _table(rows: list[index.Row], schema: pa.Schema) -> pa.Table:
    """Footer rows as an index table of ``schema``; FormatError for a value of the wrong type."""
    try:
        cols = [
            pa.array([getattr(r, n) for r in rows], FULL_SCHEMA.field(n).type) for n in schema.names
        ]
        return pa.table(cols, schema=schema)
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
        raise FormatError(f"footer row with a value of the wrong type: {e}") from None


def check_cells(rd: Any, wanted: list[tuple[int, tuple, tuple]]) -> None:
    """That the rows read hold every cell ``wanted`` (tensor id, offsets, lengths)."""
    cols = rd.table.select(["tensor", "shard_offsets", "shard_lengths"]).to_pydict()
    have = set(
        zip(
            cols["tensor"],
            map(tuple, cols["shard_offsets"]),
            map(tuple, cols["shard_lengths"]),
            strict=True,
        )
    )
    for t, offs, lens in wanted:
        if (t, offs, lens) not in have:
            key = rd.tensors[t]["key"]
            raise rd.corrupt(
                f"tensor {key!r}: no rows for its shard at {list(offs)} in the file the "
                "locator names",
                file=MANIFEST,
            )


def read_index(rd: Any, keep_bytes: bool = False) -> pa.Table:
    """The index table, checked against its hash in the manifest and validated."""
    m = rd.manifest
    try:
        if rd.one is not None:
            data = rd.one.index(m["index"]["size"])
        else:
            data = read_member(rd.path, INDEX, dir_fd=rd.dir_fd, size=m["index"]["size"])
    except FileNotFoundError:
        raise rd.missing("index.parquet is missing", INDEX) from None
    table = decode_index(rd, data)
    if keep_bytes:
        rd.index_raw = data
    try:
        shards = check_table(table, rd.tensors, rd.files, rd.features)
        if LOCATOR in rd.features:
            check_against(m["locator"], shards, rd.tensors)
        used = set(pc.unique(table.column("key_id")).to_pylist()) - {None}
        if not used <= set(key_scopes(m)):
            raise FormatError("index: a key_id that the manifest's encryption member lacks")
    except FormatError as e:
        raise rd.corrupt(str(e), file=INDEX) from None
    return table


def decode_index(rd: Any, data: bytes) -> pa.Table:
    """Index bytes checked against the manifest's hashes and parsed (schema and nulls)."""
    m = rd.manifest
    if len(data) != m["index"]["size"] or xxhash.xxh3_128_hexdigest(data) != m["index"]["xxh3_128"]:
        raise rd.corrupt("index.parquet does not match the hash in the manifest", file=INDEX)
    if "sha256" in m["index"] and hashlib.sha256(data).hexdigest() != m["index"]["sha256"]:
        raise rd.corrupt("index.parquet does not match the SHA-256 in the manifest", file=INDEX)
    try:
        return index.read_table(data)
    except FormatError as e:
        raise rd.corrupt(str(e), file=INDEX) from None


def check_totals(rd: Any) -> None:
    """The manifest's totals and file entries agree with the index."""
    m, t = rd.manifest, rd.table
    if manifest.totals(t, len(rd.tensors), len(rd.files)) != m["totals"]:
        raise rd.corrupt("manifest totals disagree with the index", file=MANIFEST)
    counts = dict.fromkeys(rd.files, 0)
    for item in pc.value_counts(t.column("file").combine_chunks()).to_pylist():
        counts[item["values"]] = item["counts"]
    for f in m["files"]:  # validation already tied every row's file to its rank
        if counts[f["name"]] != f["chunks"]:
            raise rd.corrupt("manifest file entry disagrees with the index", file=f["name"])
        if f["rank"] >= m["world_size"]:
            raise rd.corrupt("data file of a rank beyond world_size", file=f["name"])
