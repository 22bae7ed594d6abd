"""Validation after each commit (ckptguard/validation.py, failmarks.py, agent/validator.py): a
re-read records an event and marks a damaged checkpoint; a resume skips marked checkpoints only
when asked; markers are hostile input; ``ckptguard run --validate`` with a real trainer."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from clikit import flip_payload_byte
from conftest import run_command
from mpikit import launcher_free_environ

import ckptguard
from ckptguard import events, failmarks
from ckptguard.agent.protocol import EXIT_VALIDATION_FAILED
from ckptguard.validation import failed, latest_valid, validate


def _save(store: Path, name: str, value: float) -> ckptguard.CheckpointInfo:
    state = {"w": torch.full((3000,), value), "step": int(value)}
    return ckptguard.save(state, str(store / name), step=int(value), chunk_size=4096)


@pytest.fixture
def three(tmp_path: Path) -> Path:
    """A store with step-1, step-2 and step-3 (LATEST)."""
    store = tmp_path / "store"
    for i in (1, 2, 3):
        _save(store, f"step-{i}", float(i))
    return store


def _info(store: Path, name: str) -> ckptguard.CheckpointInfo:
    return next(i for i in ckptguard.Store(store).list() if i.name == name)


def _marker(store: Path, name: str) -> Path:
    return store / failmarks.DIR / f"{name}.json"


def test_a_whole_checkpoint_validates_and_is_recorded(three: Path) -> None:
    out = validate(three / "step-2", by="slurm")
    assert out.ok and out.problems == [] and out.bytes_checked > 0
    assert not _marker(three, "step-2").exists()
    (ev,) = events.read(three).of("validation")
    want = ("step-2", "ok", "slurm", 0)
    assert (ev["checkpoint"], ev["result"], ev["by"], ev["problems"]) == want
    assert ev["uuid"] == out.uuid == _info(three, "step-2").uuid


def test_a_damaged_checkpoint_is_marked_and_skipped_only_on_request(three: Path) -> None:
    flip_payload_byte(three / "step-3", "w")
    uuid = ckptguard.Store(three).latest().uuid
    out = validate(three)  # the store: its LATEST
    assert not out.ok and out.name == "step-3" and "chunk hash mismatch" in out.problems[0]
    assert out.marker == str(_marker(three, "step-3"))
    doc = json.loads(_marker(three, "step-3").read_bytes())
    assert set(doc) == {"name", "uuid", "result", "time", "problems"}
    assert (doc["name"], doc["uuid"], doc["result"]) == ("step-3", uuid, "failed")
    assert "tensor=w" in doc["problems"][0]
    (ev,) = events.read(three).of("validation")
    assert (ev["result"], ev["problems"], ev["uuid"]) == ("failed", 1, uuid)
    assert set(failed(three)) == {"step-3"}

    with pytest.raises(ckptguard.CorruptCheckpointError):  # no opt-in: nothing changes
        ckptguard.load(str(three))
    with pytest.warns(ckptguard.CheckpointWarning, match="step-3; loading step-2"):
        assert ckptguard.load(str(three), skip_failed_validation=True)["step"] == 2
    with ckptguard.Checkpointer(str(three)) as ck, pytest.warns(ckptguard.CheckpointWarning):
        assert ck.load(skip_failed_validation=True)["step"] == 2
    with pytest.raises(ckptguard.CorruptCheckpointError):  # a checkpoint named: loaded as asked
        ckptguard.load(str(three / "step-3"), skip_failed_validation=True)


def test_every_checkpoint_failed_is_a_typed_error(three: Path) -> None:
    for i in (1, 2, 3):
        flip_payload_byte(three / f"step-{i}", "w")
        assert not validate(three / f"step-{i}").ok
    with pytest.raises(ckptguard.ValidationFailedError) as err:
        ckptguard.load(str(three), skip_failed_validation=True)
    assert err.value.names == ("step-3", "step-2", "step-1")
    assert isinstance(err.value, ckptguard.CheckpointNotFoundError)


@pytest.mark.backend_independent  # markers only: the loads are of whole checkpoints
def test_markers_follow_the_uuid(three: Path) -> None:
    """A pass clears the marker of its uuid; an overwrite makes a marker stale; a delete
    removes the marker of the deleted checkpoint's uuid, and only that one."""
    failmarks.write(str(three), "step-3", _info(three, "step-3").uuid, ["planted"])
    assert set(failed(three)) == {"step-3"}
    assert validate(three / "step-3").ok  # the bytes are whole: the marker goes
    assert not _marker(three, "step-3").exists()

    failmarks.write(str(three), "step-3", _info(three, "step-3").uuid, ["planted"])
    ckptguard.save({"w": torch.zeros(3)}, str(three / "step-3"), overwrite=True)
    assert _marker(three, "step-3").exists() and failed(three) == {}  # stale: ignored
    assert latest_valid(three).name == "step-3"

    failmarks.write(str(three), "step-2", _info(three, "step-2").uuid, ["x"])
    failmarks.write(str(three), "step-1", "0" * 32, ["x"])
    ckptguard.Store(three).delete("step-2")
    ckptguard.Store(three).delete("step-1")
    assert not _marker(three, "step-2").exists()
    assert _marker(three, "step-1").exists()  # another uuid than the deleted checkpoint's


