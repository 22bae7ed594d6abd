"""Against a real Slurm cluster (slurm/local-cluster.sh start): srun tasks and MPI ranks, sbatch,
and a signal delivered to a running step. Skipped when there is no cluster; with CI=true a missing
cluster fails, since `make test` starts one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import run_command
from slurmkit import clean_env

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "slurm" / "train.sbatch"
TIMEOUT = 30  # seconds for one Slurm command

pytestmark = pytest.mark.timeout(90)


def _lines(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.strip()]


@pytest.mark.backend_independent  # starts no save or load
def test_srun_four_tasks(job: list[str]) -> None:
    code = "import os; print(os.environ['SLURM_PROCID'], os.environ['SLURM_NTASKS'])"
    proc = run_command(["srun", *job, "-n", "4", sys.executable, "-c", code], TIMEOUT)
    assert proc.returncode == 0
    assert sorted(_lines(proc.stdout)) == [[str(r), "4"] for r in range(4)]


@pytest.mark.backend_independent  # starts no save or load
def test_mpi_ranks_over_srun(job: list[str]) -> None:
    """The MPICH wheel from PyPI gets its ranks from Slurm's pmi2 plugin: no mpiexec."""
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install '.[mpi]')")
    code = (
        "import os; from mpi4py import MPI; c = MPI.COMM_WORLD; "
        "print(os.environ['SLURM_PROCID'], c.Get_rank(), c.Get_size(), c.allreduce(1))"
    )
    proc = run_command(["srun", *job, "--mpi=pmi2", "-n", "4", sys.executable, "-c", code], TIMEOUT)
    assert proc.returncode == 0
    # rank == SLURM_PROCID, four distinct ranks of one world of 4, and a collective across them
    assert sorted(_lines(proc.stdout)) == [[str(r), str(r), "4", "4"] for r in range(4)]


