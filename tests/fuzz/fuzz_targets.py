"""Fuzz targets of ckptguard's parsers and decoder, shared by the fuzz driver (run.py), the corpus
replay and the hypothesis tests (test_fuzz_targets.py).

Each target takes bytes and runs one parser on them, the way a reader meets them on disk. It may
return or raise one of the typed errors of the format (``FormatError`` and its subclasses,
``TreeError``, ``CheckpointError``); anything else is a bug, and so is an input that takes longer
than ``SLOW_S``, allocates more than the driver's memory limit, or reads outside the checkpoint.
Several targets are differential: the Python and the native decoder must agree, byte for byte
on success and on the fact of failure; the object-tree decoder and tests/independent_reader.py
(written from docs/format.md alone) must accept and refuse the same trees.

The context of the index, footer and data-file targets is a small committed checkpoint kept in
tests/corpus/checkpoint (both codecs, several records); inputs are derived from its files.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from ckptguard import backend, encode, io
from ckptguard.errors import CheckpointError
from ckptguard.format import container, index, manifest, strict_json
from ckptguard.format.datafile import (
    HEADER_SIZE,
    RECORD_HEADER_SIZE,
    FormatError,
    check_file_header,
    check_footer,
    unpack_record_header,
    unpack_trailer,
)
from ckptguard.format.dtypes import SIZES as DTYPE_SIZES
from ckptguard.format.layout import align, linked_name
from ckptguard.format.treeids import tensor_ids
from ckptguard.format.validate import check_table
from ckptguard.tree import TreeError, check_tree

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: the independent reader
import independent_reader as ir  # noqa: E402

CORPUS = os.path.join(os.path.dirname(HERE), "corpus")
CHECKPOINT = os.path.join(CORPUS, "checkpoint")
DATA = "rank-00000.ckg"
TYPED = (FormatError, TreeError, CheckpointError)
SLOW_S = 2.0
MAX_DEST = 1 << 22  # destination buffers the record targets allocate at most
NATIVE = backend.available()


class Skip(Exception):
    """The harness could not build this input (not a finding)."""


class Bug(AssertionError):
    """A property of the target failed (backends disagree, a path outside the directory...)."""


# ---------------------------------------------------------------------------- the context


@dataclass
class Context:
    manifest_raw: bytes
    body: dict
    index_raw: bytes
    datafile: bytes
    rows: list[dict]  # index rows of the data file, as footer JSON objects
    footer: bytes

    @property
    def uuid(self) -> str:
        return self.body["uuid"]

    @property
    def files(self) -> dict[str, int]:
        return {f["name"]: f["size"] for f in self.body["files"]}


_ctx: Context | None = None


def context() -> Context:
    global _ctx
    if _ctx is None:

        def read(name: str) -> bytes:
            with open(os.path.join(CHECKPOINT, name), "rb") as f:
                return f.read()

        raw = read("MANIFEST.json")
        body = manifest.decode(raw)
        data = read(DATA)
        off, length, _ = struct.unpack_from("<QQQ", data, len(data) - 32)
        footer = data[off : off + length]
        rows = json.loads(footer)["rows"]
        _ctx = Context(raw, body, read("index.parquet"), data, rows, footer)
    return _ctx


def frame_manifest(body: bytes) -> bytes:
    """MANIFEST.json bytes around ``body``, signed (format.md section 3)."""
    digest = xxhash.xxh3_128_hexdigest(body).encode()
    return b'{"checksum":"' + digest + b'","manifest":' + body + b"}\n"


def h64(b: bytes) -> int:
    return xxhash.xxh3_64_intdigest(b)


# ---------------------------------------------------------------------------- a byte reader


class Bytes:
    """Draw small decisions from an input's bytes (atheris' FuzzedDataProvider, simplified)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(bytes(self.byte() for _ in range(nbytes)), "little")

    def pick(self, seq: list | tuple) -> Any:
        return seq[self.uint(2) % len(seq)]

    def rest(self) -> bytes:
        out, self.pos = self.data[self.pos :], len(self.data)
        return out


INTS = [
    0,
    1,
    -1,
    2,
    3,
    7,
    16,
    4095,
    4096,
    4097,
    8192,
    65536,
    (1 << 31) - 1,
    -(1 << 31),
    1 << 32,
    1 << 40,
    1 << 53,
    (1 << 62) + 1,
    (1 << 63) - 1,
    -(1 << 63),
]
STRINGS = [
    "",
    DATA,
    "rank-00001.ckg",
    "rank-999999999.ckg",
    "../rank-00000.ckg",
    "/etc/passwd",
    "raw",
    "shuffle-lz4",
    "zstd",
    "float32",
    "float128",
    "c0",
    "..",
    "\x00",
    "é",
    linked_name(0, "ab" * 16),
]
LINK = linked_name(0, "ab" * 16)  # a linked data file (format.md section 4.3) of another uuid


# ---------------------------------------------------------------------------- targets


def t_manifest(data: bytes) -> None:
    """MANIFEST.json as found on disk (framing, checksum, then the body)."""
    doc = manifest.decode(data)
    _after_manifest(doc)


def t_manifest_body(data: bytes) -> None:
    """A body that is framed and signed, so every input reaches the JSON parser and schema."""
    doc = manifest.decode(frame_manifest(data))
    _after_manifest(doc)


