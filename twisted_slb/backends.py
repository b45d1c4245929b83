"""
Backends and backend groups: the runtime state a listener balances over.

Configuration objects (L{twisted_slb.config.GroupConfig}) are frozen values;
the objects here are their live, mutable counterparts: health state, live
connection counts and counters.  A L{BackendGroup} keeps the same L{Backend}
objects across a config reload when the backend names stay the same, so that
persistence pins and counters survive it.
"""

from __future__ import annotations

import errno
import hashlib
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence

from twisted.internet import error
from twisted.logger import Logger

from twisted_slb.persistence.interfaces import EXPIRED, HIT, NEW, NONE, REPIN, STRICT, Session, is_strict
from twisted_slb.scheduling import IScheduler, SmoothWeightedRoundRobin, hash_key_of, scheduler_for

if TYPE_CHECKING:  # pragma: no cover
    from twisted_slb.config import GroupConfig, ServerConfig
    from twisted_slb.health import HealthMonitor

log = Logger(namespace="twisted_slb.backends")

UP = "up"
DOWN = "down"
DRAIN = "drain"

#: Operator (admin) states, set only from the admin API and never changed by
#: health checks: in service, draining (no new clients, pins kept), or in
#: maintenance (no clients at all), as HAProxy's ready / drain / maint.
READY = "ready"
MAINT = "maint"
ADMIN_STATES = (READY, DRAIN, MAINT)


def backend_id(name: str) -> str:
    """
    The stable, opaque identifier of a backend, derived from its name only.

    It is what the insert cookie carries and what stick tables store, so it
    must be the same across restarts and across several balancer processes
    sharing one config, and it must never reveal the backend's address.

    @param name: the backend's configured name.
    @return: 16 lowercase hex digits.
    """
    return hashlib.sha256(b"twisted_slb:" + name.encode("utf-8")).hexdigest()[:16]


class Backend:
    """
    One backend server and its live state.

    Whether a backend may be used is three separate pieces of state, each
    owned by one party, so that none undoes another's decision:

      - C{admin_state}: the operator's (admin API) C{"ready"}, C{"drain"} or
        C{"maint"}; it holds until the operator changes it, whatever the
        health checks say;
      - C{healthy}: the active health checks' verdict (L{True} without
        active checks);
      - C{ejected}: passive outlier detection has taken it out for a while.

    @ivar name: the configured name.
    @ivar id: L{backend_id} of the name: the opaque key used by persistence.
    @ivar host: the host name or IP address to connect to.
    @ivar port: the TCP port to connect to.
    @ivar weight: the scheduling weight; 0 means drain (no new clients, pinned
        clients kept).
    @ivar admin_state: the operator's state, one of L{ADMIN_STATES}.
    @ivar healthy: whether the active health checks consider it usable.
    @ivar ejected: whether passive health checks have ejected it.
    @ivar active: connections (TCP) or requests (HTTP) in flight now.
    @ivar total: connections or requests ever started.
    @ivar failures: connect or protocol failures counted against it.
    @ivar bytes_in: bytes received from the backend.
    @ivar bytes_out: bytes sent to the backend.
    """

    __slots__ = (
        "name", "id", "host", "port", "weight", "admin_state", "healthy", "ejected", "active", "total",
        "failures", "bytes_in", "bytes_out", "extra", "monitor", "ramp",
    )

    def __init__(self, name: str, host: str, port: int, weight: int = 100) -> None:
        self.name = name
        self.id = backend_id(name)
        self.host = host
        self.port = port
        self.weight = weight
        self.admin_state = READY
        self.healthy = True
        self.ejected = False
        self.active = 0
        self.total = 0
        self.failures = 0
        self.bytes_in = 0
        self.bytes_out = 0
        # Room for other modules (health checks, stats) to hang state on a
        # backend without this class knowing about them.
        self.extra: Dict[str, object] = {}
        # The passive health monitor told of failures and successes, if any.
        self.monitor: Optional[HealthMonitor] = None
        # Slow start: the fraction of its weight a backend that just came
        # up gets (1.0 once it is fully back).
        self.ramp = 1.0

    @classmethod
    def from_config(cls, server: ServerConfig) -> Backend:
        return cls(server.name, server.host, server.port, server.weight)

    @property
    def address(self) -> str:
        """C{host:port}, with IPv6 literals in brackets."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def share(self) -> float:
        """The weight schedulers use: C{weight}, reduced during slow start."""
        return self.weight * self.ramp

    @property
    def up(self) -> bool:
        """
        Whether pinned clients may use it: healthy, not ejected, and not in
        maintenance.  Assigning it sets L{healthy} (the health-check state),
        never the operator's state.
        """
        return self.healthy and not self.ejected and self.admin_state != MAINT

    @up.setter
    def up(self, value: bool) -> None:
        self.healthy = bool(value)

    @property
    def health_state(self) -> str:
        """C{"up"} or C{"down"}: the health checks' view alone (active, and passive ejection)."""
        return UP if self.healthy and not self.ejected else DOWN

    @property
    def state(self) -> str:
        """C{"up"}, C{"down"} (or in maintenance) or C{"drain"} (up, but no new clients)."""
        if not self.up:
            return DOWN
        if self.weight == 0 or self.admin_state == DRAIN:
            return DRAIN
        return UP

    @property
    def takes_new_clients(self) -> bool:
        """Whether a scheduler may give it a client that is not pinned to it."""
        return self.healthy and not self.ejected and self.admin_state == READY and self.weight > 0

    @property
    def takes_pinned_clients(self) -> bool:
        """Whether a client pinned to it may keep using it (drain keeps pins)."""
        return self.healthy and not self.ejected and self.admin_state != MAINT

    def record_failure(self, reason: str) -> None:
        """
        A connect or a request to this backend failed (refused, timed out,
        reset, invalid response).  Counted, and passed on to the passive health
        monitor, which may eject the backend.  A C{reason} that starts with
        C{"connect"} is a failed connect (it counts towards consecutive
        failures as well as the failure rate); any other is a failed request.
        """
        self.failures += 1
        if self.monitor is not None:
            self.monitor.failure(self, reason)

    def record_success(self) -> None:
        """A connect or a request to this backend succeeded."""
        if self.monitor is not None:
            self.monitor.success(self)

    def __repr__(self) -> str:
        return f"<Backend {self.name} {self.address} weight={self.weight} {self.state}>"


