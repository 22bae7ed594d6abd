"""The trainer's environment: torchrun's rank variables, from Slurm's or from the agents' MPI world.

Slurm's variables are used when they describe this launch (``SLURM_PROCID`` and ``SLURM_NTASKS``
match the agents' MPI rank and size); values already in the environment always win. Launcher
variables (``PMI_*``, ``PMIX_*``, ``OMPI_*``, ``HYDRA_*``, ``MPI_LOCAL*``) are removed: the
trainer is not part of the agents' MPI world.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from .protocol import ENV_ADDRESS

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "HYDRA_")
_LAUNCHER_VARS = ("MPI_LOCALNRANKS", "MPI_LOCALRANKID")


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def _int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def tasks_on_node(spec: str, node_index: int) -> int | None:
    """Tasks on node ``node_index`` from Slurm's ``2(x3),1`` notation; None if unparseable."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_index] if 0 <= node_index < len(counts) else None


def slurm_ranks(env: Mapping[str, str]) -> Ranks | None:
    """This task's ranks from Slurm's variables (local size None-safe), or None outside ``srun``."""
    rank, size = _int(env.get("SLURM_PROCID")), _int(env.get("SLURM_NTASKS"))
    size = size if size is not None else _int(env.get("SLURM_STEP_NUM_TASKS"))
    local = _int(env.get("SLURM_LOCALID"))
    if rank is None or size is None or local is None:
        return None
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    local_size = tasks_on_node(spec, _int(env.get("SLURM_NODEID")) or 0) if spec else None
    return Ranks(rank, size, local, local_size if local_size is not None else -1)


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list, without ``scontrol``: ``n[01-04,7],g1`` -> ``n01``."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first)


def slurm_master_addr(env: Mapping[str, str]) -> str | None:
    """The step's first host (``scontrol show hostnames`` when available), or None."""
    nodelist = (
        env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    )
    if not nodelist:
        return None
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return first_host(nodelist)


def slurm_master_port(env: Mapping[str, str]) -> int | None:
    """``20000 + (16 * SLURM_JOB_ID + SLURM_STEP_ID) mod 12000``: below Linux's ephemeral range."""
    job = _int(env.get("SLURM_JOB_ID"))
    if job is None:
        return None
    step = _int(env.get("SLURM_STEP_ID")) or 0
    return 20000 + (16 * job + step) % 12000


def free_port() -> int:
    """A TCP port free on this host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _launcher_var(name: str) -> bool:
    return name.startswith(_LAUNCHER_PREFIXES) or name in _LAUNCHER_VARS


def child_env(
    env: Mapping[str, str], ranks: Ranks, master_addr: str, master_port: int, address: str
) -> dict[str, str]:
    """``env`` less launcher variables, plus the rank variables it lacks and the agent's address."""
    out = {k: v for k, v in env.items() if not _launcher_var(k)}
    ours = {
        "RANK": ranks.rank,
        "WORLD_SIZE": ranks.world_size,
        "LOCAL_RANK": ranks.local_rank,
        "LOCAL_WORLD_SIZE": ranks.local_world_size,
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": master_port,
    }
    for name, value in ours.items():
        if not out.get(name):
            out[name] = str(value)
    out[ENV_ADDRESS] = address
    return out
