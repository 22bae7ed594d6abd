"""``ckptguard run -- CMD``: run this rank's trainer under a checkpoint agent (docs/agent.md)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import click

from ..units import parse_size
from ._args import parse_duration


@click.command("run", context_settings={"allow_interspersed_args": False})
@click.option(
    "--grace",
    metavar="DURATION",
    default="300",
    show_default=True,
    help="After a checkpoint request, how long every rank has to commit (90, 5m, ...).",
)
@click.option(
    "--time-margin",
    metavar="DURATION",
    default=None,
    help="Request a checkpoint this long before the job's end time (squeue, or "
    "CKPTGUARD_END_TIME in unix seconds). Off unless given.",
)
@click.option(
    "--term-timeout",
    metavar="DURATION",
    default="30",
    show_default=True,
    help="When stopping the trainer, SIGKILL it this long after SIGTERM.",
)
@click.option(
    "--poll",
    default=0.5,
    show_default=True,
    type=click.FloatRange(min=0.01),
    help="Seconds between two agreements of the agents.",
)
@click.option(
    "--peer-timeout",
    metavar="DURATION",
    default="120",
    show_default=True,
    help="An agent that gets no answer from the others this long stops its trainer and aborts "
    "the job (exit 87).",
)
@click.option(
    "--drain-to",
    metavar="STORE",
    default=None,
    help="Copy committed checkpoints to this durable store (a directory or s3://bucket/prefix) "
    "in the background: rank 0 copies a whole checkpoint; every agent copies its node's files "
    "of a node-local one (into a directory every node sees).",
)
@click.option(
    "--drain-every",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="With --drain-to: drain every K-th checkpoint committed.",
)
@click.option(
    "--drain-jobs",
    default=4,
    show_default=True,
    type=click.IntRange(min=1, max=32),
    help="With --drain-to: copy threads (the cap on concurrent writers).",
)
@click.option(
    "--sign-key",
    metavar="KEY",
    default=None,
    help="Sign every checkpoint the agents commit with this Ed25519 private key (rank 0's "
    "agent reads it; checked before the trainer starts).",
)
@click.option(
    "--store",
    metavar="STORE",
    default=None,
    help="Record the job's events (start, checkpoint request, exit, first training step) in "
    "this store; default: the store of the trainer's first commit (docs/operations.md).",
)
@click.option(
    "--validate",
    is_flag=True,
    help="After each commit, re-read the checkpoint in a low-priority child process "
    "(`ckptguard validate`, rank 0); a failure marks it and makes the agent exit 88.",
)
@click.option(
    "--protect",
    type=click.Choice(["xor", "partner"]),
    default=None,
    help="Protect each node-local checkpoint the trainers commit, in the background over the "
    "agents' MPI: XOR parity across sets of nodes, or a copy on a partner node "
    "(docs/operations.md). A checkpoint saved whole is left alone.",
)
@click.option(
    "--protect-set-size",
    default=None,
    type=click.IntRange(min=2),
    help="With --protect xor: nodes per parity set (default 8).",
)
@click.option(
    "--protect-rate",
    metavar="SIZE",
    default=None,
    help="With --protect: cap what each node reads and sends, per second (200MB, 1GiB).",
)
@click.option(
    "--node",
    metavar="NAME",
    default=None,
    help="With --protect or --drain-to: this rank's node, as its node-local saves name it "
    "(default: CKPTGUARD_NODE or the host name).",
)
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def command(
    grace: str,
    time_margin: str | None,
    term_timeout: str,
    poll: float,
    peer_timeout: str,
    drain_to: str | None,
    drain_every: int,
    drain_jobs: int,
    sign_key: str | None,
    store: str | None,
    validate: bool,
    protect: str | None,
    protect_set_size: int | None,
    protect_rate: str | None,
    node: str | None,
    cmd: Sequence[str],
) -> None:
    """Run CMD as this rank's trainer, under a checkpoint agent (one agent per rank).

    Launch with `srun ckptguard run -- python train.py` or `mpiexec -n N ckptguard run -- ...`.
    SIGUSR1 or SIGTERM to any agent, or the time margin, asks every trainer for a checkpoint
    (ckptguard.checkpoint_requested()). Exit status: the trainer's own (128+N if killed by signal
    N); 85 when every rank committed after a request (requeue me); 86 when a request got no
    commit from every rank within the grace; 87 when another agent stopped answering (the job
    is aborted); 88 with --validate when a checkpoint failed its validation and the trainer
    did not fail; 2 when the agents could not start.
    """
    from ckptguard.agent.protector import ProtectOptions
    from ckptguard.agent.runner import Options, run

    if protect is None and (protect_set_size or protect_rate):
        raise click.UsageError("--protect-set-size and --protect-rate need --protect")
    if node is not None and protect is None and drain_to is None:
        raise click.UsageError("--node needs --protect or --drain-to")
    try:
        rate = None if protect_rate is None else float(parse_size(protect_rate))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--protect-rate") from None
    if rate is not None and rate <= 0:
        raise click.BadParameter("a rate above 0 bytes a second", param_hint="--protect-rate")
    protection = None
    if protect is not None:
        protection = ProtectOptions(protect, protect_set_size, rate)
    opts = Options(
        cmd=tuple(cmd),
        grace=parse_duration(grace),
        time_margin=None if time_margin is None else parse_duration(time_margin),
        term_timeout=parse_duration(term_timeout),
        poll=poll,
        peer_timeout=parse_duration(peer_timeout),
        drain_to=drain_to,
        drain_every=drain_every,
        drain_jobs=drain_jobs,
        sign_key=None if sign_key is None else os.path.abspath(sign_key),
        store=None if store is None else os.path.abspath(store),
        validate=validate,
        protect=protection,
        node=node,
    )
    raise click.exceptions.Exit(run(opts))
