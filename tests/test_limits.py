"""
Connection limits: C{max_connections} on TCP and HTTP listeners and
C{max_connections_per_ip} on HTTP listeners.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.limits import (
    ClientAddressLimit,
    ConnectionAdmission,
    ConnectionLimit,
    IConnectionAdmission,
    IListenerFactory,
    TooManyConnections,
)
from twisted_slb.tcp import TCPBalancerFactory
from twisted_slb.web.front import HTTPFrontFactory
from twisted_slb.web.proxy import BalancerSite


def addr(host: str, port: int = 5000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


class TCPLimitTests(SynchronousTestCase):
    def test_overTheLimitIsRefused(self):
        """A TCP listener at max_connections builds no protocol for a new client until a connection closes."""
        reactor = MemoryReactorClock()
        factory = TCPBalancerFactory(
            BackendGroup("g", [Backend("a", "127.0.0.1", 1)]), reactor=reactor, max_connections=2
        )
        protocols = []
        for i in range(2):
            proto = factory.buildProtocol(addr("127.0.0.2"))
            proto.makeConnection(StringTransport(peerAddress=addr("127.0.0.2")))
            protocols.append(proto)
        self.assertIsNone(factory.buildProtocol(addr("127.0.0.3")))
        protocols[0].connectionLost(None)
        self.assertIsNotNone(factory.buildProtocol(addr("127.0.0.3")))


class HTTPLimitTests(SynchronousTestCase):
    site_class = BalancerSite

    def site(self, **kwargs):
        return self.site_class(Resource(), reactor=MemoryReactorClock(), **kwargs)

    def connect(self, site, host):
        proto = site.buildProtocol(addr(host))
        if proto is None:
            return None, None
        transport = StringTransport(peerAddress=addr(host))
        proto.makeConnection(transport)
        return proto, transport

    def test_maxConnections(self):
        """An HTTP listener at max_connections refuses new connections until one closes."""
        site = self.site(max_connections=2)
        first, _ = self.connect(site, "127.0.0.2")
        self.connect(site, "127.0.0.3")
        self.assertEqual(self.connect(site, "127.0.0.4"), (None, None))
        first.connectionLost(None)
        self.assertIsNotNone(self.connect(site, "127.0.0.4")[0])

    def test_perClientAddressGets429(self):
        """
        A client address over max_connections_per_ip gets 429 and a close; other addresses are not affected
        and a freed slot is usable.
        """
        site = self.site(max_connections_per_ip=2)
        first, _ = self.connect(site, "127.0.0.2")
        self.connect(site, "127.0.0.2")
        _, transport = self.connect(site, "127.0.0.2")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 429 Too Many Requests\r\n"))
        self.assertTrue(transport.disconnecting)
        # Another address is not affected, and a freed slot is usable again.
        _, other = self.connect(site, "127.0.0.3")
        self.assertEqual(other.value(), b"")
        first.connectionLost(None)
        _, again = self.connect(site, "127.0.0.2")
        self.assertEqual(again.value(), b"")


class SlowClientTests(SynchronousTestCase):
    """A client trickling its request head (slowloris) is timed out (L{BalancerSite})."""

    site_class = BalancerSite

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.site = self.site_class(Resource(), reactor=self.reactor, client_idle_timeout=10)
        self.proto = self.site.buildProtocol(addr("127.0.0.2"))
        self.transport = StringTransport(peerAddress=addr("127.0.0.2"))
        self.proto.makeConnection(self.transport)

    def test_tricklingHeadersGet408(self):
        """Headers trickling in, each piece within the idle timeout but the whole head slower, get 408."""
        self.proto.dataReceived(b"GET / HTTP/1.1\r\n")
        for i in range(3):
            self.reactor.advance(4)  # each byte comes before the idle timeout...
            self.proto.dataReceived(b"X-%d: y\r\n" % i)
        # ...but the head as a whole took longer than the timeout.
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n"))
        self.assertTrue(self.transport.disconnecting)

    def test_completeHeadCancelsTheDeadline(self):
        """A complete head cancels the header deadline."""
        self.proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIsNone(self.proto.header_deadline)

    def test_clientThatStopsReadingIsClosed(self):
        """
        While a response is being written, a client whose socket stays full
        for a whole idle timeout is dropped (twisted.web's own idle timeout
        is off during a response).
        """
        from twisted.web.server import NOT_DONE_YET

        class Endless(Resource):
            isLeaf = True

            def render(self, request):
                request.write(b"x" * 100)
                return NOT_DONE_YET

        site = self.site_class(Endless(), reactor=self.reactor, client_idle_timeout=10)
        proto = site.buildProtocol(addr("127.0.0.2"))
        transport = StringTransport(peerAddress=addr("127.0.0.2"))
        proto.makeConnection(transport)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        proto.pauseProducing()  # what the transport does when the client stops reading
        self.reactor.advance(9)
        proto.resumeProducing()  # it read something: the clock starts over
        proto.pauseProducing()
        self.reactor.advance(9)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(transport.disconnecting)


class FrontHTTPLimitTests(HTTPLimitTests):
    """The same limits on the listeners' own HTTP/1.1 server."""

    site_class = HTTPFrontFactory


