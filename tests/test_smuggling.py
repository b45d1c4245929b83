"""
Malformed and ambiguous requests through the HTTP listener, with a backend
that records exactly the bytes it receives: each gets the right status, and
nothing reaches the backend in a form it could read differently from us.
"""

from __future__ import annotations

from typing import List

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.web.front import HTTPFrontFactory
from twisted_slb.web.proxy import BalancedProxyResource, BalancerSite
from twisted_slb.web.upstream import UpstreamPool


class RecordingBackend(protocol.Protocol):
    """Records raw bytes; answers each request head with a 2-byte body."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.buffer = b""

    def dataReceived(self, data):
        self.factory.received.append(data)
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


class RawClient(protocol.Protocol):
    """Sends bytes, collects everything until the server closes."""

    def __init__(self, data: bytes):
        self.data = data
        self.response = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.data)

    def dataReceived(self, data):
        self.response += data

    def connectionLost(self, reason):
        self.done.callback(self.response)


class SmugglingTests(TestCase):
    """Through L{BalancerSite} (twisted.web, for embedding)."""

    timeout = 30
    site_class = BalancerSite

    @defer.inlineCallbacks
    def setUp(self):
        self.backend = protocol.ServerFactory.forProtocol(RecordingBackend)
        self.backend.received: List[bytes] = []
        self.backend.connections = []
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.backend)
        self.addCleanup(port.stopListening)
        pool = UpstreamPool(reactor)
        self.addCleanup(pool.close)
        group = BackendGroup("g", [Backend("a", "127.0.0.1", port.getHost().port)])
        site = self.site_class(BalancedProxyResource(group, pool=pool), client_idle_timeout=5)
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    @defer.inlineCallbacks
    def send(self, data: bytes) -> bytes:
        client = RawClient(data)
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", self.port)
        response = yield client.done
        return response

    @defer.inlineCallbacks
    def assertRefused(self, data: bytes, status: bytes = b"400"):
        response = yield self.send(data)
        self.assertTrue(response.startswith(b"HTTP/1.1 " + status), response)
        self.assertEqual(self.backend.received, [])

    def test_contentLengthAndTransferEncoding(self):
        return self.assertRefused(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        )

    def test_twoContentLengths(self):
        return self.assertRefused(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde")

    def test_transferEncodingOtherThanChunked(self):
        return self.assertRefused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc")

    def test_malformedChunkSize(self):
        return self.assertRefused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")

    def test_spaceBeforeColon(self):
        return self.assertRefused(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n")

    def test_nulInHeader(self):
        return self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n")

    def test_invalidMethod(self):
        return self.assertRefused(b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n")

    def test_http09(self):
        return self.assertRefused(b"GET /\r\n\r\n")

    def test_missingHost(self):
        return self.assertRefused(b"GET / HTTP/1.1\r\n\r\n")

    def test_twoHosts(self):
        return self.assertRefused(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")

    @defer.inlineCallbacks
    def test_absoluteFormBecomesOriginFormWithItsHost(self):
        response = yield self.send(b"GET http://app.example/p?q=1 HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n")
        self.assertTrue(response.startswith(b"HTTP/1.1 200"))
        sent = b"".join(self.backend.received)
        self.assertTrue(sent.startswith(b"GET /p?q=1 HTTP/1.1\r\nHost: app.example\r\n"), sent)
        self.assertNotIn(b"other", sent)

    @defer.inlineCallbacks
    def test_chunkedBodyIsReframed(self):
        """A chunked upload reaches the backend with a Content-Length and no Transfer-Encoding."""
        response = yield self.send(
            b"POST /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        self.assertTrue(response.startswith(b"HTTP/1.1 200"))
        sent = b"".join(self.backend.received)
        self.assertIn(b"\r\nContent-Length: 5\r\n", sent)
        self.assertNotIn(b"transfer-encoding", sent.lower())
        self.assertTrue(sent.endswith(b"\r\n\r\nabcde"))

    @defer.inlineCallbacks
    def test_pipelinedRequestsWithALaterBadOne(self):
        """The good requests are answered in order, then the bad one gets 400."""
        response = yield self.send(
            b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\nBAD\r\n\r\n"
        )
        self.assertEqual(response.count(b"HTTP/1.1 200 OK"), 2)
        self.assertTrue(response.rsplit(b"HTTP/1.1 ", 1)[1].startswith(b"400 Bad Request\r\n"), response)
        sent = b"".join(self.backend.received)
        self.assertLess(sent.index(b"GET /1 "), sent.index(b"GET /2 "))
        self.assertNotIn(b"BAD", sent)


    # -- issue 22's reproductions (both servers) ----------------------------

    @defer.inlineCallbacks
    def test_invalidByteInTheVersion(self):
        """Issue 22, case 1: C{HTTP/1\\xab1} gets 400 and a close (trial fails on any logged error)."""
        response = yield self.send(b"GET / HTTP/1\xab1\r\nHost: a\r\n\r\n")
        self.assertTrue(response.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 505 ")), response)
        self.assertEqual(self.backend.received, [])

    @defer.inlineCallbacks
    def test_invalidVersionPipelinedBehindAGoodRequest(self):
        """
        Issue 22, case 1, pipelined: /u is answered, then the bad request gets
        400 at once (not a 408 a minute later), and the backend connection is
        kept for the next client.
        """
        response = yield self.send(
            b"GET /u HTTP/1.1\r\nHost: a\r\n\r\nGET /v HTTP/1\xab1\r\nHost: a\r\n\r\n")
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK\r\n"), response)
        self.assertIn(b"HTTP/1.1 400 ", response)
        self.assertNotIn(b"/v", b"".join(self.backend.received))
        yield self.send(b"GET /w HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        self.assertEqual(len(self.backend.connections), 1)

    @defer.inlineCallbacks
    def test_http10WithoutHostGetsTheListenersAddress(self):
        """
        Issue 22, case 3: an HTTP/1.0 request without Host reaches the
        backend as HTTP/1.1 with C{Host} set to the listener's address.
        """
        response = yield self.send(b"GET /h10 HTTP/1.0\r\n\r\n")
        self.assertTrue(response.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), response)  # twisted.web: 1.0
        sent = b"".join(self.backend.received)
        self.assertTrue(sent.startswith(b"GET /h10 HTTP/1.1\r\n"), sent)
        self.assertIn(b"\r\nHost: 127.0.0.1:%d\r\n" % (self.port,), sent)
        self.assertEqual(sent.lower().count(b"\r\nhost:"), 1)

    @defer.inlineCallbacks
    def test_connectionNamingHostKeepsHost(self):
        """Issue 22, case 4: C{Connection: Host} does not remove Host, nor Cookie."""
        response = yield self.send(
            b"GET /h HTTP/1.1\r\nHost: a\r\nCookie: s=1\r\nX-Hop: 1\r\n"
            b"Connection: Host, Cookie, Content-Length, Transfer-Encoding, X-Hop, close\r\n\r\n")
        self.assertTrue(response.startswith(b"HTTP/1.1 200"), response)
        sent = b"".join(self.backend.received)
        self.assertIn(b"\r\nHost: a\r\n", sent)
        self.assertIn(b"\r\nCookie: s=1\r\n", sent)
        self.assertNotIn(b"x-hop", sent.lower())  # what Connection may name is still removed

    def test_absoluteFormWithAnInvalidPort(self):
        """Issue 22, case 5: port 99999 in an absolute-form target is 400."""
        return self.assertRefused(b"GET http://a:99999/ HTTP/1.1\r\nHost: a\r\n\r\n")

    def test_absoluteFormWithAFragment(self):
        """Issue 22, case 5: a #fragment in an absolute-form target is 400."""
        return self.assertRefused(b"GET http://a/p#frag HTTP/1.1\r\nHost: a\r\n\r\n")

    def test_originFormWithAFragment(self):
        """A #fragment is no part of any request target (RFC 9112 3.2): 400."""
        return self.assertRefused(b"GET /p#frag HTTP/1.1\r\nHost: a\r\n\r\n")


