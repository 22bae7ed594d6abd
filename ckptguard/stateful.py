"""Stateful objects: anything with ``state_dict()`` and ``load_state_dict()`` (a module, an
optimizer, a scheduler, an application's own state), as PyTorch DCP accepts them.

A save stores such an object as what its ``state_dict()`` returns (``tree`` walks that in its
place). A load with a template holding one fills the template's ``state_dict()`` in place and
then hands the loaded state to the object's ``load_state_dict``: ``expand`` and ``restore``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Path = tuple[Any, ...]
"""Where an object lies in a tree of dicts, lists and tuples: its keys and indices."""


def is_stateful(obj: Any) -> bool:
    """Whether ``obj`` is an object (not a class) with callable ``state_dict`` and
    ``load_state_dict``: DCP's ``Stateful`` protocol."""
    if isinstance(obj, type):
        return False
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


def expand(obj: Any) -> tuple[Any, list[tuple[Path, Any]]]:
    """``obj`` with each stateful object in its dicts, lists and tuples replaced by its
    ``state_dict()`` (itself expanded), and where each was: (path, object), outermost first."""
    found: list[tuple[Path, Any]] = []

    def walk(x: Any, path: Path) -> Any:
        if is_stateful(x):
            found.append((path, x))
            return walk(x.state_dict(), path)
        if type(x) is dict:
            return {k: walk(v, (*path, k)) for k, v in x.items()}
        if type(x) is list:
            return [walk(v, (*path, i)) for i, v in enumerate(x)]
        if type(x) is tuple:
            return tuple(walk(v, (*path, i)) for i, v in enumerate(x))
        return x

    return walk(obj, ()), found


def restore(
    loaded: Any, found: list[tuple[Path, Any]], missing: Callable[[Path], Exception]
) -> Any:
    """Hand each stateful object of ``found`` (``expand``'s) the state loaded at its path and
    put the object there in its place; returns ``loaded`` (the object itself where one was at
    the root). The innermost are restored first, so an outer object's ``load_state_dict`` sees
    the inner ones restored. A path the loaded tree lacks raises ``missing(path)``."""
    for path, obj in reversed(found):
        obj.load_state_dict(_get(loaded, path, missing))
        loaded = _set(loaded, path, obj)
    return loaded


def _get(tree: Any, path: Path, missing: Callable[[Path], Exception]) -> Any:
    for depth, k in enumerate(path):
        try:
            tree = tree[k]
        except (KeyError, IndexError, TypeError):
            raise missing(path[: depth + 1]) from None
    return tree


def _set(tree: Any, path: Path, value: Any) -> Any:
    """``tree`` with ``value`` at ``path`` (a tuple on the way is rebuilt: it is immutable)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    inner = _set(tree[head], rest, value)
    if isinstance(tree, tuple):
        items = list(tree)
        items[head] = inner
        make = getattr(type(tree), "_make", None)  # a named tuple
        return make(items) if make is not None else tuple(items)
    tree[head] = inner
    return tree
