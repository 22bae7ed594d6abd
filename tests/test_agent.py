"""``ckptguard run``: the per-rank agent, with real processes (mpiexec + MPICH), and its parts.

Each launch runs ``mpiexec -n N sh -c 'ckptguard run ... -- python tests/agent/trainer.py ...'``;
the ``sh`` records each agent's own exit status in OUT/agent-R. No Slurm is needed: Slurm's
variables are faked per rank with mpiexec's ``-env``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_command
from faultkit import check_handoff, handoff_expected
from mpikit import launcher_free_environ, need_mpi

import ckptguard
from ckptguard import events
from ckptguard.agent import client, protocol
from ckptguard.agent.control import ControlServer
from ckptguard.agent.endtime import parse_slurm_time
from ckptguard.agent.protocol import EXIT_CHECKPOINTED, EXIT_NO_CHECKPOINT
from ckptguard.agent.rankenv import (
    Ranks,
    child_env,
    first_host,
    slurm_master_port,
    slurm_ranks,
    tasks_on_node,
)

HERE = Path(__file__).resolve().parent
TRAINER = str(HERE / "agent" / "trainer.py")
AGENT = [sys.executable, "-m", "ckptguard.cli", "run"]
WRAP = 'rc=0; "$@" || rc=$?; echo $rc > "$OUT/agent-${PMI_RANK:-0}"; exit $rc'

pytestmark = pytest.mark.timeout(90)  # each launch has its own, shorter timeouts


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The test's environment without launcher, Slurm, rank or agent variables."""
    return {**launcher_free_environ(), "TMPDIR": str(tmp), "OUT": str(tmp / "out"), **extra}


class Launch:
    """``mpiexec -n N`` agents around the test trainer, in their own session, with a log."""

    def __init__(self, tmp: Path, n: int, agent: list[str], trainer: list[str], **env: str):
        self.tmp, self.out = tmp, tmp / "out"
        self.out.mkdir(exist_ok=True)
        self.log = open(tmp / "launch.log", "w+")  # noqa: SIM115 - closed in wait()
        cmd = ["sh", "-c", WRAP, "sh", *AGENT, *agent, "--", sys.executable, TRAINER, *trainer]
        self.proc = subprocess.Popen(
            [need_mpi(), "-n", str(n), *cmd],
            env=clean_env(tmp, **env),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.n = n

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"the launch did not end within {timeout} s:\n{self.text()[-5000:]}")
        finally:
            print(self.text()[-5000:])  # shown when a test fails

    def text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def agent_codes(self) -> list[int]:
        return [int((self.out / f"agent-{r}").read_text()) for r in range(self.n)]

    def ready(self, timeout: float = 25) -> list[dict]:
        """Each rank's ready file (its agent's pid), once every trainer runs."""
        deadline = time.monotonic() + timeout
        files = [self.out / f"ready-{r}.json" for r in range(self.n)]
        while not all(f.exists() for f in files):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.wait(1)
                pytest.fail(f"the trainers did not all start:\n{self.text()[-5000:]}")
            time.sleep(0.05)
        return [json.loads(f.read_text()) for f in files]

    def read(self, pattern: str) -> list[dict]:
        return [json.loads((self.out / pattern.format(r)).read_text()) for r in range(self.n)]


def no_sockets_left(tmp: Path) -> bool:
    return not list(tmp.glob("ckptguard-agent-*"))


# ---- through real processes ----


@pytest.mark.backend_independent  # starts no save or load
def test_rank_variables_per_rank(tmp_path: Path) -> None:
    run = Launch(tmp_path, 4, [], ["env", str(tmp_path / "out")], MASTER_ADDR="127.0.0.1")
    assert run.wait() == 0
    infos = run.read("rank-{}.json")
    assert [i["RANK"] for i in infos] == ["0", "1", "2", "3"]
    assert [i["LOCAL_RANK"] for i in infos] == ["0", "1", "2", "3"]  # one node
    assert {i["WORLD_SIZE"] for i in infos} == {"4"}
    assert {i["LOCAL_WORLD_SIZE"] for i in infos} == {"4"}
    assert {i["MASTER_ADDR"] for i in infos} == {"127.0.0.1"}  # the user's value wins
    assert len({i["MASTER_PORT"] for i in infos}) == 1  # rank 0's free port, broadcast
    assert 0 < int(infos[0]["MASTER_PORT"]) < 65536
    sockets = {i["CKPTGUARD_AGENT"] for i in infos}
    assert len(sockets) == 4 and all(s.startswith(str(tmp_path)) for s in sockets)
    assert all(i["launcher_vars"] == [] for i in infos)  # the trainer is not in the agents' MPI
    assert run.agent_codes() == [0, 0, 0, 0]
    assert no_sockets_left(tmp_path)


