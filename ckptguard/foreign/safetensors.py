"""safetensors files read by the ``safetensors`` package: one file, or a sharded set as Hugging
Face writes it (``*.safetensors.index.json``: ``weight_map`` names each tensor's file).

The result is the flat dict of tensors the files hold; ``__metadata__`` is kept as the
checkpoint's metadata: one file's as it is; of a set, the one all shards carry, or, where they
differ, each shard's by its file name.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open

from ..errors import ForeignFormatError
from ..place import MapLocation
from .source import (
    SAFETENSORS,
    SAFETENSORS_SET,
    damaged,
    open_dir,
    opened,
    plain_name,
    read_small,
    target_device,
)

MAX_INDEX_BYTES = 64 << 20
"""An index lists one line per tensor: far below this for any model."""


def read_file(
    path: str, map_location: MapLocation, *, dir_fd: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The tensors of safetensors file ``path`` (opened relative to ``dir_fd`` by its base name
    where given) and its ``__metadata__``. What safetensors refuses (a header pointing outside
    the file, a truncated file) is a ForeignFormatError naming the file."""
    dev = target_device(map_location, path)
    name = path if dir_fd is None else os.path.basename(path)
    with opened(name, path=path, kind=SAFETENSORS, dir_fd=dir_fd) as through:
        try:
            with safe_open(through, framework="pt", device=str(dev)) as f:
                meta = f.metadata()
                return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 - no __iter__
        except MemoryError:
            raise
        except Exception as e:  # a file from elsewhere: whatever its header makes safetensors raise
            raise damaged(path, SAFETENSORS, e) from e


def read_set(
    directory: str, index: str, map_location: MapLocation
) -> tuple[dict[str, torch.Tensor], Any]:
    """The tensors of the sharded set that index file ``index`` (a name in ``directory``)
    describes, in its ``weight_map``'s order, and the shards' ``__metadata__``. Each shard must
    be a plain name in ``directory`` and hold exactly the tensors the index assigns it."""
    where = os.path.join(directory, index)
    dfd = open_dir(directory, SAFETENSORS_SET)
    try:
        raw = read_small(
            index, path=where, kind=SAFETENSORS_SET, max_size=MAX_INDEX_BYTES, dir_fd=dfd
        )
        weight_map = parse_index(raw, where)
        shards: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            shards.setdefault(file, []).append(key)
        tensors: dict[str, torch.Tensor] = {}
        metas: dict[str, Any] = {}
        for file, keys in shards.items():
            plain_name(file, path=where, kind=SAFETENSORS_SET, what="its weight_map")
            got, metas[file] = read_file(os.path.join(directory, file), map_location, dir_fd=dfd)
            if sorted(got) != sorted(keys):
                extra = sorted(set(got) - set(keys))[:3]
                missing = sorted(set(keys) - set(got))[:3]
                raise ForeignFormatError(
                    f"{os.path.join(directory, file)} does not hold what {index} assigns it "
                    f"(missing {missing}, not in the index {extra})",
                    where,
                    SAFETENSORS_SET,
                )
            tensors.update(got)
    finally:
        os.close(dfd)
    return {k: tensors[k] for k in weight_map}, merged(metas)


def parse_index(raw: bytes, where: str) -> dict[str, str]:
    """The ``weight_map`` of an index file: tensor name -> shard file name."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise damaged(where, SAFETENSORS_SET, e) from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ForeignFormatError(
            f"{where} has no weight_map of tensor names to file names", where, SAFETENSORS_SET
        )
    return weight_map


def is_index(raw: bytes) -> bool:
    """Whether ``raw`` (a whole file) is a sharded set's index: JSON with a ``weight_map``."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("weight_map"), dict)


def merged(metas: dict[str, Any]) -> Any:
    """The ``__metadata__`` of a set: the one every shard has, else each shard's by file name."""
    values = list(metas.values())
    if all(v == values[0] for v in values):
        return values[0] if values else None
    return metas
