"""One store operation in a process of its own, for tests/test_fault_matrix.py (failpoints).

Usage: store_ops.py OUT gc STORE | delete STORE NAME | drain SRC DST | onefile PATH (saves the
fault matrix's ``small(2)`` there as a one-file checkpoint) | save STORE NAME (``small(2)`` as
NAME, step 2) | save-signed STORE NAME KEY (the same, signed with KEY) | export CKPT DEST (to
safetensors) | keyring-create|keyring-rotate|keyring-shred STORE (the keyring scenario) |
mlflow-backup BACKEND_URI STORE ROOT SCRATCH (an MLflow backup named b2);
writes OUT (JSON): ``ok``,
or the error's ``type`` and message; and the ``CheckpointWarning``s raised. A failpoint set by
the test may kill or hang the process first.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import ckptguard


def small2() -> dict:
    """faultkit.small(2)."""
    import torch

    g = torch.Generator().manual_seed(2)
    return {"w": torch.randn(64, 33, generator=g), "i": torch.arange(100) * 2, "seed": 2}


def run(op: str, args: list[str]) -> dict:
    if op == "gc":
        removed = ckptguard.Store(args[0]).gc(older_than=0)
        return {"removed": [os.path.basename(p) for p in removed]}
    if op == "delete":
        ckptguard.Store(args[0]).delete(args[1])
        return {}
    if op == "prune":  # the newest two of c1..c4 kept: c1, then c2, deleted
        _, failed = ckptguard.Store(args[0]).prune({"keep_last": 2})
        if failed:
            raise failed[0][1]
        return {}
    if op == "drain":
        from ckptguard.drain import drain

        return {"drained": [i.name for i in drain(args[0], args[1], jobs=2)]}
    if op == "onefile":
        ckptguard.save(small2(), args[0])
        return {}
    if op == "save":
        return {"name": ckptguard.save(small2(), os.path.join(args[0], args[1]), step=2).name}
    if op == "save-signed":
        path = os.path.join(args[0], args[1])
        return {"name": ckptguard.save(small2(), path, step=2, sign_key=args[2]).name}
    if op == "export":
        result = ckptguard.export(args[0], to="safetensors", dest=args[1])
        return {"files": [os.path.basename(f) for f in result.files]}
    if op.startswith("keyring-"):
        return keyring_op(op, args)
    if op == "mlflow-backup":  # BACKEND_URI STORE ARTIFACT_ROOT SCRATCH: backup "b2"
        from ckptguard.mlflow.backup import backup
        from ckptguard.mlflow.refs import Roots

        res = backup(args[0], args[1], Roots(None, (args[2],)), name="b2", scratch=args[3])
        return {"name": res.info.name}
    raise SystemExit(f"unknown operation {op}")


K1, K2 = bytes(range(32)), bytes(range(32, 64))  # the keyring scenario's old and new KEK


def keyring_op(op: str, args: list[str]) -> dict:
    """keyring-create STORE (scope "new" under K1), keyring-rotate STORE (K1 to K2),
    keyring-shred STORE (scope "s0")."""
    from ckptguard import keyring

    if op == "keyring-create":
        return {"key_id": keyring.obtain(args[0], "new", keyring.Kek(K1)).key_id}
    if op == "keyring-rotate":
        return {"rotated": keyring.rotate(args[0], keyring.Kek(K1), keyring.Kek(K2))}
    return {"shredded": keyring.shred(args[0], "s0")}


def main() -> int:
    out, op, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    result: dict = {"op": op}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ckptguard.CheckpointWarning)
        try:
            result.update(ok=True, **run(op, args))
        except ckptguard.CheckpointError as e:
            result.update(ok=False, type=type(e).__name__, error=str(e))
    result["warnings"] = [str(w.message) for w in seen if w.category is ckptguard.CheckpointWarning]
    with open(out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out + ".tmp", out)
    return 0 if result["ok"] else 3


if __name__ == "__main__":
    sys.exit(main())
