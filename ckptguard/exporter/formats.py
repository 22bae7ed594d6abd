"""The three formats an export writes, each from the tensors of ``loader.iter_tensors`` (whole,
checked as read, one at a time) into files of a ``fsutil.NewFiles`` (named only once whole).

safetensors: model.safetensors or shards and the Hugging Face index, names joined by "."; only
tensors of the dtypes it has. HDF5: checkpoint.h5, a dataset per tensor at its key's path.
torch: checkpoint.pt, the object torch.save'd.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ExportError
from ..format.dtypes import SIZES
from ..format.layout import MANIFEST
from ..format.treeids import tensor_ids
from ..format.views import TENSOR_VIEWS, storage_of
from ..fsutil import NewFiles, fsync_dir
from ..loader import iter_tensors
from ..open import CheckpointReader
from ..tree import NUMPY_BY_NAME, TreeError, unflatten
from .names import check_names, escape, key, leaves

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
HDF5_FILE = "checkpoint.h5"
TORCH_FILE = "checkpoint.pt"
# The files an export to safetensors writes: any of them in the destination is of an earlier
# export (a single file beside a sharded set would shadow it for from_pretrained).
SAFETENSORS_NAMES = re.compile(
    r"model\.safetensors|model\.safetensors\.index\.json|model-\d{5}-of-\d{5}\.safetensors"
)


def is_export_file(name: str) -> bool:
    """Whether an export may write a file of this name (its temporaries are an export's)."""
    return name in (HDF5_FILE, TORCH_FILE) or SAFETENSORS_NAMES.fullmatch(name) is not None


# The safetensors type of each dtype it has one for (not complex32, complex128).
SAFETENSORS_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "int32": "I32",
    "uint32": "U32",
    "int64": "I64",
    "uint64": "U64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}
# HDF5 holds a dtype numpy lacks (bfloat16, the float8s, complex32) as its bit pattern.
BITS: dict[int, np.dtype] = {1: np.dtype("uint8"), 2: np.dtype("uint16"), 4: np.dtype("uint32")}
DTYPE_ATTR = "ckptguard_dtype"
VALUES_ATTR = "ckptguard_values"
UUID_ATTR = "ckptguard_uuid"


@dataclass
class ExportResult:
    """What an export wrote: the files (final paths), the tensors and their bytes, and the
    values left out as (name, why)."""

    source: str
    to: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    left_out: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Settings:
    """An export's choices a format acts on."""

    shard_size: int | None  # safetensors: bytes per shard, None for one file
    strict: bool  # refuse rather than leave out
    rank: int  # whose values and per-rank tensors
    allow_pickle: bool  # torch: rebuild pickled values


def host_bytes(value: Any) -> np.ndarray:
    """A host tensor's or array's bytes in C order, as a flat uint8 array."""
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value).reshape(-1).view(np.uint8)
    import torch

    return value.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def shape_of(entry: dict) -> list[int]:
    """The shape a manifest tensor exports with (of a per-rank tensor, one rank's row)."""
    return list(entry["shape"][1:] if entry.get("per_rank") else entry["shape"])


def nbytes(entry: dict) -> int:
    n = SIZES[entry["dtype"]]
    for d in shape_of(entry):
        n *= d
    return n


def read_order(rd: CheckpointReader) -> dict[int, tuple[str, int, int]]:
    """Where each tensor's bytes start (the file and offset of its first chunk; a view's are
    its storage's, and the storage's id keeps them together, -1 for others): the order in
    which ``iter_tensors`` reads files front to back, each packed record once and each storage
    once for all its views."""
    t = rd.table.select(["tensor", "file", "offset"]).sort_by(
        [("tensor", "ascending"), ("file", "ascending"), ("offset", "ascending")]
    )
    gids, first = np.unique(t.column("tensor").to_numpy(), return_index=True)
    t = t.take(first)
    files, offsets = t.column("file").to_pylist(), t.column("offset").to_pylist()
    out = {g: (f, o, -1) for g, f, o in zip(gids.tolist(), files, offsets, strict=True)}
    for gid, entry in enumerate(rd.tensors if TENSOR_VIEWS in rd.features else ()):
        sid = storage_of(entry)
        if sid is not None and sid in out:
            out[gid] = out[sid] = (*out[sid][:2], sid)
    return out


def exists_error(paths: list[str]) -> ExportError:
    """The error for files an export would replace without ``force``."""
    shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    return ExportError(
        f"{shown} already exist{'s' if len(paths) == 1 else ''}: pass force=True (--force) to "
        "replace",
        paths[0],
    )


