"""What cannot be stored without pickle is refused with the key path, and nothing is written."""

from __future__ import annotations

import fractions
import os

import numpy as np
import pytest
import torch

import ckptguard


class Custom:
    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return isinstance(other, Custom) and other.x == self.x


@pytest.mark.parametrize(
    "state,path",
    [
        ({"a": {"b": [1, Custom(1)]}}, "a/b/1"),
        ({"f": fractions.Fraction(1, 3)}, "f"),
        ({"s": {1, 2}}, "s"),
        ({"k": {(1, 2): 3}}, "k"),
        ({"np": np.array(["x"])}, "np"),
        ({"sparse": torch.eye(3).to_sparse()}, "sparse"),
        ({"lam": lambda: 1}, "lam"),
    ],
)
def test_unsupported_objects_name_their_path(tmp_path, state, path):
    with pytest.raises(ckptguard.UnsupportedObjectError) as e:
        ckptguard.save(state, tmp_path / "c")
    assert e.value.key_path.startswith(path)
    assert os.listdir(tmp_path) == []  # nothing written, not even a staging directory


def test_pickle_needs_opt_in_at_save_and_load(tmp_path):
    state = {"obj": Custom(5), "t": torch.ones(2)}
    ckptguard.save(state, tmp_path / "c", allow_pickle=True)
    with pytest.raises(ckptguard.UnsupportedObjectError):
        ckptguard.load(tmp_path / "c")
    out = ckptguard.load(tmp_path / "c", allow_pickle=True)
    assert out["obj"] == Custom(5) and torch.equal(out["t"], state["t"])
    assert ckptguard.verify(tmp_path / "c").ok


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        ckptguard.save({}, tmp_path / "c", compress="zstd")
    with pytest.raises(ckptguard.UnsupportedObjectError):
        ckptguard.save({}, tmp_path / "c", metadata={"x": object()})
    for bad in ["..", ".hidden", "a b", ""]:
        with pytest.raises(ckptguard.InvalidNameError):
            ckptguard.save({}, tmp_path / bad if bad else str(tmp_path) + "/")
    assert os.listdir(tmp_path) == []
