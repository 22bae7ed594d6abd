"""moto's stand-alone S3 server for the object-store tests: a stand-in for S3 (real HTTP and
the S3 protocol, conditional creates and multipart uploads included), started by the tests as a
process of its own on 127.0.0.1, one per session.

``environ(server)`` is what a client needs to reach it (boto3's standard variables: the
endpoint, fake credentials, a region; no profile or config file of the host). Where moto or
boto3 is missing the tests are skipped with the reason (failed under CI=true, where `make
install-test` installs both)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CI = os.environ.get("CI") == "true"
START_TIMEOUT = 60.0


@dataclass
class MotoServer:
    url: str
    proc: subprocess.Popen
    log: Path


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        reason = f"{module} is not installed (pip install -e '.[test,s3]')"
        if CI:
            pytest.fail(f"the S3 tests cannot run in CI: {reason}", False)
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(log: Path) -> MotoServer:
    """A moto server on a free port, answering; its log in ``log``."""
    _need("moto")
    _need("boto3")
    port = _free_port()
    out = open(log, "wb")  # noqa: SIM115 (the server's log, closed with it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    out.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=5).close()
            return MotoServer(url, proc, log)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(
                    f"moto server did not start:\n{log.read_text()[-3000:]}"
                ) from None
            time.sleep(0.2)


def stop(server: MotoServer) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


def environ(server: MotoServer) -> dict[str, str]:
    """boto3's variables for reaching ``server`` (and nothing of the host's AWS setup)."""
    return {
        "AWS_ENDPOINT_URL": server.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def isolated_environ(server: MotoServer) -> dict[str, str]:
    """``os.environ`` without the host's AWS variables, plus ``environ(server)``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, **environ(server)}


def client(server: MotoServer):  # noqa: ANN201 (a boto3 client)
    import boto3

    env = environ(server)
    return boto3.client(
        "s3",
        endpoint_url=server.url,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def new_bucket(server: MotoServer) -> str:
    """A new empty bucket of a unique name."""
    name = f"ckg-{uuid.uuid4().hex[:16]}"
    client(server).create_bucket(Bucket=name)
    return name


def keys(server: MotoServer, bucket: str) -> dict[str, bytes]:
    """Every object of ``bucket``, by key."""
    c = client(server)
    out = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = start(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        stop(server)


@pytest.fixture
def s3(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[MotoServer, str]]:
    """The server and a new bucket; this process's boto3 variables point at the server."""
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    for k, v in environ(moto_server).items():
        monkeypatch.setenv(k, v)
    yield moto_server, new_bucket(moto_server)
