"""The fault matrix of tests/test_fault_matrix.py: its table, the cases generated from it, a
bounded launcher for each scenario, and the one checker of the invariants after every case.

tests/fault_cases.txt has one line per failpoint and scenario. ``cases(full=True)`` crosses each
line with its ranks and the four actions (``make faults``); ``cases(full=False)`` keeps the
rank:action pairs of its last column (``make test``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import s3kit
import slurmkit
from mpikit import MPIEXEC, launcher_free_environ, need_mpi

import ckptguard
from ckptguard import events, keyring
from ckptguard.agent.protocol import EXIT_PEERS_LOST
from ckptguard.audit import AUDIT_DIR
from ckptguard.drain import drain
from ckptguard.format.layout import LATEST, STAGING
from ckptguard.temps import TEMP_MARK

HERE = Path(__file__).resolve().parent
TABLE = HERE / "fault_cases.txt"
SCENARIOS = HERE / "dist" / "scenarios.py"
STORE_OPS = HERE / "dist" / "store_ops.py"
DCP_RANKS = HERE / "dist" / "dcp_backend.py"
TRAINER = HERE / "agent" / "trainer.py"

ACTIONS = ("kill", "eio", "enospc", "hang")
SAVE_TIMEOUT = 5  # seconds: the collectives' timeout of every save in a case
BOUND = {
    "save": 90.0,
    "save-zstd": 90.0,
    "save-sealed": 90.0,
    "incremental": 90.0,
    "overwrite": 90.0,
    "fallback": 90.0,
    "agent": 120.0,
    "agent-srun": 150.0,
    "dcp": 180.0,
}  # the launch ends within this
SINGLE_BOUND = 60.0  # gc, delete, drain, onefile, export, audit
DCP_TIMEOUT = 30  # seconds: DCP's collectives in the dcp scenario (gloo's process group timeout)
ONEFILE = "model.pt"  # the onefile scenario's target
EXPORTED = "model.safetensors"  # the export scenario's one file
AGENT_SAVES = ("h0", "h1")
ERROR_TYPE = {"eio": "StoreError", "enospc": "StoreFullError"}  # gc, delete, drain, export


# ---- the table and the cases -------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    scenario: str
    point: str
    ranks: tuple[int, ...]
    expect: dict[str, str]  # action -> outcome
    subset: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class Case:
    scenario: str
    point: str
    rank: int
    action: str
    expect: str
    row: Row

    @property
    def id(self) -> str:
        return f"{self.scenario}:{self.point}:{self.rank}:{self.action}"

    @property
    def failpoint(self) -> str:
        return f"{self.point}:{self.rank}:{self.action}"

    @property
    def late(self) -> bool:
        """The point lies after the commit point: killed there, the operation took effect."""
        return self.row.expect["kill"] in ("visible", "latest", "new", "gone", "either")

    @property
    def late_error(self) -> bool:
        """An error after the commit point: the operation succeeds, with a CheckpointWarning
        that names the error (the trainer-side handoff.submitted aside: docs/reliability.md)."""
        took_effect = self.expect in ("visible", "latest", "new", "gone")
        errors = self.action in ("eio", "enospc")
        return errors and took_effect and self.point != "handoff.submitted"

    @property
    def agent_side(self) -> bool:
        """The point runs in an agent (its persist thread), not in a trainer."""
        return self.scenario.startswith("agent") and self.point != "handoff.submitted"


def _ranks(text: str) -> tuple[int, ...]:
    a, _, b = text.partition("-")
    return tuple(range(int(a), int(b or a) + 1))


def table(path: Path = TABLE) -> list[Row]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        scenario, point, ranks, kill, error, hang, *subset = line.split()
        pairs = []
        for item in subset:
            if item != "-":
                r, a = item.split(":")
                pairs.append((int(r), a))
        expect = {"kill": kill, "eio": error, "enospc": error, "hang": hang}
        rows.append(Row(scenario, point, _ranks(ranks), expect, tuple(pairs)))
    return rows


def cases(full: bool) -> list[Case]:
    out = []
    for row in table():
        for rank in row.ranks:
            for action in ACTIONS:
                if full or (rank, action) in row.subset:
                    out.append(Case(row.scenario, row.point, rank, action, row.expect[action], row))
    return out


# ---- launching, bounded ------------------------------------------------------------------------


@dataclass
class Run:
    """What a case's launch did: its exit status (None: stopped by the harness after the hang it
    injected), its time, and each rank's report of each save: {rank: {save: outcome}}."""

    code: int | None
    wall: float
    log: str
    reports: dict[int, dict[str, dict]] = field(default_factory=dict)


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """This environment without launcher, Slurm, rank and ckptguard variables."""
    return {**launcher_free_environ(), "TMPDIR": str(tmp), **extra}


def launch(
    cmd: list[str], env: dict, log: Path, bound: float, done: Callable[[str], bool] | None = None
) -> tuple[int | None, float, str]:
    """Run ``cmd`` in its own session; stop it once ``done(log)`` (a hang that was injected has
    done what it should), or fail past ``bound`` seconds. Returns (status or None, wall, log)."""
    t0 = time.monotonic()
    with open(log, "w+") as f:
        proc = subprocess.Popen(
            cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        code: int | None = None
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    break
                if done is not None and done(log.read_text(errors="replace")):
                    time.sleep(0.5)  # a last look: the stopped process must not end by itself
                    code = proc.poll()
                    break
                if time.monotonic() - t0 > bound:
                    raise AssertionError(
                        f"{' '.join(cmd[:6])}... did not end within {bound:.0f} s (a hang):\n"
                        + log.read_text(errors="replace")[-4000:]
                    )
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.monotonic() - t0
    return code, wall, log.read_text(errors="replace")


def _hung(case: Case) -> Callable[[str], bool]:
    line = f"ckptguard: failpoint {case.point} on rank {case.rank}: hang"
    return lambda text: line in text


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ---- fixtures the scenarios start from ---------------------------------------------------------


def small(seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 33, generator=g), "i": torch.arange(100) * seed, "seed": seed}


def _mpi_base(root: Path) -> Path:
    need_mpi()
    d = root / "mpi" / "store"
    code, _, log = launch(
        [MPIEXEC, "-n", "4", sys.executable, str(SCENARIOS), "mpi", "save", str(d), "step-10"],
        {**os.environ},
        root / "mpi.log",
        120,
    )
    assert code == 0, log[-3000:]
    shutil.rmtree(root / "mpi" / "out")
    return d


