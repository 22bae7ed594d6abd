"""The object-store tier: drains into an S3 bucket and loads, verifies and listings straight from
it (ckptguard.objstore, ckptguard.drain.s3; docs/operations.md, "Drain to object storage (S3)").

Every test runs against moto's stand-alone S3 server (tests/s3kit.py), a stand-in for S3 started
by the tests: real HTTP and the S3 protocol, conditional creates and multipart uploads included.
A drain killed at each of its steps is also a scenario of the fault matrix (tests/fault_cases.txt,
scenario s3), whose checker runs here for each point with a SIGKILL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import faultkit
import pytest
import torch
from clikit import run
from s3kit import MotoServer, client, isolated_environ, keys

import ckptguard
from ckptguard import objstore
from ckptguard.drain import DrainConflictError, drain
from ckptguard.errors import InvalidNameError
from ckptguard.keys import generate
from ckptguard.objstore import source as objsource

STORE_OPS = Path(__file__).parent / "dist" / "store_ops.py"
PART = 5 << 20  # S3's smallest part: the large tensor below takes three


def state(seed: int, big: int = 0) -> dict[str, Any]:
    """Several tensors of several dtypes and plain values; ``big`` float32 elements more."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {
        "model": {"w": torch.randn(64, 33, generator=g), "b": torch.zeros(7, dtype=torch.float16)},
        "ids": torch.arange(1000, dtype=torch.int64) * seed,
        "mask": torch.rand(33, generator=g) > 0.5,
        "seed": seed,
        "lr": 0.25,
    }
    if big:
        out["big"] = torch.randn(big, generator=g)
    return out