class FrontSmugglingTests(SmugglingTests):
    """
    The same through the listeners' own HTTP/1.1 server, plus the requests
    only it refuses with a status (twisted.web closes on some of them).
    """

    site_class = HTTPFrontFactory

    def test_bareLF(self):
        return self.assertRefused(b"GET / HTTP/1.1\nHost: x\n\n")

    def test_bareCR(self):
        return self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\rX-Y: z\r\n\r\n")

    def test_obsFold(self):
        return self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\nX-Y: a\r\n  b\r\n\r\n")

    def test_requestLineOverTheLimit(self):
        return self.assertRefused(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414")

    def test_headersOverTheLimit(self):
        return self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n", b"431")

    def test_tooManyHeaders(self):
        return self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 101 + b"\r\n", b"431")

    @defer.inlineCallbacks
    def test_upgradeIsForwardedAsSuch(self):
        """An Upgrade reaches the backend with exactly one Connection and one Upgrade header."""
        response = yield self.send(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
            b"Connection: close\r\n\r\n"
        )
        self.assertTrue(response.startswith(b"HTTP/1.1 200"), response)  # the backend did not switch
        sent = b"".join(self.backend.received).lower()
        self.assertEqual(sent.count(b"\r\nconnection:"), 1)
        self.assertEqual(sent.count(b"\r\nupgrade: websocket\r\n"), 1)

    def test_connect(self):
        return self.assertRefused(b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", b"501")
