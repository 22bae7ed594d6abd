"""The user's classes an object tree may hold without pickle, what tree values may be set
elements and dict keys, and which numpy dtypes a tree names (docs/format.md sections 6, 6.2).

Dataclasses, enums and named tuples are stored by their qualified name and rebuilt only if the
loading process registered that very class (``register_types``), in the spirit of
``torch.serialization.add_safe_globals``: a load never imports a module or constructs a class
that was not registered, so the allowlist cannot name an arbitrary callable.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import threading
from typing import Any

import numpy as np

from .format import dtypes

_LOCK = threading.Lock()
_BY_NAME: dict[str, type] = {}

DATACLASS, ENUM, NAMEDTUPLE = "$dataclass", "$enum", "$namedtuple"


def qualified_name(cls: type) -> str:
    """``module.QualName``: the name a tree stores a class by."""
    return f"{cls.__module__}.{cls.__qualname__}"


def tag_of(cls: type) -> str | None:
    """The tree tag of a class that may be registered, or None."""
    if not isinstance(cls, type):
        return None
    if issubclass(cls, enum.Enum):
        return ENUM
    if dataclasses.is_dataclass(cls):
        return DATACLASS
    fields = getattr(cls, "_fields", None)
    if (
        issubclass(cls, tuple)
        and isinstance(fields, tuple)
        and all(type(f) is str for f in fields)
        and callable(getattr(cls, "_make", None))
    ):
        return NAMEDTUPLE
    return None


def init_fields(cls: type) -> list[str]:
    """The fields a dataclass stores: its ``__init__`` arguments, in declaration order."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


def register_types(*classes: type) -> None:
    """Allow these dataclasses, enum classes and named tuple classes in saved and loaded trees.

    The registry is process-wide and thread-safe. A class is stored by its qualified name
    (``module.QualName``) and a load rebuilds it only when the loading process registered a
    class of that name: register the same classes before ``load`` as before ``save``.
    Registering a class twice is harmless; two different classes of one qualified name are
    refused (ValueError). Anything but a dataclass, an enum class or a named tuple class is
    refused (TypeError), and so is a dataclass with ``init=False`` fields (its constructor could
    not restore them).
    """
    for cls in classes:
        tag = tag_of(cls)
        if tag is None:
            raise TypeError(
                f"register_types accepts dataclasses, enum classes and named tuple classes, not "
                f"{cls!r}"
            )
        if tag == DATACLASS:
            hidden = [f.name for f in dataclasses.fields(cls) if not f.init]
            if hidden:
                raise TypeError(
                    f"dataclass {qualified_name(cls)} has init=False fields {hidden}, which its "
                    "constructor cannot restore: save them another way (e.g. as a dict)"
                )
    with _LOCK:
        for cls in classes:
            name = qualified_name(cls)
            other = _BY_NAME.get(name)
            if other is not None and other is not cls:
                raise ValueError(f"another class named {name} is already registered")
        for cls in classes:
            _BY_NAME[qualified_name(cls)] = cls


def unregister_types(*classes: type) -> None:
    """Remove classes from the registry (those not registered are ignored)."""
    with _LOCK:
        for cls in classes:
            if _BY_NAME.get(qualified_name(cls)) is cls:
                del _BY_NAME[qualified_name(cls)]


def registered_types() -> list[type]:
    """The classes registered now, by qualified name."""
    with _LOCK:
        return [_BY_NAME[n] for n in sorted(_BY_NAME)]


def lookup(name: str) -> type | None:
    """The registered class of qualified name ``name``, or None."""
    with _LOCK:
        return _BY_NAME.get(name)


def is_registered(cls: type) -> bool:
    """Whether ``cls`` itself (not another class of its name) is registered."""
    return lookup(qualified_name(cls)) is cls


def how_to_register(name: str) -> str:
    """The advice that ends every refusal of an unregistered class."""
    short = name.rsplit(".", 1)[-1]
    return (
        f"call ckptguard.register_types({short}) (the class {name}) before save and load, or "
        "pass allow_pickle=True at save and at load"
    )


def hashable_value(x: Any) -> bool:
    """Whether ``x`` may be a set element or a non-str, non-int dict key: None, bool, int,
    float, complex, str, bytes, an enum member, or a tuple or frozenset of these."""
    t = type(x)
    if x is None or t in (bool, int, float, complex, str, bytes):
        return True
    if t is tuple or t is frozenset:
        return all(hashable_value(e) for e in x)
    return isinstance(x, enum.Enum)


_SCALAR_TAGS = frozenset({"$int", "$float", "$complex", "$bytes"})


def hashable_node(node: Any) -> bool:
    """Whether a stored JSON value has one of the shapes ``hashable_value`` allows (its
    members are checked by the decoder; the caller has decoded it, bounding its depth)."""
    if node is None or type(node) in (bool, int, float, str):
        return True
    if type(node) is not dict:
        return False
    if ENUM in node:
        return True
    if len(node) != 1:
        return False
    ((tag, v),) = node.items()
    if tag in _SCALAR_TAGS:
        return True
    if tag in ("$tuple", "$frozenset"):
        return isinstance(v, list) and all(hashable_node(e) for e in v)
    return False


def element_text(node: Any) -> str:
    """The canonical JSON text of a stored set element, which orders a set's elements."""
    return json.dumps(node, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def plain_fields(dt: Any) -> list[tuple[str, str]] | None:
    """The (name, dtype name) fields of a plain structured numpy dtype, or None: at least one
    field, each a scalar of a plain numeric dtype in native (or no) byte order, packed in order
    without padding or titles."""
    names = dt.names
    if not names:
        return None
    out, offset = [], 0
    for n in names:
        info = dt.fields[n]
        fd = info[0]
        plain = fd.names is None and fd.subdtype is None and (fd.isnative or fd.itemsize == 1)
        if len(info) != 2 or info[1] != offset or not plain or str(fd) not in PLAIN_NUMPY:
            return None
        out.append((n, str(fd)))
        offset += fd.itemsize
    return out if offset == dt.itemsize else None


PLAIN_NUMPY = frozenset(
    {"bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64"}
    | {"float16", "float32", "float64", "complex64", "complex128"}
)
"""The numpy dtypes of a tree's numpy scalars and structured fields (format.md section 6)."""
NUMPY_BY_NAME = {n: np.dtype(n) for n in dtypes.SIZES if n in PLAIN_NUMPY}
