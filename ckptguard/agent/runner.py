"""``ckptguard run``: one agent per rank, with the trainer as its child (docs/agent.md).

The agents MAX-reduce a small vector every ``poll`` seconds, so they agree on everything: a
checkpoint request (SIGUSR1 or SIGTERM to any agent, or the job's end time minus
``time_margin``), whether every rank's trainer has committed since, whether the grace is over,
and whether a trainer failed. Each agent then acts the same way on its own child.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..coord.base import LocalCoordinator
from ..coord.mpi import MPICoordinator
from ..errors import AgentError, KeyFileError
from .child import Child
from .control import ControlServer
from .endtime import job_end_time
from .group import Group, MPIGroup, PeersLostError, open_group
from .persist import Persister
from .protector import ProtectOptions, Protector
from .protocol import EXIT_CHECKPOINTED, EXIT_NO_CHECKPOINT, EXIT_PEERS_LOST
from .rankenv import (
    Ranks,
    child_env,
    free_port,
    slurm_master_addr,
    slurm_master_port,
    slurm_ranks,
)
from .timeline import Timeline
from .validator import Validator, with_validation
from .votes import DRAINING, SLOTS, UNDECIDED, Votes

if TYPE_CHECKING:
    from .drainer import Drainer
    from .nodedrainer import NodeDrainer

END_SLACK = 5.0  # seconds kept free between the last SIGKILL and the job's end time

# The slots of the vector the agents MAX-reduce on every tick; the votes on commits follow.
REQ, REQ_RANK, ALIVE, UNCOMMITTED, GIVE_UP, FAILED_RANK, DONE, STUCK = range(8)
VOTES = 8
STUCK_SLACK = 10.0  # seconds past a save's timeout before a rank still in it counts as stuck
SIGUSR1_REQ, SIGTERM_REQ, TIME_REQ = 1, 2, 3
_REASONS = {SIGUSR1_REQ: "SIGUSR1", SIGTERM_REQ: "SIGTERM", TIME_REQ: "time limit"}
_OUTCOMES = {EXIT_CHECKPOINTED: "checkpointed", EXIT_NO_CHECKPOINT: "no_checkpoint"}


@dataclass(frozen=True)
class Options:
    """The command line of ``ckptguard run``; times in seconds."""

    cmd: tuple[str, ...]
    grace: float = 300.0
    time_margin: float | None = None
    term_timeout: float = 30.0
    poll: float = 0.5
    peer_timeout: float = 120.0
    drain_to: str | None = None
    drain_every: int = 1
    drain_jobs: int = 4
    sign_key: str | None = None
    store: str | None = None  # where the job's events go (else the trainer's first commit's store)
    validate: bool = False
    protect: ProtectOptions | None = None  # protect each node-local checkpoint (a scheme)
    node: str | None = None  # this rank's node (None: CKPTGUARD_NODE or the host name)


class _Signals:
    """The agent's handlers. SIGUSR1, and the first SIGTERM or SIGINT, request a checkpoint; a
    SIGTERM or SIGINT once a request is pending goes to the trainer at once."""

    def __init__(self) -> None:
        self.request = 0
        self.pending = False  # a request is pending here (local, or agreed with the others)
        self.child: Child | None = None

    def install(self) -> None:
        signal.signal(signal.SIGUSR1, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum != signal.SIGUSR1 and self.pending:
            if self.child is not None:
                self.child.signal(signum)
            return
        if not self.request:
            self.request = SIGUSR1_REQ if signum == signal.SIGUSR1 else SIGTERM_REQ
        self.pending = True


def _nap() -> None:
    time.sleep(0.001)


def _log(rank: int, message: str) -> None:
    print(f"ckptguard run [rank {rank}]: {message}", file=sys.stderr, flush=True)


def _setup(env: Mapping[str, str], want_end_time: bool, sign_key: str | None) -> dict[str, Any]:
    """Rank 0's facts for everyone: master address and port both ways, and the end time; the
    signing key checked (rank 0's agent commits, so it alone reads the key)."""
    try:
        if sign_key is not None:  # the signing machinery only where it signs
            from ..sign import signer

            signer(sign_key)
    except (KeyFileError, TypeError) as exc:
        return {"error": f"--sign-key: {exc}"}
    try:
        addr, port = slurm_master_addr(env), slurm_master_port(env)
        return {
            "slurm": None if addr is None or port is None else [addr, port],
            "mpi": [socket.gethostname(), free_port()],
            "end_time": job_end_time(env) if want_end_time else None,
        }
    except Exception as exc:
        return {"error": f"rank 0 could not read the job's facts: {type(exc).__name__}: {exc}"}


def _ranks(env: Mapping[str, str], group: Group, setup: dict[str, Any]) -> tuple[Ranks, str, int]:
    """Slurm's ranks if every agent finds them consistent with MPI, else the MPI world's."""
    slurm = slurm_ranks(env)
    if group.size == 1 and slurm is not None and slurm.world_size > 1:
        raise AgentError(
            f"SLURM_NTASKS={slurm.world_size} but the agents' MPI world has one rank: launch with "
            "an MPI-aware srun (e.g. srun --mpi=pmi2) so that the agents can agree"
        )
    usable = (
        slurm is not None
        and setup["slurm"] is not None
        and (slurm.rank, slurm.world_size) == (group.rank, group.size)
    )
    if group.exchange([int(not usable)], wait=_nap)[0] == 0:
        assert slurm is not None
        local_size = slurm.local_world_size if slurm.local_world_size > 0 else group.local_size
        addr, port = setup["slurm"]
        return Ranks(slurm.rank, slurm.world_size, slurm.local_rank, local_size), addr, port
    addr, port = setup["mpi"]
    ranks = Ranks(group.rank, group.size, group.local_rank, group.local_size)
    return ranks, addr, port


class _Agent:
    def __init__(self, opts: Options, group: Group) -> None:
        self.opts, self.group, self.rank = opts, group, group.rank
        self.timeline = Timeline(group.rank, group.size, opts.store)
        self.signals = _Signals()
        self.signals.install()
        want_end = opts.time_margin is not None
        facts = _setup(os.environ, want_end, opts.sign_key) if group.rank == 0 else None
        setup = group.bcast_json(facts)
        if "error" in setup:
            raise AgentError(setup["error"])
        self.end_time: float | None = setup["end_time"]
        if opts.time_margin is not None and self.end_time is None and self.rank == 0:
            _log(0, "the job's end time is unknown: --time-margin has no effect")
        self.ranks, addr, port = _ranks(os.environ, group, setup)
        local = _node_local(group, opts)
        self.votes, self.protector, self.node_drainer, self.no_node_drain = local
        self.server = self._start_server()
        self.server.persister = _persister(group, self.server, opts.sign_key)
        self.drainer: Drainer | None = None
        if opts.drain_to and self.rank == 0:
            from .drainer import Drainer

            self.drainer = Drainer(opts.drain_to, opts.drain_jobs)
        self._decided = 0  # commits the agents' votes decided on so far
        self._ended_well = False  # every agent left the loop in the same tick
        self._seen = 0  # commits whose store the timeline has seen
        self.validator = Validator() if opts.validate and self.rank == 0 else None
        self._validated = 0  # commits handed to the validator so far
        env = child_env(os.environ, self.ranks, addr, port, self.server.address)
        self.child = Child(opts.cmd, env)
        self.signals.child = self.child
        if self.child.error:
            _log(self.rank, self.child.error)
        self.t_req: float | None = None  # monotonic time at which the agents agreed on a request
        self.deadline = 0.0  # monotonic time by which every rank must have committed
        self.outcome: int | None = None  # EXIT_CHECKPOINTED or EXIT_NO_CHECKPOINT once decided
        self.failed: int | None = None  # the rank whose trainer failed first, once known
        self.peers_done = 0  # handed-over saves that some rank has finished
        self.behind: float | None = None  # when this rank's save was first seen finished elsewhere

    def _start_server(self) -> ControlServer:
        """The control socket, on every rank or on none (then all agents raise)."""
        server: ControlServer | None = None
        error = ""
        try:
            server = ControlServer(self.ranks.rank, self.ranks.world_size)
        except OSError as exc:
            error = f"cannot create the control socket: {exc}"
            _log(self.rank, error)
        bad = self.group.exchange([self.rank + 1 if server is None else 0], wait=_nap)[0]
        if bad:
            if server is not None:
                server.close()
            raise AgentError(error or f"rank {bad - 1} could not create its control socket")
        assert server is not None
        return server

    def run(self) -> int:
        try:
            while True:
                tick = time.monotonic()
                try:
                    g = self.group.exchange(
                        self._local(),
                        wait=lambda: self.server.serve(0.005),
                        timeout=self.opts.peer_timeout,
                    )
                except PeersLostError as e:
                    return self._lost(e)
                if g[STUCK]:
                    return self._lost(f"rank {g[STUCK] - 1}'s save is stuck past its timeout")
                self.peers_done = g[DONE]
                self._decide(g)
                self._act_on_commits(g)
                self._note_progress()
                self._feed_validator()
                if g[ALIVE] == 0 and g[VOTES + UNDECIDED] == 0:
                    self._ended_well = True
                    break
                while (left := tick + self.opts.poll - time.monotonic()) > 0:
                    self.server.serve(left)
        finally:
            if self.server.persister is not None:
                self.server.persister.close()
            if self.drainer is not None:
                self.drainer.close(self.opts.grace)
            self._note_progress()
            self._feed_validator()
            if self.validator is not None:
                self.validator.close(self._wait_left())
            if self.protector is not None:
                self.protector.close()
            if self.node_drainer is not None:
                self.node_drainer.close(finish=self._ended_well)
            self.server.close()
        status = self.outcome if self.outcome is not None else self.child.status
        assert status is not None
        trainer_failed = self.failed is not None or (self.outcome is None and status != 0)
        status = with_validation(self.validator, status, trainer_failed)
        self._exited(status)
        return status

    def _note_progress(self) -> None:
        """The trainer's commits (where the store is) and first step, for the job's events."""
        for c in self.server.commits[self._seen :]:
            self.timeline.learn(c.path)
        self._seen = len(self.server.commits)
        if self.server.first_step is not None:
            at, step, store = self.server.first_step
            self.timeline.first_step(step, store, at)

    def _exited(self, status: int, outcome: str | None = None) -> None:
        if outcome is None:
            outcome = _OUTCOMES.get(self.outcome or -1, "completed" if status == 0 else "failed")
        self.timeline.add("exit", outcome=outcome, status=status)
        self.timeline.close()

    def _lost(self, e: PeersLostError | str) -> int:
        """An agent is gone or stuck: stop our trainer and end the whole job (MPI abort), rather
        than wait for the time limit with every other rank blocked."""
        _log(self.rank, f"{e}; stopping the trainer and aborting the job")
        self.child.stop(self.opts.term_timeout)
        deadline = time.monotonic() + self.opts.term_timeout + 5
        while self.child.alive and time.monotonic() < deadline:
            time.sleep(0.05)
            self.child.stop(self.opts.term_timeout)
        self._exited(EXIT_PEERS_LOST, "peers_lost")
        self.group.abort(EXIT_PEERS_LOST)
        return EXIT_PEERS_LOST

    def _act_on_commits(self, g: list[int]) -> None:
        """The next commit decided by the agents' votes: protect it (a node-local one) and
        drain it if it is the K-th; the same on every agent."""
        if self.votes is None:
            return
        paths = [c.path for c in self.server.commits]
        d = self.votes.decide(g[VOTES:], paths, trainers_done=g[ALIVE] == 0)
        if d is not None:
            if d.part and self.protector is not None:
                self.protector.protect(d.path)
            self._decided += 1
            if self.opts.drain_to and self._decided % self.opts.drain_every == 0:
                if not d.part:
                    if self.drainer is not None:
                        self.drainer.due(d.path)
                elif self.node_drainer is not None:
                    self.node_drainer.due = d.path
                elif self.rank == 0:
                    _log(0, f"{d.path} not drained: {self.no_node_drain}")
        if self.protector is not None:
            self.protector.reap()
        if self.node_drainer is not None:
            self.node_drainer.start(busy_anywhere=bool(g[VOTES + DRAINING]))

    def _wait_left(self) -> float:
        """How long the agent may still wait at its end: the grace, less near the job's end."""
        if self.end_time is None:
            return self.opts.grace
        return max(0.0, min(self.opts.grace, self.end_time - time.time() - END_SLACK))

    def _feed_validator(self) -> None:
        if self.validator is not None:
            for c in self.server.commits[self._validated :]:
                self.validator.committed(c.path)
            self._validated = len(self.server.commits)

    def _local(self) -> list[int]:
        """This rank's view, for the MAX-reduce."""
        margin, end = self.opts.time_margin, self.end_time
        late = margin is not None and end is not None and time.time() >= end - margin
        if late and not self.signals.request:
            self.signals.request = TIME_REQ
        alive = self.child.alive
        if not alive:
            self.server.drain()  # a snapshot the trainer handed over just before it ended
        busy = self.server.persister is not None and self.server.persister.busy
        vec = [0] * (VOTES + SLOTS)
        if self.votes is not None:
            vec[VOTES:] = self.votes.vote([c.path for c in self.server.commits])
        if self.node_drainer is not None:
            vec[VOTES + DRAINING] = self.node_drainer.busy()
        vec[REQ] = self.signals.request
        vec[REQ_RANK] = self.rank + 1 if self.signals.request else 0
        vec[ALIVE] = int(alive or busy)  # the agents go on while a handed-over save runs
        if self.t_req is None:
            vec[UNCOMMITTED] = 1
        else:
            committed = self.server.committed_since(self.t_req) is not None
            vec[UNCOMMITTED] = int(not committed)
            # A trainer that ended without committing never will: no need to wait for the grace.
            vec[GIVE_UP] = int(not committed and (time.monotonic() >= self.deadline or not alive))
        if not alive and self.child.status != 0 and not self.child.stopped_by_agent:
            vec[FAILED_RANK] = self.rank + 1
        if self.server.persister is not None:
            vec[DONE] = self.server.persister.finished
            vec[STUCK] = self.rank + 1 if self._stuck(self.server.persister.running()) else 0
        return vec

    def _stuck(self, running: tuple[int, float, float] | None) -> bool:
        """This rank is still in a save that another rank has finished, ``STUCK_SLACK`` seconds
        past that save's timeout: healthy ranks leave a save within its timeout of each other
        (its collectives end it), so this one is stuck in I/O or a hang, and no job may stall
        on it (I8)."""
        if running is None or running[0] > self.peers_done:
            self.behind = None
            return False
        now = time.monotonic()
        if self.behind is None:
            self.behind = now
        return now - self.behind > running[1] + STUCK_SLACK

    def _decide(self, g: list[int]) -> None:
        """Act on what every agent now knows; the same decision on every rank."""
        if self.t_req is None and g[REQ]:
            self._requested(f"{_REASONS.get(g[REQ], 'request')} on rank {g[REQ_RANK] - 1}")
        elif self.t_req is not None and self.outcome is None:
            if g[UNCOMMITTED] == 0:
                self.outcome = EXIT_CHECKPOINTED
                commit = self.server.committed_since(self.t_req)
                if self.rank == 0 and commit is not None:
                    _log(0, f"every rank committed ({commit.path}); stopping the trainer")
            elif g[GIVE_UP]:
                self.outcome = EXIT_NO_CHECKPOINT
                if self.rank == 0:
                    _log(0, "not every rank committed within the grace; stopping the trainer")
        if self.outcome is None and self.failed is None and g[FAILED_RANK]:
            self.failed = g[FAILED_RANK] - 1
            if self.rank == 0 and g[ALIVE]:
                _log(0, f"the trainer of rank {self.failed} failed; stopping the others")
        if self.outcome is not None or self.failed is not None:
            self.child.stop(self.opts.term_timeout)

    def _requested(self, reason: str) -> None:
        now, wall = time.monotonic(), time.time()
        by = wall + self.opts.grace
        if self.end_time is not None:
            by = min(by, self.end_time - self.opts.term_timeout - END_SLACK)
        by = max(by, wall)
        self.t_req, self.deadline = now, now + (by - wall)
        self.signals.pending = True
        self.server.announce(reason, by)
        self.timeline.add("preempt", reason=reason.split(" on rank")[0], deadline=by)
        if self.rank == 0:
            _log(0, f"checkpoint requested ({reason}); waiting up to {by - wall:.0f} s for commits")


def _node_local(
    group: Group, opts: Options
) -> tuple[Votes | None, Protector | None, NodeDrainer | None, str]:
    """With ``--protect`` or ``--drain-to``: the vote on each commit, the protector, the drainer
    of node-local checkpoints (or why there is none), on every agent or on none (then all
    raise). Every agent calls this (an exchange): the agents must agree on these options;
    protecting and draining node-local checkpoints need their MPI world with
    MPI_THREAD_MULTIPLE."""
    from ..objstore.url import is_url

    wanted = opts.protect is not None or opts.drain_to is not None
    log = _logger(group.rank)
    comm = None
    if isinstance(group, MPIGroup) and group.MPI.Query_thread() == group.MPI.THREAD_MULTIPLE:
        comm = group.comm
    protector: Protector | None = None
    node_drainer: NodeDrainer | None = None
    problem, node = "", ""
    if wanted:
        from ..localcommit import node_name

        try:
            node = node_name(opts.node if opts.node is not None else True)
        except ValueError as e:
            problem = f"--node: {e}"
    if not problem and opts.protect is not None:
        if comm is not None:
            protector = Protector(comm, group.rank, opts.protect, node, log)
        else:
            problem = "--protect needs MPI among the agents (srun --mpi=pmi2, mpiexec) and "
            problem += "MPI_THREAD_MULTIPLE"
    dst = opts.drain_to
    if dst is not None and not is_url(dst):
        dst = os.path.abspath(dst)
        if comm is not None and not problem:
            from .nodedrainer import NodeDrainer

            node_drainer = NodeDrainer(comm, group.rank, node, dst, opts.drain_jobs, log)
    said = zlib.crc32(json.dumps([opts.protect, dst, opts.drain_every]).encode())
    vec = [-said, said, group.rank + 1 if problem else 0, int(node_drainer is None)]
    low, high, bad, none = group.exchange(vec, wait=_nap)
    if -low != high:
        raise AgentError("the agents were given different --protect or --drain-to options")
    if bad:
        raise AgentError(problem or f"rank {bad - 1} cannot protect or drain: see its log")
    if not wanted:  # on every agent: their options agree
        return None, None, None, ""
    why = ""
    if none:
        node_drainer = None
        why = "a node-local checkpoint is drained by every agent together, into a directory "
        why += "every node sees, over MPI with MPI_THREAD_MULTIPLE among the agents"
    return Votes(group.rank, log), protector, node_drainer, why


def _logger(rank: int) -> Callable[[str], None]:
    return lambda message: _log(rank, message)


def _persister(group: Group, server: ControlServer, sign_key: str | None) -> Persister | None:
    """The handoff's saver, on its own communicator (a collective: every agent calls this);
    ``sign_key`` signs the saves whose options name no key."""
    if isinstance(group, MPIGroup):
        if group.MPI.Query_thread() != group.MPI.THREAD_MULTIPLE:
            return None  # the save's thread and the agreement loop both use MPI
        return Persister(MPICoordinator(group.comm), server.finished, sign_key)
    return Persister(LocalCoordinator(), server.finished, sign_key)


def run(opts: Options) -> int:
    """Run the agent of this rank until every rank's trainer has ended; the exit status."""
    if not opts.cmd:
        raise AgentError("no command to run (ckptguard run [OPTIONS] -- CMD ...)")
    group = open_group(os.environ)
    try:
        return _Agent(opts, group).run()
    finally:
        group.close()
