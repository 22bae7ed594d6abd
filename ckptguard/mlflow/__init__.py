"""MLflow: a tracking server's backend store and artifacts as one backup (docs/mlflow.md).

    snap = take_snapshot("sqlite:////srv/mlflow/mlflow.db", dest)   # or postgresql://...
    roots = Roots(artifacts_destination="/srv/mlflow/artifacts")
    report = check_consistency(snap.references, roots)
    report.fraction_consistent, report.dangling, report.orphans

``snapshot`` copies the database at one point in time and reads its artifact references
there; ``refs`` resolves them to local paths; ``check`` compares them with a file tree
(``check_consistency``: a function named apart from its module, which would shadow it). None of
them imports MLflow (the database is read directly), numpy or torch; the names load on first
use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .check import Report, check_consistency
    from .refs import Ref, Resolver, Roots
    from .snapshot import Snapshot, live_refs, take_snapshot

__all__ = [
    "Ref",
    "Report",
    "Resolver",
    "Roots",
    "Snapshot",
    "check_consistency",
    "live_refs",
    "take_snapshot",
]
_LAZY = {
    "Ref": ".refs",
    "Resolver": ".refs",
    "Roots": ".refs",
    "Report": ".check",
    "check_consistency": ".check",
    "Snapshot": ".snapshot",
    "live_refs": ".snapshot",
    "take_snapshot": ".snapshot",
}


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` when it is first used."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
