"""Launching multi-rank test jobs: where ``mpiexec`` is, what a test does when MPI is missing (skip
on a developer's machine, fail in CI, where `make test` installs it), and the environment without
launcher, Slurm, rank and ckptguard variables that a test's own launch starts from.

Test modules import it as a sibling: ``from mpikit import MPIEXEC, need_mpi``.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

# The venv's mpiexec (from the mpich wheel, next to this Python) first, else the one on PATH.
_VENV_BIN = os.path.dirname(sys.executable)
MPIEXEC: str | None = shutil.which("mpiexec", path=_VENV_BIN) or shutil.which("mpiexec")
CI: bool = os.environ.get("CI") == "true"

_DROP = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPI_LOCAL", "CKPTGUARD_")
_DROP_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def need_mpi() -> str:
    """The mpiexec to launch with; skips the test without mpi4py or mpiexec (fails it in CI)."""
    try:
        import mpi4py  # noqa: F401 - imported for its presence; MPI starts in the ranks
    except ImportError:
        missing = "mpi4py"
    else:
        missing = "mpiexec" if MPIEXEC is None else ""
    if missing:
        if CI:
            pytest.fail(f"{missing} is missing in CI: `make test` installs mpich and mpi4py")
        pytest.skip(f"{missing} not found (pip install '.[mpi]')")
    assert MPIEXEC is not None
    return MPIEXEC


def launcher_free_environ() -> dict[str, str]:
    """``os.environ`` without launcher (MPI, PMI), Slurm, rank (RANK, MASTER_ADDR, ...) and
    ckptguard variables, so that a test's launch sets up its own world."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_DROP) and k not in _DROP_VARS}
