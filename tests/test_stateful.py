"""Stateful objects (``state_dict``/``load_state_dict``, DCP's ``Stateful``): saved as their
``state_dict()``, restored through ``load_state_dict`` by a load whose template holds them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptguard
from ckptguard.stateful import expand, is_stateful, restore


def trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1, gamma=0.5)
    for _ in range(seed + 1):
        model(torch.randn(3, 4)).sum().backward()
        optim.step()
        sched.step()
    return model, optim, sched


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class Counter:
    """An application's own state object (not a module)."""

    def __init__(self, n: int = 0) -> None:
        self.n = n

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, sd: dict) -> None:
        self.n = sd["n"]


def test_the_protocol() -> None:
    assert is_stateful(torch.nn.Linear(1, 1)) and is_stateful(Counter())
    assert not is_stateful(torch.nn.Linear)  # the class itself
    assert not is_stateful({"state_dict": 1}) and not is_stateful(torch.ones(1))


def test_saved_as_state_dict_and_restored(tmp_path: Path) -> None:
    model, optim, sched = trained(1)
    app = Counter(5)
    ckptguard.save(
        {"model": model, "optim": optim, "sched": sched, "app": app}, tmp_path / "s" / "a"
    )
    plain = ckptguard.load(tmp_path / "s" / "a")  # no template: the state dicts
    assert _same(dict(plain["model"]), dict(model.state_dict()))
    assert plain["sched"]["last_epoch"] == sched.last_epoch and plain["app"] == {"n": 5}
    m2, o2, s2 = trained(3)
    c2 = Counter()
    out = ckptguard.load(
        tmp_path / "s" / "a", template={"model": m2, "optim": o2, "sched": s2, "app": c2}
    )
    assert out["model"] is m2 and out["optim"] is o2 and out["sched"] is s2 and out["app"] is c2
    assert _same(dict(m2.state_dict()), dict(model.state_dict()))
    assert _same(o2.state_dict(), optim.state_dict())
    assert s2.last_epoch == sched.last_epoch and c2.n == 5


def test_at_the_root_and_inside_lists_and_tuples(tmp_path: Path) -> None:
    model, _, _ = trained(0)
    ckptguard.save(model, tmp_path / "m.pt")  # a one-file checkpoint, as torch.save(model)
    m2, _, _ = trained(2)
    assert ckptguard.load(tmp_path / "m.pt", template=m2) is m2
    assert _same(dict(m2.state_dict()), dict(model.state_dict()))
    ckptguard.save({"apps": (Counter(1), [Counter(2)])}, tmp_path / "s" / "b")
    a, b = Counter(), Counter()
    out = ckptguard.load(tmp_path / "s" / "b", template={"apps": (a, [b])})
    assert out["apps"][0] is a and out["apps"][1][0] is b and (a.n, b.n) == (1, 2)


def test_a_place_the_checkpoint_lacks_is_named(tmp_path: Path) -> None:
    ckptguard.save({"app": Counter(1)}, tmp_path / "s" / "a")
    with pytest.raises(ckptguard.CheckpointError, match="'other'"):
        ckptguard.load(tmp_path / "s" / "a", template={"other": Counter()})


def test_never_pickled_even_with_allow_pickle(tmp_path: Path) -> None:
    ckptguard.save({"app": Counter(3)}, tmp_path / "s" / "a", allow_pickle=True)
    assert ckptguard.load(tmp_path / "s" / "a") == {"app": {"n": 3}}  # no pickle to allow


@dataclass
class Registered:
    n: int

    def state_dict(self) -> dict:
        return {"other": self.n}

    def load_state_dict(self, sd: dict) -> None:
        self.n = sd["other"]


def test_a_registered_class_stays_itself(tmp_path: Path) -> None:
    ckptguard.register_types(Registered)
    try:
        ckptguard.save({"r": Registered(4)}, tmp_path / "s" / "a")
        assert ckptguard.load(tmp_path / "s" / "a") == {"r": Registered(4)}
    finally:
        ckptguard.unregister_types(Registered)


def test_expand_and_restore_order() -> None:
    seen: list[str] = []

    class Outer(Counter):
        def state_dict(self) -> dict:
            return {"inner": inner, "n": self.n}

        def load_state_dict(self, sd: dict) -> None:
            seen.append("outer")
            assert sd["inner"] is inner  # restored first, and in its place
            self.n = sd["n"]

    class Inner(Counter):
        def load_state_dict(self, sd: dict) -> None:
            seen.append("inner")
            super().load_state_dict(sd)

    inner, outer = Inner(1), Outer(2)
    expanded, found = expand({"o": outer})
    assert expanded == {"o": {"inner": {"n": 1}, "n": 2}}
    assert [p for p, _ in found] == [("o",), ("o", "inner")]
    out = restore({"o": {"inner": {"n": 7}, "n": 8}}, found, KeyError)
    assert out["o"] is outer and seen == ["inner", "outer"] and (inner.n, outer.n) == (7, 8)