class BackendGroup:
    """
    A named group of backends and the scheduler that picks among them.

    @ivar name: the group's configured name.
    @ivar backends: the backends, in configuration order.
    @ivar scheduler: an L{IScheduler} that picks among backends that take new
        clients.
    @ivar connect_timeout: seconds allowed for a connection to a backend.
    @ivar retries: how many other backends are tried when a connect fails.
    @ivar tls: a L{twisted_slb.config.BackendTLSConfig} or L{None}.
    @ivar hash_key: what a hash scheduler hashes: C{"source_ip"} (the
        client's address) or a request property (see
        L{twisted_slb.scheduling.hash_key_of}); a visit without it is given
        a backend by weighted round robin.
    """

    hash_key = "source_ip"

    def __init__(
        self,
        name: str,
        backends: Iterable[Backend],
        scheduler: Optional[IScheduler] = None,
        connect_timeout: float = 5.0,
        retries: int = 2,
        tls: object = None,
    ) -> None:
        if scheduler is None:
            scheduler = SmoothWeightedRoundRobin()
        self.name = name
        self.scheduler = scheduler
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.tls = tls
        self._wrr: Optional[IScheduler] = None
        self.backends: List[Backend] = []
        self._by_key: Dict[str, Backend] = {}
        self._set_backends(list(backends))

    @classmethod
    def from_config(cls, config: GroupConfig) -> BackendGroup:
        group = cls(
            config.name,
            [Backend.from_config(s) for s in config.servers],
            scheduler=scheduler_for(config.scheduler),
            connect_timeout=config.connect_timeout,
            retries=config.retries,
            tls=config.tls,
        )
        group._configure_hash(config)
        return group

    def _configure_hash(self, config: GroupConfig) -> None:
        self.hash_key = config.hash_key
        if hasattr(self.scheduler, "balance_factor"):
            self.scheduler.balance_factor = config.hash_balance_factor

    def _set_backends(self, backends: List[Backend]) -> None:
        self.backends = backends
        by_key: Dict[str, Backend] = {}
        for b in backends:
            by_key[b.id] = b
            by_key[b.name] = b
        self._by_key = by_key

    def update(self, config: GroupConfig) -> None:
        """
        Apply a reloaded configuration of this group in place.

        Backends whose names stay keep their L{Backend} object (so their
        health, counters and every pin to them survive); their address and
        weight take the new values.  New names are added, missing ones removed.
        """
        old = {b.name: b for b in self.backends}
        new: List[Backend] = []
        for server in config.servers:
            b = old.get(server.name)
            if b is None:
                b = Backend.from_config(server)
            else:
                b.host, b.port, b.weight = server.host, server.port, server.weight
            new.append(b)
        self._set_backends(new)
        if config.scheduler != self.scheduler.name:
            self.scheduler = scheduler_for(config.scheduler)
        self.connect_timeout = config.connect_timeout
        self.retries = config.retries
        self.tls = config.tls
        self._configure_hash(config)

    def get(self, key: str) -> Optional[Backend]:
        """The backend whose id or name is C{key}, or L{None}."""
        return self._by_key.get(key)

    def pinned(self, key: Optional[str]) -> Optional[Backend]:
        """
        The backend a client pinned to C{key} may use, or L{None} when the key
        is unknown or names a backend that is down.
        """
        if key is None:
            return None
        b = self._by_key.get(key)
        if b is not None and b.takes_pinned_clients:
            return b
        return None

    def choose(
        self, client_key: str = "", exclude: Sequence[Backend] = (), scheduler: Optional[IScheduler] = None
    ) -> Optional[Backend]:
        """
        Pick a backend for a client that is not (or no longer) pinned.

        @param client_key: the client's identity (its IP address) for
            schedulers that hash it.
        @param exclude: backends already tried for this client.
        @param scheduler: picks instead of the group's scheduler.
        @return: a backend that takes new clients, or L{None} if none does.
        """
        candidates = [b for b in self.backends if b.takes_new_clients and b not in exclude]
        if not candidates:
            return None
        return (scheduler or self.scheduler).pick(candidates, client_key)

    def __repr__(self) -> str:
        return f"<BackendGroup {self.name} {self.backends!r}>"

    def route(self, session: Session, exclude: Sequence[Backend] = ()) -> Optional[Backend]:
        """
        Choose the backend for a client visit and set C{session.outcome}.

        A pin (C{session.pinned_key}) to a backend that can take it, and is not
        in C{exclude}, is a hit; otherwise the scheduler chooses, and the
        outcome is C{"repin"} when there was a pin and C{"new"} (or
        C{"none"} without a policy, or C{"expired"} when the policy found a
        pin too old to use) when there was none.

        With a strict policy (C{on_failure = "strict"}), a pin to a backend
        of the group that is down or in C{exclude} is not moved: the answer
        is L{None} with the outcome C{"strict"}.  A pin to a key the group
        does not know (a backend removed from the configuration) is re-pinned
        in both modes.

        @param session: the visit; its C{pinned_key} and C{policy} are read.
        @param exclude: backends that already failed for this visit.
        @return: the backend, or L{None} when no backend can take the client.
        """
        key = session.pinned_key
        if key is not None:
            b = self.pinned(key)
            if b is not None and b not in exclude:
                session.outcome = HIT
                return b
            if is_strict(session.policy) and self.get(key) is not None:
                session.outcome = STRICT
                return None
            outcome = REPIN
        elif session.policy is not None:
            outcome = EXPIRED if session.outcome == EXPIRED else NEW
        else:
            outcome = NONE
        # A policy may say how its new clients are chosen (source-IP
        # persistence uses consistent hashing when several workers run).
        scheduler = getattr(session.policy, "scheduler", None)
        client_key: Optional[str] = session.client_ip
        if scheduler is None and self.hash_key != "source_ip":
            client_key = hash_key_of(self.hash_key, session.request)
            if client_key is None:
                scheduler = self._fallback()
        b = self.choose(client_key or "", exclude, scheduler)
        session.outcome = outcome
        return b

    def _fallback(self) -> IScheduler:
        """The weighted round robin of visits that lack the group's hash key."""
        fallback = self._wrr
        if fallback is None:
            fallback = self._wrr = SmoothWeightedRoundRobin()
        return fallback


#: errno values of a connect that failed for lack of local resources.
_LOCAL_ERRNOS = frozenset([errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])


def local_failure(reason) -> bool:
    """
    Whether a failed connect to a backend is this process's problem (out of
    file descriptors or memory) rather than the backend's: such a failure
    must not count against the backend, or a descriptor shortage here would
    take healthy backends down.

    @param reason: the L{twisted.python.failure.Failure} of the connect.
    """
    value = getattr(reason, "value", reason)
    return isinstance(value, error.ConnectError) and getattr(value, "osError", None) in _LOCAL_ERRNOS
