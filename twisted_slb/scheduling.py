"""
Schedulers: how a client that is not pinned gets a backend.

A scheduler is given the backends that take new clients (up, weight above
zero) and the client's key (its IP address), and picks one.  Schedulers keep
their own small state (a position, current weights); they never see backends
that are down or drained, so they never need to know about health.
"""

from __future__ import annotations

import hashlib
import math
from typing import Dict, Optional, Sequence

from zope.interface import Attribute, Interface, implementer

from twisted_slb.backends import Backend


class IScheduler(Interface):
    """Picks a backend for a new client."""

    name = Attribute("The config name: C{'rr'}, C{'wrr'}, C{'wlc'} or C{'hash'}.")

    def pick(candidates: Sequence[Backend], client_key: str) -> Optional[Backend]:
        """
        Choose one of C{candidates} (never empty; all take new clients).

        @param client_key: the client's identity, its IP address.
        """


@implementer(IScheduler)
class RoundRobin:
    """Each backend in turn, ignoring weights."""

    name = "rr"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Backend], client_key: str) -> Optional[Backend]:
        i = self._next % len(candidates)
        self._next = i + 1
        return candidates[i]


@implementer(IScheduler)
class SmoothWeightedRoundRobin:
    """
    Smooth weighted round robin (as nginx does it): over a cycle of
    C{sum(weights)} picks, each backend is picked exactly C{weight} times,
    and the picks of a heavy backend are spread out rather than bunched.
    """

    name = "wrr"

    def __init__(self) -> None:
        self._current: Dict[str, int] = {}

    def pick(self, candidates: Sequence[Backend], client_key: str) -> Optional[Backend]:
        current = self._current
        total = 0
        best = None
        best_weight = 0
        for b in candidates:
            w = current.get(b.name, 0) + b.share
            current[b.name] = w
            total += b.share
            if best is None or w > best_weight:
                best, best_weight = b, w
        assert best is not None
        current[best.name] = best_weight - total
        if len(current) > 2 * len(candidates) + 8:
            # Forget backends that left the group long ago.
            names = {b.name for b in candidates}
            for name in [n for n in current if n not in names]:
                del current[name]
        return best


@implementer(IScheduler)
class WeightedLeastConnections:
    """
    The backend with the fewest active connections per unit of weight; ties
    go round robin so that an idle group still spreads its clients.
    """

    name = "wlc"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Backend], client_key: str) -> Optional[Backend]:
        n = len(candidates)
        start = self._next % n
        self._next = start + 1
        best = None
        best_load = math.inf
        for i in range(n):
            b = candidates[(start + i) % n]
            load = b.active / b.share
            if load < best_load:
                best, best_load = b, load
        return best


def _hash_score(client_key: str, backend: Backend) -> float:
    """
    Weighted rendezvous (highest random weight) score of a backend for a
    client: C{-weight / ln(u)} with C{u} uniform in (0, 1) from a hash of
    both, so that each backend wins its weight's share of clients and adding
    or removing one backend moves only the clients it wins or loses.
    """
    digest = hashlib.blake2b(
        client_key.encode("utf-8") + b"\0" + backend.id.encode("ascii"), digest_size=8
    ).digest()
    u = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)
    return -backend.share / math.log(u)


@implementer(IScheduler)
class ConsistentHash:
    """
    Consistent hashing of the client IP (weighted rendezvous hashing).

    Every balancer process with the same backends sends a client to the same
    backend without sharing state; adding or removing one of N backends
    moves about 1/N of the clients.
    """

    name = "hash"

    def pick(self, candidates: Sequence[Backend], client_key: str) -> Optional[Backend]:
        return max(candidates, key=lambda b: _hash_score(client_key, b))


SCHEDULERS = {
    s.name: s for s in (RoundRobin, SmoothWeightedRoundRobin, WeightedLeastConnections, ConsistentHash)
}


def scheduler_for(name: str) -> IScheduler:
    """
    A new scheduler for a config name.

    @raise KeyError: the name is not one of L{SCHEDULERS} (the config loader
        rejects such names before this is reached).
    """
    return SCHEDULERS[name]()