def torchrun(n: int, script: Path, *args: Any) -> list[str]:
    """The command that runs ``script ARGS`` as ``n`` ranks of a one-node torchrun job."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*run, f"--nproc-per-node={n}", str(script), *map(str, args)]


def torchrun_env(**extra: str) -> dict[str, str]:
    """This environment (the backend switch included) without another job's rank variables."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def _dcp_base(root: Path) -> Path:
    d = root / "dcp" / "store"
    code, _, log = launch(
        torchrun(4, DCP_RANKS, "base", d), torchrun_env(), root / "dcp.log", BOUND["dcp"]
    )
    assert code == 0, log[-3000:]
    shutil.rmtree(root / "dcp" / "out")
    return d


def _agent_base(root: Path) -> Path:
    d = root / "agent" / "store"
    ckptguard.save(small(9), d / "base", step=9)
    return d


def _gc_base(root: Path) -> Path:
    d = root / "gc" / "store"
    ckptguard.save(small(1), d / "a", step=1)
    (d / STAGING / "new.0123456789abcdef0123456789abcdef").mkdir(parents=True)  # a torn save
    (d / STAGING / "new.0123456789abcdef0123456789abcdef" / "rank-00000.ckg").write_bytes(b"x" * 99)
    (d / STAGING / "old.fedcba9876543210fedcba9876543210.deleted").mkdir()  # a torn delete
    (d / STAGING / "old.fedcba9876543210fedcba9876543210.deleted" / "MANIFEST.json").write_text("")
    (d / ".LATEST.00000000000000000000000000000000.tmp").write_text("a\n")  # a torn LATEST
    return d


def _delete_base(root: Path) -> Path:
    d = root / "delete" / "store"
    ckptguard.save(small(1), d / "a", step=1)
    ckptguard.save(small(2), d / "b", step=2)
    return d


def _prune_base(root: Path) -> Path:
    d = root / "prune" / "store"
    for i in range(1, 5):
        ckptguard.save(small(i), d / f"c{i}", step=i)
    return d


def shared(seed: int) -> dict:
    """A state of several 64 KiB chunks (``SHARED_CHUNK``) that an incremental save shares."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 1024, generator=g), "seed": seed}


SHARED_CHUNK = 1 << 16


def _delete_base_base(root: Path) -> Path:
    """ "a", and "b" (LATEST) saved incrementally on it: b links a's data file."""
    d = root / "delete-base" / "store"
    state = shared(1)
    ckptguard.save(state, d / "a", step=1, chunk_size=SHARED_CHUNK)
    state["w"][0, 0] += 1.0
    state["seed"] = 2
    ckptguard.save(state, d / "b", step=2, chunk_size=SHARED_CHUNK, base="a")
    assert any(p.name.count(".") == 2 for p in (d / "b").iterdir())
    return d


def _gc_shared_base(root: Path) -> Path:
    """The delete-base store with a's delete stopped after its rename: a's tree, its manifest
    gone, in .staging (as delete leaves it), its data file still linked by b."""
    d = _delete_base_base(root / "gc-shared")
    torn = d / STAGING / f"a.{uuid.uuid4().hex}.deleted"
    (d / STAGING).mkdir(exist_ok=True)
    (d / "a" / "MANIFEST.json").unlink()
    os.rename(d / "a", torn)
    return d


def _drain_base(root: Path) -> Path:
    d = root / "drain"
    ckptguard.save(small(1), d / "src" / "a", step=1)
    drain(d / "src", d / "dst")
    ckptguard.save(small(2), d / "src" / "b", step=2)
    return d


S3_PART = str(5 << 20)  # the s3 scenario's part size: b's data file takes two parts


def _s3_base(root: Path) -> Path:
    """The s3 scenario's source store: "a" (drained into each case's bucket first) and "b",
    whose data file is large enough for a multipart upload."""
    import torch

    d = root / "s3"
    ckptguard.save(small(1), d / "src" / "a", step=1)
    big = torch.randn(1_600_000, generator=torch.Generator().manual_seed(2))
    ckptguard.save({**small(2), "big": big}, d / "src" / "b", step=2)
    return d


def _onefile_base(root: Path) -> Path:
    d = root / "onefile"
    ckptguard.save(small(1), d / ONEFILE)  # the old one-file checkpoint a case replaces
    return d


def _lightning_base(root: Path) -> Path:
    import frameworkkit  # its jobs import Lightning or transformers, in processes of their own

    return frameworkkit.lightning_base(root)


def _hf_base(root: Path) -> Path:
    import frameworkkit

    return frameworkkit.hf_base(root)


def _audit_base(root: Path) -> Path:
    """Nothing to copy: an audit log's config names its key and witness by absolute path, so
    each case makes its own audited store (``_audit``)."""
    d = root / "audit"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _export_base(root: Path) -> Path:
    d = root / "export"
    ckptguard.save(small(1), d / "src" / "c")  # exported into d/dst, which does not exist yet
    return d


def _mlflow_base(root: Path) -> Path:
    """An MLflow store (SQLite; an experiment, two runs with artifacts, a model version) in
    src/, and a backup store holding its backup "b1". Cases read src/ where it lies (the
    database names its artifacts by absolute path) and work on a copy of the backup store."""
    import mlflow

    from ckptguard.mlflow.backup import backup
    from ckptguard.mlflow.refs import Roots

    d = root / "mlflow"
    (d / "src" / "mlruns").mkdir(parents=True)
    uri = f"sqlite:///{d / 'src' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, uri)
    exp = client.create_experiment("e", artifact_location=str(d / "src" / "mlruns" / "e"))
    for i in range(2):
        rid = client.create_run(exp).info.run_id
        (d / f"w{i}.bin").write_bytes(bytes(range(256)) * (i + 3))
        client.log_artifact(rid, str(d / f"w{i}.bin"), "model")
        client.set_terminated(rid)
    client.create_registered_model("m")
    client.create_model_version("m", f"runs:/{rid}/model", rid)
    backup(uri, str(d / "store"), Roots(None, (str(d / "src" / "mlruns"),)), name="b1")
    return d


def _keyring_base(root: Path) -> Path:
    d = root / "keyring"
    d.mkdir()  # each case builds its stores: COPIES records absolute paths
    return d


