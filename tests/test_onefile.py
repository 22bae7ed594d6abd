"""One-file checkpoints (docs/format.md section 10): ``save(obj, "model.pt")`` makes one file,
atomically, beside which nothing stays; ``load``, ``verify``, ``describe`` and the reader take
it; the independent reader reads it from the spec; hostile containers are typed errors; file
objects save and load; stale temporaries of dead saves are removed, a live save's never."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import independent_reader as ir
import pytest
import torch
import xxhash
from conftest import small_state
from test_special_files import promptly

import ckptguard
from ckptguard import filesave, temps
from ckptguard.coord.base import LocalCoordinator
from ckptguard.format import container
from ckptguard.open import CheckpointReader

DATA = "rank-00000.ckg"


def same(a: Any, b: Any) -> None:
    """Equal nested states: tensors equal in value and dtype, other values equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            same(a[k], b[k])
    else:
        assert a == b


# ---- save and load -------------------------------------------------------------------------------


def test_save_makes_one_file_and_nothing_else(tmp_path: Path) -> None:
    state = small_state(1)
    info = ckptguard.save(state, tmp_path / "model.pt", step=7, metadata={"run": 1})
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]  # no LATEST, no .staging, no temporary
    assert stat.S_ISREG(os.lstat(tmp_path / "model.pt").st_mode)
    assert info.path == str(tmp_path / "model.pt") and info.step == 7 and info.world_size == 1
    same(ckptguard.load(tmp_path / "model.pt"), state)
    assert ckptguard.verify(tmp_path / "model.pt").ok
    desc = ckptguard.describe(tmp_path / "model.pt")
    assert desc.info.metadata == {"run": 1} and {t.key for t in desc.tensors} >= {"model/w"}


def test_independent_reader_reads_it_from_the_spec(tmp_path: Path) -> None:
    """The container is the directory checkpoint's three files, byte for byte."""
    state = small_state(2)
    ckptguard.save(state, tmp_path / "model.pt", compress="lz4")
    ckptguard.save(state, tmp_path / "store" / "d", compress="lz4")
    got = ir.read_checkpoint(str(tmp_path / "model.pt"))
    assert got.manifest["name"] == "model.pt" and got.manifest["world_size"] == 1
    want = ir.read_checkpoint(str(tmp_path / "store" / "d"))
    assert {k: t.data for k, t in got.tensors.items()} == {
        k: t.data for k, t in want.tensors.items()
    }
    raw = (tmp_path / "model.pt").read_bytes()
    fd = os.open(tmp_path / "model.pt", os.O_RDONLY)
    try:
        data, idx, man = ir.read_container(fd, len(raw))
    finally:
        os.close(fd)
    assert data.offset == 0 and idx.offset % 4096 == 0 and man.offset % 4096 == 0
    # the members copied out make a checkpoint directory any reader takes
    out = tmp_path / "out" / "ck"
    out.mkdir(parents=True)
    for m in (data, idx, man):
        (out / m.name).write_bytes(raw[m.offset : m.offset + m.size])
    same(ckptguard.load(out), state)
    ir.read_checkpoint(str(out))


@pytest.mark.parametrize(
    ("name", "one_file", "is_file"),
    [
        ("model.pt", None, True),
        ("m.PTH", None, True),
        ("ck.ckpt", None, True),
        ("w.bin", None, True),
        ("x.pth.tar", None, True),
        ("x.pkl", None, True),
        ("step-10", None, False),
        ("v1.2", None, False),
        ("model.pt", False, False),
        ("plain", True, True),
    ],
)
def test_which_paths_are_one_file(tmp_path: Path, name: str, one_file: Any, is_file: bool) -> None:
    ckptguard.save({"a": torch.ones(3)}, tmp_path / name, one_file=one_file)
    assert os.path.isfile(tmp_path / name) is is_file
    assert ckptguard.load(tmp_path / name)["a"].equal(torch.ones(3))