def _after_manifest(doc: dict) -> None:
    manifest.CheckpointInfo.from_manifest(doc, "/store/ck")
    for tree in [doc["tree"], *doc["rank_trees"].values()]:
        check_tree(tree, len(doc["tensors"]))
        tensor_ids(tree)


def t_index(data: bytes) -> None:
    """index.parquet bytes, checked against the context's manifest (schema, then section 4)."""
    c = context()
    table = index.read_table(data)
    check_table(table, c.body["tensors"], c.files, set(c.body["features"]))
    index.rows_from_table(table)


_COLUMN_VALUES: dict[str, list] = {
    "list": [[], [0], [-1], [1 << 62], [0, 0], [1, 2, 3], [4096] * 9],
    "bytes": [b"", b"\0" * 16, b"\xff" * 16],
}


def t_index_rows(data: bytes) -> None:
    """The context's index with a few values changed (any column, any row; interesting ints,
    strings, lists, other rows' values, nulls), written back as valid Parquet and checked.
    With some inputs the manifest's tensor shapes or file sizes change too."""
    c, b = context(), Bytes(data)
    rows = [dict(r) for r in c.rows]
    for r in rows:
        r["hash"] = bytes.fromhex(r["hash"])
    tensors = json.loads(json.dumps(c.body["tensors"]))
    files = dict(c.files)
    for _ in range(1 + b.byte() % 4):
        kind = b.byte() % 16
        if kind == 14 and tensors:
            t = b.pick(tensors)
            t["shape"] = [b.pick([*INTS[:12], 1 << 40]) for _ in range(b.byte() % 4)]
            continue
        if kind == 15:
            files[DATA] = b.pick([*INTS, len(c.datafile), len(c.datafile) + 4096])
            continue
        if kind == 13 and rows:  # drop, duplicate or move a row
            i = b.uint(2) % len(rows)
            op = b.byte() % 3
            if op == 0:
                rows.pop(i)
            elif op == 1:
                rows.insert(b.uint(2) % len(rows), dict(rows[i]))
            else:
                rows.insert(b.uint(2) % len(rows), rows.pop(i))
            continue
        if not rows:
            break
        r = b.pick(rows)
        col = b.pick(index.FIELD_NAMES)
        typ = index.SCHEMA.field(col).type
        src = b.byte() % 4
        if src == 0:
            r[col] = b.pick(rows)[col]  # another row's value: consistent but misplaced
        elif src == 1 and col not in ("key", "tensor"):
            r[col] = None
        elif pa.types.is_list(typ):
            v = list(b.pick(_COLUMN_VALUES["list"]))
            if v and b.byte() & 1:
                v[b.uint(1) % len(v)] = b.pick(INTS)
            r[col] = v
        elif pa.types.is_fixed_size_binary(typ):
            r[col] = b.pick(_COLUMN_VALUES["bytes"])
        elif pa.types.is_string(typ):
            r[col] = b.pick(STRINGS + [x["key"] for x in c.rows])
        else:
            step = b.pick([-4096, -1, 1, 64, 4096])
            r[col] = r[col] + step if src == 3 and isinstance(r[col], int) else b.pick(INTS)
    schema, feats = index.SCHEMA, set(c.body["features"])
    if b.byte() % 4 == 3:  # the feature digests: a digest per row, its column and the feature
        schema, feats = index.schema_of(False, True), feats | {index.DIGESTS}
        for r in rows:
            r[index.DIGEST] = b.pick([bytes(32), b"\xff" * 32, b"\0" * 31, None])
        if b.byte() & 1:  # the column without the feature
            feats.discard(index.DIGESTS)
    if b.byte() % 4 == 2:  # the feature incremental: rows moved to a linked file, with a base
        files[LINK] = b.pick([len(c.datafile), *INTS[:12]])
        feats.add(index.INCREMENTAL)
        for r in rows:
            if b.byte() & 1:
                r["file"], r["base"] = LINK, b.pick(["a", "a", None, "..", ""])
        if b.byte() & 1:  # the linked file without the feature
            feats.discard(index.INCREMENTAL)
    try:
        data = index.write_table(pa.Table.from_pylist(rows, schema=schema))
    except (pa.ArrowException, OverflowError, TypeError, ValueError) as e:
        raise Skip(f"not representable in the schema: {e}") from None
    table = index.read_table(data)  # as the reader does: schema and nulls, then the rules
    check_table(table, tensors, files, feats)


def t_file_header(data: bytes) -> None:
    """A data file header (4096 bytes); the first input byte's bit 0 re-signs it (so the
    version, rank, uuid, alignment and reserved checks are reached), bit 1 keeps the magic."""
    flags, rest = (data[0] if data else 0), data[1:]
    buf = bytearray((rest + bytes(HEADER_SIZE))[:HEADER_SIZE])
    if flags & 2:
        buf[0:8] = b"CKGDATA1"
    if flags & 1:
        buf[40:48] = struct.pack("<Q", h64(bytes(buf[:40])))
    check_file_header(bytes(buf), 0, context().uuid)


