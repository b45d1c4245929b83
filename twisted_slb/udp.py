# -*- test-case-name: tests.test_udp -*-
"""
UDP listeners: datagrams balanced by client address, with source-IP
persistence.

A I{session} is one client address C{(ip, port)}.  Its first datagram picks
a backend (the client IP's pin in the stick table if it has a usable one,
else the scheduler) and opens one balancer UDP socket I{connected} to that
backend; every later datagram of the client goes out through that socket,
and what the backend sends back on it is written to the client from the
listening socket, so the client sees its answers come from the address it
wrote to.  Source-IP persistence keeps all of one client IP's sessions (any
source port) on one backend for the table's C{timeout}.

A session ends after C{idle_timeout} seconds of silence both ways.  The
sessions are one C{dict} ordered by last activity (a datagram either way
moves a session to its end), so one shared sweep timer finds the idle ones
at its front, and at most C{max_sessions} exist: a new client beyond that
evicts the least recently active session (counted, and logged once per
episode), so a flood of new source addresses never grows memory without
bound.

The kernel reports a backend's I{ICMP port unreachable} on the connected
socket as C{ECONNREFUSED}; Twisted turns it into
L{DatagramProtocol.connectionRefused}.  That counts as a passive failure of
the backend, and the session's next datagram goes to another backend (the
client IP is re-pinned there).

The PROXY protocol does not apply to UDP (it is a header at the start of a
stream) and there is no C{X-Forwarded-For} equivalent: a backend sees the
balancer's address.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Dict, List, Optional, Tuple

from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.interfaces import IListeningPort, IUDPTransport
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from twisted_slb._reactor import maybe_global_reactor
from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.persistence.interfaces import Session, normalise_ip, pinned_now
# The drop reasons are defined with the counters (stats imports no listener module).
from twisted_slb.stats import DROP_REASONS, NO_BACKEND, NO_SOCKET, SEND_ERROR, UDPListenerStats  # noqa: F401

log = Logger(namespace="twisted_slb.udp")
access = Logger(namespace="twisted_slb.access")



def socket_error(port) -> str:
    """
    Why the kernel failed a connected UDP socket (read with C{SO_ERROR}, which
    also clears it): C{"port unreachable (ICMP)"} for C{ECONNREFUSED}.
    """
    sock = getattr(port, "socket", None)
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if sock is not None else 0
    if code in (0, errno.ECONNREFUSED):
        return "port unreachable (ICMP)"
    return f"{os.strerror(code)} (ICMP)"


class _BackendSide(DatagramProtocol):
    """
    The balancer's socket of one session, connected to its backend.

    The kernel reports an ICMP error on a connected UDP socket as a pending
    socket error.  Twisted's C{udp.Port} turns C{ECONNREFUSED} from C{recv}
    or C{send} into L{connectionRefused}; but the epoll reactor sees the
    error first as C{EPOLLERR} without C{EPOLLIN} and closes the port as a
    lost connection, so L{stopProtocol} that we did not ask for is the same
    news (its C{SO_ERROR} says which).

    @ivar port: the listening port (kept: Twisted clears C{transport} before
        L{stopProtocol}).
    @ivar closing: the balancer closed it (an idle or ended session).
    """

    noisy = False
    port: Optional[IUDPTransport] = None
    closing = False

    def __init__(self, balancer: "UDPBalancer", session: "UDPSession") -> None:
        self.balancer = balancer
        self.session = session

    def datagramReceived(self, data: bytes, addr) -> None:
        self.balancer.reply(self.session, self, data)

    def connectionRefused(self) -> None:
        self.balancer.refused(self.session, self, "port unreachable (ICMP)")

    def stopProtocol(self) -> None:
        if not self.closing:
            self.balancer.refused(self.session, self, socket_error(self.port))

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if self.port is not None:
                self.port.stopListening()


class UDPSession:
    """
    One client address and where its datagrams go.

    @ivar client: the client's C{(host, port)}.
    @ivar visit: the persistence L{Session} (client IP, pin, outcome).
    @ivar backend: the backend now serving it, or L{None} after a refusal
        until its next datagram.
    @ivar side: the L{_BackendSide} whose socket is connected to C{backend}.
    @ivar tried: backends that refused this session.
    """

    __slots__ = ("client", "visit", "backend", "side", "tried", "started", "last", "refreshed", "answered",
                 "datagrams_in", "datagrams_out", "bytes_in", "bytes_out")

    def __init__(self, client: Tuple[str, int], visit: Session, now: float) -> None:
        self.client = client
        self.visit = visit
        self.backend: Optional[Backend] = None
        self.side: Optional[_BackendSide] = None
        self.tried: List[Backend] = []
        self.started = self.last = self.refreshed = now
        self.answered = False
        self.datagrams_in = self.datagrams_out = self.bytes_in = self.bytes_out = 0


class UDPBalancer(DatagramProtocol):
    """
    The protocol of a udp listener's port: balances client sessions over a
    L{BackendGroup}.  Embed it with C{reactor.listenUDP(port, balancer)}.

    @ivar group: the L{BackendGroup}.
    @ivar policy: a source-IP persistence policy
        (L{twisted_slb.persistence.sourceip.SourceIPPersistence}) or L{None}.
    @ivar idle_timeout: seconds of silence both ways that end a session.
    @ivar max_sessions: the most sessions kept at once.
    @ivar sessions: client address -> L{UDPSession}, least recently active
        first.
    @ivar stats: the listener's L{twisted_slb.stats.ListenerStats} (with the
        udp counters), or L{None}.
    """

    noisy = False

    def __init__(
        self,
        group: BackendGroup,
        policy=None,
        reactor=None,
        idle_timeout: float = 30.0,
        max_sessions: int = 100_000,
        listener_name: str = "udp",
        stats=None,
        access_log: bool = False,
        access_file=None,
    ) -> None:
        reactor = maybe_global_reactor(reactor)
        self.reactor = reactor
        self.sessions: Dict[Tuple[str, int], UDPSession] = {}
        self._sweeper = None
        self._full = False  # in an eviction episode
        self._episode_evictions = 0
        self.configure(group, policy, idle_timeout, max_sessions, listener_name, stats, access_log, access_file)

    def configure(self, group, policy, idle_timeout, max_sessions, listener_name, stats,
                  access_log=False, access_file=None) -> None:
        """New settings (a reload); open sessions and their backends are kept."""
        self.group = group
        self.policy = policy
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.listener_name = listener_name
        if stats is None:
            stats = UDPListenerStats(listener_name, "udp")
        self.stats = stats
        stats.active_source = lambda: len(self.sessions)
        self.access_log = access_log
        self.access_file = access_file
        # A live session refreshes its client's pin this often, so the pin
        # outlives the session's last datagram by at least timeout - 1 s.
        self._refresh_every = min(1.0, policy.table.timeout / 2.0) if policy is not None else 0.0

    def adopt(self, new: "UDPBalancer") -> None:
        """Take C{new}'s settings (built from a reloaded configuration)."""
        self.configure(new.group, new.policy, new.idle_timeout, new.max_sessions, new.listener_name, new.stats,
                       new.access_log, new.access_file)
        if self._sweeper is not None:
            self._schedule_sweep()

    # -- lifetime ------------------------------------------------------------

    @property
    def sweep_interval(self) -> float:
        """Seconds between sweeps: a session ends at most this late."""
        return max(0.05, min(1.0, self.idle_timeout / 4.0))

    def startProtocol(self) -> None:
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = self.reactor.callLater(self.sweep_interval, self.sweep)

    def stopProtocol(self) -> None:
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        for session in list(self.sessions.values()):
            self.end(session, "stopped")

    def sweep(self) -> int:
        """End the sessions idle for C{idle_timeout}; return how many ended."""
        now = self.reactor.seconds()
        limit = now - self.idle_timeout
        sessions = self.sessions
        ended = 0
        while sessions:
            session = next(iter(sessions.values()))
            if session.last > limit:
                break
            self.end(session, "idle")
            ended += 1
        if self._full and len(sessions) < self.max_sessions * 0.9:
            log.info("udp listener {listener}: session table below its limit again ({count} sessions evicted)",
                     listener=self.listener_name, count=self._episode_evictions)
            self._full = False
        if self._sweeper is not None:
            self._sweeper = self.reactor.callLater(self.sweep_interval, self.sweep)
        return ended

    # -- client -> backend -----------------------------------------------------

    def datagramReceived(self, data: bytes, addr) -> None:
        stats = self.stats
        stats.datagrams_in += 1
        stats.bytes_in += len(data)
        now = self.reactor.seconds()
        sessions = self.sessions
        session = sessions.pop(addr, None)
        if session is None:
            session = self.open(addr, now)
            if session is None:
                return
        elif session.side is None and not self.connect(session):
            self.end(session, "no backend")
            return
        sessions[addr] = session
        session.last = now
        session.datagrams_in += 1
        session.bytes_in += len(data)
        backend = session.backend
        side = session.side
        # open() or connect() gave the session its backend and socket.
        assert backend is not None and side is not None and side.port is not None
        backend.bytes_out += len(data)
        if self._refresh_every and now - session.refreshed >= self._refresh_every:
            session.refreshed = now
            self.policy.refresh(session.visit, backend)
        try:
            side.port.write(data, None)  # connected: to its backend
        except (OSError, error.MessageLengthError):
            stats.drops[SEND_ERROR] += 1

    def open(self, addr, now: float) -> Optional[UDPSession]:
        """A new client address: choose its backend and open its socket."""
        visit = Session(normalise_ip(addr[0]), policy=self.policy)
        policy = self.policy
        if policy is not None:
            # A datagram is not held for a shared table's lookup: it
            # answers at once from the cache, or is balanced as new.
            visit.pinned_key = pinned_now(policy.find(visit))
        session = UDPSession(addr, visit, now)
        if len(self.sessions) >= self.max_sessions:
            self.evict()
        if not self.connect(session):
            return None
        self.stats.connections_total += 1
        return session

    def connect(self, session: UDPSession) -> bool:
        """
        Route C{session} (again after a refusal) and open its socket.  A
        pinned backend that is drained takes no new session: the client is
        re-pinned.  A failure counts the datagram as dropped.

        @return: whether the session has a backend and a socket now.
        """
        group = self.group
        exclude = list(session.tried)
        pinned = group.get(session.visit.pinned_key) if session.visit.pinned_key else None
        if pinned is not None and pinned.weight == 0:
            exclude.append(pinned)
        backend = group.route(session.visit, exclude)
        if backend is None:
            self.stats.drops[NO_BACKEND] += 1
            return False
        side = _BackendSide(self, session)
        try:
            side.port = self.reactor.listenUDP(0, side, interface="::" if ":" in backend.host else "")
            side.port.connect(backend.host, backend.port)
        except (error.CannotListenError, OSError, ValueError) as e:
            # Out of descriptors, say: this process's problem, not the backend's.
            side.close()
            self.stats.drops[NO_SOCKET] += 1
            log.warn("udp listener {listener}: no socket to {backend}: {error}",
                     listener=self.listener_name, backend=backend.address, error=e)
            return False
        session.backend = backend
        session.side = side
        session.answered = False
        backend.active += 1
        backend.total += 1
        visit = session.visit
        visit.backend = backend
        if visit.policy is not None:
            visit.policy.remember(visit, backend)
        self.stats.persistence[visit.outcome] = self.stats.persistence.get(visit.outcome, 0) + 1
        return True

    def evict(self) -> None:
        """Make room: end the least recently active session."""
        session = next(iter(self.sessions.values()))
        self.end(session, "evicted")
        self.stats.evictions += 1
        self._episode_evictions += 1
        if not self._full:
            self._full = True
            self._episode_evictions = 1
            log.warn("udp listener {listener}: {max} sessions (max_sessions): evicting the least recently active "
                     "ones for new clients", listener=self.listener_name, max=self.max_sessions)

    # -- backend -> client -----------------------------------------------------

    def reply(self, session: UDPSession, side: _BackendSide, data: bytes) -> None:
        if session.side is not side:
            return  # a late datagram on a socket being closed
        stats = self.stats
        stats.datagrams_out += 1
        stats.bytes_out += len(data)
        session.datagrams_out += 1
        session.bytes_out += len(data)
        backend = session.backend
        assert backend is not None  # set with session.side (connect)
        backend.bytes_in += len(data)
        client = session.client
        sessions = self.sessions
        if sessions.pop(client, None) is session:
            sessions[client] = session
            session.last = self.reactor.seconds()
        if not session.answered:
            session.answered = True
            backend.record_success()
        assert self.transport is not None  # replies come only while the balancer's port is open
        try:
            self.transport.write(data, client)
        except (OSError, error.MessageLengthError):
            stats.drops[SEND_ERROR] += 1

    def refused(self, session: UDPSession, side: _BackendSide, reason: str) -> None:
        """The backend answered ICMP port unreachable: a passive failure."""
        if session.side is not side:
            return
        backend = session.backend
        assert backend is not None  # set with session.side (connect)
        self.stats.refused += 1
        backend.record_failure(reason)
        log.info("udp listener {listener}: {client} -> {backend} ({address}): {reason}; "
                 "the next datagram goes elsewhere", listener=self.listener_name, reason=reason,
                 client=f"{session.client[0]}:{session.client[1]}", backend=backend.name, address=backend.address)
        session.tried.append(backend)
        session.visit.pinned_key = backend.id  # its next backend is a re-pin
        self._close_side(session)

    def _close_side(self, session: UDPSession) -> None:
        side, session.side = session.side, None
        if session.backend is not None:
            session.backend.active -= 1
        if side is not None:
            side.close()

    def end(self, session: UDPSession, why: str) -> None:
        """Forget C{session} and close its socket."""
        if self.sessions.get(session.client) is session:
            del self.sessions[session.client]
        if session.side is not None:
            self._close_side(session)
        self.log_access(session, why)

    def log_access(self, session: UDPSession, why: str) -> None:
        if not self.access_log:
            return
        backend = session.backend
        name = backend.name if backend else "-"
        address = backend.address if backend else "-"
        client = f"{session.client[0]}:{session.client[1]}"
        duration = session.last - session.started
        line = (f"{self.listener_name} udp {client} -> {name} ({address}) persistence={session.visit.outcome} "
                f"from_client={session.datagrams_in}/{session.bytes_in} to_client={session.datagrams_out}/"
                f"{session.bytes_out} {duration:.3f}s {why}")
        if self.access_file is not None:
            self.access_file.write_line(line)
        else:
            access.info("{line}", line=line, listener=self.listener_name, client=client, backend=name,
                        backend_address=address, outcome=session.visit.outcome, ended=why)


