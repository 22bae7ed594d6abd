"""The manifest's tensor entries are checked member by member, whatever path the check takes:
every entry that is not exactly the seven members of their types, with a shape of ints >= 0,
is refused naming the entry."""

from __future__ import annotations

import pytest

from ckptguard.format.datafile import FormatError
from ckptguard.format.entries import _plain_tensors
from ckptguard.format.entries import validate_tensors as _validate_tensors

pytestmark = pytest.mark.backend_independent


def _entry(**changes: object) -> dict:
    e = {
        "key": "w",
        "dtype": "float32",
        "shape": [2, 3],
        "kind": "torch",
        "device": "cpu",
        "requires_grad": False,
        "parameter": False,
    }
    e.update(changes)
    return {k: v for k, v in e.items() if v is not ...}


@pytest.mark.parametrize(
    "bad",
    [
        _entry(shape=[True, 3]),
        _entry(shape=[-1]),
        _entry(shape=[1.0]),
        _entry(shape=["1"]),
        _entry(shape=[2, None]),
        _entry(shape=(2, 3)),
        _entry(key=1),
        _entry(requires_grad=0),
        _entry(parameter=None),
        _entry(device=...),
        _entry(extra=1),
        _entry(dtype="float31"),
        _entry(kind="jax"),
        _entry(shape=[1 << 62, 1]),
        _entry(shape=[1 << 40, 1 << 40]),
        _entry(shape=[0, 1 << 62]),  # empty, but its strides would not fit in int64
        _entry(shape=[1 << 40, 0, 1 << 40]),
        _entry(shape=[1] * 65),
        _entry(per_rank=True),
        ["w", "float32"],
    ],
)
def test_bad_tensor_entries_are_refused(bad: object) -> None:
    assert not _plain_tensors([_entry(key="ok"), bad])  # the column checks leave it to the loop
    with pytest.raises(FormatError, match=r"tensors\[1\]|tensor 'w'"):
        _validate_tensors([_entry(key="ok"), bad], 1, False)


def test_good_entries_pass_and_keys_are_unique() -> None:
    class Dim(int):
        pass

    _validate_tensors(
        [_entry(), _entry(key="v", shape=[]), _entry(key="u", shape=[Dim(2)])], 1, False
    )
    with pytest.raises(FormatError, match="appears twice"):
        _validate_tensors([_entry(), _entry()], 1, False)


def test_the_column_checks_pass_what_the_loop_passes() -> None:
    good = [
        _entry(key=f"t{i}", shape=s, dtype=d)
        for i, (s, d) in enumerate(
            [([], "bool"), ([0, 1 << 29, 1 << 29], "int32"), ([1 << 61], "int16")]
        )
    ]
    assert _plain_tensors(good) and _plain_tensors([])
    _validate_tensors(good, 1, False)
    assert not _plain_tensors([*good, _entry(key="t0")])  # a key twice