_BUILDERS: tuple[tuple[tuple[str, ...], Callable[[Path], Path]], ...] = (
    (("save", "save-zstd", "save-sealed", "overwrite", "fallback", "incremental"), _mpi_base),
    (("delete-base",), _delete_base_base),
    (("gc-shared",), _gc_shared_base),
    (("agent", "agent-srun"), _agent_base),
    (("gc",), _gc_base),
    (("delete",), _delete_base),
    (("prune",), _prune_base),
    (("drain",), _drain_base),
    (("s3",), _s3_base),
    (("onefile",), _onefile_base),
    (("lightning",), _lightning_base),
    (("hf",), _hf_base),
    (("export",), _export_base),
    (("audit",), _audit_base),
    (("signed",), _audit_base),
    (("dcp",), _dcp_base),
    (("keyring",), _keyring_base),
    (("mlflow",), _mlflow_base),
)


class Bases(dict):
    """The stores every case of a scenario copies: each built once per session, on first use
    (a run of a few scenarios builds only theirs, and needs MPI only for those that use it)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, scenario: str) -> Path:
        for names, build in _BUILDERS:
            if scenario in names:
                base = build(self.root)
                self.update(dict.fromkeys(names, base))
                return base
        raise KeyError(scenario)


def make_bases(root: Path) -> Bases:
    return Bases(root)


# ---- the one checker ----------------------------------------------------------------------------


def check_store(store: Path, names: set[str], latest: str | None) -> None:
    """I1-I5 in a store after a case: exactly ``names`` are listed, each whole and verified;
    nothing else is visible; LATEST names ``latest`` and loads and verifies; gc then reclaims every
    leftover and changes nothing committed."""
    st = ckptguard.Store(store)
    listed = {i.name for i in st.list()}
    assert listed == names, f"listed {sorted(listed)}, expected {sorted(names)}"
    for n in names:
        report = ckptguard.verify(store / n)
        assert report.ok, f"{n} does not verify: {report.problems[:3]}"  # I1, I5
    # the audit log and the keyring, where the store keeps them; its events (a failed save's)
    allowed = names | {LATEST, STAGING, AUDIT_DIR, keyring.KEYS, events.EVENTS_DIR}
    stray = [n for n in os.listdir(store) if n not in allowed and not _latest_tmp(n)]
    assert not stray, f"visible besides the checkpoints: {stray}"  # I1: nothing partial
    assert st.latest_name() == latest, f"LATEST is {st.latest_name()!r}, expected {latest!r}"
    if latest is not None:  # I3: LATEST names a committed checkpoint; it loads and verifies
        assert ckptguard.verify(store).ok
        ckptguard.load(store)
    st.gc(older_than=0)  # I4: whatever the failure left is reclaimable
    staging = store / STAGING
    assert not staging.exists() or os.listdir(staging) == [], os.listdir(staging)
    assert not [n for n in os.listdir(store) if _latest_tmp(n)]
    assert {i.name for i in st.list()} == names and st.latest_name() == latest


def check_codec(ckpt: Path, feature: str) -> None:
    """The checkpoint really uses the feature its scenario asked for (a codec, incremental)."""
    doc = json.loads((ckpt / "MANIFEST.json").read_text())
    features = doc["manifest"]["features"]
    assert feature in features, (feature, features)


def check_deleted_stays_deleted(store: Path, name: str) -> None:
    """I11 after an interrupted overwrite: ``name`` deleted (once gc has put it in place, if the
    overwrite stopped between its renames), then gc: it is not listed again, nor LATEST, and
    nothing is left in .staging."""
    st = ckptguard.Store(store)
    if name not in {i.name for i in st.list()}:
        st.gc(older_than=0)
    st.delete(name)
    for _ in range(2):
        st.gc(older_than=0)
        assert name not in {i.name for i in st.list()}, f"gc brought back the deleted {name}"
        assert st.latest_name() != name and not (store / name).exists()
    staging = store / STAGING
    assert not staging.exists() or os.listdir(staging) == [], os.listdir(staging)


def _latest_tmp(name: str) -> bool:
    return name.startswith(".LATEST.") and name.endswith(".tmp")


def check_ranks(case: Case, run: Run, committed: set[str]) -> str:
    """I8 for a job of 4 ranks: what the ranks that reported say of each save agrees with the
    store and with each other. Returns a word for the summary."""
    words = set()
    for save in sorted({s for rep in run.reports.values() for s in rep}):
        got = {r: rep[save] for r, rep in run.reports.items() if save in rep}
        ok = {r for r, o in got.items() if o["ok"]}
        errors = {r: (o["type"], o["error"]) for r, o in got.items() if not o["ok"]}
        if save not in committed:  # never "saved" for a checkpoint that is not there
            assert not ok, f"{save} is absent, yet ranks {sorted(ok)} report it saved: {got}"
        elif not case.late or case.late_error:  # committed: the ranks that could know say so
            assert not errors, f"{save} committed, yet ranks report errors: {errors}"
        if case.late_error and save in committed:  # ... and say what failed after the commit
            told = {r for r, o in got.items() if any("injected" in w for w in o["warnings"])}
            want = {case.rank} if case.point.startswith("handoff.") else set(got)
            assert told == want and len(got) == 4, f"warnings: {got}"
            words.add("ok with a warning")
            continue
        if not errors:
            words.add("ok")
            continue
        kinds = {t for t, _ in errors.values()}
        if case.action in ("kill", "hang"):  # the others waited for the dead or stuck rank,
            if not case.scenario.startswith("agent"):  # or (agent) lost theirs with the job
                assert case.rank not in errors, errors
            assert kinds <= {"CoordinationTimeoutError", "CheckpointAbortedError", "AgentError"}, (
                errors
            )
            words.update(_ERROR_WORDS[k] for k in kinds)
        elif case.point == "handoff.submitted":  # the trainer's own error, after handing over:
            mine = errors.get(case.rank)  # the others time out (or succeed)
            assert mine is not None and "injected" in mine[1], errors
            others = {t for r, (t, _) in errors.items() if r != case.rank}
            assert others <= {"CoordinationTimeoutError"}, errors
            words.add("own error, others timed out" if others else "own error, others ok")
        else:  # one coordinated outcome: the same error on every rank, naming the failing one
            assert len(set(errors.values())) == 1, f"ranks disagree: {errors}"
            assert len(errors) == len(got) == 4, f"not every rank reported an error: {got}"
            (kind, msg), *_ = errors.values()
            assert kind == "CheckpointAbortedError", errors
            assert f"rank {case.rank} failed" in msg and "injected" in msg, msg
            words.add("same error")
    if case.action == "hang" and run.code is None:
        words.add("hung job stopped by the test")
    elif case.action == "hang" and case.agent_side:
        words.add("stuck agent ended the job")
    return "; ".join(sorted(words)) or ("killed" if case.action == "kill" else "none")


_ERROR_WORDS = {
    "CoordinationTimeoutError": "timeout",
    "CheckpointAbortedError": "aborted",
    "AgentError": "agent gone",
}


def fired(case: Case, log: str) -> None:
    """The failpoint was reached, by that rank, and acted (else the case tests nothing)."""
    line = f"ckptguard: failpoint {case.point} on rank {case.rank}: {case.action}"
    assert line in log, f"{line!r} not in the output:\n{log[-3000:]}"


# ---- the scenarios ------------------------------------------------------------------------------


def run_case(case: Case, bases: dict[str, Path], tmp: Path, seen: dict) -> tuple[str, str]:
    """Run one case and check every invariant; returns (store outcome, ranks' outcome). The
    store's outcome is put in ``seen`` as soon as it is known (for the summary of a failure)."""
    return _SCENARIOS[case.scenario](case, bases[case.scenario], tmp, seen)


def _mpi(case: Case, base: Path, tmp: Path, seen: dict) -> tuple[str, str]:
    need_mpi()
    store = tmp / "store"
    shutil.copytree(base, store)
    old = ckptguard.Store(store).latest()
    replace = case.scenario in ("overwrite", "fallback")
    name = "step-10" if replace else "new"
    args = ["mpi", "fail", str(store), name, str(SAVE_TIMEOUT)]
    if replace:
        args.append("overwrite")
    env = {**os.environ, "CKPTGUARD_FAILPOINT": case.failpoint}
    if case.scenario == "fallback":  # the overwrite without renameat2 (two renames)
        env["CKPTGUARD_RENAME_EXCHANGE"] = "0"
    if case.scenario == "save-zstd":  # the same failpoints with every record compressed
        env["CKPTGUARD_TEST_COMPRESS"] = "zstd"
    if case.scenario == "incremental":  # the same state, linked to step-10's data files
        env["CKPTGUARD_TEST_BASE"] = "step-10"
    if case.scenario == "save-sealed":  # every tensor sealed, its scope's key made by the save
        env["CKPTGUARD_TEST_ENCRYPT"] = "run-1"
    cmd = [MPIEXEC, "-n", "4", sys.executable, str(SCENARIOS), *args]
    code, wall, log = launch(cmd, env, tmp / "launch.log", BOUND[case.scenario])
    fired(case, log)
    if case.late_error:
        assert code == 0, f"an error after the commit point failed the job ({code}):\n{log[-3000:]}"
    else:
        assert code != 0, "a failpoint fired, yet the job succeeded"
    run = Run(code, wall, log)
    for r in range(4):
        rep = _read_json(tmp / "out" / f"rank-{r}.json")
        if rep is not None:
            run.reports[r] = {name: rep}
    if case.scenario == "fallback":
        shutil.copytree(store, tmp / "deleted", symlinks=True)
        check_deleted_stays_deleted(tmp / "deleted", name)
    if replace:
        st = ckptguard.Store(store)
        if not st.list():  # killed between the fallback's renames: LATEST names nothing
            assert case.point == "overwrite.fallback_old_moved", case
            with pytest.raises(ckptguard.CorruptCheckpointError, match="ckptguard gc"):
                st.latest()
            st.gc(older_than=0)  # rolls the overwrite forward
        now = st.list()
        assert [i.name for i in now] == ["step-10"]
        outcome = "old" if now[0].uuid == old.uuid else "new"
        seen["outcome"] = outcome
        assert outcome == case.expect, (
            f"step-10 is the {outcome} checkpoint, expected {case.expect}"
        )
        check_store(store, {"step-10"}, "step-10")
        committed = {name} if outcome == "new" else set()
    else:
        names = {i.name for i in ckptguard.Store(store).list()}
        latest = ckptguard.Store(store).latest_name()
        outcome = "absent" if "new" not in names else "latest" if latest == "new" else "visible"
        seen["outcome"] = outcome
        assert outcome == case.expect, f"the new checkpoint is {outcome}, expected {case.expect}"
        committed = set() if outcome == "absent" else {"new"}
        check_store(store, {"step-10"} | committed, latest)
        if committed and case.scenario == "save-zstd":
            check_codec(store / "new", "zstd")
        if committed and case.scenario == "incremental":
            check_codec(store / "new", "incremental")
        if committed and case.scenario == "save-sealed":
            check_codec(store / "new", "encryption")
        if case.scenario == "save-sealed":  # a key made or not, whole either way; gc's to clean
            assert [e.scope for e in keyring.entries(str(store))] in ([], ["run-1"])
    return outcome, check_ranks(case, run, committed)


def handoff_expected(world: int, step: int) -> dict:
    """What tests/agent/trainer.py's handed-over save of ``step`` holds (``world`` ranks)."""
    sys.path.insert(0, str(TRAINER.parent))
    try:
        from trainer import handoff_state  # tests/agent/trainer.py
    finally:
        sys.path.pop(0)
    import torch

    parts = [handoff_state(r, world) for r in range(world)]
    want = parts[0]
    want["w"] = torch.cat([p["w"].local for p in parts]) + 1000 * step
    want["step"] = step
    return want


def check_handoff(path: Path, want: dict) -> None:
    """A handed-over save verifies and holds the snapshot taken at save_async, not the state
    changed after."""
    import numpy as np
    import torch

    assert ckptguard.verify(path).ok
    got = ckptguard.load(path)
    assert torch.equal(got["w"], want["w"]), f"{path.name}: w is not the snapshot's:\n{got['w']}"
    assert torch.equal(got["b"], want["b"])
    assert np.array_equal(got["np"], want["np"])
    assert got["step"] == want["step"]


def _agent(case: Case, base: Path, tmp: Path, seen: dict) -> tuple[str, str]:
    need_mpi()
    store, out = tmp / "store", tmp / "out"
    shutil.copytree(base, store)
    out.mkdir()
    env = clean_env(tmp, CKPTGUARD_FAILPOINT=case.failpoint)
    agent = [sys.executable, "-m", "ckptguard.cli", "run", "--poll", "0.2", "--term-timeout", "5"]
    trainer = [sys.executable, str(TRAINER), "faults", str(out), str(store)]
    trainer += [str(SAVE_TIMEOUT), str(len(AGENT_SAVES))]
    others = [out / f"faults-{r}.json" for r in range(4) if r != case.rank]
    # A hang in a trainer stalls that trainer like any hang in user code: the test stops the job
    # once the others reported. An agent stuck in a save ends the job itself (exit 87).
    trainer_hang = case.action == "hang" and not case.agent_side
    done = (lambda _: all(p.exists() for p in others)) if trainer_hang else None
    if case.scenario == "agent-srun":  # srun keeps a step when a task dies: --peer-timeout ends it
        job = f"ckptguard-faults-{uuid.uuid4().hex[:8]}"
        srun = ["srun", f"--partition={slurmkit.partition()}", f"--job-name={job}", "--time=4"]
        srun += ["--mpi=pmi2", "--kill-on-bad-exit=0", "-n", "4"]
        cmd = [*srun, *agent, "--peer-timeout", "20", "--", *trainer]
    else:
        job, cmd = None, [MPIEXEC, "-n", "4", *agent, "--", *trainer]
    try:
        code, wall, log = launch(cmd, env, tmp / "launch.log", BOUND[case.scenario], done)
    finally:
        if job is not None:  # a step the test stopped (or a stray task) ends here
            subprocess.run(["scancel", f"--name={job}"], capture_output=True, timeout=15)
    fired(case, log)
    run = Run(code, wall, log)
    for r in range(4):
        rep = _read_json(out / f"faults-{r}.json")
        if rep is not None:
            run.reports[r] = rep["saves"]
    names = {i.name for i in ckptguard.Store(store).list()}
    committed = names - {"base"}
    latest = ckptguard.Store(store).latest_name()
    # a kill or a hang ends the job (or that rank's part in it) at h0; an error fires at each save
    most = set(AGENT_SAVES) if case.action in ("eio", "enospc") else {"h0"}
    newest = max(committed) if committed else None
    outcome = "absent" if not committed else "latest" if latest == newest else "visible"
    seen["outcome"] = outcome
    for n in committed:  # each whole, and the snapshot handed over
        check_handoff(store / n, handoff_expected(4, int(n[1:])))
    if case.expect == "either":
        assert committed <= most, f"committed {sorted(committed)}"
        assert latest in ("base", newest), latest
    else:
        want = set() if case.expect == "absent" else most
        assert committed == want, f"committed {sorted(committed)}, expected {sorted(want)}"
        assert outcome == case.expect, f"LATEST is {latest}: {outcome}, expected {case.expect}"
    check_store(store, names, latest)
    if case.action == "hang" and case.agent_side:  # srun may report a task killed by the abort
        want = {EXIT_PEERS_LOST} if job is None else {EXIT_PEERS_LOST, 137, 143, 1}
        assert code in want, f"stuck agent: exit {code}, expected {EXIT_PEERS_LOST}:\n{log[-3000:]}"
        # (its log line, "rank N's save is stuck", may be lost when MPI_Abort ends the job first)
    elif case.action != "hang":
        assert code is not None
    return outcome, check_ranks(case, run, committed)


def _single_run(case: Case, tmp: Path, args: list[str], **extra: str) -> str:
    """Run one store operation (tests/dist/store_ops.py ARGS) in a process of its own with the
    case's failpoint; check how it ended (killed, stopped, ok with a warning, or a typed error
    naming the injected one); return that in a word for the summary."""
    env = {**clean_env(tmp), **extra, "CKPTGUARD_FAILPOINT": case.failpoint}
    result = tmp / "result.json"
    cmd = [sys.executable, str(STORE_OPS), str(result), *args]
    done = _hung(case) if case.action == "hang" else None
    code, _, log = launch(cmd, env, tmp / "launch.log", SINGLE_BOUND, done)
    fired(case, log)
    rep = _read_json(result)
    if case.action == "kill":
        assert code == -signal.SIGKILL and rep is None, (code, log[-2000:])
        return "killed"
    if case.action == "hang":
        assert code is None and rep is None, (code, log[-2000:])
        return "hung job stopped by the test"
    if case.late_error:  # it took effect: success, and a warning that says what failed
        assert code == 0 and rep is not None and rep["ok"], (code, rep, log[-2000:])
        assert any("injected" in w for w in rep["warnings"]), rep
        return "ok with a warning"
    # a typed error that says what happened
    assert code == 3 and rep is not None and not rep["ok"], (code, rep, log[-2000:])
    assert rep["type"] == ERROR_TYPE[case.action] and "injected" in rep["error"], rep
    return "typed error"


def _single(case: Case, base: Path, tmp: Path, seen: dict) -> tuple[str, str]:
    root = tmp / "root"
    shutil.copytree(base, root)
    if case.scenario in ("gc", "gc-shared"):
        args = ["gc", str(root)]
    elif case.scenario == "delete":
        args = ["delete", str(root), "b"]
    elif case.scenario == "delete-base":
        args = ["delete", str(root), "a"]
    elif case.scenario == "prune":
        args = ["prune", str(root)]
    else:
        args = ["drain", str(root / "src"), str(root / "dst")]
    ranks = _single_run(case, tmp, args)
    if case.scenario == "gc":
        outcome = "intact"
        check_store(root, {"a"}, "a")  # its gc is the retry: it must reclaim everything
    elif case.scenario in ("gc-shared", "delete-base"):
        outcome = _shared_outcome(case, root, seen)
    elif case.scenario == "prune":
        outcome = _pruned(case, root, seen)
    elif case.scenario == "delete":
        st = ckptguard.Store(root)
        names, latest = {i.name for i in st.list()}, st.latest_name()
        outcome = "gone" if "b" not in names else "kept" if latest == "b" else "unlatest"
        seen["outcome"] = outcome
        assert outcome == case.expect, f"b is {outcome}, expected {case.expect}"
        check_store(root, {"a"} if outcome == "gone" else {"a", "b"}, latest)
        if outcome != "gone":  # the retry completes it
            st.delete("b")
        check_store(root, {"a"}, "a")
    else:
        dst, src = root / "dst", root / "src"
        st = ckptguard.Store(dst)
        names, latest = {i.name for i in st.list()}, st.latest_name()
        outcome = "absent" if "b" not in names else "latest" if latest == "b" else "visible"
        seen["outcome"] = outcome
        assert outcome == case.expect, f"b in DST is {outcome}, expected {case.expect}"
        check_store(dst, {"a"} if outcome == "absent" else {"a", "b"}, latest)
        check_store(src, {"a", "b"}, "b")  # the source is never changed
        drain(src, dst)  # the retry completes it
        check_store(dst, {"a", "b"}, "b")
        assert ckptguard.load(dst / "b")["seed"] == 2
    return outcome, ranks


_moto: list[s3kit.MotoServer] = []


def _moto_server() -> s3kit.MotoServer:
    """moto's S3 server of this session (started on first use, stopped at exit)."""
    if not _moto:
        import atexit
        import tempfile

        log = Path(tempfile.gettempdir()) / f"ckptguard-moto-{os.getpid()}.log"
        _moto.append(s3kit.start(log))
        atexit.register(s3kit.stop, _moto[0])
    return _moto[0]


def _s3(case: Case, base: Path, tmp: Path, seen: dict) -> tuple[str, str]:
    """drain(SRC, s3://BUCKET/p) of "a" and "b" into a bucket holding "a" (LATEST), killed or
    failing at the case's point: b is absent (no MANIFEST.json object), visible or latest, and
    whole if there; the retry completes it; gc then leaves exactly the committed checkpoints'
    objects."""
    from ckptguard import objstore

    server = _moto_server()
    env = s3kit.environ(server)
    bucket = s3kit.new_bucket(server)
    url = f"s3://{bucket}/p"
    src = base / "src"
    with mock.patch.dict(os.environ, env):
        drain(src, url, names=["a"])
    ranks = _single_run(case, tmp, ["drain", str(src), url], **env, CKPTGUARD_S3_PART_BYTES=S3_PART)
    with mock.patch.dict(os.environ, env):
        names = {i.name for i in objstore.scan(objstore.Bucket(bucket), objstore.parse(url)).listed}
        latest = objstore.latest_name(objstore.Bucket(bucket), objstore.parse(url))
        outcome = "absent" if "b" not in names else "latest" if latest == "b" else "visible"
        seen["outcome"] = outcome
        assert outcome == case.expect, f"b in the bucket is {outcome}, expected {case.expect}"
        check_bucket(url, src, {"a"} if outcome == "absent" else {"a", "b"}, latest)
        drain(src, url)  # the retry completes it
        check_bucket(url, src, {"a", "b"}, "b")
        objstore.gc(url, older_than=0)  # the killed drain's leftovers go; nothing committed
        check_bucket(url, src, {"a", "b"}, "b")
        uuids = {i.name: i.uuid for i in ckptguard.Store(src).list()}
        for key in s3kit.keys(server, bucket):  # LATEST, and each one's manifest and objects
            _, name, *rest = key.split("/")
            assert name == "LATEST" or rest[0] in ("MANIFEST.json", uuids[name]), key
    check_store(src, {"a", "b"}, "b")  # the source is never changed
    return outcome, ranks


def check_bucket(url: str, src: Path, names: set[str], latest: str | None) -> None:
    """The store in the bucket lists exactly ``names``, each verifying and loading bitwise what
    the source holds; LATEST names ``latest``, and the store loads it."""
    import torch

    from ckptguard import objstore

    where = objstore.parse(url)
    b = objstore.Bucket(where.bucket)
    assert {i.name for i in objstore.scan(b, where).listed} == names
    assert objstore.latest_name(b, where) == latest
    for n in names:
        assert ckptguard.verify(f"{url}/{n}").ok
        got, want = ckptguard.load(f"{url}/{n}"), ckptguard.load(src / n)
        assert got.keys() == want.keys() and got["seed"] == want["seed"]
        for k, v in want.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(got[k], v), (n, k)
    if latest is not None:
        assert ckptguard.load(url)["seed"] == ckptguard.load(src / latest)["seed"]


def _pruned(case: Case, root: Path, seen: dict) -> str:
    """After a prune to the newest two of c1..c4 (c1 first): every checkpoint it did not reach
    is whole, the one it was deleting is whole or gone, c3 and c4 (LATEST) are untouched; the
    retry leaves exactly c3 and c4, each loading what was saved."""
    st = ckptguard.Store(root)
    names = {i.name for i in st.list()}
    outcome = "kept" if names == {"c1", "c2", "c3", "c4"} else "gone"
    seen["outcome"] = outcome
    assert outcome == case.expect, f"c1 is {outcome}, expected {case.expect}"
    assert {"c3", "c4"} <= names and (names == {"c1", "c2", "c3", "c4"} or "c1" not in names)
    check_store(root, names, "c4")
    st.prune({"keep_last": 2})
    check_store(root, {"c3", "c4"}, "c4")
    for i in (3, 4):
        assert ckptguard.load(root / f"c{i}")["seed"] == i
    return outcome


def _shared_outcome(case: Case, root: Path, seen: dict) -> str:
    """After a delete of "a" or a gc that touched the data file "b" links: b is whole and loads
    what was saved; the retry finishes the job and b still loads."""
    st = ckptguard.Store(root)
    names = {i.name for i in st.list()}
    outcome = "intact" if case.scenario == "gc-shared" else "kept" if "a" in names else "gone"
    seen["outcome"] = outcome
    assert outcome == case.expect, f"a is {outcome}, expected {case.expect}"
    check_store(root, names, "b")
    assert names == ({"a", "b"} if outcome == "kept" else {"b"}), names
    if "a" in names:
        st.delete("a")
    check_store(root, {"b"}, "b")
    out = ckptguard.load(root / "b")
    want = shared(1)["w"]
    want[0, 0] += 1.0
    assert out["seed"] == 2 and torch_equal(out["w"], want)
    return outcome


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a, b))