@pytest.mark.parametrize("name", ["model_step_1000 final.pt", "_tmp.pt", "ü ber.pt", "-x.pt"])
def test_any_file_name_works_and_a_renamed_file_still_loads(tmp_path: Path, name: str) -> None:
    state = small_state(3)
    ckptguard.save(state, tmp_path / name)
    assert ir.is_name(ir.read_checkpoint(str(tmp_path / name)).manifest["name"])
    os.rename(tmp_path / name, tmp_path / "renamed")
    same(ckptguard.load(tmp_path / "renamed"), state)
    assert ckptguard.verify(tmp_path / "renamed").ok


def test_manifest_name() -> None:
    assert filesave.manifest_name("model_step_1000 final.pt") == "model_step_1000_final.pt"
    assert filesave.manifest_name("_tmp.pt") == "tmp.pt"
    assert filesave.manifest_name("...") == "checkpoint"
    assert len(filesave.manifest_name("a" * 300)) == 200


def test_replaces_a_torch_save_file_and_keeps_its_mode(tmp_path: Path) -> None:
    p = tmp_path / "model.pt"
    torch.save({"old": torch.zeros(2)}, p)
    os.chmod(p, 0o600)
    ckptguard.save({"new": torch.ones(2)}, p)  # like torch.save: no overwrite=True needed
    assert list(ckptguard.load(p)) == ["new"]
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    ckptguard.save({"newer": torch.ones(2)}, p)  # and a one-file checkpoint, again
    assert list(ckptguard.load(p)) == ["newer"]
    assert os.listdir(tmp_path) == ["model.pt"]


def test_creates_missing_parent_directories(tmp_path: Path) -> None:
    ckptguard.save({"a": torch.ones(1)}, tmp_path / "a" / "b" / "m.pt")
    assert ckptguard.load(tmp_path / "a" / "b" / "m.pt")["a"].equal(torch.ones(1))


def test_refuses_a_directory_a_link_and_a_fifo_before_writing(tmp_path: Path) -> None:
    (tmp_path / "dir.pt").mkdir()
    (tmp_path / "real.pt").write_bytes(b"keep")
    os.symlink(tmp_path / "real.pt", tmp_path / "link.pt")
    os.mkfifo(tmp_path / "fifo.pt")
    before = sorted(os.listdir(tmp_path))
    for name, words in (
        ("dir.pt", "a directory"),
        ("link.pt", "symbolic link"),
        ("fifo.pt", "FIFO"),
    ):
        with pytest.raises(ckptguard.NotACheckpointError, match=words) as e:
            ckptguard.save({"a": torch.ones(1)}, tmp_path / name)
        assert name in str(e.value)
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "real.pt").read_bytes() == b"keep"


def test_one_process_save_does_not_wait_and_refuses_several_ranks(tmp_path: Path) -> None:
    class TwoRanks(LocalCoordinator):
        size = 2

    with pytest.raises(ckptguard.OneFileError, match="2 ranks") as e:
        ckptguard.save({"a": torch.ones(1)}, tmp_path / "m.pt", coordinator=TwoRanks())
    assert e.value.option == "one_file" and isinstance(e.value, ValueError)
    assert os.listdir(tmp_path) == []
    one = LocalCoordinator()
    ckptguard.save({"a": torch.ones(1)}, tmp_path / "m.pt", coordinator=one)
    ckptguard.save({"a": torch.ones(1)}, tmp_path / "n.pt", coordinator="local")
    with pytest.raises(ValueError, match="unknown coordinator"):
        ckptguard.save({"a": torch.ones(1)}, tmp_path / "o.pt", coordinator="nccl")


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    p = tmp_path / "m.pt"
    ckptguard.save({"a": torch.ones(2)}, p)
    before = p.read_bytes()
    with pytest.raises(ckptguard.UnsupportedObjectError):
        ckptguard.save({"a": object()}, p)
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["m.pt"]


