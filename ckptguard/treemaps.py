"""The mappings of the object tree (docs/format.md sections 6 and 6.2): a dict or OrderedDict
encoded as a JSON object or as ``$dict``/``$odict`` pairs, its keys, an OrderedDict's
``_metadata`` (``nn.Module.state_dict()`` keeps each module's version there, which
``load_state_dict`` passes on), and the key paths that pass through a mapping.

``tree`` encodes with ``encode`` and ``treeload`` decodes with ``decode``; each passes its own
walker, which builds the values inside.
"""

from __future__ import annotations

import collections
from typing import Any, Protocol

from . import treetypes
from .errors import UnsupportedObjectError

METADATA = "metadata"
"""The member of an ``$odict`` that holds the OrderedDict's ``_metadata`` attribute."""
_ATTRIBUTE = "_metadata"
_PLAIN_SCALAR_TAGS = frozenset({"$int", "$float", "$bytes"})
_MAPPING_TAGS = ("$dict", "$odict")


class Walker(Protocol):
    """The save side's walker (``tree._Flattener``) as a mapping uses it."""

    tensors_only: bool

    def walk(self, obj: Any, path: str, depth: int) -> Any: ...

    def check_hashable(self, x: Any, path: str, what: str) -> None: ...


class Builder(Protocol):
    """The load side's walker (``treeload._Builder``) as a mapping uses it."""

    types: bool

    def build(self, node: Any, depth: int) -> Any: ...

    def hashable(self, node: Any, sub: int, what: str) -> Any: ...


class MetadataError(ValueError):
    """A stored ``metadata`` member that is not allowed where it is (``node``: the mapping that
    has it); the load side adds the mapping's key path."""

    def __init__(self, message: str, node: dict) -> None:
        super().__init__(message)
        self.node = node


def join(path: str, k: Any) -> str:
    """``path`` extended by dict key or list index ``k``, escaped (format.md section 6)."""
    part = str(k).replace("%", "%25").replace("/", "%2F")
    return f"{path}/{part}" if path else part


def key_text(key_node: Any) -> Any:
    """A stored key's key path part: a str or int as it is, another key its canonical JSON
    text (format.md section 6.2)."""
    return key_node if type(key_node) in (str, int) else treetypes.element_text(key_node)


def plain_value(node: Any) -> bool:
    """Whether a stored JSON value is a plain value, which an ``$odict``'s ``metadata`` must be:
    null, a boolean, number or string, an array or plain object of plain values, ``$int``,
    ``$float``, ``$bytes``, or a ``$tuple``/``$dict``/``$odict`` (without ``metadata``) of plain
    values and string or integer keys. No tensor, pickle or type of section 6.2 at any depth."""
    if node is None or type(node) in (bool, int, float, str):
        return True
    if type(node) is list:
        return all(plain_value(x) for x in node)
    if type(node) is not dict:
        return False
    if not any(k.startswith("$") for k in node):
        return all(plain_value(x) for x in node.values())
    if len(node) != 1:
        return False
    ((tag, v),) = node.items()
    if tag in _PLAIN_SCALAR_TAGS:
        return True
    if tag == "$tuple":
        return type(v) is list and all(plain_value(x) for x in v)
    if tag in _MAPPING_TAGS:
        return type(v) is list and all(
            type(p) is list and len(p) == 2 and type(p[0]) in (str, int) and plain_value(p[1])
            for p in v
        )
    return False


def encode(w: Walker, obj: dict, path: str, depth: int, ordered: bool) -> Any:
    """The JSON value of a dict (``ordered``: an OrderedDict), its values walked by ``w``."""
    if all(type(k) is str or type(k) is int for k in obj):
        items = [(k, w.walk(v, join(path, k), depth + 1)) for k, v in obj.items()]
        if not ordered and all(type(k) is str and not k.startswith("$") for k, _ in items):
            return dict(items)
        pairs = [[k, v] for k, v in items]
    else:
        pairs = []
        for k, v in obj.items():
            if type(k) is str or type(k) is int:
                pairs.append([k, w.walk(v, join(path, k), depth + 1)])
                continue
            # A hashable value; its key path part is the canonical JSON text of its stored form.
            w.check_hashable(k, join(path, repr(k)), "dict key")
            node = w.walk(k, join(path, repr(k)), depth + 1)
            pairs.append([node, w.walk(v, join(path, key_text(node)), depth + 1)])
    out: dict = {"$odict" if ordered else "$dict": pairs}
    attrs = getattr(obj, "__dict__", None) if ordered and not w.tensors_only else None
    if attrs and _ATTRIBUTE in attrs:  # a template's metadata holds no tensor to fill
        out[METADATA] = _metadata(w, attrs[_ATTRIBUTE], path, depth)
    return out


def _metadata(w: Walker, value: Any, path: str, depth: int) -> Any:
    """The ``metadata`` member of the OrderedDict at ``path``: its ``_metadata`` attribute, a
    plain value (else UnsupportedObjectError naming the key path)."""
    node = w.walk(value, join(path, _ATTRIBUTE), depth + 1)
    if not plain_value(node):
        raise UnsupportedObjectError(
            f"the _metadata attribute of the OrderedDict at {path or '<root>'!r} holds a value "
            "that is not None, bool, int, float, str or bytes, or a list, tuple or dict of these "
            "with str or int keys (a tensor, set, class or pickle): it cannot be saved; delete "
            "the attribute or convert it",
            key_path=path,
        )
    return node


def decode(b: Builder, tag: str, node: dict, sub: int) -> dict:
    """A ``$dict``/``$odict``: its ``[key, value]`` pairs, keys pairwise distinct; str and int
    keys as they are, others (feature ``tree-types``) hashable tree values; a ``$dict`` has a
    key a plain object cannot hold (not a str, or a str starting with ``$``). An ``$odict``'s
    ``metadata`` (feature ``tree-types``) becomes the OrderedDict's ``_metadata``."""
    v = node[tag]
    if not isinstance(v, list) or not all(isinstance(p, list) and len(p) == 2 for p in v):
        raise ValueError(f"malformed {tag} in tree")
    out: dict = {} if tag == "$dict" else collections.OrderedDict()
    plain = True
    k: Any
    for kn, x in v:
        if type(kn) is str:
            k = kn
            plain = plain and not kn.startswith("$")
        elif type(kn) is int:
            k, plain = kn, False
        else:
            k, plain = b.hashable(kn, sub, f"{tag} key"), False
        out[k] = b.build(x, sub)
    if len(out) != len(v):
        raise ValueError(f"{tag} has a key twice")
    if tag == "$dict" and plain:
        raise ValueError("$dict whose keys are all plain strings (must be a JSON object)")
    if METADATA in node:
        if tag != "$odict" or not b.types:
            raise MetadataError(f"{tag} with metadata (only an $odict under tree-types)", node)
        value = b.build(node[METADATA], sub)  # bounds the depth before the plain check
        if not plain_value(node[METADATA]):
            raise MetadataError("$odict metadata is not a plain value (format.md 6.2)", node)
        setattr(out, _ATTRIBUTE, value)
    return out


def node_children(node: dict, path: str) -> list[tuple[Any, str]] | None:
    """The (JSON value, key path) of what a ``$dict``/``$odict`` node holds (keys found at
    their value's path; ``metadata`` holds no tensor and is not descended into); None for any
    other node."""
    tag = next(iter(node))
    v = node[tag]
    if tag not in _MAPPING_TAGS or not isinstance(v, list):
        return None
    return [(x, join(path, key_text(p[0]))) for p in v for x in p]
