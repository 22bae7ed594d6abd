"""MANIFEST.json (docs/format.md section 3): framing, checksum, schema, and CheckpointInfo."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, TypedDict

import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from . import FORMAT_VERSION, strict_json
from .datafile import ZSTD_FEATURE, FormatError
from .encryption import ENCRYPTION, check_encryption, encryption_member, has_key_id
from .entries import PER_RANK_TENSORS, typed, validate_tensors
from .index import DIGESTS, INCREMENTAL, PACKED_RECORDS, has_base, has_digests, is_packed
from .layout import datafile_rank, is_name, is_uuid, linked_file
from .locator import LOCATOR, check_member
from .ranktrees import RANK_TREE_DIFFS, check_diff
from .treeids import TREE_TYPES, uses_tree_types
from .views import TENSOR_VIEWS

MAX_MANIFEST_BYTES = 256 << 20
KNOWN_FEATURES = frozenset(
    {
        "pickle",
        RANK_TREE_DIFFS,
        PER_RANK_TENSORS,
        PACKED_RECORDS,
        ZSTD_FEATURE,
        TREE_TYPES,
        TENSOR_VIEWS,
        DIGESTS,
        INCREMENTAL,
        ENCRYPTION,
        LOCATOR,
    }
)
_PREFIX = b'{"checksum":"'
_MIDDLE = b'","manifest":'
_SUFFIX = b"}\n"
_HEAD = len(_PREFIX) + 32 + len(_MIDDLE)

_MEMBERS: dict[str, type | tuple] = {
    "format": str,
    "format_version": int,
    "features": list,
    "name": str,
    "uuid": str,
    "created": str,
    "step": (int, type(None)),
    "world_size": int,
    "writer": dict,
    "metadata": object,
    "tree": object,
    "rank_trees": dict,
    "tensors": list,
    "files": list,
    "index": dict,
    "totals": dict,
}
_FILE = {"name": str, "rank": int, "size": int, "chunks": int}
_INDEX = {"file": str, "size": int, "xxh3_128": str}
_INDEX_SHA256 = {**_INDEX, "sha256": str}  # under the feature ``digests``
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_INCREMENTAL = {"base": str, "depth": int}  # the member under the feature (section 4.3)
_TOTALS = {"tensors": int, "chunks": int, "raw_bytes": int, "stored_bytes": int, "files": int}


class FormatVersionProblem(FormatError):
    """The manifest is intact but needs a newer reader."""


def features(
    pickle: bool,
    rank_trees: dict,
    tensors: list[dict],
    table: pa.Table | None = None,
    tree: Any = None,
) -> list[str]:
    """The features a checkpoint uses (format.md section 3): pickled values, rank-tree diffs,
    per-rank tensors, the tree's extra types (in ``tree`` and ``rank_trees``), views, and, from
    its index ``table``, records shared by several rows, zstd chunks, chunk digests and rows of
    linked data files (``incremental``: a writer lists linked files exactly when rows use
    them)."""
    zstd = table is not None and pc.any(pc.equal(table.column("codec"), "shuffle-zstd")).as_py()
    return [
        *(["pickle"] if pickle else []),
        *([RANK_TREE_DIFFS] if rank_trees else []),
        *([PER_RANK_TENSORS] if any("per_rank" in t for t in tensors) else []),
        *([PACKED_RECORDS] if table is not None and is_packed(table) else []),
        *([ZSTD_FEATURE] if zstd else []),
        *([TREE_TYPES] if uses_tree_types(tree, *rank_trees.values()) else []),
        *([TENSOR_VIEWS] if any("view" in t for t in tensors) else []),
        *([DIGESTS] if table is not None and has_digests(table) else []),
        *([INCREMENTAL] if table is not None and has_base(table) else []),
        *([ENCRYPTION] if table is not None and has_key_id(table) else []),
    ]


def totals(table: pa.Table, tensors: int, files: int) -> dict[str, int]:
    """The manifest's ``totals`` member for an index ``table`` of ``tensors`` tensors and
    ``files`` data files."""
    return {
        "tensors": tensors,
        "chunks": table.num_rows,
        "raw_bytes": int(pc.sum(table.column("raw_len")).as_py() or 0),
        "stored_bytes": int(pc.sum(_record_stored(table)).as_py() or 0),
        "files": files,
    }


def _record_stored(table: pa.Table) -> pa.ChunkedArray:
    """The stored length of each record once: of a packed index, of the rows that start their
    record (exactly one per record, as validation checks)."""
    stored = table.column("stored_len")
    if not is_packed(table):
        return stored
    return stored.filter(pc.equal(table.column("record_byte_offset"), 0))


def build(
    *,
    name: str,
    uuid: str,
    world_size: int,
    step: int | None,
    writer: dict[str, str],
    metadata: Any,
    tree: Any,
    rank_trees: dict[str, Any],
    tensors: list[dict],
    files: list[dict],
    index: dict,
    table: pa.Table,
    pickle: bool,
    created: dt.datetime,
    incremental: dict | None = None,
    encryption: dict | None = None,
    locator: dict | None = None,
) -> dict:
    """The whole manifest body (format.md section 3) of a checkpoint whose index is ``table``,
    as ``commit.publish`` writes it. ``created``: when it is handed to the commit. Features and
    totals are derived here, never by callers. ``incremental``: the member of an incremental
    save, ``{"base": name, "depth": n}`` (section 4.3), given exactly when ``files`` lists a
    linked data file (ValueError otherwise). ``encryption``: ``{key_id: scope}`` of the data
    keys that seal rows (section 4.4), given exactly when a row has a key_id. ``locator``:
    the member of section 4.5 (``locator.member``), never with a linked file.
    """
    feats = features(pickle, rank_trees, tensors, table, tree)
    linked = any(linked_file(f["name"]) is not None for f in files)
    if linked and INCREMENTAL not in feats:  # a linked file no row uses still needs it
        feats.append(INCREMENTAL)
    if (incremental is not None) != linked:
        raise ValueError("the incremental member is given exactly when a linked file is listed")
    body = {
        "format": "ckptguard",
        "format_version": FORMAT_VERSION,
        "features": feats,
        "name": name,
        "uuid": uuid,
        "created": format_time(created),
        "step": step,
        "world_size": world_size,
        "writer": writer,
        "metadata": metadata,
        "tree": tree,
        "rank_trees": rank_trees,
        "tensors": tensors,
        "files": files,
        "index": index,
        "totals": totals(table, len(tensors), len(files)),
    }
    if incremental is not None:
        body["incremental"] = incremental
    if (ENCRYPTION in feats) != bool(encryption):
        raise ValueError("the encryption member is given exactly when a row has a key_id")
    if encryption:
        body["encryption"] = encryption_member(encryption)
    if locator is not None:
        if linked:
            raise ValueError("a locator is never given with a linked data file")
        body["features"].append(LOCATOR)
        body["locator"] = locator
    return body


def encode(body: dict) -> bytes:
    """Frame a manifest body with its checksum."""
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    return _PREFIX + xxhash.xxh3_128_hexdigest(data).encode() + _MIDDLE + data + _SUFFIX


def decode(raw: bytes) -> dict:
    """Check framing and checksum, parse, and validate the schema. Raises FormatError."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise FormatError("MANIFEST.json is larger than the 256 MiB limit")
    if (
        len(raw) < _HEAD + len(_SUFFIX)
        or not raw.startswith(_PREFIX)
        or raw[_HEAD - len(_MIDDLE) : _HEAD] != _MIDDLE
        or not raw.endswith(_SUFFIX)
    ):
        raise FormatError("MANIFEST.json framing is damaged or the file is truncated")
    body = raw[_HEAD : -len(_SUFFIX)]
    if xxhash.xxh3_128_hexdigest(body).encode() != raw[len(_PREFIX) : len(_PREFIX) + 32]:
        raise FormatError("MANIFEST.json checksum mismatch")
    try:
        doc = strict_json(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"MANIFEST.json is not valid JSON: {e}") from None
    validate(doc)
    return doc


