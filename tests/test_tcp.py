"""
Tests for L{twisted_slb.tcp} in memory: connect attempts, retries, relaying,
back-pressure, half-close, idle timeout and the PROXY protocol header.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionRefusedError, TimeoutError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.persistence.interfaces import IPersistencePolicy
from twisted_slb.tcp import TCPBalancerFactory, proxy_header


@implementer(IPersistencePolicy)
class DictPolicy:
    name = "dict"

    def __init__(self):
        self.pins = {}
        self.remembered = []

    def find(self, session):
        return self.pins.get(session.client_ip)

    def remember(self, session, backend):
        self.remembered.append((session.client_ip, backend.name, session.outcome))
        self.pins[session.client_ip] = backend.id


class HalfCloseTransport(StringTransport):
    """A StringTransport that records half-closes."""

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


class RelayTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.group = BackendGroup("g", [Backend("a", "10.0.0.1", 81), Backend("b", "10.0.0.2", 82)], retries=1)
        self.policy = DictPolicy()
        self.factory = TCPBalancerFactory(self.group, self.policy, reactor=self.reactor, idle_timeout=30)

    def client(self, host="192.0.2.7"):
        proto = self.factory.buildProtocol(IPv4Address("TCP", host, 5555))
        transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", host, 5555),
                                       hostAddress=IPv4Address("TCP", "127.0.0.1", 8081))
        proto.makeConnection(transport)
        return proto, transport

    def backend_connects(self, index=-1):
        host, port, factory, timeout, _ = self.reactor.tcpClients[index]
        proto = factory.buildProtocol(None)
        transport = HalfCloseTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_clientPausedUntilBackendConnected(self):
        proto, transport = self.client()
        self.assertEqual(transport.producerState, "paused")
        host, port, _, timeout, _ = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("10.0.0.1", 81, 5.0))
        self.backend_connects()
        self.assertEqual(transport.producerState, "producing")

    def test_bytesFlowBothWays(self):
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        proto.dataReceived(b"hello")
        backend_proto.dataReceived(b"world")
        self.assertEqual((backend.value(), client.value()), (b"hello", b"world"))
        self.assertEqual(self.policy.remembered, [("192.0.2.7", "a", "new")])

    def test_eachSideIsTheOthersProducer(self):
        """Back-pressure: each transport is registered as producer of the other."""
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        self.assertIs(client.producer, backend)
        self.assertIs(backend.producer, client)
        self.assertTrue(client.streaming and backend.streaming)

    def test_retryOnConnectFailureIsInvisible(self):
        proto, client = self.client()
        _, _, factory, _, _ = self.reactor.tcpClients[0]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(self.reactor.tcpClients[1][:2], ("10.0.0.2", 82))
        self.assertEqual(self.group.get("a").failures, 1)
        self.backend_connects()
        self.assertFalse(client.disconnecting)
        self.assertEqual(self.policy.remembered, [("192.0.2.7", "b", "new")])

    def test_pinnedBackendFailingRepins(self):
        self.policy.pins["192.0.2.7"] = self.group.get("a").id
        self.client()
        self.reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(TimeoutError()))
        self.backend_connects()
        self.assertEqual(self.policy.remembered, [("192.0.2.7", "b", "repin")])

    def test_allBackendsFailingClosesTheClient(self):
        proto, client = self.client()
        for i in range(2):
            self.reactor.tcpClients[i][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertEqual(len(self.reactor.tcpClients), 2)  # retries = 1: two tries in all
        self.assertTrue(client.disconnecting)

    def test_halfCloseFromClient(self):
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        proto.readConnectionLost()
        self.assertTrue(backend.write_closed)
        self.assertFalse(client.disconnecting)
        backend_proto.dataReceived(b"late answer")
        self.assertEqual(client.value(), b"late answer")
        backend_proto.readConnectionLost()
        self.assertTrue(client.write_closed)
        self.assertTrue(client.disconnecting)

    def test_halfCloseFromBackend(self):
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        backend_proto.readConnectionLost()
        self.assertTrue(client.write_closed)
        proto.dataReceived(b"more")
        self.assertEqual(backend.value(), b"more")

    def test_idleTimeout(self):
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        self.reactor.advance(20)
        proto.dataReceived(b"x")  # activity moves the deadline
        self.reactor.advance(20)
        self.assertFalse(client.disconnecting)
        self.reactor.advance(10)
        self.assertTrue(client.disconnecting)
        self.assertTrue(backend.disconnecting)

    def test_countsOnTheBackend(self):
        proto, client = self.client()
        backend_proto, backend = self.backend_connects()
        a = self.group.get("a")
        self.assertEqual((a.active, a.total), (1, 1))
        proto.dataReceived(b"12345")
        proto.connectionLost(None)
        self.assertEqual((a.active, a.bytes_out), (0, 5))
        self.assertEqual(self.factory.active, 0)


class ProxyHeaderTests(SynchronousTestCase):
    def test_v1IPv4(self):
        header = proxy_header("v1", IPv4Address("TCP", "192.0.2.7", 5555), IPv4Address("TCP", "10.0.0.9", 8081))
        self.assertEqual(header, b"PROXY TCP4 192.0.2.7 10.0.0.9 5555 8081\r\n")

    def test_v1IPv6(self):
        header = proxy_header("v1", IPv6Address("TCP", "2001:db8::7", 5555), IPv6Address("TCP", "2001:db8::1", 443))
        self.assertEqual(header, b"PROXY TCP6 2001:db8::7 2001:db8::1 5555 443\r\n")

    def test_v2IPv4(self):
        header = proxy_header("v2", IPv4Address("TCP", "192.0.2.7", 5555), IPv4Address("TCP", "10.0.0.9", 8081))
        self.assertEqual(
            header,
            b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 7, 10, 0, 0, 9])
            + (5555).to_bytes(2, "big") + (8081).to_bytes(2, "big"),
        )

    def test_v2IPv6(self):
        header = proxy_header("v2", IPv6Address("TCP", "2001:db8::7", 1), IPv6Address("TCP", "2001:db8::1", 2))
        self.assertEqual(header[12:16], b"\x21\x21\x00\x24")
        self.assertEqual(len(header), 16 + 36)

    def test_sentFirst(self):
        reactor = MemoryReactorClock()
        factory = TCPBalancerFactory(BackendGroup("g", [Backend("a", "10.0.0.1", 81)]), reactor=reactor,
                                     proxy_protocol="v1")
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555),
                                             hostAddress=IPv4Address("TCP", "10.0.0.9", 8081)))
        backend = StringTransport()
        reactor.tcpClients[0][2].buildProtocol(None).makeConnection(backend)
        proto.dataReceived(b"data")
        self.assertEqual(backend.value(), b"PROXY TCP4 192.0.2.7 10.0.0.9 5555 8081\r\ndata")
