"""``ckptguard drill STORE``: restore a committed checkpoint as a resume would, timed, and recorded
as a ``drill`` event (docs/operations.md, "Restore drills")."""

from __future__ import annotations

import json

import click

from ._output import CheckFailed, echo


@click.command("drill")
@click.argument("store")
@click.option("--checkpoint", "name", metavar="NAME", default=None, help="Drill this checkpoint.")
@click.option(
    "--random",
    "pick_random",
    is_flag=True,
    help="Drill a committed checkpoint chosen at random (the default).",
)
@click.option("--seed", type=int, default=None, help="Seed of the random choice (repeatable).")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where the tensors are restored to (auto: cuda if torch sees a device).",
)
@click.option(
    "--scratch",
    metavar="DIR",
    type=click.Path(file_okay=False),
    default=None,
    help="Also copy the checkpoint's files into a fresh directory under DIR, verify the copy, "
    "and remove it.",
)
@click.option(
    "--trust",
    "trust_paths",
    metavar="KEY_OR_DIR",
    multiple=True,
    help="The checkpoint must be signed by this public key (a .pub file or a directory of "
    "them); repeat for several.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def command(
    store: str,
    name: str | None,
    pick_random: bool,
    seed: int | None,
    device: str,
    scratch: str | None,
    trust_paths: tuple[str, ...],
    as_json: bool,
) -> None:
    """Restore a committed checkpoint of STORE the way a resume would, and time it.

    The checkpoint (--checkpoint NAME, or one at random) is loaded onto the device with every
    chunk verified; with --scratch its files are also copied into DIR and the copy verified.
    The outcome is recorded as a drill event in STORE/.events. Encrypted checkpoints need the
    KEK (CKPTGUARD_KEK). Exits 0 if the restore worked, 1 if the checkpoint failed a check,
    2 for an error (usage, unreadable store, no KEK, no CUDA device).
    """
    if name is not None and pick_random:
        raise click.UsageError("give --checkpoint NAME or --random, not both")
    from ckptguard.drill import drill
    from ckptguard.units import format_size

    try:
        out = drill(
            store,
            name=name,
            seed=seed,
            device=device,
            scratch=scratch,
            trusted_keys=list(trust_paths) or None,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        echo(json.dumps(out.as_dict(), sort_keys=True))
    elif out.ok:
        copy = (
            f"; scratch copy of {format_size(out.scratch_bytes)} verified in {out.scratch_s:.2f} s"
            if out.scratch_s is not None
            else ""
        )
        echo(
            f"ok   drill of {out.path}: {format_size(out.bytes)} restored onto {out.device} "
            f"in {out.load_s:.2f} s{copy} ({out.seconds:.2f} s in all)"
        )
    if not out.ok:
        lines = [f"FAIL drill of {out.path} (uuid {out.uuid}): {len(out.problems)} problem(s)"]
        echo(*lines, *[f"  problem: {p}" for p in out.problems], err=True)
        raise CheckFailed
