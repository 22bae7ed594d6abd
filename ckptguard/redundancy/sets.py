"""Which node protects which: partner rings and XOR sets over a job's nodes.

A node is a host name; a failure domain is what fails with a node (a switch, a rack, a power
feed), given per host by the user or Slurm's topology. Every function here is a pure function of
the job's host list, so every rank computes the same sets without a collective.

- ``partner_ring``: the nodes in a ring in which, where the domains allow it, neighbours lie in
  different domains. Each node's files are copied to the next node of the ring.
- ``xor_sets``: the nodes split into sets of about ``k``, each set's members taken from as many
  domains as there are; a set keeps one parity segment per member and survives the loss of any
  one member.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from ..errors import RedundancyError

# SCR's default XOR set size: 1/7 of the data as parity, one loss in eight nodes survived.
DEFAULT_SET_SIZE = 8


def nodes_of(hosts: Sequence[str]) -> list[str]:
    """The distinct hosts of ``hosts`` (one per rank), in order of their lowest rank."""
    for r, h in enumerate(hosts):
        if not isinstance(h, str) or not h or h != h.strip() or "\0" in h:
            raise RedundancyError(f"rank {r}'s host name {h!r} is not a plain, non-empty name")
    return list(dict.fromkeys(hosts))


def _domains(nodes: Sequence[str], domains: Mapping[str, str] | None) -> dict[str, str]:
    """Each node's failure domain; a node not named is a domain of its own."""
    given = dict(domains or {})
    unknown = sorted(set(given) - set(nodes))
    if unknown:
        raise RedundancyError(
            f"failure domains name hosts that run no rank of this job: {', '.join(unknown[:5])}"
        )
    out = {}
    for n in nodes:
        d = given.get(n, f"host:{n}")
        if not isinstance(d, str) or not d:
            raise RedundancyError(f"the failure domain of host {n!r} is {d!r}, not a name")
        out[n] = d
    return out


def _by_domain(nodes: Sequence[str], domains: Mapping[str, str] | None) -> list[list[str]]:
    """The nodes grouped by domain, largest domain first (ties by the first node's order),
    nodes within a domain in job order."""
    dom = _domains(nodes, domains)
    groups: dict[str, list[str]] = {}
    for n in nodes:
        groups.setdefault(dom[n], []).append(n)
    first = {d: nodes.index(g[0]) for d, g in groups.items()}
    return sorted(groups.values(), key=lambda g: (-len(g), first[dom[g[0]]]))


class Ring(NamedTuple):
    """Nodes in ring order: ``order[i]``'s files are copied to ``order[i + 1]`` (cyclically).

    ``shared`` lists the (node, partner) pairs in one failure domain: empty unless one domain
    holds more than half of the nodes, when no ring can avoid them."""

    order: list[str]
    shared: list[tuple[str, str]]

    def partner(self, node: str) -> str:
        """The node that keeps a copy of ``node``'s files."""
        i = self.order.index(node)
        return self.order[(i + 1) % len(self.order)]

    def ward(self, node: str) -> str:
        """The node whose files ``node`` keeps a copy of."""
        i = self.order.index(node)
        return self.order[i - 1]


def partner_ring(hosts: Sequence[str], domains: Mapping[str, str] | None = None) -> Ring:
    """The partner ring of the job whose rank ``r`` runs on ``hosts[r]``.

    The nodes, grouped by domain (largest first), fill the ring's even places and then its odd
    ones, so no two neighbours share a domain unless one domain holds more than half the nodes.
    RedundancyError for fewer than two nodes: a copy on the same node dies with it."""
    nodes = nodes_of(hosts)
    if len(nodes) < 2:
        raise RedundancyError(
            f"partner copies need at least 2 nodes; this job runs on {len(nodes)} "
            f"({', '.join(nodes)}): use a shared store, or drain to one"
        )
    flat = [n for g in _by_domain(nodes, domains) for n in g]
    places = list(range(0, len(flat), 2)) + list(range(1, len(flat), 2))
    order = [""] * len(flat)
    for node, place in zip(flat, places, strict=True):
        order[place] = node
    dom = _domains(nodes, domains)
    pairs = [(order[i], order[(i + 1) % len(order)]) for i in range(len(order))]
    return Ring(order, [(a, b) for a, b in pairs if dom[a] == dom[b]])


def xor_sets(
    hosts: Sequence[str], domains: Mapping[str, str] | None = None, k: int = DEFAULT_SET_SIZE
) -> list[list[str]]:
    """The XOR sets of the job whose rank ``r`` runs on ``hosts[r]``, each a list of nodes.

    ``n // k`` sets (at least one) whose sizes differ by at most one; the nodes, grouped by
    domain, are dealt to the sets in turn, so the nodes of one domain go to different sets
    while there are sets enough. A set's members are in the order of their lowest rank.
    RedundancyError for fewer than two nodes or ``k`` below 2."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise RedundancyError(f"an XOR set needs at least 2 nodes; set size {k!r} given")
    nodes = nodes_of(hosts)
    if len(nodes) < 2:
        raise RedundancyError(
            f"XOR parity needs at least 2 nodes; this job runs on {len(nodes)} "
            f"({', '.join(nodes)}): use a shared store, or drain to one"
        )
    count = max(1, len(nodes) // k)
    sets: list[list[str]] = [[] for _ in range(count)]
    flat = [n for g in _by_domain(nodes, domains) for n in g]
    for i, n in enumerate(flat):
        sets[i % count].append(n)
    return [sorted(s, key=nodes.index) for s in sets]
