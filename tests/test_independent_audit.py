"""The verifier written from docs/audit.md alone (tests/independent_audit.py) agrees with the
package on logs it writes: whole ones verify with the same root, tampered ones fail."""

from __future__ import annotations

import json
from pathlib import Path

import independent_audit as ind
import pytest
import torch

import ckptguard
from ckptguard import audit, keys

pytestmark = pytest.mark.backend_independent  # the log, not the checkpoints' encoding


@pytest.mark.parametrize("signed", [True, False])
def test_agrees_on_a_real_store(tmp_path: Path, signed: bool) -> None:
    priv = keys.generate(tmp_path / "k")[0] if signed else None
    store = tmp_path / "s"
    ckptguard.save({"w": torch.ones(3)}, store / "before")
    audit.init(store, priv, witness=str(tmp_path / "w"))
    ckptguard.save({"w": torch.ones(3), "n\u00e9": "\u202e"}, store / "a")
    ckptguard.verify(store / "a")
    ckptguard.Store(store).delete("a")
    for i in range(5):
        audit.append(store, [("gc", {"detail": {"i": i, "s": "\x00\n\u2028"}})])
    rep = audit.verify(store)
    raw = keys.load_private(priv).public.raw if priv else None
    log_id = audit.read(store)[0].config.log_id
    wit = json.loads((tmp_path / "w" / audit.witness_name(log_id)).read_bytes())
    assert ind.verify(str(store), raw, (wit,)) == (rep.size, rep.root)
    # tampered: an entry edited
    log = store / ".audit" / "log.jsonl"
    ls = log.read_bytes().splitlines(keepends=True)
    assert b'"op":"commit"' in ls[1]
    log.write_bytes(b"".join(ls[:1] + [ls[1].replace(b'"op":"commit"', b'"op":"delete"')] + ls[2:]))
    with pytest.raises(ind.Invalid):
        ind.verify(str(store), raw)
    # rolled back: entries and heads cut consistently, caught by the witness's head only
    heads = store / ".audit" / "heads.jsonl"
    hs = heads.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(ls[:-1]))
    heads.write_bytes(b"".join(hs[:-1]))
    assert ind.verify(str(store), raw)[0] == rep.size - 1
    with pytest.raises(ind.Invalid, match="rolled back"):
        ind.verify(str(store), raw, (wit,))
