"""Per-rank object trees as diffs against rank 0's (feature ``rank-tree-diffs``, docs/format.md
section 6.1): how a writer computes them from tree texts, and how a reader checks and applies them.
"""

from __future__ import annotations

import json
from typing import Any

from .datafile import FormatError

RANK_TREE_DIFFS = "rank-tree-diffs"
"""Feature: each value of ``rank_trees`` is a diff against ``tree`` (format.md section 6.1)."""
MAX_DIFF_PATH = 2048


def _step_key(step: Any) -> tuple:
    return (0, step, "") if type(step) is int else (1, 0, step)


def check_diff(tree: Any, diff: Any, what: str) -> None:
    """A diff's entries are ``[path, value]``, each path resolves in ``tree`` (the JSON form of
    rank 0's tree) and none equals or is a prefix of another. Linear in the paths' total length
    (plus a sort): the reconstructed tree itself is checked where it is used."""
    if not isinstance(diff, list) or not diff:
        raise FormatError(f"{what} is not a non-empty list of diff entries")
    keys = []
    for i, entry in enumerate(diff):
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], list):
            raise FormatError(f"{what}[{i}] is not a [path, value] pair")
        path = entry[0]
        if len(path) > MAX_DIFF_PATH:
            raise FormatError(f"{what}[{i}]: path longer than {MAX_DIFF_PATH} steps")
        node = tree
        for step in path:
            in_dict = type(step) is str and isinstance(node, dict) and step in node
            if not in_dict and not (
                type(step) is int and isinstance(node, list) and 0 <= step < len(node)
            ):
                raise FormatError(f"{what}[{i}]: path {path[:16]!r} is not in the tree")
            node = node[step]
        keys.append(tuple(_step_key(s) for s in path))
    keys.sort()
    for a, b in zip(keys, keys[1:], strict=False):  # a prefix sorts right before an extension
        if b[: len(a)] == a:
            raise FormatError(f"{what}: two paths overlap (one equals or contains the other)")


def apply_diff(tree: Any, diff: list) -> Any:
    """``tree`` with each entry's path replaced by its value. Only the containers on the paths
    are copied; the rest is shared with ``tree``, which is left as it was."""
    root: Any = tree
    fresh: set[int] = set()  # ids of the containers copied so far (alive in the result)
    for path, value in diff:
        if not path:
            return value
        if id(root) not in fresh:
            root = root.copy()
            fresh.add(id(root))
        node = root
        for step in path[:-1]:
            child = node[step]
            if id(child) not in fresh:
                child = child.copy()
                fresh.add(id(child))
                node[step] = child
            node = child
        node[path[-1]] = value
    return root


def rank_tree(doc: dict, rank: int) -> Any:
    """The JSON tree of ``rank``: its entry of ``rank_trees`` (a whole tree, or under
    rank-tree-diffs a diff applied to ``tree``), else rank 0's ``tree``."""
    if str(rank) not in doc["rank_trees"]:
        return doc["tree"]
    value = doc["rank_trees"][str(rank)]
    if RANK_TREE_DIFFS in doc["features"]:
        return apply_diff(doc["tree"], value)
    return value


_CONTAINER_TAGS = ("$tuple", "$dict", "$odict")
# The member names of the tagged values a diff descends into: the containers, and an $odict
# with its metadata (format.md section 6.2), whose pairs and metadata are addressed apart.
_DESCENDED = ({"$tuple"}, {"$dict"}, {"$odict"}, {"$odict", "metadata"})


def diff_anchor(tree: Any, path: list) -> tuple[int, int]:
    """Where to re-check a tree after replacing the value at ``path``: ``(k, depth)``, the
    deepest prefix ``path[:k]`` that is a value of the tree (section 6: the root, a list element,
    a plain object member, a ``$tuple`` element or a ``$dict``/``$odict`` value, not inside an
    ``$odict``'s metadata, whose checks depend on where it is), and its nesting depth. Whether a
    tree is valid depends on each value alone, given its depth and the validity of the values
    inside it: re-checking that one value at that depth checks the replacement."""
    node, depth, k = tree, 0, 0
    anchor = (0, 0)
    while k < len(path):
        step = path[k]
        plain = isinstance(node, dict) and not any(m.startswith("$") for m in node)
        if isinstance(node, list) or plain:
            node, k = node[step], k + 1
        elif isinstance(node, dict) and set(node) in _DESCENDED and step in _CONTAINER_TAGS:
            items = node[step]
            if k + 1 >= len(path) or not isinstance(items, list):
                break
            if step == "$tuple":
                node, k = items[path[k + 1]], k + 2
            else:
                pair = items[path[k + 1]]
                if k + 2 >= len(path) or path[k + 2] != 1 or not isinstance(pair, list):
                    break
                if len(pair) != 2:
                    break
                node, k = pair[1], k + 3
        else:
            break
        depth += 1
        anchor = (k, depth)
    return anchor