def validate(doc: Any) -> None:
    """Check a parsed manifest body against format.md section 3."""
    if not isinstance(doc, dict) or doc.get("format") != "ckptguard":
        raise FormatError("not a ckptguard manifest")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError("manifest has an invalid format_version")
    if version > FORMAT_VERSION:
        raise FormatVersionProblem(
            f"checkpoint has format version {version}; this ckptguard reads up to "
            f"{FORMAT_VERSION}: upgrade ckptguard"
        )
    feats = doc.get("features")
    if not isinstance(feats, list) or not all(isinstance(f, str) for f in feats):
        raise FormatError("manifest.features must be a list of strings")
    unknown = sorted(set(feats) - KNOWN_FEATURES)
    if unknown:
        raise FormatVersionProblem(
            f"checkpoint requires features {unknown} that this ckptguard does not support"
        )
    incremental = INCREMENTAL in feats
    extra = {
        "incremental": incremental,
        "encryption": ENCRYPTION in feats,
        "locator": LOCATOR in feats,
    }
    typed(doc, {**_MEMBERS, **{k: dict for k, on in extra.items() if on}}, "manifest")
    if not is_name(doc["name"]) or not is_uuid(doc["uuid"]) or doc["world_size"] < 1:
        raise FormatError("manifest has an invalid name, uuid or world_size")
    parse_time(doc["created"])
    if not all(isinstance(v, str) for v in doc["writer"].values()):
        raise FormatError("manifest.writer values must be strings")
    diffs = RANK_TREE_DIFFS in feats
    for r, value in doc["rank_trees"].items():
        if not (r.isascii() and r.isdigit() and len(r) <= 10) or str(int(r)) != r:
            raise FormatError(f"manifest.rank_trees has an invalid rank {r!r}")
        if not 0 < int(r) < doc["world_size"]:
            raise FormatError(f"manifest.rank_trees has an invalid rank {r!r}")
        if diffs:
            check_diff(doc["tree"], value, f"manifest.rank_trees[{r!r}]")
    validate_tensors(
        doc["tensors"], doc["world_size"], PER_RANK_TENSORS in feats, TENSOR_VIEWS in feats
    )
    if incremental:
        typed(doc["incremental"], _INCREMENTAL, "manifest.incremental")
        if not is_name(doc["incremental"]["base"]) or doc["incremental"]["depth"] < 1:
            raise FormatError("manifest.incremental has an invalid base name or depth")
    _validate_files(doc["files"], doc["uuid"], doc["world_size"], incremental)
    if ENCRYPTION in feats:
        check_encryption(doc["encryption"])
    digests = DIGESTS in feats
    typed(doc["index"], _INDEX_SHA256 if digests else _INDEX, "manifest.index")
    if doc["index"]["file"] != "index.parquet" or not is_uuid(doc["index"]["xxh3_128"]):
        raise FormatError("manifest.index is invalid")
    if digests and not _SHA256_HEX.fullmatch(doc["index"]["sha256"]):
        raise FormatError("manifest.index.sha256 is not 64 lowercase hex digits")
    typed(doc["totals"], _TOTALS, "manifest.totals")
    if LOCATOR in feats:
        if incremental:
            raise FormatError("manifest: the locator feature with linked data files")
        check_member(doc["locator"], len(doc["files"]), doc["tensors"], digests)


