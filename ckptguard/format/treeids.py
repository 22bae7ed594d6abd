"""The tensor references of a stored object tree (docs/format.md section 6): pure JSON, no torch,
so the format package and the steps that merge or read trees share one walker of them."""

from __future__ import annotations

from typing import Any


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
