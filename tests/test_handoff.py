"""The trainer's side of the snapshot handoff (ckptguard.handoff) against a scripted agent, and
the save options as they travel to the agent (``SaveOptions`` to JSON and back)."""

from __future__ import annotations

import datetime as dt
import os
import socket
import tempfile
import threading
from collections.abc import Iterator

import pytest
import torch

from ckptguard.agent.protocol import LineReader, decode, encode
from ckptguard.errors import AgentError, CheckpointExistsError
from ckptguard.format.manifest import CheckpointInfo
from ckptguard.handoff import Handoff
from ckptguard.options import SaveOptions
from ckptguard.pool import HostPool, Preparation
from ckptguard.report import info_to_json
from ckptguard.tree import Flat, flatten

INFO = CheckpointInfo(
    "a", "/s/a", "0" * 32, 4, dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), 1, 1, 1, 8, 8, 1
)


class Agent:
    """A scripted agent: welcomes, maps pools, accepts saves and answers each with ``reply``."""

    def __init__(self, address: str, reply: dict) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(address)
        self.server.listen(1)
        self.reply = reply
        self.saves: list[dict] = []
        self.pools: dict[int, int] = {}
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        conn, _ = self.server.accept()
        reader = LineReader()
        with conn:
            while True:
                data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 4)
                if not data:
                    return
                for fd in fds:
                    self.pools[len(self.pools) + 1] = os.fstat(fd).st_size
                    os.close(fd)
                for line in reader.feed(data):
                    self.handle(conn, decode(line))

    def handle(self, conn: socket.socket, msg: dict) -> None:
        if msg["op"] == "hello":
            conn.sendall(encode("welcome", handoff=True, rank=0))
        elif msg["op"] == "pool":
            conn.sendall(encode("pool", id=msg["pool"]))
        elif msg["op"] == "save":
            self.saves.append(msg)
            conn.sendall(encode("accepted", id=msg["id"]))
            conn.sendall(encode("saved", id=msg["id"], **self.reply))


@pytest.fixture
def address() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as d:
        yield os.path.join(d, "agent.sock")


def hand_over(address: str, reply: dict, options: dict) -> tuple[Agent, Handoff, int]:
    agent = Agent(address, reply)
    h = Handoff(address)
    buf, pool = h.allocate(64, pin=False)
    buf[:8].view(torch.float32).copy_(torch.tensor([1.0, 2.0]))
    tree, refs, used_pickle = flatten({"x": buf[:8].view(torch.float32)})
    ident = h.submit(buf, pool, Flat(tree, refs, used_pickle), "/s/a", options)
    return agent, h, ident


def test_submit_and_result(address: str) -> None:
    options = SaveOptions(step=4, compress="none").to_json()
    agent, h, ident = hand_over(address, {"ok": True, "info": info_to_json(INFO)}, options)
    try:
        assert h.result(ident) == INFO
        (msg,) = agent.saves
        assert agent.pools == {1: 64}
        assert msg["path"] == "/s/a" and SaveOptions.from_kwargs(msg["options"]).step == 4
        (t,) = msg["tensors"]
        assert (t["key"], t["offset"], t["nbytes"], t["shape"]) == ("x", 0, 8, [2])
    finally:
        h.close()


def test_the_agents_error_is_raised_as_its_type(address: str) -> None:
    reply = {"ok": False, "type": "CheckpointExistsError", "error": "a exists"}
    _, h, ident = hand_over(address, reply, {})
    try:
        with pytest.raises(CheckpointExistsError, match="a exists"):
            h.result(ident)
    finally:
        h.close()


def test_not_in_the_pool_is_refused(address: str) -> None:
    Agent(address, {})
    h = Handoff(address)
    try:
        buf, pool = h.allocate(64, pin=False)
        tree, refs, used_pickle = flatten({"x": torch.ones(2)})  # not in the shared pool
        with pytest.raises(AgentError, match="not in the shared pool"):
            h.submit(buf, pool, Flat(tree, refs, used_pickle), "/s/a", {})
    finally:
        h.close()


def test_pool_prepared_through_the_agent(address: str) -> None:
    """A preparation allocates the shared regions, and passes them to the agent, before any save."""
    agent = Agent(address, {})
    h = Handoff(address)
    try:
        pool = HostPool(None, 2, False, allocator=h.allocate)
        Preparation(pool, 100).wait(30)
        assert pool.allocations == 2 and [r.capacity for r in pool.regions] == [128, 128]
        assert sorted(r.tag for r in pool.regions) == [1, 2]  # the agent's ids of the pools
        assert agent.pools == {1: 128, 2: 128}
    finally:
        h.close()


def test_save_options_travel_as_json() -> None:
    opt = SaveOptions(compress="lz4", metadata={"a": [1]}, step=3, chunk_size=1024, timeout=5)
    assert SaveOptions.from_kwargs(opt.to_json()) == opt
    assert set(opt.to_json()) == set(SaveOptions.names())
    with pytest.raises(TypeError, match="'compresss'"):
        SaveOptions.from_kwargs({"compresss": "none"})


def test_save_signature_lists_the_options() -> None:
    import inspect

    import ckptguard

    params = inspect.signature(ckptguard.save).parameters
    assert [p for p in params if p in SaveOptions.names()] == list(SaveOptions.names())
    assert params["compress"].default == "auto" and "coordinator" in params


def test_one_file_saves_are_not_handed_over(
    address: str, tmp_path: os.PathLike, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-file checkpoint is one process's: saved by the trainer itself, from the shared
    pool, while a directory checkpoint goes to the agent."""
    import ckptguard
    from ckptguard.agent.protocol import ENV_ADDRESS

    agent = Agent(address, {"ok": True, "info": info_to_json(INFO)})
    monkeypatch.setenv(ENV_ADDRESS, address)
    with ckptguard.Checkpointer(tmp_path, handoff=True) as c:
        info = c.save_async({"x": torch.arange(5.0)}, "m.pt").result()
        assert info.path == os.path.join(tmp_path, "m.pt") and agent.saves == []
        assert torch.equal(ckptguard.load(info.path)["x"], torch.arange(5.0))
        assert c.save_async({"x": torch.ones(2)}, "d").result() == INFO
        assert [m["path"] for m in agent.saves] == [os.path.join(tmp_path, "d")]
    assert os.listdir(tmp_path) == ["m.pt"]
