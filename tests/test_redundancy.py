"""Node-local redundancy: partner rings and XOR sets over failure domains, the XOR code of a set
and its rebuild of any one lost member, and a node's files read and written back as a payload."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_command
from mpikit import need_mpi

from ckptguard.errors import RebuildError, RedundancyError
from ckptguard.redundancy import parity
from ckptguard.redundancy.payload import Payload, Rebuilt
from ckptguard.redundancy.sets import nodes_of, partner_ring, xor_sets

pytestmark = pytest.mark.backend_independent  # bytes moved as they are: nothing is encoded

# ---- sets --------------------------------------------------------------------------------


def test_nodes_in_order_of_their_lowest_rank():
    assert nodes_of(["b", "b", "a", "c", "a"]) == ["b", "a", "c"]


@pytest.mark.parametrize("bad", ["", " a", "a\0b", None, 3])
def test_a_host_name_that_is_not_plain_is_refused(bad):
    with pytest.raises(RedundancyError, match="rank 1's host name"):
        nodes_of(["a", bad])


def _domain_counts() -> list[tuple[int, ...]]:
    out = []
    for n in range(2, 9):
        for parts in itertools.combinations_with_replacement(range(1, n + 1), 3):
            counts = tuple(p for p in parts if p)
            if sum(counts) == n:
                out.append(counts)
        out.append((1,) * n)
    return sorted(set(out))


@pytest.mark.parametrize("counts", _domain_counts())
def test_a_partner_ring_keeps_partners_apart_when_the_domains_allow(counts):
    hosts = [f"n{i}" for i in range(sum(counts))]
    random.Random(sum(counts) * 31 + len(counts)).shuffle(hosts)
    domains, it = {}, iter(hosts)
    for d, c in enumerate(counts):
        for _ in range(c):
            domains[next(it)] = f"rack{d}"
    ring = partner_ring(hosts, domains)
    assert sorted(ring.order) == sorted(hosts)
    # every node has one partner and is the ward of one: the copies form a single cycle
    assert sorted(ring.partner(h) for h in hosts) == sorted(hosts)
    assert all(ring.ward(ring.partner(h)) == h and ring.partner(h) != h for h in hosts)
    same = [(h, ring.partner(h)) for h in ring.order if domains[h] == domains[ring.partner(h)]]
    assert same == ring.shared
    if max(counts) <= len(hosts) // 2:
        assert same == []
    else:  # one domain holds more than half: the fewest shared pairs a ring can have
        assert len(same) == 2 * max(counts) - len(hosts)
    assert partner_ring(hosts, domains) == ring  # every rank computes the same ring


def test_a_partner_ring_needs_two_nodes():
    with pytest.raises(RedundancyError, match="at least 2 nodes; this job runs on 1"):
        partner_ring(["a", "a", "a"])


def test_domains_of_hosts_outside_the_job_are_refused():
    with pytest.raises(RedundancyError, match="run no rank of this job: zz"):
        partner_ring(["a", "b"], {"a": "r1", "zz": "r2"})


@pytest.mark.parametrize("n,k", [(2, 8), (7, 8), (8, 8), (9, 4), (16, 8), (17, 8), (5, 2)])
def test_xor_sets_are_even_and_spread_across_domains(n, k):
    hosts = [f"n{i}" for i in range(n)]
    domains = {h: f"rack{i % 3}" for i, h in enumerate(hosts)}
    sets = xor_sets(hosts, domains, k)
    assert sorted(h for s in sets for h in s) == sorted(hosts)
    assert len(sets) == max(1, n // k)
    sizes = [len(s) for s in sets]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 2
    for s in sets:  # at most ceil(|s| / 3) members of one rack in a set, since there are 3
        per = [sum(domains[h] == f"rack{d}" for h in s) for d in range(3)]
        assert max(per) <= -(-len(s) // 3) + (1 if n // k > 1 else 0)
        assert s == sorted(s, key=hosts.index)


@pytest.mark.parametrize("k", [1, 0, -3, True, 2.5])
def test_xor_set_size_below_two_is_refused(k):
    with pytest.raises(RedundancyError, match="set needs at least 2 nodes"):
        xor_sets(["a", "b", "c"], None, k)


# ---- the XOR code ------------------------------------------------------------------------


def _encode_all(lay, payloads, block):
    """Every member's parity, reduced in one process as the MPI reduce-scatter would."""
    out = [bytearray() for _ in payloads]
    for offset, size in parity.blocks(lay, block):
        total = np.zeros((lay.n, size), dtype=np.uint8)
        for i, p in enumerate(payloads):
            total ^= parity.encode_block(lay, i, _reader(p), offset, size)
        for j in range(lay.n):
            out[j] += total[j].tobytes()
    return [bytes(b) for b in out]


