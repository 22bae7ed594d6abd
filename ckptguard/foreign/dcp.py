"""PyTorch DCP checkpoints (a directory with ``.metadata`` and ``__R_N.distcp`` files) read by
DCP's own reader in this one process, the state nested as DCP stored it.

DCP unpickles ``.metadata`` and every non-tensor value with full pickle. Here ``.metadata`` goes
through an unpickler that knows only DCP's own metadata classes and a few torch values, and the
values through torch's weights-only unpickler, unless the caller opted in to full pickle. The
files the metadata names must be plain names in the directory, opened without following links.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from ..errors import CheckpointError, ForeignFormatError
from .source import DCP, damaged, open_dir, opened, plain_name, read_small, refused, unsafe_pickle

METADATA = ".metadata"
MAX_METADATA_BYTES = 1 << 30
"""DCP's metadata grows with tensors x chunks: far below this for any model."""
MAX_EXPANSION = 32768
"""The most a transformed (compressed) item may expand: zstd's own limit per frame is far less."""

# The globals a DCP ``.metadata`` pickle may name: any class defined in these modules (DCP's
# metadata dataclasses and enums, in their homes across torch versions), and these few values.
_CLASS_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed._shard.sharded_tensor.metadata",
    "torch.distributed._shard.metadata",
)
_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


def read(path: str, allow_pickle: bool) -> dict[str, Any]:
    """The state DCP saved in directory ``path``, every tensor on the CPU."""
    dfd = open_dir(path, DCP)
    try:
        where = os.path.join(path, METADATA)
        raw = read_small(METADATA, path=where, kind=DCP, max_size=MAX_METADATA_BYTES, dir_fd=dfd)
        metadata = read_metadata(raw, where, allow_pickle)
        check_sizes(metadata, path, dfd)
        state: dict[str, Any] = {}
        try:
            _load_state_dict(
                state,
                storage_reader=_Reader(path, metadata, dfd),
                planner=_Planner(path, allow_pickle),
                no_dist=True,
            )
        except MemoryError:
            raise
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            raise _unwrapped(e, path) from e
        return state
    finally:
        os.close(dfd)


def read_metadata(raw: bytes, where: str, allow_pickle: bool) -> Metadata:
    """The ``Metadata`` pickled in ``raw``, each file it names checked to be a plain name."""
    try:
        unpickler = pickle.Unpickler if allow_pickle else _MetadataUnpickler
        metadata = unpickler(io.BytesIO(raw)).load()
    except _Refused as e:
        raise unsafe_pickle(where, DCP, e.global_name, "not one of DCP's metadata") from None
    except MemoryError:
        raise
    except Exception as e:  # a file from elsewhere: whatever its bytes make pickle raise
        raise damaged(where, DCP, e) from e
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(metadata, Metadata) or not isinstance(storage, dict):
        raise ForeignFormatError(f"{where} does not hold DCP's Metadata", where, DCP)
    for info in storage.values():
        plain_name(getattr(info, "relative_path", None), path=where, kind=DCP, what="it")
    return metadata


def check_sizes(metadata: Metadata, path: str, dfd: int) -> None:
    """Refuse metadata whose tensors could not come from the files it names, before DCP
    allocates them: every stored item inside its file, and the tensors' declared bytes at most
    the bytes stored for them (times the largest expansion a transform may give)."""
    where = os.path.join(path, METADATA)
    sizes: dict[str, int] = {}
    stored, expands = 0, False
    for info in metadata.storage_data.values():
        name, offset, length = info.relative_path, info.offset, info.length
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise ForeignFormatError(f"{where} gives {name} a bad offset or length", where, DCP)
        if name not in sizes:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except OSError as e:
                raise damaged(os.path.join(path, name), DCP, e) from None
            sizes[name] = st.st_size
        if offset + length > sizes[name]:
            raise ForeignFormatError(
                f"{where} places an item at bytes {offset}-{offset + length} of {name}, "
                f"which has {sizes[name]}",
                where,
                DCP,
            )
        stored += length
        expands = expands or bool(getattr(info, "transform_descriptors", None))
    declared = 0
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            numel = 1
            for d in md.size:
                if type(d) is not int or d < 0:
                    raise ForeignFormatError(f"{where}: tensor {fqn!r} has a bad shape", where, DCP)
                numel *= d
            declared += numel * _itemsize(md.properties.dtype)
    if declared > stored * (MAX_EXPANSION if expands else 1):
        raise ForeignFormatError(
            f"{where} declares {declared} bytes of tensors, more than the {stored} bytes its "
            "files hold for them (a damaged or hostile checkpoint)",
            where,
            DCP,
        )


def _itemsize(dtype: Any) -> int:
    if not isinstance(dtype, torch.dtype):
        raise ForeignFormatError("a DCP tensor's dtype is not a torch dtype", METADATA, DCP)
    return torch.empty((), dtype=dtype).element_size()


class _Refused(pickle.UnpicklingError):
    def __init__(self, global_name: str) -> None:
        super().__init__(f"global {global_name} is not allowed")
        self.global_name = global_name


class _MetadataUnpickler(pickle.Unpickler):
    """Full pickle's opcodes, and only the globals DCP's metadata is made of."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GLOBALS:
            return super().find_class(module, name)
        if module in _CLASS_MODULES or module == "torch":
            with contextlib.suppress(ImportError, AttributeError):
                obj = getattr(importlib.import_module(module), name)
                if module == "torch" and isinstance(obj, torch.dtype):
                    return obj
                if module != "torch" and isinstance(obj, type) and obj.__module__ == module:
                    return obj
        raise _Refused(f"{module}.{name}")


class _Files(FileSystem):
    """DCP's file system, opening a data file of the checkpoint only as a regular file in its
    directory (by ``fsutil``'s safe open) and never through a link."""

    def __init__(self, path: str, dfd: int) -> None:
        super().__init__()
        self.dir = path
        self.dfd = dfd

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        if mode != "rb":
            raise ValueError(f"a DCP checkpoint is only read here, not opened with {mode!r}")
        name = os.path.basename(os.fspath(path))
        full = os.path.join(self.dir, name)
        with (
            opened(name, path=full, kind=DCP, dir_fd=self.dfd) as through,
            open(through, "rb") as f,
        ):
            yield f


class _Reader(FileSystemReader):
    """DCP's file reader, with the metadata already read and checked and ``_Files`` to open."""

    def __init__(self, path: str, metadata: Metadata, dfd: int) -> None:
        super().__init__(path)
        self.fs = _Files(path, dfd)
        self.metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata


class _Planner(_EmptyStateDictLoadPlanner):
    """DCP's planner that rebuilds the whole state, non-tensor values unpickled by torch's
    weights-only unpickler unless the caller opted in."""

    def __init__(self, path: str, allow_pickle: bool) -> None:
        super().__init__()
        self.path = path
        self.allow_pickle = allow_pickle

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=not self.allow_pickle)
        except Exception as e:  # the bytes of a file from elsewhere
            raise refused(e, self.path, DCP, fqn) or damaged(self.path, DCP, e, fqn) from e
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def failure_cause(e: BaseException) -> BaseException:
    """What a rank's step raised, where ``e`` is DCP's CheckpointException (which wraps it with
    the other ranks' failures): the first rank's; else ``e`` itself."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) and failure else failure
            if isinstance(inner, BaseException):
                return inner
    return e


def _unwrapped(e: BaseException, path: str) -> CheckpointError:
    """The error to raise for ``e`` from DCP's load: ours as it is, anything else as damage."""
    e = failure_cause(e)
    if isinstance(e, CheckpointError):
        return e
    return damaged(path, DCP, e)
