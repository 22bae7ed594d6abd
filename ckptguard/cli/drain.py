"""``ckptguard drain SRC DST``: copy committed checkpoints from a fast store to a durable one,
verified and committed atomically (ckptguard.drain; docs/operations.md)."""

from __future__ import annotations

import os
import time

import click

import ckptguard
from ckptguard.units import format_size

from ._args import require_dir
from ._output import echo, fail


@click.command("drain")
@click.argument("src")
@click.argument("dst")
@click.option("--name", "names", multiple=True, help="Drain this checkpoint (repeatable).")
@click.option("--latest", "latest_only", is_flag=True, help="Drain only SRC's LATEST.")
@click.option(
    "--all", "all_", is_flag=True, help="Every committed checkpoint DST lacks (the default)."
)
@click.option(
    "--jobs",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="Files (or pieces of files) copied at once; capped at 32.",
)
@click.option("--overwrite", is_flag=True, help="Replace a DST checkpoint of the same name.")
@click.option("--no-stripe", is_flag=True, help="On Lustre, keep the directory's default layout.")
@click.option(
    "--sign-key",
    type=click.Path(dir_okay=False),
    help="Sign each copy that is not signed already with this Ed25519 key (ckptguard key "
    "generate); the checkpoint must have chunk digests.",
)
@click.option(
    "--node-local",
    is_flag=True,
    help="SRC is a node's store of node-local checkpoints: run one task per node (or per rank) "
    "under srun or mpiexec, each with its node's SRC; the nodes copy their own files into DST, "
    "which every node must see. Needs --name or --latest.",
)
@click.option(
    "--node",
    help="With --node-local: this task's node, as its node-local saves name it (default: "
    "CKPTGUARD_NODE, else the host name).",
)
def command(
    src: str,
    dst: str,
    names: tuple[str, ...],
    latest_only: bool,
    all_: bool,
    jobs: int,
    overwrite: bool,
    no_stripe: bool,
    sign_key: str | None,
    node_local: bool,
    node: str | None,
) -> None:
    """Copy committed checkpoints from store SRC (fast staging) to store DST (durable).

    Each is copied into DST's staging area, verified chunk by chunk and committed with one
    rename; DST's LATEST moves to it if it is newer. Checkpoints DST already holds are skipped;
    one with the same name but another uuid is an error unless --overwrite. With --sign-key, a
    checkpoint that is not signed is signed on its way (a signed one keeps its signature).

    DST may be a store in an object store, s3://bucket/prefix (endpoint and credentials from
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... as boto3 reads them): each checkpoint is uploaded,
    read back and verified, then made visible by creating its MANIFEST.json object only if
    there is none; --overwrite and --sign-key are refused there.

    With --node-local, every node's task drains the checkpoint together
    (ckptguard.nodedrain): `srun --ntasks-per-node=1 ckptguard drain --node-local
    /local/ckpts /lustre/run1/ckpts --latest`.
    """
    from ckptguard.drain import drain

    if sum([bool(names), latest_only, all_]) > 1:
        fail("give at most one of --name, --latest and --all")
    if node is not None and not node_local:
        raise click.UsageError("--node needs --node-local")
    if node_local:
        if not (names or latest_only) or overwrite or sign_key:
            raise click.UsageError(
                "--node-local needs --name or --latest, and takes neither --all, --overwrite "
                "nor --sign-key"
            )
        _drain_nodes(src, dst, list(names), jobs, not no_stripe, node)
        return
    require_dir(src, "store")
    chosen: list[str] | None = list(names) if names else None
    if latest_only:
        name = ckptguard.Store(src).latest_name()
        if name is None:
            raise ckptguard.CheckpointNotFoundError(f"store {src} has no LATEST")
        chosen = [name]
    done = drain(
        src,
        dst,
        names=chosen,
        jobs=jobs,
        overwrite=overwrite,
        stripe=not no_stripe,
        on_drained=_report,
        sign_key=sign_key,
    )
    if not done:
        echo(f"nothing to drain: {dst} holds every selected checkpoint")


def _drain_nodes(
    src: str, dst: str, names: list[str], jobs: int, stripe: bool, node: str | None
) -> None:
    """Each of ``names`` (none: the nodes' LATEST) drained by every task of the MPI job, this
    one with its node's store ``src``."""
    from mpi4py import MPI

    from ckptguard.format.layout import check_name
    from ckptguard.nodedrain import drain_nodes
    from ckptguard.objstore.url import is_url

    if is_url(dst):
        raise click.UsageError("--node-local drains into a directory every node sees, not a bucket")
    for name in names:
        check_name(name)
    comm = MPI.COMM_WORLD
    for name in names or [_agreed_latest(src, comm)]:
        t0 = time.monotonic()
        path = os.path.join(src, name)
        info = drain_nodes(path, dst, comm, node=node or True, jobs=jobs, stripe=stripe)
        if comm.Get_rank() == 0:
            echo(
                f"drained {info.name} -> {info.path} from {comm.Get_size()} tasks "
                f"in {time.monotonic() - t0:.2f} s"
            )


def _agreed_latest(src: str, comm: object) -> str:
    """The name every task's store ``src`` has as LATEST; the same StoreError on every task
    where one has none, or they differ (a node-local save moves them all, or none)."""
    from ckptguard.redundancy.exchange import SetComm
    from ckptguard.redundancy.protect import TIMEOUT

    try:
        mine = ckptguard.Store(src).latest_name() or ""
    except ckptguard.CheckpointError:
        mine = ""
    world = SetComm.duplicate(comm, TIMEOUT)
    try:
        said = [b.decode() for b in world.allgather_bytes(mine.encode())]
    finally:
        world.close()
    if "" in said:
        raise ckptguard.StoreError(f"task {said.index('')}'s store {src} has no LATEST")
    if len(set(said)) > 1:
        raise ckptguard.StoreError(
            f"the tasks' stores name different LATEST checkpoints ({', '.join(sorted(set(said)))}):"
            " run resume first, or give --name"
        )
    return said[0]


def _report(info: ckptguard.CheckpointInfo, nbytes: int, seconds: float) -> None:
    """One line per drained checkpoint: where it went, its size and the copy rate."""
    rate = format_size(int(nbytes / seconds)) if seconds > 0 else "-"
    echo(
        f"drained {info.name} -> {info.path}: {nbytes} bytes ({format_size(nbytes)}) "
        f"in {seconds:.2f} s ({rate}/s)"
    )
