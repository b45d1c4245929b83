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
        """A request with both Content-Length and Transfer-Encoding is refused and nothing reaches the backend."""
        return self.assertRefused(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        )

    def test_twoContentLengths(self):
        """Two different Content-Length headers are refused and nothing reaches the backend."""
        return self.assertRefused(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde")

    def test_transferEncodingOtherThanChunked(self):
        """A Transfer-Encoding other than chunked is refused and nothing reaches the backend."""
        return self.assertRefused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc")

    def test_malformedChunkSize(self):
        """A chunk size that is not hexadecimal is refused and nothing reaches the backend."""
        return self.assertRefused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")

    def test_spaceBeforeColon(self):
        """Whitespace before a header's colon is refused and nothing reaches the backend."""
        return self.assertRefused(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n")

    def test_nulInHeader(self):
        """A NUL byte in a header value is refused and nothing reaches the backend."""
        return self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n")

    def test_invalidMethod(self):
        """A method that is not a token is refused and nothing reaches the backend."""
        return self.assertRefused(b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n")

    def test_http09(self):
        """An HTTP/0.9 request (no version) is refused and nothing reaches the backend."""
        return self.assertRefused(b"GET /\r\n\r\n")

    def test_missingHost(self):
        """An HTTP/1.1 request without Host is refused and nothing reaches the backend."""
        return self.assertRefused(b"GET / HTTP/1.1\r\n\r\n")

    def test_twoHosts(self):
        """Two Host headers are refused and nothing reaches the backend."""
        return self.assertRefused(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")

    @defer.inlineCallbacks
    def test_absoluteFormBecomesOriginFormWithItsHost(self):
        """
        A request in absolute form reaches the backend in origin form, with the URL's host replacing the Host
        header.
        """
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
        kept (the client's bad bytes never reached its code): it stays open,
        idle in the pool.
        """
        response = yield self.send(
            b"GET /u HTTP/1.1\r\nHost: a\r\n\r\nGET /v HTTP/1\xab1\r\nHost: a\r\n\r\n")
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK\r\n"), response)
        self.assertIn(b"HTTP/1.1 400 ", response)
        self.assertNotIn(b"/v", b"".join(self.backend.received))
        [connection] = self.backend.connections
        self.assertTrue(connection.transport.connected)

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

    @defer.inlineCallbacks
    def test_chunkedBodyIsReframed(self):
        """
        A chunked upload is streamed, so it reaches the backend chunked, in
        chunks the balancer framed itself: no chunk extension, no trailer,
        no Content-Length.
        """
        response = yield self.send(
            b"POST /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
        self.assertTrue(response.startswith(b"HTTP/1.1 200"))
        sent = b"".join(self.backend.received)
        head, _, body = sent.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nTransfer-Encoding: chunked", head)
        self.assertNotIn(b"content-length", head.lower())
        self.assertEqual(body, b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")

    def test_bareLF(self):
        """A request with bare LF line ends is refused and nothing reaches the backend."""
        return self.assertRefused(b"GET / HTTP/1.1\nHost: x\n\n")

    def test_bareCR(self):
        """A bare CR inside the head is refused and nothing reaches the backend."""
        return self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\rX-Y: z\r\n\r\n")

    def test_obsFold(self):
        """A folded header line is refused and nothing reaches the backend."""
        return self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\nX-Y: a\r\n  b\r\n\r\n")

    def test_requestLineOverTheLimit(self):
        """A 70 KB request line is refused with 414 and nothing reaches the backend."""
        return self.assertRefused(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414")

    def test_headersOverTheLimit(self):
        """A 70 KB header is refused with 431 and nothing reaches the backend."""
        return self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n", b"431")

    def test_tooManyHeaders(self):
        """101 header lines are refused with 431 and nothing reaches the backend."""
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
        """CONNECT is refused with 501 and nothing reaches the backend."""
        return self.assertRefused(b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", b"501")


class DesyncBackend(protocol.Protocol):
    """
    A raw HTTP/1.1 backend that logs the exact bytes of each connection
    (C{self.log}) and reads what comes as requests one after the other, as a
    real server would.  It answers each with its path as the body, except:

      - C{POST /early}: a 401 at once, then it drains the announced body (and
        reads whatever follows as the next request);
      - C{POST /ignore}: a 200 without reading the body (which it then reads
        as requests);
      - C{/hidden}: answered with C{Set-Cookie: session=ATTACKER}, only when
        the next request arrives on the connection (a late answer);
      - C{/extra}: the answer, then at once an answer nobody asked for;
      - C{/304}: a 304; the test may send a late body with L{late};
      - C{/stall}: the head and 10 of 100 body bytes, then nothing.
    """

    ATTACKER = b"HTTP/1.1 200 OK\r\nSet-Cookie: session=ATTACKER\r\nContent-Length: 6\r\n\r\nhidden"

    def connectionMade(self):
        self.log = b""
        self.buffer = b""
        self.draining = 0
        self.pending = False
        self.closed: defer.Deferred = defer.Deferred()
        self.factory.connections.append(self)

    def dataReceived(self, data):
        self.log += data
        self.buffer += data
        while True:
            if self.draining:
                n = min(self.draining, len(self.buffer))
                self.draining -= n
                self.buffer = self.buffer[n:]
                if self.draining:
                    return
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            method, path = head.split(b" ", 2)[:2]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            self.answer(method, path, length)

    def answer(self, method, path, length):
        write = self.transport.write
        if self.pending:
            self.pending = False
            write(self.ATTACKER)
        if path == b"/early":
            write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope")
            self.draining = length
        elif path == b"/hidden":
            self.pending = True
        elif path == b"/extra":
            write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n/extra" + self.ATTACKER)
        elif path == b"/304":
            write(b"HTTP/1.1 304 Not Modified\r\n\r\n")
        elif path == b"/stall":
            write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        else:  # /ignore too: the body is left to be read as requests
            write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))

    def late(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason):
        self.closed.callback(None)


class Client(protocol.Protocol):
    """A client connection that keeps what it receives and can wait for some of it."""

    def __init__(self):
        self.received = b""
        self.waiting = []
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data):
        self.received += data
        for item in list(self.waiting):
            if self.received.count(item[0]) >= item[1]:
                self.waiting.remove(item)
                item[2].callback(self.received)

    def until(self, marker: bytes, count: int = 1) -> defer.Deferred:
        """Fires once C{marker} was received C{count} times."""
        d: defer.Deferred = defer.Deferred()
        if self.received.count(marker) >= count:
            d.callback(self.received)
        else:
            self.waiting.append((marker, count, d))
        return d

    def connectionLost(self, reason):
        self.done.callback(self.received)


def _get(path: bytes, extra: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"


class BackendDesyncTests(TestCase):
    """
    Desyncs on the backend side (issue 27): a backend connection whose last
    exchange did not end cleanly is never reused, and a client's first
    request never goes on a connection another client used, so that no
    request rides inside another's body and no client gets another's
    answer.  Through L{BalancerSite}.
    """

    timeout = 60
    site_class = BalancerSite

    @defer.inlineCallbacks
    def setUp(self):
        from twisted.internet.task import Clock

        self.backend = protocol.ServerFactory.forProtocol(DesyncBackend)
        self.backend.connections = []
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.backend)
        self.addCleanup(port.stopListening)
        self.pool = UpstreamPool(reactor)
        self.addCleanup(self.pool.close)
        self.group = BackendGroup("g", [Backend("a", "127.0.0.1", port.getHost().port)])
        # The proxy's timers run on a clock the tests move; sockets are real.
        self.clock = Clock()
        self.resource = BalancedProxyResource(self.group, reactor=self.clock, pool=self.pool,
                                              response_idle_timeout=5, access_log=False)
        site = self.site_class(self.resource, reactor=reactor, client_idle_timeout=30)
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    @defer.inlineCallbacks
    def connect(self) -> Client:
        client = Client()
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", self.port)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        return client

    def logs(self):
        return [c.log for c in self.backend.connections]

    def assertNoRequestAfter(self, path: bytes, body_length: int = 0) -> None:
        """
        No byte follows the request for C{path} (and its body) on the backend
        connection that carried it.
        """
        for log in self.logs():
            start = log.find(b" " + path + b" HTTP/1.1\r\n")
            if start < 0:
                continue
            end = log.index(b"\r\n\r\n", start) + 4
            self.assertLessEqual(len(log), end + body_length, log[end + body_length:][:200])

    @defer.inlineCallbacks
    def test_earlyAnswerConnectionNotReused(self):
        """
        A backend answers a large POST before reading its body: the client
        gets the answer, and the same client's next request (with a secret)
        goes on a new connection, not into the tail of the POST's body.  The
        backend is not counted as failing, and nothing is logged as an error.
        """
        size = 8_000_000
        client = yield self.connect()
        client.transport.write(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        client.transport.write(b"B" * size)
        client.transport.write(_get(b"/victim", b"Authorization: Bearer VICTIM-SECRET\r\n"))
        received = yield client.until(b"/victim")
        self.assertTrue(received.startswith(b"HTTP/1.1 401"), received[:100])
        yield self.backend.connections[0].closed
        self.assertNoRequestAfter(b"/early", size)
        carried = [log for log in self.logs() if b"VICTIM-SECRET" in log]
        self.assertEqual(len(carried), 1)
        self.assertTrue(carried[0].startswith(b"GET /victim "), carried[0][:100])
        self.assertEqual(self.group.backends[0].failures, 0)
        self.assertEqual(self.group.backends[0].active, 0)

    @defer.inlineCallbacks
    def test_threeEarlyAnswersAtOnce(self):
        """
        Three clients POST to a backend that answers early, at once: each gets
        its answer and then its own next request's, never the other's bytes;
        the backend is not marked failing.
        """
        size = 3_000_000
        clients = []
        for i in range(3):
            client = yield self.connect()
            clients.append(client)
            client.transport.write(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
            client.transport.write(b"B" * size + _get(b"/after%d" % i))
        for i, client in enumerate(clients):
            received = yield client.until(b"/after%d" % i)
            self.assertTrue(received.startswith(b"HTTP/1.1 401"), received[:100])
        self.assertNoRequestAfter(b"/early", size)
        self.assertEqual(self.group.backends[0].failures, 0)

    @defer.inlineCallbacks
    def test_requestHiddenInABodyNeverAnswersAnotherClient(self):
        """
        A backend ignores a POST body that holds a request, and answers that
        request late: the next client's first request goes on a new backend
        connection, so it gets its own answer, never the attacker's cookie.
        """
        attacker = yield self.connect()
        hidden = _get(b"/hidden")
        attacker.transport.write(b"POST /ignore HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(hidden), hidden))
        yield attacker.until(b"/ignore")
        victim = yield self.connect()
        victim.transport.write(_get(b"/victim", b"Connection: close\r\n"))
        received = yield victim.done
        self.assertNotIn(b"ATTACKER", received)
        self.assertTrue(received.startswith(b"HTTP/1.1 200"), received)
        self.assertTrue(received.endswith(b"/victim"), received)
        self.assertEqual(len(self.backend.connections), 2)
        self.assertNotIn(b"/victim", self.backend.connections[0].log)

    @defer.inlineCallbacks
    def test_bytesAfterAResponseNeverAnswerTheNextRequest(self):
        """
        A backend sends an answer and then a second one nobody asked for: the
        connection is closed, and the client's next (pipelined) request gets
        its own answer on a new connection.
        """
        client = yield self.connect()
        client.transport.write(_get(b"/extra") + _get(b"/next", b"Connection: close\r\n"))
        received = yield client.done
        self.assertNotIn(b"ATTACKER", received)
        self.assertEqual(received.count(b"HTTP/1.1 200"), 2, received)
        self.assertTrue(received.endswith(b"/next"), received)
        self.assertNoRequestAfter(b"/extra")

    @defer.inlineCallbacks
    def test_lateBodyAfter304ClosesTheIdleConnection(self):
        """
        Bytes that a backend sends on an idle pooled connection (a body after
        a 304) close it: the client's next request goes on a new connection
        and gets its own answer.
        """
        client = yield self.connect()
        client.transport.write(_get(b"/304"))
        yield client.until(b"304 Not Modified")
        first = self.backend.connections[0]
        first.late(self.ATTACKER_BODY)
        yield first.closed
        client.transport.write(_get(b"/next", b"Connection: close\r\n"))
        received = yield client.done
        self.assertNotIn(b"ATTACKER", received)
        self.assertTrue(received.endswith(b"/next"), received)
        self.assertNoRequestAfter(b"/304")

    ATTACKER_BODY = DesyncBackend.ATTACKER

    @defer.inlineCallbacks
    def test_laterRequestsOfAClientReuseAConnection(self):
        """A clean exchange leaves the connection to the same client's next request."""
        client = yield self.connect()
        client.transport.write(_get(b"/one"))
        yield client.until(b"/one")
        client.transport.write(_get(b"/two", b"Connection: close\r\n"))
        received = yield client.done
        self.assertTrue(received.endswith(b"/two"), received)
        self.assertEqual(len(self.backend.connections), 1)

    @defer.inlineCallbacks
    def test_stalledResponseCutAtTheTimeout(self):
        """
        A backend sends the head and part of the body, then nothing: after
        C{response_idle_timeout} both connections are closed, and the
        backend's C{active} count is back to 0.
        """
        client = yield self.connect()
        client.transport.write(_get(b"/stall"))
        yield client.until(b"0123456789")
        backend = self.group.backends[0]
        self.assertEqual(backend.active, 1)
        self.clock.advance(4.9)
        self.assertEqual(backend.active, 1)
        self.clock.advance(0.2)
        received = yield client.done
        self.assertTrue(received.endswith(b"0123456789"), received)
        yield self.backend.connections[0].closed
        self.assertEqual(backend.active, 0)
        self.assertEqual(self.pool.all, set())

    @defer.inlineCallbacks
    def test_stalledResponseAfterTheClientHalfCloses(self):
        """
        The client sends its request and half-closes, and the backend stalls
        mid-response: the timeout still closes both connections (no
        connection left in CLOSE-WAIT) and releases the counters.
        """
        client = yield self.connect()
        client.transport.write(_get(b"/stall"))
        yield client.until(b"0123456789")
        client.transport.loseWriteConnection()
        self.clock.advance(5.1)
        yield client.done
        yield self.backend.connections[0].closed
        self.assertEqual(self.group.backends[0].active, 0)


class FrontBackendDesyncTests(BackendDesyncTests):
    """The same through the listeners' own HTTP/1.1 server."""

    site_class = HTTPFrontFactory


class BackendTLSTests(TestCase):
    """
    Two groups with different TLS settings on one backend address (issue
    27): the pool never hands one group's connection to the other.
    """

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        import os

        from twisted.internet import ssl
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from tests.certs import CertificateAuthority, cert_pem, key_pem
        from twisted_slb.config import BackendTLSConfig
        from twisted_slb.tls import ClientTLSCache

        directory = os.path.abspath(self.mktemp())
        ca = CertificateAuthority()
        ca_path = ca.write(directory)
        issued = ca.issue(["backend.internal"])
        options = ssl.PrivateCertificate.loadPEM(key_pem(issued.key) + cert_pem(issued.certificate)).options()
        self.backend = protocol.ServerFactory.forProtocol(DesyncBackend)
        self.backend.connections = []
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            TLSMemoryBIOFactory(options, False, self.backend))
        self.addCleanup(port.stopListening)
        address = port.getHost().port
        pool = UpstreamPool(reactor)
        self.addCleanup(pool.close)
        cache = ClientTLSCache()
        self.ports = {}
        for name, tls in (("tlsA", BackendTLSConfig(verify=False, server_name="a.test")),
                          ("tlsB", BackendTLSConfig(verify=True, ca=ca_path, server_name="b.test"))):
            group = BackendGroup(name, [Backend("s", "127.0.0.1", address)], tls=tls)
            resource = BalancedProxyResource(group, pool=pool, tls=cache, access_log=False)
            listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
                HTTPFrontFactory(resource, reactor=reactor))
            self.addCleanup(listening.stopListening)
            self.ports[name] = listening.getHost().port

    @defer.inlineCallbacks
    def connect(self, name: str) -> Client:
        client = Client()
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", self.ports[name])
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        return client

    @defer.inlineCallbacks
    def test_verifyingGroupNeverGetsAnUnverifiedConnection(self):
        """
        After a request through C{tlsA} (unverified, SNI a.test) leaves an
        idle connection, requests through C{tlsB} (verified, SNI b.test,
        which the backend's certificate does not name) still get 502: even
        a later request of a kept-alive client, which may reuse an idle
        connection, never gets C{tlsA}'s.
        """
        a = yield self.connect("tlsA")
        a.transport.write(_get(b"/a"))
        yield a.until(b"/a")
        b = yield self.connect("tlsB")
        b.transport.write(_get(b"/b1"))
        yield b.until(b"HTTP/1.1 502")
        b.transport.write(_get(b"/b2", b"Connection: close\r\n"))
        received = yield b.done
        self.assertEqual(received.count(b"HTTP/1.1 502"), 2, received)
        self.assertNotIn(b"/b", b"".join(c.log for c in self.backend.connections))
        self.flushLoggedErrors()