def refuse_existing(out: NewFiles, names: list[str], also: re.Pattern | None = None) -> None:
    """ExportError if any of ``names`` (or a name ``also`` matches) is in the destination,
    unless it may be replaced; called before any tensor is read."""
    if out.replace:
        return
    found = [n for n in names if os.path.lexists(os.path.join(out.dest, n))]
    if also is not None:
        found += sorted(n for n in os.listdir(out.dest) if also.fullmatch(n) and n not in found)
    if found:
        raise exists_error([os.path.join(out.dest, n) for n in found])


def remove_stale(dest: str, written: list[str]) -> None:
    """Remove the files of an earlier safetensors export that this one did not write (with
    ``force`` only: without it they were refused before anything was written)."""
    keep = {os.path.basename(f) for f in written}
    stale = [n for n in os.listdir(dest) if SAFETENSORS_NAMES.fullmatch(n) and n not in keep]
    for name in stale:
        os.unlink(os.path.join(dest, name))
    if stale:
        fsync_dir(dest)


def refuse_if_strict(left_out: list[tuple[str, str]], st: Settings, to: str, path: str) -> None:
    """Under ``strict``, an ExportError naming what the format cannot hold."""
    if left_out and st.strict:
        shown = "; ".join(f"{n} ({why})" for n, why in left_out[:10])
        more = f" and {len(left_out) - 10} more" if len(left_out) > 10 else ""
        raise ExportError(
            f"{to} cannot hold {len(left_out)} value(s) of {path} (strict): {shown}{more}", path
        )


# ---- safetensors ----


@dataclass(frozen=True)
class _Item:
    name: str
    gid: int
    code: str
    shape: list[int]
    nbytes: int


