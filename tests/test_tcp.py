"""
Tests for L{twisted_slb.tcp}.

In memory (L{MemoryReactorClock} and L{StringTransport}s): connect attempts,
retries, persistence outcomes, relaying, back-pressure, half-close, idle
timeout, the access log and the PROXY protocol header.  Over real loopback
sockets: clients bound to different source addresses in 127.0.0.0/8 stay on
their backends, and move (and stay) when their backend goes away.
"""

from __future__ import annotations

from typing import Dict, List, Set

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError, TimeoutError, UserError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_slb import tcp
from twisted_slb._io import lean
from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.persistence.interfaces import IPersistencePolicy
from twisted_slb.persistence.sourceip import SourceIPPersistence, StickTable
from twisted_slb.scheduling import RoundRobin
from twisted_slb.tcp import EARLY_BYTES, TCPBalancerFactory, proxy_header

CLIENT = IPv4Address("TCP", "192.0.2.7", 5555)
LOCAL = IPv4Address("TCP", "127.0.0.1", 8081)


@implementer(IPersistencePolicy)
class DictPolicy:
    """A persistence policy over a dict, recording what it was told."""

    name = "dict"

    def __init__(self) -> None:
        self.pins: Dict[str, str] = {}
        self.remembered: List[tuple] = []

    def find(self, session):
        return self.pins.get(session.client_ip)

    def remember(self, session, backend):
        self.remembered.append((session.client_ip, backend.name, session.outcome))
        self.pins[session.client_ip] = backend.id


class HalfCloseTransport(StringTransport):
    """A L{StringTransport} that records half-closes."""

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


class SlowTransport(HalfCloseTransport):
    """
    A consumer with a small buffer, as a TCP transport behaves towards a slow
    peer: it pauses its streaming producer when more than C{high_water}
    bytes wait, and resumes it when drained.
    """

    high_water = 16
    paused_producer = False

    def write(self, data):
        super().write(data)
        if self.producer is not None and self.streaming and not self.paused_producer:
            if len(self.value()) > self.high_water:
                self.paused_producer = True
                self.producer.pauseProducing()

    def drain(self) -> bytes:
        data = self.value()
        self.clear()
        if self.paused_producer:
            self.paused_producer = False
            self.producer.resumeProducing()
        return data


class RelayCase(SynchronousTestCase):
    """A factory over backends C{a} and C{b} (round robin), in memory."""

    backends = (("a", "10.0.0.1", 81), ("b", "10.0.0.2", 82))
    retries = 1

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.group = BackendGroup(
            "g", [Backend(*b) for b in self.backends], scheduler=RoundRobin(), connect_timeout=2.5,
            retries=self.retries,
        )
        self.policy = DictPolicy()
        self.access: List[dict] = []
        self.patch(tcp, "access", Logger(namespace="twisted_slb.access", observer=self.access.append))
        self.factory = self.make_factory()

    def make_factory(self, **kwargs):
        kwargs.setdefault("policy", self.policy)
        return TCPBalancerFactory(self.group, reactor=self.reactor, idle_timeout=30, **kwargs)

    def client(self, host="192.0.2.7", factory=None, transport_class=HalfCloseTransport):
        factory = factory or self.factory
        peer = IPv4Address("TCP", host, 5555)
        proto = factory.buildProtocol(peer)
        transport = transport_class(peerAddress=peer, hostAddress=LOCAL)
        proto.makeConnection(transport)
        return proto, transport

    def fail_connect(self, index=-1, reason=None):
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(self.reactor.connectors[index], Failure(reason or ConnectionRefusedError()))

    def backend_connects(self, index=-1, transport_class=HalfCloseTransport):
        factory = self.reactor.tcpClients[index][2]
        proto = factory.buildProtocol(None)
        transport = transport_class()
        proto.makeConnection(transport)
        return proto, transport


