"""fsutil's whole reads of a checkpoint's files (one mapping of what goes wrong to typed errors)
and NewFiles, files that appear together and whole."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import pytest
import torch

import ckptguard
from ckptguard.coord import LocalCoordinator, current
from ckptguard.errors import CheckpointWarning, warn_after_commit
from ckptguard.fsutil import NewFiles, read_manifest, read_member
from ckptguard.temps import TEMP_MARK


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


def _write(files: NewFiles, name: str, data: bytes) -> None:
    with open(files.new(name), "wb") as f:
        f.write(data)


def test_new_files_appear_only_when_committed(tmp_path: Path) -> None:
    files = NewFiles(str(tmp_path))
    _write(files, "a", b"1")
    _write(files, "b", b"2")
    assert all(n.startswith(".") and TEMP_MARK in n for n in os.listdir(tmp_path))
    assert files.commit() == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert sorted(os.listdir(tmp_path)) == ["a", "b"] and (tmp_path / "b").read_bytes() == b"2"
    _write(files, "c", b"3")
    files.discard()
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


@pytest.mark.parametrize("links", [True, False])
def test_new_files_never_replace_unless_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, links: bool
) -> None:
    if not links:  # a file system without hard links: a rename after a check

        def no_link(*a: object) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    (tmp_path / "b").write_bytes(b"old")
    files = NewFiles(str(tmp_path))
    _write(files, "a", b"1")
    _write(files, "b", b"2")
    with pytest.raises(FileExistsError):
        files.commit()
    files.discard()
    assert os.listdir(tmp_path) == ["b"] and (tmp_path / "b").read_bytes() == b"old"
    files = NewFiles(str(tmp_path), replace=True)
    _write(files, "b", b"2")
    files.commit()
    assert os.listdir(tmp_path) == ["b"] and (tmp_path / "b").read_bytes() == b"2"
