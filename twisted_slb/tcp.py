"""
The layer-4 listener: a TCP relay that balances connections over a backend
group and keeps each client on one backend through a persistence policy
(normally L{twisted_slb.persistence.sourceip.SourceIPPersistence}).

Embedding::

    group = BackendGroup("web", [Backend("a", "10.0.0.1", 8080), Backend("b", "10.0.0.2", 8080)])
    policy = SourceIPPersistence(StickTable(timeout=1000))
    factory = TCPBalancerFactory(group, policy)
    serverFromString(reactor, "tcp:8081").listen(factory)

Data flow: what the client sends before a backend is connected waits in
memory, up to L{EARLY_BYTES} (then reading pauses); its pin (if any) or the
scheduler names a backend;
a failed connect is counted against that backend and the next one is tried
(C{group.retries} times) without the client noticing; once connected, the
pin is recorded, the optional PROXY protocol header is sent, and bytes are
relayed both ways, each transport registered as the producer of the other,
so that a fast sender to a slow receiver is paused rather than buffered.
Half-closes are passed through: a client that shuts down its sending side
still receives the rest of the backend's answer, and the other way round.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import List, Optional, Set, Union, cast

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_slb._io import lean
from twisted_slb._io.lean import LeanConnector
from twisted_slb._io.sockets import close, half_close, set_nodelay, write_now
from twisted_slb._io.timers import Deadlines
from twisted_slb._reactor import maybe_global_reactor
from twisted_slb._typing import IStreamTransport
from twisted_slb.backends import Backend, BackendGroup, local_failure
from twisted_slb.choices import PROXY_PROTOCOL_VERSIONS
from twisted_slb.limits import ConnectionAdmission, ConnectionLimit, IListenerFactory
from twisted_slb.persistence.interfaces import IPersistencePolicy, Session, normalise_ip, strict_refusal

log = Logger(namespace="twisted_slb.tcp")
access = Logger(namespace="twisted_slb.access")

#: Bytes a client may send before its backend is connected; past them,
#: reading from it pauses until then (Twisted's own write buffer size).
EARLY_BYTES = 65536

_PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_PROXY_V2_PROXY = 0x21  # version 2, command PROXY
_PROXY_V2_LOCAL = 0x20  # version 2, command LOCAL: no address information
_PROXY_V2_TCP4 = 0x11  # AF_INET, SOCK_STREAM
_PROXY_V2_TCP6 = 0x21  # AF_INET6, SOCK_STREAM


def _ip(address) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    """The IP address of an L{IPv4Address} / L{IPv6Address}, else L{None}."""
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return None
    try:
        # A scope ("fe80::1%eth0") has no place in a PROXY header.
        return ipaddress.ip_address(address.host.split("%", 1)[0])
    except ValueError:
        return None


def proxy_header(version: str, client, local) -> bytes:
    """
    The PROXY protocol header announcing a TCP connection from C{client} to
    C{local}, so that a backend sees the real client address (HAProxy's
    C{send-proxy} and C{send-proxy-v2}).

    Two IPv4 addresses (an IPv4-mapped IPv6 address counts as IPv4, as a
    dual-stack listener reports them) give C{TCP4}; otherwise both are given
    as IPv6.  Addresses that are not IP (a UNIX socket listener) give
    C{PROXY UNKNOWN} (v1) or the C{LOCAL} command (v2), which tell the
    backend to use the connection's own addresses.

    @param version: C{"v1"} (text) or C{"v2"} (binary).
    @param client: the client's address (C{transport.getPeer()}).
    @param local: the address the client connected to
        (C{transport.getHost()}).
    @return: the header bytes, to be sent before anything else.
    @raise ValueError: C{version} is neither C{"v1"} nor C{"v2"}.
    """
    if version not in PROXY_PROTOCOL_VERSIONS:
        raise ValueError(f"PROXY protocol version must be 'v1' or 'v2', not {version!r}")
    src, dst = _ip(client), _ip(local)
    if src is None or dst is None:
        if version == "v1":
            return b"PROXY UNKNOWN\r\n"
        return _PROXY_V2_SIGNATURE + struct.pack("!BBH", _PROXY_V2_LOCAL, 0, 0)
    if src.version == 6 and src.ipv4_mapped is not None:
        src = src.ipv4_mapped
    if dst.version == 6 and dst.ipv4_mapped is not None:
        dst = dst.ipv4_mapped
    v6 = src.version == 6 or dst.version == 6
    if v6:
        # One IPv4 and one IPv6 address: say both in IPv6.
        if src.version == 4:
            src = ipaddress.IPv6Address("::ffff:" + str(src))
        if dst.version == 4:
            dst = ipaddress.IPv6Address("::ffff:" + str(dst))
    if version == "v1":
        family = "TCP6" if v6 else "TCP4"
        return f"PROXY {family} {src} {dst} {client.port} {local.port}\r\n".encode("ascii")
    body = src.packed + dst.packed + struct.pack("!HH", client.port, local.port)
    family_byte = _PROXY_V2_TCP6 if v6 else _PROXY_V2_TCP4
    return _PROXY_V2_SIGNATURE + struct.pack("!BBH", _PROXY_V2_PROXY, family_byte, len(body)) + body


@implementer(IHalfCloseableProtocol)
def serve_lean(port, factory) -> bool:
    """
    Make a listening C{port} give the connections it accepts for C{factory}
    the lean transports the relay uses for its backends (a non-blocking
    socket driven through the reactor's C{addReader}/C{addWriter}, with the
    transport interface of Twisted's own; see docs/performance.md), if it
    is a plain TCP port of a reactor that can drive them.  C{twistd slb}
    does this for its TCP and plain HTTP listeners; C{factory} may be a
    L{TCPBalancerFactory} or an L{twisted_slb.web.front.HTTPFrontFactory}.

    @param port: what C{listen} gave back (an C{IListeningPort}).
    @param factory: the factory C{port} listens with.
    @return: whether it does now (C{False}: the port keeps Twisted's
        transports).
    """
    return lean.serve_port(port, factory)


class _BackendProtocol(Protocol):
    """
    The balancer's connection to a backend: relays what the backend sends to
    the client side (a L{TCPBalancerProtocol}).
    """

    # Connected before any method below runs (see twisted_slb._typing).
    transport: IStreamTransport

    def __init__(self, relay: TCPBalancerProtocol) -> None:
        self.relay = relay

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        self.relay.backend_connected(self)

    def dataReceived(self, data: bytes) -> None:
        relay = self.relay
        n = len(data)
        relay.bytes_to_client += n
        assert relay.backend is not None  # set before backend_connected hands over this protocol
        relay.backend.bytes_in += n
        relay.last_activity = relay.seconds()
        write_now(relay.transport, data)

    def readConnectionLost(self) -> None:
        self.relay.backend_read_closed()

    def writeConnectionLost(self) -> None:
        pass  # we half-closed it ourselves (TCPBalancerProtocol.readConnectionLost)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.relay.backend_lost(reason)


class _BackendConnector(ClientFactory):
    """
    Connects one backend for one client connection.

    A plain C{ClientFactory} for C{reactor.connectTCP}: no endpoint and no
    L{Deferred} per attempt, which keeps the per-connection cost low.
    """

    noisy = False

    def __init__(self, relay: TCPBalancerProtocol, backend: Backend) -> None:
        self.relay = relay
        self.backend = backend

    def buildProtocol(self, addr) -> _BackendProtocol:
        proto = _BackendProtocol(self.relay)
        proto.factory = self
        return proto

    def clientConnectionFailed(self, connector, reason) -> None:
        self.relay.backend_failed(self.backend, reason)


@implementer(IHalfCloseableProtocol)
class TCPBalancerProtocol(Protocol):
    """
    One client connection of a L{TCPBalancerFactory}.

    @ivar session: the L{Session}: client address, pin, persistence outcome.
    @ivar backend: the backend this connection is relayed to, once connected.
    @ivar backend_protocol: the connection to the backend, once made (and
        until both sides are closed).
    @ivar tried: the backends tried so far (connect failures, then the one
        that answered).
    @ivar bytes_from_client: bytes the client sent (relayed to the backend).
    @ivar bytes_to_client: bytes the backend sent (relayed to the client).
    @ivar ended: why the connection ended (the first reason wins), for the
        access log.
    """

    # Connected before any method below runs (see twisted_slb._typing).
    transport: IStreamTransport

    backend: Optional[Backend] = None
    backend_protocol: Optional[_BackendProtocol] = None
    connector = None
    ended: Optional[str] = None
    pinned_at = 0.0

    def __init__(self, factory: TCPBalancerFactory, address=None) -> None:
        """
        @param address: the client's address, as the listening port gave
            it to C{buildProtocol}; L{None} to ask the transport.
        """
        self.factory = factory
        self.address = address
        self.seconds = factory.reactor.seconds
        self.tried: List[Backend] = []
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.client_eof = False
        self.backend_eof = False
        self.first_eof: Optional[str] = None
        self.closed = False
        self.backend_gone = False
        self.early: List[bytes] = []
        self.early_bytes = 0
        self.early_paused = False
        self.started = self.last_activity = self.seconds()

    def end(self, why: str) -> None:
        """Record why the connection ends, unless a reason is known already."""
        if self.ended is None:
            self.ended = why

    # -- client side -------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        factory.active += 1
        factory.total += 1
        factory.admission.add(self)
        transport = self.transport
        # What the client sends before a backend is connected is kept (see
        # dataReceived), up to EARLY_BYTES; pausing the socket at once
        # instead would cost two epoll_ctl calls on every connection.
        set_nodelay(transport)
        peer = self.address or transport.getPeer()
        session = self.session = Session(normalise_ip(getattr(peer, "host", None) or "0.0.0.0"))
        policy = factory.policy
        if policy is not None:
            session.policy = policy
            try:
                found = policy.find(session)
            except Exception:
                # A broken policy costs its pin, not the client's connection.
                found = None
                log.failure("listener {listener}: persistence policy {policy!r} failed to find a pin",
                            listener=factory.listener_name, policy=policy)
            if isinstance(found, Deferred):
                # A shared table asks its store (bounded by the store's
                # timeout); what the client sends meanwhile is kept in early.
                found.addCallback(self._pin_found)
                return
            session.pinned_key = found
        self.connect_next()

    def _pin_found(self, key: Optional[str]) -> None:
        if self.closed:
            return  # the client left while its pin was looked up
        self.session.pinned_key = key
        self.connect_next()

    def connect_next(self) -> None:
        """Connect the next backend, or close the client if none is left."""
        factory = self.factory
        group = factory.group
        backend = None
        if len(self.tried) <= group.retries:
            backend = group.route(self.session, self.tried)
        if backend is None:
            if strict_refusal(self.session):
                self.refuse_pinned()
                return
            why = "every backend tried failed" if self.tried else "no backend available"
            self.end(why)
            factory.no_backend += 1
            log.warn(
                "listener {listener}: no backend for client {client}: {why}",
                listener=factory.listener_name, client=self.session.client_ip, why=why,
            )
            self.transport.loseConnection()
            return
        self.tried.append(backend)
        connector = _BackendConnector(self, backend)
        if factory.lean:
            self.connector = lean.connect(factory.reactor, backend.host, backend.port, connector,
                                          group.connect_timeout, factory.connect_timeouts)
        else:
            self.connector = factory.reactor.connectTCP(backend.host, backend.port, connector,
                                                        timeout=group.connect_timeout)

    def refuse_pinned(self) -> None:
        """
        Strict persistence: the client's backend is down or refused it, and
        the client is not moved to another: its connection is closed, its
        pin kept.
        """
        factory = self.factory
        session = self.session
        pinned = factory.group.get(session.pinned_key or "")
        name = pinned.name if pinned is not None else session.pinned_key
        self.end(f"pinned backend {name} down or refused (on_failure = strict)")
        log.info(
            "listener {listener}: client {client} is pinned to backend {backend}, which is down or refused; "
            "closing (on_failure = strict)",
            listener=factory.listener_name, client=session.client_ip, backend=name,
        )
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.backend_protocol is None:
            # No backend yet: keep it for when one is connected, and stop
            # reading past EARLY_BYTES.  (A paused wrapping transport, TLS,
            # may still hand over what it had already decrypted.)
            self.early.append(data)
            self.early_bytes += len(data)
            if self.early_bytes > EARLY_BYTES and not self.early_paused:
                self.early_paused = True
                self.transport.pauseProducing()
            return
        n = len(data)
        self.bytes_from_client += n
        assert self.backend is not None  # set with backend_protocol (backend_connected)
        self.backend.bytes_out += n
        self.last_activity = self.seconds()
        write_now(self.backend_protocol.transport, data)

    def readConnectionLost(self) -> None:
        # The client will send no more: pass the half-close on, keep relaying
        # the backend's answer.
        if self.client_eof:
            return
        self.client_eof = True
        if self.first_eof is None:
            self.first_eof = "client closed"
        if self.backend_protocol is None:
            return  # passed on once the backend is connected
        backend_transport = self.backend_protocol.transport
        # The client's side produces nothing more: stop pausing and resuming
        # it (a resumed transport would read its end of file again).
        backend_transport.unregisterProducer()
        if self.backend_eof:
            # Both ends are done: closing sends the end of file, no
            # shutdown before it (one system call fewer per connection).
            self.close(self.first_eof)
        else:
            half_close(backend_transport)

    def writeConnectionLost(self) -> None:
        pass  # we half-closed it ourselves (backend_read_closed)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.closed:
            return
        self.closed = True
        factory = self.factory
        factory.active -= 1
        factory.admission.release()
        factory.checks.discard(self)
        backend_protocol = self.backend_protocol
        if backend_protocol is not None:
            assert self.backend is not None  # set with backend_protocol (backend_connected)
            self.backend.active -= 1
            if factory.pin_refresh:
                self.refresh_pin()  # the pin's timeout counts from the end of the connection
        elif self.connector is not None:
            # The client left while a backend was still connecting.
            self.end("client closed before a backend was connected")
            connector, self.connector = self.connector, None
            connector.disconnect()
        # isinstance rather than Failure.check, which compares the qualified
        # names of the exception's classes: this runs for every connection.
        if reason is None or isinstance(reason.value, error.ConnectionDone):
            self.end(self.first_eof or "client closed")
        else:
            self.end(f"client connection lost: {reason.getErrorMessage()}")
        # Logged before the backend's connection is closed: that close may
        # be immediate and end a graceful shutdown, which closes the log.
        self.log_access()
        if backend_protocol is not None:
            backend_protocol.transport.loseConnection()
        if backend_protocol is None or self.backend_gone:
            self.forget()

    def forget(self) -> None:
        """Both connections are closed: the factory is done with this one."""
        factory = self.factory
        if self not in factory.connections:
            return
        # Both sides are closed: without this cycle, reference counting
        # frees the relay and its backend side (no garbage collection).
        self.backend_protocol = None
        factory.admission.forget(self)

    # -- backend side ----------------------------------------------------------

    def backend_failed(self, backend: Backend, reason) -> None:
        """A connect to C{backend} failed: count it and try the next one."""
        self.connector = None
        if self.closed:
            # We gave up on it because the client left: not its failure.
            return
        why = "timed out" if reason.check(error.TimeoutError) else reason.getErrorMessage()
        if local_failure(reason):
            why += " (a shortage in this process, not counted against the backend)"
        else:
            backend.record_failure(f"connect {why}")
        log.warn(
            "listener {listener}: connect to backend {backend} ({address}) for client {client} failed: {why}",
            listener=self.factory.listener_name, backend=backend.name, address=backend.address,
            client=self.session.client_ip, why=why,
        )
        self.connect_next()

    def backend_connected(self, backend_protocol: _BackendProtocol) -> None:
        """The backend answered: record the pin, then relay both ways."""
        self.connector = None
        if self.closed:
            backend_protocol.transport.loseConnection()
            return
        factory = self.factory
        session = self.session
        backend = self.tried[-1]
        session.backend = self.backend = backend
        self.backend_protocol = backend_protocol
        backend.record_success()
        backend.active += 1
        backend.total += 1
        if session.policy is not None:
            try:
                session.policy.remember(session, backend)
            except Exception:
                log.failure("listener {listener}: persistence policy {policy!r} failed to remember a pin",
                            listener=factory.listener_name, policy=session.policy)
        client_transport = self.transport
        backend_transport = backend_protocol.transport
        if factory.proxy_protocol:
            backend_transport.write(
                proxy_header(factory.proxy_protocol, client_transport.getPeer(), client_transport.getHost())
            )
        # Each side is the producer of the other: a slow reader pauses the
        # fast writer instead of growing a buffer.
        client_transport.registerProducer(backend_transport, True)
        backend_transport.registerProducer(client_transport, True)
        self.last_activity = self.pinned_at = self.seconds()
        first_check = factory.first_check
        if first_check:
            factory.checks.add(self, first_check)
        if self.early:
            early, self.early = self.early, []
            for data in early:
                self.dataReceived(data)
        if self.client_eof:
            self.client_eof = False
            self.readConnectionLost()
        if self.early_paused and not self.client_eof:
            self.early_paused = False
            client_transport.resumeProducing()

    def backend_read_closed(self) -> None:
        """The backend will send no more: half-close the client's side."""
        if self.backend_eof or self.closed:
            return
        self.backend_eof = True
        if self.first_eof is None:
            self.first_eof = "backend closed"
        self.transport.unregisterProducer()
        if self.client_eof:
            self.close(self.first_eof)  # as in readConnectionLost
        else:
            half_close(self.transport)

    def backend_lost(self, reason) -> None:
        """The backend connection is gone: the client's goes too."""
        self.backend_gone = True
        if self.closed:
            self.forget()
            return
        if isinstance(reason.value, error.ConnectionDone):
            self.end(self.first_eof or "backend closed")
        else:
            self.end(f"backend connection lost: {reason.getErrorMessage()}")
        self.transport.loseConnection()

    # -- idle timeout --------------------------------------------------------

    def check_idle(self) -> None:
        # One check per connection, re-armed for the time left, rather than
        # a timer reset on every chunk of data: the relay path only stores a
        # timestamp.  The same check keeps the client's pin alive while the
        # connection is open (the policy's refresh_interval).  The checks
        # of all connections share one timer (factory.checks).
        if self.closed:
            return
        factory = self.factory
        now = self.seconds()
        timeout = factory.idle_timeout
        idle = now - self.last_activity
        if timeout and idle >= timeout:
            assert self.backend is not None  # checks start in backend_connected, after it is set
            log.info(
                "listener {listener}: closing connection of {client} to {backend}: idle for {timeout} s",
                listener=factory.listener_name, client=self.session.client_ip,
                backend=self.backend.name, timeout=timeout,
            )
            self.close("idle timeout")
            return
        interval = factory.pin_refresh
        if interval and now - self.pinned_at >= interval:
            self.refresh_pin()
        waits = []
        if timeout:
            waits.append(timeout - idle)
        if interval:
            waits.append(self.pinned_at + interval - now)
        factory.checks.add(self, min(waits))

    def refresh_pin(self) -> None:
        """Tell the policy (if it cares) that this client still uses its backend."""
        self.pinned_at = self.seconds()
        refresh = getattr(self.session.policy, "refresh", None)
        if refresh is None or self.backend is None:
            return
        try:
            refresh(self.session, self.backend)
        except Exception:
            log.failure("listener {listener}: persistence policy {policy!r} failed to refresh a pin",
                        listener=self.factory.listener_name, policy=self.session.policy)

    def close(self, why: str) -> None:
        """Close both sides (pending data is still delivered)."""
        self.end(why)
        close(self.transport)
        if self.backend_protocol is not None:
            close(self.backend_protocol.transport)

    # -- accounting ----------------------------------------------------------

    def log_access(self) -> None:
        factory = self.factory
        session = self.session
        backend = self.backend
        if factory.access_log:
            listener = factory.listener_name
            client = session.client_ip
            name = backend.name if backend else "-"
            address = backend.address if backend else "-"
            outcome = session.outcome
            duration = self.seconds() - self.started
            line = (f"{listener} {client} -> {name} ({address}) persistence={outcome} "
                    f"from_client={self.bytes_from_client} to_client={self.bytes_to_client} "
                    f"{duration:.3f}s {self.ended}")
            access_file = factory.access_file
            if access_file is None or not access_file.write_line(line):
                access.info("{line}", line=line, listener=listener, client=client, backend=name,
                            backend_address=address, outcome=outcome, bytes_from_client=self.bytes_from_client,
                            bytes_to_client=self.bytes_to_client, duration=duration, ended=self.ended)
        stats = factory.stats
        if stats is not None:
            stats.connection_done(backend, session.outcome, self.bytes_from_client, self.bytes_to_client)


@implementer(IListenerFactory)
class TCPBalancerFactory(ServerFactory):
    """
    A server factory that balances TCP connections over a L{BackendGroup}.

    Listen on it with any stream endpoint
    (C{serverFromString(reactor, "tcp:8081").listen(factory)}).

    @ivar group: the backends.
    @ivar policy: the L{IPersistencePolicy} (or L{None} for none).
    @ivar reactor: provides C{connectTCP} and L{IReactorTime}.
    @ivar idle_timeout: seconds a proxied connection may go without data in
        either direction before both sides are closed (0: never).
    @ivar proxy_protocol: C{"v1"}, C{"v2"} or L{None}: send a PROXY protocol
        header to the backend first.
    @ivar listener_name: the name in logs and stats.
    @ivar active: client connections open now.
    @ivar total: client connections ever accepted.
    @ivar no_backend: client connections closed because no backend could
        take them.
    @ivar admission: the L{twisted_slb.limits.IConnectionAdmission} of its
        connections: C{max_connections} and the drain on stop.
    @ivar limit: the admission's L{ConnectionLimit}.
    @ivar connections: the L{TCPBalancerProtocol}s whose client or backend
        connection is still open (a graceful shutdown waits for them; the
        admission's set).
    @ivar stats: an object with C{connection_done(backend, outcome,
        bytes_in, bytes_out)}, or L{None}.
    @ivar access_log: whether to log one line per connection.
    @ivar lean: whether backend connections use L{twisted_slb._io.lean}'s
        transports where they can (and, through
        L{twisted_slb.service.ListenerService}, accepted client
        connections); C{False} keeps Twisted's own everywhere.
    """

    noisy = False
    protocol = TCPBalancerProtocol

    def __init__(
        self,
        group: BackendGroup,
        policy: Optional[IPersistencePolicy] = None,
        reactor=None,
        idle_timeout: float = 900.0,
        proxy_protocol: Optional[str] = None,
        listener_name: str = "tcp",
        stats=None,
        max_connections: int = 0,
        access_log: bool = True,
        limit: Optional[ConnectionLimit] = None,
        access_file=None,
        lean: bool = True,
    ) -> None:
        """
        @param group: the backends to balance over.
        @param policy: the persistence policy, or L{None} for none.
        @param reactor: the reactor (C{connectTCP} and L{IReactorTime});
            the global one by default.
        @param idle_timeout: seconds without data either way before a
            connection is closed; 0 for never.
        @param proxy_protocol: C{"v1"} or C{"v2"} to send a PROXY protocol
            header to the backend, L{None} not to.
        @param listener_name: the name in logs and stats.
        @param stats: receives C{connection_done(...)} once per connection.
        @param max_connections: the most client connections open at once;
            0 for no limit.
        @param access_log: whether to log one line per connection.
        @param access_file: a L{twisted_slb.accesslog.AccessLogFile} or
            L{twisted_slb.accesslog.TwistdLog} for the lines (when its
            C{write_line} returns C{False}, or with L{None}: log events in
            the namespace C{twisted_slb.access}).
        @param lean: whether to use L{twisted_slb._io.lean}'s transports where
            they can be (a POSIX reactor, backends given by IP address).
        @param limit: a L{ConnectionLimit} to count connections against
            (shared with the global limit and kept across reloads by
            L{twisted_slb.service.BalancerService}); by default one of
            C{max_connections} that closes connections over it.
        @raise ValueError: C{proxy_protocol} or C{idle_timeout} is invalid.
        """
        reactor = maybe_global_reactor(reactor)
        if proxy_protocol is not None and proxy_protocol not in PROXY_PROTOCOL_VERSIONS:
            raise ValueError(f"proxy_protocol must be None, 'v1' or 'v2', not {proxy_protocol!r}")
        if idle_timeout < 0:
            raise ValueError(f"idle_timeout must be 0 (never) or a positive number of seconds, not {idle_timeout!r}")
        self.group = group
        self.policy = policy
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.proxy_protocol = proxy_protocol
        self.listener_name = listener_name
        self.stats = stats
        self.active = 0
        self.total = 0
        self.no_backend = 0
        self.admission = ConnectionAdmission(
            limit if limit is not None else ConnectionLimit(max_connections, listener_name), reactor=reactor
        )
        self.limit = self.admission.limit
        self.connections: Set[TCPBalancerProtocol] = self.admission.connections
        # Every connection's next idle / pin check, behind one timer.
        self.checks = Deadlines(reactor, TCPBalancerProtocol.check_idle)
        # The timeouts of lean backend connects, behind one timer too.
        self.connect_timeouts = Deadlines(reactor, LeanConnector.timed_out)
        self.access_log = access_log
        self.access_file = access_file
        self.lean = lean
        # A policy with refresh() (source IP) keeps the pins of open
        # connections alive; see TCPBalancerProtocol.check_idle.
        self.pin_refresh = getattr(policy, "refresh_interval", None) if hasattr(policy, "refresh") else None

    @property
    def first_check(self) -> float:
        """Seconds from a connect to its first idle / pin check (0: none)."""
        idle, refresh = self.idle_timeout, self.pin_refresh
        if idle and refresh:
            return min(idle, refresh)
        return idle or refresh or 0

    def buildProtocol(self, addr) -> Optional[Protocol]:
        return self.admission.build(None, TCPBalancerProtocol, self, addr)

    def retire(self, grace: float) -> None:
        """A reload replaced this factory: its relayed connections carry on as they are."""

    def drain(self, grace: float) -> Deferred:
        """
        Let open connections finish, for at most C{grace} seconds, then
        close the rest (graceful shutdown; call after the port stopped
        listening).

        @return: a L{Deferred} that fires when no connection is left.
        """
        return self.admission.drain(grace, lambda proto: cast(TCPBalancerProtocol, proto).close("shutdown"))
