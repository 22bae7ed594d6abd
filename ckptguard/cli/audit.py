"""``ckptguard audit init|show|verify|check|prove STORE``: a store's tamper-evident audit log
(docs/audit.md, docs/security.md). ``verify`` exits 1 when the log does not verify, ``check``
when an event has no entry."""

from __future__ import annotations

import json

import click

from ._args import require_dir
from ._output import CheckFailed, echo


@click.group("audit")
def command() -> None:
    """The store's tamper-evident audit log."""


@command.command("init")
@click.argument("store")
@click.option("--key", "key", default=None, help="Sign tree heads with this private key.")
@click.option("--witness", default=None, help="Also write every new tree head to this directory.")
def init(store: str, key: str | None, witness: str | None) -> None:
    """Start an audit log for STORE (its checkpoints so far are recorded as adopted)."""
    from ckptguard import auditcheck

    first, adopted = auditcheck.init(store, key, witness)
    head = first.head
    signed = f"signed by key {head['key_id']}" if head["key_id"] else "unsigned (no --key)"
    echo(f"audit log started in {store}: log id {head['log_id']}, {signed}")
    if witness:
        echo(f"witness: {witness}")
    if adopted:
        echo(f"{adopted} existing checkpoint(s) recorded as adopted")
    if first.warnings:
        echo(*first.warnings, err=True)


def _trusted(key: str | None) -> object:
    from ckptguard import keys

    return keys.load_public(key) if key else None


@command.command("verify")
@click.argument("store")
@click.option("--key", default=None, help="The trusted public key (else the store's config's).")
@click.option("--witness", "witnesses", multiple=True, help="Another directory holding heads.")
@click.option("--head", "heads", multiple=True, help="A tree head kept elsewhere (a file).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def verify(
    store: str, key: str | None, witnesses: tuple[str, ...], heads: tuple[str, ...], as_json: bool
) -> None:
    """Check that STORE's audit log is whole: every entry, every signed head, and that it
    extends the heads the witnesses (and --head files) hold. Exits 1 if it does not."""
    from ckptguard import AuditError, audit

    require_dir(store, "store")
    try:
        report = audit.verify(
            store,
            key=_trusted(key),  # type: ignore[arg-type]
            witnesses=witnesses,
            heads=[audit.head_from_file(h) for h in heads],
        )
    except AuditError as e:
        if type(e) is AuditError:  # cannot be read at all: an error, not a failed check
            raise
        echo(json.dumps({"ok": False, "error": str(e)}) if as_json else f"FAIL {e}")
        raise CheckFailed from None
    if as_json:
        echo(json.dumps({"ok": True, **report.__dict__}))
        return
    signed = f"signed by key {report.key_id}" if report.key_id else "unsigned"
    echo(f"ok   {report.size} entries, {report.heads} tree heads, {signed}")
    echo(f"     root {report.root}")
    for where, size in report.witnesses:
        echo(f"     witness {where}: " + (f"head of size {size}" if size is not None else "none"))
    for n in report.notes:
        echo(f"note: {n}")


@command.command("show")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="One JSON entry per line.")
@click.option("--last", type=int, default=None, help="Only the last N entries.")
def show(store: str, as_json: bool, last: int | None) -> None:
    """Print STORE's audit entries (each checked on its own; `audit verify` checks the whole)."""
    from ckptguard import audit

    log, _ = audit.read(require_dir(store, "store"))
    entries = log.entries[-last:] if last else log.entries
    for e in entries:
        if as_json:
            echo(json.dumps(e, sort_keys=True))
            continue
        a = e["actor"]
        who = f"{a['user']}@{a['host']} pid {a['pid']}" + (
            f" rank {a['rank']}" if a["rank"] is not None else ""
        )
        job = f" job {a['slurm_job_id']}" if a["slurm_job_id"] else ""
        what = e["checkpoint"] or ""
        extra = json.dumps(e["detail"], sort_keys=True) if e["detail"] else ""
        echo(f"{e['seq']:>6} {e['time']} {e['op']:<8} {what} ({who}{job}) {extra}".rstrip())


@command.command("check")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def check(store: str, as_json: bool) -> None:
    """Audit completeness: every checkpoint in STORE with its commit entry, every one gone with
    its delete entry. Prints the fraction and each gap; exits 1 if there is one."""
    from ckptguard import auditcheck

    out = auditcheck.check(require_dir(store, "store"))
    if as_json:
        echo(json.dumps(out.to_json(), sort_keys=True))
    else:
        echo(f"audit completeness {out.complete}/{out.total} ({out.fraction:.1%})")
        for g in out.gaps:
            echo(f"gap  {g.kind:<6} {g.name} uuid {g.uuid}: {g.reason}")
    if out.gaps:
        raise CheckFailed


@command.command("prove")
@click.argument("store")
@click.option("--entry", "index", type=int, default=None, help="Inclusion proof of entry N.")
@click.option("--since", type=int, default=None, help="Consistency proof from tree size M.")
@click.option("--size", type=int, default=None, help="Of the tree of this size (the last head's).")
def prove(store: str, index: int | None, since: int | None, size: int | None) -> None:
    """Print a Merkle proof as JSON (docs/audit.md section 5 says how to check it)."""
    from ckptguard import audit

    require_dir(store, "store")
    if (index is None) == (since is None):
        raise click.UsageError("give exactly one of --entry and --since")
    try:
        if index is not None:
            proof = audit.inclusion(store, index, size)
        else:
            proof = audit.consistency(store, since, size)  # type: ignore[arg-type]
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    echo(json.dumps(proof, sort_keys=True))
