"""
The layer-4 listener: a TCP relay that balances connections over a backend
group and keeps each client on one backend through a persistence policy
(normally L{twisted_slb.persistence.sourceip.SourceIPPersistence}).

Embedding::

    group = BackendGroup("web", [Backend("a", "10.0.0.1", 8080), Backend("b", "10.0.0.2", 8080)])
    policy = SourceIPPersistence(StickTable(timeout=1000))
    factory = TCPBalancerFactory(group, policy)
    serverFromString(reactor, "tcp:8081").listen(factory)

Data flow: the client's connection is paused at once (nothing is read before
a backend is connected); its pin (if any) or the scheduler names a backend;
a failed connect is counted against that backend and the next one is tried
(C{group.retries} times) without the client noticing; once connected, the
pin is recorded and bytes are relayed both ways, each transport registered
as the producer of the other, so that a fast sender to a slow receiver is
paused rather than buffered.  Half-closes are passed through.
"""

from __future__ import annotations

import socket
import struct
from typing import List, Optional, Set

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.logger import Logger
from zope.interface import implementer

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.limits import ConnectionLimit
from twisted_slb.persistence.interfaces import IPersistencePolicy, Session, normalise_ip
from twisted_slb.shutdown import IdleTracker
from twisted_slb.web.upstream import set_nodelay

log = Logger(namespace="twisted_slb.tcp")
access = Logger(namespace="twisted_slb.access")

_PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_header(version: str, client, local) -> bytes:
    """
    The PROXY protocol header (v1 text or v2 binary) announcing a TCP
    connection from C{client} to C{local} (both L{IPv4Address} or
    L{IPv6Address}), so that a backend sees the real client address.
    """
    v6 = ":" in client.host or ":" in local.host
    src = client.host
    dst = local.host
    if v6:
        src = src if ":" in src else "::ffff:" + src
        dst = dst if ":" in dst else "::ffff:" + dst
    if version == "v1":
        family = "TCP6" if v6 else "TCP4"
        return f"PROXY {family} {src} {dst} {client.port} {local.port}\r\n".encode("ascii")
    if v6:
        addresses = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
        family = 0x21  # AF_INET6, STREAM
    else:
        addresses = socket.inet_aton(src) + socket.inet_aton(dst)
        family = 0x11  # AF_INET, STREAM
    body = addresses + struct.pack("!HH", client.port, local.port)
    # version 2, command PROXY (0x21)
    return _PROXY_V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body


@implementer(IHalfCloseableProtocol)
class _BackendProtocol(Protocol):
    """The balancer's connection to a backend: relays to the client side."""

    def __init__(self, client: TCPBalancerProtocol) -> None:
        self.client = client

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        self.client.backend_connected(self)

    def dataReceived(self, data: bytes) -> None:
        client = self.client
        client.bytes_to_client += len(data)
        client.last_activity = client.clock.seconds()
        client.transport.write(data)

    def readConnectionLost(self) -> None:
        self.client.backend_read_closed()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self.client.backend_lost(reason)


class _BackendConnector(ClientFactory):
    """Connects one backend for one client; failures go back to the client."""

    noisy = False

    def __init__(self, client: TCPBalancerProtocol, backend: Backend) -> None:
        self.client = client
        self.backend = backend

    def buildProtocol(self, addr):
        proto = _BackendProtocol(self.client)
        proto.factory = self
        return proto

    def clientConnectionFailed(self, connector, reason) -> None:
        self.client.backend_failed(self.backend, reason)


