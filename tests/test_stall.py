"""
Stalling clients and slow backends, end to end on 127.0.0.1: a thousand
slowloris connections do not starve a normal client and are all timed out
and freed; an upload to a backend that does not read is held back instead of
piling up in memory: a streamed body stops the client's upload, a spooled
one (request_buffering) stops reading the spool file.
"""

from __future__ import annotations

from typing import List

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.web.body import HIGH_WATER
from twisted_slb.web.front import HTTPFrontFactory
from twisted_slb.web.proxy import BalancedProxyResource
from twisted_slb.web.upstream import UpstreamPool

from .buffers import shrink

STALLED = 1000


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello"


class Trickler(protocol.Protocol):
    """Sends part of a request head and then nothing; records the answer."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.closed.callback(self.received)


class OneRequest(protocol.Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.closed.callback(self.received)


class NeverReads(protocol.Protocol):
    """A backend that accepts and never reads."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.transport.pauseProducing()


class StallTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def listen(self, factory):
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1", backlog=2048).listen(factory)
        self.addCleanup(port.stopListening)
        return port

    @defer.inlineCallbacks
    def balancer(self, backend_port: int, client_idle_timeout: float = 60.0, request_buffering: bool = False):
        pool = UpstreamPool(reactor)
        self.addCleanup(pool.close)
        group = BackendGroup("g", [Backend("a", "127.0.0.1", backend_port)])
        self.resource = BalancedProxyResource(group, pool=pool, access_log=False,
                                              request_buffering=request_buffering)
        self.factory = HTTPFrontFactory(self.resource, client_idle_timeout=client_idle_timeout)
        port = yield self.listen(self.factory)
        return port.getHost().port

    def connect(self, port: int, proto):
        return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)

    @defer.inlineCallbacks
    def test_thousandSlowlorisDoNotStarveOthers(self):
        """
        1,000 clients trickling their heads do not delay a normal client; each gets 408 after
        client_idle_timeout and is freed.
        """
        backend = yield self.listen(Site(Hello()))
        # Long enough that all 1,000 are still open when the normal client
        # comes, even where connecting them is slow (PyPy before its JIT has
        # warmed up, on a busy machine, took over 2 s).
        port = yield self.balancer(backend.getHost().port, client_idle_timeout=5.0)
        tricklers: List[Trickler] = []
        for _ in range(STALLED):
            tricklers.append((yield self.connect(port, Trickler())))
        # Every stalled connection is open and half-way through its head...
        normal = yield self.connect(port, OneRequest(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        response = yield normal.closed
        # ...and a normal client is served at once.
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK\r\n"), response)
        self.assertTrue(response.endswith(b"hello"))
        self.assertFalse(any(t.closed.called for t in tricklers))
        answers = yield defer.gatherResults([t.closed for t in tricklers])
        # Each gets 408 once its head has taken client_idle_timeout, and is freed.
        self.assertEqual({a.split(b"\r\n", 1)[0] for a in answers}, {b"HTTP/1.1 408 Request Timeout"})
        self.assertEqual(len(self.factory.channels), 0)
        self.assertEqual(self.factory.limit.open, 0)

    @defer.inlineCallbacks
    def test_streamedUploadToABackendThatDoesNotReadIsHeldBack(self):
        """
        A streamed upload to a backend that reads nothing: once the socket
        buffers are full, the balancer stops reading the client's body, and
        what it holds in memory (the body's waiting bytes, the backend
        transport's write buffer) stays under a bound.
        """
        backend_factory = protocol.ServerFactory.forProtocol(NeverReads)
        backend_factory.connections = []
        backend = yield self.listen(backend_factory)
        shrink(backend.socket)
        port = yield self.balancer(backend.getHost().port)
        size = 32 * 1024 * 1024
        client = yield self.connect(port, OneRequest(b""))
        client.transport.write(b"PUT /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"x" * 65536
        for _ in range(size // len(chunk)):
            client.transport.write(chunk)
        exchange = yield self.until(lambda: self.streaming_exchange(backend_factory))
        body = exchange.body
        received = yield self.until(lambda: self.stable(lambda: body.received))
        self.assertLess(received, size // 2)
        self.assertTrue(body.paused)
        self.assertLessEqual(body.waiting_bytes, HIGH_WATER + 65536)
        self.assertLessEqual(buffered(exchange.upstream.transport), 2 * 65536 + 65536)
        client.transport.abortConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_spooledUploadToABackendThatDoesNotReadIsHeldBack(self):
        """
        With request_buffering, the body is spooled, then sent from the
        spool file: to a backend that reads nothing, the file is read no
        further once the socket buffers are full.
        """
        backend_factory = protocol.ServerFactory.forProtocol(NeverReads)
        backend_factory.connections = []
        backend = yield self.listen(backend_factory)
        # The backend's sockets get a small receive buffer (accepted sockets
        # inherit it from the listener): on loopback an auto-tuned one can
        # grow to 32 MB and take the whole upload (see tests.buffers).
        shrink(backend.socket)
        port = yield self.balancer(backend.getHost().port, request_buffering=True)
        size = 32 * 1024 * 1024
        client = yield self.connect(port, OneRequest(b""))
        client.transport.write(b"PUT /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"x" * 65536
        for _ in range(size // len(chunk)):
            client.transport.write(chunk)
        # Wait until the proxy has read the body and begun sending it.
        sender = yield self.until(lambda: self.sender_of(backend_factory))
        # The backend reads nothing: once the socket buffers are full, the
        # upload's producer is no longer asked for more, and the rest of the
        # body stays in the spool file (on disk), not in memory.
        position = yield self.until(lambda: self.stable(lambda: sender.file.tell()))
        self.assertLess(position, size // 2)
        client.transport.abortConnection()
        yield client.closed

    def turn(self):
        d: defer.Deferred = defer.Deferred()
        reactor.callLater(0.001, d.callback, None)
        return d

    @defer.inlineCallbacks
    def until(self, condition, turns: int = 5000):
        """Turn the reactor until C{condition()} is not L{None}; at most C{turns} times."""
        for _ in range(turns):
            value = condition()
            if value is not None:
                return value
            yield self.turn()
        self.fail("condition never met")

    def sender_of(self, backend_factory):
        if not backend_factory.connections:
            return None
        for channel in self.factory.channels:
            exchange = getattr(channel.request, "slb_exchange", None)
            if exchange is not None and exchange.sender is not None:
                return exchange.sender
        return None

    def streaming_exchange(self, backend_factory):
        if not backend_factory.connections:
            return None
        for channel in self.factory.channels:
            exchange = getattr(channel.request, "slb_exchange", None)
            if exchange is not None and exchange.body is not None and exchange.upstream is not None:
                return exchange
        return None

    def stable(self, measure):
        """C{measure()} once it stayed the same for 20 turns."""
        position = measure()
        if position == getattr(self, "_last_position", None):
            self._same += 1
            if self._same >= 20:
                return position
        else:
            self._last_position, self._same = position, 0
        return None


def buffered(transport) -> int:
    """
    The bytes waiting in a transport's write buffer: a L{twisted_slb._io.lean}
    transport's, or a Twisted TCP transport's (no public API says it).
    """
    if hasattr(transport, "_buffer"):
        return len(transport._buffer)
    return len(transport.dataBuffer) + transport._tempDataLen
