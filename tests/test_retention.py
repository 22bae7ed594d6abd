"""Retention (ckptguard/retention.py, ``Store.prune``, ``ckptguard prune``, the ``keep`` option):
the plan against an independent oracle on stores of hundreds of checkpoints, the policy's
checks, and pruning real stores (audited, after each commit, from the command line)."""

from __future__ import annotations

import datetime as dt
import os
import random
import sys
from pathlib import Path

import pytest
import torch

import ckptguard
from ckptguard import auditcheck
from ckptguard.errors import OneFileError, RetentionPolicyError
from ckptguard.format.manifest import CheckpointInfo
from ckptguard.retention import POLICY_FILE, Policy, plan

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 1, 1, tzinfo=UTC)


def _info(i: int, created: dt.datetime, step: int | None, tags: list[str]) -> CheckpointInfo:
    return CheckpointInfo(
        f"c{i:04d}", f"/s/c{i:04d}", "0" * 32, step, created, 1, 1, 1, 1, 1, 1, {"tags": tags}
    )


def _store(n: int, rng: random.Random) -> list[CheckpointInfo]:
    """``n`` checkpoints over about 200 days, irregularly spaced (gaps of minutes to days), steps
    growing by irregular amounts, a few tagged."""
    out, t, step = [], T0, 0
    for i in range(n):
        t += dt.timedelta(minutes=rng.choice([7, 30, 61, 180, 600, 1440, 2900]))
        step += rng.choice([50, 100, 250, 1000])
        tags = rng.choice([[], [], [], ["release"], ["eval", "x"]])
        out.append(_info(i, t, step if rng.random() > 0.05 else None, tags))
    rng.shuffle(out)
    return out


def _oracle(infos: list[CheckpointInfo], p: Policy, now: dt.datetime) -> set[str]:
    """What the policy keeps, computed another way: each rule as a set."""
    by_new = sorted(infos, key=lambda i: (i.created, i.name), reverse=True)
    keep = {by_new[0].name}
    keep |= {i.name for i in by_new[: p.keep_last or 0]}
    if p.keep_every_steps:
        keep |= {i.name for i in infos if i.step is not None and i.step % p.keep_every_steps == 0}
    if p.keep_within:
        keep |= {i.name for i in infos if by_new[0].created - i.created <= p.keep_within}
    keys = {
        "hourly": lambda t: t.strftime("%Y%m%d%H"),
        "daily": lambda t: t.strftime("%Y%m%d"),
        "weekly": lambda t: "{:04d}-{:02d}".format(*t.isocalendar()[:2]),
        "monthly": lambda t: t.strftime("%Y%m"),
        "yearly": lambda t: t.strftime("%Y"),
    }
    for name, key in keys.items():
        n = getattr(p, f"keep_{name}")
        if n:
            newest_of: dict[str, CheckpointInfo] = {}
            for i in infos:
                k = key(i.created)
                if k not in newest_of or (i.created, i.name) > (
                    newest_of[k].created,
                    newest_of[k].name,
                ):
                    newest_of[k] = i
            latest = sorted(newest_of.values(), key=lambda i: (i.created, i.name))[-n:]
            keep |= {i.name for i in latest}
    keep |= {i.name for i in infos if set(i.metadata["tags"]) & set(p.keep_tags)}
    if p.sdc_window:
        old = [i for i in infos if i.created <= now - p.sdc_window]
        if old:
            keep.add(max(old, key=lambda i: (i.created, i.name)).name)
    return keep


def _random_policy(rng: random.Random) -> Policy:
    rules: dict = {}
    maybe = lambda: rng.random() < 0.4  # noqa: E731
    if maybe():
        rules["keep_last"] = rng.randint(1, 30)
    if maybe():
        rules["keep_every_steps"] = rng.choice([1000, 5000, 25000])
    if maybe():
        rules["keep_within"] = rng.choice(["6h", "2d", "1w", 3600])
    for b in ("hourly", "daily", "weekly", "monthly", "yearly"):
        if maybe():
            rules[f"keep_{b}"] = rng.randint(1, 40)
    if maybe():
        rules["keep_tags"] = rng.choice([["release"], ["eval"], ["nope"]])
    if maybe():
        rules["sdc_window"] = rng.choice(["1d", "30d", "400d"])
    return Policy(**rules)


@pytest.mark.backend_independent
def test_the_plan_matches_an_oracle_on_stores_of_hundreds() -> None:
    rng = random.Random(17)
    for _ in range(60):
        infos = _store(rng.choice([1, 2, 40, 300, 500]), rng)
        policy = _random_policy(rng)
        now = max(i.created for i in infos) + dt.timedelta(hours=rng.choice([0, 5, 100, 2000]))
        decisions = plan(infos, policy, now)
        assert [d.info for d in decisions] == sorted(
            infos, key=lambda i: (i.created, i.name), reverse=True
        )
        kept = {d.info.name for d in decisions if d.keep}
        assert kept == _oracle(infos, policy, now), policy
        assert all(bool(d.reasons) == d.keep for d in decisions)


@pytest.mark.backend_independent
def test_the_sdc_window_keeps_one_checkpoint_a_late_detection_can_roll_back_to() -> None:
    infos = [_info(i, T0 + dt.timedelta(days=i), i, []) for i in range(10)]  # days 0..9
    now = T0 + dt.timedelta(days=9, hours=1)
    kept = {d.info.name for d in plan(infos, Policy(keep_last=2, sdc_window="3d"), now) if d.keep}
    assert kept == {"c0009", "c0008", "c0006"}  # c0006: the newest created >= 3 days ago
    kept = {d.info.name for d in plan(infos, Policy(keep_last=2, sdc_window="30d"), now) if d.keep}
    assert kept == {"c0009", "c0008"}  # none is that old: nothing to keep for it