def test_a_reader_keeps_reading_what_it_opened_across_an_overwrite(tmp_path: Path) -> None:
    p = tmp_path / "m.pt"
    ckptguard.save({"a": torch.arange(1000)}, p)
    with CheckpointReader(p) as rd:
        ckptguard.save({"a": torch.arange(1000) * 2}, p)
        fd = rd.open_file(DATA)
        try:
            from ckptguard.read import read_record

            raw = read_record(rd, fd, rd.rows[0])
        finally:
            os.close(fd)
    assert torch.frombuffer(bytearray(raw), dtype=torch.int64).equal(torch.arange(1000))
    assert ckptguard.load(p)["a"].equal(torch.arange(1000) * 2)


# ---- stale temporaries -----------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp(filename: str, pid: int, host: str | None = None) -> str:
    name = temps.temp_name(filename)
    stem, _, rest = name.partition(temps.TEMP_MARK)
    key, h, ns, _, rand = rest.split(".")
    return f"{stem}{temps.TEMP_MARK}{key}.{host or h}.{ns}.{pid}.{rand}"


def test_next_save_removes_dead_temporaries_of_its_target_only(tmp_path: Path) -> None:
    dead, live = _dead_pid(), os.getppid()
    names = {
        "dead": _temp("m.pt", dead),
        "live": _temp("m.pt", live),
        "mine": _temp("m.pt", os.getpid()),
        "other host": _temp("m.pt", dead, host="elsewhere"),
        "other target": _temp("n.pt", dead),
    }
    for n in names.values():
        (tmp_path / n).write_bytes(b"partial")
    ckptguard.save({"a": torch.ones(1)}, tmp_path / "m.pt")
    left = set(os.listdir(tmp_path))
    assert names["dead"] not in left
    assert {names[k] for k in ("live", "mine", "other host", "other target")} <= left


def test_temp_names_fit_and_say_what_they_are() -> None:
    n = temps.temp_name("é" * 200 + ".pt")
    assert n.startswith(".") and temps.TEMP_MARK in n and len(os.fsencode(n)) <= 255


# ---- hostile containers ----------------------------------------------------------------------


@pytest.fixture
def onefile(tmp_path: Path) -> Path:
    p = tmp_path / "m.pt"
    ckptguard.save({"w": torch.randn(300, 50), "i": torch.arange(9)}, p)
    return p


def _parts(p: Path) -> tuple[bytes, list[dict], int]:
    raw = p.read_bytes()
    off, length = struct.unpack_from("<QQ", raw, len(raw) - 56)
    return raw, json.loads(raw[off : off + length])["members"], off


def _rebuild(
    raw: bytes,
    members: list[dict],
    toc_off: int,
    version: int = 1,
    toc: bytes | None = None,
    claim: tuple[int, int] | None = None,
) -> bytes:
    """The container with this TOC, members' bytes where they were, and a trailer (re-signed)
    that points at it, or ``claim``s another (TOC offset, length)."""
    body = json.dumps({"members": members}).encode() if toc is None else toc
    off, length = claim or (toc_off, len(body))
    head = struct.pack("<QQ16sII", off, length, xxhash.xxh3_128(body).digest(), version, 0)
    return (
        raw[:toc_off]
        + body
        + head
        + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
        + b"CKGFILE1"
    )