def t_record_header(data: bytes) -> None:
    """A 64-byte chunk record header; bit 0 of the first byte re-signs it."""
    flags, rest = (data[0] if data else 0), data[1:]
    buf = bytearray((rest + bytes(RECORD_HEADER_SIZE))[:RECORD_HEADER_SIZE])
    if flags & 2:
        buf[0:4] = b"CKGR"
    if flags & 1:
        buf[56:64] = struct.pack("<Q", h64(bytes(buf[:56])))
    unpack_record_header(bytes(buf))


def t_trailer(data: bytes) -> None:
    """A trailer and the file size it is checked against (8 bytes, then 32)."""
    size = int.from_bytes(data[:8].ljust(8, b"\0"), "little")
    unpack_trailer(data[8:40].ljust(32, b"\0"), size)


def t_footer(data: bytes) -> None:
    """Footer JSON (its hash is taken from the input, as a writer would), its rows parsed and
    compared with the context's index rows, as the reader does."""
    c = context()
    rows = check_footer(data, h64(data), 0, c.uuid)
    parsed = [index.row_from_json(x) for x in rows]
    want = [index.row_from_json(x) for x in c.rows]
    _ = parsed == want


_CIDS = [0, 1, 0, 1, 2, 255, -1]
_ELEMS = [1, 2, 4, 8, 16, 0, 3, 255, 256, -1, 1 << 31]


def _decode_args(b: Bytes) -> tuple[int, int, int, bytes]:
    cid = b.pick(_CIDS)
    elem = b.pick(_ELEMS)
    big = b.byte() % 8 == 0
    raw_len = b.pick(INTS) if big else b.uint(3) % (MAX_DEST + 1)
    return cid, elem, raw_len, b.rest()


def decode_input(cid: int, elem: int, raw_len: int, payload: bytes) -> bytes:
    """The input of the decode target that means these arguments."""
    return (
        _CIDS.index(cid).to_bytes(2, "little")
        + _ELEMS.index(elem).to_bytes(2, "little")
        + b"\x01"
        + raw_len.to_bytes(3, "little")
        + payload
    )


def t_decode(data: bytes) -> None:
    """One payload through encode.decode on both backends: the same bytes or both a FormatError."""
    cid, elem, raw_len, payload = _decode_args(Bytes(data))
    _both(lambda be: encode.decode(cid, payload, raw_len, elem, backend=be))


def t_decode_lz4(data: bytes) -> None:
    """A shuffle-lz4 payload whose length fields fit it (raw_len near the data's own size), so
    most inputs reach the LZ4 decoder and the unshuffle of both backends."""
    _decode_fitting(encode.SHUFFLE_LZ4, data)


def t_decode_zstd(data: bytes) -> None:
    """A shuffle-zstd payload whose length fields fit it, so most inputs reach the frame checks
    (magic, flags, content size, trailing bytes), the zstd decoder and the unshuffle."""
    _decode_fitting(encode.SHUFFLE_ZSTD, data)


