"""Audit completeness: does a store's audit log account for every checkpoint it holds and every
one it held (docs/audit.md section 7)?

Every committed checkpoint (name and uuid) needs its ``commit`` entry; every checkpoint the log
saw committed that is gone needs its ``delete`` or ``prune`` entry, or a later ``commit`` of the
same name that replaced it (an overwrite). The fraction of those found is the metric; each one
missing is a gap, named. A gap is what a writer killed between an operation's commit point and
its audit append leaves (or an append that failed and was reported as a warning), and what
someone who removes entries and re-signs the log cannot hide from the store's own contents.
Also ``adopt``: an audit log started on a store that already holds checkpoints records them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import audit
from .commit import manifest_sha256
from .store import Store

__all__ = ["Completeness", "Gap", "adopt", "check", "init"]


@dataclass(frozen=True)
class Gap:
    """One event the log lacks: ``kind`` "commit" (a checkpoint in the store without its
    commit entry) or "delete" (a checkpoint the log saw committed, gone without an entry)."""

    kind: str
    name: str
    uuid: str | None
    reason: str


@dataclass
class Completeness:
    """``complete`` of ``total`` events have their entry; ``gaps`` lists the others."""

    store: str
    total: int
    complete: int
    gaps: list[Gap] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.complete / self.total if self.total else 1.0

    def to_json(self) -> dict:
        return {
            "store": self.store,
            "total": self.total,
            "complete": self.complete,
            "fraction": self.fraction,
            "gaps": [g.__dict__ for g in self.gaps],
        }


def check(store: str | os.PathLike) -> Completeness:
    """The completeness of ``store``'s audit log (module docstring). The entries are read with
    their own checks (``audit.read``); whether they are the ones the heads sealed is
    ``audit.verify``'s question."""
    st = Store(store)
    log, _ = audit.read(st.root)
    listed = st.scan().listed
    committed: dict[tuple[str, str], int] = {}  # (name, uuid) -> seq of its commit entry
    removed: set[tuple[str, str]] = set()
    replaced: set[tuple[str, str]] = set()
    live: dict[str, set[str]] = {}  # name -> uuids committed under it, not yet replaced
    for e in log.entries:
        key = (e["checkpoint"], e["uuid"])
        if e["op"] == "commit":
            uuids = live.setdefault(key[0], set())
            if e["detail"].get("overwrite"):
                replaced.update((key[0], u) for u in uuids if u != key[1])
                uuids.clear()
            uuids.add(key[1])
            committed[key] = e["seq"]
        elif e["op"] in ("delete", "prune"):
            removed.add(key)
    out = Completeness(st.root, 0, 0)
    present = {(i.name, i.uuid) for i in listed}
    for name, uuid in sorted(present):
        out.total += 1
        if (name, uuid) in committed:
            out.complete += 1
        else:
            out.gaps.append(Gap("commit", name, uuid, "in the store, no commit entry"))
    for (name, uuid), seq in sorted(committed.items(), key=lambda kv: kv[1]):
        if (name, uuid) in present:
            continue
        out.total += 1
        if (name, uuid) in removed or (name, uuid) in replaced:
            out.complete += 1
        else:
            out.gaps.append(
                Gap("delete", name, uuid, f"committed (entry {seq}), gone, no delete entry")
            )
    return out


def adopt(store: str | os.PathLike) -> int:
    """Record a ``commit`` entry (detail ``adopted``) for each checkpoint of ``store`` that has
    none; how many were recorded. For a log started on a store that holds checkpoints."""
    gaps = [g for g in check(store).gaps if g.kind == "commit"]
    st = Store(store)
    items: list[tuple[str, dict]] = []
    for g in gaps:
        kw = {
            "checkpoint": g.name,
            "uuid": g.uuid,
            "manifest_sha256": manifest_sha256(st.path(g.name)),
            "detail": {"adopted": True},
        }
        items.append(("commit", kw))
    if items:
        audit.append(st.root, items)
    return len(items)


def init(
    store: str | os.PathLike, key: str | os.PathLike | None = None, witness: str | None = None
) -> tuple[audit.Appended, int]:
    """``audit.init``, then ``adopt`` of the checkpoints the store already holds: (the first
    append, how many were adopted)."""
    first = audit.init(store, key, witness)
    return first, adopt(store)