class ConnectTests(RelayCase):
    def test_clientPausedPastEarlyBytesUntilBackendConnected(self):
        """
        What the client sends before a backend is connected waits for it;
        past EARLY_BYTES, reading from the client pauses until then.
        """
        proto, transport = self.client()
        self.assertEqual(transport.producerState, "producing")
        proto.dataReceived(b"x" * EARLY_BYTES)
        self.assertEqual(transport.producerState, "producing")
        proto.dataReceived(b"y")
        self.assertEqual(transport.producerState, "paused")
        backend_proto, backend = self.backend_connects()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(backend.value(), b"x" * EARLY_BYTES + b"y")

    def test_connectsToChosenBackendWithGroupTimeout(self):
        """A TCP client makes a connection to the chosen backend with the group's connect timeout."""
        self.client()
        host, port, _, timeout, _ = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("10.0.0.1", 81, 2.5))

    def test_retryOnConnectFailureIsInvisible(self):
        """A refused connect goes to the next backend; the client sees nothing."""
        proto, client = self.client()
        self.fail_connect()
        self.assertEqual(self.reactor.tcpClients[1][:2], ("10.0.0.2", 82))
        backend_proto, backend = self.backend_connects()
        proto.dataReceived(b"ping")
        self.assertEqual(backend.value(), b"ping")
        self.assertFalse(client.disconnecting)
        self.assertEqual(client.value(), b"")

    def test_connectFailureIsCountedOnTheBackend(self):
        """A failed connect is counted on that backend and reported to its health monitor with the reason."""
        reasons = []

        class Monitor:
            def failure(self, backend, reason):
                reasons.append((backend.name, reason))

            def success(self, backend):
                pass

        self.group.get("a").monitor = Monitor()
        self.client()
        self.fail_connect(reason=TimeoutError())
        self.assertEqual((self.group.get("a").failures, self.group.get("b").failures), (1, 0))
        self.assertEqual(reasons, [("a", "connect timed out")])

    def test_outOfDescriptorsIsNotTheBackendsFailure(self):
        """A connect that fails for lack of descriptors here does not count against the backend."""
        import errno

        from twisted.internet.error import ConnectBindError

        self.client()
        self.fail_connect(reason=ConnectBindError(errno.EMFILE, "Too many open files"))
        self.assertEqual(self.group.get("a").failures, 0)
        self.assertEqual(self.reactor.tcpClients[1][:2], ("10.0.0.2", 82))  # still tries the next

    def test_noBackendLeftClosesTheClient(self):
        """
        Once every backend was tried (once each, however many retries), the client is closed and the access
        log says why.
        """
        self.group.retries = 5
        proto, client = self.client()
        self.fail_connect()
        self.fail_connect()
        self.assertEqual(len(self.reactor.tcpClients), 2)  # every backend, once
        self.assertTrue(client.disconnecting)
        self.assertEqual(self.factory.no_backend, 1)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.access[0]["ended"], "every backend tried failed")
        self.assertEqual(self.access[0]["backend"], "-")

    def test_retriesAreBounded(self):
        """C{retries = 1}: two backends are tried, never a third."""
        self.group = BackendGroup("g", [Backend(n, "10.0.0.9", p) for n, p in (("a", 1), ("b", 2), ("c", 3))],
                                  retries=1)
        proto, client = self.client(factory=self.make_factory())
        self.fail_connect()
        self.fail_connect()
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertTrue(client.disconnecting)

    def test_emptyGroupClosesTheClient(self):
        """A group without backends closes the client without connecting anywhere."""
        self.group = BackendGroup("g", [])
        proto, client = self.client(factory=self.make_factory())
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertTrue(client.disconnecting)

    def test_clientLeavingWhileConnectingIsNotABackendFailure(self):
        """
        A client leaving while its backend connection is being made stops the attempt, which is not counted
        against the backend.
        """
        proto, client = self.client()
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.reactor.connectors[0]._disconnected)
        # A real connector reports the stopped attempt as a failed connect.
        self.fail_connect(reason=UserError())
        self.assertEqual(self.group.get("a").failures, 0)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(self.access[0]["ended"], "client closed before a backend was connected")
        self.assertEqual(self.factory.connections, set())


