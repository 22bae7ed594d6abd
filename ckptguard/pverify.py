"""Parallel verify: the chunks of one checkpoint split across the ranks of an MPI job.

``srun ckptguard verify CKPT`` (or ``mpiexec -n N ...``) gives each rank a contiguous run of the
index rows, balanced by the bytes each rank reads; every rank checks its rows with the same code as
the single-process verify (``verify.verify_rows``), rank 0 gathers the problems as JSON, adds the
checks made once per checkpoint (manifest, index, object trees) and broadcasts the verdict. The
merged report equals the single-process one: same problems, same order, same counts.

The protocol for one checkpoint, every message JSON over the coordinator (never pickle):

1. rank 0 opens the checkpoint (manifest and index checks) and broadcasts either the verdict (it
   could not be opened) or the plan: which rows of which file each rank checks, and the uuid and
   index hash every rank must see;
2. every rank opens the checkpoint, checks its rows, and sends its problems and counts to rank 0;
3. rank 0 merges them in rank order, checks the object trees, and broadcasts the final report (or
   the error that stopped it), which every rank returns (or raises).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, NamedTuple

import numpy as np

from .coord import Coordinator, LocalCoordinator
from .coord import auto as coord_auto
from .errors import CheckpointError, CoordinationTimeoutError, CorruptCheckpointError
from .format.datafile import RECORD_HEADER_SIZE
from .format.layout import align
from .open import CheckpointReader
from .read import Problem, VerifyReport, check_trees, problem_of, verify_rows
from .sign import TrustSet

__all__ = [
    "Leader",
    "ParallelVerifyError",
    "Segment",
    "follow",
    "split",
    "verify_parallel",
    "world",
]

TIMEOUT = 600.0  # seconds any collective may wait, beyond the time to read a share (below)
SLOW_READ = 8 << 20  # bytes/s: the slowest read rate a rank's share is given time for


class ParallelVerifyError(CheckpointError):
    """A parallel verify could not run to the end on every rank (the report would be partial)."""


class Segment(NamedTuple):
    """Rows ``start:stop`` of data file ``file`` (in offset order), checked by one rank."""

    file: str
    start: int
    stop: int


def split(files: Sequence[tuple[str, Sequence[int] | np.ndarray]], n: int) -> list[list[Segment]]:
    """Split the rows of ``files`` (each: a name, the bytes of each row in offset order) in ``n``.

    The rows are taken in order (files in the given order, rows in offset order) and cut into
    ``n`` contiguous runs: rank r gets the rows whose middle byte falls in the r-th n-th of the
    total, so each rank reads within one row's size of total/n and each file sequentially. A file
    without rows still goes to the one rank that owns its position (someone checks its header
    and footer). Deterministic: a function of the sizes alone.
    """
    if n < 1:
        raise ValueError(f"cannot split across {n} ranks")
    sizes = [np.asarray(w, dtype=np.int64) for _, w in files]
    total = int(sum(int(s.sum()) for s in sizes))
    out: list[list[Segment]] = [[] for _ in range(n)]
    if total == 0:
        out[0] = [Segment(name, 0, len(s)) for (name, _), s in zip(files, sizes, strict=True)]
        return out
    # positions in half-bytes, so a row's middle is an integer: rank r owns [cuts[r-1], cuts[r])
    cuts = np.array([-(-2 * r * total // n) for r in range(1, n)], dtype=np.int64)
    before = 0
    for (name, _), w in zip(files, sizes, strict=True):
        if len(w) == 0:
            owner = int(np.searchsorted(cuts, 2 * before, side="right"))
            out[owner].append(Segment(name, 0, 0))
            continue
        ends = before + np.cumsum(w)
        owners = np.searchsorted(cuts, 2 * ends - w, side="right")
        starts = np.concatenate([[0], np.flatnonzero(np.diff(owners)) + 1])
        stops = np.concatenate([starts[1:], [len(w)]])
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
            out[int(owners[a])].append(Segment(name, a, b))
        before = int(ends[-1])
    return out


def _record_sizes(rd: CheckpointReader) -> list[tuple[str, np.ndarray]]:
    """Each data file (sorted by name) with the bytes read for each of its rows, in offset order."""
    t = rd.table.select(["file", "offset", "stored_len"]).sort_by(
        [("file", "ascending"), ("offset", "ascending")]
    )
    offsets = t.column("offset").to_numpy()
    stored = t.column("stored_len").to_numpy()
    sizes = align(offsets + RECORD_HEADER_SIZE + stored) - offsets  # each record's extent
    sizes[1:][offsets[1:] == offsets[:-1]] = 0  # a packed record's other slices: read with it
    counts = {f["name"]: f["chunks"] for f in rd.manifest["files"]}  # the reader checked these
    out, at = [], 0
    for name in sorted(rd.files):  # the order the single-process verify uses
        out.append((name, sizes[at : at + counts[name]]))
        at += counts[name]
    return out


def world(parallel: bool = True) -> Coordinator | None:
    """The MPI world this process was launched into (srun, mpiexec) if it has more than one
    rank, else None: verify alone, as one process does.

    Raises ParallelVerifyError when srun started several tasks but gave them no MPI (no PMI
    variables), or mpi4py is missing: each task would otherwise check, and print, everything.
    """
    if not parallel:
        return None
    tasks = _int_env("SLURM_STEP_NUM_TASKS")
    try:
        coord = coord_auto()
    except ImportError as e:
        raise ParallelVerifyError(
            f"launched as several tasks but mpi4py cannot be imported ({e}): install "
            "ckptguard[mpi], or pass --no-parallel"
        ) from None
    if coord.size > 1:
        return coord
    if tasks > 1 and isinstance(coord, LocalCoordinator):
        raise ParallelVerifyError(
            f"srun started {tasks} tasks but gave them no MPI world (no PMI): run "
            "`srun --mpi=pmi2 ...`, or pass --no-parallel"
        )
    return None


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "1"))
    except ValueError:
        return 1


def _send(coord: Coordinator, msg: dict | None, timeout: float) -> dict:
    """Broadcast ``msg`` from rank 0 (None elsewhere) as JSON; every rank returns it."""
    data = json.dumps(msg, separators=(",", ":")).encode() if coord.rank == 0 else None
    return json.loads(coord.broadcast(data, timeout))


def _report_json(report: VerifyReport) -> dict:
    return {
        "path": report.path,
        "problems": [asdict(p) for p in report.problems],
        "chunks_checked": report.chunks_checked,
        "bytes_checked": report.bytes_checked,
        "signed_by": report.signed_by,
        "keyless": report.keyless,
        "key_errors": report.key_errors,
    }


def _report_of(d: dict) -> VerifyReport:
    return VerifyReport(
        d["path"],
        [Problem(**p) for p in d["problems"]],
        int(d["chunks_checked"]),
        int(d["bytes_checked"]),
        d.get("signed_by"),
        {str(k): int(v) for k, v in d.get("keyless", {}).items()},
        {str(k): str(v) for k, v in d.get("key_errors", {}).items()},
    )


def _error_json(exc: BaseException) -> dict:
    return {"type": type(exc).__name__, "message": str(exc)}


def verify_parallel(
    path: str, coord: Coordinator, timeout: float = TIMEOUT, trust: TrustSet | None = None
) -> VerifyReport:
    """Verify checkpoint ``path`` across the ranks of ``coord`` (a collective: every rank calls
    it). Every rank returns the same report, the one ``verify_checkpoint(path, trust=trust)``
    gives; where the single-process verify would raise, rank 0 raises that error and the
    others a ParallelVerifyError with its message. Rank 0 alone checks the signature (under
    ``trust``, given there); the others check the bytes of the manifest it checked."""
    if coord.rank == 0:
        return _lead(path, coord, timeout, trust)
    return _follow(path, coord, timeout)


def _lead(path: str, coord: Coordinator, timeout: float, trust: TrustSet | None) -> VerifyReport:
    report = VerifyReport(path)
    try:
        rd = CheckpointReader(path, trust)
    except CorruptCheckpointError as e:
        report.problems.append(problem_of(e))
        _send(coord, {"report": _report_json(report)}, timeout)
        return report
    except BaseException as e:
        _send(coord, {"error": _error_json(e)}, timeout)
        raise
    with rd:
        report.signed_by = rd.signed.key_id if rd.signed else None
        try:
            sizes = _record_sizes(rd)
            shares = split(sizes, coord.size)
            rows = dict(sizes)
            longest = max(
                sum(int(rows[s.file][s.start : s.stop].sum()) for s in share) for share in shares
            )
            wait = timeout + longest / SLOW_READ
            plan = {
                "uuid": rd.manifest["uuid"],
                "index": rd.manifest["index"]["xxh3_128"],
                "manifest_sha256": hashlib.sha256(rd.manifest_raw).hexdigest(),
                "wait": wait,
                "shares": [[list(s) for s in share] for share in shares],
            }
        except BaseException as e:
            _send(coord, {"error": _error_json(e)}, timeout)
            raise
        _send(coord, {"plan": plan}, timeout)
        own = _check_share(rd, shares[0])
        failure: BaseException | None = own.pop("exception", None)
        results = coord.gather(json.dumps(own).encode(), wait)
        assert results is not None
        try:
            merged = _merge(report, [own, *(json.loads(b) for b in results[1:])])
            if failure is None and merged is not None:
                failure = merged
            if failure is None:
                check_trees(rd, report)
        except BaseException as e:  # a bug here must not leave the other ranks waiting
            failure = failure or e
        if failure is not None:
            _send(coord, {"error": _error_json(failure)}, timeout)
            raise failure
        _send(coord, {"report": _report_json(report)}, timeout)
    return report


def _follow(path: str, coord: Coordinator, timeout: float) -> VerifyReport:
    msg = _send(coord, None, timeout)
    if "plan" in msg:
        plan = msg["plan"]
        share = [Segment(*s) for s in plan["shares"][coord.rank]]
        try:
            with CheckpointReader(path) as rd:
                seen = (rd.manifest["uuid"], rd.manifest["index"]["xxh3_128"])
                digest = hashlib.sha256(rd.manifest_raw).hexdigest()
                if seen != (plan["uuid"], plan["index"]) or digest != plan["manifest_sha256"]:
                    raise ParallelVerifyError(
                        f"rank {coord.rank} sees another checkpoint at {path} than rank 0 "
                        f"(uuid {seen[0]}, rank 0 has {plan['uuid']}): is it on a shared file "
                        "system, and not being replaced?"
                    )
                own = _check_share(rd, share)
        except Exception as e:
            own = {"error": _error_json(e)}
        own.pop("exception", None)
        coord.gather(json.dumps(own).encode(), float(plan["wait"]))
        msg = _send(coord, None, timeout)
    if "error" in msg:
        err = msg["error"]
        raise ParallelVerifyError(f"{err['type']}: {err['message']}")
    return _report_of(msg["report"])


def _check_share(rd: CheckpointReader, share: Sequence[Segment]) -> dict[str, Any]:
    """Check this rank's rows; the outcome as a JSON-able dict (an error ends the share, and is
    kept as ``exception`` too, for rank 0 to raise as it is)."""
    report = VerifyReport(rd.path)
    try:
        parts = [(s.file, rd.rows_of_file(s.file)[s.start : s.stop]) for s in share]
        verify_rows(rd, parts, report)
    except Exception as e:
        return {"error": _error_json(e), "exception": e}
    out = _report_json(report)
    del out["path"]
    return out


def _merge(report: VerifyReport, outcomes: list[dict]) -> ParallelVerifyError | None:
    """Add the ranks' outcomes (in rank order) to ``report``; the first rank's error, if any.

    Ranks that share a file each check its header and footer: a problem without a chunk (the
    file could not be opened) is kept once, as the single-process verify reports it."""
    seen: set[Problem] = set()
    for rank, out in enumerate(outcomes):
        if "error" in out:
            err = out["error"]
            return ParallelVerifyError(
                f"rank {rank} could not check its share: {err['type']}: {err['message']}"
            )
        for p in map(lambda d: Problem(**d), out["problems"]):
            if p.chunk is None:
                if p in seen:
                    continue
                seen.add(p)
            report.problems.append(p)
        report.chunks_checked += int(out["chunks_checked"])
        report.bytes_checked += int(out["bytes_checked"])
        for scope, n in out.get("keyless", {}).items():  # sealed records checked as stored
            report.keyless[scope] = report.keyless.get(scope, 0) + int(n)
        for scope, why in out.get("key_errors", {}).items():
            report.key_errors.setdefault(scope, str(why))
    return None


class Leader:
    """Rank 0 of ``ckptguard verify`` in a job: ``verify`` runs one checkpoint's parallel verify
    (telling the other ranks which, see ``follow``), ``finish`` tells them the exit code."""

    def __init__(
        self,
        coord: Coordinator,
        resolve: Callable[[str], str] = os.path.abspath,
        timeout: float = TIMEOUT,
    ) -> None:
        self.coord = coord
        self.resolve = resolve
        self.timeout = timeout

    def verify(
        self, path: str, progress: object = None, trusted_keys: TrustSet | None = None
    ) -> VerifyReport:
        """Like ``ckptguard.verify(path, trusted_keys=...)``, ``resolve`` finding the
        checkpoint (no progress is shown: each rank knows its own only)."""
        path = self.resolve(path)
        _send(self.coord, {"verify": path}, self.timeout)
        return verify_parallel(path, self.coord, self.timeout, trusted_keys)

    def finish(self, code: int) -> None:
        _send(self.coord, {"exit": code}, self.timeout)


def follow(coord: Coordinator, timeout: float = TIMEOUT) -> int:
    """The other ranks of ``ckptguard verify``: take part in each verify rank 0 starts, print
    nothing, and return the exit code rank 0 ends with."""
    while True:
        msg = _send(coord, None, timeout)
        if "exit" in msg:
            return int(msg["exit"])
        try:
            verify_parallel(msg["verify"], coord, timeout)
        except CoordinationTimeoutError:
            raise  # rank 0 is gone or stuck: waiting for its next word would only stall again
        except CheckpointError:
            pass  # rank 0 reports it, and says how to exit
        except Exception as e:  # a bug on this rank: say so, then stay in step with rank 0
            print(f"rank {coord.rank}: {type(e).__name__}: {e}", file=sys.stderr)