@pytest.mark.backend_independent  # starts no save or load
def test_sbatch_wait_writes_output(job: list[str], tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text(
        textwrap.dedent(
            """\
            #!/bin/bash
            #SBATCH --ntasks=2
            srun bash -c 'echo "task $SLURM_PROCID of $SLURM_NTASKS"'
            echo "batch done $SLURM_JOB_ID"
            """
        )
    )
    out = tmp_path / "out-%j.txt"
    proc = run_command(
        ["sbatch", *job, "--wait", "--parsable", f"--chdir={tmp_path}", f"--output={out}", script],
        TIMEOUT,
    )
    assert proc.returncode == 0
    job_id = proc.stdout.strip().split(";")[0]
    text = (tmp_path / f"out-{job_id}.txt").read_text()
    assert f"batch done {job_id}" in text
    assert sorted(line for line in text.splitlines() if line.startswith("task ")) == [
        "task 0 of 2",
        "task 1 of 2",
    ]


@pytest.mark.backend_independent  # starts no save or load
def test_scancel_usr1_reaches_the_task(job: list[str], tmp_path: Path) -> None:
    """`scancel --signal=USR1 JOB.STEP` (what `#SBATCH --signal=USR1@120` does before the time
    limit) reaches a task that traps it, and the task lives on to act on it."""
    task = tmp_path / "task.py"
    task.write_text(
        textwrap.dedent(
            """\
            import os, signal, sys, time

            out = sys.argv[1]

            def on_usr1(signum, frame):
                with open(os.path.join(out, "got-usr1"), "w") as f:
                    f.write(str(signum))
                sys.exit(0)

            signal.signal(signal.SIGUSR1, on_usr1)
            step = os.environ["SLURM_JOB_ID"] + "." + os.environ["SLURM_STEP_ID"]
            with open(os.path.join(out, "ready.tmp"), "w") as f:
                f.write(step)
            os.rename(os.path.join(out, "ready.tmp"), os.path.join(out, "ready"))
            time.sleep(50)
            sys.exit(3)  # no signal came
            """
        )
    )
    srun = subprocess.Popen(
        ["srun", *job, "-n", "1", sys.executable, str(task), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
    )
    try:
        ready = tmp_path / "ready"
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists() and srun.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), f"the task never started: srun exit {srun.poll()}"
        step = ready.read_text()
        assert run_command(["scancel", "--signal=USR1", step], TIMEOUT).returncode == 0
        out, _ = srun.communicate(timeout=TIMEOUT)
        print(out)
    finally:
        if srun.poll() is None:
            srun.kill()
            srun.wait()
    assert (tmp_path / "got-usr1").read_text() == str(int(signal.SIGUSR1))
    assert srun.returncode == 0


@pytest.mark.parametrize(
    "template, sized",
    [
        ("train.sbatch", ["--nodes=1", "--ntasks-per-node=4", "--cpus-per-task=1"]),
        ("verify.sbatch", ["--nodes=1", "--ntasks-per-node=4", "--cpus-per-task=1"]),
        ("drain.sbatch", ["--cpus-per-task=1"]),
        ("drill.sbatch", ["--cpus-per-task=1"]),
        ("validate.sbatch", ["--cpus-per-task=1"]),
        ("bench.sbatch", ["--cpus-per-task=1"]),
    ],
)
@pytest.mark.backend_independent  # starts no save or load
def test_sbatch_templates_are_accepted(job: list[str], template: str, sized: list[str]) -> None:
    """Each slurm/*.sbatch parses and its options fit a node (sized down to this cluster)."""
    proc = run_command(["sbatch", *job, "--test-only", *sized, EXAMPLE.parent / template], TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert "to start at" in proc.stderr


TRAIN = HERE.parent / "examples" / "resumable_train.py"


def _user_copy_of_train_sbatch(tmp_path: Path, store: Path, out: Path, progress: Path) -> Path:
    """slurm/train.sbatch as a user would copy it: only the training command changed."""
    text = (EXAMPLE.parent / "train.sbatch").read_text()
    line = 'srun ckptguard run --time-margin 5m -- python train.py --store "$CKPT_STORE"'
    assert line in text, "train.sbatch changed: update this test's edit"
    venv = Path(sys.executable).parent
    mine = (
        f"srun --mpi=pmi2 {venv / 'ckptguard'} run --poll 0.2 -- {sys.executable} {TRAIN} "
        f'--store "$CKPT_STORE" --steps 40 --step-sleep 0.1 --out {out} --progress {progress}'
    )
    script = tmp_path / "train.sbatch"
    script.write_text(text.replace(line, mine))
    return script


# Job orchestration: both backends write the same bytes (test_native), and each backend's saves
# and resumes are tested in-process.
def _progress(progress: Path) -> int:
    text = progress.read_text().strip() if progress.exists() else ""
    return int(text) if text.isdigit() else 0


def _preempt_when(jid: str, progress: Path, step: int, timeout: float) -> None:
    """Send USR1 to the job's tasks once its rank 0 has passed ``step``."""
    deadline = time.monotonic() + timeout
    while _progress(progress) < step:
        assert time.monotonic() < deadline, f"the job never reached step {step}"
        time.sleep(0.2)
    assert run_command(["scancel", "--signal=USR1", jid], TIMEOUT).returncode == 0


def _committed(store: Path, n: int, timeout: float) -> list:
    import ckptguard

    deadline = time.monotonic() + timeout
    while len(listed := ckptguard.Store(store).list() if (store / "LATEST").exists() else []) < n:
        assert time.monotonic() < deadline, f"{len(listed)} checkpoints, {n} expected"
        time.sleep(0.2)
    return listed


# Job orchestration: both backends write the same bytes (test_native), and each backend's saves
# and resumes are tested in-process.
@pytest.mark.backend_independent
@pytest.mark.timeout(500)
def test_preempted_job_checkpoints_requeues_and_resumes_bitwise(
    job: list[str], tmp_path: Path
) -> None:
    """slurm/train.sbatch with examples/resumable_train.py on 4 tasks gets USR1 mid-run, twice:
    every rank checkpoints, the agents exit 85, the script requeues the job, the job comes back
    and resumes from LATEST, and ends with the weights of an uninterrupted run, bitwise. The
    store's events give both recoveries, and the metrics, the report and the Prometheus output
    carry the same figures (docs/operations.md)."""
    import torch

    import ckptguard

    store, progress, out = tmp_path / "store", tmp_path / "progress", tmp_path / "w.pt"
    script = _user_copy_of_train_sbatch(tmp_path, store, out, progress)
    sized = ["--nodes=1", "--ntasks-per-node=4", "--cpus-per-task=1", "--time=8"]
    submit = run_command(
        [
            "sbatch",
            "--parsable",
            *job[:2],
            *sized,
            f"--chdir={tmp_path}",
            f"--export=ALL,CKPT_STORE={store}",
            script,
        ],
        TIMEOUT,
    )
    assert submit.returncode == 0, submit.stderr
    jid = submit.stdout.strip().split(";")[0]
    _preempt_when(jid, progress, 4, 150)
    first = _committed(store, 1, 120)[0]
    # Requeued, the job waits AuthInfo=cred_expire (20 s on the local cluster) to start again.
    # Forcing StartTime=now instead races slurmd's revocation of the previous run's credential.
    _preempt_when(jid, progress, first.step + 3, 200)
    deadline = time.monotonic() + 240
    while True:  # until the job has left the queue for good
        state = run_command(["squeue", "-h", "-j", jid, "-o", "%T %r"], TIMEOUT, echo=False)
        assert state.returncode == 0, state.stderr
        if not state.stdout.strip():
            break
        assert time.monotonic() < deadline, f"job {jid} still {state.stdout.strip()}"
        time.sleep(0.5)
    log = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    print(log[-4000:])
    assert log.count("checkpointed on request; requeueing job") == 2
    first, second = ckptguard.Store(store).list()
    assert 0 < first.step < second.step < 40 and ckptguard.verify(first.path).ok
    assert f"resumed from step {first.step}" in log and f"resumed from step {second.step}" in log
    straight = [str(c) for c in ["srun", *job[:2], "--time=4", "--mpi=pmi2", "-n", "4"]]
    straight += [str(Path(sys.executable).parent / "ckptguard"), "run", "--poll", "0.2", "--"]
    straight += [sys.executable, str(TRAIN), "--store", str(tmp_path / "other"), "--steps", "40"]
    straight += ["--out", str(tmp_path / "w0.pt")]
    ran = run_command(straight, timeout=150)
    assert ran.returncode == 0, ran.stderr[-4000:]
    got, want = torch.load(out), torch.load(tmp_path / "w0.pt")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    _recoveries_are_reported(store, jid, tmp_path)


def _recoveries_are_reported(store: Path, jid: str, tmp_path: Path) -> None:
    """The events of the three incarnations, the two recoveries in the metrics, and the same
    figures in report.json, report.html and the Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    import ckptguard
    from ckptguard import events, metrics

    got = [e for e in events.read(store).records if e["job"] == jid]
    starts = [e for e in got if e["kind"] == "start"]
    assert [e["restart"] or 0 for e in starts] == [0, 1, 2], got
    exits = [(e["outcome"], e["status"]) for e in got if e["kind"] == "exit"]
    assert exits == [("checkpointed", 85), ("checkpointed", 85), ("completed", 0)], got
    assert [e["reason"] for e in got if e["kind"] == "preempt"] == ["SIGUSR1", "SIGUSR1"]
    assert [e["result"] for e in got if e["kind"] == "load"] == ["ok", "ok"]
    first = {e["restart"] or 0: e["time"] for e in got if e["kind"] == "first_step"}
    spans = [first[r] - next(e["time"] for e in starts if (e["restart"] or 0) == r) for r in (1, 2)]
    assert all(s > 0 for s in spans)
    m = metrics.compute(store)
    mttr = m["seed"]["mttr"]
    assert (mttr["recoveries"], mttr["count"]) == (2, 2)
    assert mttr["value"] == pytest.approx(sum(spans) / 2)
    for r in m["recoveries"]:
        assert r["complete"] and r["seconds"]["preempt_to_checkpoint"] >= 0
        assert r["seconds"]["checkpoint_to_exit"] >= 0 and r["seconds"]["exit_to_start"] > 0
    # The drills of both checkpoints: the recovery integrity rate.
    for c in ckptguard.Store(store).list():
        drilled = subprocess.run(
            [sys.executable, "-m", "ckptguard.cli", "drill", str(store), "--checkpoint", c.name],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert drilled.returncode == 0, drilled.stdout + drilled.stderr
    report_dir, prom = tmp_path / "report", tmp_path / "ckptguard.prom"
    for args in (
        ["report", str(store), "--out", str(report_dir)],
        ["metrics", str(store), "--textfile", str(prom)],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "ckptguard.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    seed = json.loads((report_dir / "report.json").read_text())["metrics"]["seed"]
    assert seed["mttr"]["value"] == pytest.approx(mttr["value"])
    assert seed["recovery_integrity_rate"]["value"] == 1.0
    assert seed["recovery_integrity_rate"]["denominator"] == 2
    page = (report_dir / "report.html").read_text()
    assert 'id="plot-mttr"' in page and 'id="plot-drills"' in page
    samples = {
        s.name: s.value
        for fam in text_string_to_metric_families(prom.read_text())
        for s in fam.samples
    }
    assert samples["ckptguard_mttr_seconds"] == pytest.approx(mttr["value"])
    assert samples["ckptguard_recovery_integrity_ratio"] == 1.0
    # advise on the store's own figures: two interruptions over three runs, R from both recoveries.
    advised = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptguard.cli",
            "advise",
            str(store),
            "--json",
            "--sdc-window",
            "1h",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert advised.returncode == 0, advised.stdout + advised.stderr
    advice = json.loads(advised.stdout)
    past = advice["history"]
    assert (past["incarnations"], past["preempted"], past["interruptions"]) == (3, 2, 2)
    assert sorted(past["recoveries"]) == pytest.approx(sorted(spans))
    assert advice["restart_cost"]["value"] == pytest.approx(sum(spans) / 2)
    assert advice["mtbf"]["value"] == pytest.approx(past["observed_s"] / 2)
    assert advice["recommended"]["compute_s"] > 0 and advice["retention"]["at_optimum"] >= 2


SCENARIOS = HERE / "dist" / "scenarios.py"


@pytest.mark.backend_independent  # a timeout, a signal or a race: the same on both backends
@pytest.mark.timeout(180)
def test_a_task_killed_mid_save_leaves_the_previous_checkpoint(
    job: list[str], tmp_path: Path
) -> None:
    """srun -n 4: rank 2 is SIGKILLed after writing its data, before the commit; nothing of the
    new checkpoint is visible and LATEST still names the previous one, which loads whole."""
    import ckptguard

    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install '.[mpi]')")
    store = tmp_path / "store"
    base = ["srun", *job, "--mpi=pmi2", "-n", "4", sys.executable, SCENARIOS, "mpi"]
    assert run_command([*base, "save", store, "old"], timeout=120).returncode == 0
    env = {"CKPTGUARD_FAILPOINT": "save.data_written:2:kill"}
    proc = run_command([*base, "fail", store, "new", "20"], 120, env=env)
    assert proc.returncode != 0
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == [
        "LATEST",
        "old",
    ]
    assert ckptguard.Store(store).latest_name() == "old"
    assert ckptguard.verify(store / "old").ok
    ckptguard.load(store)  # LATEST loads whole
    ckptguard.Store(store).gc(0)
    staging = store / ".staging"
    assert not staging.exists() or list(staging.iterdir()) == []


@pytest.mark.timeout(180)
@pytest.mark.rank_job
def test_handed_over_snapshot_commits_after_the_trainers_die_under_srun(
    job: list[str], tmp_path: Path
) -> None:
    """srun -n 4 ckptguard run: each trainer hands a snapshot to its agent and exits 7 at once;
    the agents still commit it, and every task ends with the trainer's status."""
    import ckptguard

    out, store = tmp_path / "out", tmp_path / "store"
    out.mkdir()
    agent = Path(sys.executable).parent / "ckptguard"
    trainer = HERE / "agent" / "trainer.py"
    cmd = ["srun", *job[:2], "--time=3", "--mpi=pmi2", "-n", "4", agent, "run", "--"]
    proc = run_command([*cmd, sys.executable, trainer, "handoff", out, store, "crash"], timeout=150)
    assert proc.returncode == 7
    assert ckptguard.Store(store).latest_name() == "crash"
    assert ckptguard.verify(store / "crash").ok
    got = ckptguard.load(store / "crash")
    assert got["w"].shape == (16, 5) and got["step"] == 0


@pytest.mark.backend_independent  # starts no save or load
@pytest.mark.timeout(120)
def test_a_dead_agent_ends_the_job_instead_of_hanging(job: list[str], tmp_path: Path) -> None:
    """srun does not end a step when one task dies (--kill-on-bad-exit=0): the other agents stop
    hearing from it, stop their trainers and abort the job within --peer-timeout."""
    out = tmp_path / "out"
    out.mkdir()
    agent = Path(sys.executable).parent / "ckptguard"
    trainer = HERE / "agent" / "trainer.py"
    cmd = ["srun", *job[:2], "--time=2", "--mpi=pmi2", "--kill-on-bad-exit=0", "-n", "4"]
    cmd += [agent, "run", "--peer-timeout", "5", "--poll", "0.2", "--"]
    cmd += [sys.executable, trainer, "sleep", out]
    srun = subprocess.Popen(
        [str(c) for c in cmd],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        ready = [out / f"ready-{r}.json" for r in range(4)]
        deadline = time.monotonic() + 60
        while not all(f.exists() for f in ready) and time.monotonic() < deadline:
            assert srun.poll() is None, srun.communicate()[0][-3000:]
            time.sleep(0.1)
        import json

        victim = json.loads(ready[2].read_text())["agent"]
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        text, _ = srun.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if srun.poll() is None:
            srun.kill()
            srun.wait()
    print(text[-3000:])
    assert srun.returncode != 0
    assert took < 20  # before the trainers end their 25 s sleep: the agents acted on their own
    assert "did not answer" in text


# The wiring of an option through ranks or agents: its save path runs on both backends elsewhere.
@pytest.mark.backend_independent
@pytest.mark.timeout(180)
def test_agents_under_srun_sign_into_an_audited_store(job: list[str], tmp_path: Path) -> None:
    """srun -n 4 ckptguard run --sign-key: three handed-over saves into a store with an audit
    log; each commit is signed (only the agents read the key), has its commit entry, and the
    log verifies against its witness."""
    import ckptguard
    from ckptguard import auditcheck, keys

    out, store, witness = tmp_path / "out", tmp_path / "store", tmp_path / "witness"
    out.mkdir()
    priv, pub, kid = keys.generate(tmp_path / "k")
    agent = Path(sys.executable).parent / "ckptguard"
    init = [agent, "audit", "init", store, "--key", priv, "--witness", witness]
    assert run_command(init, timeout=60).returncode == 0
    trainer = HERE / "agent" / "trainer.py"
    cmd = ["srun", *job[:2], "--time=3", "--mpi=pmi2", "-n", "4", agent, "run"]
    cmd += ["--sign-key", priv, "--", sys.executable, trainer, "handoff", out, store]
    proc = run_command(cmd, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("h0", "h1", "h2"):
        assert ckptguard.verify(store / name, trusted_keys=pub).signed_by == kid
    assert ckptguard.load(store / "h2", trusted_keys=pub)["step"] == 2
    done = auditcheck.check(store)
    assert done.fraction == 1.0 and done.total == 3, done.gaps
    audit = [agent, "audit", "verify", store, "--witness", witness, "--key", pub]
    assert run_command(audit, timeout=60).returncode == 0


@pytest.mark.backend_independent  # the sealed path is the same Python code on both backends
def test_agents_under_srun_save_encrypted_and_drain_with_the_keys(
    job: list[str], tmp_path: Path
) -> None:
    """srun -n 4 ckptguard run --drain-to: three handed-over saves sealed under one scope (the
    agents' committer makes its key; the KEK comes from the job's environment), the second
    drained with its key; both copies load bitwise, and a shred reaches both keyrings."""
    import ckptguard
    from ckptguard import keyring

    out, store, dst = tmp_path / "out", tmp_path / "store", tmp_path / "durable"
    out.mkdir()
    env = {**os.environ, "CKPTGUARD_KEK": "7a" * 32, "TRAINER_ENCRYPT": "run-9"}
    agent = Path(sys.executable).parent / "ckptguard"
    trainer = HERE / "agent" / "trainer.py"
    cmd = ["srun", *job[:2], "--time=3", "--mpi=pmi2", "-n", "4", agent, "run"]
    cmd += ["--drain-to", dst, "--drain-every", "2", "--", sys.executable, trainer, "handoff"]
    proc = run_command([*cmd, out, store], timeout=150, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kek = keyring.Kek.from_hex("7a" * 32)
    for where in (store / "h1", dst / "h1"):
        body = (where / "MANIFEST.json").read_text()
        assert '"encryption"' in body and '"run-9"' in body
        got = ckptguard.load(where, kek=kek)
        assert got["w"].shape == (16, 5) and got["step"] == 1
        assert ckptguard.verify(where, kek=kek).ok
    with pytest.raises(ckptguard.KeyUnavailableError):
        ckptguard.load(store / "h2", kek=keyring.Kek.from_hex("7b" * 32))
    keyring.shred(str(store), "run-9")
    for where in (store / "h1", dst / "h1"):
        with pytest.raises(ckptguard.ScopeShreddedError):
            ckptguard.load(where, kek=kek)
