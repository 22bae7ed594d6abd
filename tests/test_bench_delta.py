"""benchmarks/delta_encoding.py: its deltas invert exactly, and its quick run reports every
method and codec per state part. No test asserts a speed or a ratio."""

from __future__ import annotations

import importlib.util
import json
import pathlib
from types import ModuleType
from typing import Any

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "delta_encoding.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("delta_encoding", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("method", ["xor", "sub"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_delta_inverts_exactly(bench: Any, method: str, dtype: type) -> None:
    rng = np.random.default_rng(0)
    u = bench.UINT[np.dtype(dtype).itemsize]
    edges = np.array([0, 1, np.iinfo(u).max, np.iinfo(u).max // 2, np.iinfo(u).max // 2 + 1], u)
    base = np.concatenate([rng.integers(0, np.iinfo(u).max, 1000, dtype=u), edges]).view(dtype)
    new = np.concatenate([rng.integers(0, np.iinfo(u).max, 1000, dtype=u), edges[::-1]]).view(dtype)
    stored = bench.delta(new, base, method)
    assert np.array_equal(bench.undelta(stored, base, method), new.view(u))
    assert not bench.delta(base, base, method).any()  # an unchanged tensor stores zeros


def test_quick_run_reports_every_part(bench: Any, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "rows.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    parts = {r["part"] for r in rows}
    assert parts == {*bench.PARTS, "all"}
    for r in rows:
        for m in (*bench.METHODS, "base"):
            for c in bench.CODECS:
                assert 0 < r[f"{m}/{c}"]["bytes"] <= r["raw"] * 1.01
        assert r["ratio"] == min(r["xor_ratio"], r["sub_ratio"])
        assert r["pays"] == (r["ratio"] <= 0.8)