def same(a: Any, b: Any) -> bool:
    """Bitwise equal nested values (tensors by dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bytes(a.contiguous().view(torch.uint8).flatten().numpy())
            == bytes(b.contiguous().view(torch.uint8).flatten().numpy())
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@pytest.fixture
def parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTGUARD_S3_PART_BYTES", str(PART))


def _src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    ckptguard.save(state(1), src / "a", step=1)
    ckptguard.save(state(2, big=3_000_000), src / "b", step=2)  # 12 MB: a multipart upload
    return src


# ---- addresses ---------------------------------------------------------------------------------


@pytest.mark.backend_independent
@pytest.mark.parametrize(
    ("text", "bucket", "prefix"),
    [
        ("s3://my-bucket", "my-bucket", ""),
        ("s3://my-bucket/", "my-bucket", ""),
        ("s3://my.bucket.1/runs/exp-1", "my.bucket.1", "runs/exp-1"),
        ("s3://abc/a/b/step-10/", "abc", "a/b/step-10"),
    ],
)
def test_urls_parse(text: str, bucket: str, prefix: str) -> None:
    url = objstore.parse(text)
    assert (url.bucket, url.prefix) == (bucket, prefix)
    assert objstore.parse(str(url)) == url


@pytest.mark.backend_independent
@pytest.mark.parametrize(
    "text",
    [
        "s3://",
        "s3://ab",
        "s3://Upper",
        "s3://-bucket",
        "s3://a..b",
        "s3://192.168.1.1",
        "s3://bucket//x",
        "s3://bucket/x//y",
        "s3://bucket/../x",
        "s3://bucket/x/..",
        "s3://bucket/./x",
        "s3://bucket/.hidden",
        "s3://bucket/x?y",
        "s3://bucket/x y",
        "s3://bucket/" + "x" * 600,
        "/local/path",
    ],
)
def test_bad_urls_are_refused(text: str) -> None:
    with pytest.raises(InvalidNameError):
        objstore.parse(text)


@pytest.mark.backend_independent
def test_a_checkpoint_name_must_be_a_name() -> None:
    with pytest.raises(InvalidNameError):
        objstore.parse("s3://bucket/p").child("..")


# ---- drain and load back -----------------------------------------------------------------------


def test_drain_and_load_back_bitwise(
    s3: tuple[MotoServer, str], tmp_path: Path, parts: None
) -> None:
    server, bucket = s3
    src = _src(tmp_path)
    url = f"s3://{bucket}/runs/x"
    done = drain(src, url, jobs=3)
    assert [i.name for i in done] == ["a", "b"]
    assert [i.path for i in done] == [f"{url}/a", f"{url}/b"]
    for name in ("a", "b"):
        assert same(ckptguard.load(f"{url}/{name}"), ckptguard.load(src / name))
    assert same(ckptguard.load(url), ckptguard.load(src / "b"))  # the store: its LATEST
    report, local = ckptguard.verify(f"{url}/b"), ckptguard.verify(src / "b")
    assert report.ok and report.chunks_checked == local.chunks_checked > 1
    assert report.bytes_checked == local.bytes_checked
    assert ckptguard.describe(f"{url}/b").info.uuid == ckptguard.describe(src / "b").info.uuid
    # The layout: LATEST; each manifest (the source's bytes) beside its uuid's objects.
    got = keys(server, bucket)
    want = {"runs/x/LATEST": b"b\n"}
    for name in ("a", "b"):
        info = ckptguard.Store(src).path(name)
        uuid = ckptguard.describe(info).info.uuid
        want[f"runs/x/{name}/MANIFEST.json"] = (src / name / "MANIFEST.json").read_bytes()
        for f in os.listdir(info):
            if f != "MANIFEST.json":
                want[f"runs/x/{name}/{uuid}/{f}"] = (src / name / f).read_bytes()
    assert got == want
    # b's data file went up in parts: its ETag is that of a multipart upload of three.
    b_uuid = ckptguard.describe(src / "b").info.uuid
    head = client(server).head_object(Bucket=bucket, Key=f"runs/x/b/{b_uuid}/rank-00000.ckg")
    assert head["ETag"].strip('"').endswith("-3")


def test_drain_again_skips_and_latest_moves_forward_only(
    s3: tuple[MotoServer, str], tmp_path: Path
) -> None:
    _, bucket = s3
    src = tmp_path / "src"
    ckptguard.save(state(1), src / "a")
    ckptguard.save(state(2), src / "b")
    url = f"s3://{bucket}"  # a store at the bucket's root
    assert [i.name for i in drain(src, url, names=["b"])] == ["b"]
    assert [i.name for i in drain(src, url, names=["a"])] == ["a"]  # older: LATEST stays
    assert objstore.latest_name(objstore.Bucket(bucket), objstore.parse(url)) == "b"
    assert drain(src, url) == []  # both there already
    scan = objstore.scan(objstore.Bucket(bucket), objstore.parse(url))
    assert [i.name for i in scan.listed] == ["a", "b"] and scan.skipped == []


def test_an_incremental_checkpoint_loads_from_the_bucket(
    s3: tuple[MotoServer, str], tmp_path: Path
) -> None:
    """Its linked data file (the base's records) goes up as an object of its own."""
    _, bucket = s3
    src = tmp_path / "src"
    one = state(1, big=300_000)
    ckptguard.save(one, src / "a")
    two = {**one, "seed": 2, "ids": one["ids"] + 1}
    ckptguard.save(two, src / "b", base="a")
    assert ckptguard.describe(src / "b").info.base == "a"
    url = f"s3://{bucket}/inc"
    drain(src, url, names=["b"])  # without its base in the bucket
    assert same(ckptguard.load(f"{url}/b"), two)
    assert ckptguard.verify(f"{url}/b").ok


def test_a_name_held_with_another_uuid_is_a_conflict(
    s3: tuple[MotoServer, str], tmp_path: Path
) -> None:
    server, bucket = s3
    url = f"s3://{bucket}/p"
    ckptguard.save(state(1), tmp_path / "one" / "a")
    ckptguard.save(state(2), tmp_path / "two" / "a")
    drain(tmp_path / "one", url)
    before = keys(server, bucket)
    with pytest.raises(DrainConflictError, match="never replaced"):
        drain(tmp_path / "two", url)
    assert keys(server, bucket) == before  # nothing uploaded
    with pytest.raises(ckptguard.StoreError, match="overwrite is not supported"):
        drain(tmp_path / "two", url, overwrite=True)
    assert same(ckptguard.load(f"{url}/a"), state(1))


def test_conditional_create_refuses_a_second_object(s3: tuple[MotoServer, str]) -> None:
    _, bucket = s3
    b = objstore.Bucket(bucket)
    assert b.put("k/MANIFEST.json", b"one", if_absent=True)
    assert not b.put("k/MANIFEST.json", b"two", if_absent=True)
    assert b.get("k/MANIFEST.json", 100) == b"one"


def _drain_process(src: Path, url: str, server: MotoServer, tmp: Path, **env: str) -> dict:
    out = tmp / f"result-{src.name}.json"
    proc = subprocess.Popen(
        [sys.executable, str(STORE_OPS), str(out), "drain", str(src), url],
        env={**isolated_environ(server), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return {"proc": proc, "out": out}


def test_two_drains_of_one_name_exactly_one_wins(
    s3: tuple[MotoServer, str], tmp_path: Path
) -> None:
    """Both pass their check that the name is free (each then sleeps after its verify, before
    creating the manifest): the conditional create lets exactly one commit."""
    server, bucket = s3
    url = f"s3://{bucket}/p"
    for side in ("one", "two"):
        ckptguard.save(state(1 if side == "one" else 2), tmp_path / side / "a")
    slow = {"CKPTGUARD_FAILPOINT": "s3.verified:0:sleep3"}
    runs = [_drain_process(tmp_path / s, url, server, tmp_path, **slow) for s in ("one", "two")]
    codes = [r["proc"].wait(timeout=120) for r in runs]
    results = [json.loads(r["out"].read_text()) for r in runs]
    assert sorted(codes) == [0, 3], (codes, results)
    lost = results[codes.index(3)]
    assert lost["type"] == "DrainConflictError", lost
    winner = ("one", "two")[codes.index(0)]
    got = ckptguard.load(f"{url}/a")
    assert same(got, state(1 if winner == "one" else 2))
    assert ckptguard.verify(f"{url}/a").ok
    # the loser's objects are orphans: invisible, and gc removes them
    b = objstore.Bucket(bucket)
    assert [i.name for i in objstore.scan(b, objstore.parse(url)).listed] == ["a"]
    removed = objstore.gc(url, older_than=0)
    assert removed and all("/a/" in r for r in removed)
    assert same(ckptguard.load(f"{url}/a"), got)


# ---- killed drains -----------------------------------------------------------------------------

KILLS = [c for c in faultkit.cases(full=True) if c.scenario == "s3" and c.action == "kill"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> faultkit.Bases:
    return faultkit.make_bases(tmp_path_factory.mktemp("bases"))


@pytest.mark.backend_independent
@pytest.mark.parametrize("case", KILLS, ids=[c.id for c in KILLS])
def test_a_killed_drain_leaves_no_partial_checkpoint(
    bases: faultkit.Bases, tmp_path: Path, case: faultkit.Case
) -> None:
    """SIGKILLed at each step: b is absent (uploads without a manifest are invisible; a and
    LATEST still load) before the manifest's create, visible or latest after; the re-run
    completes it, gc leaves only committed objects (faultkit._s3 checks it all)."""
    outcome, _ = faultkit.run_case(case, bases, tmp_path, {})
    assert outcome == case.expect


def test_orphans_are_invisible_until_gc(s3: tuple[MotoServer, str], tmp_path: Path) -> None:
    server, bucket = s3
    url = f"s3://{bucket}/p"
    ckptguard.save(state(1), tmp_path / "src" / "a")
    drain(tmp_path / "src", url)
    b = objstore.Bucket(bucket)
    orphan = "p/b/" + "0" * 32 + "/rank-00000.ckg"
    b.put(orphan, b"half a drain")
    b.put("p/a/" + "1" * 32 + "/index.parquet", b"a lost race")
    b.put("p/notes.txt", b"not ours")
    assert [i.name for i in objstore.scan(b, objstore.parse(url)).listed] == ["a"]
    with pytest.raises(ckptguard.CheckpointNotFoundError):
        ckptguard.load(f"{url}/b")
    assert objstore.gc(url) == []  # younger than the default hour
    removed = objstore.gc(url, older_than=0)
    assert sorted(removed) == sorted(
        [f"s3://{bucket}/{orphan}", f"s3://{bucket}/p/a/{'1' * 32}/index.parquet"]
    )
    left = keys(server, bucket)
    assert "p/notes.txt" in left and not any(k.startswith("p/b/") for k in left)
    assert same(ckptguard.load(url), state(1))


# ---- hostile bucket contents -------------------------------------------------------------------


def _drained(tmp_path: Path, bucket: str) -> tuple[str, str]:
    """A store "p" holding "a" in the bucket; (its URL, a's uuid)."""
    ckptguard.save(state(1), tmp_path / "src" / "a")
    url = f"s3://{bucket}/p"
    drain(tmp_path / "src", url)
    return url, ckptguard.describe(tmp_path / "src" / "a").info.uuid


def test_a_manifest_over_the_cap_is_refused_unread(
    s3: tuple[MotoServer, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, bucket = s3
    url, _ = _drained(tmp_path, bucket)
    monkeypatch.setattr(objsource, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(ckptguard.CorruptCheckpointError, match="larger than the 256 MiB"):
        ckptguard.load(f"{url}/a")


def test_an_object_shorter_than_the_manifest_says(
    s3: tuple[MotoServer, str], tmp_path: Path
) -> None:
    _, bucket = s3
    url, uuid = _drained(tmp_path, bucket)
    b = objstore.Bucket(bucket)
    key = f"p/a/{uuid}/rank-00000.ckg"
    data = b.get(key, 1 << 30)
    assert data is not None
    b.put(key, data[:-100])
    with pytest.raises(ckptguard.CorruptCheckpointError, match="bytes in a checkpoint in an"):
        ckptguard.load(f"{url}/a")
    report = ckptguard.verify(f"{url}/a")
    assert not report.ok and report.problems[0].file == "rank-00000.ckg"
    assert run("verify", f"{url}/a").exit_code == 1


def test_a_changed_byte_is_found(s3: tuple[MotoServer, str], tmp_path: Path) -> None:
    _, bucket = s3
    url, uuid = _drained(tmp_path, bucket)
    b = objstore.Bucket(bucket)
    key = f"p/a/{uuid}/rank-00000.ckg"
    data = bytearray(b.get(key, 1 << 30) or b"")
    data[4096 + 64] ^= 1  # the first record's payload
    b.put(key, bytes(data))
    with pytest.raises(ckptguard.CorruptCheckpointError, match="hash mismatch"):
        ckptguard.load(f"{url}/a")
    assert not ckptguard.verify(f"{url}/a").ok


@pytest.mark.parametrize(
    ("what", "match"),
    [("index", "index.parquet has"), ("missing", "missing from the bucket")],
)
def test_damaged_objects_are_typed_errors(
    s3: tuple[MotoServer, str], tmp_path: Path, what: str, match: str
) -> None:
    _, bucket = s3
    url, uuid = _drained(tmp_path, bucket)
    b = objstore.Bucket(bucket)
    if what == "index":
        b.put(f"p/a/{uuid}/index.parquet", b"x" * 100_000)
    else:
        b.delete([f"p/a/{uuid}/rank-00000.ckg"])
    with pytest.raises(ckptguard.CorruptCheckpointError, match=match):
        ckptguard.load(f"{url}/a")


@pytest.mark.parametrize("latest", [b"../a\n", b"a", b"x" * 300, b"gone\n"])
def test_a_damaged_latest_is_a_typed_error(
    s3: tuple[MotoServer, str], tmp_path: Path, latest: bytes
) -> None:
    _, bucket = s3
    url, _ = _drained(tmp_path, bucket)
    objstore.Bucket(bucket).put("p/LATEST", latest)
    with pytest.raises(ckptguard.CorruptCheckpointError, match="LATEST"):
        ckptguard.load(url)
    assert same(ckptguard.load(f"{url}/a"), state(1))  # by name it still loads
    result = run("verify", url)
    assert result.exit_code == 1 and "LATEST" in result.output
    ckptguard.save(state(2), tmp_path / "src" / "b")
    with pytest.raises(ckptguard.CorruptCheckpointError, match="LATEST"):
        drain(tmp_path / "src", url)  # said before anything is uploaded


def test_missing_things_are_not_found(s3: tuple[MotoServer, str]) -> None:
    _, bucket = s3
    with pytest.raises(ckptguard.CheckpointNotFoundError):
        ckptguard.load(f"s3://{bucket}/nothing")
    with pytest.raises(ckptguard.StoreError, match="NoSuchBucket"):
        ckptguard.load("s3://no-such-bucket-here/x")


def test_encrypted_and_signing_drains_are_refused(
    s3: tuple[MotoServer, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, bucket = s3
    monkeypatch.setenv("CKPTGUARD_KEK", "5e" * 32)
    ckptguard.save(state(1), tmp_path / "src" / "a", encrypt="run-1")
    with pytest.raises(ckptguard.StoreError, match="encrypted"):
        drain(tmp_path / "src", f"s3://{bucket}/p")
    with pytest.raises(ckptguard.StoreError, match="sign_key is not supported"):
        drain(tmp_path / "src", f"s3://{bucket}/p", sign_key=str(tmp_path / "k.key"))
    assert keys(*s3) == {}


def test_a_signed_checkpoint_keeps_its_signature(
    s3: tuple[MotoServer, str], tmp_path: Path
) -> None:
    _, bucket = s3
    priv, pub, _ = generate(tmp_path / "k")
    ckptguard.save(state(1), tmp_path / "src" / "a", sign_key=priv)
    ckptguard.save(state(2), tmp_path / "src" / "u")
    url = f"s3://{bucket}/p"
    drain(tmp_path / "src", url)
    assert same(ckptguard.load(f"{url}/a", trusted_keys=pub), state(1))
    assert ckptguard.verify(f"{url}/a", trusted_keys=pub).signed_by is not None
    with pytest.raises(ckptguard.SignatureError, match="not signed"):
        ckptguard.load(f"{url}/u", trusted_keys=pub)


def test_the_agents_drainer_drains_into_a_bucket(
    s3: tuple[MotoServer, str], tmp_path: Path
) -> None:
    """``ckptguard run --drain-to s3://...``: rank 0's background drainer."""
    from ckptguard.agent.drainer import Drainer

    _, bucket = s3
    ckptguard.save(state(1), tmp_path / "src" / "a")
    url = f"s3://{bucket}/job"
    d = Drainer(url, 2)
    d.due(str(tmp_path / "src" / "a"))
    d.close(120)
    assert d.drained == [str(tmp_path / "src" / "a")] and d.failed == []
    assert same(ckptguard.load(url), state(1))


# ---- the command line --------------------------------------------------------------------------


def test_cli_drain_ls_verify_gc(s3: tuple[MotoServer, str], tmp_path: Path) -> None:
    _, bucket = s3
    src = tmp_path / "src"
    ckptguard.save(state(1), src / "a", step=1)
    ckptguard.save(state(2), src / "b", step=2)
    url = f"s3://{bucket}/runs"
    result = run("drain", src, url, "--latest")
    assert result.exit_code == 0, result.output
    assert f"drained b -> {url}/b" in result.output
    result = run("drain", src, url)
    assert result.exit_code == 0 and "drained a" in result.output, result.output
    result = run("ls", url)
    assert result.exit_code == 0, result.output
    lines = [x for x in result.output.splitlines() if x.startswith(("│ a", "│ b", "a ", "b "))]
    assert len(lines) == 2 and "LATEST" in lines[1] and "LATEST" not in lines[0], result.output
    result = run("verify", url)
    assert result.exit_code == 0 and "2 of 2 checkpoints ok" in result.output, result.output
    result = run("verify", f"{url}/a")
    assert result.exit_code == 0 and f"ok   {url}/a" in result.output, result.output
    result = run("gc", url, "--older-than", "0")
    assert result.exit_code == 0 and "nothing to remove" in result.output, result.output
    result = run("drain", src, url, "--overwrite")
    assert result.exit_code != 0 and "overwrite is not supported" in result.output