def _hostile(store: Path, kind: str, uuid: str, outside: Path) -> None:
    d = store / failmarks.DIR
    if kind == "dir-symlink":  # a valid marker, reached through a linked .validation
        outside.mkdir()
        (outside / "step-3.json").write_bytes(_valid_marker(uuid))
        d.symlink_to(outside)
        return
    d.mkdir(exist_ok=True)
    m = d / "step-3.json"
    if kind == "symlink":
        real = outside / "step-3.json"
        outside.mkdir()
        real.write_bytes(_valid_marker(uuid))
        m.symlink_to(real)
    elif kind == "fifo":
        os.mkfifo(m)
    elif kind == "oversized":
        m.write_bytes(_valid_marker(uuid)[:-2] + b" " * failmarks.MAX_MARKER_BYTES + b"}\n")
    elif kind == "wrong-uuid":
        m.write_bytes(_valid_marker("f" * 32))
    elif kind == "other-name":
        m.write_bytes(_valid_marker(uuid).replace(b'"step-3"', b'"step-2"'))
    elif kind == "not-canonical":
        m.write_bytes(json.dumps(json.loads(_valid_marker(uuid)), indent=1).encode() + b"\n")


def _valid_marker(uuid: str) -> bytes:
    doc = {
        "name": "step-3",
        "problems": ["x"],
        "result": "failed",
        "time": "2026-01-01T00:00:00.000000Z",
        "uuid": uuid,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"


@pytest.mark.backend_independent  # the markers' reading; the loads are of whole checkpoints
@pytest.mark.parametrize(
    "kind",
    ["symlink", "fifo", "oversized", "wrong-uuid", "other-name", "not-canonical", "dir-symlink"],
)
def test_hostile_markers_never_redirect_or_hang(three: Path, tmp_path: Path, kind: str) -> None:
    uuid = ckptguard.Store(three).latest().uuid
    _hostile(three, kind, uuid, tmp_path / "outside")
    marks, _ = failmarks.listing(str(three))
    assert "step-3" not in marks or marks["step-3"].uuid != uuid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ckptguard.CheckpointWarning)
        assert failed(three) == {}
        assert ckptguard.load(str(three), skip_failed_validation=True)["step"] == 3


@pytest.mark.backend_independent
def test_the_valid_marker_form_is_read(three: Path) -> None:
    """The hostile cases above fail for their flaw alone: this exact marker counts."""
    uuid = ckptguard.Store(three).latest().uuid
    (three / failmarks.DIR).mkdir()
    _marker(three, "step-3").write_bytes(_valid_marker(uuid))
    assert failed(three)["step-3"].problems == ("x",)


def test_a_damaged_manifest_fails_without_a_marker(three: Path) -> None:
    manifest = three / "step-3" / "MANIFEST.json"
    os.chmod(manifest, 0o644)
    data = bytearray(manifest.read_bytes())
    data[len(data) // 2] ^= 0x20
    manifest.write_bytes(bytes(data))
    out = validate(three / "step-3")
    assert not out.ok and out.error == "CorruptCheckpointError" and out.marker is None
    (ev,) = events.read(three).of("validation")
    assert (ev["checkpoint"], ev["uuid"], ev["result"]) == ("step-3", None, "failed")


TRAINER = """
import sys
import torch
import ckptguard
from ckptguard import hooks
from ckptguard.agent import client
store = sys.argv[1]
hooks.remove_commit_hook(client.notify_agent_of_commit)  # told below, once damaged
info = ckptguard.save({"w": torch.ones(3000)}, store + "/bad", chunk_size=4096)
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from clikit import flip_payload_byte
flip_payload_byte(Path(info.path), "w")  # damaged before the agent hears of it
assert client.notify_committed(info.path, None)
"""


@pytest.mark.rank_job
def test_agent_validates_a_commit_and_exits_88_on_a_failure(tmp_path: Path) -> None:
    """One commit (a whole one validates as ``validate`` does above: one child is enough)."""
    store = tmp_path / "store"
    trainer = tmp_path / "trainer.py"
    trainer.write_text(TRAINER)
    env = {**launcher_free_environ(), "TMPDIR": str(tmp_path)}
    agent = [sys.executable, "-m", "ckptguard.cli", "run", "--validate", "--poll", "0.05"]
    tests = os.path.dirname(__file__)
    proc = run_command([*agent, "--", sys.executable, trainer, store, tests], 120, env=env)
    assert proc.returncode == EXIT_VALIDATION_FAILED, proc.stderr
    assert f"validation of {store / 'bad'} failed" in proc.stderr
    (ev,) = events.read(store).of("validation")
    assert (ev["checkpoint"], ev["result"], ev["by"]) == ("bad", "failed", "agent")
    assert set(failed(store)) == {"bad"}