class PersistenceTests(RelayCase):
    def test_newClientIsRemembered(self):
        """A new client's backend is remembered by the policy, with the outcome "new"."""
        self.client()
        self.backend_connects()
        self.assertEqual(self.policy.remembered, [("192.0.2.7", "a", "new")])

    def test_pinHitIsRemembered(self):
        """A pinned client is connected to its backend and remembered as a hit."""
        self.policy.pins["192.0.2.7"] = self.group.get("b").id
        self.client()
        self.assertEqual(self.reactor.tcpClients[0][:2], ("10.0.0.2", 82))
        self.backend_connects()
        self.assertEqual(self.policy.remembered, [("192.0.2.7", "b", "hit")])

    def test_pinnedBackendFailingRepins(self):
        """A pinned backend failing to connect re-pins the client on the next one."""
        self.policy.pins["192.0.2.7"] = self.group.get("a").id
        self.client()
        self.fail_connect(reason=TimeoutError())
        self.backend_connects()
        self.assertEqual(self.policy.remembered, [("192.0.2.7", "b", "repin")])

    def test_noPolicyOutcomeIsNone(self):
        """Without a policy, the access log's outcome is "none"."""
        proto, _ = self.client(factory=self.make_factory(policy=None))
        self.backend_connects()
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.access[0]["outcome"], "none")

    def test_brokenPolicyCostsOnlyThePin(self):
        """A policy that raises is logged; the client is still served."""
        class Broken(DictPolicy):
            def find(self, session):
                raise RuntimeError("broken find")

            def remember(self, session, backend):
                raise RuntimeError("broken remember")

        proto, client = self.client(factory=self.make_factory(policy=Broken()))
        backend_proto, backend = self.backend_connects()
        proto.dataReceived(b"x")
        self.assertEqual(backend.value(), b"x")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_sourceIPPersistenceKeepsTheClient(self):
        """With L{SourceIPPersistence}, a client's next connection goes to the same backend."""
        policy = SourceIPPersistence(StickTable(timeout=1000, clock=self.reactor))
        verifyObject(IPersistencePolicy, policy)
        factory = self.make_factory(policy=policy)
        for _ in range(3):
            proto, _ = self.client(factory=factory)
            self.backend_connects()
            proto.connectionLost(Failure(ConnectionDone()))
        self.client(host="192.0.2.8", factory=factory)
        hosts = [c[0] for c in self.reactor.tcpClients]
        self.assertEqual(hosts, ["10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2"])
        self.assertEqual([e["outcome"] for e in self.access], ["new", "hit", "hit"])