@pytest.mark.backend_independent  # starts no save or load
def test_rank_variables_from_slurm(tmp_path: Path) -> None:
    """Slurm's variables when they match the agents' MPI world; MPI's when they do not."""
    mpiexec = need_mpi()
    agent = [*AGENT, "--", sys.executable, TRAINER, "env", str(tmp_path / "out")]
    (tmp_path / "out").mkdir()
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_JOB_ID": "1234",
        "SLURM_STEP_ID": "3",
        "SLURM_STEP_NODELIST": f"{socket.gethostname()},zz[07-09]",
        "SLURM_STEP_TASKS_PER_NODE": "2",
        "SLURM_NODEID": "0",
    }

    def launch(procids: list[int]) -> list[dict]:
        cmd = [mpiexec]
        for procid in procids:
            cmd += ["-n", "1", "-env", "SLURM_PROCID", str(procid), "-env", "SLURM_LOCALID"]
            cmd += [str(procid), *agent, ":"]
        done = subprocess.run(
            cmd[:-1], env=clean_env(tmp_path, **slurm), capture_output=True, text=True, timeout=25
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return [json.loads((tmp_path / "out" / f"rank-{r}.json").read_text()) for r in (0, 1)]

    infos = launch([0, 1])
    port = str(20000 + (16 * 1234 + 3) % 12000)
    assert [(i["RANK"], i["LOCAL_RANK"]) for i in infos] == [("0", "0"), ("1", "1")]
    assert {(i["WORLD_SIZE"], i["LOCAL_WORLD_SIZE"]) for i in infos} == {("2", "2")}
    assert {(i["MASTER_ADDR"], i["MASTER_PORT"]) for i in infos} == {(socket.gethostname(), port)}
    infos = launch([1, 0])  # SLURM_PROCID disagrees with the MPI rank: MPI's view, on every rank
    assert [(i["RANK"], i["LOCAL_RANK"]) for i in infos] == [("0", "0"), ("1", "1")]
    assert len({i["MASTER_PORT"] for i in infos}) == 1 and infos[0]["MASTER_PORT"] != port


@pytest.mark.backend_independent  # starts no save or load
def test_exit_status_propagates(tmp_path: Path) -> None:
    run = Launch(tmp_path, 4, [], ["env", str(tmp_path / "out"), "2", "3"])
    assert run.wait() == 3
    assert run.agent_codes() == [0, 0, 3, 0]


@pytest.mark.backend_independent  # starts no save or load
def test_signalled_child_is_128_plus_signal(tmp_path: Path) -> None:
    """A lone agent (no mpiexec: an MPI singleton) reports a SIGKILLed trainer as 137."""
    cmd = [*AGENT, "--", sys.executable, TRAINER, "env", str(tmp_path), "0", "SIGKILL"]
    done = subprocess.run(cmd, env=clean_env(tmp_path), capture_output=True, timeout=25)
    assert done.returncode == 128 + signal.SIGKILL, done.stderr
    assert json.loads((tmp_path / "rank-0.json").read_text())["WORLD_SIZE"] == "1"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie nobody reaps yet
    except FileNotFoundError:
        return True


@pytest.mark.backend_independent  # starts no save or load
def test_trainer_has_its_own_group_and_dies_with_its_agent(tmp_path: Path) -> None:
    cmd = [*AGENT, "--", sys.executable, TRAINER, "sleep", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=clean_env(tmp_path), stderr=subprocess.DEVNULL)
    info: dict = {}
    try:
        ready = tmp_path / "ready-0.json"
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert info["agent"] == proc.pid and info["pgid"] == info["pid"] != os.getpgid(0)
        proc.kill()
        proc.wait(5)
        deadline = time.monotonic() + 5
        while not _gone(info["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(info["pid"])
    finally:
        proc.kill()
        proc.wait(5)
        if info and not _gone(info["pid"]):
            os.kill(info["pid"], signal.SIGKILL)


@pytest.mark.backend_independent  # starts no save or load
def test_missing_command_is_127(tmp_path: Path) -> None:
    cmd = [*AGENT, "--", str(tmp_path / "no-such-trainer")]
    done = subprocess.run(cmd, env=clean_env(tmp_path), capture_output=True, text=True, timeout=25)
    assert done.returncode == 127
    assert "command not found" in done.stderr


@pytest.mark.backend_independent  # starts no save or load
def test_agents_that_cannot_agree_refuse_to_start(tmp_path: Path) -> None:
    """srun without MPI wiring: each agent alone in its MPI world, though Slurm says 2 tasks."""
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}
    cmd = [*AGENT, "--", sys.executable, "-c", "pass"]
    env = clean_env(tmp_path, **slurm)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=25)
    assert done.returncode == 2
    assert "error: SLURM_NTASKS=2 but the agents' MPI world has one rank" in done.stderr


@pytest.mark.backend_independent  # a timeout, a signal or a race: the same on both backends
def test_sigusr1_to_one_agent_checkpoints_every_rank(tmp_path: Path) -> None:
    store = tmp_path / "store"
    run = Launch(tmp_path, 4, ["--grace", "20"], ["train", str(tmp_path / "out"), str(store)])
    agents = [r["agent"] for r in run.ready()]
    os.kill(agents[2], signal.SIGUSR1)
    assert run.wait() == EXIT_CHECKPOINTED
    assert run.agent_codes() == [EXIT_CHECKPOINTED] * 4
    saved = run.read("saved-{}.json")
    assert len({s["path"] for s in saved}) == 1  # one collective save, the same step everywhere
    assert all(s["notified"] is True for s in saved)
    assert all(s["reason"] == "SIGUSR1 on rank 2" for s in saved)
    assert all(s["callback"] == ["SIGUSR1 on rank 2"] for s in saved)
    assert all((run.out / f"term-{r}").exists() for r in range(4))  # stopped with SIGTERM
    assert ckptguard.verify(saved[0]["path"]).ok
    latest = ckptguard.Store(store).latest()
    assert latest is not None and latest.path == saved[0]["path"]
    assert no_sockets_left(tmp_path)
    # Rank 0's agent recorded the job's events in the store its trainer committed to, in order.
    got = events.read(store).records
    job = [e for e in got if e["kind"] in ("start", "first_step", "preempt", "exit")]
    assert [e["kind"] for e in job] == ["start", "first_step", "preempt", "exit"], got
    assert job[0]["world_size"] == 4 and job[1]["step"] == 1
    assert job[2]["reason"] == "SIGUSR1"
    assert (job[3]["outcome"], job[3]["status"]) == ("checkpointed", EXIT_CHECKPOINTED)
    (save,) = [e for e in got if e["kind"] == "save"]
    assert save["world_size"] == 4 and save["checkpoint"] == latest.name
    assert job[2]["time"] <= save["time"] <= job[3]["time"]
    assert {e["rank"] for e in got if e["kind"] != "verify"} == {0}  # the test verified


@pytest.mark.backend_independent  # a timeout, a signal or a race: the same on both backends
def test_no_commit_within_grace(tmp_path: Path) -> None:
    """Rank 1 ignores SIGTERM: it is SIGKILLed after --term-timeout; everyone exits 86."""
    args = ["--grace", "2", "--term-timeout", "1"]
    trainer = ["train", str(tmp_path / "out"), str(tmp_path / "store"), "nocommit"]
    run = Launch(tmp_path, 4, args, trainer)
    agents = [r["agent"] for r in run.ready()]
    t0 = time.monotonic()
    os.kill(agents[0], signal.SIGUSR1)
    assert run.wait() == EXIT_NO_CHECKPOINT
    assert time.monotonic() - t0 < 15  # well before the trainers' own 25 s end
    assert run.agent_codes() == [EXIT_NO_CHECKPOINT] * 4
    assert all(s["notified"] is None for s in run.read("saved-{}.json"))
    assert [(run.out / f"term-{r}").exists() for r in range(4)] == [True, False, True, True]
    assert "not every rank committed" in run.text()


@pytest.mark.backend_independent  # a timeout, a signal or a race: the same on both backends
def test_second_sigterm_goes_to_the_trainer_at_once(tmp_path: Path) -> None:
    trainer = ["train", str(tmp_path / "out"), str(tmp_path / "store"), "nocommit"]
    # The others may block in a collective with the dead rank 3, deaf to SIGTERM: SIGKILL soon.
    run = Launch(tmp_path, 4, ["--grace", "20", "--term-timeout", "2"], trainer)
    agents = [r["agent"] for r in run.ready()]
    t0 = time.monotonic()
    os.kill(agents[3], signal.SIGTERM)  # a request
    time.sleep(0.5)
    os.kill(agents[3], signal.SIGTERM)  # forwarded: trainer 3 ends without a commit
    assert run.wait() == EXIT_NO_CHECKPOINT
    assert time.monotonic() - t0 < 10  # not the 20 s grace
    assert "checkpoint requested (SIGTERM on rank 3)" in run.text()
    assert (run.out / "term-3").exists()


@pytest.mark.backend_independent  # a timeout, a signal or a race: the same on both backends
def test_time_margin_requests_a_checkpoint(tmp_path: Path) -> None:
    end = time.time() + 100
    args = ["--grace", "20", "--time-margin", "99"]
    trainer = ["train", str(tmp_path / "out"), str(tmp_path / "store")]
    run = Launch(tmp_path, 4, args, trainer, CKPTGUARD_END_TIME=f"{end:.3f}")
    assert run.wait() == EXIT_CHECKPOINTED
    saved = run.read("saved-{}.json")
    assert all(s["reason"].startswith("time limit on rank") for s in saved)
    assert all(s["notified"] is True for s in saved)


def _node_local_job(tmp_path: Path, agent: list[str], **env: str) -> subprocess.CompletedProcess:
    """Agents with options ``agent`` on nodes a (ranks 0, 1), b and c (CKPTGUARD_NODE per rank)
    around trainers that save to BASE/shared, then twice node-local into BASE/NODE/store, and
    exit (tests/agent/trainer.py nodelocal)."""
    base, out = tmp_path / "nodes", tmp_path / "out"
    out.mkdir(exist_ok=True)
    inner = ["sh", "-c", WRAP, "sh", *AGENT, *agent, "--"]
    inner += [sys.executable, TRAINER, "nodelocal", out, base]
    cmd: list[str | Path] = [need_mpi()]
    for r, host in enumerate(["a", "a", "b", "c"]):
        cmd += [":"] * (r > 0) + ["-n", "1", "-env", "CKPTGUARD_NODE", host, *inner]
    return run_command(cmd, 90, env=clean_env(tmp_path, **env))


@pytest.mark.backend_independent  # files move as they are; the saves run on both elsewhere
def test_agents_protect_and_drain_each_node_local_checkpoint_and_a_lost_node_rebuilds(
    tmp_path: Path,
) -> None:
    """``--protect xor --drain-to PFS``: nodes a (ranks 0, 1), b and c, told apart by
    CKPTGUARD_NODE per rank. The trainers save to a shared store, then twice node-local, and
    exit; the agents protect both node-local checkpoints and leave the shared one alone. Rank 0
    drains the shared one; all agents drain each node-local one together, the second once the
    first is done, before they exit. Node c is then lost, and a node c2 with an empty disk
    rebuilds its files, byte for byte."""
    from nodekit import lose_and_rebuild

    from ckptguard.redundancy.protect import level

    base, out, pfs = tmp_path / "nodes", tmp_path / "out", tmp_path / "pfs"
    agent = ["--protect", "xor", "--protect-rate", "100MB", "--poll", "0.2"]
    ran = _node_local_job(tmp_path, [*agent, "--drain-to", str(pfs)])
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert [int((out / f"agent-{r}").read_text()) for r in range(4)] == [0] * 4
    assert "step-10 protected (xor" in ran.stderr and "step-20 protected (xor" in ran.stderr
    for host in "abc":
        for name in ("step-10", "step-20"):
            assert level(str(base / host / "store" / name)) == "protected", (host, name)
    assert not (base / "shared" / ".redundancy").exists()  # saved whole: left alone
    assert [i.name for i in ckptguard.Store(pfs).list()] == ["step-0", "step-10", "step-20"]
    assert ckptguard.Store(pfs).latest_name() == "step-20"
    for name in ("step-0", "step-10", "step-20"):
        assert ckptguard.verify(pfs / name).ok, name
    assert f"drained {base / 'a' / 'store' / 'step-10'} to {pfs / 'step-10'}" in ran.stderr
    lose_and_rebuild(base, "c", "a,a,b,c2", tmp_path / "lost-c")


@pytest.mark.backend_independent  # files move as they are; the saves run on both elsewhere
def test_an_agent_killed_mid_protection_leaves_each_checkpoint_at_its_real_level(
    tmp_path: Path,
) -> None:
    """Rank 2's agent is killed (SIGKILL) once its node's parity record is installed, before the
    nodes agree on the protection: the job fails, no node claims a protection, and protecting
    again from the nodes' stores completes, after which a lost node rebuilds."""
    from nodekit import lose_and_rebuild, run_nodes

    from ckptguard.redundancy.protect import level

    kill = "protect.record_installed:2:kill"
    args = ["--protect", "xor", "--poll", "0.2", "--peer-timeout", "10"]
    ran = _node_local_job(tmp_path, args, CKPTGUARD_FAILPOINT=kill)
    assert ran.returncode != 0, ran.stdout + ran.stderr
    assert "failpoint protect.record_installed on rank 2: kill" in ran.stderr, ran.stderr
    base = tmp_path / "nodes"
    for host in "abc":
        for name in ("step-10", "step-20"):
            if (base / host / "store" / name).exists():
                assert level(str(base / host / "store" / name)) == "local", (host, name)
    out = run_nodes("reprotect", "xor", str(base), "a,a,b,c")
    assert [o.get("level") for o in out] == ["protected"] * 4, out
    lose_and_rebuild(base, "c", "a,a,b,c2", tmp_path / "lost-c")


@pytest.mark.backend_independent  # starts no save
def test_protect_options_are_checked_before_any_trainer_starts(tmp_path: Path) -> None:
    """Options of --protect given without it, a bad rate, or agents given different ones are
    refused at start, before any trainer runs, with a message that names the option."""
    env = clean_env(tmp_path)
    args = [*AGENT, "--protect-rate", "1GB", "--", "true"]
    bad = run_command(args, 30, env=env)
    assert bad.returncode == 2 and "need --protect" in bad.stderr, bad.stderr
    for rate in ("fast", "0"):
        args = [*AGENT, "--protect", "xor", "--protect-rate", rate, "--", "true"]
        bad = run_command(args, 30, env=env)
        assert bad.returncode == 2 and "--protect-rate" in bad.stderr, bad.stderr
    # agents that would protect on some ranks only would mix their collectives: none starts
    ran = tmp_path / "ran"
    trainer = ["--", "sh", "-c", f"touch {ran}"]
    mixed = [need_mpi(), "-n", "1", *AGENT, "--protect", "xor", *trainer, ":"]
    mixed += ["-n", "1", *AGENT, *trainer]
    bad = run_command(mixed, 60, env=env)
    assert bad.returncode != 0 and "different --protect or --drain-to" in bad.stderr, bad.stderr
    bad = run_command([*AGENT, "--protect", "xor", "--node", "a\tb", *trainer], 30, env=env)
    assert bad.returncode == 2 and "--node: a node name must be" in bad.stderr, bad.stderr
    assert not ran.exists()


# ---- the trainer's side and the control socket, in-process ----


@pytest.mark.backend_independent  # starts no save or load
def test_no_agent_means_no_request(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(protocol.ENV_ADDRESS, raising=False)
    assert ckptguard.checkpoint_requested() is False
    assert client.checkpoint_request() is None
    assert client.notify_committed(tmp_path / "ckpt") is False
    client.on_checkpoint_request(lambda req: pytest.fail("called without an agent"))


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[ControlServer]:
    """A control server served by a thread, with the client pointed at it."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    server = ControlServer(rank=3, world_size=8)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            server.serve(0.01)

    thread = threading.Thread(target=serve)
    thread.start()
    monkeypatch.setenv(protocol.ENV_ADDRESS, server.address)
    monkeypatch.setattr(client, "_sub", None)
    try:
        yield server
    finally:
        stop.set()
        thread.join(5)
        server.close()
        monkeypatch.setattr(client, "_sub", None)
    assert not os.path.exists(server.dir)


@pytest.mark.backend_independent  # starts no save or load
def test_client_sees_the_request_and_reports_commits(agent: ControlServer) -> None:
    assert oct(os.stat(agent.dir).st_mode & 0o777) == "0o700"
    got: list[client.CheckpointRequest] = []
    fired = threading.Event()
    client.on_checkpoint_request(lambda req: (got.append(req), fired.set()))
    assert ckptguard.checkpoint_requested() is False
    agent.announce("SIGUSR1 on rank 5", 1234.5)
    assert fired.wait(5)
    assert ckptguard.checkpoint_requested() is True
    assert got == [client.CheckpointRequest("SIGUSR1 on rank 5", 1234.5)]
    late: list[client.CheckpointRequest] = []
    client.on_checkpoint_request(late.append)  # registered after the request: called at once
    assert late == got
    t = time.monotonic()
    assert client.notify_committed("ckpts/step-7", step=7) is True
    commit = agent.committed_since(t)
    assert commit is not None and commit.step == 7
    assert commit.path == os.path.abspath("ckpts/step-7")


@pytest.mark.backend_independent  # starts no save or load
def test_a_late_subscriber_hears_of_an_earlier_request(agent: ControlServer) -> None:
    agent.announce("time limit on rank 0", None)
    time.sleep(0.05)
    assert ckptguard.checkpoint_requested() is True
    assert client.checkpoint_request() == client.CheckpointRequest("time limit on rank 0", None)


@pytest.mark.backend_independent  # starts no save or load
def test_server_refuses_bad_messages(agent: ControlServer) -> None:
    def ask(line: bytes) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(agent.address)
            s.sendall(line)
            return json.loads(s.makefile("rb").readline())

    assert ask(b'{"v":1,"op":"hello","pid":1}\n')["rank"] == 3
    assert ask(b'{"v":2,"op":"hello"}\n')["op"] == "error"  # another protocol version
    assert ask(b"not json\n")["op"] == "error"
    assert ask(b'{"v":1,"op":"committed","path":7}\n')["op"] == "error"
    assert ask(b'{"v":1,"op":"dance"}\n')["op"] == "error"
    assert agent.commits == []


@pytest.mark.backend_independent  # starts no save or load
def test_unreachable_agent_warns_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(protocol.ENV_ADDRESS, str(tmp_path / "gone.sock"))
    monkeypatch.setattr(client, "_sub", None)
    monkeypatch.setattr(client, "_unreachable", None)
    with pytest.warns(RuntimeWarning, match="cannot reach the agent"):
        assert ckptguard.checkpoint_requested() is False
    assert ckptguard.checkpoint_requested() is False  # no second attempt, no second warning
    with pytest.warns(RuntimeWarning, match="did not take the commit"):
        assert client.notify_committed(tmp_path) is False


# ---- pure parts ----


@pytest.mark.backend_independent  # starts no save or load
def test_slurm_parsing() -> None:
    assert first_host("node[001-004,7],gpu[1-2]") == "node001"
    assert first_host("rack[2-3]-n[08-09]") == "rack2-n08"
    assert first_host("login1,node[1-2]") == "login1"
    assert tasks_on_node("2(x3),1", 2) == 2 and tasks_on_node("2(x3),1", 3) == 1
    assert tasks_on_node("4", 1) is None and tasks_on_node("x", 0) is None
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert slurm_ranks(env) == Ranks(5, 8, 1, -1)
    env |= {"SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "1"}
    assert slurm_ranks(env) == Ranks(5, 8, 1, 4)
    assert slurm_ranks({"SLURM_JOB_ID": "7"}) is None
    assert slurm_master_port({"SLURM_JOB_ID": "7"}) == 20112
    assert parse_slurm_time("1700000000") == 1700000000.0
    assert parse_slurm_time("Unknown") is None and parse_slurm_time("N/A") is None
    assert parse_slurm_time("2030-01-02T03:04:05") is not None


@pytest.mark.backend_independent  # starts no save or load
def test_child_env_keeps_user_values_and_drops_launcher_vars() -> None:
    env = {"MASTER_PORT": "999", "PMI_RANK": "3", "MPI_LOCALNRANKS": "4", "PATH": "/bin"}
    out = child_env(env, Ranks(3, 4, 1, 2), "host0", 1234, "/tmp/x/control.sock")
    assert out["MASTER_PORT"] == "999" and out["MASTER_ADDR"] == "host0"
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"], out["LOCAL_WORLD_SIZE"]) == (
        "3",
        "4",
        "1",
        "2",
    )
    assert out[protocol.ENV_ADDRESS] == "/tmp/x/control.sock"
    assert "PMI_RANK" not in out and "MPI_LOCALNRANKS" not in out and out["PATH"] == "/bin"


@pytest.mark.backend_independent  # starts no save or load
def test_protocol_lines() -> None:
    line = protocol.encode("committed", path="/a", step=None)
    assert line.endswith(b"\n") and protocol.decode(line) == {
        "v": 1,
        "op": "committed",
        "path": "/a",
        "step": None,
    }
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(b'["v", 1]')
    reader = protocol.LineReader()
    assert reader.feed(b'{"a"') == [] and reader.feed(b":1}\n{") == [b'{"a":1}']
    with pytest.raises(protocol.ProtocolError):
        reader.feed(b"x" * (protocol.MAX_LINE + 1))


# ---- the snapshot handoff ----


@pytest.mark.backend_independent  # starts no save or load
def test_an_agent_that_only_supervises_starts_without_torch() -> None:
    """The agent's start imports neither torch nor the save path: it starts beside trainers that
    import them, on the same cores; the handed-over save is imported with the first pool."""
    code = "import json, sys, ckptguard.cli.run, ckptguard.agent.runner as r;"
    code += "print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert not loaded & {"torch", "ckptguard.saver", "ckptguard.agent.handover", "ckptguard.sign"}


@pytest.mark.backend_independent  # starts no save
def test_an_agent_that_cannot_load_the_save_path_tells_the_trainer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A handed-over save the agent cannot import its machinery for is refused with a
    HandoffError the trainer receives; nothing is queued and the persister stays usable."""
    import ckptguard.agent
    from ckptguard.agent.persist import Persister
    from ckptguard.coord.base import LocalCoordinator

    monkeypatch.delattr(ckptguard.agent, "handover", raising=False)
    monkeypatch.setitem(sys.modules, "ckptguard.agent.handover", None)  # import fails
    persister = Persister(LocalCoordinator(), lambda token, reply: None)
    fd = os.memfd_create("pool")
    os.ftruncate(fd, 4096)
    persister.add_pool(1, 0, fd, 4096)
    msg = {"pool": 0, "path": "/tmp/s/x", "options": {}, "tensors": []}
    with pytest.raises(protocol.HandoffError, match="cannot save a handed-over snapshot"):
        persister.submit(1, "token", msg)
    assert not persister.busy
    persister.close()


@pytest.mark.rank_job
def test_handoff_saves_commit_through_the_agents(tmp_path: Path) -> None:
    """Snapshots go to the agents through shared memory; the agents write and commit them."""
    store = tmp_path / "store"
    run = Launch(tmp_path, 4, [], ["handoff", str(tmp_path / "out"), str(store)])
    assert run.wait(60) == 0
    for rep in run.read("handoff-{}.json"):
        assert rep == {"names": ["h0", "h1", "h2"], "handed": [True, True, True]}
    for i in range(3):
        check_handoff(store / f"h{i}", handoff_expected(4, i))


@pytest.mark.rank_job
def test_handed_over_snapshot_commits_after_the_trainer_dies(tmp_path: Path) -> None:
    """Every trainer exits (status 7) right after save_async returned: the save still commits."""
    store = tmp_path / "store"
    run = Launch(tmp_path, 4, [], ["handoff", str(tmp_path / "out"), str(store), "crash"])
    assert run.wait(60) == 7
    assert run.agent_codes() == [7] * 4
    want = handoff_expected(4, 0)
    want["step"] = 0
    check_handoff(store / "crash", want)
    assert ckptguard_latest(store) == "crash"


def ckptguard_latest(store: Path) -> str | None:
    import ckptguard

    return ckptguard.Store(store).latest_name()


@pytest.mark.rank_job
def test_agent_drains_every_kth_checkpoint(tmp_path: Path) -> None:
    """--drain-to DST --drain-every 2: rank 0's agent copies the 2nd of 3 commits to DST, verified,
    before it exits."""
    import ckptguard

    store, dst = tmp_path / "store", tmp_path / "durable"
    agent = ["--drain-to", str(dst), "--drain-every", "2", "--drain-jobs", "2"]
    run = Launch(tmp_path, 4, agent, ["handoff", str(tmp_path / "out"), str(store)])
    assert run.wait(60) == 0
    assert sorted(p.name for p in dst.iterdir() if not p.name.startswith(".")) == ["LATEST", "h1"]
    assert ckptguard.verify(dst / "h1").ok
    check_handoff(dst / "h1", handoff_expected(4, 1))
    assert "drained" in run.text() and "h1" in run.text()