@pytest.mark.backend_independent
@pytest.mark.parametrize(
    "rules, match",
    [
        ({"keep_last": 0}, "keep_last"),
        ({"keep_last": True}, "keep_last"),
        ({"keep_daily": "3"}, "keep_daily"),
        ({"keep_within": "soon"}, "keep_within"),
        ({"keep_within": "-2d"}, "keep_within"),
        ({"sdc_window": 0}, "sdc_window"),
        ({"keep_tags": [""]}, "keep_tags"),
        ({"keep_tags": [3]}, "keep_tags"),
    ],
)
def test_bad_rules_are_refused(rules: dict, match: str) -> None:
    with pytest.raises(RetentionPolicyError, match=match):
        Policy(**rules)


def save_steps(store: Path, n: int, **kw: object) -> None:
    """Checkpoints s0..s(n-1) of steps 0..n-1; s1 is tagged "release"."""
    for s in range(n):
        tags = ["release"] if s == 1 else []
        ckptguard.save(
            {"w": torch.full((8,), float(s))},
            store / f"s{s}",
            step=s,
            metadata={"tags": tags},
            **kw,
        )


def names(store: Path) -> list[str]:
    return [i.name for i in ckptguard.Store(store).list()]


@pytest.mark.parametrize("content", ["not json", '{"keep_forever": 1}', '{"keep_last": -1}'])
def test_a_bad_policy_file_is_refused_and_removes_nothing(tmp_path: Path, content: str) -> None:
    store = tmp_path / "store"
    save_steps(store, 3)
    (store / POLICY_FILE).write_text(content)
    with pytest.raises(RetentionPolicyError, match=POLICY_FILE):
        ckptguard.Store(store).prune()
    assert len(names(store)) == 3


def test_a_policy_file_that_is_a_fifo_or_a_link_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    save_steps(store, 2)
    os.mkfifo(store / POLICY_FILE)  # never opened blocking: no hang
    with pytest.raises(RetentionPolicyError):
        ckptguard.Store(store).prune()
    os.unlink(store / POLICY_FILE)
    (tmp_path / "elsewhere.json").write_text('{"keep_last": 1}')
    os.symlink(tmp_path / "elsewhere.json", store / POLICY_FILE)
    with pytest.raises(RetentionPolicyError):
        ckptguard.Store(store).prune()
    assert len(names(store)) == 2


def test_save_keep_prunes_after_each_commit_and_the_log_records_it(tmp_path: Path) -> None:
    store = tmp_path / "store"
    auditcheck.init(store)
    save_steps(store, 5, keep={"keep_last": 2})
    assert names(store) == ["s3", "s4"]
    done = auditcheck.check(store)
    assert (done.total, done.fraction) == (5, 1.0), done.gaps  # 5 commits, 3 prune entries
    with ckptguard.Checkpointer(store, keep=Policy(keep_last=1)) as ck:
        ck.save_async({"w": torch.ones(2)}, "a1", step=10).result()
    assert names(store) == ["a1"]


def test_keep_is_checked_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(RetentionPolicyError, match="keep_forever"):
        ckptguard.save({"w": torch.ones(2)}, tmp_path / "s" / "a", keep={"keep_forever": 1})
    with pytest.raises(OneFileError, match="keep"):
        ckptguard.save({"w": torch.ones(2)}, tmp_path / "m.pt", keep={"keep_last": 1})
    assert not (tmp_path / "s").exists() and not (tmp_path / "m.pt").exists()


# The wiring of an option through ranks or agents: its save path runs on both backends elsewhere.
@pytest.mark.backend_independent
def test_the_agent_prunes_what_it_commits(tmp_path: Path) -> None:
    """Under ``ckptguard run`` (2 ranks), the Checkpointer's saves are committed by the agents;
    their ``keep`` travels with them and rank 0's agent prunes after each commit."""
    from conftest import run_command
    from mpikit import need_mpi

    store, trainer = tmp_path / "store", tmp_path / "train.py"
    trainer.write_text(
        "import torch, ckptguard\n"
        f"with ckptguard.Checkpointer({str(store)!r}, keep={{'keep_last': 1}}) as ck:\n"
        "    for i in range(3):\n"
        "        ck.save_async({'w': torch.full((4,), float(i))}, f'h{i}', step=i).result()\n"
    )
    cmd = [need_mpi(), "-n", "2", sys.executable, "-m", "ckptguard.cli", "run", "--"]
    done = run_command([*cmd, sys.executable, trainer], 180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert names(store) == ["h2"]


def test_two_prunes_at_once_remove_each_checkpoint_once(tmp_path: Path) -> None:
    """Concurrent prunes (two threads, as two agents or cron jobs): every planned removal
    happens once, neither reports a checkpoint the other removed as a failure."""
    import threading

    store = tmp_path / "store"
    save_steps(store, 12)
    results: list = []

    def one() -> None:
        results.append(ckptguard.Store(store).prune(Policy(keep_last=3)))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert names(store) == ["s9", "s10", "s11"]
    assert [failed for _, failed in results] == [[], []]


@pytest.mark.backend_independent
def test_what_latest_names_is_kept_whatever_its_age() -> None:
    infos = [_info(i, T0 + dt.timedelta(days=i), i, []) for i in range(5)]
    kept = [d.info.name for d in plan(infos, Policy(keep_last=1), latest="c0001") if d.keep]
    assert kept == ["c0004", "c0001"]
