"""Many writers of one audit log at once: processes (ranks, agents, drain, gc on several nodes
share the store through its file system) and threads of one process. Every entry lands once,
numbered in order, and the log verifies."""

from __future__ import annotations

import collections
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ckptguard import audit, keys

pytestmark = pytest.mark.backend_independent  # the log is written and read without a checkpoint

PROCS, EACH = 8, 50

WRITER = """
import sys
from ckptguard import audit
store, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    audit.append(store, [("gc", {"detail": {"writer": who, "i": i}})], timeout=120)
"""


def test_processes_append_at_once(tmp_path: Path) -> None:
    store = tmp_path / "store"
    priv, pub, _ = keys.generate(tmp_path / "k")
    audit.init(store, priv, witness=str(tmp_path / "w"))
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(store), f"p{p}", str(EACH)])
        for p in range(PROCS)
    ]
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0] * PROCS
    rep = audit.verify(store, key=keys.load_public(pub))
    assert rep.size == 1 + PROCS * EACH
    assert rep.witnesses == [(str(tmp_path / "w"), rep.size)]
    log, _ = audit.read(store)
    seen = collections.defaultdict(list)
    for e in log.entries[1:]:
        seen[e["detail"]["writer"]].append(e["detail"]["i"])
    # each writer's entries all there, once, in the order it appended them
    assert {w: v for w, v in seen.items()} == {f"p{p}": list(range(EACH)) for p in range(PROCS)}
    assert not any(e["op"] == "recover" for e in log.entries)


def test_threads_of_one_process_take_turns(tmp_path: Path) -> None:
    """POSIX record locks belong to the process: its threads must not share one by accident."""
    store = tmp_path / "store"
    audit.init(store)
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            for i in range(20):
                audit.append(store, [("gc", {"detail": {"t": t, "i": i}})])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert audit.verify(store).size == 1 + 4 * 20
