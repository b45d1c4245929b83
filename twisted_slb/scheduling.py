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
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple
from urllib.parse import parse_qsl, urlsplit

from zope.interface import Attribute, Interface, implementer

if TYPE_CHECKING:  # pragma: no cover
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
        self._current: Dict[str, float] = {}

    def pick(self, candidates: Sequence[Backend], client_key: str) -> Optional[Backend]:
        current = self._current
        total = 0.0
        best = None
        best_weight = 0.0
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
    Consistent hashing of a client key (weighted rendezvous hashing): the
    client IP, or what the group's C{hash_key} names (see L{hash_key_of}).

    Every balancer process with the same backends sends a key to the same
    backend without sharing state; adding or removing one of N backends
    moves about 1/N of the keys.

    With C{balance_factor} (percent, at least 100), it is consistent hashing
    with bounded loads (Mirrokni, Thorup and Zadimoghaddam; HAProxy's
    C{hash-balance-factor}): a backend already carrying C{balance_factor}%
    of its weighted share of the active load (counting the new one) is
    skipped for the key's next backend in hash order, so no backend takes
    more than that while the others have room.

    @ivar balance_factor: the bound in percent; 0 for none.
    """

    name = "hash"

    def __init__(self, balance_factor: int = 0) -> None:
        self.balance_factor = balance_factor

    def pick(self, candidates: Sequence[Backend], client_key: str) -> Optional[Backend]:
        if not self.balance_factor or len(candidates) == 1:
            return max(candidates, key=lambda b: _hash_score(client_key, b))
        ranked = sorted(candidates, key=lambda b: _hash_score(client_key, b), reverse=True)
        total_share = sum(b.share for b in candidates) or 1.0
        load = (sum(b.active for b in candidates) + 1) * self.balance_factor / 100.0
        for b in ranked:
            if b.active < math.ceil(load * b.share / total_share):
                return b
        return ranked[0]


SCHEDULERS = {
    s.name: s for s in (RoundRobin, SmoothWeightedRoundRobin, WeightedLeastConnections, ConsistentHash)
}


def _target(request) -> Tuple[bytes, bytes, Optional[bytes]]:
    """C{(path, query, authority or None)} of a request's target, origin or absolute form."""
    uri = request.uri
    if not uri.startswith(b"/") and b"://" in uri:
        split = urlsplit(uri)
        return split.path or b"/", split.query, split.netloc or None
    path, _, query = uri.partition(b"?")
    return path, query.partition(b"#")[0], None


def _cookie(request, name: bytes) -> Optional[bytes]:
    for line in request.requestHeaders.getRawHeaders(b"cookie", ()):
        for part in line.split(b";"):
            n, eq, v = part.partition(b"=")
            if eq and n.strip() == name:
                return v.strip()
    return None


def hash_key_of(spec: str, request) -> Optional[str]:
    """
    The key a group with C{hash_key = spec} hashes for an HTTP request, or
    L{None} when the request has none (no such header, cookie or query
    parameter, or an empty one): the group then uses weighted round robin.

    @param spec: C{"path"}, C{"host"}, C{"header:NAME"}, C{"cookie:NAME"}
        or C{"query:NAME"} (C{"source_ip"} is the client's address, which
        the caller has).
    @param request: the L{twisted.web.iweb.IRequest}, or L{None} (TCP).
    """
    if request is None:
        return None
    kind, _, name = spec.partition(":")
    value: Optional[bytes]
    if kind == "header":
        values = request.requestHeaders.getRawHeaders(name.encode("ascii"))
        value = values[0].strip() if values else None
    elif kind == "cookie":
        value = _cookie(request, name.encode("ascii"))
    elif kind == "query":
        query = _target(request)[1]
        wanted = name.encode("utf-8")
        value = next((v for k, v in parse_qsl(query, keep_blank_values=True) if k == wanted), None)
    elif kind == "path":
        value = _target(request)[0]
    elif kind == "host":
        authority = _target(request)[2] or request.getHeader(b"host")
        value = None
        if authority:
            # Without the port or a final dot, lower-cased: one site, one key.
            authority = authority.strip().lower()
            if authority.startswith(b"["):
                value = authority.partition(b"]")[0] + b"]"
            else:
                value = authority.partition(b":")[0].rstrip(b".")
    else:
        raise ValueError(f"unknown hash_key {spec!r}")
    if not value:
        return None
    return value.decode("latin-1")


def scheduler_for(name: str) -> IScheduler:
    """
    A new scheduler for a config name.

    @raise KeyError: the name is not one of L{SCHEDULERS} (the config loader
        rejects such names before this is reached).
    """
    return SCHEDULERS[name]()