def _hostile(onefile: Path) -> dict[str, bytes]:
    raw, ms, toc_off = _parts(onefile)
    out = {}

    def edit(i: int, **kw: Any) -> list[dict]:
        return [dict(m, **kw) if j == i else m for j, m in enumerate(ms)]

    out["truncated"] = raw[: len(raw) // 2]
    out["trailer cut"] = raw[:-1]
    out["toc offset beyond the file"] = _rebuild(raw, ms, toc_off, claim=(1 << 40, 10))
    out["toc offset unaligned"] = _rebuild(raw, ms, toc_off, claim=(toc_off + 1, 10))
    out["toc length too long"] = _rebuild(raw, ms, toc_off, claim=(toc_off, 1 << 30))
    out["toc length short"] = _rebuild(raw, ms, toc_off, claim=(toc_off, 5))
    out["index offset overlaps the data"] = _rebuild(raw, edit(1, offset=0), toc_off)
    out["manifest outside the file"] = _rebuild(raw, edit(2, offset=1 << 40), toc_off)
    out["size too large"] = _rebuild(raw, edit(0, size=ms[0]["size"] + 4096), toc_off)
    out["index hash wrong"] = _rebuild(raw, edit(1, xxh3_128="0" * 32), toc_off)
    out["manifest hash wrong"] = _rebuild(raw, edit(2, xxh3_128="f" * 32), toc_off)
    out["data member hashed"] = _rebuild(raw, edit(0, xxh3_128="0" * 32), toc_off)
    out["members swapped"] = _rebuild(raw, [ms[0], ms[2], ms[1]], toc_off)
    out["a fourth member"] = _rebuild(raw, [*ms, ms[2]], toc_off)
    out["toc not json"] = _rebuild(raw, ms, toc_off, toc=b"{not json")
    out["toc with NaN"] = _rebuild(raw, ms, toc_off, toc=b'{"members": NaN}')
    out["data name a path"] = _rebuild(raw, edit(0, name="../rank-00000.ckg"), toc_off)
    bad_pad = bytearray(raw)
    bad_pad[ms[0]["size"]] = 1  # the padding after the data file
    out["non-zero padding"] = bytes(bad_pad)
    flipped = bytearray(raw)
    flipped[-20] ^= 1  # the trailer's own hash field
    out["trailer hash wrong"] = bytes(flipped)
    flipped = bytearray(raw)
    flipped[ms[1]["offset"] + 10] ^= 1
    out["index byte flipped"] = bytes(flipped)
    flipped = bytearray(raw)
    flipped[ms[2]["offset"] + 70] ^= 1
    out["manifest byte flipped"] = bytes(flipped)
    return out


def test_hostile_containers_are_typed_errors_for_both_readers(onefile: Path) -> None:
    for what, data in _hostile(onefile).items():
        p = onefile.with_name("bad.pt")
        p.write_bytes(data)
        with pytest.raises(ckptguard.CorruptCheckpointError) as e:
            ckptguard.load(p)
        assert str(p) in str(e.value), what
        with pytest.raises(ir.SpecViolation):
            ir.read_checkpoint(str(p))
        report_or_error: Any
        try:
            report_or_error = ckptguard.verify(p)
        except ckptguard.CorruptCheckpointError as exc:
            report_or_error = exc
        assert not getattr(report_or_error, "ok", False), what


def test_a_newer_container_version_is_refused_by_name(onefile: Path) -> None:
    raw, ms, toc_off = _parts(onefile)
    onefile.write_bytes(_rebuild(raw, ms, toc_off, version=2))
    with pytest.raises(ckptguard.FormatVersionError, match="container version 2"):
        ckptguard.load(onefile)
    with pytest.raises(ir.VersionViolation):
        ir.read_checkpoint(str(onefile))


def test_a_corrupt_chunk_is_named_on_load_and_verify(onefile: Path) -> None:
    raw, ms, _ = _parts(onefile)
    flipped = bytearray(raw)
    flipped[4096 + 64 + 100] ^= 1  # the first record's payload
    onefile.write_bytes(bytes(flipped))
    with pytest.raises(ckptguard.CorruptCheckpointError, match="chunk") as e:
        ckptguard.load(onefile)
    assert e.value.file == DATA and e.value.key == "w"
    report = ckptguard.verify(onefile)
    assert not report.ok and report.problems[0].key == "w"


def test_not_a_checkpoint_and_special_files(tmp_path: Path) -> None:
    torch.save({"a": 1}, tmp_path / "t.pt")  # another format: loaded as it is, never verified
    assert ckptguard.load(tmp_path / "t.pt") == {"a": 1}
    with pytest.raises(ckptguard.ForeignCheckpointError, match="ckptguard import"):
        ckptguard.verify(tmp_path / "t.pt")
    (tmp_path / "r.pt").write_bytes(b"\x00" + os.urandom(9000))
    with pytest.raises(ckptguard.CheckpointNotFoundError, match="none of the kinds"):
        ckptguard.load(tmp_path / "r.pt")
    ckptguard.save({"a": torch.ones(1)}, tmp_path / "store" / "d")
    with pytest.raises(ckptguard.CheckpointNotFoundError, match="pass the directory"):
        ckptguard.load(tmp_path / "store" / "d" / DATA)
    ckptguard.save({"a": torch.ones(1)}, tmp_path / "real.pt")
    os.symlink(tmp_path / "real.pt", tmp_path / "link.pt")
    with pytest.raises(ckptguard.NotACheckpointError, match="real.pt"):
        ckptguard.load(tmp_path / "link.pt")
    os.mkfifo(tmp_path / "fifo.pt")
    fifo = str(tmp_path / "fifo.pt")
    for call in (ckptguard.load, ckptguard.verify, ckptguard.describe, CheckpointReader):
        _, err = promptly(lambda call=call: call(fifo), [fifo])
        # load and verify first ask whether it is another format's file: that check names it too
        assert isinstance(err, (ckptguard.NotACheckpointError, ckptguard.ForeignFormatError))
        assert "FIFO" in str(err) and fifo in str(err), (call, err)


def test_every_truncation_is_refused(onefile: Path) -> None:
    raw = onefile.read_bytes()
    bad = onefile.with_name("cut.pt")
    for n in sorted({0, 1, 8, 4096, len(raw) // 3, len(raw) - 57, len(raw) - 56, len(raw) - 1}):
        bad.write_bytes(raw[:n])
        with pytest.raises((ckptguard.CorruptCheckpointError, ckptguard.CheckpointNotFoundError)):
            ckptguard.load(bad)


def test_container_layout_is_the_one_layout() -> None:
    toc = container.layout(DATA, 4096 * 3 + 10, b"i" * 5000, b"m" * 10)
    assert [m.offset for m in toc.members] == [0, 4096 * 4, 4096 * 6]
    assert toc.offset == 4096 * 7
    tail = container.tail(DATA, 4096 * 3 + 10, b"i" * 5000, b"m" * 10)
    size = 4096 * 3 + 10 + sum(map(len, tail))
    off, length, digest = container.unpack_trailer(tail[-1], size)
    assert container.parse_toc(tail[-2], digest, off) == toc and length == len(tail[-2])


# ---- file objects ----------------------------------------------------------------------------


def test_bytesio_round_trip() -> None:
    state = small_state(4)
    buf = io.BytesIO()
    info = ckptguard.save(state, buf)
    assert info.path == "<BytesIO>" and buf.tell() == len(buf.getvalue())
    buf.seek(0)
    same(ckptguard.load(buf), state)
    same(ckptguard.load(io.BytesIO(buf.getvalue())), state)


def test_open_files_from_any_position(tmp_path: Path) -> None:
    state = small_state(5)
    with open(tmp_path / "f.bin", "wb") as f:
        f.write(b"prefix!")
        ckptguard.save(state, f)
    with open(tmp_path / "f.bin", "rb") as f:
        assert f.read(7) == b"prefix!"
        same(ckptguard.load(f), state)  # from its position, through a private copy
    with open(tmp_path / "g.pt", "wb") as f:
        ckptguard.save(state, f)
    with open(tmp_path / "g.pt", "rb") as f:
        same(ckptguard.load(f), state)  # at 0: through its own descriptor
        assert f.tell() == os.path.getsize(tmp_path / "g.pt")
    same(ckptguard.load(tmp_path / "g.pt"), state)  # and by its path
    assert ckptguard.verify(tmp_path / "g.pt").ok


def test_wrapped_files_are_read_through_their_wrapper(tmp_path: Path) -> None:
    """A GzipFile's descriptor is the compressed file's: the checkpoint is what it reads."""
    import gzip

    state = small_state(7)
    with gzip.open(tmp_path / "m.pt.gz", "wb") as f:
        ckptguard.save(state, f)
    with gzip.open(tmp_path / "m.pt.gz", "rb") as f:
        same(ckptguard.load(f), state)


def test_pipes_save_and_load() -> None:
    state = small_state(6)
    buf = io.BytesIO()
    ckptguard.save(state, buf)
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, buf.getvalue()), os.close(w)))
    writer.start()
    with os.fdopen(r, "rb") as f:
        same(ckptguard.load(f), state)
    writer.join()
    r, w = os.pipe()
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(os.fdopen(r, "rb").read()))
    reader.start()
    with os.fdopen(w, "wb") as f:
        ckptguard.save(state, f)
    reader.join()
    same(ckptguard.load(io.BytesIO(got[0])), state)