def _validate_files(files: list, uuid: str, world_size: int, incremental: bool) -> None:
    """Check ``manifest.files``: one entry per data file, named for its rank; under
    ``incremental`` also linked data files (format.md section 4.3), each of a rank that has its
    own file and of another checkpoint's uuid."""
    names: set[str] = set()
    own: set[int] = set()
    linked: set[int] = set()
    for i, f in enumerate(files):
        typed(f, _FILE, f"manifest.files[{i}]")
        rank, link = datafile_rank(f["name"]), None
        if rank is None and incremental:
            link = linked_file(f["name"])
            rank = link[0] if link else None
        if rank is None and linked_file(f["name"]) is not None:
            raise FormatError(f"manifest.files[{i}] is a linked data file without the feature")
        if rank is None or rank != f["rank"] or f["size"] < 0 or f["name"] in names:
            raise FormatError(f"manifest.files[{i}] has an invalid name, rank or size")
        if rank >= world_size:
            raise FormatError(f"manifest.files[{i}] is of a rank beyond world_size")
        if link is not None and link[1] == uuid:
            raise FormatError(f"manifest.files[{i}] links a file of this checkpoint's own uuid")
        names.add(f["name"])
        (linked if link is not None else own).add(rank)
    if not linked <= own or (incremental and not linked):
        raise FormatError(
            "manifest.files: a linked data file of a rank without its own file, or the "
            "incremental feature without a linked file"
        )


def parse_time(text: str) -> dt.datetime:
    """``manifest.created`` as an aware UTC datetime; FormatError if it is not one."""
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc)
    except (TypeError, ValueError):
        raise FormatError(f"manifest.created {text!r} is not a UTC timestamp") from None


def format_time(t: dt.datetime) -> str:
    """``t`` as ``manifest.created`` writes it (UTC, microseconds, a trailing Z)."""
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class WriteStats(TypedDict):
    """How a save wrote its data files, summed over its ranks (``CheckpointInfo.write_stats``):
    raw bytes per codec stored (``"codec"``: ``"raw"``, ``"shuffle-lz4"``, ...) and per I/O mode
    (``"io"``: ``"buffered"``, ``"direct"``), as ``compress="auto"`` and CKPTGUARD_ODIRECT chose
    them; the seconds spent encoding (summed over the threads) and writing records."""

    codec: dict[str, int]
    io: dict[str, int]
    encode_s: float
    write_s: float


@dataclass(frozen=True)
class CheckpointInfo:
    """What a committed checkpoint is, from its manifest."""

    name: str
    path: str
    uuid: str
    step: int | None
    created: dt.datetime
    world_size: int
    tensors: int
    chunks: int
    raw_bytes: int
    stored_bytes: int
    files: int
    metadata: Any = field(default=None, compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    """What failed after the commit point of the save that returned this (CheckpointWarning)."""
    write_stats: WriteStats | None = field(default=None, compare=False)
    """How the save that returned this wrote its data files; None from a manifest."""
    base: str | None = field(default=None, compare=False)
    """The checkpoint an incremental save compared its chunks with (format.md 4.3), else None."""
    depth: int = field(default=0, compare=False)
    """How many incremental saves in a row led to this one (0: a full checkpoint)."""

    @classmethod
    def from_manifest(cls, doc: dict, path: str) -> CheckpointInfo:
        t = doc["totals"]
        base = os.path.basename(os.path.normpath(path))
        return cls(
            name=base if is_name(base) else doc["name"],
            path=path,
            uuid=doc["uuid"],
            step=doc["step"],
            created=parse_time(doc["created"]),
            world_size=doc["world_size"],
            tensors=t["tensors"],
            chunks=t["chunks"],
            raw_bytes=t["raw_bytes"],
            stored_bytes=t["stored_bytes"],
            files=t["files"],
            metadata=doc["metadata"],
            base=doc["incremental"]["base"] if "incremental" in doc else None,
            depth=doc["incremental"]["depth"] if "incremental" in doc else 0,
        )
