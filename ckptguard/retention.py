"""Retention: which checkpoints of a store a policy keeps, and pruning the others.

A ``Policy`` is a set of keep rules; a checkpoint is kept if any rule keeps it, and the newest
checkpoint and the one LATEST names are always kept. ``plan`` is a pure function of
the store's listing and the clock, so a dry run shows exactly what ``Store.prune`` then
removes: the others, oldest first, through ``Store.delete(prune=True)`` (each removal atomic
and, in an audited store, recorded as a ``prune`` entry). Rules (docs/operations.md):

- ``keep_last`` N: the N newest;
- ``keep_every_steps`` N: those whose step is a multiple of N;
- ``keep_within``: those created within this duration of the newest checkpoint's creation
  (measured from the newest, not the clock: a run that stopped is not pruned away by time);
- ``keep_hourly``/``daily``/``weekly``/``monthly``/``yearly`` N: the newest checkpoint of each
  of the N latest UTC hours/days/ISO weeks/months/years that have one;
- ``keep_tags``: those whose ``metadata`` is an object whose ``"tags"`` list holds one of these;
- ``sdc_window``: silent data corruption is found up to this long after it happens, so the
  newest checkpoint created at least this long before now (the clock) is kept: one that a late
  detection can still roll back to.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import RetentionPolicyError
from .format.manifest import CheckpointInfo
from .fsutil import UnsafeFileError, read_regular

__all__ = [
    "POLICY_FILE",
    "Decision",
    "Policy",
    "as_policy",
    "parse_duration",
    "plan",
    "read_policy",
]

POLICY_FILE = ".retention.json"
"""A store's own policy, read by ``ckptguard prune`` when present (JSON: ``Policy`` fields)."""
MAX_POLICY_BYTES = 64 << 10
BUCKETS: dict[str, Callable[[dt.datetime], tuple[int, ...]]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar()[:2]),
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d|w)")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object, what: str = "duration") -> dt.timedelta:
    """A duration: a timedelta, seconds (a number), or text such as "90m", "36h", "2d 12h",
    "1w" (units s, m, h, d, w). RetentionPolicyError naming ``what`` otherwise."""
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().lower()
        parts = _DURATION.findall(text)
        if not parts or _DURATION.sub("", text).strip():
            raise RetentionPolicyError(f"{what}: {value!r} is not a duration such as 36h or 2d")
        seconds = sum(float(n) * _UNIT[u] for n, u in parts)
    else:
        raise RetentionPolicyError(f"{what}: {value!r} is not a duration such as 36h or 2d")
    if not 0 < seconds < 1e11:
        raise RetentionPolicyError(f"{what}: {value!r} must be positive")
    return dt.timedelta(seconds=seconds)


@dataclass(frozen=True)
class Policy:
    """Keep rules (module docstring); None or empty: the rule keeps nothing."""

    keep_last: int | None = None
    keep_every_steps: int | None = None
    keep_within: dt.timedelta | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_tags: tuple[str, ...] = ()
    sdc_window: dt.timedelta | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("keep_within", "sdc_window"):
                if v is not None:
                    object.__setattr__(self, f.name, parse_duration(v, f.name))
            elif f.name == "keep_tags":
                tags = (v,) if isinstance(v, str) else tuple(v)
                if not all(isinstance(t, str) and t for t in tags):
                    raise RetentionPolicyError(f"keep_tags must be non-empty strings, not {v!r}")
                object.__setattr__(self, f.name, tags)
            elif v is not None and (type(v) is not int or v < 1):
                raise RetentionPolicyError(f"{f.name} must be an integer >= 1, not {v!r}")

    @property
    def empty(self) -> bool:
        """No rule at all: pruning by it would keep only the newest checkpoint."""
        return all(getattr(self, f.name) in (None, ()) for f in dataclasses.fields(self))

    @classmethod
    def from_json(cls, doc: object, where: str = "policy") -> Policy:
        """A policy from a JSON object of its fields (durations as text or seconds)."""
        if not isinstance(doc, dict):
            raise RetentionPolicyError(f"{where}: a retention policy is a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - names)
        if unknown:
            raise RetentionPolicyError(
                f"{where}: unknown rule(s) {unknown}; rules: {sorted(names)}"
            )
        try:
            return cls(**doc)
        except RetentionPolicyError as e:
            raise RetentionPolicyError(f"{where}: {e}") from None

    def merged(self, **overrides: Any) -> Policy:
        """This policy with the rules given (not None) replaced."""
        given = {k: v for k, v in overrides.items() if v is not None and v != ()}
        return dataclasses.replace(self, **given)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dt.timedelta):
                v = v.total_seconds()
            if v not in (None, ()):
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def as_policy(value: Policy | Mapping[str, Any] | None) -> Policy | None:
    """``value`` (a Policy, a mapping of its fields, or None) as a Policy."""
    if value is None or isinstance(value, Policy):
        return value
    if isinstance(value, Mapping):
        return Policy.from_json(dict(value), "keep")
    raise TypeError(f"keep must be a retention.Policy or a dict of its rules, not {value!r}")