class RelayTests(RelayCase):
    def test_bytesFlowBothWays(self):
        """Bytes from the client reach the backend and bytes from the backend reach the client."""
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        proto.dataReceived(b"hello")
        backend_proto.dataReceived(b"world")
        self.assertEqual((backend.value(), client.value()), (b"hello", b"world"))

    def test_dataHandedOverBeforeConnectIsRelayed(self):
        """Bytes a wrapping transport delivers while paused wait for the backend."""
        proto, client = self.client()
        proto.dataReceived(b"early")
        backend_proto, backend = self.backend_connects()
        self.assertEqual(backend.value(), b"early")

    def test_slowBackendPausesTheClient(self):
        """Back-pressure: a full backend buffer pauses reading from the client."""
        proto, client = self.client()
        backend_proto, backend = self.backend_connects(transport_class=SlowTransport)
        proto.dataReceived(b"x" * 10)
        self.assertEqual(client.producerState, "producing")
        proto.dataReceived(b"x" * 10)
        self.assertEqual(client.producerState, "paused")
        self.assertEqual(len(backend.drain()), 20)
        self.assertEqual(client.producerState, "producing")

    def test_slowClientPausesTheBackend(self):
        """Back-pressure: a full client buffer pauses reading from the backend."""
        proto, client = self.client(transport_class=SlowTransport)
        backend_proto, backend = self.backend_connects()
        backend_proto.dataReceived(b"y" * 20)
        self.assertEqual(backend.producerState, "paused")
        client.drain()
        self.assertEqual(backend.producerState, "producing")

    def test_halfCloseFromClient(self):
        """The client's half-close reaches the backend; its answer still flows."""
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        proto.readConnectionLost()
        self.assertTrue(backend.write_closed)
        self.assertFalse(client.disconnecting)
        backend_proto.dataReceived(b"late answer")
        self.assertEqual(client.value(), b"late answer")

    def test_halfCloseFromBackend(self):
        """The backend's half-close reaches the client; the client's data still flows."""
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        backend_proto.readConnectionLost()
        self.assertTrue(client.write_closed)
        self.assertFalse(backend.disconnecting)
        proto.dataReceived(b"more")
        self.assertEqual(backend.value(), b"more")

    def test_bothHalfClosesEndTheConnection(self):
        """Once both sides have half-closed, both connections are closed."""
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        proto.readConnectionLost()
        backend_proto.readConnectionLost()
        self.assertTrue(client.disconnecting and backend.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.access[0]["ended"], "client closed")

    def test_secondEndOfFileClosesWithoutAShutdown(self):
        """
        Once both sides reached their end of file, the second side is closed
        without being shut down first: the close sends its end of file.
        """
        for first, second in (("client", "backend"), ("backend", "client")):
            proto, client = self.client()
            backend_proto, backend = self.backend_connects()
            sides = {"client": (proto, client), "backend": (backend_proto, backend)}
            sides[first][0].readConnectionLost()
            self.assertTrue(sides[second][1].write_closed)  # the first end of file is passed on
            sides[second][0].readConnectionLost()
            self.assertFalse(sides[first][1].write_closed, f"{first} side shut down before its close")
            self.assertTrue(client.disconnecting and backend.disconnecting)

    def test_halfClosedSideIsNoLongerAProducer(self):
        """
        A side that reached its end of file is unregistered as a producer,
        so that back-pressure never resumes it (and reads its end again).
        """
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        proto.readConnectionLost()
        self.assertIsNone(backend.producer)
        self.assertIs(client.producer, backend)
        backend_proto.readConnectionLost()
        self.assertIsNone(client.producer)

    def test_repeatedEndOfFileIsHarmless(self):
        """A transport may report its end of file again; it is passed on once."""
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        proto.readConnectionLost()
        proto.readConnectionLost()
        backend_proto.readConnectionLost()
        backend_proto.readConnectionLost()
        self.assertTrue(client.disconnecting and backend.disconnecting)

    def test_halfCloseBeforeConnectIsPassedOn(self):
        """Data and a half-close from the client before the backend connects are passed on once it does."""
        proto, client = self.client()
        proto.dataReceived(b"request")
        proto.readConnectionLost()
        backend_proto, backend = self.backend_connects()
        self.assertEqual(backend.value(), b"request")
        self.assertTrue(backend.write_closed)

    def test_backendLostClosesTheClient(self):
        """The backend connection lost closes the client, and the access log says so."""
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        backend_proto.connectionLost(Failure(ConnectionLost("reset")))
        self.assertTrue(client.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertIn("backend connection lost", self.access[0]["ended"])

    def test_clientLostClosesTheBackend(self):
        """The client connection lost closes the backend connection, and the access log says so."""
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        proto.connectionLost(Failure(ConnectionLost("reset")))
        self.assertTrue(backend.disconnecting)
        self.assertIn("client connection lost", self.access[0]["ended"])

    def test_countersOnBackendAndFactory(self):
        """
        Active and total connections and bytes each way are counted on the backend and the factory, and active
        drops at the end.
        """
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        a = self.group.get("a")
        self.assertEqual((a.active, a.total, self.factory.active, self.factory.total), (1, 1, 1, 1))
        proto.dataReceived(b"12345")
        backend_proto.dataReceived(b"123")
        self.assertEqual((a.bytes_out, a.bytes_in), (5, 3))
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((a.active, a.total, self.factory.active, self.factory.total), (0, 1, 0, 1))

    def test_connectionTrackedUntilBothSidesClosed(self):
        """A graceful shutdown waits for the backend side too."""
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        drained = self.factory.drain(60)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(drained)
        backend_proto.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(drained)


class IdleTimeoutTests(RelayCase):
    def test_idleConnectionClosesBothSides(self):
        """A relay idle for idle_timeout closes both sides, and the access log says "idle timeout"."""
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        self.reactor.advance(29)
        self.assertFalse(client.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(client.disconnecting and backend.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.access[0]["ended"], "idle timeout")

    def test_clientDataResetsTheIdleTimeout(self):
        """Bytes from the client restart the idle timeout."""
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        self.reactor.advance(20)
        proto.dataReceived(b"x")
        self.reactor.advance(20)
        self.assertFalse(client.disconnecting)
        self.reactor.advance(10)
        self.assertTrue(client.disconnecting)

    def test_backendDataResetsTheIdleTimeout(self):
        """Bytes from the backend restart the idle timeout."""
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        self.reactor.advance(20)
        backend_proto.dataReceived(b"x")
        self.reactor.advance(20)
        self.assertFalse(client.disconnecting)
        self.reactor.advance(10)
        self.assertTrue(client.disconnecting)

    def test_zeroMeansNoIdleTimeout(self):
        """idle_timeout = 0 sets no timer."""
        factory = TCPBalancerFactory(self.group, reactor=self.reactor, idle_timeout=0)
        proto, client = self.client(factory=factory)
        self.backend_connects()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_timerCancelledWhenTheConnectionEnds(self):
        """A connection's end cancels its idle timer."""
        proto, client = self.client()
        self.backend_connects()
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([c for c in self.reactor.getDelayedCalls() if c.active()], [])


class AccessLogTests(RelayCase):
    def test_oneLinePerConnection(self):
        """
        A TCP connection writes one access log event, with listener, client, backend, outcome, bytes each way,
        duration and why it ended.
        """
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        proto.dataReceived(b"12345")
        backend_proto.dataReceived(b"abc")
        self.reactor.advance(2)
        proto.readConnectionLost()
        backend_proto.readConnectionLost()
        proto.connectionLost(Failure(ConnectionDone()))
        backend_proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.access), 1)
        event = self.access[0]
        self.assertEqual(event["log_level"].name, "info")
        self.assertEqual(
            {k: event[k] for k in ("listener", "client", "backend", "backend_address", "outcome",
                                   "bytes_from_client", "bytes_to_client", "duration", "ended")},
            {"listener": "tcp", "client": "192.0.2.7", "backend": "a", "backend_address": "10.0.0.1:81",
             "outcome": "new", "bytes_from_client": 5, "bytes_to_client": 3, "duration": 2.0,
             "ended": "client closed"},
        )
        self.assertEqual(
            formatEvent(event),
            "tcp 192.0.2.7 -> a (10.0.0.1:81) persistence=new from_client=5 to_client=3 2.000s client closed",
        )

    def test_accessLogOff(self):
        """access_log off: a TCP connection writes no access log event."""
        proto, _ = self.client(factory=self.make_factory(access_log=False))
        self.backend_connects()
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.access, [])


