"""One store operation in a process of its own, for tests/test_fault_matrix.py (failpoints).

Usage: store_ops.py OUT gc STORE | delete STORE NAME | drain SRC DST; writes OUT (JSON): ``ok``,
or the error's ``type`` and message. A failpoint set by the test may kill or hang the process first.
"""

from __future__ import annotations

import json
import os
import sys

import ckptguard


def main() -> int:
    out, op, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    result: dict = {"op": op}
    try:
        if op == "gc":
            removed = ckptguard.Store(args[0]).gc(older_than=0)
            result.update(ok=True, removed=[os.path.basename(p) for p in removed])
        elif op == "delete":
            ckptguard.Store(args[0]).delete(args[1])
            result.update(ok=True)
        elif op == "drain":
            from ckptguard.drain import drain

            drained = drain(args[0], args[1], jobs=2)
            result.update(ok=True, drained=[i.name for i in drained])
        else:
            raise SystemExit(f"unknown operation {op}")
    except ckptguard.CheckpointError as e:
        result.update(ok=False, type=type(e).__name__, error=str(e))
    with open(out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out + ".tmp", out)
    return 0 if result["ok"] else 3


if __name__ == "__main__":
    sys.exit(main())