def _write_safetensors(
    rd: CheckpointReader, node: Any, out: NewFiles, result: ExportResult, st: Settings
) -> None:
    """model.safetensors, or shards of at most ``shard_size`` bytes (a larger tensor alone)
    and the Hugging Face index that maps each name to its shard."""
    items: list[_Item] = []
    named: list[tuple[str, tuple[str, ...]]] = []
    for leaf in leaves(node):
        name = ".".join(leaf.parts)
        gid = leaf.tensor
        code = None if gid is None else SAFETENSORS_DTYPES.get(rd.tensors[gid]["dtype"])
        if gid is None:
            result.left_out.append((name, "not a tensor"))
        elif code is None:
            why = f"dtype {rd.tensors[gid]['dtype']} has no safetensors type"
            result.left_out.append((name, why))
        else:
            entry = rd.tensors[gid]
            items.append(_Item(name, gid, code, shape_of(entry), nbytes(entry)))
            named.append((name, leaf.parts))
    refuse_if_strict(result.left_out, st, "safetensors", rd.path)
    check_names([*named, ("__metadata__", ("__metadata__",))], "name", rd.path)
    order = read_order(rd)
    items.sort(key=lambda it: order.get(it.gid, ("", 0, -1)))
    shards = _shards(items, st.shard_size)
    files = (
        [SAFETENSORS_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    refuse_existing(out, [*files, SAFETENSORS_INDEX], SAFETENSORS_NAMES)
    metadata = {"format": "pt", "ckptguard_uuid": rd.manifest["uuid"]}
    stream = iter_tensors(rd, [it.gid for it in items], st.rank)
    with contextlib.closing(stream):
        for shard, name in zip(shards, files, strict=True):
            with open(out.new(name), "wb") as f:
                f.write(_safetensors_header(shard, metadata))
                for it in shard:
                    _, value = next(stream)
                    data = host_bytes(value)
                    del value
                    assert len(data) == it.nbytes  # the manifest's dtype and shape
                    f.write(data.data)
                    del data
    result.tensors = len(items)
    result.bytes = sum(it.nbytes for it in items)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": result.bytes},
            "weight_map": {
                it.name: f for shard, f in zip(shards, files, strict=True) for it in shard
            },
        }
        with open(out.new(SAFETENSORS_INDEX), "w") as text:
            json.dump(index, text, indent=2, sort_keys=True)
            text.write("\n")


def _shards(items: list[_Item], limit: int | None) -> list[list[_Item]]:
    """``items`` in order, cut into shards of at most ``limit`` bytes (one shard: no limit)."""
    shards: list[list[_Item]] = [[]]
    size = 0
    for it in items:
        if limit is not None and shards[-1] and size + it.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it.nbytes
    return shards


def _safetensors_header(items: list[_Item], metadata: dict[str, str]) -> bytes:
    """The length and JSON header of a safetensors file of ``items`` stored back to back in
    that order (the JSON padded with spaces so that the data starts 8-byte aligned)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    at = 0
    for it in items:
        header[it.name] = {
            "dtype": it.code,
            "shape": it.shape,
            "data_offsets": [at, at + it.nbytes],
        }
        at += it.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


# ---- HDF5 ----


def _hdf5_path(parts: tuple[str, ...], path: str) -> str:
    """The HDF5 path of a key: its parts escaped, each a valid link name."""
    for p in parts:
        if p in ("", ".", ".."):
            raise ExportError(
                f"key {key(parts)!r} of {path} has a part {p!r}, which HDF5 cannot name", path
            )
    return key(parts)


def hdf5_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a tensor of ``dtype`` has in HDF5: its own, else its bit pattern's."""
    dt = NUMPY_BY_NAME.get(dtype)
    return dt if dt is not None else BITS[SIZES[dtype]]


def _write_hdf5(
    rd: CheckpointReader, node: Any, out: NewFiles, result: ExportResult, st: Settings
) -> None:
    """checkpoint.h5: a dataset per tensor at its key's path (``ckptguard_dtype`` its dtype;
    bit patterns where numpy has no such dtype); bool, int, float and str values as attributes
    of their group; every other value in the root's ``ckptguard_values`` (JSON: key path ->
    the value as format.md section 6 encodes it)."""
    import h5py

    tensors: list[tuple[str, int]] = []
    attrs: list[tuple[str, str, Any]] = []
    values: dict[str, Any] = {}
    names: list[tuple[str, tuple[str, ...]]] = []
    for leaf in leaves(node):
        where = _hdf5_path(leaf.parts, rd.path)
        if leaf.tensor is not None:
            tensors.append((where, leaf.tensor))
            names.append((where, leaf.parts))
        elif type(leaf.node) in (bool, int, float, str):
            parent = _hdf5_path(leaf.parts[:-1], rd.path) or "/"
            attrs.append((parent, escape(leaf.parts[-1]), leaf.node))
            names.append((f"{parent} attribute {escape(leaf.parts[-1])}", leaf.parts))
        else:
            values[where] = leaf.node
    order = read_order(rd)
    tensors.sort(key=lambda pg: order.get(pg[1], ("", 0, -1)))
    reserved = [(f"/ attribute {n}", (n,)) for n in (VALUES_ATTR, UUID_ATTR)]
    check_names(reserved + names, "HDF5 name", rd.path)
    refuse_existing(out, [HDF5_FILE])
    tmp = out.new(HDF5_FILE)
    with h5py.File(tmp, "w") as f:
        f.attrs[UUID_ATTR] = rd.manifest["uuid"]
        f.attrs[VALUES_ATTR] = json.dumps(values, sort_keys=True)
        stream = iter_tensors(rd, [gid for _, gid in tensors], st.rank)
        with contextlib.closing(stream):
            for where, gid in tensors:
                entry = rd.tensors[gid]
                # next(), not zip: zip's reused result tuple would keep the last tensor alive
                # while the next is built.
                data = host_bytes(next(stream)[1]).view(hdf5_dtype(entry["dtype"]))
                data = data.reshape(shape_of(entry))
                f.create_dataset(where, data=data).attrs[DTYPE_ATTR] = entry["dtype"]
                result.bytes += data.nbytes
                del data
        for parent, name, v in attrs:
            f.require_group(parent).attrs[name] = v
    result.tensors = len(tensors)


# ---- torch ----


def _write_torch(
    rd: CheckpointReader, node: Any, out: NewFiles, result: ExportResult, st: Settings
) -> None:
    """checkpoint.pt: the (selected) object as ``load`` returns it on the CPU, torch.save'd."""
    import torch

    refuse_existing(out, [TORCH_FILE])
    order = read_order(rd)
    ids = sorted(tensor_ids(node), key=lambda gid: order.get(gid, ("", 0, -1)))
    values: list[Any] = [None] * len(rd.tensors)
    for gid, value in iter_tensors(rd, ids, st.rank):
        values[gid] = value
        result.bytes += nbytes(rd.tensors[gid])
    try:
        obj = unflatten(node, values, allow_pickle=st.allow_pickle)
    except TreeError as e:
        raise rd.corrupt(f"object tree is malformed: {e}", file=MANIFEST) from None
    with open(out.new(TORCH_FILE), "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            # torch's zip writer turns a failed write (ENOSPC) into an error of its own.
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
    result.tensors = len(ids)


Writer = Callable[[CheckpointReader, Any, NewFiles, ExportResult, Settings], None]
# The formats, each with the function that writes it.
WRITERS: dict[str, Writer] = {
    "safetensors": _write_safetensors,
    "hdf5": _write_hdf5,
    "torch": _write_torch,
}