def _decode_fitting(codec: int, data: bytes) -> None:
    b = Bytes(data)
    elem = (1, 2, 4, 8, 16)[b.byte() % 5]
    raw_len = max(elem, b.uint(3) % (MAX_DEST + 1) // elem * elem)
    payload = b.rest()
    _both(lambda be: encode.decode(codec, payload, raw_len, elem, backend=be))


def _both(call: Callable[[str], Any]) -> None:
    """Run ``call`` on each backend; they must agree (same bytes, or both a FormatError)."""
    outs: list[tuple[str, Any]] = []
    errors: list[FormatError] = []
    for be in ("python", "native") if NATIVE else ("python",):
        try:
            outs.append(("ok", bytes(call(be))))
        except FormatError as e:
            outs.append(("err", type(e).__name__))
            errors.append(e)
    if len(outs) == 2 and outs[0] != outs[1]:
        raise Bug(f"backends disagree: python {_short(outs[0])}, native {_short(outs[1])}")
    if errors:
        raise errors[0]


def _short(o: tuple) -> str:
    return f"{o[0]} {o[1][:40]!r}" if o[0] == "ok" else f"{o[0]} {o[1]}"


def t_record_read(data: bytes) -> None:
    """A chunk record in a file read by io.read_records on both backends, with an item built
    from its header (as the index would give it) or perturbed by the input: typed errors only,
    identical outcome and bytes."""
    b = Bytes(data)
    flags = b.byte()
    rec = bytearray(b.rest())
    if len(rec) >= RECORD_HEADER_SIZE and flags & 1:
        rec[56:64] = struct.pack("<Q", h64(bytes(rec[:56])))
    try:
        h = unpack_record_header(bytes(rec[:RECORD_HEADER_SIZE]))
        codec_id, elem, raw_len, stored_len, digest, seq = (
            h.codec,
            h.elem_size,
            h.raw_len,
            h.stored_len,
            h.hash,
            h.seq,
        )
    except FormatError:
        codec_id, elem, raw_len, stored_len, digest, seq = 0, 1, 16, 16, bytes(16), 0
    if flags & 2:
        raw_len = min(raw_len, MAX_DEST)
    extent = align(RECORD_HEADER_SIZE + stored_len)
    if flags & 4:
        extent = align(len(rec)) or HEADER_SIZE
    sha = bytes(32) if flags & 8 else None  # a SHA-256 digest the bytes do not have
    item = encode.ReadItem(
        HEADER_SIZE, extent, codec_id, elem, raw_len, stored_len, digest, 0, seq, sha
    )
    dest_len = min(max(raw_len, 0), MAX_DEST)
    fd = os.memfd_create("record")
    try:
        os.pwrite(fd, bytes(HEADER_SIZE) + bytes(rec), 0)

        def read(be: str) -> bytes:
            dest = np.zeros(dest_len, np.uint8)
            io.read_records(fd, "record", dest, [item], threads=1, verify=True, backend=be)
            return dest.tobytes()

        _both(read)
    finally:
        os.close(fd)


class _Scratch:
    """A private copy of the context checkpoint whose files a target may overwrite."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="ckptguard-fuzz-")
        self.store = os.path.join(self.root, "store")
        self.path = os.path.join(self.store, "ck")
        shutil.copytree(CHECKPOINT, self.path)

    def write(self, name: str, data: bytes) -> None:
        p = os.path.join(self.path, name)
        with open(p + ".tmp", "wb") as f:
            f.write(data)
        os.replace(p + ".tmp", p)


_scratch: _Scratch | None = None


def scratch() -> _Scratch:
    global _scratch
    if _scratch is None:
        _scratch = _Scratch()
    return _scratch


def t_datafile(data: bytes) -> None:
    """A whole data file in place of the context's (the manifest re-signed with its size):
    verify every record as ckptguard.verify does, then read them all as a load does."""
    from ckptguard.open import CheckpointReader
    from ckptguard.read import read_into, read_record

    c, s = context(), scratch()
    body = json.loads(json.dumps(c.body))
    body["files"][0]["size"] = len(data)
    s.write("MANIFEST.json", manifest.encode(body))
    s.write(DATA, data)
    with CheckpointReader(s.path) as rd:
        fd = rd.open_file(DATA)
        try:
            rows = rd.rows_of_file(DATA)
            for r in rows:
                read_record(rd, fd, r)
            dest = np.zeros(sum(r.raw_len for r in rows), np.uint8)
            offs = np.cumsum([0] + [r.raw_len for r in rows])[:-1].tolist()
            read_into(rd, fd, rows, dest, offs)
        finally:
            os.close(fd)


def _container_seed() -> bytes:
    """The context checkpoint as a one-file checkpoint (format.md section 10)."""
    c = context()
    return c.datafile + b"".join(container.tail(DATA, len(c.datafile), c.index_raw, c.manifest_raw))


def _read_both(data: bytes) -> None:
    """A one-file checkpoint of these bytes: opened, every record read and checked as verify
    does, by ckptguard; the independent reader must accept or refuse it too (differential)."""
    from ckptguard.open import CheckpointReader
    from ckptguard.read import read_record

    path = os.path.join(scratch().root, "one.pt")
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    ours: Exception | None = None
    try:
        with CheckpointReader(path) as rd:
            for name in rd.files:
                fd = rd.open_file(name)
                try:
                    for r in rd.rows_of_file(name):
                        read_record(rd, fd, r)
                finally:
                    os.close(fd)
    except TYPED as e:
        ours = e
    try:
        ir.read_checkpoint(path)
        theirs: str | None = None
    except ir.SpecViolation as e:
        theirs = str(e)
    if (ours is None) != (theirs is None):
        raise Bug(
            f"ckptguard {'accepts' if ours is None else 'refuses: ' + str(ours)[:120]}, "
            f"independent reader {'accepts' if theirs is None else 'refuses: ' + theirs[:120]}"
        )
    if ours is not None:
        raise ours


def t_onefile(data: bytes) -> None:
    """The bytes after the data file of a one-file checkpoint (padding, index, manifest, TOC
    and trailer), behind the context's data file: opened and read by both readers."""
    _read_both(context().datafile + data)


def t_onefile_toc(data: bytes) -> None:
    """A one-file checkpoint's TOC (JSON), with the context's members before it and a trailer
    signed for it, so every input reaches the TOC's parser and layout checks."""
    seed = _container_seed()
    toc_off = struct.unpack_from("<Q", seed, len(seed) - container.TRAILER_SIZE)[0]
    _read_both(seed[:toc_off] + data + container.pack_trailer(toc_off, data))


def t_latest(data: bytes) -> None:
    """LATEST content in a store holding one checkpoint `ck`: resolved to `ck` or refused,
    never to a path outside the store."""
    from ckptguard.api import resolve
    from ckptguard.store import Store

    s = scratch()
    with open(os.path.join(s.store, "LATEST"), "wb") as f:
        f.write(data)
    Store(s.store).latest_name()
    got = resolve(s.store)
    if got != s.path:
        raise Bug(f"LATEST {data[:40]!r} resolved to {got!r}")


TREE_TENSORS = 2  # the tensor ids a tree target input may reference
BIG = "-" + "9" * 20  # an integer below int64


def t_tree(data: bytes) -> None:
    """An object tree (JSON text, format.md section 6) as a manifest's ``tree``: ckptguard's
    decoder and the independent reader must both accept it or both refuse it (differential)."""
    try:
        tree = strict_json(data)
    except ValueError:  # not JSON: the manifest target's business, not the tree decoder's
        raise Skip from None
    try:
        check_tree(tree, TREE_TENSORS)
        ours: str | None = None
    except TreeError as e:
        ours = str(e)
    try:
        ir._TreeDecoder(TREE_TENSORS).decode(tree, (), 0)
        theirs: str | None = None
    except ir.SpecViolation as e:
        theirs = str(e)
    if (ours is None) != (theirs is None):
        # ckptguard asks torch whether a $device or $dtype exists; the spec reader cannot
        if ours is not None and (
            " is not a device: " in ours or ours.startswith("malformed $dtype")
        ):
            raise TreeError(ours)
        raise Bug(
            f"decoder {'accepts' if ours is None else 'refuses: ' + ours}, independent "
            f"reader {'accepts' if theirs is None else 'refuses: ' + theirs}"
        )
    if ours is not None:
        raise TreeError(ours)


# A valid input: a float32 storage of shape [3, 63] and an int64 view [3, 3] of it, offset 3,
# strides [0, 1].
VIEW_SEED = bytes.fromhex(
    "e805caad5784f80cd5091fb5464046848dcbcd582d77f8035aa2e0737aa0fdf573d3ac8c701824bc"
)
VIEW_DTYPES = ["float32", "uint8", "int64", "bfloat16", "bool", "complex128", "float16"]
VIEW_INTS = [0, 1, 2, 3, 4, 5, 7, 8, 12, 16, 63, 64, 65, *INTS, 1 << 62, (1 << 62) + 1]
MAX_VIEW_BUILD = 1 << 20  # storages the target allocates to build an accepted view on


def _view_entries(b: Bytes) -> list:
    """A storage entry and a view of it (format.md section 3.2), every number drawn from the
    input (mostly small, sometimes hostile); now and then a member of another type."""
    kind = b.pick(["torch", "torch", "numpy"])

    def dims() -> list[int]:
        return [b.pick(VIEW_INTS[:12] if b.byte() % 4 else VIEW_INTS) for _ in range(b.byte() % 4)]

    def entry(key: str, shape: list[int]) -> dict:
        dtypes = VIEW_DTYPES if kind == "torch" else ["float32", "uint8", "int64", "bool"]
        return {
            "key": key,
            "dtype": b.pick(dtypes),
            "shape": shape,
            "kind": kind if b.byte() % 16 else "numpy",
            "device": "cpu",
            "requires_grad": False,
            "parameter": False,
        }

    storage, view = entry("s", dims()), entry("v", dims())
    stride = [b.pick(VIEW_INTS) for _ in range(len(view["shape"]) + (b.byte() % 16 == 0))]
    view["view"] = {
        "storage": b.pick([0, 0, 0, 0, 1, 2, -1, True]),
        "offset": b.pick(VIEW_INTS),
        "stride": stride,
    }
    odd = b.byte() % 32
    if odd == 1:
        view["view"] = b.pick([None, [], {}, {"storage": 0}, "0"])
    elif odd == 2:
        view["view"]["offset"] = b.pick([-1, 1.0, "1", None, [0]])
    elif odd == 3:
        storage["view"] = {"storage": 1, "offset": 0, "stride": [1] * len(storage["shape"])}
    return [storage, view]


def t_views(data: bytes) -> None:
    """View entries of a manifest (format.md section 3.2), differential: ckptguard's manifest
    check and the independent reader accept and refuse the same ones; a view both accept is
    built (``place.view_of``, torch and numpy) on a storage of exactly its bytes without
    reaching outside them (torch's and numpy's own bounds checks would raise)."""
    from ckptguard import place

    b = Bytes(data)
    tensors = _view_entries(b)
    body = dict(context().body, tensors=tensors, features=["tensor-views"])
    raw = json.dumps(body, separators=(",", ":")).encode()
    try:
        manifest.decode(frame_manifest(raw))
        ours: str | None = None
    except FormatError as e:
        ours = str(e)
    try:
        ir.parse_manifest(ir.frame_manifest(raw))
        theirs: str | None = None
    except ir.SpecViolation as e:
        theirs = str(e)
    if (ours is None) != (theirs is None):
        # the independent reader refuses a tensor of over 2**62 bytes with the index (section 4)
        if ours is not None and "larger than 2**62 bytes" in ours:
            raise FormatError(ours)
        raise Bug(
            f"manifest {'accepts' if ours is None else 'refuses: ' + ours}, independent "
            f"reader {'accepts' if theirs is None else 'refuses: ' + theirs}"
        )
    if ours is not None:
        raise FormatError(ours)
    storage, view = tensors
    nbytes = int(np.prod(storage["shape"])) * DTYPE_SIZES[storage["dtype"]]
    if nbytes > MAX_VIEW_BUILD:
        raise Skip
    value = place.host_empty(storage)  # the manifest bounds its extent, empty or not
    try:
        built = place.view_of(value, view)
    except (RuntimeError, ValueError) as e:  # torch's or numpy's bounds check: a hole
        raise Bug(f"an accepted view reaches outside its storage: {e}") from None
    if 0 not in view["shape"]:  # its first and last elements, read (not the whole view: an
        # expanded view may be far larger than its storage, as torch.load would give it too)
        built[(0,) * built.ndim].tolist()
        built[tuple(n - 1 for n in view["shape"])].tolist()


_LINK_UUIDS = ["ab" * 16, "cd" * 16, "AB" * 16, "ab" * 15, ""]


def _incremental_body(b: Bytes) -> dict:
    """The context's manifest body with the files and ``incremental`` member of an incremental
    checkpoint (format.md section 4.3) drawn from the input: an all-zero input gives a valid one
    (one rank, its own file, one linked file of it); others link files of other ranks, of this
    checkpoint's uuid, under malformed names, or without the feature or member."""
    c = context()
    ws = 1 + b.byte() % 3
    size = len(c.datafile)
    files = [{"name": f"rank-{r:05d}.ckg", "rank": r, "size": size, "chunks": 0} for r in range(ws)]
    for _ in range(1 + b.byte() % 3):
        rank = b.pick([0, 0, 1, 2, 3, -1, 1 << 31])
        uuid = b.pick([*_LINK_UUIDS, c.uuid])
        name = b.pick(
            [f"rank-{rank:05d}.{uuid}.ckg", f"rank-{rank}.{uuid}.ckg", f"rank-{rank:05d}.{uuid}"]
        )
        files.append(
            {"name": name, "rank": b.pick([rank, rank, 0, True]), "size": size, "chunks": 1}
        )
    edit = b.byte() % 8
    if edit == 1:  # a rank without its own file
        files.pop(b.uint(1) % ws)
    elif edit == 2:  # an entry twice
        files.append(dict(b.pick(files)))
    feats = [f for f in c.body["features"] if f != index.INCREMENTAL]
    if b.byte() % 8 != 1:
        feats.append(index.INCREMENTAL)
    body = dict(c.body, world_size=ws, files=files, features=feats)
    member = b.byte() % 8
    if member == 0:
        body["incremental"] = {"base": "a", "depth": 1 + b.byte() % 8}
    elif member == 2:
        body["incremental"] = {"base": b.pick(STRINGS), "depth": b.pick(INTS)}
    elif member == 3:
        body["incremental"] = b.pick(
            [
                None,
                [],
                {},
                {"base": "a"},
                {"base": "a", "depth": 1, "x": 0},
                {"base": "a", "depth": True},
            ]
        )
    return body


def t_incremental(data: bytes) -> None:
    """The files and ``incremental`` member of a manifest under the feature ``incremental``
    (format.md section 4.3), differential: ckptguard's manifest check and the independent reader
    accept and refuse the same ones."""
    raw = json.dumps(_incremental_body(Bytes(data)), separators=(",", ":")).encode()
    try:
        doc = manifest.decode(frame_manifest(raw))
        ours: str | None = None
    except FormatError as e:
        ours = str(e)
    try:
        ir.parse_manifest(ir.frame_manifest(raw))
        theirs: str | None = None
    except ir.SpecViolation as e:
        theirs = str(e)
    if (ours is None) != (theirs is None):
        raise Bug(
            f"manifest {'accepts' if ours is None else 'refuses: ' + ours}, independent "
            f"reader {'accepts' if theirs is None else 'refuses: ' + theirs}"
        )
    if ours is not None:
        raise FormatError(ours)
    info = manifest.CheckpointInfo.from_manifest(doc, "/store/b")
    if (info.base, info.depth) != (doc["incremental"]["base"], doc["incremental"]["depth"]):
        raise Bug("CheckpointInfo does not show the incremental member")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "manifest": t_manifest,
    "manifest_body": t_manifest_body,
    "index": t_index,
    "index_rows": t_index_rows,
    "file_header": t_file_header,
    "record_header": t_record_header,
    "trailer": t_trailer,
    "footer": t_footer,
    "decode": t_decode,
    "decode_lz4": t_decode_lz4,
    "decode_zstd": t_decode_zstd,
    "record_read": t_record_read,
    "datafile": t_datafile,
    "latest": t_latest,
    "tree": t_tree,
    "views": t_views,
    "onefile": t_onefile,
    "onefile_toc": t_onefile_toc,
    "incremental": t_incremental,
}