def _onefile(case: Case, base: Path, tmp: Path, seen: dict) -> tuple[str, str]:
    """One process saves small(2) as the one-file checkpoint model.pt over small(1)'s: after
    any failure the file is the old one or the new one, whole and verified, never neither;
    beside it at most the dead save's temporary, named for it, which the retry removes."""
    root = tmp / "root"
    shutil.copytree(base, root)
    ranks = _single_run(case, tmp, ["onefile", str(root / ONEFILE)])
    path = root / ONEFILE
    assert ckptguard.verify(path).ok, ckptguard.verify(path).problems[:3]
    seed = ckptguard.load(path)["seed"]
    outcome = {1: "old", 2: "new"}[seed]
    seen["outcome"] = outcome
    assert outcome == case.expect, f"{ONEFILE} is the {outcome} checkpoint, expected {case.expect}"
    stray = sorted(n for n in os.listdir(root) if n != ONEFILE)
    assert all(n.startswith(f".{ONEFILE}{TEMP_MARK}") for n in stray), stray
    if case.action not in ("kill", "hang"):  # a save that returned removed its temporary
        assert not stray, stray
    ckptguard.save(small(3), path)  # the retry: whole, and the dead save's temporary is gone
    assert os.listdir(root) == [ONEFILE] and ckptguard.load(path)["seed"] == 3
    return outcome, ranks