class FrontSlowClientTests(SlowClientTests):
    """The same timeouts on the listeners' own HTTP/1.1 server."""

    site_class = HTTPFrontFactory

    def test_completeHeadCancelsTheDeadline(self):
        """Once the head is in, the head deadline no longer applies."""
        self.proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.transport.clear()
        self.proto.dataReceived(b"")
        self.reactor.advance(15)
        self.assertNotIn(b"408", self.transport.value())


class FakePort:
    """A listening port that records whether it accepts."""

    connected = True
    disconnecting = False

    def __init__(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class ConnectionLimitTests(SynchronousTestCase):
    def test_waitPausesAcceptingAtTheLimit(self):
        """
        With wait, a limit reached stops accepting (new clients wait in the backlog) until a connection is
        released.
        """
        limit = ConnectionLimit(2, "l", wait=True)
        port = FakePort()
        limit.add_port(port)
        self.assertTrue(limit.admit())
        self.assertTrue(port.reading)
        self.assertTrue(limit.admit())
        self.assertFalse(port.reading)  # new connections wait in the backlog
        self.assertFalse(limit.admit())  # one accepted in the same batch is closed
        limit.release()
        self.assertTrue(port.reading)
        self.assertEqual(limit.open, 1)

    def test_closeKeepsAccepting(self):
        """Without wait, a limit reached keeps accepting and closes what is over."""
        limit = ConnectionLimit(1, "l", wait=False)
        port = FakePort()
        limit.add_port(port)
        self.assertTrue(limit.admit())
        self.assertFalse(limit.admit())
        self.assertTrue(port.reading)

    def test_globalLimitCoversEveryListener(self):
        """A global limit counts every listener's connections; each listener waits or closes by its own setting."""
        everything = ConnectionLimit(2, "[all]")
        a = ConnectionLimit(0, "a", wait=True, parent=everything)
        b = ConnectionLimit(0, "b", wait=False, parent=everything)
        port_a, port_b = FakePort(), FakePort()
        a.add_port(port_a)
        b.add_port(port_b)
        self.assertTrue(a.admit())
        self.assertTrue(b.admit())
        self.assertEqual(everything.open, 2)
        self.assertFalse(port_a.reading)  # a waits...
        self.assertTrue(port_b.reading)  # ...b closes what is over
        self.assertFalse(b.admit())
        self.assertFalse(a.admit())
        b.release()
        self.assertTrue(port_a.reading)
        self.assertTrue(a.admit())

    def test_raisingTheGlobalLimitResumes(self):
        """Lifting the global limit on reload resumes a listener paused by it."""
        everything = ConnectionLimit(1, "[all]")
        a = ConnectionLimit(0, "a", wait=True, parent=everything)
        port = FakePort()
        a.add_port(port)
        a.admit()
        self.assertFalse(port.reading)
        everything.configure(0, False)
        self.assertTrue(port.reading)

    def test_waitIsLoggedWhenAcceptingPauses(self):
        """In wait mode no connection is refused, but reaching the limit is still logged, once."""
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        limit = ConnectionLimit(1, "l", wait=True)
        limit.add_port(FakePort())
        limit.admit()
        limit.release()
        limit.admit()
        texts = [e["log_format"] for e in events if e.get("log_namespace") == "twisted_slb.limits"]
        self.assertEqual(len([t for t in texts if "connections open" in t]), 2)  # two episodes
        self.assertEqual(len([t for t in texts if "accepting connections again" in t]), 1)
        self.assertIn("new connections wait", [e for e in events if "action" in e][0]["action"])

    def test_loggedOncePerEpisode(self):
        """Reaching the limit is logged once per episode, and so is accepting again."""
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        limit = ConnectionLimit(1, "l")
        limit.admit()
        for _ in range(5):
            limit.admit()
        limit.release()
        limit.admit()
        texts = [e["log_format"] for e in events if e.get("log_namespace") == "twisted_slb.limits"]
        self.assertEqual(len([t for t in texts if "connections open" in t]), 1)
        self.assertEqual(len([t for t in texts if "accepting connections again" in t]), 1)


class RefusedHeadTests(SynchronousTestCase):
    """What a L{BalancerSite} channel does after refusing a request head."""

    def test_nothingIsReadAfterARefusedHead(self):
        """
        After a refused request head (431), bytes the client still sends are
        not parsed: no second answer, and the channel is a plain instance of
        its class (no method replaced on it).
        """
        site = BalancerSite(Resource(), reactor=MemoryReactorClock(), max_header_bytes=100)
        proto = site.buildProtocol(addr("127.0.0.2"))
        transport = StringTransport(peerAddress=addr("127.0.0.2"))
        proto.makeConnection(transport)
        proto.dataReceived(b"GET / HTTP/1.1\r\nA: " + b"1" * 200 + b"\r\n")
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 431 "), answer)
        proto.dataReceived(b"\r\nGET /again HTTP/1.1\r\n\r\n")
        self.assertEqual(transport.value(), answer)
        self.assertNotIn("dataReceived", vars(proto))

    def test_importedFromItsOldPlace(self):
        """BalancerSite lives in twisted_slb.web.site; the package and twisted_slb.web.proxy still export it."""
        import twisted_slb
        from twisted_slb.web import proxy, site

        self.assertIs(proxy.BalancerSite, site.BalancerSite)
        self.assertIs(twisted_slb.BalancerSite, site.BalancerSite)


class ConnectionAdmissionTests(SynchronousTestCase):
    """L{ConnectionAdmission}: the one admission and drain component of the three listener factories."""

    def test_theThreeFactoriesShareIt(self):
        """The TCP relay's factory, the listeners' HTTP server and BalancerSite provide IListenerFactory with one."""
        reactor = MemoryReactorClock()
        group = BackendGroup("g", [Backend("a", "127.0.0.1", 1)])
        for factory in (
            TCPBalancerFactory(group, reactor=reactor),
            HTTPFrontFactory(Resource(), reactor=reactor),
            BalancerSite(Resource(), reactor=reactor),
        ):
            self.assertTrue(verifyObject(IListenerFactory, factory))
            self.assertTrue(verifyObject(IConnectionAdmission, factory.admission))
            self.assertIs(factory.limit, factory.admission.limit)

    def test_buildCountsAndRefuses(self):
        """build admits within the limits, gives None over max_connections and a 429 answer over the per-IP one."""
        admission = ConnectionAdmission(ConnectionLimit(2), ClientAddressLimit(1, "l"), MemoryReactorClock())
        first = admission.build("192.0.2.1", Protocol)
        self.assertEqual((type(first), first.client_ip), (Protocol, "192.0.2.1"))
        self.assertIsInstance(admission.build("192.0.2.1", Protocol), TooManyConnections)
        self.assertIsInstance(admission.build("192.0.2.2", Protocol), Protocol)
        self.assertIsNone(admission.build("192.0.2.3", Protocol))
        admission.release("192.0.2.1")
        self.assertIsInstance(admission.build("192.0.2.1", Protocol), Protocol)

    def test_drainWaitsThenAborts(self):
        """drain fires once the last connection is forgotten, or aborts those left after the grace period."""
        reactor = MemoryReactorClock()
        admission = ConnectionAdmission(ConnectionLimit(), reactor=reactor)
        a, b = object(), object()
        admission.add(a)
        admission.add(b)
        aborted, done = [], []
        admission.drain(5, aborted.append).addCallback(done.append)
        admission.remove(a)
        self.assertEqual((aborted, done), ([], []))
        reactor.advance(5)
        self.assertEqual(aborted, [b])
        admission.forget(b)
        self.assertEqual(done, [None])