# ---------------------------------------------------------------------------- seeds

# Object trees: first a valid one with every tag, then one breaking each strict rule of
# format.md section 6 (the mutator reaches the rest from these).
TREE_SEEDS: list[Any] = [
    {
        "w": {"$tensor": 0},
        "l": [1, -2.5, None, True, "s", {"$tensor": 1}],
        "i": [{"$int": str(1 << 64)}, {"$int": str(-(1 << 63) - 1)}],
        "f": [{"$float": "inf"}, {"$float": "nan"}],
        "b": {"$bytes": "AAE="},
        "t": {"$tuple": [1, {"$tuple": []}]},
        "d": {"$dict": [[1, "a"], ["1", "b"], ["$x", 0]]},
        "o": {"$odict": [["a", 1], ["b", 2]]},
        "n": [{"$npscalar": "int16", "hex": "0a00"}, {"$npscalar": "float64", "hex": "0" * 16}],
        "dt": {"$dtype": "bfloat16"},
        "sz": {"$size": [0, 3]},
        "dev": {"$device": "cpu"},
        "p": {"$pickle": "gAROLg=="},
    },
    {  # section 6.2 (feature tree-types): every tag, and keys other than str and int
        "s": {"$set": ["a", 1, None, {"$bytes": "eA=="}, {"$tuple": [1, {"$float": "nan"}]}]},
        "fs": {"$frozenset": [{"$enum": "m.Color", "name": "RED"}, {"$frozenset": [1.5]}]},
        "c": {"$complex": [1.0, {"$float": "-inf"}]},
        "sl": {"$slice": [1, None, {"$tensor": 0}]},
        "p": [{"$path": "/a", "class": "Path"}, {"$path": "C:\\x", "class": "PureWindowsPath"}],
        "ns": {"$namespace": {"lr": 0.5, "w": {"$tensor": 1}}},
        "k": {"$dict": [[True, 1], [-0.0, 2], [{"$tuple": [None, {"$int": str(1 << 64)}]}, 3]]},
        "o": {"$odict": [[{"$complex": [0.0, 1.0]}, 1], ["a", 2]]},
        "e": {"$enum": "m.Color", "name": "BLUE"},
        "dc": {"$dataclass": "m.Config", "fields": {"$dict": [["lr", 0.1], ["$x", [1, 2]]]}},
        "nt": {"$namedtuple": "m.Point", "fields": [1, {"$tensor": 0}]},
        "m": {"$meta": "bfloat16", "shape": [2, 0], "requires_grad": True, "parameter": True},
        "sp": {"$sparse": "coo", "shape": [3], "parts": [{"$tensor": 0}, {"$tensor": 1}]}
        | {"coalesced": True},
        "q": [
            {"$quantized": "qint8", "qscheme": "per_tensor_affine", "int_repr": {"$tensor": 0}}
            | {"scale": 0.5, "zero_point": -3, "axis": None},
            {"$quantized": "quint8", "qscheme": "per_channel_affine", "int_repr": {"$tensor": 0}}
            | {"scale": {"$tensor": 1}, "zero_point": {"$tensor": 0}, "axis": 1},
        ],
        "qdt": {"$dtype": "quint4x2"},
        "sd": {"$odict": [["w", {"$tensor": 0}]], "metadata": {"$odict": [["", {"v": 2}]]}},
        "md": {"$odict": [], "metadata": [None, {"$tuple": [{"$bytes": "eA=="}]}, {"$int": BIG}]},
    },
    {"$quantized": "qint32", "qscheme": "per_tensor_affine", "int_repr": {"$tensor": 0}}
    | {"scale": {"$float": "nan"}, "zero_point": 0, "axis": None},
    {"$quantized": "qint8", "qscheme": "per_tensor_affine", "int_repr": {"$tensor": 0}}
    | {"scale": 1, "zero_point": 0, "axis": None},
    {"$quantized": "qint8", "qscheme": "per_tensor_affine", "int_repr": {"$tensor": 0}}
    | {"scale": 1.0, "zero_point": 1 << 63, "axis": None},
    {"$quantized": "qint8", "qscheme": "per_channel_affine", "int_repr": {"$tensor": 0}}
    | {"scale": 1.0, "zero_point": 0, "axis": 0},
    {"$quantized": "quint4x2", "qscheme": "per_tensor_symmetric", "int_repr": {"$tensor": 0}}
    | {"scale": 1.0, "zero_point": 0, "axis": None},
    {"$structured": [["x", "int32"], ["y", "float64"]], "shape": [2], "data": {"$tensor": 1}},
    {"$structured": [["x", "int32"], ["x", "bool"]], "shape": [], "data": {"$tensor": 0}},
    {"$structured": [], "shape": [1], "data": {"$tensor": 0}},
    {"$sparse": "csr", "shape": [2, 2], "parts": [{"$tensor": 0}] * 3, "coalesced": True},
    {"$sparse": "coo", "shape": [2], "parts": [{"$tensor": 0}, 1], "coalesced": False},
    {"$set": [2, 1]},
    {"$set": [1, True]},
    {"$set": [[1]]},
    {"$frozenset": [{"$tensor": 0}]},
    {"$dict": [[{"$enum": "m.C", "name": "A"}, 1], [{"$tuple": ["$enum", "m.C", "A"]}, 2]]},
    {"$dict": [[1, 1], [1.0, 2]]},
    {"$complex": [1, 2.0]},
    {"$slice": [1, 2]},
    {"$path": "a//b", "class": "PurePosixPath"},
    {"$namespace": {"$odict": [["a", 1]]}},
    {"$meta": "int8", "shape": [1], "requires_grad": True, "parameter": False},
    {"$meta": "float64", "shape": [0, 1 << 62, 2], "requires_grad": False, "parameter": False},
    {"$namedtuple": "m.P", "fields": {"x": 1}},
    {"$npscalar": "int16", "hex": "0A00"},
    {"$npscalar": "int16", "hex": "0a 0"},
    {"$size": [2, -1]},
    {"$size": [1 << 63]},
    {"$int": "5"},
    {"$int": "0" + str(1 << 64)},
    {"$int": "+" + str(1 << 64)},
    {"$int": "9" * 4301},
    {"$dict": [[1, "a"], [1, "b"]]},
    {"$odict": [["a", 1], ["a", 2]]},
    {"$dict": [[1, 2]], "metadata": {}},  # metadata on a $dict
    {"$odict": [], "metadata": {"w": {"$tensor": 0}}},  # not a plain value
    {"$odict": [], "metadata": {"$set": []}},
    {"$odict": [], "metadata": {"$odict": [], "metadata": 1}},
    {"$odict": [], "metadata": {"$dict": [[1.5, 1]]}},
    {"$odict": [], "metadata": 1, "x": 2},
    {"$dict": [["a", 1], ["b", 2]]},
    [1 << 63],
    b"[1e400]",  # a JSON number beyond float range: inf, which must be $float
    {"$tensor": TREE_TENSORS},
    {"$tuple": [1], "x": 2},
    {"$device": "no-such-device"},
    {"$device": "cuda:01"},
    {"$bytes": "AAF="},
    {"$pickle": "gAROLg"},
]


