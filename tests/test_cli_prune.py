"""``ckptguard prune STORE``: the plan, the store's policy file, rules on the command line."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from test_retention import names, save_steps

import ckptguard
from ckptguard.cli import cli
from ckptguard.retention import POLICY_FILE


def test_prune_a_store_from_the_command_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    save_steps(store, 8)
    run = CliRunner().invoke
    r = run(cli, ["prune", str(store), "--dry-run", "--keep-last", "2", "--keep-tag", "release"])
    assert r.exit_code == 0, r.output
    assert (
        "would remove" in r.output
        and "5 kept" not in r.output
        and "3 kept, 5 to remove" in r.output
    )
    assert len(names(store)) == 8  # a dry run removes nothing
    r = run(cli, ["prune", str(store)])
    assert r.exit_code != 0 and "no retention rule" in r.output  # no rule anywhere: refused
    (store / POLICY_FILE).write_text(json.dumps({"keep_last": 2, "keep_tags": ["release"]}))
    r = run(cli, ["prune", str(store), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["policy"] == {"keep_last": 2, "keep_tags": ["release"]}
    assert sorted(names(store)) == ["s1", "s6", "s7"]
    assert ckptguard.Store(store).latest_name() == "s7"
    assert ckptguard.load(store / "s1")["w"][0].item() == 1.0