class ProxyHeaderTests(SynchronousTestCase):
    V2 = b"\r\n\r\n\x00\r\nQUIT\n"

    def test_v1IPv4(self):
        """A PROXY v1 header for IPv4 names the client and local addresses and ports."""
        header = proxy_header("v1", IPv4Address("TCP", "192.0.2.7", 5555), IPv4Address("TCP", "10.0.0.9", 8081))
        self.assertEqual(header, b"PROXY TCP4 192.0.2.7 10.0.0.9 5555 8081\r\n")

    def test_v1IPv6(self):
        """A PROXY v1 header for IPv6 says TCP6 with both addresses and ports."""
        header = proxy_header("v1", IPv6Address("TCP", "2001:db8::7", 5555), IPv6Address("TCP", "2001:db8::1", 443))
        self.assertEqual(header, b"PROXY TCP6 2001:db8::7 2001:db8::1 5555 443\r\n")

    def test_v2IPv4(self):
        """A PROXY v2 header for IPv4 has the binary layout of the specification."""
        header = proxy_header("v2", IPv4Address("TCP", "192.0.2.7", 5555), IPv4Address("TCP", "10.0.0.9", 8081))
        self.assertEqual(
            header,
            self.V2 + b"\x21\x11\x00\x0c" + b"\xc0\x00\x02\x07" + b"\x0a\x00\x00\x09" + b"\x15\xb3" + b"\x1f\x91",
        )

    def test_v2IPv6(self):
        """A PROXY v2 header for IPv6 has the binary layout of the specification."""
        header = proxy_header("v2", IPv6Address("TCP", "2001:db8::7", 5555), IPv6Address("TCP", "2001:db8::1", 443))
        self.assertEqual(
            header,
            self.V2 + b"\x21\x21\x00\x24"
            + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x07"
            + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x01"
            + b"\x15\xb3" + b"\x01\xbb",
        )

    def test_ipv4MappedAddressesAreSentAsIPv4(self):
        """A dual-stack listener's IPv4 client is announced as TCP4."""
        header = proxy_header("v1", IPv6Address("TCP", "::ffff:192.0.2.7", 5555),
                              IPv6Address("TCP", "::ffff:10.0.0.9", 8081))
        self.assertEqual(header, b"PROXY TCP4 192.0.2.7 10.0.0.9 5555 8081\r\n")

    def test_mixedFamiliesAreSentAsIPv6(self):
        """An IPv4 client on an IPv6 listener is sent as an IPv4-mapped IPv6 address."""
        header = proxy_header("v1", IPv4Address("TCP", "192.0.2.7", 5555), IPv6Address("TCP", "2001:db8::1", 443))
        self.assertEqual(header, b"PROXY TCP6 ::ffff:c000:207 2001:db8::1 5555 443\r\n")

    def test_nonIPAddressesAreUnknown(self):
        """Addresses that are not IP (UNIX sockets) are sent as UNKNOWN (v1) or LOCAL (v2)."""
        client, local = UNIXAddress(None), UNIXAddress(b"/run/slb.sock")
        self.assertEqual(proxy_header("v1", client, local), b"PROXY UNKNOWN\r\n")
        self.assertEqual(proxy_header("v2", client, local), self.V2 + b"\x20\x00\x00\x00")

    def test_invalidVersionIsRefused(self):
        """A proxy_protocol other than v1 or v2 is a ValueError."""
        group = BackendGroup("g", [])
        self.assertRaises(ValueError, TCPBalancerFactory, group, reactor=MemoryReactorClock(), proxy_protocol="v3")

    def test_headerIsSentFirst(self):
        """The PROXY header reaches the backend before any client byte, early ones included."""
        reactor = MemoryReactorClock()
        factory = TCPBalancerFactory(BackendGroup("g", [Backend("a", "10.0.0.1", 81)]), reactor=reactor,
                                     proxy_protocol="v2", access_log=False)
        proto = factory.buildProtocol(CLIENT)
        proto.makeConnection(StringTransport(peerAddress=CLIENT, hostAddress=LOCAL))
        proto.dataReceived(b"early")
        backend = StringTransport()
        reactor.tcpClients[0][2].buildProtocol(None).makeConnection(backend)
        proto.dataReceived(b"data")
        self.assertEqual(backend.value(), proxy_header("v2", CLIENT, LOCAL) + b"earlydata")