@dataclass(frozen=True)
class Decision:
    """What the plan does with one checkpoint, and why (the rules that keep it)."""

    info: CheckpointInfo
    keep: bool
    reasons: tuple[str, ...]


def _tags(info: CheckpointInfo) -> set[str]:
    md = info.metadata
    tags = md.get("tags") if isinstance(md, dict) else None
    return {t for t in tags if isinstance(t, str)} if isinstance(tags, list) else set()


def plan(
    infos: Sequence[CheckpointInfo],
    policy: Policy,
    now: dt.datetime | None = None,
    latest: str | None = None,
) -> list[Decision]:
    """The decision for each checkpoint of ``infos`` (any order), newest first. Newest means
    latest ``created`` (then name, for a stable order). ``latest``: the checkpoint the store's
    LATEST names, kept too (a resume reads it, whatever its age)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    order = sorted(infos, key=lambda i: (i.created, i.name), reverse=True)
    why: dict[str, list[str]] = {i.name: [] for i in order}
    if order:
        why[order[0].name].append("newest")
    if latest in why:
        why[latest].append("LATEST")
    for i in order[: policy.keep_last or 0]:
        why[i.name].append(f"last {policy.keep_last}")
    if policy.keep_every_steps:
        n = policy.keep_every_steps
        for i in order:
            if i.step is not None and i.step % n == 0:
                why[i.name].append(f"step multiple of {n}")
    if policy.keep_within and order:
        edge = order[0].created - policy.keep_within
        for i in order:
            if i.created >= edge:
                why[i.name].append(f"within {policy.keep_within} of the newest")
    for bucket, key in BUCKETS.items():
        left = getattr(policy, f"keep_{bucket}") or 0
        last: tuple[int, ...] | None = None
        for i in order:
            if left <= 0:
                break
            k = key(i.created.astimezone(dt.timezone.utc))
            if k != last:
                why[i.name].append(f"{bucket} {'-'.join(map(str, k))}")
                last, left = k, left - 1
    for i in order:
        hit = sorted(_tags(i) & set(policy.keep_tags))
        if hit:
            why[i.name].append(f"tagged {', '.join(hit)}")
    if policy.sdc_window:
        old = [i for i in order if i.created <= now - policy.sdc_window]
        if old:
            why[old[0].name].append(f"newest older than the SDC window {policy.sdc_window}")
    return [Decision(i, bool(why[i.name]), tuple(why[i.name])) for i in order]


def read_policy(store: str | os.PathLike) -> Policy | None:
    """The store's own policy (``POLICY_FILE``), or None if it has none; RetentionPolicyError
    for one that cannot be used. Read as untrusted input: no link, no FIFO, size-capped."""
    root = os.path.abspath(os.fspath(store))
    path = os.path.join(root, POLICY_FILE)
    try:
        raw = read_regular(path, max_size=MAX_POLICY_BYTES)
    except FileNotFoundError:
        return None
    except UnsafeFileError as e:
        raise RetentionPolicyError(f"{path} {e.reason}: not read") from None
    except (OSError, ValueError) as e:
        raise RetentionPolicyError(f"{path}: cannot be read ({e})") from None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RetentionPolicyError(f"{path}: not JSON ({e})") from None
    return Policy.from_json(doc, path)