def _rebuild(lay, lost, payloads, parities, block):
    got = bytearray(lay.lengths[lost])
    for offset, size in parity.blocks(lay, block):
        total = np.zeros((lay.n - 1, size), dtype=np.uint8)
        for i in range(lay.n):
            if i != lost:
                total ^= parity.rebuild_block(
                    lay, lost, i, _reader(payloads[i]), _reader(parities[i]), offset, size
                )
        for s in range(lay.n - 1):
            pos, n = parity.placed(lay, lost, s, offset, size)
            got[pos : pos + n] = total[s, :n].tobytes()
    return bytes(got)


def _reader(data: bytes):
    def read(pos, size):
        out = np.zeros(size, dtype=np.uint8)
        part = data[pos : pos + size]
        out[: len(part)] = np.frombuffer(part, dtype=np.uint8)
        return out

    return read


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("block", [1, 7, 64, 1 << 20])
def test_any_one_lost_member_is_rebuilt_bitwise(n, block):
    rng = random.Random(n * 1000 + block)
    lengths = [rng.choice([0, 1, 33, 100, 257, 1000]) for _ in range(n)]
    payloads = [rng.randbytes(x) for x in lengths]
    lay = parity.layout(lengths)
    parities = _encode_all(lay, payloads, block)
    assert all(len(p) == lay.segment for p in parities)
    assert lay.segment == -(-max(lengths) // (n - 1))
    for lost in range(n):
        assert _rebuild(lay, lost, payloads, parities, block) == payloads[lost]


def test_each_segment_lies_in_one_parity_never_its_own():
    for n in range(2, 10):
        for i in range(n):
            covered = sorted(parity.covered_segment(j, i, n) for j in range(n) if j != i)
            assert covered == list(range(n - 1))
            for s in range(n - 1):
                j = parity.parity_holder(i, s, n)
                assert j != i and parity.covered_segment(j, i, n) == s


def test_a_damaged_parity_rebuilds_different_bytes():
    payloads = [b"a" * 100, b"b" * 90, b"c" * 80]
    lay = parity.layout([len(p) for p in payloads])
    parities = _encode_all(lay, payloads, 16)
    bad = bytearray(parities[1])
    bad[3] ^= 1
    parities[1] = bytes(bad)
    # the segments that member 1's parity covers come back wrong: the checkpoint's own chunk
    # hashes are what a rebuild checks its result against
    assert _rebuild(lay, 0, payloads, parities, 16) != payloads[0]


def test_two_losses_are_not_one_rebuild():
    payloads = [b"x" * 10, b"y" * 10, b"z" * 10]
    lay = parity.layout([10, 10, 10])
    parities = _encode_all(lay, payloads, 4)
    lost_too = [payloads[0], b"\0" * 10, payloads[2]]  # member 1 is gone as well
    assert _rebuild(lay, 0, lost_too, parities, 4) != payloads[0]


@pytest.mark.parametrize("lengths", [[5], [], [1, -1], [1, 2.0], [True, 3]])
def test_a_layout_of_bad_lengths_is_refused(lengths):
    with pytest.raises(RedundancyError):
        parity.layout(lengths)


def test_the_lost_member_contributes_nothing():
    lay = parity.layout([4, 4])
    with pytest.raises(RebuildError, match="member 1 is the one lost"):
        parity.rebuild_block(lay, 1, 1, _reader(b""), _reader(b""), 0, 4)


# ---- payloads ----------------------------------------------------------------------------


def test_a_payload_reads_its_files_as_one_string_padded_with_zeros(tmp_path):
    files = {"rank-0.ckg": b"abc", "empty": b"", "rank-1.ckg": b"defgh"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with Payload(str(tmp_path), [(n, len(d)) for n, d in files.items()]) as p:
        assert p.length == 8
        whole = b"abcdefgh"
        for pos in range(0, 10):
            for size in range(0, 12):
                want = whole[pos : pos + size].ljust(size, b"\0")
                assert p.read(pos, size).tobytes() == want, (pos, size)


def test_a_payload_refuses_links_fifos_and_wrong_sizes(tmp_path):
    (tmp_path / "real").write_bytes(b"x" * 10)
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(RebuildError, match="symbolic link"):
        Payload(str(tmp_path), [("link", 10)])
    with pytest.raises(RebuildError, match="not a regular file"):
        Payload(str(tmp_path), [("fifo", 0)])
    with pytest.raises(RebuildError, match="11 were expected"):
        Payload(str(tmp_path), [("real", 11)])
    for name in ["../real", "a/b", "", ".."]:
        with pytest.raises(RedundancyError, match="not a plain, distinct file name"):
            Payload(str(tmp_path), [(name, 10)])


def test_rebuilt_files_appear_whole_or_not_at_all(tmp_path):
    files = [("a", 3), ("b", 0), ("c", 5)]
    out = Rebuilt(str(tmp_path), files)
    out.write(0, np.frombuffer(b"abcd", dtype=np.uint8))
    assert sorted(os.listdir(tmp_path)) != ["a", "b", "c"]  # nothing named yet
    out.write(4, np.frombuffer(b"efgh", dtype=np.uint8))
    with pytest.raises(RebuildError, match="outside the payload"):
        out.write(6, np.zeros(3, dtype=np.uint8))
    out.commit()
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c"]
    assert (tmp_path / "a").read_bytes() == b"abc" and (tmp_path / "c").read_bytes() == b"defgh"
    again = Rebuilt(str(tmp_path), [("a", 3)])
    with pytest.raises(RebuildError, match="already exists"):
        again.commit()
    assert (tmp_path / "a").read_bytes() == b"abc"
    dropped = Rebuilt(str(tmp_path), [("d", 2)])
    dropped.discard()
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c"]


# ---- over MPI: one rank per simulated node -----------------------------------------------

SCENARIO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist", "redundancy.py")


def _mpirun(n: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [need_mpi(), "-n", str(n), sys.executable, SCENARIO, *args]
    return run_command(cmd, 120)


@pytest.mark.parametrize("scheme", ["xor", "partner"])
@pytest.mark.parametrize("n,lost", [(2, 0), (4, 2), (5, 4)])
def test_a_lost_node_is_rebuilt_on_a_new_one_over_mpi(tmp_path, scheme, n, lost):
    """Each node protects its files; one node's disk is lost; a node of another name with an
    empty disk takes its place and gets the same bytes back from the others."""
    base = str(tmp_path / "nodes")
    assert _mpirun(n, "protect", scheme, base, "65536").returncode == 0
    keep = "parity.bin" if scheme == "xor" else "ward"
    assert all(os.path.exists(os.path.join(base, f"h{r}", keep)) for r in range(n))
    shutil.rmtree(os.path.join(base, f"h{lost}"))
    res = _mpirun(n, "rebuild", scheme, base, "65536", str(lost), "replacement")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"rebuilt replacement as member {lost}" in res.stdout
