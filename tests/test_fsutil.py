"""fsutil's whole reads of a checkpoint's files: one mapping of what goes wrong to typed errors."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import ckptguard
from ckptguard.coord import LocalCoordinator, current
from ckptguard.errors import CheckpointWarning, warn_after_commit
from ckptguard.fsutil import read_manifest, read_member


def _saved(tmp_path) -> str:
    return ckptguard.save({"w": torch.arange(8.0)}, tmp_path / "s" / "c").path


def test_read_manifest_by_path_and_by_directory_fd(tmp_path):
    path = _saved(tmp_path)
    raw, body = read_manifest(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert read_manifest(path, dir_fd=fd) == (raw, body)
    finally:
        os.close(fd)
    assert body["name"] == "c"


def test_read_member_maps_unsafe_and_damaged_files(tmp_path):
    path = _saved(tmp_path)
    os.rename(os.path.join(path, "MANIFEST.json"), os.path.join(path, "real"))
    os.symlink("real", os.path.join(path, "MANIFEST.json"))
    with pytest.raises(ckptguard.CorruptCheckpointError) as link:
        read_manifest(path)
    assert link.value.file == "MANIFEST.json"
    os.unlink(os.path.join(path, "MANIFEST.json"))
    with pytest.raises(FileNotFoundError):  # missing is the caller's to name
        read_member(path, "MANIFEST.json")
    with open(os.path.join(path, "MANIFEST.json"), "wb") as f:
        f.write(b"{}")
    with pytest.raises(ckptguard.CorruptCheckpointError):
        read_manifest(path)


def test_warn_after_commit_is_a_checkpoint_warning_at_the_callers_line():
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        warn_after_commit("LATEST was not moved")
    assert [type(w.message) for w in got] == [CheckpointWarning]
    assert got[0].filename == __file__


def test_current_rank_and_size():
    assert current() == (0, 1)
    assert current(LocalCoordinator()) == (0, 1)
