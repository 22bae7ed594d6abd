"""The agents' vote on each commit, in order: reported by every rank, and node-local or whole.

Every trainer reports its commits to its own agent. With ``--protect`` or ``--drain-to``, the
agents vote on the next commit in order on each tick: whether every rank has reported it, and
whether each rank's directory of it is a node-local part (it lacks data files of ranks on other
nodes) or a whole checkpoint (a shared store). The outcome is the same on every agent, so what
the agents then do with a commit (protect it, drain it alone or together) is too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ..errors import CheckpointError
from ..fsutil import read_manifest

# The slots the vote adds to the agents' MAX-reduced vector, from its first slot on: the next
# commit is missing here, a node-local part here, whole here; commits here undecided; a drain of
# node-local checkpoints still running here.
MISSING, PART, WHOLE, UNDECIDED, DRAINING = range(5)
SLOTS = 5


class Decision(NamedTuple):
    """A commit every rank reported, and whether every rank holds a node-local part of it."""

    path: str  # this rank's directory of it
    part: bool


def is_part(checkpoint: str) -> bool:
    """Whether ``checkpoint`` is a node-local part: its manifest lists a data file it lacks."""
    _, body = read_manifest(checkpoint)
    return any(not os.path.lexists(os.path.join(checkpoint, f["name"])) for f in body["files"])


class Votes:
    """One agent's side of the vote; ``vote`` and ``decide`` are called on every tick."""

    def __init__(self, rank: int, log: Callable[[str], None]) -> None:
        self.rank, self.log = rank, log
        self.next = 0  # the index of the next commit to decide on, the same on every agent
        self._looked: tuple[int, int] | None = None  # (index, PART or WHOLE) of a commit seen

    def vote(self, paths: Sequence[str]) -> list[int]:
        """This rank's view of the next commit: missing, a node-local part, or whole."""
        vec = [0] * SLOTS
        if len(paths) <= self.next:
            vec[MISSING] = 1
            return vec
        vec[UNDECIDED] = 1  # the agents go on until every commit reported is decided
        if self._looked is None or self._looked[0] != self.next:  # once per commit
            try:
                kind = PART if is_part(paths[self.next]) else WHOLE
            except (CheckpointError, OSError) as e:  # gone or damaged: nothing to act on here
                self.log(f"{paths[self.next]}: cannot read its manifest ({e})")
                kind = WHOLE
            self._looked = (self.next, kind)
        vec[self._looked[1]] = 1
        return vec

    def decide(
        self, votes: Sequence[int], paths: Sequence[str], trainers_done: bool
    ) -> Decision | None:
        """The next commit, once every rank has reported it (the same on every rank). Once
        every trainer has ended, a commit some rank never reported never will be: it is
        skipped, as is one that is a node-local part on some ranks only."""
        if votes[MISSING]:
            if trainers_done and votes[UNDECIDED]:
                self.next += 1
                if self.rank == 0:
                    self.log(f"commit {self.next} was not reported by every rank; left alone")
            return None
        path = paths[self.next]
        self.next += 1
        if votes[WHOLE] and votes[PART]:
            if self.rank == 0:
                self.log(f"{path}: a node-local part on some ranks only; left alone")
            return None
        return Decision(path, part=bool(votes[PART]))
