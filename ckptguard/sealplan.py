"""The data keys of an encrypted save (docs/format.md section 4.4), chosen by rank 0.

Rank 0 names the scopes the save's ``encrypt`` rule puts its tensors in, takes each scope's data
key from the store's keyring (creating it the first time; a shredded scope refuses), and the
save's plan carries the keys to the ranks, which never need the key-encryption key themselves.
"""

from __future__ import annotations

from collections.abc import Iterable

from . import keyring
from .options import SaveOptions
from .seal import Scope, Sealing, scope_name


def seal_plan(store: str, opt: SaveOptions, keys: Iterable[str]) -> dict[str, list[str]] | None:
    """The plan's ``seal`` member for a save of tensors ``keys`` into ``store``: scope ->
    [key_id, data key in hex], or None where no tensor is sealed. Raises KeyUnavailableError
    (no KEK, a KEK that does not unwrap the scope's key) or ScopeShreddedError."""
    if opt.encrypt is None:
        return None
    names = sorted({n for k in keys if (n := scope_name(opt.encrypt, k)) is not None})
    if not names:
        return None
    kek = keyring.resolve_kek(opt.kek)
    scopes = {}
    for name in names:
        dk = keyring.obtain(store, name, kek)
        scopes[name] = Scope(dk.key_id, name, dk.key)
    return Sealing(opt.encrypt, scopes).to_plan()


def key_scopes(plan: dict[str, list[str]] | None, used: Iterable[str]) -> dict[str, str] | None:
    """The manifest's ``encryption`` keys, ``{key_id: scope}``, of the key ids ``used`` by the
    index's rows (None: no row is sealed)."""
    if not plan:
        return None
    by_id = {kid: scope for scope, (kid, _) in plan.items()}
    out = {kid: by_id[kid] for kid in used if kid is not None}
    return out or None
