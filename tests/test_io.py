"""ckptguard.io: the full-write and exact-read loops, and record I/O on the pure-Python path.

Native and Python record files are compared byte for byte in tests/test_native.py; here the
loops' handling of short writes and reads, and read_records's refusal of items no record matches.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from ckptguard import backend, encode, io
from ckptguard.format.layout import ALIGN


class _ShortOs:
    """``os`` as io sees it, but every positioned or vector write takes at most 3 bytes."""

    def __getattr__(self, name: str):
        return getattr(os, name)

    @staticmethod
    def pwritev(fd: int, views, offset: int) -> int:
        return os.pwrite(fd, bytes(views[0][:3]), offset)

    @staticmethod
    def writev(fd: int, views) -> int:
        return os.write(fd, bytes(views[0][:3]))


def test_write_loops_finish_after_short_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "os", _ShortOs())
    path = str(tmp_path / "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert io.write_all(fd, b"hello ", memoryview(b"world"), b"") == 11
        assert io.pwrite_all(fd, [b"ab", bytearray(b"cdefg")], 20) == 7
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == b"hello world" + bytes(9) + b"abcdefg"


def test_pwrite_all_names_the_path_on_error(tmp_path):
    fd = os.open(str(tmp_path / "r"), os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as e:
            io.pwrite_all(fd, [b"x"], 0, "the-file")
        assert e.value.errno == errno.EBADF and e.value.filename == "the-file"
        with pytest.raises(OSError) as e:
            io.pwrite_all(fd, [b"x"], 0)
        assert e.value.filename is None
    finally:
        os.close(fd)


def test_pread_exact_reads_all_or_stops_at_end(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    fd = os.open(str(path), os.O_RDONLY)
    try:
        assert io.pread_exact(fd, 4, 3) == b"3456"
        assert io.pread_exact(fd, 100, 8) == b"89"
        assert io.pread_exact(fd, 5, 10) == b""
    finally:
        os.close(fd)


def _written(tmp_path, data: bytes, elem: int = 4, chunk: int = 4096, seq0: int = 0):
    path = str(tmp_path / "records")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    res = io.write_records(fd, path, ALIGN, seq0, data, elem, chunk, backend="python")
    return fd, path, res


def _items(res: io.WriteResult, elem: int, chunk: int, seq0: int = 0) -> list[encode.ReadItem]:
    out = []
    for n, r in enumerate(res.records):
        nxt = res.records[n + 1].offset if n + 1 < len(res.records) else res.end
        out.append(
            encode.ReadItem(
                r.offset,
                nxt - r.offset,
                r.codec,
                elem,
                r.raw_len,
                r.stored_len,
                r.hash,
                n * chunk,
                seq0 + n,
            )
        )
    return out


def test_write_records_then_read_records_python(tmp_path):
    data = np.repeat(np.arange(3000, dtype=np.float32), 4).tobytes()
    fd, path, res = _written(tmp_path, data, seq0=7)
    try:
        assert not res.direct and res.end % ALIGN == 0
        assert os.lseek(fd, 0, os.SEEK_CUR) == res.end
        assert [r.offset % ALIGN for r in res.records] == [0] * len(res.records)
        dest = bytearray(len(data))
        io.read_records(fd, path, dest, _items(res, 4, 4096, 7), threads=2, backend="python")
        assert bytes(dest) == data
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "change",
    [
        {"offset": 100},  # not aligned
        {"extent": 10},  # shorter than a record header
        {"extent": io.MAX_EXTENT + ALIGN},
        {"stored_len": 1 << 30},  # longer than the extent
        {"codec": 256},
        {"seq": io.MAX_SEQ + 1},
        {"dest_offset": 1 << 40},  # outside the destination
    ],
)
def test_read_records_refuses_items_no_record_matches(tmp_path, change):
    data = bytes(range(256)) * 64
    fd, path, res = _written(tmp_path, data, elem=1)
    try:
        items = _items(res, 1, 4096)
        items[1] = items[1]._replace(**change)
        with pytest.raises(encode.ChunkError) as e:
            io.read_records(fd, path, bytearray(len(data)), items, backend="python")
        assert e.value.index == 1
    finally:
        os.close(fd)


def test_write_records_refuses_bad_positions(tmp_path):
    fd = os.open(str(tmp_path / "f"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(ValueError, match="multiple of 4096"):
            io.write_records(fd, "f", 100, 0, b"x" * 64, 1, 64, backend="python")
        with pytest.raises(ValueError, match="32 bits"):
            io.write_records(fd, "f", 0, io.MAX_SEQ, b"x" * 128, 1, 64, backend="python")
        assert os.fstat(fd).st_size == 0  # refused before writing
    finally:
        os.close(fd)


def test_fadvise_sequential_spans_the_items(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(io.os, "posix_fadvise", lambda *a: calls.append(a), raising=False)
    items = [
        encode.ReadItem(8192, 4096, 0, 1, 1, 1, bytes(16), 0),
        encode.ReadItem(4096, 4096, 0, 1, 1, 1, bytes(16), 0),
    ]
    io.fadvise_sequential(3, items)
    io.fadvise_sequential(3, [])
    assert calls == [(3, 4096, 8192, os.POSIX_FADV_SEQUENTIAL)]


@pytest.mark.parametrize("be", ["native", "python"])
def test_wait_written_takes_the_file_to_the_disk(tmp_path, be: str):
    if be == "native" and not backend.available():
        pytest.skip(backend.reason())
    path = str(tmp_path / "w")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        io.write_all(fd, bytes(1 << 20))
        assert io.wait_written(fd, path, be) >= 0  # nothing of it is dirty afterwards
    finally:
        os.close(fd)
    if be == "native":  # a writeback error (here: no such descriptor) names the file
        with pytest.raises(OSError) as e:
            io.wait_written(-1, path, be)
        assert e.value.errno == errno.EBADF and e.value.filename == path