class _Mismatch(Exception):
    """A container's members differ from the base's (names, order or count)."""


# A member of a container in the base text: (name or position, the text before its value:
# ``"name":`` or nothing, where its value lies).
_Item = tuple["str | int", str, "_Node"]


class _Node:
    """Where a value of the base text lies; ``items`` for a container the diff descends into:
    (step, the text before the value: ``"name":`` or nothing, node)."""

    __slots__ = ("start", "end", "items", "text")
    start: int
    end: int
    items: list[_Item] | None
    text: str | None  # the base's text of the value, cut out on first use

    def __init__(self, start: int, end: int, items: list | None) -> None:
        self.start, self.end, self.items, self.text = start, end, items, None


class TextDiffer:
    """Diffs of JSON texts against one base text, as ``rank_trees`` entries (section 6.1).

    Texts are compact ASCII JSON (``json.dumps(v, separators=(",", ":"))``, as ranks send their
    trees). The base is indexed once; a text is then compared with it piece by piece: a value
    whose text equals the base's is skipped unparsed, and only the values that differ are
    parsed, from their exact text (so 1, 1.0 and true stay apart, as do 0.0 and -0.0). Objects
    with the same member names in the same order, arrays of the same length and
    ``$tuple``/``$dict``/``$odict`` values (an ``$odict``'s pairs and metadata) are descended
    into; other values, and containers
    whose entries would be longer than the container, are replaced whole.
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self._dec = json.JSONDecoder()
        self.root = self._index(0)
        if self.root.end != len(base):
            raise ValueError("trailing text after the JSON value")

    def _index(self, pos: int) -> _Node:
        s = self.base
        if s[pos] not in "{[":
            return _Node(pos, self._dec.raw_decode(s, pos)[1], None)
        close = "}" if s[pos] == "{" else "]"
        items: list = []
        p = pos + 1
        while s[p] != close:
            if items:
                p += 1  # ","
            if close == "}":
                name, k = self._dec.raw_decode(s, p)
                child = self._index(k + 1)  # after ":"
                items.append((name, s[p : k + 1], child))
            else:
                child = self._index(p)
                items.append((len(items), "", child))
            p = child.end
        node = _Node(pos, p + 1, items)
        names = [step for step, _, _ in items] if close == "}" else []
        if any(n.startswith("$") for n in names) and set(names) not in _DESCENDED:
            node.items = None  # a tagged value ($tensor, $npscalar, ...): replaced whole
        return node

    def diff(self, text: str) -> list:
        """Entries turning the base into ``text`` (empty when they are the same)."""
        out: list = []
        self._walk(text, self.root, 0, [], out, [])
        return out

    def _walk(self, s: str, node: _Node, q: int, path: list, out: list, cost: list) -> int:
        """Add the entries for the value at ``q`` of ``s`` (the base's ``node``); return where
        that value ends. ``cost`` holds each entry's approximate encoded size."""
        text = node.text
        if text is None:
            text = node.text = self.base[node.start : node.end]
        e = q + len(text)
        if s.startswith(text, q) and (e == len(s) or s[e] in ",]}"):
            return e  # the same text, and it ends where the base's value does
        if node.items is not None and s[q] == self.base[node.start]:
            mark = len(out)
            try:
                end = self._members(s, node.items, q, path, out, cost)
            except _Mismatch:
                del out[mark:], cost[mark:]
            else:
                here = sum(len(str(x)) + 3 for x in path) + 4
                if len(out) - mark <= 1 or sum(cost[mark:]) <= here + end - q:
                    return end
                del out[mark:], cost[mark:]
                out.append([path, json.loads(s[q:end])])
                cost.append(here + end - q)
                return end
        value, end = self._dec.raw_decode(s, q)
        out.append([path, value])
        cost.append(sum(len(str(x)) + 3 for x in path) + 4 + end - q)
        return end

    def _members(
        self, s: str, items: list[_Item], q: int, path: list, out: list, cost: list
    ) -> int:
        """Walk the members of the container at ``q`` of ``s`` against the base's ``items``;
        raise _Mismatch when their names, order or number differ."""
        close = "}" if s[q] == "{" else "]"
        p = q + 1
        for i, (step, head, child) in enumerate(items):
            if i:
                if s[p] != ",":
                    raise _Mismatch
                p += 1
            if head:
                if not s.startswith(head, p):
                    raise _Mismatch
                p += len(head)
            elif s[p] == close:
                raise _Mismatch
            p = self._walk(s, child, p, [*path, step], out, cost)
        if s[p] != close:
            raise _Mismatch
        return p + 1