@implementer(IHalfCloseableProtocol)
class TCPBalancerProtocol(Protocol):
    """
    One client connection of a L{TCPBalancerFactory}.

    @ivar session: the L{Session}: client address, pin, chosen backend.
    @ivar backend_protocol: the connection to the backend, once made.
    """

    backend_protocol: Optional[_BackendProtocol] = None
    connector = None
    ended_by = "client closed"

    def __init__(self, factory: TCPBalancerFactory) -> None:
        self.factory = factory
        self.clock = factory.reactor
        self.tried: List[Backend] = []
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.client_read_closed = False
        self.backend_read_closed_ = False
        self.closed = False
        self.idle_call = None
        self.started = self.last_activity = self.clock.seconds()

    # -- client side -------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        factory.active += 1
        factory.total += 1
        factory.connections.add(self)
        self.transport.pauseProducing()
        set_nodelay(self.transport)
        peer = self.transport.getPeer()
        self.session = Session(normalise_ip(getattr(peer, "host", "") or "0.0.0.0"))
        policy = factory.policy
        if policy is not None:
            self.session.policy = policy
            self.session.pinned_key = policy.find(self.session)
        self.connect_next()

    def connect_next(self) -> None:
        group = self.factory.group
        if len(self.tried) > group.retries:
            backend = None
        else:
            backend = group.route(self.session, self.tried)
        if backend is None:
            self.ended_by = "no backend available" if not self.tried else "every backend tried failed"
            log.warn(
                "listener {listener}: no backend for client {client}: {why}",
                listener=self.factory.listener_name, client=self.session.client_ip, why=self.ended_by,
            )
            self.transport.loseConnection()
            return
        self.session.backend = backend
        self.tried.append(backend)
        self.connector = self.factory.reactor.connectTCP(
            backend.host, backend.port, _BackendConnector(self, backend), timeout=group.connect_timeout
        )

    def dataReceived(self, data: bytes) -> None:
        self.bytes_from_client += len(data)
        self.last_activity = self.clock.seconds()
        self.backend_protocol.transport.write(data)

    def readConnectionLost(self) -> None:
        # The client will send no more: pass the half-close on.
        self.client_read_closed = True
        if self.backend_protocol is not None:
            self.backend_protocol.transport.loseWriteConnection()
            if self.backend_read_closed_:
                self.close("both sides closed")

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        if self.closed:
            return
        self.closed = True
        factory = self.factory
        factory.active -= 1
        factory.connections.discard(self)
        if self.idle_call is not None and self.idle_call.active():
            self.idle_call.cancel()
        backend_protocol = self.backend_protocol
        if backend_protocol is not None:
            backend = self.session.backend
            backend.active -= 1
            backend.bytes_out += self.bytes_from_client
            backend.bytes_in += self.bytes_to_client
            backend_protocol.transport.loseConnection()
        elif self.connector is not None:
            # The client left while we were still connecting.
            self.connector.disconnect()
            self.ended_by = "client closed before a backend was connected"
        self.log_access()
        if not factory.connections:
            factory.tracker.idle()

    # -- backend side ----------------------------------------------------------

    def backend_failed(self, backend: Backend, reason) -> None:
        self.connector = None
        why = "timed out" if reason.check(error.TimeoutError) else reason.getErrorMessage()
        backend.record_failure(f"connect {why}")
        log.warn(
            "listener {listener}: connect to backend {backend} ({address}) failed: {why}",
            listener=self.factory.listener_name, backend=backend.name, address=backend.address, why=why,
        )
        if self.closed:
            return
        self.connect_next()

    def backend_connected(self, backend_protocol: _BackendProtocol) -> None:
        self.connector = None
        backend = self.session.backend
        if self.closed:
            backend_protocol.transport.loseConnection()
            return
        self.backend_protocol = backend_protocol
        backend.record_success()
        backend.active += 1
        backend.total += 1
        session = self.session
        if session.policy is not None:
            session.policy.remember(session, backend)
        backend_transport = backend_protocol.transport
        if self.factory.proxy_protocol:
            backend_transport.write(
                proxy_header(self.factory.proxy_protocol, self.transport.getPeer(), self.transport.getHost())
            )
        # Each side is the producer of the other: a slow reader pauses the
        # fast writer instead of growing a buffer.
        self.transport.registerProducer(backend_transport, True)
        backend_transport.registerProducer(self.transport, True)
        self.transport.resumeProducing()
        timeout = self.factory.idle_timeout
        if timeout:
            self.idle_call = self.clock.callLater(timeout, self.check_idle)

    def backend_read_closed(self) -> None:
        self.backend_read_closed_ = True
        self.transport.loseWriteConnection()
        if self.client_read_closed:
            self.close("both sides closed")

    def backend_lost(self, reason) -> None:
        if not self.closed:
            if not reason.check(error.ConnectionDone):
                self.ended_by = f"backend connection lost: {reason.getErrorMessage()}"
            elif not self.client_read_closed:
                self.ended_by = "backend closed"
            self.transport.loseConnection()

    # -- idle timeout --------------------------------------------------------

    def check_idle(self) -> None:
        # One timer per connection, re-armed for the remaining time rather
        # than reset on every chunk of data.
        idle = self.clock.seconds() - self.last_activity
        timeout = self.factory.idle_timeout
        if idle >= timeout:
            self.idle_call = None
            log.info(
                "listener {listener}: closing idle connection of {client} after {timeout} s",
                listener=self.factory.listener_name, client=self.session.client_ip, timeout=timeout,
            )
            self.close("idle timeout")
        else:
            self.idle_call = self.clock.callLater(timeout - idle, self.check_idle)

    def close(self, why: str) -> None:
        self.ended_by = why
        self.transport.loseConnection()
        if self.backend_protocol is not None:
            self.backend_protocol.transport.loseConnection()

    def log_access(self) -> None:
        session = self.session
        backend = session.backend if self.backend_protocol is not None else None
        if self.factory.access_log:
            self._log_line(session, backend)
        stats = self.factory.stats
        if stats is not None:
            stats.connection_done(backend, session.outcome, self.bytes_from_client, self.bytes_to_client)

    def _log_line(self, session, backend) -> None:
        access.info(
            "{listener} {client} -> {backend} ({address}) persistence={outcome} "
            "in={bytes_in} out={bytes_out} {duration:.3f}s {ended}",
            listener=self.factory.listener_name,
            client=session.client_ip,
            backend=backend.name if backend else "-",
            address=backend.address if backend else "-",
            outcome=session.outcome,
            bytes_in=self.bytes_from_client,
            bytes_out=self.bytes_to_client,
            duration=self.clock.seconds() - self.started,
            ended=self.ended_by,
        )