class UDPListenerService(Service):
    """
    One udp listener: listens with L{IReactorUDP.listenUDP} on the
    C{"udp:PORT[:interface=ADDR]"} of its configuration.

    Like L{twisted_slb.service.ListenerService}, it binds in
    L{privilegedStartService} and stops twistd with a one-line message when
    it cannot.  A reload keeps the port and the L{UDPBalancer} (so its
    sessions), which takes the new settings.

    @ivar balancer: the L{UDPBalancer} serving the port.
    @ivar port: the listening port, once listening.
    """

    #: unused: a UDP session has nothing to finish (kept for the service tree)
    grace_period = 0.0

    def __init__(self, config, balancer: UDPBalancer, reactor) -> None:
        self.config = config
        self.balancer = balancer
        self.reactor = reactor
        self.port: Optional[IListeningPort] = None
        self.setName(config.name)

    @property
    def factory(self) -> UDPBalancer:
        return self.balancer

    def _listen(self) -> None:
        from twisted_slb.config import parse_udp_bind
        from twisted_slb.tls import describe_address

        port, interface = parse_udp_bind(self.config.bind)
        self.port = self.reactor.listenUDP(port, self.balancer, interface=interface)
        log.info("listener {listener} (udp) listening on {address}", listener=self.config.name,
                 address=describe_address(self.port.getHost()))

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        if self.port is not None:
            return
        try:
            self._listen()
        except error.CannotListenError as e:
            raise SystemExit(f"twisted_slb: listener {self.config.name!r} cannot listen on "
                             f"{self.config.bind!r}: {e}") from None

    def startService(self) -> None:
        Service.startService(self)
        if self.port is None:
            try:
                self._listen()
            except error.CannotListenError as e:
                log.error("listener {listener} cannot listen on {bind}: {reason}", listener=self.config.name,
                          bind=self.config.bind, reason=str(e))

    def reconfigure(self, config, balancer: UDPBalancer) -> None:
        """New settings; the port, the sessions and their backends stay."""
        assert config.bind == self.config.bind
        self.config = config
        if balancer is not self.balancer:
            self.balancer.adopt(balancer)

    def stopService(self):
        Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None
