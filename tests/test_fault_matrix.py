"""Invariants I1-I8 after a failure at every failpoint of save, commit, LATEST, overwrite, gc,
delete, drain and the agent's snapshot handoff, on every rank that reaches it.

The cases come from tests/fault_cases.txt (tests/faultkit.py generates them): `make test` runs the
rank:action pairs of its last column, `make faults` (CKPTGUARD_FAULTS=all) every rank x action of
every line and writes a summary (CKPTGUARD_FAULTS_SUMMARY=PATH: PATH.md and PATH.json). After each
case one checker (faultkit.check_store) asserts: exactly the expected checkpoints are listed, each
whole and verified; nothing partial is visible; LATEST names the expected one and loads and
verifies; gc then reclaims every leftover. For jobs of 4 ranks, faultkit.check_ranks asserts that
what the ranks report agrees with the store and with each other (the same error naming the failing
rank, or a timeout for a stuck rank), and every launch is bounded (a hang is a failure).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import faultkit
import pytest
from faultkit import Case

FULL = os.environ.get("CKPTGUARD_FAULTS") == "all"
SUMMARY = os.environ.get("CKPTGUARD_FAULTS_SUMMARY")
CASES = faultkit.cases(full=FULL)
RESULTS: list[dict] = []

# Invariant violations the enumeration found and the product does not fix yet (docs/reliability.md,
# "Known violations"): (scenario, point, action) -> why. They run, and count, as expected failures.
KNOWN: dict[tuple[str, str, str], str] = {}  # none open today


# Failpoints act in Python (a SIGKILL, a raised OSError, a sleep), so what a case injects and the
# recovery it checks are the same on both backends. The pure-Python pass of `make test` keeps the
# cases that interrupt the backend's own record writes (the data written, zstd records); real
# faults inside each backend's writes are tests/test_resource_faults.py, run on both.
BOTH_BACKENDS = {"save-zstd"}
BOTH_BACKEND_POINTS = {"save.data_written"}


def _param(case: Case):
    why = KNOWN.get((case.scenario, case.point, case.action))
    marks = [pytest.mark.xfail(reason=why, strict=False)] if why else []
    both = case.scenario in BOTH_BACKENDS or (
        case.scenario == "save" and case.point in BOTH_BACKEND_POINTS and case.action != "hang"
    )
    if not both:
        marks.append(pytest.mark.backend_independent)
    return pytest.param(case, id=case.id, marks=marks)


pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    yield faultkit.make_bases(tmp_path_factory.mktemp("bases"))
    if SUMMARY:
        write_summary(Path(SUMMARY), RESULTS)


# Killed at each of their points by their own tests (test_deepspeed.py, test_megatron.py,
# test_protect.py).
INTEGRATIONS = ("deepspeed", "megatron", "redundancy")
# Node-local saves and drains: tests/test_localcommit.py and tests/test_nodedrain.py fail them at
# each of their points.
ELSEWHERE = {"localcommit.py", "nodedrain.py"}


@pytest.mark.backend_independent
def test_table_is_consistent():
    """Every case `make test` runs is part of the full enumeration; every failpoint is in it."""
    full = {c.id for c in faultkit.cases(full=True)}
    assert {c.id for c in faultkit.cases(full=False)} <= full
    rows = faultkit.table()
    for r in rows:
        assert all(rank in r.ranks and a in faultkit.ACTIONS for rank, a in r.subset), r
    points = {r.point for r in rows}
    source = Path(faultkit.HERE.parent, "ckptguard")
    named = set()
    for p in source.rglob("*.py"):
        if p.parent.name in INTEGRATIONS or p.name in ELSEWHERE:
            continue
        text = p.read_text()
        for part in text.split('failpoint("')[1:]:
            named.add(part.split('"')[0])
    assert named == points, f"in the code, not the table: {named - points}; stale: {points - named}"


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_failure_leaves_invariants(tmp_path, bases, case: Case):
    t0 = time.monotonic()
    record = {
        "case": case.id,
        "scenario": case.scenario,
        "point": case.point,
        "rank": case.rank,
        "action": case.action,
        "expected": case.expect,
    }
    seen: dict = {}
    try:
        outcome, ranks = faultkit.run_case(case, bases, tmp_path, seen)
        record.update(outcome=outcome, ranks=ranks, passed=True)
    except BaseException as e:
        outcome = seen.get("outcome", "?")
        record.update(outcome=outcome, ranks="?", passed=False, error=str(e)[:2000])
        record["known"] = (case.scenario, case.point, case.action) in KNOWN
        raise
    finally:
        record["seconds"] = round(time.monotonic() - t0, 1)
        RESULTS.append(record)


def write_summary(path: Path, results: list[dict]) -> None:
    """PATH.json (every case) and PATH.md (counts per scenario, action and outcome)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    total = sum(r["seconds"] for r in results)
    doc = {
        "date": stamp,
        "full": FULL,
        "cases": len(results),
        "seconds": round(total),
        "results": results,
    }
    path.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    by = defaultdict(list)
    for r in results:
        by[r["scenario"]].append(r)
    passed = sum(r["passed"] for r in results)
    known = sum(r.get("known", False) for r in results)
    failed = len(results) - passed - known
    lines = [
        f"# Fault matrix: {len(results)} cases, {passed} passed, {failed} failed, "
        f"{known} known violations",
        "",
        f"{stamp}; {'full enumeration (make faults)' if FULL else 'subset (make test)'}; "
        f"{total / 60:.1f} min in the cases. Table: tests/fault_cases.txt.",
        "",
        "| scenario | cases | kill | eio | enospc | hang | store afterwards | ranks reported "
        "| passed | failed | known | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scen, rs in by.items():
        acts = Counter(r["action"] for r in rs)
        outs = Counter(r["outcome"] for r in rs)
        ranks = Counter(part for r in rs for part in r["ranks"].split("; "))
        ok = sum(r["passed"] for r in rs)
        kn = sum(r.get("known", False) for r in rs)
        lines.append(
            f"| {scen} | {len(rs)} | "
            + " | ".join(str(acts.get(a, 0)) for a in faultkit.ACTIONS)
            + f" | {_counts(outs)} | {_counts(ranks)} | {ok} | {len(rs) - ok - kn} | {kn} | "
            f"{sum(r['seconds'] for r in rs):.0f} |"
        )
    bad = [r for r in results if not r["passed"]]
    if bad:
        lines += ["", "## Failed cases (known: an open violation, KNOWN in the test)", ""]
        for r in bad:
            first = r.get("error", "").strip().splitlines()[:3]
            tag = " (known)" if r.get("known") else ""
            lines.append(f"- `{r['case']}`{tag}, expected {r['expected']}: {' / '.join(first)}")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _counts(c: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
