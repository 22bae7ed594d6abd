"""When the job must end: ``CKPTGUARD_END_TIME`` (unix seconds), else ``squeue``/``scontrol``.

Only rank 0 asks Slurm (one query per job step, never one per rank); the runner broadcasts it.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
from collections.abc import Mapping

ENV_END_TIME = "CKPTGUARD_END_TIME"


def parse_slurm_time(text: str) -> float | None:
    """Unix seconds from Slurm's ``%s`` or ISO local time; None for ``N/A``, ``Unknown`` etc."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    try:
        return dt.datetime.fromisoformat(text).timestamp()  # naive: the local time zone
    except ValueError:
        return None


def _query(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    env = {**os.environ, "SLURM_TIME_FORMAT": "%s"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=15, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def job_end_time(env: Mapping[str, str]) -> float | None:
    """The job's end time in unix seconds, or None when unknown or unlimited."""
    given = env.get(ENV_END_TIME)
    if given:
        return float(given)
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    out = _query(["squeue", "-h", "-j", job, "-o", "%e"])
    if out and out.strip():
        return parse_slurm_time(out.splitlines()[0])
    out = _query(["scontrol", "show", "job", job])
    m = re.search(r"\bEndTime=(\S+)", out or "")
    return parse_slurm_time(m.group(1)) if m else None
