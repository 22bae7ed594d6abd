"""The operations loop end to end: a checkpoint corrupted on storage after its commit is caught by
the validation that follows the commit and by the next restore drill, and the metrics, the
Prometheus text and an opted-in resume all show it (docs/operations.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import ckptguard
from ckptguard import events, metrics, validation


def _flip_payload_byte(checkpoint: str) -> None:
    data = Path(checkpoint) / "rank-00000.ckg"
    os.chmod(data, 0o644)
    raw = bytearray(data.read_bytes())
    raw[200] ^= 0xFF  # inside the first record's payload
    data.write_bytes(bytes(raw))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptguard.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_a_corrupted_checkpoint_is_caught_reported_and_skipped(tmp_path: Path) -> None:
    store = tmp_path / "store"
    good = ckptguard.save({"w": torch.arange(4096.0)}, store / "step-1", step=1)
    assert validation.validate(good.path, by="agent").ok
    bad = ckptguard.save({"w": torch.arange(4096.0) * 2}, store / "step-2", step=2)
    _flip_payload_byte(bad.path)  # silent corruption on storage, after the commit

    # The validation that follows each commit (ckptguard run --validate runs this command).
    checked = _cli("validate", bad.path, "--by", "agent")
    assert checked.returncode == 1 and "step-2" in checked.stderr
    assert set(validation.failed(store)) == {"step-2"}
    # The next drill of it fails too.
    drilled = _cli("drill", str(store), "--checkpoint", "step-2")
    assert drilled.returncode == 1 and "step-2" in drilled.stdout + drilled.stderr
    assert _cli("drill", str(store), "--checkpoint", "step-1").returncode == 0

    m = metrics.compute(store)
    assert m["validations"]["failed"] == 1 and m["validations"]["failed_checkpoints"] == ["step-2"]
    assert (m["drills"]["ok"], m["drills"]["failed"]) == (1, 1)
    assert m["seed"]["recovery_integrity_rate"]["value"] == 0.5
    assert m["checkpoints"]["newest_verified"]["name"] == "step-1"
    prom = tmp_path / "ckptguard.prom"
    assert _cli("metrics", str(store), "--textfile", str(prom)).returncode == 0
    samples = {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "store"))): s.value
        for fam in text_string_to_metric_families(prom.read_text())
        for s in fam.samples
    }
    assert samples[("ckptguard_validations", (("result", "failed"),))] == 1
    assert samples[("ckptguard_drills", (("result", "failed"),))] == 1
    assert samples[("ckptguard_recovery_integrity_ratio", ())] == 0.5

    # A resume from LATEST: refused without the opt-in, the older checkpoint with it.
    with pytest.raises(ckptguard.CorruptCheckpointError):
        ckptguard.load(store)
    with pytest.warns(ckptguard.CheckpointWarning, match="step-2"):
        state = ckptguard.load(store, skip_failed_validation=True)
    assert torch.equal(state["w"], torch.arange(4096.0))
    kinds = [e["kind"] for e in events.read(store).records]
    assert kinds.count("validation") == 2 and kinds.count("drill") == 2
