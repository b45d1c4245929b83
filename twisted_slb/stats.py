"""
Counters of every listener, read by the admin listener.

The proxies call L{ListenerStats.request_done} (HTTP, once per request) and
L{ListenerStats.connection_done} (TCP, once per connection); both are a few
integer increments.  Backend counters (active, total, failures, bytes) and
states (the operator's C{admin_state}, the checks' C{health_state}) live on
the L{twisted_slb.backends.Backend} objects themselves, active check results in
C{backend.extra["health"]}, and passive ejections with the backend's health
monitor; L{StatsRegistry.snapshot} puts it all together.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable, Dict, Mapping, Optional, Tuple, cast

if TYPE_CHECKING:
    from twisted_slb.backends import BackendGroup
    from twisted_slb.health import HealthState
    from twisted_slb.persistence.store import RedisStore
    from twisted_slb.web.routing import SplitStats

#: Why a udp listener dropped a datagram, as counted in
#: L{UDPListenerStats.drops} (see L{twisted_slb.udp}).
NO_BACKEND = "no_backend"
NO_SOCKET = "no_socket"
SEND_ERROR = "send_error"
DROP_REASONS = (NO_BACKEND, NO_SOCKET, SEND_ERROR)

OUTCOMES = ("hit", "new", "repin", "expired", "strict", "none")


class ListenerStats:
    """
    @ivar requests: (backend name, status code) -> count; status 0 is a
        request whose client left before the response.
    @ivar persistence: outcome -> count.
    @ivar bytes_in: bytes from clients: on TCP listeners every byte; on
        HTTP listeners request bodies (headers excluded) and the client's
        side of tunnels (WebSocket).
    @ivar bytes_out: bytes to clients: on TCP listeners every byte; on HTTP
        listeners response bodies (headers excluded) and the backend's side
        of tunnels.
    """

    def __init__(self, name: str, protocol: str) -> None:
        self.name = name
        self.protocol = protocol
        self.connections_total = 0
        self.requests: Dict[Tuple[str, int], int] = {}
        self.persistence: Dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.bytes_in = 0
        self.bytes_out = 0
        self.active_source: Optional[Callable[[], int]] = None  # a callable giving open connections now
        #: the counts of the listener's L{twisted_slb.clientip.ClientIPPolicy}
        self.client_ip: Dict[str, int] = {"forwarded": 0, "malformed": 0, "untrusted": 0, "refused": 0}

    @property
    def active(self) -> int:
        return self.active_source() if self.active_source is not None else 0

    def request_done(self, backend, status: int, outcome: str, bytes_sent: int, bytes_received: int = 0) -> None:
        """
        One HTTP request is over.

        @param bytes_sent: the response body's bytes sent to the client
            (status line and headers excluded).
        @param bytes_received: the request body's bytes received from the
            client (request line and headers excluded; a chunked body
            counts its data, not its chunk framing).
        """
        key = (backend.name if backend is not None else "-", status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        self.persistence[outcome] = self.persistence.get(outcome, 0) + 1
        self.bytes_out += bytes_sent
        self.bytes_in += bytes_received

    def connection_done(self, backend, outcome: str, bytes_in: int, bytes_out: int) -> None:
        self.connections_total += 1
        self.persistence[outcome] = self.persistence.get(outcome, 0) + 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def by_class(self) -> Dict[str, int]:
        """Requests by status class: C{{"2xx": 10, "4xx": 1, ...}}."""
        out: Dict[str, int] = {}
        for (_, status), count in self.requests.items():
            key = f"{status // 100}xx" if status else "no response"
            out[key] = out.get(key, 0) + count
        return out

    def snapshot(self) -> dict:
        return {
            "name": self.name,
            "protocol": self.protocol,
            "active_connections": self.active,
            "connections_total": self.connections_total,
            "requests_total": sum(self.requests.values()) if self.protocol != "tcp" else 0,
            "requests_by_class": self.by_class() if self.protocol != "tcp" else {},
            "persistence": dict(self.persistence),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "client_ip": dict(self.client_ip),
        }


class UDPListenerStats(ListenerStats):
    """
    A udp listener's counters: C{connections_total} counts sessions,
    C{bytes_in}/C{bytes_out} are from and to clients, and
    C{active_connections} is the sessions open now.

    @ivar datagrams_in: datagrams from clients.
    @ivar datagrams_out: datagrams to clients (the backends' replies).
    @ivar drops: reason -> datagrams dropped (no backend, no socket, send error).
    @ivar evictions: sessions ended early to stay within max_sessions.
    @ivar refused: sessions whose backend answered ICMP port unreachable.
    """

    def __init__(self, name: str, protocol: str = "udp") -> None:
        ListenerStats.__init__(self, name, protocol)
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.drops: Dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.evictions = 0
        self.refused = 0

    def snapshot(self) -> dict:
        out = ListenerStats.snapshot(self)
        out["requests_total"] = 0
        out["requests_by_class"] = {}
        out["udp"] = {
            "datagrams_in": self.datagrams_in,
            "datagrams_out": self.datagrams_out,
            "sessions": self.active,
            "sessions_total": self.connections_total,
            "drops": dict(self.drops),
            "evictions": self.evictions,
            "refused": self.refused,
        }
        return out


class StatsRegistry:
    """
    Every listener's L{ListenerStats} (kept across reloads) and the backend
    groups, for the admin listener.
    """

    def __init__(self, groups: Optional[Mapping[str, BackendGroup]] = None) -> None:
        from twisted_slb.persistence.census import PinCensus

        self.listeners: Dict[str, ListenerStats] = {}
        self.groups = groups if groups is not None else {}
        #: the stick tables and cookie-client counters, for the pinned counts
        self.census = PinCensus(self.groups)
        # Which process answers, and since when: an upgrade (SIGUSR2)
        # changes both.
        self.pid = os.getpid()
        self.started = time.time()
        # Weighted splits' counts by route ("web", "web rule 0"), with the
        # groups each split has now.
        self.splits: Dict[str, SplitStats] = {}
        self._split_groups: Dict[str, tuple] = {}
        self._splits_in_use: set = set()
        #: the shared store (L{twisted_slb.persistence.store.RedisStore}), if any
        self.store: Optional[RedisStore] = None

    def for_split(self, where: str, groups) -> SplitStats:
        """
        The L{twisted_slb.web.routing.SplitStats} of the split of route
        C{where}, kept across reloads while the route has a split.
        """
        from twisted_slb.web.routing import SplitStats

        stats = self.splits.get(where)
        if stats is None:
            stats = self.splits[where] = SplitStats()
        self._split_groups[where] = tuple(groups)
        self._splits_in_use.add(where)
        return stats

    def retain_splits(self) -> None:
        """After a reload: forget the splits no route has any more."""
        for where in [w for w in self.splits if w not in self._splits_in_use]:
            del self.splits[where]
            self._split_groups.pop(where, None)
        self._splits_in_use = set()

    def for_listener(self, name: str, protocol: str) -> ListenerStats:
        stats = self.listeners.get(name)
        if stats is None or stats.protocol != protocol:
            kind = UDPListenerStats if protocol == "udp" else ListenerStats
            stats = self.listeners[name] = kind(name, protocol)
        return stats

    def retain(self, names) -> None:
        """Forget listeners that are gone after a reload."""
        for name in [n for n in self.listeners if n not in names]:
            del self.listeners[name]

    def snapshot(self) -> dict:
        groups = []
        pinned = self.census.pinned()
        cookies = self.census.cookies()
        for group in self.groups.values():
            backends = []
            for b in group.backends:
                # What twisted_slb.health keeps there (Backend.extra holds objects).
                health = cast("Optional[HealthState]", b.extra.get("health"))
                backends.append({
                    "name": b.name,
                    "address": b.address,
                    "id": b.id,
                    "state": b.state,
                    "admin_state": b.admin_state,
                    "health_state": b.health_state,
                    "weight": b.weight,
                    "active": b.active,
                    "total": b.total,
                    "failures": b.failures,
                    "bytes_in": b.bytes_in,
                    "bytes_out": b.bytes_out,
                    "pinned_clients": pinned.get((group.name, b.name), 0),
                    "cookie_clients": cookies.get((group.name, b.name), 0),
                    "health": None if health is None else {
                        "last_status": health.last_status,
                        "last_reason": health.last_reason,
                        "last_check": health.last_check,
                        "consecutive_successes": health.consecutive_successes,
                        "consecutive_failures": health.consecutive_failures,
                        "down_by": health.down_by,
                    },
                    "passive": None if b.monitor is None else b.monitor.passive_snapshot(b),
                })
            groups.append({
                "name": group.name, "scheduler": group.scheduler.name, "backends": backends,
                "hash_key": getattr(group, "hash_key", "source_ip"),
                "hash_balance_factor": getattr(group.scheduler, "balance_factor", 0),
            })
        return {
            "process": {"pid": self.pid, "started": self.started},
            "store": {"type": "memory"} if self.store is None else self.store.snapshot(),
            "listeners": [s.snapshot() for s in self.listeners.values()],
            "groups": groups,
            "tables": self.census.describe(),
            "splits": [
                dict(route=where, groups=list(self._split_groups.get(where, ())), **stats.snapshot())
                for where, stats in self.splits.items()
            ],
        }
