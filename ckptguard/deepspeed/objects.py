"""DeepSpeed's few plain objects in a saved state, stored without pickle.

ZeRO's optimizer state holds its loss scaler, an instance of an ordinary class. Such an object
is saved as ``PlainObject`` (its class's qualified name and its attributes) and rebuilt on load
only if its class is one of those the caller allows: a load never constructs a class it was not
told of, as the tree's registered types (``register_types``) never do.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..errors import RegisteredTypeError, UnsupportedObjectError


@dataclass(frozen=True)
class PlainObject:
    """An object of an allowed class: ``cls``, its qualified name; ``state``, its ``__dict__``."""

    cls: str
    state: dict


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def to_plain(obj: Any, allowed: dict[str, type], path: str = "") -> Any:
    """``obj`` with each instance of an allowed class replaced by its ``PlainObject`` (the
    containers on the way rebuilt only where something inside changed)."""
    cls = type(obj)
    if qualified_name(cls) in allowed and allowed[qualified_name(cls)] is cls:
        state = vars(obj)
        if not all(type(k) is str for k in state):
            raise UnsupportedObjectError(
                f"{qualified_name(cls)} at {path!r} has attributes that are not strings", path
            )
        return PlainObject(qualified_name(cls), dict(state))
    return _map(obj, lambda v, p: to_plain(v, allowed, p), path)


def from_plain(obj: Any, allowed: dict[str, type], path: str = "") -> Any:
    """``obj`` with each ``PlainObject`` rebuilt as an instance of its class, which must be one
    of ``allowed`` (else RegisteredTypeError naming it and where)."""
    if type(obj) is PlainObject:
        cls = allowed.get(obj.cls)
        if cls is None:
            raise RegisteredTypeError(
                f"the checkpoint holds a {obj.cls} at {path!r}, which is not among the classes "
                f"this load rebuilds ({', '.join(sorted(allowed)) or 'none'})",
                path,
                obj.cls,
            )
        new: Any = object.__new__(cls)
        new.__dict__.update(obj.state)
        return new
    return _map(obj, lambda v, p: from_plain(v, allowed, p), path)


def _map(obj: Any, fn: Any, path: str) -> Any:
    """``obj`` with ``fn`` applied to the values of a dict, list or tuple (the same object where
    no value changed)."""
    cls = type(obj)
    if cls in (dict, OrderedDict):
        new = {k: fn(v, f"{path}/{k}") for k, v in obj.items()}
        if all(new[k] is v for k, v in obj.items()):
            return obj
        return new if cls is dict else OrderedDict(new)
    if cls in (list, tuple):
        items = [fn(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        return items if cls is list else tuple(items)
    return obj