def test_verify_and_describe_take_file_objects_as_load_does(tmp_path: Path) -> None:
    state = small_state(8)
    buf = io.BytesIO()
    ckptguard.save(state, buf)
    raw = buf.getvalue()
    (tmp_path / "m.pt").write_bytes(raw)
    with open(tmp_path / "m.pt", "rb") as f:  # at 0: through its own descriptor
        report = ckptguard.verify(f)
        assert report.ok and report.chunks_checked > 0 and f.tell() == len(raw)
    expect = ckptguard.describe(tmp_path / "m.pt")
    for src in (io.BytesIO(raw), io.BytesIO(b"prefix" + raw)):
        src.seek(len(src.getvalue()) - len(raw))  # from its position, as load reads it
        got = ckptguard.describe(src)
        assert got.tensors == expect.tensors and got.info.uuid == expect.info.uuid
        assert got.info.path == "<BytesIO>" and src.tell() == len(src.getvalue())
    progress: list[tuple[int, int]] = []
    report = ckptguard.verify(io.BytesIO(raw), progress=lambda a, b: progress.append((a, b)))
    assert report.ok and report.path == "<BytesIO>" and progress
    r, w = os.pipe()  # not seekable: read into memory first, as load does
    writer = threading.Thread(target=lambda: (os.write(w, raw), os.close(w)))
    writer.start()
    with os.fdopen(r, "rb") as f:
        assert ckptguard.verify(f).ok
    writer.join()
    flipped = bytearray(raw)
    flipped[4096 + 64 + 100] ^= 1  # the first record's payload
    report = ckptguard.verify(io.BytesIO(bytes(flipped)))
    assert not report.ok and report.problems[0].key == "model/w"
    cut = ckptguard.verify(io.BytesIO(raw[:-1]))  # no trailer: a problem, as for a path
    assert not cut.ok and "trailer" in cut.problems[0].message and cut.path == "<BytesIO>"
    torch_file = io.BytesIO()
    torch.save({"a": 1}, torch_file)
    for call in (ckptguard.load, ckptguard.verify, ckptguard.describe):
        with pytest.raises(ckptguard.CheckpointNotFoundError, match="torch.load"):
            call(io.BytesIO(torch_file.getvalue()))
    with pytest.raises(TypeError):
        ckptguard.describe(io.StringIO("text"))