# -- end to end over loopback ------------------------------------------------


@implementer(IHalfCloseableProtocol)
class NamedBackend(Protocol):
    """
    A test backend: says its name on a line, then echoes; at the client's
    end of file it says how many bytes it got, and closes.
    """

    def connectionMade(self):
        self.factory.open.add(self)
        self.received = 0
        self.transport.write(self.factory.name.encode() + b"\n")

    def dataReceived(self, data):
        self.received += len(data)
        self.transport.write(data)

    def readConnectionLost(self):
        self.transport.write(b"got %d\n" % (self.received,))
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.factory.open.discard(self)
        if not self.factory.open:
            waiters, self.factory.waiters = self.factory.waiters, []
            for d in waiters:
                d.callback(None)


class NamedBackendFactory(Factory):
    protocol = NamedBackend
    noisy = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.open: Set[NamedBackend] = set()
        self.waiters: List[defer.Deferred] = []

    def all_closed(self) -> defer.Deferred:
        if not self.open:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self.waiters.append(d)
        return d


@implementer(IHalfCloseableProtocol)
class Client(Protocol):
    """
    Sends C{request} (if any), half-closes when C{half_close}, and collects
    everything until the connection ends; or, without C{half_close}, closes
    after the first line.
    """

    def __init__(self, request: bytes = b"", half_close: bool = False) -> None:
        self.request = request
        self.half_close = half_close
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self):
        if self.request:
            self.transport.write(self.request)
        if self.half_close:
            self.transport.loseWriteConnection()

    def dataReceived(self, data):
        self.data += data
        if not self.half_close and b"\n" in self.data:
            self.transport.loseConnection()

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.done.callback(self.data)