def _framework(case: Case, base: Path, tmp: Path, seen: dict) -> tuple[str, str]:
    """A framework's training job failing at the point, then resumed (tests/frameworkkit.py)."""
    import frameworkkit

    return frameworkkit.run_case(case, base, tmp, seen)


def _export(case: Case, base: Path, tmp: Path, seen: dict) -> tuple[str, str]:
    """One process exports checkpoint c to safetensors in DEST: after any failure DEST holds no
    file under its final name, at most the dead export's temporaries, which the retry removes."""
    import torch
    from safetensors.torch import load_file

    root = tmp / "root"
    shutil.copytree(base, root)
    src, dst = root / "src" / "c", root / "dst"
    ranks = _single_run(case, tmp, ["export", str(src), str(dst)])
    names = sorted(os.listdir(dst)) if dst.exists() else []
    outcome = "new" if EXPORTED in names else "absent"
    seen["outcome"] = outcome
    assert outcome == case.expect, f"{EXPORTED} is {outcome}, expected {case.expect}"
    stray = [n for n in names if n != EXPORTED]
    assert all(n.startswith(f".{EXPORTED}{TEMP_MARK}") for n in stray), stray
    if case.action not in ("kill", "hang"):  # an export that returned removed its temporary
        assert not stray, stray
    with pytest.warns(ckptguard.ExportWarning):  # the retry: whole, the dead one's temps gone
        ckptguard.export(src, to="safetensors", dest=dst)
    assert os.listdir(dst) == [EXPORTED]
    assert torch.equal(load_file(dst / EXPORTED)["w"], ckptguard.load(src)["w"])
    ckptguard.verify(src)  # the source is never changed
    return outcome, ranks


