"""The tensor references of a stored object tree (docs/format.md section 6): pure JSON, no torch,
so the format package and the steps that merge or read trees share one walker of them."""

from __future__ import annotations

from typing import Any

from .dtypes import QUANTIZED_NAMES


def remap_tensor_ids(tree: Any, ids: list[int]) -> Any:
    """The same JSON tree with each ``{"$tensor": i}`` replaced by ``{"$tensor": ids[i]}``."""
    if isinstance(tree, list):
        return [remap_tensor_ids(v, ids) for v in tree]
    if isinstance(tree, dict):
        if set(tree) == {"$tensor"}:
            return {"$tensor": ids[tree["$tensor"]]}
        return {k: remap_tensor_ids(v, ids) for k, v in tree.items()}
    return tree


def tensor_ids(tree: Any) -> list[int]:
    """The tensor ids a JSON tree references, in order of first reference."""
    seen: dict[int, None] = {}
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))
        elif isinstance(node, dict):
            ref = node.get("$tensor") if len(node) == 1 else None
            if type(ref) is int:
                seen.setdefault(ref, None)
            else:
                stack.extend(reversed(list(node.values())))
    return list(seen)


TREE_TYPES = "tree-types"
"""Feature: the tree holds the tags of format.md section 6.2 or dict keys other than str and int."""
TYPE_TAGS = frozenset(
    {
        "$set",
        "$frozenset",
        "$complex",
        "$slice",
        "$path",
        "$namespace",
        "$dataclass",
        "$enum",
        "$namedtuple",
        "$meta",
        "$sparse",
        "$structured",
        "$quantized",
    }
)
QUANTIZED_PARTS = ("int_repr", "scale", "zero_point")
"""The members of a ``$quantized`` value that are (per channel) its tensors, which are also
their key path parts."""


def uses_tree_types(*trees: Any) -> bool:
    """Whether any of these JSON trees (or rank-tree diffs) needs the feature ``tree-types``:
    it has a tag of ``TYPE_TAGS``, a ``$dtype`` of a quantized dtype, a ``$dict``/``$odict``
    key that is not a str or int, or an ``$odict`` with ``metadata``."""
    stack = list(trees)
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if len(node) == 1 and "$tensor" in node:
                continue
            if not TYPE_TAGS.isdisjoint(node) or node.get("$dtype") in QUANTIZED_NAMES:
                return True
            if "$odict" in node and "metadata" in node:
                return True
            pairs = node.get("$dict", node.get("$odict"))
            if isinstance(pairs, list) and any(
                isinstance(p, list) and p and type(p[0]) not in (str, int) for p in pairs
            ):
                return True
            stack.extend(node.values())
    return False
