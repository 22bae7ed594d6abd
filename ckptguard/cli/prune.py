"""``ckptguard prune STORE``: apply a retention policy (the store's .retention.json, with the
rules given on the command line in its place), or show what it would remove (``--dry-run``)."""

from __future__ import annotations

import json
from typing import Any

import click

import ckptguard

from ._args import require_dir
from ._output import CheckFailed, echo, when


@click.command("prune")
@click.argument("store")
@click.option("--dry-run", is_flag=True, help="Show the plan; remove nothing.")
@click.option("--keep-last", type=int, help="Keep the N newest.")
@click.option("--keep-every-steps", type=int, help="Keep those whose step is a multiple of N.")
@click.option("--keep-within", help="Keep those created within this of the newest (36h, 2d).")
@click.option("--keep-hourly", type=int, help="Keep the newest of each of the last N hours.")
@click.option("--keep-daily", type=int, help="... of each of the last N days (UTC).")
@click.option("--keep-weekly", type=int, help="... of each of the last N ISO weeks.")
@click.option("--keep-monthly", type=int, help="... of each of the last N months.")
@click.option("--keep-yearly", type=int, help="... of each of the last N years.")
@click.option(
    "--keep-tag", "keep_tags", multiple=True, help="Keep those tagged so (metadata tags)."
)
@click.option(
    "--sdc-window",
    help="Keep the newest checkpoint at least this old (silent-corruption detection window).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def command(store: str, dry_run: bool, as_json: bool, **rules: object) -> None:
    """Remove the checkpoints of STORE that the retention policy does not keep.

    The policy is STORE/.retention.json (its rules: the option names with _ for -), with the
    rules given here replacing its own. A checkpoint is kept if any rule keeps it; the newest and
    the one LATEST names are always kept. Every removal is atomic and, in an audited store,
    recorded as a prune entry. Exit 1 if a removal failed.
    """
    from ckptguard.retention import POLICY_FILE, Policy, read_policy

    root = require_dir(store, "store")
    policy = (read_policy(root) or Policy()).merged(**rules)
    if policy.empty:
        raise ckptguard.RetentionPolicyError(
            f"no retention rule: give one (--keep-last N, ...) or write {root}/{POLICY_FILE}"
        )
    decisions, failed = ckptguard.Store(root).prune(policy, dry_run=dry_run)
    if as_json:
        echo(json.dumps({"policy": policy.to_json(), "plan": [_doc(d) for d in decisions]}))
    else:
        for d in decisions:
            step = "-" if d.info.step is None else d.info.step
            verb = "keep  " if d.keep else ("would remove" if dry_run else "remove")
            why = f"  ({'; '.join(d.reasons)})" if d.reasons else ""
            echo(f"{verb:<12} {d.info.name}  step {step}  {when(d.info.created)}{why}")
        gone = sum(not d.keep for d in decisions)
        echo(f"{len(decisions) - gone} kept, {gone} {'to remove' if dry_run else 'removed'}")
    for name, e in failed:
        echo(f"error: {name} was not removed: {e}", err=True)
    if failed:
        raise CheckFailed()


def _doc(d: Any) -> dict:
    """A ``retention.Decision`` as JSON."""
    return {
        "name": d.info.name,
        "step": d.info.step,
        "created": d.info.created.isoformat(),
        "keep": d.keep,
        "reasons": list(d.reasons),
    }