def _mlflow(case: Case, base: Path, tmp: Path, seen: dict) -> tuple[str, str]:
    """One process backs up the MLflow store as "b2" into a copy of the backup store: after any
    failure b2 is absent, or whole (visible, or latest); b1 still restores, byte for byte; a
    killed backup's scratch directory is removed by the next backup, which succeeds."""
    from ckptguard.mlflow.backup import backup
    from ckptguard.mlflow.refs import Roots
    from ckptguard.mlflow.restore import restore

    store, scratch = tmp / "store", tmp / "scratch"
    shutil.copytree(base / "store", store)
    scratch.mkdir()
    uri, mlruns = f"sqlite:///{base / 'src' / 'mlflow.db'}", str(base / "src" / "mlruns")
    ranks = _single_run(case, tmp, ["mlflow-backup", uri, str(store), mlruns, str(scratch)])
    listed = [c.name for c in ckptguard.Store(str(store)).list()]
    latest = ckptguard.Store(str(store)).latest_name()
    outcome = "absent" if "b2" not in listed else "latest" if latest == "b2" else "visible"
    seen["outcome"] = outcome
    assert outcome == case.expect, f"b2 is {outcome}, expected {case.expect}"
    assert "b1" in listed and all(ckptguard.verify(str(store / n)).ok for n in listed)
    target = tmp / "restored"
    restore(str(store / "b1"), f"sqlite:///{tmp / 'restored.db'}", Roots(None, ()),
            root_map={mlruns: str(target)})  # fmt: skip
    assert _tree_bytes(target) == _tree_bytes(Path(mlruns))
    backup(uri, str(store), Roots(None, (mlruns,)), name="b3", scratch=str(scratch))
    assert os.listdir(scratch) == [], os.listdir(scratch)  # the dead backup's scratch is gone
    return outcome, ranks


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _audit(case: Case, base: Path, tmp: Path, seen: dict) -> tuple[str, str]:
    """One process saves "b" into an audited store (signed heads, a witness) holding "a".
    Every audit step comes after the commit point: "b" is the latest whatever fails there. A
    failure before the append leaves the commit without its entry, a gap `audit check` names;
    after the others the entry is there. The retry (a save of "c") seals anything left
    unsealed, and the log then verifies against its key and its witness."""
    from ckptguard import audit, auditcheck, keys

    root = tmp / "root"
    root.mkdir()
    priv, pub, _ = keys.generate(root / "k")
    store = root / "store"
    audit.init(store, priv, witness=str(root / "witness"))
    ckptguard.save(small(1), store / "a", step=1)
    ranks = _single_run(case, tmp, ["save", str(store), "b"])
    outcome = "latest" if ckptguard.Store(store).latest_name() == "b" else "not latest"
    seen["outcome"] = outcome
    assert outcome == case.expect, f"b is {outcome}, expected {case.expect}"
    gaps = [(g.kind, g.name) for g in auditcheck.check(store).gaps]
    assert gaps == ([("commit", "b")] if case.point == "audit.before_append" else []), gaps
    check_store(store, {"a", "b"}, "b")
    ckptguard.save(small(3), store / "c", step=3)  # the retry
    check_store(store, {"a", "b", "c"}, "c")
    report = audit.verify(store, key=keys.load_public(pub))
    assert report.witnesses and report.witnesses[0][1] == report.size, report.witnesses
    assert [(g.kind, g.name) for g in auditcheck.check(store).gaps] == gaps
    return outcome, ranks


