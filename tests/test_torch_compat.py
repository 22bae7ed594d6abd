"""``ckptguard.save``/``load`` where ``torch.save``/``torch.load`` were: the same call shapes
(positional path or file object, map_location in every form torch takes, weights_only, the
torch.save keywords that choose how torch pickles), and a plain training loop that resumes
bitwise equal with only the module name changed (docs/onefile.md, "Replacing torch.save")."""

from __future__ import annotations

import fractions
import io
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptguard

LOOP = """
import io
import torch


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model, opt, epoch):
    g = torch.Generator().manual_seed(epoch)
    for _ in range(5):
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


model, opt = make()
for epoch in range(3):
    train(model, opt, epoch)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": epoch}
    torch.save(state, PATH)  # the same path, overwritten each epoch
buf = io.BytesIO()
torch.save(state, buf)

resumed = []
for source in (PATH, buf):
    buf.seek(0)
    model2, opt2 = make()
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optim"])
    for epoch in range(ckpt["epoch"] + 1, 5):
        train(model2, opt2, epoch)
    resumed.append(model2.state_dict())
for epoch in range(3, 5):
    train(model, opt, epoch)
RESULT = model.state_dict(), resumed
"""


def run_loop(module: str, path: Path) -> tuple[Any, list[Any]]:
    src = LOOP.replace("torch.save(", f"{module}.save(").replace("torch.load(", f"{module}.load(")
    scope: dict[str, Any] = {"PATH": str(path), "ckptguard": ckptguard}
    exec(compile(src, f"<loop with {module}>", "exec"), scope)
    return scope["RESULT"]


def test_training_loop_resumes_bitwise_equal_with_the_module_name_changed(tmp_path: Path) -> None:
    torch_final, torch_resumed = run_loop("torch", tmp_path / "torch.pt")
    ours_final, ours_resumed = run_loop("ckptguard", tmp_path / "ours.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.pt", "torch.pt"]
    for state in (ours_final, *ours_resumed, *torch_resumed):
        assert state.keys() == torch_final.keys()
        for k in state:
            assert torch.equal(state[k], torch_final[k]), k
    assert ckptguard.verify(tmp_path / "ours.pt").ok


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    p = tmp_path / "m.pt"
    ckptguard.save(
        {"w": torch.arange(6.0).reshape(2, 3), "p": torch.nn.Parameter(torch.ones(2))}, p
    )
    return p


@pytest.mark.parametrize(
    "loc",
    [
        "cpu",
        torch.device("cpu"),
        {"cpu": "cpu"},
        {"cuda:0": "cpu"},
        lambda saved: "cpu",  # ckptguard's kind: the saved device in, a device out
        lambda storage, loc: storage,  # torch's kind: the storage in, where it goes out
        lambda storage, loc: None,  # torch's: None means where it was saved
        lambda storage, loc: storage.clone(),  # another storage of the same bytes
    ],
)
def test_map_location_in_every_form_torch_takes(saved: Path, loc: Any) -> None:
    got = ckptguard.load(saved, map_location=loc)
    assert got["w"].equal(torch.arange(6.0).reshape(2, 3)) and got["w"].device.type == "cpu"
    assert isinstance(got["p"], torch.nn.Parameter) and got["p"].requires_grad
    assert ckptguard.load(saved, loc)["w"].shape == (2, 3)  # positional, as torch.load(f, loc)


def test_map_location_returning_something_else_is_a_typed_error(saved: Path) -> None:
    with pytest.raises(ckptguard.CheckpointError, match="map_location returned"):
        ckptguard.load(saved, map_location=lambda storage, loc: 3)


def test_weights_only_and_pickle(tmp_path: Path) -> None:
    p = tmp_path / "p.pt"
    ckptguard.save({"s": fractions.Fraction(1, 2)}, p, allow_pickle=True)
    assert ckptguard.load(p, weights_only=False)["s"] == fractions.Fraction(1, 2)
    with pytest.raises(ckptguard.UnsupportedObjectError, match="allow_pickle"):
        ckptguard.load(p, weights_only=True)
    with pytest.raises(ckptguard.UnsupportedObjectError):
        ckptguard.load(p)
    with pytest.raises(ValueError, match="contradict"):
        ckptguard.load(p, weights_only=True, allow_pickle=True)
    got = ckptguard.load(p, pickle_module=pickle, weights_only=False)
    assert got["s"] == fractions.Fraction(1, 2)
    with pytest.raises(TypeError, match="pickle_module"):
        ckptguard.load(p, pickle_module=io)
    with pytest.raises(ValueError, match="mmap"):
        ckptguard.load(p, mmap=True, weights_only=False)


def test_torch_save_keywords_are_accepted_and_ignored(tmp_path: Path) -> None:
    state = {"w": torch.ones(3)}
    ckptguard.save(
        state,
        tmp_path / "m.pt",
        pickle_module=pickle,
        pickle_protocol=2,
        _use_new_zipfile_serialization=True,
        _disable_byteorder_record=False,
    )
    assert ckptguard.load(tmp_path / "m.pt")["w"].equal(state["w"])
    with pytest.raises(TypeError, match="unknown save option"):
        ckptguard.save(state, tmp_path / "n.pt", pickle_protokol=2)
