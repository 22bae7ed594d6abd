"""Names and paths of a store (docs/format.md section 1)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from ..errors import InvalidNameError

MANIFEST = "MANIFEST.json"
INDEX = "index.parquet"
SIGNATURE = "SIGNATURE.json"  # a signed checkpoint's signature (format.md section 2.1)
LATEST = "LATEST"
STAGING = ".staging"
REDUNDANCY = ".redundancy"  # a node-local store's protection records (format.md section 12)
ALIGN = 4096
MAX_LATEST_BYTES = 256

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}")
_DATAFILE = re.compile(r"rank-([0-9]{5,9})\.ckg")
_LINKED = re.compile(r"rank-([0-9]{5,9})\.([0-9a-f]{32})\.ckg")  # format.md section 4.3
_UUID = re.compile(r"[0-9a-f]{32}")


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid checkpoint name, else raise InvalidNameError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise InvalidNameError(
            f"invalid checkpoint name {name!r}: use letters, digits and . _ + = - "
            "(at most 200, not starting with '.'); '/' and '..' are not allowed"
        )
    return name


def is_name(name: str) -> bool:
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and name not in (".", "..")


def datafile_name(rank: int) -> str:
    return f"rank-{rank:05d}.ckg"


def datafile_rank(name: str) -> int | None:
    """The rank encoded in a data file name, or None if it is not one."""
    m = _DATAFILE.fullmatch(name) if isinstance(name, str) else None
    return int(m.group(1)) if m else None


def linked_name(rank: int, uuid_hex: str) -> str:
    """The name of a linked data file (format.md section 4.3): the data file rank ``rank``
    wrote for the checkpoint of uuid ``uuid_hex`` (its holder)."""
    return f"rank-{rank:05d}.{uuid_hex}.ckg"


def linked_file(name: str) -> tuple[int, str] | None:
    """(rank, holder uuid) of a linked data file name, or None if it is not one."""
    m = _LINKED.fullmatch(name) if isinstance(name, str) else None
    return (int(m.group(1)), m.group(2)) if m else None


def file_rank(name: str) -> int | None:
    """The rank of any data file name, a checkpoint's own or a linked one; None if it is
    neither."""
    own = datafile_rank(name)
    if own is not None:
        return own
    linked = linked_file(name)
    return linked[0] if linked else None


def looks_like_checkpoint(names: Iterable[str]) -> bool:
    """Whether a directory holding ``names`` is (or was meant to be) one checkpoint rather than
    a store: it has a manifest, an index or a data file (its own or a linked one). The one rule
    for every command that takes either."""
    return any(n in (MANIFEST, INDEX) or file_rank(n) is not None for n in names)


def is_uuid(text: str) -> bool:
    return isinstance(text, str) and bool(_UUID.fullmatch(text))


def is_key_id(text: str) -> bool:
    """A data key's id (feature ``encryption``): 32 lowercase hex digits, as a uuid."""
    return is_uuid(text)


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def split_path(path: str | os.PathLike) -> tuple[str, str]:
    """Split ``<store>/<name>`` into (store, name), validating the name."""
    raw = os.fsdecode(os.fspath(path))
    head, name = os.path.split(raw)
    if not name:
        raise InvalidNameError(f"{raw!r} names no checkpoint: give <store>/<name>")
    return os.path.abspath(head or "."), check_name(name)
