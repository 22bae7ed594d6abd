"""``ckptguard hold`` / ``release``: a held checkpoint refused by delete, kept by prune, listed
(stale holds too), released."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from test_retention import names, save_steps

from ckptguard import holds
from ckptguard.cli import cli


def test_hold_list_release_from_the_command_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    save_steps(store, 3)
    run = CliRunner().invoke
    r = run(cli, ["hold", str(store), "s0", "--reason", "case 7"])
    assert r.exit_code == 0 and "held s0" in r.output, r.output
    r = run(cli, ["delete", str(store), "s0"])
    assert r.exit_code == 2 and "legal hold" in r.output and "case 7" in r.output, r.output
    r = run(cli, ["prune", str(store), "--keep-last", "1"])
    assert r.exit_code == 0 and "hold" in r.output, r.output
    assert names(store) == ["s0", "s2"]
    holds.write(str(store), "gone", "0" * 32, "")  # a stale hold: its checkpoint is not there
    r = run(cli, ["hold", str(store), "--list", "--json"])
    assert r.exit_code == 0, r.output
    doc = {d["name"]: d for d in json.loads(r.output)}
    assert doc["s0"]["state"] == "held" and doc["s0"]["reason"] == "case 7"
    assert doc["gone"]["state"].startswith("stale")
    r = run(cli, ["hold", str(store), "--list"])
    assert "2 holds" in r.output and "stale" in r.output, r.output
    for name in ("gone", "s0"):
        r = run(cli, ["release", str(store), name])
        assert r.exit_code == 0 and f"released {name}" in r.output, r.output
    r = run(cli, ["release", str(store), "s0"])
    assert r.exit_code == 2 and "not held" in r.output, r.output
    r = run(cli, ["delete", str(store), "s0"])
    assert r.exit_code == 0, r.output
    r = run(cli, ["hold", str(store), "nope"])
    assert r.exit_code == 2 and not (store / ".holds" / "nope.json").exists(), r.output
