"""The real single-node Slurm cluster for tests (slurm/local-cluster.sh start, run by `make test`):
finding it, and an environment for launching jobs from a test. A missing cluster skips the test,
and fails it with CI=true, since `make test` starts one."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

CI = os.environ.get("CI") == "true"
TOOLS = ("sinfo", "srun", "sbatch", "scancel")
UP = {"idle", "mix", "alloc", "comp", "plnd"}  # sinfo %t of a node that answers and takes jobs


def unavailable(reason: str) -> None:
    reason = f"{reason} (start one with `slurm/local-cluster.sh start`)"
    if CI:
        pytest.fail(f"no Slurm cluster in CI, where `make test` starts one: {reason}", False)
    pytest.skip(reason)


def clean_env() -> dict[str, str]:
    """This environment without Slurm's and PMI's variables: when the tests themselves run inside
    a Slurm job, srun would otherwise make a step of that job instead of a job of its own (and
    an MPI launch would join that job's world)."""
    drop = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "PMI_", "PMIX_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def partition() -> str:
    """The cluster's default partition, once a node answers; skip (or fail in CI) otherwise."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not found")
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%P %t %a"],
            capture_output=True,
            text=True,
            timeout=15,
            env=clean_env(),
        )
    except subprocess.TimeoutExpired:
        unavailable("sinfo did not answer in 15 s")
    if proc.returncode != 0:
        unavailable(f"sinfo failed: {proc.stderr.strip() or proc.stdout.strip()}")
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    up = [p for p, state, avail in rows if state in UP and avail == "up"]
    if not up:
        unavailable(f"no node is up: sinfo says {proc.stdout.strip()!r}")
    default = [p for p in up if p.endswith("*")]
    return (default or up)[0].rstrip("*")


def job_options(part: str, minutes: int = 1) -> Iterator[list[str]]:
    """Options for one test's jobs: the partition, a unique name and a time limit. Any job of
    that name still alive at the end is cancelled (use as a generator fixture's body)."""
    name = f"ckptguard-test-{uuid.uuid4().hex[:8]}"
    yield [f"--partition={part}", f"--job-name={name}", f"--time={minutes}"]
    subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=15, env=clean_env())


@pytest.fixture(scope="module")
def slurm() -> str:
    return partition()


@pytest.fixture
def job(slurm: str) -> Iterator[list[str]]:
    yield from job_options(slurm)
