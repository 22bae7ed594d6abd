"""``ckptguard mlflow backup|restore|check``: an MLflow tracking server's backend store and
artifacts backed up as one verified checkpoint, restored, and checked for consistency
(docs/mlflow.md). The server is named by its backend store URI (as ``mlflow server
--backend-store-uri`` takes it: sqlite:/// or postgresql://) and where its artifacts lie
(``--artifacts-destination`` of ``mlflow server --serve-artifacts``, and/or local artifact
roots)."""

from __future__ import annotations

import json
from typing import Any

import click

from ._output import CheckFailed, echo, fail

_BACKEND = click.option(
    "--backend-store-uri",
    required=True,
    help="The server's backend store (sqlite:///..., postgresql://...).",
)
_DEST = click.option(
    "--artifacts-destination",
    default=None,
    help="Where mlflow-artifacts: URIs point (mlflow server --artifacts-destination).",
)
_ROOTS = click.option(
    "--artifact-root",
    "artifact_roots",
    multiple=True,
    help="A local directory that artifact paths and file: URIs may name (repeatable).",
)
_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _roots(dest: str | None, roots: tuple[str, ...]) -> Any:
    from ckptguard.mlflow.refs import Roots

    if dest is None and not roots:
        fail("give --artifacts-destination or --artifact-root: where the artifacts lie")
    return Roots(dest, tuple(roots))


@click.group("mlflow")
def command() -> None:
    """Back up, restore and check an MLflow tracking server (database and artifacts)."""


@command.command("backup")
@click.argument("store")
@_BACKEND
@_DEST
@_ROOTS
@click.option("--name", default=None, help="The backup's name (default mlflow-<UTC time>).")
@click.option("--max-memory", default=None, help="Most bytes to hold (default: half the RAM).")
@click.option("--sign-key", default=None, help="Sign the backup with this private key file.")
@click.option("--digests", is_flag=True, help="Record every chunk's SHA-256.")
@_JSON
def backup(
    store: str,
    backend_store_uri: str,
    artifacts_destination: str | None,
    artifact_roots: tuple[str, ...],
    name: str | None,
    max_memory: str | None,
    sign_key: str | None,
    digests: bool,
    as_json: bool,
) -> None:
    """Back up the server into STORE as one checkpoint: a point-in-time copy of its database,
    then every artifact that copy references. Exits 1 (the backup committed) when some
    reference has no files in it."""
    from ckptguard.mlflow.backup import backup as run_backup
    from ckptguard.units import parse_size

    roots = _roots(artifacts_destination, artifact_roots)
    limit = parse_size(max_memory) if max_memory else None
    opts: dict[str, Any] = {"digests": digests}
    if sign_key:
        opts["sign_key"] = sign_key
    res = run_backup(backend_store_uri, store, roots, name=name, max_memory=limit, **opts)
    rep = res.report
    if as_json:
        echo(json.dumps(res.to_json()))
    else:
        echo(
            f"backed up {res.snapshot.backend_uri} (schema {res.snapshot.alembic_revision}) as "
            f"{res.info.path}: {res.files} artifact files, {res.artifact_bytes} bytes",
            f"consistency: {rep.consistent}/{rep.references} references "
            f"({rep.fraction_consistent:.2%})",
        )
        for d in rep.dangling:
            echo(f"  dangling: {d.ref.table} {d.ref.row} {d.ref.column} {d.ref.uri}: {d.reason}")
        for path, why in res.skipped.items():
            echo(f"  skipped: {path}: {why}")
    if rep.dangling:
        raise CheckFailed()


@command.command("restore")
@click.argument("backup")
@_BACKEND
@_DEST
@click.option(
    "--map",
    "maps",
    multiple=True,
    help="OLD=NEW: restore the backup's artifact root OLD into NEW (OLD=OLD: where it was; "
    "repeatable). Every root but the artifacts destination needs one.",
)
@click.option("--trust", "trust_paths", multiple=True, help="Trusted public key file.")
@_JSON
def restore(
    backup: str,
    backend_store_uri: str,
    artifacts_destination: str | None,
    maps: tuple[str, ...],
    trust_paths: tuple[str, ...],
    as_json: bool,
) -> None:
    """Restore BACKUP (a backup, or a store: its newest) into a new database and empty
    artifact roots. Every byte is checked first; nothing existing is overwritten."""
    from ckptguard.mlflow.refs import Roots
    from ckptguard.mlflow.restore import restore as run_restore

    root_map = {}
    for m in maps:
        old, sep, new = m.partition("=")
        if not sep or not old or not new:
            fail(f"--map {m!r}: give OLD=NEW")
        root_map[old] = new
    opts: dict[str, Any] = {}
    if trust_paths:
        from ckptguard.sign import trust_set

        opts["trusted_keys"] = trust_set(list(trust_paths))
    res = run_restore(
        backup, backend_store_uri, Roots(artifacts_destination, ()), root_map=root_map, **opts
    )
    if as_json:
        echo(json.dumps(res.to_json()))
        return
    echo(f"restored {res.files} artifact files ({res.artifact_bytes} bytes) and {res.backend_uri}")
    for old, new in res.roots.items():
        echo(f"  {old} -> {new}")


@command.command("check")
@_BACKEND
@_DEST
@_ROOTS
@_JSON
def check(
    backend_store_uri: str,
    artifacts_destination: str | None,
    artifact_roots: tuple[str, ...],
    as_json: bool,
) -> None:
    """Check a live server: every artifact URI its database references resolves to files, and
    every artifact directory is referenced. Exits 1 on dangling references or orphans."""
    from ckptguard.mlflow.check import check_consistency
    from ckptguard.mlflow.snapshot import live_refs

    roots = _roots(artifacts_destination, artifact_roots)
    _, refs = live_refs(backend_store_uri)
    rep = check_consistency(refs, roots)
    if as_json:
        echo(json.dumps(rep.to_json()))
    else:
        echo(
            f"{rep.consistent}/{rep.references} references consistent "
            f"({rep.fraction_consistent:.2%}), {len(rep.orphans)} orphans"
        )
        for d in rep.dangling:
            echo(f"  dangling: {d.ref.table} {d.ref.row} {d.ref.column} {d.ref.uri}: {d.reason}")
        for o in rep.orphans:
            echo(f"  orphan: {o}")
    if not rep.ok:
        raise CheckFailed()