def _zstd_seed() -> bytes:
    """A valid decode_zstd input: 4 KiB of int32 (elem 4) as a shuffle-zstd payload."""
    raw = np.arange(1024, dtype="<i4").tobytes()
    codec, payload, _ = encode.encode(raw, 4, encode.SHUFFLE_ZSTD)
    assert codec == encode.SHUFFLE_ZSTD
    return bytes([2]) + len(raw).to_bytes(3, "little") + payload


def _toc_seed() -> bytes:
    seed = _container_seed()
    off, length = struct.unpack_from("<QQ", seed, len(seed) - container.TRAILER_SIZE)
    return seed[off : off + length]


def seeds(target: str) -> list[bytes]:
    """Valid (or nearly valid) inputs of a target, derived from the context checkpoint."""
    c = context()
    data = c.datafile
    first = c.rows[0]
    lz = next((r for r in c.rows if r["codec"] == "shuffle-lz4"), first)

    def record(r: dict) -> bytes:
        return data[r["offset"] : align(r["offset"] + RECORD_HEADER_SIZE + r["stored_len"])]

    body = c.manifest_raw[58:-2]
    out = {
        "manifest": [c.manifest_raw],
        "manifest_body": [body, b"{}", b"[]"],
        "index": [c.index_raw],
        "index_rows": [b"", bytes(range(64)), bytes(range(255, 191, -1))],
        "file_header": [b"\x03" + data[:HEADER_SIZE], b"\x01" + data[:48]],
        "record_header": [
            b"\x00" + data[r["offset"] : r["offset"] + RECORD_HEADER_SIZE] for r in (first, lz)
        ],
        "trailer": [len(data).to_bytes(8, "little") + data[-32:]],
        "footer": [c.footer],
        "decode": [
            decode_input(0, 1, 16, bytes(range(16))),
            decode_input(1, lz["elem_size"], lz["raw_len"], record(lz)[64 : 64 + lz["stored_len"]]),
        ],
        "decode_lz4": [
            bytes([(1, 2, 4, 8, 16).index(lz["elem_size"])])
            + lz["raw_len"].to_bytes(3, "little")
            + record(lz)[64 : 64 + lz["stored_len"]]
        ],
        "decode_zstd": [_zstd_seed()],
        "record_read": [b"\x00" + record(first), b"\x00" + record(lz)],
        "datafile": [data],
        "latest": [b"ck\n", b"../ck\n", b"ck"],
        "onefile": [_container_seed()[len(data) :]],
        "onefile_toc": [
            _toc_seed(),
            json.dumps({"members": json.loads(_toc_seed())["members"][::-1]}).encode(),
            json.dumps(json.loads(_toc_seed()), indent=1, sort_keys=True).encode(),
        ],
        "tree": [
            t if isinstance(t, bytes) else json.dumps(t, separators=(",", ":")).encode()
            for t in TREE_SEEDS
        ],
        "views": [VIEW_SEED, bytes(range(40)), bytes(range(3, 200, 5)), b"\x00" * 40],
        "incremental": [b"", bytes(range(40)), b"\x01\x02" * 20, b"\x00\x00\x05" * 8],
    }
    return out[target]


# ---------------------------------------------------------------------------- running one input


def run_one(target: str, data: bytes) -> str:
    """Run ``target`` on ``data``; return its outcome: ``ok``, ``skip``, ``typed:<Error>``,
    ``slow`` or ``BUG:<Exception>`` (the last two are findings)."""
    t0 = time.monotonic()
    try:
        TARGETS[target](data)
        out = "ok"
    except Skip:
        out = "skip"
    except TYPED as e:
        out = f"typed:{type(e).__name__}"
    except Bug as e:
        out = f"BUG:{e}"
    except Exception as e:  # noqa: BLE001 - classifying is the point
        out = f"BUG:{type(e).__name__}: {str(e)[:200]}"
    if not out.startswith("BUG") and time.monotonic() - t0 > SLOW_S:
        out = f"slow:{time.monotonic() - t0:.1f}s"
    return out


def is_finding(outcome: str) -> bool:
    return outcome.startswith(("BUG", "slow"))


def summarize(counts: dict[str, Counter]) -> str:
    lines = []
    for target in sorted(counts):
        c = counts[target]
        parts = ", ".join(f"{k}={v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))
        lines.append(f"  {target:14s} {sum(c.values()):7d}  {parts}")
    return "\n".join(lines)
