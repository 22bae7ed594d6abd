"""The RFC 6962 (RFC 9162 section 2.1) Merkle tree over the audit log's entries.

leaf hash = SHA-256(0x00 || entry bytes); node hash = SHA-256(0x01 || left || right); the root
of the empty tree is SHA-256 of nothing. Inclusion and consistency proofs are generated as RFC
6962 section 2.1.1 and 2.1.2 define them and verified with RFC 9162 section 2.1.3.2 and 2.1.4.2's
algorithms, so that a proof from here checks against any implementation of the RFC.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof that does not verify, or that asks about sizes or indexes out of range."""


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


class Frontier:
    """The right edge of a growing tree: one (height, hash) per perfect subtree, largest first.
    Adding a leaf costs O(log n) and so does the root of the tree so far, so the roots of every
    prefix of a log of n entries cost O(n log n) together."""

    def __init__(self) -> None:
        self.size = 0
        self.nodes: list[tuple[int, bytes]] = []

    def add(self, leaf: bytes) -> None:
        """Append a leaf hash."""
        node = (0, leaf)
        while self.nodes and self.nodes[-1][0] == node[0]:
            h, left = self.nodes.pop()
            node = (h + 1, node_hash(left, node[1]))
        self.nodes.append(node)
        self.size += 1

    def root(self) -> bytes:
        """The tree head hash of the leaves added so far (MTH of RFC 6962)."""
        if not self.nodes:
            return EMPTY_ROOT
        acc = self.nodes[-1][1]
        for _, left in reversed(self.nodes[:-1]):
            acc = node_hash(left, acc)
        return acc


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH of the leaf hashes ``leaves``."""
    f = Frontier()
    for leaf in leaves:
        f.add(leaf)
    return f.root()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(index, leaves): the audit path of leaf ``index`` in the tree of ``leaves``."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ProofError(f"leaf {index} is not in a tree of {n}")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_proof(index, leaves[:k]), root(leaves[k:])]
    return [*inclusion_proof(index - k, leaves[k:]), root(leaves[:k])]


def consistency_proof(old: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(old, leaves): that the tree of the first ``old`` leaves is a prefix of this one."""
    n = len(leaves)
    if not 0 <= old <= n:
        raise ProofError(f"a tree of {old} is not a prefix of a tree of {n}")
    if old in (0, n):
        return []
    return _subproof(old, leaves, True)


def _subproof(m: int, leaves: Sequence[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [root(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], whole), root(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), root(leaves[:k])]


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], head: bytes
) -> None:
    """RFC 9162 2.1.3.2: ProofError unless ``proof`` shows ``leaf`` at ``index`` of the tree of
    ``size`` whose root is ``head``."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("the inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0 or r != head:
        raise ProofError(f"leaf {index} is not in the tree of size {size} with that root")


def verify_consistency(
    old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 2.1.4.2: ProofError unless ``proof`` shows that the tree of ``old`` leaves with
    root ``old_root`` is a prefix of the tree of ``new`` leaves with root ``new_root``."""
    if not 0 <= old <= new:
        raise ProofError(f"a tree of {old} is not a prefix of a tree of {new}")
    if old == new:
        if proof or old_root != new_root:
            raise ProofError(f"two different trees of size {old}")
        return
    if old == 0:
        if proof:
            raise ProofError("a proof from the empty tree must be empty")
        return
    path = list(proof)
    if old & (old - 1) == 0:  # a power of two: the old root is the first node
        path.insert(0, old_root)
    if not path:
        raise ProofError("empty consistency proof")
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0 or fr != old_root or sr != new_root:
        raise ProofError(f"the tree of size {old} is not a prefix of the tree of size {new}")