def _signed(case: Case, base: Path, tmp: Path, seen: dict) -> tuple[str, str]:
    """One process saves "b" signed into a store holding "a" (signed with the same key). The
    signature is in the staging directory before the rename: whatever the failure, "b" is
    absent or whole and signed (never visible unsigned); the retry signs "c" the same way."""
    from ckptguard import keys

    root = tmp / "root"
    root.mkdir()
    priv, pub, kid = keys.generate(root / "k")
    store = root / "store"
    ckptguard.save(small(1), store / "a", step=1, sign_key=priv)
    ranks = _single_run(case, tmp, ["save-signed", str(store), "b", priv])
    st = ckptguard.Store(store)
    names, latest = {i.name for i in st.list()}, st.latest_name()
    outcome = "absent" if "b" not in names else "latest" if latest == "b" else "visible"
    seen["outcome"] = outcome
    assert outcome == case.expect, f"b is {outcome}, expected {case.expect}"
    check_store(store, names, latest)
    ckptguard.save(small(3), store / "c", step=3, sign_key=priv)  # the retry
    for name in names | {"c"}:  # every checkpoint listed is signed, its signature verifies
        assert ckptguard.verify(store / name, trusted_keys=pub).signed_by == kid
    check_store(store, names | {"c"}, "c")
    return outcome, ranks


