"""The names an export gives: the leaves of a checkpoint's object tree with their key parts, the
subtree a ``select`` names, and the check that no two leaves get one name.

The tree is the manifest's JSON encoding (docs/format.md section 6), already checked
(``tree.check_tree``): containers are JSON objects without tags, lists, ``$tuple``, ``$dict``,
``$odict``, ``$slice``, the fields of ``$namespace``, ``$dataclass`` and ``$namedtuple``, and
the members of ``$sparse`` and ``$quantized`` named as their key paths name them; every other
node is a leaf (``{"$tensor": id}`` or a value).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import ExportError
from ..format.treeids import QUANTIZED_PARTS
from ..treetypes import element_text


@dataclass(frozen=True)
class Leaf:
    """A node of the object tree that is no container: its key parts and its JSON node."""

    parts: tuple[str, ...]
    node: Any

    @property
    def tensor(self) -> int | None:
        """The tensor id this leaf references, or None for any other value."""
        n = self.node
        return n["$tensor"] if isinstance(n, dict) and set(n) == {"$tensor"} else None


def children(node: Any) -> list[tuple[str, Any]] | None:
    """The (key part, child) pairs of a container node, keys as ``str`` (a list's and a
    tuple's: the index); None for a leaf."""
    if isinstance(node, list):
        return [(str(i), v) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return None
    tags = [k for k in node if k.startswith("$")]
    if not tags:
        return list(node.items())
    if tags[0] in ("$tuple", "$slice"):
        return [(str(i), v) for i, v in enumerate(node[tags[0]])]
    if tags[0] in ("$dict", "$odict"):
        return [(_key_part(k), v) for k, v in node[tags[0]]]
    if tags[0] == "$namespace":  # its attributes, as the tensor key paths name them
        return children(node["$namespace"])
    if tags[0] in ("$dataclass", "$namedtuple"):
        return children(node["fields"])
    if tags[0] == "$sparse":  # its part tensors, named as their key paths name them
        names = ("indices", "values") if node["$sparse"] == "coo" else _CSR_PARTS
        return list(zip(names, node["parts"], strict=True))
    if tags[0] == "$quantized":  # its integer values and parameters, by member name
        return [(m, node[m]) for m in (*QUANTIZED_PARTS, "qscheme", "axis")]
    return None


_CSR_PARTS = ("crow_indices", "col_indices", "values")


def _key_part(k: Any) -> str:
    """A ``$dict`` key as a key path names it (format.md sections 6 and 6.2)."""
    return str(k) if type(k) in (str, int) else element_text(k)


def leaves(node: Any, parts: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every leaf under ``node`` in tree order (an empty container has none)."""
    kids = children(node)
    if kids is None:
        yield Leaf(parts, node)
        return
    for k, v in kids:
        yield from leaves(v, (*parts, k))


def escape(part: str) -> str:
    """A key part as ckptguard's keys spell it ("%" as "%25", "/" as "%2F")."""
    return part.replace("%", "%25").replace("/", "%2F")


def unescape(part: str) -> str:
    """The key part that ``escape`` spelled ``part``."""
    return re.sub("%(25|2F)", lambda m: "%" if m[1] == "25" else "/", part)


def key(parts: Iterable[str]) -> str:
    """Key parts as ckptguard's keys join them (``ckptguard info`` shows them so)."""
    return "/".join(map(escape, parts))


def subtree(tree: Any, prefix: str | None, path: str) -> Any:
    """The node of ``tree`` at key ``prefix`` (parts "/"-separated and escaped as ckptguard's
    keys); the whole tree for None or "". ExportError, listing the keys there, if it is not
    there. ``path`` names the checkpoint in the error."""
    node = tree
    parts = [unescape(p) for p in prefix.strip("/").split("/")] if prefix else []
    for i, part in enumerate(parts):
        kids = children(node) or []
        match = [v for k, v in kids if k == part]
        if not match:
            where = key(parts[:i]) or "the root"
            keys = ", ".join(repr(k) for k, _ in kids[:10]) or "none"
            more = ", ..." if len(kids) > 10 else ""
            raise ExportError(
                f"select {prefix!r}: no key {part!r} under {where} in {path} (the keys there: "
                f"{keys}{more})",
                path,
            )
        node = match[0]
    return node


def check_names(pairs: Iterable[tuple[Any, tuple[str, ...]]], what: str, path: str) -> None:
    """ExportError if two leaves of checkpoint ``path`` get one name (``pairs``: the name each
    gets and its key parts)."""
    seen: dict[Any, tuple[str, ...]] = {}
    for name, parts in pairs:
        if name in seen:
            raise ExportError(
                f"{what} {name!r} would name both {key(seen[name])!r} and {key(parts)!r} of "
                f"{path}: export a subtree (select) or rename one",
                path,
            )
        seen[name] = parts
