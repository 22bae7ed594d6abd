"""DCP's flat keys and ckptguard's object tree.

DCP flattens a state dict to keys such as ``optim.state.0.exp_avg`` (``fqn``), each with the
path it had (``("optim", "state", "0", "exp_avg")``: dict keys as strings, list indices as
ints). The checkpoint's tree nests the leaves back along those paths, so ``ckptguard.load`` of it
gives the state dict as the user passed it; a reader gets every key back from the tree alone by
DCP's own rule (``leaves``): a dict is always walked into; a list only if it holds a tensor, a
dict or a list walked into; anything else is a leaf. Where the paths cannot be nested so that
the rule finds them again, the tree is flat: ``{fqn: leaf}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

ObjPath = tuple[str | int, ...]

LIST_SLACK = 64
"""A list index may exceed the number of leaves by this much (holes DCP fills with None)."""


class NestingError(ValueError):
    """The paths do not nest into one tree that gives them back."""


def fqn(path: ObjPath) -> str:
    """DCP's flat key of a path: its parts joined by dots."""
    return ".".join(map(str, path))


def is_container(node: Any, torch_tensor: Callable[[Any], bool]) -> bool:
    """Whether a tree node is walked into (a dict of the tree, or a list holding a torch tensor
    or a container), not a leaf: ``leaves``' rule, DCP's ``traverse_state_dict``'s."""
    if _mapping(node) is not None:
        return True
    if type(node) is list:
        return any(torch_tensor(x) or is_container(x, torch_tensor) for x in node)
    return False


def leaves(tree: Any, torch_tensor: Callable[[Any], bool]) -> list[tuple[ObjPath, Any]]:
    """Every leaf of ``tree`` (a dict at the root) with its path, in tree order.
    ``torch_tensor(node)``: whether a node is a reference to a torch tensor."""
    out: list[tuple[ObjPath, Any]] = []

    def walk(node: Any, path: ObjPath) -> None:
        items = _mapping(node)
        if items is not None:
            for k, v in items:
                walk(v, (*path, k))
        elif type(node) is list and is_container(node, torch_tensor):
            for i, v in enumerate(node):
                walk(v, (*path, i))
        else:
            out.append((path, node))

    if _mapping(tree) is None:
        raise NestingError("the object tree is not a dict at the root: not a state dict")
    walk(tree, ())
    return out


def _mapping(node: Any) -> Iterable[tuple[str, Any]] | None:
    """The items of a tree node that is a dict to walk into, keys as DCP names them (str of
    the key); None for anything else. A tagged node (format.md section 6) is a value, except
    ``$dict``/``$odict`` whose keys are all strings or integers (an OrderedDict of a model,
    with or without its ``metadata``, which holds no tensor)."""
    if type(node) is not dict:
        return None
    if not any(k.startswith("$") for k in node):
        return node.items()
    pairs = node.get("$dict", node.get("$odict"))
    if len(node) != 1 + ("$odict" in node and "metadata" in node) or type(pairs) is not list:
        return None
    if not all(type(p) is list and len(p) == 2 and type(p[0]) in (str, int) for p in pairs):
        return None
    return ((str(k), v) for k, v in pairs)


def leaf_paths(fqns: Iterable[str], planner_data: Any) -> dict[str, ObjPath]:
    """Where each key goes in the tree: the path DCP's flattening mapping (``planner_data`` of
    DCP's default planner: fqn -> path) gives it, where that is one for every key (its parts
    joined by dots are the key; dict keys that are no tags; list indices in bounds); else each
    key at the top of a flat tree."""
    keys = list(fqns)
    flat: dict[str, ObjPath] = {f: (f,) for f in keys}
    if not isinstance(planner_data, Mapping):
        return flat
    bound = len(keys) + LIST_SLACK
    paths: dict[str, ObjPath] = {}
    for f in keys:
        p = planner_data.get(f)
        if not isinstance(p, (tuple, list)) or not p or type(p[0]) is not str:
            return flat
        for part in p:
            if type(part) is str and part.startswith("$"):
                return flat
            if type(part) is int and not 0 <= part < bound:
                return flat
            if type(part) not in (str, int):
                return flat
        if fqn(tuple(p)) != f:
            return flat
        paths[f] = tuple(p)
    return paths


def build(
    paths: dict[str, ObjPath], nodes: dict[str, Any], torch_tensor: Callable[[Any], bool]
) -> dict:
    """The tree holding ``nodes[f]`` at ``paths[f]`` (dicts for string parts, lists for
    integers, holes in a list None as DCP leaves them), checked to give exactly those leaves
    back by ``leaves``; NestingError if it does not."""
    root: dict = {}
    made = {id(root)}  # the containers made here: a leaf node is never written into
    for f, path in paths.items():
        _put(root, path, nodes[f], made)
    got = leaves(root, torch_tensor)
    want = {path: nodes[f] for f, path in paths.items()}
    if len(got) != len(want) or any(want.get(p, _MISSING) is not n for p, n in got):
        raise NestingError("the paths do not nest into a tree that gives them back")
    return root


_MISSING = object()


def _put(root: dict, path: ObjPath, node: Any, made: set[int]) -> None:
    """Set ``node`` at ``path`` under ``root``, making the containers on the way (their ids
    into ``made``)."""
    cur: Any = root
    for here, nxt in zip(path, path[1:], strict=False):
        fresh: Any = {} if type(nxt) is str else []
        cur = _slot(cur, here, fresh, path)
        if cur is fresh:
            made.add(id(fresh))
        elif id(cur) not in made:
            raise NestingError(f"a value and a container at {fqn(path)!r}")
    last = path[-1]
    if type(cur) is list and type(last) is int:
        cur.extend([None] * (last + 1 - len(cur)))
        if cur[last] is not None:
            raise NestingError(f"two values at {fqn(path)!r}")
        cur[last] = node
        return
    if type(cur) is not dict or type(last) is not str or last in cur:
        raise NestingError(f"two values at {fqn(path)!r}")
    cur[last] = node


def _slot(cur: Any, key: str | int, fresh: Any, path: ObjPath) -> Any:
    """The container at ``cur[key]``, made ``fresh`` if absent."""
    if type(cur) is dict and type(key) is str:
        got = cur.setdefault(key, fresh)
    elif type(cur) is list and type(key) is int:
        cur.extend([None] * (key + 1 - len(cur)))
        if cur[key] is None:
            cur[key] = fresh
        got = cur[key]
    else:
        raise NestingError(f"a value and a container at {fqn(path)!r}")
    if type(got) is not type(fresh):
        raise NestingError(f"a value and a container at {fqn(path)!r}")
    return got