class LoopbackTests(TestCase):
    """
    Real backends and a real listener on 127.0.0.1, clients from 127.0.0.N:
    lean transports to the backends, Twisted's for the clients.
    """

    timeout = 20
    lean_backends = True
    lean_clients = False

    @defer.inlineCallbacks
    def setUp(self):
        self.backend_factories: Dict[str, NamedBackendFactory] = {}
        self.backend_ports = {}
        backends = []
        for name in ("a", "b", "c"):
            f = NamedBackendFactory(name)
            port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(f)
            self.backend_factories[name] = f
            self.backend_ports[name] = port
            self.addCleanup(f.all_closed)
            self.addCleanup(self.stop_backend, name)
            backends.append(Backend(name, "127.0.0.1", port.getHost().port))
        self.group = BackendGroup("echo", backends, connect_timeout=5, retries=2)
        self.policy = SourceIPPersistence(StickTable(timeout=1000))
        self.factory = TCPBalancerFactory(self.group, self.policy, access_log=False, lean=self.lean_backends)
        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.factory)
        self.assertEqual(tcp.serve_lean(self.port, self.factory) if self.lean_clients else False, self.lean_clients)
        # Cleanups run last-added first: stop listening, wait for every
        # relayed connection, then for the backends' connections.
        self.addCleanup(self.factory.drain, 10)
        self.addCleanup(self.port.stopListening)

    def stop_backend(self, name: str):
        port = self.backend_ports.pop(name, None)
        return port.stopListening() if port is not None else None

    @defer.inlineCallbacks
    def visit(self, source: str, request: bytes = b"", half_close: bool = False):
        """One connection from C{source}; what the client received."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port, bindAddress=(source, 0))
        client = yield connectProtocol(endpoint, Client(request, half_close))
        data = yield client.done
        return data

    @defer.inlineCallbacks
    def backend_of(self, source: str) -> str:
        data = yield self.visit(source)
        return data.split(b"\n")[0].decode()

    @defer.inlineCallbacks
    def test_clientsStayOnTheirBackends(self):
        """Over loopback, each client address stays on one backend while new clients are spread over all."""
        sources = ["127.0.0.%d" % n for n in range(2, 6)]
        seen: Dict[str, Set[str]] = {s: set() for s in sources}
        for _ in range(3):
            for source in sources:
                seen[source].add((yield self.backend_of(source)))
        self.assertEqual([len(names) for names in seen.values()], [1] * len(sources))
        used = set().union(*seen.values())
        self.assertEqual(used, {"a", "b", "c"})  # new clients were balanced

    @defer.inlineCallbacks
    def test_clientsOfAStoppedBackendMoveAndStay(self):
        """Clients of a stopped backend move once and stay on their new backend; the others do not move."""
        sources = ["127.0.0.%d" % n for n in range(2, 5)]
        first = {}
        for source in sources:
            first[source] = yield self.backend_of(source)
        victim = first[sources[0]]
        yield self.stop_backend(victim)
        for source in sources:
            names = set()
            for _ in range(3):
                names.add((yield self.backend_of(source)))
            self.assertEqual(len(names), 1, f"{source} moved between {names}")
            if first[source] == victim:
                self.assertNotIn(victim, names)
            else:
                self.assertEqual(names, {first[source]})
        self.assertEqual(self.group.get(victim).failures, 1)  # once re-pinned, never tried again

    @defer.inlineCallbacks
    def test_halfCloseOverRealSockets(self):
        """A client that half-closes still gets the backend's answer to its end of file."""
        data = yield self.visit("127.0.0.7", b"x" * 100000, half_close=True)
        name, echoed_and_count = data.split(b"\n", 1)
        self.assertEqual(echoed_and_count, b"x" * 100000 + b"got 100000\n")


