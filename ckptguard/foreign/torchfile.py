"""torch.save files (zip and legacy) read by ``torch.load``: with its weights-only unpickler
unless the caller opted in to full pickle, which can run arbitrary code."""

from __future__ import annotations

from typing import Any

import torch
from torch.serialization import default_restore_location

from ..errors import CheckpointError, from_oserror
from ..place import MapLocation
from .source import damaged, opened, refused


def read(path: str, kind: str, map_location: MapLocation, allow_pickle: bool) -> Any:
    """The object torch.save stored in the file ``path``, tensors placed by ``map_location``
    (ckptguard's meaning: None keeps each saved device). A refused global is an
    UnsafePickleError naming it; any other failure a ForeignFormatError naming the file."""
    with opened(path, path=path, kind=kind) as name:
        try:
            return torch.load(
                name, map_location=torch_map_location(map_location), weights_only=not allow_pickle
            )
        except MemoryError:
            raise
        except OSError as e:
            raise from_oserror(e, path, "cannot read") from None
        except Exception as e:  # a file from elsewhere: whatever its bytes make torch raise
            if isinstance(e, RuntimeError) and "deserialize object on" in str(e):
                line = str(e).splitlines()[0]
                raise CheckpointError(f"{path}: {line[:300]} (pass map_location)") from None
            raise refused(e, path, kind) or damaged(path, kind, e) from e


def torch_map_location(map_location: MapLocation) -> Any:
    """ckptguard's ``map_location`` as torch.load takes it: a callable there receives a storage
    and its saved location; a dict's values must be strings."""
    if isinstance(map_location, dict):
        return {str(k): str(v) for k, v in map_location.items()}
    if callable(map_location):
        mapped = map_location

        def restore(storage: Any, location: str) -> Any:
            return default_restore_location(storage, str(torch.device(mapped(location))))

        return restore
    return map_location