def _dcp(case: Case, base: Path, tmp: Path, seen: dict) -> tuple[str, str]:
    """4 torchrun ranks save "new" beside step-10 by dcp.save with ckptguard.dcp.Writer: after
    any failure the store holds step-10, and "new" whole or not at all; every rank that reports
    says what the store shows (DCP raises one CheckpointException on every rank, naming the
    injected error; an error after the commit point is the coordinator's warning)."""
    store = tmp / "store"
    shutil.copytree(base, store)
    env = torchrun_env(CKPTGUARD_FAILPOINT=case.failpoint)
    cmd = torchrun(4, DCP_RANKS, "fail", store, "new", DCP_TIMEOUT)
    code, _, log = launch(cmd, env, tmp / "launch.log", BOUND["dcp"])
    fired(case, log)
    names = {i.name for i in ckptguard.Store(store).list()}
    latest = ckptguard.Store(store).latest_name()
    outcome = "absent" if "new" not in names else "latest" if latest == "new" else "visible"
    seen["outcome"] = outcome
    assert outcome == case.expect, f"the new checkpoint is {outcome}, expected {case.expect}"
    check_store(store, names, latest)
    assert names - {"new"} == {"step-10"}, names
    reports = {r: _read_json(tmp / "out" / f"rank-{r}.json") for r in range(4)}
    got = {r: rep for r, rep in reports.items() if rep is not None}
    if case.late_error:
        assert code == 0 and len(got) == 4 and all(o["ok"] for o in got.values()), got
        assert got[0]["warnings"], f"rank 0 did not warn of the error after the commit: {got}"
        return outcome, "ok with a warning"
    assert code != 0, "a failpoint fired, yet the job succeeded"
    if outcome == "absent":
        assert not any(o["ok"] for o in got.values()), f"absent, yet reported saved: {got}"
    if case.action in ("eio", "enospc"):  # one outcome: the injected error, on every rank
        assert len(got) == 4 and all("injected" in o.get("error", "") for o in got.values()), got
        return outcome, "same error"
    return outcome, "killed" if case.action == "kill" else "hung rank timed out"


def _keyring(case: Case, base: Path, tmp: Path, seen: dict) -> tuple[str, str]:
    """One process creates a key, rotates the keyring or shreds s0 (store_ops.keyring_op) and
    fails at the point. Every key left live unwraps, under the KEK its entry names, to the
    bytes it had; the outcome is the one expected; gc removes the temporaries; the re-run
    completes (in every copy, for a shred)."""
    from ckptguard.errors import ScopeShreddedError

    k1, k2 = keyring.Kek(bytes(range(32))), keyring.Kek(bytes(range(32, 64)))
    a, b = str(tmp / "a"), str(tmp / "b")
    before = {s: keyring.obtain(a, s, k1) for s in ("s0", "s1", "s2")}
    keyring.copy_to(a, b, {"s0": before["s0"].key_id})
    op = {"keyring.created": "create", "keyring.rotate_one": "rotate"}.get(case.point, "shred")
    ranks = _single_run(case, tmp, [f"keyring-{op}", a])
    kek = {k1.kek_id: k1, k2.kek_id: k2}
    live = {(s, e.scope): e for s in (a, b) for e in keyring.entries(s) if e.live}
    for (s, scope), e in live.items():
        assert not e.problem, e
        if scope in before:
            assert keyring.unwrap(s, scope, e.key_id, kek[e.kek_id or ""]) == before[scope]
    under = {e.kek_id for e in live.values()}
    outcome = {
        "create": "live" if (a, "new") in live else "absent",
        "rotate": "mixed"
        if under == {k1.kek_id, k2.kek_id}
        else "new"
        if k1.kek_id not in under
        else "old",
        "shred": {(True, True): "live", (False, True): "partial", (False, False): "shredded"}.get(
            ((a, "s0") in live, (b, "s0") in live), "resurrected"
        ),
    }[op]
    seen["outcome"] = outcome
    assert outcome == case.expect, f"the keyring is {outcome}, expected {case.expect}"
    for s in (a, b):
        keyring.gc_temps(s, 0)
        assert all(
            n in (".lock", "COPIES") or not n.startswith(".") for n in os.listdir(Path(s, ".keys"))
        )
    if op == "create":  # the retry: a key, whole
        assert keyring.obtain(a, "new", k1) == keyring.obtain(a, "new", k1)
    elif op == "rotate":
        keyring.rotate(a, k1, k2)
        assert all(keyring.unwrap(a, s, k.key_id, k2) == k for s, k in before.items())
    else:
        assert sorted(keyring.shred(a, "s0")) == sorted(map(os.path.realpath, (a, b)))
        for s in (a, b):
            with pytest.raises(ScopeShreddedError):
                keyring.unwrap(s, "s0", before["s0"].key_id, k1)
        assert keyring.unwrap(a, "s1", before["s1"].key_id, k1) == before["s1"]
    return outcome, ranks


SEAL_KEK = "5e" * 32


def _sealed(case: Case, base: Path, tmp: Path, seen: dict) -> tuple[str, str]:
    """``_mpi`` of an encrypted save: the ranks and this process (which checks the store,
    loading what was committed) share the key-encryption key."""
    with mock.patch.dict(os.environ, {"CKPTGUARD_KEK": SEAL_KEK}):
        for var in ("CKPTGUARD_KEK_FILE", "CKPTGUARD_KEK_COMMAND"):
            os.environ.pop(var, None)
        return _mpi(case, base, tmp, seen)


_SCENARIOS: dict[str, Callable[[Case, Path, Path, dict], tuple[str, str]]] = {
    "keyring": _keyring,
    "save": _mpi,
    "save-zstd": _mpi,
    "save-sealed": _sealed,
    "incremental": _mpi,
    "overwrite": _mpi,
    "fallback": _mpi,
    "agent": _agent,
    "agent-srun": _agent,
    "gc": _single,
    "delete": _single,
    "gc-shared": _single,
    "delete-base": _single,
    "prune": _single,
    "drain": _single,
    "s3": _s3,
    "onefile": _onefile,
    "audit": _audit,
    "signed": _signed,
    "lightning": _framework,
    "hf": _framework,
    "export": _export,
    "dcp": _dcp,
    "mlflow": _mlflow,
}
