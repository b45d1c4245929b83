"""
Tests for the HTTP proxy: the upstream parser in memory, and
L{BalancedProxyResource} end to end over loopback with real backends.
"""

from __future__ import annotations

import gc
import platform
import types
from typing import List

from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseFailed, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.ports import refusing_port
from twisted_slb._io import lean
from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.persistence.cookies import InsertCookie
from twisted_slb.web.front import FrontRequest, HTTPFrontFactory
from twisted_slb.web.proxy import HOP_BY_HOP, BalancedProxyResource, BalancerSite, _response_hop_by_hop
from twisted_slb.web.upstream import UpstreamPool, UpstreamProtocol


class Handler:
    def __init__(self):
        self.head = None
        self.data: List[bytes] = []
        self.ended = False
        self.failed = None

    def response_head(self, code, reason, headers):
        self.head = (code, reason, headers)

    def response_data(self, data):
        self.data.append(data)

    def response_end(self):
        self.ended = True

    def response_failed(self, reason, received):
        self.failed = (reason, received)

    def response_switch(self, code, reason, headers):
        self.head = (code, reason, headers)

    def tunnel_data(self, data):
        self.data.append(data)

    def tunnel_closed(self, reason):
        self.ended = True


class UpstreamParserTests(SynchronousTestCase):
    def exchange(self, response: bytes, head_request=False, chunks=None):
        proto = UpstreamProtocol()
        transport = StringTransport()
        proto.makeConnection(transport)
        handler = Handler()
        proto.send(b"GET / HTTP/1.1\r\n\r\n", handler, head_request=head_request)
        for piece in chunks or [response]:
            proto.dataReceived(piece)
        return proto, handler

    def test_switchToATunnel(self):
        """A 101 to an upgrade request: the rest of the bytes are the tunnel's, and the connection is never reused."""
        proto = UpstreamProtocol()
        proto.makeConnection(StringTransport())
        handler = Handler()
        proto.send(b"GET / HTTP/1.1\r\nUpgrade: x\r\n\r\n", handler, upgrade=True)
        proto.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nab")
        proto.dataReceived(b"HTTP/1.1 200 not a response any more\r\n\r\n")
        self.assertEqual(handler.head[0], 101)
        self.assertEqual(b"".join(handler.data), b"abHTTP/1.1 200 not a response any more\r\n\r\n")
        self.assertFalse(proto.reusable)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(handler.ended)

    def test_101WithoutUpgradeFails(self):
        """A 101 answer to a request that asked for no upgrade fails the exchange."""
        proto, h = self.exchange(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        self.assertIsNotNone(h.failed)

    def test_contentLength(self):
        """A response with Content-Length is read to its length, and the connection stays reusable."""
        proto, h = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual((h.head[0], b"".join(h.data), h.ended, proto.reusable), (200, b"hello", True, True))

    def test_chunkedWithExtensionsAndTrailers(self):
        """
        A chunked response fed byte by byte is decoded, extensions and trailers dropped, and the connection
        stays reusable.
        """
        raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-T: 1\r\n\r\n"
        # Byte by byte: every state must cope with a split.
        proto, h = self.exchange(b"", chunks=[raw[i:i + 1] for i in range(len(raw))])
        self.assertEqual((b"".join(h.data), h.ended, proto.reusable), (b"hello!", True, True))

    def test_headHasNoBody(self):
        """The answer to a HEAD ends after its headers, whatever its Content-Length."""
        proto, h = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n", head_request=True)
        self.assertTrue(h.ended)
        self.assertEqual(h.data, [])

    def test_204And304HaveNoBody(self):
        """204 and 304 answers end after their headers."""
        for status in (b"204 No Content", b"304 Not Modified"):
            proto, h = self.exchange(b"HTTP/1.1 " + status + b"\r\n\r\n")
            self.assertTrue(h.ended)

    def test_interimResponsesSkipped(self):
        """A 100 Continue before the answer is skipped: the handler sees the 200 and its body."""
        proto, h = self.exchange(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual((h.head[0], b"".join(h.data)), (200, b"ok"))

    def test_untilClose(self):
        """A response without length is read until the connection closes, which is then not reused."""
        proto, h = self.exchange(b"HTTP/1.1 200 OK\r\n\r\nsome")
        self.assertFalse(proto.reusable)
        from twisted.internet.error import ConnectionDone

        proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(h.ended)

    def test_bytesAfterTheResponseNotReusable(self):
        """
        Bytes after a complete response (here a second response) make the
        connection unusable before the handler hears of the end, and are not
        taken as the answer to anything.
        """
        attack = b"HTTP/1.1 200 OK\r\nSet-Cookie: session=ATTACKER\r\nContent-Length: 0\r\n\r\n"
        for response in (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                         b"HTTP/1.1 304 Not Modified\r\n\r\n",
                         b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"):
            proto = UpstreamProtocol()
            proto.makeConnection(StringTransport())
            seen = []

            class Reuser(Handler):
                def response_end(self):
                    Handler.response_end(self)
                    seen.append(proto.reusable)

            handler = Reuser()
            proto.send(b"GET / HTTP/1.1\r\n\r\n", handler)
            proto.dataReceived(response + attack)
            self.assertEqual(seen, [False], response)
            self.assertTrue(proto.transport.disconnecting)

    def test_bytesOnAnIdleConnectionCloseIt(self):
        """An idle connection on which the backend sends anything is closed, never reused."""
        proto, h = self.exchange(b"HTTP/1.1 304 Not Modified\r\n\r\n")
        self.assertTrue(proto.reusable)
        proto.dataReceived(b"late body")
        self.assertFalse(proto.reusable)
        self.assertTrue(proto.transport.disconnecting)

    def test_connectionCloseNotReusable(self):
        """A response with Connection: close makes its connection not reusable."""
        proto, h = self.exchange(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        self.assertFalse(proto.reusable)

    def test_malformedStatusLineFails(self):
        """A malformed status line fails the exchange, marking that bytes were received."""
        proto, h = self.exchange(b"HTTX/1.1 2OO OK\r\n\r\n")
        self.assertIsNotNone(h.failed)
        self.assertTrue(h.failed[1])

    def test_conflictingContentLengthsFail(self):
        """Two different Content-Length values fail the exchange (a smuggling vector)."""
        proto, h = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello")
        self.assertIsNotNone(h.failed)

    def test_badChunkSizeFails(self):
        """A chunk size that is not hexadecimal fails the exchange."""
        proto, h = self.exchange(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        self.assertIsNotNone(h.failed)

    def test_headerLines(self):
        """Names as sent, values without surrounding blanks, the framing fields included."""
        proto, h = self.exchange(
            b"HTTP/1.1 200 OK\r\nServer:nginx\r\nX-Blank:  \t a b \t\r\nX-Empty:\r\nCONTENT-length: 2\r\n\r\nok"
        )
        self.assertEqual(h.head, (200, b"OK", [(b"Server", b"nginx"), (b"X-Blank", b"a b"), (b"X-Empty", b""),
                                               (b"CONTENT-length", b"2")]))
        self.assertEqual(b"".join(h.data), b"ok")

    def test_noHeadersNoReason(self):
        """A status line without a reason phrase and no headers is accepted."""
        proto, h = self.exchange(b"HTTP/1.1 204\r\n\r\n")
        self.assertEqual(h.head, (204, b"", []))
        self.assertTrue(h.ended)

    def test_invalidHeaderNameFails(self):
        """A name that is not a token (it could split the line we send on) fails the response."""
        for line in (b"Bad Name: x", b"Bad(Name): x", b" Folded: x", b"no colon", b": no name"):
            proto, h = self.exchange(b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 0\r\n\r\n")
            self.assertIsNotNone(h.failed, line)
            self.assertIsNone(h.head, line)




class PoolKeyTests(SynchronousTestCase):
    """The pool shares a connection only between requests of the same shape."""

    def test_shapeSeparatesConnections(self):
        """An idle connection made with one shape is not given to a request with another."""
        from twisted.internet.testing import MemoryReactorClock

        reactor_ = MemoryReactorClock()
        pool = UpstreamPool(reactor_)
        backend = Backend("a", "127.0.0.1", 8443)
        got = []
        tls = object()
        pool.get(backend, 5, lambda p, reused: got.append((p, reused)), None, tls, shape=("A",))
        factory = reactor_.sslClients[0][2]
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        proto.release()
        pool.get(backend, 5, lambda p, reused: got.append((p, reused)), None, tls, shape=("B",))
        self.assertEqual(got, [(proto, False)])
        self.assertEqual(len(reactor_.sslClients), 2)
        pool.get(backend, 5, lambda p, reused: got.append((p, reused)), None, tls, shape=("A",))
        self.assertEqual(got, [(proto, False), (proto, True)])


class Recorder(Resource):
    """A backend that records what it received."""

    isLeaf = True

    def __init__(self):
        Resource.__init__(self)
        self.requests = []

    def render(self, request):
        self.requests.append((request.method, request.uri, request.requestHeaders, request.content.read()))
        if request.uri == b"/big":
            request.setHeader(b"content-type", b"application/octet-stream")
            return b"x" * (20 * 1024 * 1024)
        if request.uri == b"/upload":
            return b"%d" % len(self.requests[-1][3])
        request.setHeader(b"connection", b"x-secret")
        request.setHeader(b"x-secret", b"hop")
        request.setHeader(b"keep-alive", b"timeout=5")
        return b"ok"


class Silent(Resource):
    """Accepts requests and never answers."""

    isLeaf = True

    def render(self, request):
        return NOT_DONE_YET


class HalfAnswer(protocol.Protocol):
    """Answers half a response and dies."""

    def dataReceived(self, data):
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        self.transport.loseConnection()


class CloseBeforeAnswer(protocol.Protocol):
    def dataReceived(self, data):
        self.factory.seen += 1
        self.transport.loseConnection()


class ResponseHopByHopTests(SynchronousTestCase):
    """Which fields of a backend's response are not forwarded."""

    def test_withoutConnection(self) -> None:
        """Without a Connection header, the standard hop-by-hop headers are the ones dropped."""
        self.assertEqual(_response_hop_by_hop([(b"Server", b"x"), (b"Content-Length", b"1")]), HOP_BY_HOP)

    def test_connectionNamesFields(self) -> None:
        """The fields a Connection header names go too, whatever the case and spacing."""
        drop = _response_hop_by_hop([(b"connection", b"Keep-Alive, X-Private ,close")])
        self.assertEqual(drop, HOP_BY_HOP | {b"x-private", b"close"})

    def test_severalConnectionHeaders(self) -> None:
        """Every header named by any Connection header is dropped too, without changing the cached sets."""
        drop = _response_hop_by_hop([(b"Connection", b"x-one"), (b"CONNECTION", b"x-two")])
        self.assertEqual(drop, HOP_BY_HOP | {b"x-one", b"x-two"})
        # The cached sets are not changed by the union.
        self.assertEqual(_response_hop_by_hop([(b"Connection", b"x-one")]), HOP_BY_HOP | {b"x-one"})


def _reachable(roots, stop=()) -> dict:
    """
    The objects reachable from C{roots} (by C{gc.get_referents}), by id, not
    going through modules, classes and functions (the program, not its
    data) nor through the objects in C{stop}.  The objects are kept, so that
    their ids are not reused.
    """
    program = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType, types.FrameType)
    found = {}
    todo = list(roots)
    while todo:
        obj = todo.pop()
        key = id(obj)
        if key in found or key in stop or isinstance(obj, program):
            continue
        found[key] = obj
        todo.extend(gc.get_referents(obj))
    return found


class RequestLoop:
    """
    A client connection to an HTTP listener (insert-cookie persistence in
    front of the proxy, two backends) and its backend connections, over
    L{StringTransport}s: each L{one} feeds one request and answers it from
    the backend connection that got it.  (The shape of bench/inproc.py's
    rig, kept here so that the suite does not import the benchmarks.)
    """

    RESPONSE = (
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: 13\r\nConnection: keep-alive\r\n\r\nhello from 0\n"
    )

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.reactor = MemoryReactorClock()
        group = BackendGroup("web", [Backend("a", "127.0.0.1", 8001), Backend("b", "127.0.0.1", 8002)])
        proxy = BalancedProxyResource(group, reactor=self.reactor, pool=UpstreamPool(self.reactor), access_log=False)
        factory = HTTPFrontFactory(InsertCookie(proxy, reactor=self.reactor), reactor=self.reactor)
        client = IPv4Address("TCP", "127.0.0.1", 40000)
        self.front = factory.buildProtocol(client)
        self.client = StringTransport(peerAddress=client)
        self.front.makeConnection(self.client)
        self.upstreams: List[tuple] = []  # (protocol, transport)

    def one(self) -> None:
        """One request through, answered 200 (else an AssertionError)."""
        self.front.dataReceived(self.request)
        while self.reactor.tcpClients:
            host, port, factory, _, _ = self.reactor.tcpClients.pop(0)
            proto = factory.buildProtocol(IPv4Address("TCP", host, port))
            transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
            proto.makeConnection(transport)
            self.upstreams.append((proto, transport))
        for proto, transport in self.upstreams:
            if transport.value():
                transport.clear()
                proto.dataReceived(self.RESPONSE)
                break
        else:
            raise AssertionError("no backend connection got the request")
        out = self.client.value()
        if not out.startswith(b"HTTP/1.1 200 "):
            raise AssertionError(f"unexpected answer: {out[:200]!r}")
        self.client.clear()


class GarbageTests(SynchronousTestCase):
    """
    A proxied request leaves no reference cycle behind: on CPython reference
    counting frees it as soon as it is answered, and the garbage collector,
    which would otherwise run every few requests, has nothing to find.
    """

    def assertNoCycles(self, request: bytes) -> None:
        rig = RequestLoop(request)  # a listener with insert-cookie persistence, the proxy, pooled backends
        for _ in range(5):
            rig.one()
        # What lives longer than a request: the listener, the proxy, the
        # connections.  A cycle made by a request goes through objects of
        # its own, and back to the request.
        lasting = _reachable([rig])
        answered = []
        finish = FrontRequest.finish

        def recording(request):
            answered.append(request)
            finish(request)

        self.patch(FrontRequest, "finish", recording)
        rig.one()
        self.assertEqual(len(answered), 1)
        own = _reachable(gc.get_referents(answered[0]), lasting)
        self.assertFalse(id(answered[0]) in own, "the answered request is reachable from itself")
        if platform.python_implementation() == "CPython":
            # Nor any other cycle: the collector finds nothing after 50 requests.
            gc.collect()
            if gc.isenabled():
                gc.disable()
                self.addCleanup(gc.enable)
            for _ in range(50):
                rig.one()
            self.assertEqual(gc.collect(), 0)

    def test_newClient(self) -> None:
        """A client without a cookie: a backend is chosen and the cookie set."""
        self.assertNoCycles(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

    def test_pinnedClient(self) -> None:
        """A client whose cookie pins it to a backend."""
        self.assertNoCycles(b"GET / HTTP/1.1\r\nHost: x\r\nCookie: a=1; SERVERID=a; b=2\r\n\r\n")


class StatsRecorder:
    """A listener's stats object that records each finished request."""

    def __init__(self, done):
        self.done = done

    def request_done(self, backend, status, outcome, sent, received=0):
        self.done.append((backend.name if backend else None, status))


class ProxyTests(TestCase):
    """The proxy behind twisted.web (L{BalancerSite}, for embedding)."""

    timeout = 60
    site_class = BalancerSite

    @defer.inlineCallbacks
    def listen(self, factory):
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return port

    @defer.inlineCallbacks
    def proxy(self, *backends, clock=None, request_timeout=60.0, retries=2):
        group = BackendGroup("g", [Backend(f"b{i}", "127.0.0.1", p) for i, p in enumerate(backends)], retries=retries)
        from twisted_slb.scheduling import RoundRobin

        group.scheduler = RoundRobin()
        pool = UpstreamPool(reactor)
        self.addCleanup(pool.close)
        resource = BalancedProxyResource(group, reactor=clock or reactor, pool=pool, request_timeout=request_timeout)
        site = self.site_class(resource, reactor=reactor)
        self.site, self.resource = site, resource
        port = yield self.listen(site)
        return f"http://127.0.0.1:{port.getHost().port}", group

    def agent(self, persistent: bool = False):
        """An HTTP client: a connection per request, or one kept-alive connection."""
        pool = HTTPConnectionPool(reactor, persistent=persistent)
        if persistent:
            pool.maxPersistentPerHost = 1
            self.addCleanup(pool.closeCachedConnections)
        return Agent(reactor, pool=pool)

    @defer.inlineCallbacks
    def test_backendConnectionsLeanOrNot(self):
        """
        Plain backend connections run on L{twisted_slb._io.lean}'s transports;
        with the pool's C{lean} off, on C{connectTCP}'s.  Either way the
        request is answered.
        """
        port = yield self.listen(Site(Recorder()))
        for use_lean, transport_type in ((True, lean.LeanConnection), (False, tcp.Client)):
            url, _ = yield self.proxy(port.getHost().port)
            pool = self.resource.pool
            pool.lean = use_lean
            response = yield self.agent().request(b"GET", (url + "/").encode())
            yield readBody(response)
            self.assertEqual(response.code, 200)
            self.assertEqual({type(p.transport) for p in pool.all}, {transport_type})

    @defer.inlineCallbacks
    def test_headersOnTheWayToTheBackend(self):
        """Hop-by-hop headers stripped, Host kept, X-Forwarded-* set."""
        recorder = Recorder()
        port = yield self.listen(Site(recorder))
        url, _ = yield self.proxy(port.getHost().port)
        headers = Headers({b"host": [b"app.example.com"], b"connection": [b"keep-alive, x-drop"],
                           b"x-drop": [b"1"], b"te": [b"trailers"], b"x-forwarded-for": [b"198.51.100.1"],
                           b"x-keep": [b"yes"]})
        response = yield self.agent().request(b"GET", (url + "/p?q=1").encode(), headers)
        yield readBody(response)
        method, uri, seen, _ = recorder.requests[0]
        self.assertEqual((method, uri), (b"GET", b"/p?q=1"))
        self.assertEqual(seen.getRawHeaders(b"host"), [b"app.example.com"])
        self.assertEqual(seen.getRawHeaders(b"x-forwarded-for"), [b"198.51.100.1, 127.0.0.1"])
        self.assertEqual(seen.getRawHeaders(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(seen.getRawHeaders(b"x-forwarded-host"), [b"app.example.com"])
        self.assertEqual(seen.getRawHeaders(b"x-keep"), [b"yes"])
        for gone in (b"x-drop", b"te"):
            self.assertIsNone(seen.getRawHeaders(gone))

    @defer.inlineCallbacks
    def test_hopByHopStrippedFromResponses(self):
        """Hop-by-hop headers of the backend's response (and those its Connection names) do not reach the client."""
        port = yield self.listen(Site(Recorder()))
        url, _ = yield self.proxy(port.getHost().port)
        response = yield self.agent().request(b"GET", (url + "/").encode())
        self.assertEqual((yield readBody(response)), b"ok")
        self.assertIsNone(response.headers.getRawHeaders(b"x-secret"))
        self.assertIsNone(response.headers.getRawHeaders(b"keep-alive"))

    @defer.inlineCallbacks
    def test_keepAliveReusesBackendConnections(self):
        """The later requests of a kept-alive client connection reuse its backend connection."""
        recorder = Recorder()
        site = Site(recorder)
        built = []
        original = site.buildProtocol
        site.buildProtocol = lambda addr: built.append(addr) or original(addr)
        port = yield self.listen(site)
        url, _ = yield self.proxy(port.getHost().port)
        agent = self.agent(persistent=True)
        for _ in range(5):
            yield readBody((yield agent.request(b"GET", (url + "/").encode())))
        self.assertEqual(len(recorder.requests), 5)
        self.assertEqual(len(built), 1)

    @defer.inlineCallbacks
    def test_firstRequestOfAClientGetsAFreshConnection(self):
        """
        The first request of each client connection goes on a new backend
        connection, never on one another client used (HAProxy's
        "http-reuse safe").
        """
        recorder = Recorder()
        site = Site(recorder)
        built = []
        original = site.buildProtocol
        site.buildProtocol = lambda addr: built.append(addr) or original(addr)
        port = yield self.listen(site)
        url, _ = yield self.proxy(port.getHost().port)
        agent = self.agent()  # a connection per request
        for _ in range(3):
            yield readBody((yield agent.request(b"GET", (url + "/").encode())))
        self.assertEqual(len(recorder.requests), 3)
        self.assertEqual(len(built), 3)

    @defer.inlineCallbacks
    def test_idleConnectionClosedAsItIsReusedIsSentAgainToTheSameBackend(self):
        """
        A backend that closes an idle kept-alive connection just as a request
        goes out on it (its keep-alive timeout) has not failed: the request
        goes to the same backend again, on a new connection, and nothing is
        counted against it (so a pinned client stays, even with strict).
        """
        from twisted.internet import protocol as _protocol

        class ClosesSecondRequest(_protocol.Protocol):
            def connectionMade(self):
                self.factory.connections += 1
                self.served = 0
                self.buffer = b""

            def dataReceived(self, data):
                self.buffer += data
                while b"\r\n\r\n" in self.buffer:
                    _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
                    if self.served:
                        self.transport.loseConnection()  # the keep-alive race
                        return
                    self.served += 1
                    self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        factory = _protocol.ServerFactory.forProtocol(ClosesSecondRequest)
        factory.connections = 0
        port = yield self.listen(factory)
        url, group = yield self.proxy(port.getHost().port, retries=0)
        agent = self.agent(persistent=True)
        for _ in range(2):
            response = yield agent.request(b"GET", (url + "/").encode())
            self.assertEqual((response.code, (yield readBody(response))), (200, b"ok"))
        self.assertEqual(factory.connections, 2)
        self.assertEqual(group.get("b0").failures, 0)

    @defer.inlineCallbacks
    def test_unsafeRequestsGetAFreshConnection(self):
        """
        A POST never goes on an idle pooled connection (the backend might
        close it just as the request is written, and a POST cannot be sent
        again); GETs reuse connections.
        """
        recorder = Recorder()
        site = Site(recorder)
        built = []
        original = site.buildProtocol
        site.buildProtocol = lambda addr: built.append(addr) or original(addr)
        port = yield self.listen(site)
        url, _ = yield self.proxy(port.getHost().port)
        agent = self.agent(persistent=True)
        yield readBody((yield agent.request(b"GET", (url + "/").encode())))
        body = FileBodyProducer(__import__("io").BytesIO(b"x"))
        yield readBody((yield agent.request(b"POST", (url + "/upload").encode(), None, body)))
        yield readBody((yield agent.request(b"GET", (url + "/").encode())))
        self.assertEqual(len(recorder.requests), 3)
        self.assertEqual(len(built), 2)

    @defer.inlineCallbacks
    def test_refusedBackendRetriedForGet(self):
        """A GET to a backend that refuses the connection is retried on another, and the failure counted."""
        dead_port = refusing_port(self)
        live = yield self.listen(Site(Recorder()))
        url, group = yield self.proxy(dead_port, live.getHost().port)
        response = yield self.agent().request(b"GET", (url + "/").encode())
        self.assertEqual((response.code, (yield readBody(response))), (200, b"ok"))
        self.assertEqual(group.backends[0].failures, 1)

    @defer.inlineCallbacks
    def test_postWithBodyNotRetried(self):
        """A POST whose backend dies after receiving it is not replayed: 502."""
        closer = protocol.ServerFactory.forProtocol(CloseBeforeAnswer)
        closer.seen = 0
        first = yield self.listen(closer)
        second = yield self.listen(closer)
        url, _ = yield self.proxy(first.getHost().port, second.getHost().port)
        response = yield self.agent().request(b"POST", (url + "/").encode(), None,
                                              FileBodyProducer(__import__("io").BytesIO(b"payload")))
        yield readBody(response)
        self.assertEqual(response.code, 502)
        self.assertEqual(closer.seen, 1)

    @defer.inlineCallbacks
    def test_getAfterBackendDiesBeforeAnswerIsRetried(self):
        """A GET whose backend closes before answering is retried on another backend."""
        closer = protocol.ServerFactory.forProtocol(CloseBeforeAnswer)
        closer.seen = 0
        first = yield self.listen(closer)
        live = yield self.listen(Site(Recorder()))
        url, _ = yield self.proxy(first.getHost().port, live.getHost().port)
        response = yield self.agent().request(b"GET", (url + "/").encode())
        self.assertEqual((response.code, (yield readBody(response))), (200, b"ok"))

    @defer.inlineCallbacks
    def test_noUsableBackendIs503(self):
        """With every backend down, the proxy answers 503 itself."""
        port = yield self.listen(Site(Recorder()))
        url, group = yield self.proxy(port.getHost().port)
        group.backends[0].up = False
        response = yield self.agent().request(b"GET", (url + "/").encode())
        body = yield readBody(response)
        self.assertEqual(response.code, 503)
        self.assertIn(b"503 Service Unavailable", body)

    @defer.inlineCallbacks
    def test_allRefusedIs502(self):
        """With every backend refusing connections, the proxy answers 502."""
        dead_port = refusing_port(self)
        url, _ = yield self.proxy(dead_port)
        response = yield self.agent().request(b"GET", (url + "/").encode())
        yield readBody(response)
        self.assertEqual(response.code, 502)

    @defer.inlineCallbacks
    def test_slowBackendIs504(self):
        """A backend that does not answer within request_timeout gets the client a 504."""
        clock = Clock()
        silent = Resource()
        silent.isLeaf = True
        arrived = defer.Deferred()

        def render(request):
            arrived.callback(None)
            return NOT_DONE_YET

        silent.render = render
        port = yield self.listen(Site(silent))
        url, group = yield self.proxy(port.getHost().port, clock=clock, request_timeout=30)
        d = self.agent().request(b"GET", (url + "/").encode())
        yield arrived
        clock.advance(30)
        response = yield d
        body = yield readBody(response)
        self.assertEqual((response.code, body), (504, b"504 Gateway Timeout: the backend did not answer in time\n"))

    @defer.inlineCallbacks
    def test_largeBodiesStreamBothWays(self):
        """20 MB response and request bodies pass through the proxy whole."""
        recorder = Recorder()
        port = yield self.listen(Site(recorder))
        url, _ = yield self.proxy(port.getHost().port)
        response = yield self.agent().request(b"GET", (url + "/big").encode())
        body = yield readBody(response)
        self.assertEqual(len(body), 20 * 1024 * 1024)
        upload = __import__("io").BytesIO(b"y" * (20 * 1024 * 1024))
        response = yield self.agent().request(b"POST", (url + "/upload").encode(), None, FileBodyProducer(upload))
        self.assertEqual((yield readBody(response)), b"%d" % (20 * 1024 * 1024))

    @defer.inlineCallbacks
    def test_backendDyingMidResponseClosesTheClient(self):
        """
        A backend dying mid-response cuts the client's connection (showing the truncation), and the request is
        counted once.
        """
        port = yield self.listen(protocol.ServerFactory.forProtocol(HalfAnswer))
        url, _ = yield self.proxy(port.getHost().port)
        done = []
        self.resource.stats = StatsRecorder(done)
        response = yield self.agent().request(b"GET", (url + "/").encode())
        with self.assertRaises(ResponseFailed):
            yield readBody(response)
        yield self.site.admission.drain(30, lambda channel: None)
        # One request, counted (and logged) once: not again when the
        # client's connection, cut to show the truncation, is lost.
        self.assertEqual(done, [("b0", 200)])

    @defer.inlineCallbacks
    def test_clientClosingMidResponseLogsNoError(self):
        """A client aborting mid-response while the backend goes on and finishes logs no error."""
        arrived = defer.Deferred()
        slow = Resource()
        slow.isLeaf = True
        held = []

        def render(request):
            request.setHeader(b"content-length", b"100")
            request.write(b"part")
            held.append(request)
            arrived.callback(None)
            return NOT_DONE_YET

        slow.render = render
        port = yield self.listen(Site(slow))
        url, _ = yield self.proxy(port.getHost().port)

        class Rude(protocol.Protocol):
            def connectionMade(self):
                self.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

            def dataReceived(self, data):
                self.transport.abortConnection()

        host, _, number = url.rpartition(":")
        yield protocol.ClientCreator(reactor, Rude).connectTCP("127.0.0.1", int(number))
        yield arrived
        # Let the proxy see the client go, then the backend finish anyway.
        yield __import__("twisted.internet.task", fromlist=["deferLater"]).deferLater(reactor, 0, lambda: None)
        held[0].write(b"x" * 96)
        held[0].finish()
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_upgradeRefused(self):
        """Behind BalancerSite an Upgrade request is answered 501 (only the listeners' own server tunnels)."""
        port = yield self.listen(Site(Recorder()))
        url, _ = yield self.proxy(port.getHost().port)
        headers = Headers({b"connection": [b"Upgrade"], b"upgrade": [b"websocket"]})
        response = yield self.agent().request(b"GET", (url + "/").encode(), headers)
        yield readBody(response)
        self.assertEqual(response.code, 501)

    @defer.inlineCallbacks
    def test_oversizedHeadersAre431(self):
        """A request with 70 KB of headers is refused with 431."""
        port = yield self.listen(Site(Recorder()))
        url, _ = yield self.proxy(port.getHost().port)
        headers = Headers({b"x-big": [b"a" * 70000]})
        response = yield self.agent().request(b"GET", (url + "/").encode(), headers)
        yield readBody(response)
        self.assertEqual(response.code, 431)


class FrontProxyTests(ProxyTests):
    """The same, behind the listeners' own HTTP/1.1 server (L{HTTPFrontFactory})."""

    site_class = HTTPFrontFactory

    @defer.inlineCallbacks
    def test_upgradeRefused(self):
        """
        Here an Upgrade is forwarded (see L{TunnelTests}); a backend that
        does not switch answers normally.
        """
        recorder = Recorder()
        port = yield self.listen(Site(recorder))
        url, _ = yield self.proxy(port.getHost().port)
        headers = Headers({b"connection": [b"Upgrade"], b"upgrade": [b"websocket"]})
        response = yield self.agent().request(b"GET", (url + "/").encode(), headers)
        yield readBody(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(recorder.requests[-1][2].getRawHeaders(b"upgrade"), [b"websocket"])


class SwitchingBackend(protocol.Protocol):
    """Answers an Upgrade with 101 (and a cookie), then echoes bytes in upper case."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.buffer = b""
        self.switched = False
        self.lost: defer.Deferred = defer.Deferred()

    def connectionLost(self, reason):
        self.lost.callback(None)

    def dataReceived(self, data):
        if self.switched:
            self.transport.write(data.upper())
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            self.factory.heads.append(head)
            self.switched = True
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Set-Cookie: app=1\r\n\r\nhello"
            )
            if rest:
                self.transport.write(rest.upper())


class TunnelClient(protocol.Protocol):
    def __init__(self, request: bytes):
        self.request = request
        self.received = b""
        self.waiting = []
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.received += data
        for marker, d in list(self.waiting):
            if marker in self.received:
                self.waiting.remove((marker, d))
                d.callback(self.received)

    def wait_for(self, marker: bytes) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if marker in self.received:
            d.callback(self.received)
        else:
            self.waiting.append((marker, d))
        return d

    def connectionLost(self, reason):
        self.closed.callback(self.received)


class TunnelTests(TestCase):
    """Upgrade (WebSocket) through the listeners' server: a 101 turns both connections into a tunnel."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        from twisted_slb.persistence.cookies import InsertCookie

        self.backend = protocol.ServerFactory.forProtocol(SwitchingBackend)
        self.backend.connections = []
        self.backend.heads = []
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.backend)
        self.addCleanup(port.stopListening)
        pool = UpstreamPool(reactor)
        self.addCleanup(pool.close)
        self.group = BackendGroup("g", [Backend("a", "127.0.0.1", port.getHost().port)])
        resource = InsertCookie(BalancedProxyResource(self.group, pool=pool, access_log=False))
        self.factory = HTTPFrontFactory(resource, tunnel_timeout=5)
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.factory)
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    def connect(self, request: bytes):
        return protocol.ClientCreator(reactor, TunnelClient, request).connectTCP("127.0.0.1", self.port)

    UPGRADE = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"

    @defer.inlineCallbacks
    def test_switchAndRelayBothWays(self):
        """
        A WebSocket upgrade reaches the backend, whose 101 reaches the client with both cookies; bytes (early
        ones included) then flow both ways, and closing frees the backend.
        """
        client = yield self.connect(self.UPGRADE + b"early")
        yield client.wait_for(b"hello")
        head = client.received.split(b"\r\n\r\n", 1)[0]
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertIn(b"\r\nConnection: Upgrade", head)
        self.assertIn(b"\r\nUpgrade: websocket", head)
        self.assertIn(b"Set-Cookie: SERVERID=", head)  # the persistence cookie rides on the 101
        self.assertIn(b"Set-Cookie: app=1", head)
        yield client.wait_for(b"EARLY")  # bytes sent before the 101 are relayed
        client.transport.write(b"ping")
        yield client.wait_for(b"PING")
        sent = self.backend.heads[0]
        self.assertIn(b"\r\nConnection: Upgrade\r\nUpgrade: websocket", sent)
        client.transport.loseConnection()
        yield client.closed
        yield self.backend.connections[0].lost  # the balancer closed its side too
        self.assertEqual(self.group.get("a").active, 0)

    @defer.inlineCallbacks
    def test_backendClosingEndsTheTunnel(self):
        """The backend closing a tunnel closes the client's connection too."""
        client = yield self.connect(self.UPGRADE)
        yield client.wait_for(b"hello")
        self.backend.connections[0].transport.loseConnection()
        yield client.closed
        self.assertEqual(len(self.factory.channels), 0)

    @defer.inlineCallbacks
    def test_http10UpgradeIsRefused(self):
        """An HTTP/1.0 upgrade request is refused with 501 and never reaches a backend."""
        client = yield self.connect(b"GET / HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        response = yield client.closed
        self.assertTrue(response.startswith(b"HTTP/1.1 501 "), response)
        self.assertEqual(self.backend.heads, [])
