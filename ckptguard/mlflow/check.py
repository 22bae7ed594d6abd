"""The metadata-artifact consistency of an MLflow store: its references against a file tree.

A reference is consistent when its URI resolves (refs.Resolver) to files under the roots: a
required one (a ready model version or logged model) to a regular file or a directory holding
at least one; an optional one (an experiment's or run's directory) to a directory or to nothing
yet (counted as ``empty``: MLflow creates the directory with the first artifact). Anything else
is dangling, with the reason. Orphans are the files and directories under the roots that no
reference reaches, reported at the first level no reference lies in: an experiment's directory
no row names, a run's or logged model's directory inside a known experiment that no row names,
a stray file beside them. ``check_consistency`` reads the tree only (no link is followed,
nothing written); ``Report.to_json`` is what ``ckptguard mlflow check`` prints.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ArtifactReferenceError
from .refs import Ref, Resolver, Roots


@dataclass(frozen=True)
class Dangling:
    """A reference that does not resolve to files: ``path`` where it resolved to one (else
    None), ``reason`` in words."""

    ref: Ref
    path: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {**self.ref.to_json(), "path": self.path, "reason": self.reason}


@dataclass
class Report:
    """The outcome of ``check_consistency``: counts, the dangling references, the orphan paths."""

    roots: tuple[str, ...]
    references: int = 0
    consistent: int = 0
    empty: int = 0
    dangling: list[Dangling] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)

    @property
    def fraction_consistent(self) -> float:
        """Consistent references over all of them (1.0 for none)."""
        return self.consistent / self.references if self.references else 1.0

    @property
    def ok(self) -> bool:
        """Every reference resolves and every artifact is referenced."""
        return not self.dangling and not self.orphans

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "roots": list(self.roots),
            "references": self.references,
            "consistent": self.consistent,
            "empty": self.empty,
            "fraction_consistent": self.fraction_consistent,
            "dangling": [d.to_json() for d in self.dangling],
            "orphans": list(self.orphans),
        }


def check_consistency(refs: Iterable[Ref], roots: Roots) -> Report:
    """Check ``refs`` (one snapshot's) against the files under ``roots``."""
    refs = tuple(refs)
    resolver = Resolver(refs, roots)
    report = Report(roots=roots.all(), references=len(refs))
    resolved: list[tuple[Ref, str]] = []
    for ref in refs:
        try:
            path = resolver.resolve(ref.uri)
        except ArtifactReferenceError as e:
            report.dangling.append(Dangling(ref, None, str(e)))
            continue
        resolved.append((ref, path))
        problem = _problem(ref, path)
        if problem is None:
            report.consistent += 1
            report.empty += not ref.required and not os.path.lexists(path)
        else:
            report.dangling.append(Dangling(ref, path, problem))
    report.orphans = orphans(resolved, roots)
    return report


def _problem(ref: Ref, path: str) -> str | None:
    """Why the path ``ref`` resolved to does not hold its files, or None when it does."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing" if ref.required else None
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "a link (a backup does not follow links)"
    if stat.S_ISREG(st.st_mode):
        return None if ref.covers else "a file where a directory belongs"
    if not stat.S_ISDIR(st.st_mode):
        return "neither a file nor a directory"
    if ref.required and not _holds_a_file(path):
        return "an empty directory"
    return None


def _holds_a_file(top: str) -> bool:
    """Whether a regular file lies somewhere under the directory ``top`` (no link followed)."""
    return any(files for _, _, files in os.walk(top))


def orphans(resolved: Iterable[tuple[Ref, str]], roots: Roots) -> list[str]:
    """The paths under ``roots`` that no resolved reference reaches, at the first level where
    none lies: a directory is walked into only when a reference's path lies inside it (or is
    it, for one that does not cover its contents: an experiment's directory)."""
    covered: set[str] = set()
    named: set[str] = set()
    inside: set[str] = set()  # the directories some reference's path lies under
    for ref, path in resolved:
        (covered if ref.covers else named).add(path)
        parent = os.path.dirname(path)
        while parent not in inside and parent != os.path.dirname(parent):
            inside.add(parent)
            parent = os.path.dirname(parent)
    found: list[str] = []
    stack = [r for r in roots.all() if os.path.isdir(r) and not os.path.islink(r)]
    walked: set[str] = set()
    while stack:
        top = stack.pop()
        if top in walked or top in covered:
            continue
        walked.add(top)
        try:
            entries = list(os.scandir(top))
        except FileNotFoundError:
            continue  # removed meanwhile (a live store): nothing there to be an orphan
        for entry in entries:
            path = entry.path
            if path in covered:
                continue
            if path in inside or path in named:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(path)
                continue
            found.append(path)
    return sorted(found)