class TCPBalancerFactory(ServerFactory):
    """
    A server factory that balances TCP connections over a L{BackendGroup}.

    @ivar group: the backends.
    @ivar policy: the L{IPersistencePolicy} (or L{None} for none).
    @ivar idle_timeout: seconds a proxied connection may be idle (0: never).
    @ivar proxy_protocol: C{"v1"}, C{"v2"} or L{None}: send a PROXY protocol
        header to the backend first.
    @ivar active: client connections open now.
    @ivar total: client connections ever accepted.
    @ivar stats: an object with C{connection_done(backend, outcome,
        bytes_in, bytes_out)}, or L{None}.
    @ivar access_log: whether to log one line per connection.
    """

    noisy = False

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
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        if proxy_protocol not in (None, "v1", "v2"):
            raise ValueError(f"proxy_protocol must be None, 'v1' or 'v2', not {proxy_protocol!r}")
        self.group = group
        self.policy = policy
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.proxy_protocol = proxy_protocol
        self.listener_name = listener_name
        self.stats = stats
        self.active = 0
        self.total = 0
        self.connections: Set[TCPBalancerProtocol] = set()
        self.tracker = IdleTracker()
        self.limit = ConnectionLimit(max_connections, listener_name)
        self.access_log = access_log

    def buildProtocol(self, addr) -> Optional[TCPBalancerProtocol]:
        if not self.limit.admit(self.active):
            return None  # the port closes the new connection at once
        return TCPBalancerProtocol(self)

    def drain(self, grace: float) -> Deferred:
        """
        Let open connections finish, for at most C{grace} seconds, then
        close the rest (graceful shutdown; call after the port stopped
        listening).

        @return: a L{Deferred} that fires when no connection is left.
        """
        def force() -> None:
            for proto in list(self.connections):
                proto.close("shutdown")

        return self.tracker.wait(not self.connections, grace, force, self.reactor)