class LeanLoopbackTests(LoopbackTests):
    """The same, with lean transports on both sides (as C{twistd slb} runs)."""

    lean_clients = True

    @defer.inlineCallbacks
    def test_transports(self):
        """
        With lean transports, a relay carries bytes and a half-close, and the port's accepted connections are
        lean.
        """
        data = yield self.visit("127.0.0.9", b"x" * 10, half_close=True)
        self.assertTrue(data.endswith(b"got 10\n"))
        self.assertIs(self.port.transport, lean.LeanServer)


class TwistedTransportLoopbackTests(LoopbackTests):
    """The same, with Twisted's transports on both sides (C{lean=False})."""

    lean_backends = False

    def test_connectTCP(self):
        """With lean off, the backend connection goes through Twisted's connectTCP, not a lean connector."""
        proto = self.factory.buildProtocol(None)
        proto.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1)))
        self.assertNotIsInstance(proto.connector, lean.LeanConnector)
        proto.transport.loseConnection()
        proto.connectionLost(None)


class PinLifetimeTests(RelayCase):
    """A source-IP pin does not expire under a connection that stays open."""

    def setUp(self):
        RelayCase.setUp(self)
        self.table = StickTable(timeout=100, clock=self.reactor)
        self.factory = self.make_factory(policy=SourceIPPersistence(self.table))

    def test_longConnectionKeepsItsPin(self):
        """A connection open for several table timeouts keeps its client's pin alive."""
        proto, client = self.client()
        self.backend_connects()
        for _ in range(25):  # 500 s, five table timeouts, with traffic
            self.reactor.advance(20)
            proto.dataReceived(b"x")
        self.assertFalse(client.disconnecting)
        self.assertEqual(self.table.get("192.0.2.7"), self.group.get("a").id)

    def test_timeoutCountsFromTheEndOfTheConnection(self):
        """A pin's timeout counts from the end of the connection, not from its start."""
        proto, client = self.client()
        self.backend_connects()
        for _ in range(6):
            self.reactor.advance(20)
            proto.dataReceived(b"x")
        proto.connectionLost(Failure(ConnectionDone()))
        self.reactor.advance(99)
        self.assertEqual(self.table.get("192.0.2.7"), self.group.get("a").id)
        self.reactor.advance(2)
        self.assertIsNone(self.table.get("192.0.2.7"))

    def test_aNewerPinIsNotOverwritten(self):
        """An open connection does not overwrite a newer pin set by another connection."""
        proto, client = self.client()
        self.backend_connects()
        self.table.set("192.0.2.7", self.group.get("b").id)  # another connection re-pinned it
        self.reactor.advance(60)
        self.assertEqual(self.table.get("192.0.2.7"), self.group.get("b").id)

    def test_idleTimeoutStillCloses(self):
        """Keeping a pin alive does not keep an idle connection open."""
        proto, client = self.client()
        self.backend_connects()
        self.reactor.advance(30)
        self.assertTrue(client.disconnecting)