def test_file_objects_refused_for_what_they_cannot_do(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        ckptguard.load(io.StringIO("text"))
    with pytest.raises(ValueError, match="one_file=False"):
        ckptguard.save({"a": 1}, io.BytesIO(), one_file=False)
    with open(tmp_path / "r.bin", "wb") as f:
        f.write(b"x")
    with open(tmp_path / "r.bin", "rb") as f, pytest.raises(TypeError):
        ckptguard.save({"a": 1}, f)


def test_commit_hooks_hear_of_store_checkpoints_only(tmp_path: Path) -> None:
    """The hooks' listeners (the agent's drain) take a store's directories: a one-file save, to
    a path or a file object, is not announced; a directory save is."""
    from ckptguard.hooks import add_commit_hook, remove_commit_hook

    heard: list[str] = []

    def hook(info: ckptguard.CheckpointInfo) -> None:
        heard.append(info.path)

    add_commit_hook(hook)
    try:
        ckptguard.save({"w": torch.ones(3)}, tmp_path / "m.pt")
        ckptguard.save({"w": torch.ones(3)}, io.BytesIO())
        assert heard == []
        ckptguard.save({"w": torch.ones(3)}, tmp_path / "store" / "d")
        assert heard == [str(tmp_path / "store" / "d")]
    finally:
        remove_commit_hook(hook)
