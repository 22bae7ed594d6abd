"""Parts of a checkpoint: what one saved rank stored under a few top-level keys of its object
tree, loaded (and verified) without the rest.

A framework that writes one file per rank (DeepSpeed) or one object per shard (Megatron-Core's
``ShardedObject``) saves each rank's state as ``{file or object name: value}`` in one
checkpoint; on load, every rank may ask for any name, whichever rank saved it, and only the
chunks of that name's tensors are read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from .errors import CheckpointNotFoundError, UnsupportedObjectError
from .format.layout import MANIFEST
from .format.ranktrees import rank_tree
from .format.treeids import TREE_TYPES, tensor_ids
from .loader import iter_tensors
from .open import CheckpointReader
from .tree import TreeError, unflatten


class PartNotFoundError(CheckpointNotFoundError):
    """The checkpoint holds no entry of that name on any saved rank."""


class Parts:
    """A checkpoint open for loading its saved ranks' top-level entries by name.

    Each saved rank's tree must be a mapping of names (what ``save`` stores for a dict with
    string keys), or, with ``within``, hold one under that top-level key (a rank without it has
    no names). ``owners`` says which rank saved each name (the lowest, where several did).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        verify: bool = True,
        allow_pickle: bool = False,
        within: str | None = None,
    ) -> None:
        self.reader = CheckpointReader(path)
        self.verify = verify
        self.allow_pickle = allow_pickle
        self.within = within
        try:
            self._trees = [self._tree(r) for r in range(self.reader.manifest["world_size"])]
        except BaseException:
            self.reader.close()
            raise
        self.owners: dict[str, int] = {}
        for rank, tree in enumerate(self._trees):
            for name in tree:
                self.owners.setdefault(name, rank)

    def _tree(self, rank: int) -> dict:
        tree = rank_tree(self.reader.manifest, rank)
        if self.within is not None and _plain(tree):
            tree = tree.get(self.within, {})
        if not _plain(tree):
            where = f" under {self.within!r}" if self.within is not None else ""
            raise UnsupportedObjectError(
                f"{self.reader.path}: rank {rank} saved no mapping of names{where} (not a dict "
                "of str keys), so it has no parts to load by name",
                self.within or "",
            )
        return tree

    def load(self, names: Iterable[str]) -> dict[str, Any]:
        """The values saved under ``names``, each as the rank that saved it passed it, tensors
        on the CPU; PartNotFoundError names a missing one."""
        wanted = list(dict.fromkeys(names))
        missing = [n for n in wanted if n not in self.owners]
        if missing:
            have = sorted(self.owners)
            raise PartNotFoundError(
                f"{self.reader.path} holds no {', '.join(map(repr, missing))} on any of its "
                f"{len(self._trees)} saved ranks (it holds {len(have)}: "
                f"{', '.join(map(repr, have[:8]))}{', ...' if len(have) > 8 else ''})"
            )
        if "pickle" in self.reader.features and not self.allow_pickle:
            raise UnsupportedObjectError(
                f"{self.reader.path} contains pickled objects; load it with allow_pickle=True "
                "only if you trust where it came from",
                "",
            )
        out: dict[str, Any] = {}
        by_rank: dict[int, list[str]] = {}
        for n in wanted:
            by_rank.setdefault(self.owners[n], []).append(n)
        for rank, ns in by_rank.items():
            out.update(self._load_rank(rank, ns))
        return {n: out[n] for n in wanted}

    def _load_rank(self, rank: int, names: list[str]) -> dict[str, Any]:
        part = {n: self._trees[rank][n] for n in names}
        ids = tensor_ids(part)
        values: list[Any] = [None] * len(self.reader.tensors)
        bad = [g for g in ids if not 0 <= g < len(values)]
        if bad:
            raise self.reader.corrupt(
                f"object tree references tensor {bad[0]}, which does not exist", file=MANIFEST
            )
        for gid, t in iter_tensors(self.reader, ids, rank, self.verify):
            values[gid] = t
        types = TREE_TYPES in self.reader.features
        try:
            return unflatten(part, values, allow_pickle=self.allow_pickle, types=types)
        except TreeError as e:
            raise self.reader.corrupt(f"object tree is malformed: {e}", file=MANIFEST) from None

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Parts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(tree: Any) -> bool:
    """Whether a JSON tree node is a plain object (a dict whose keys are str, none with '$')."""
    return isinstance(tree, dict) and not any(k.startswith("$") for k in tree)
