"""
The listeners' own HTTP/1.1 server (L{twisted_slb.web.front}), in memory:
parsing and refusing requests, framing responses, keep-alive and pipelining,
bodies, timeouts, back-pressure, half-close and draining.
"""

from __future__ import annotations

from typing import List

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twisted_slb.web.front import SPOOL_BYTES, FrontRequest, HTTPFrontFactory

CLIENT = IPv4Address("TCP", "127.0.0.2", 5000)


class Recorder(Resource):
    """Records requests; answers with a fixed body, or holds them open."""

    isLeaf = True

    def __init__(self, hold: bool = False) -> None:
        Resource.__init__(self)
        self.hold = hold
        self.requests: List[FrontRequest] = []
        self.bodies: List[bytes] = []

    def render(self, request):
        self.requests.append(request)
        self.bodies.append(request.content.read() if request.content is not None else b"")
        if self.hold:
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/plain")
        return b"hello " + request.path


def responses(data: bytes) -> List[bytes]:
    """The status lines in C{data}."""
    return [line for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


class FrontTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resource = Recorder()

    def connect(self, resource=None, **kwargs):
        # The Recorder reads request.content: bodies are read whole first
        # (streamed bodies: tests.test_body).
        kwargs.setdefault("request_buffering", True)
        factory = HTTPFrontFactory(resource or self.resource, reactor=self.reactor, **kwargs)
        self.factory = factory
        proto = factory.buildProtocol(CLIENT)
        transport = StringTransport(peerAddress=CLIENT)
        proto.makeConnection(transport)
        return proto, transport

    def assertRefused(self, request: bytes, status: bytes, **kwargs) -> bytes:
        proto, transport = self.connect(**kwargs)
        proto.dataReceived(request)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 " + status), transport.value())
        self.assertIn(b"\r\nConnection: close\r\n", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.resource.requests, [])
        return transport.value()


class ResponseTests(FrontTestCase):
    def test_simpleGet(self):
        """
        A GET is rendered with method, URI, path, Host and client address, and answered 200 with a length and
        a date, no Server header, keep-alive.
        """
        proto, transport = self.connect()
        proto.dataReceived(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"), out)
        self.assertIn(b"\r\nContent-Length: 8\r\n", out)
        self.assertIn(b"\r\nDate: ", out)
        self.assertNotIn(b"Server:", out)
        self.assertTrue(out.endswith(b"\r\n\r\nhello /a"))
        self.assertFalse(transport.disconnecting)
        request = self.resource.requests[0]
        self.assertEqual((request.method, request.uri, request.path), (b"GET", b"/a?b=1", b"/a"))
        self.assertEqual(request.getHeader(b"host"), b"x")
        self.assertEqual(request.getClientAddress(), CLIENT)
        self.assertFalse(request.isSecure())

    def test_secureFactory(self):
        """A factory made with secure=True renders requests that say they are secure."""
        proto, transport = self.connect(secure=True)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(self.resource.requests[0].isSecure())

    def test_keepAliveAndPipelining(self):
        """Pipelined requests are rendered one at a time and answered in order."""
        resource = Recorder(hold=True)
        proto, transport = self.connect(resource)
        proto.dataReceived(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(len(resource.requests), 1)
        first = resource.requests[0]
        first.write(b"one")
        first.finish()
        self.assertEqual(len(resource.requests), 2)
        resource.requests[1].write(b"two")
        resource.requests[1].finish()
        out = transport.value()
        self.assertLess(out.index(b"3\r\none\r\n"), out.index(b"3\r\ntwo\r\n"))
        self.assertEqual(out.count(b"Transfer-Encoding: chunked"), 2)
        self.assertEqual(out.count(b"0\r\n\r\n"), 2)
        self.assertFalse(transport.disconnecting)

    def test_http10(self):
        """An HTTP/1.0 request without keep-alive is answered with Connection: close, and the connection closed."""
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        self.assertIn(b"\r\nConnection: close\r\n", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_http10KeepAlive(self):
        """An HTTP/1.0 request asking for keep-alive gets it, and the connection stays open."""
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        self.assertIn(b"\r\nConnection: keep-alive\r\n", transport.value())
        self.assertFalse(transport.disconnecting)

    def test_http10StreamedBodyEndsWithTheConnection(self):
        """A body of unknown length to an HTTP/1.0 client is not chunked: it ends when the connection closes."""
        resource = Recorder(hold=True)
        proto, transport = self.connect(resource)
        proto.dataReceived(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resource.requests[0].write(b"abc")
        resource.requests[0].finish()
        out = transport.value()
        self.assertNotIn(b"chunked", out)
        self.assertIn(b"\r\nConnection: close\r\n", out)
        self.assertTrue(out.endswith(b"\r\n\r\nabc"))
        self.assertTrue(transport.disconnecting)

    def test_connectionClose(self):
        """An HTTP/1.1 request with Connection: close is answered so and the connection closed."""
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertIn(b"\r\nConnection: close\r\n", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_head(self):
        """A HEAD answer carries the length of the GET body but no body."""
        proto, transport = self.connect()
        proto.dataReceived(b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n")
        out = transport.value()
        self.assertIn(b"\r\nContent-Length: 8\r\n", out)
        self.assertTrue(out.endswith(b"\r\n\r\n"))

    def test_noContentHasNoLength(self):
        """A 204 answer has neither Content-Length nor chunked encoding."""
        resource = Recorder(hold=True)
        proto, transport = self.connect(resource)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        resource.requests[0].setResponseCode(204)
        resource.requests[0].finish()
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 204 No Content\r\n"))
        self.assertNotIn(b"Content-Length", out)
        self.assertNotIn(b"chunked", out)

    def test_renderErrorIs500(self):
        """A resource that raises gets the client a 500, the connection closed, and the error logged once."""
        class Broken(Resource):
            isLeaf = True

            def render(self, request):
                raise ZeroDivisionError()

        proto, transport = self.connect(Broken())
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 500 Internal Server Error\r\n"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_clientGoneFailsNotifyFinish(self):
        """A client that leaves fails notifyFinish; writing to its request afterwards is harmless."""
        resource = Recorder(hold=True)
        proto, transport = self.connect(resource)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        failures = []
        resource.requests[0].notifyFinish().addErrback(failures.append)
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(failures), 1)
        resource.requests[0].write(b"ignored")  # no error: the client is gone
        resource.requests[0].finish()


class RefusalTests(FrontTestCase):
    """Requests the listener refuses never reach the resource."""

    def test_bareLF(self):
        """A request whose lines end in a bare LF is refused with 400."""
        self.assertRefused(b"GET / HTTP/1.1\nHost: x\n\n", b"400")

    def test_bareLFInsideTheHead(self):
        """A bare LF between header lines is refused with 400."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", b"400")

    def test_bareCR(self):
        """A bare CR inside the head is refused with 400."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n", b"400")

    def test_obsFold(self):
        """A folded header line (obs-fold) is refused with 400, saying so."""
        out = self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", b"400")
        self.assertIn(b"obs-fold", out)

    def test_controlCharacter(self):
        """A control character in a header value is refused with 400."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n", b"400")

    def test_spaceBeforeColon(self):
        """Whitespace between a header name and its colon is refused with 400."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", b"400")

    def test_invalidTarget(self):
        """A request target that is neither a path nor a URL is refused with 400."""
        self.assertRefused(b"GET foo HTTP/1.1\r\nHost: x\r\n\r\n", b"400")

    def test_nonASCIITarget(self):
        """A request target with non-ASCII bytes is refused with 400."""
        self.assertRefused(b"GET /\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", b"400")

    def test_connect(self):
        """CONNECT is refused with 501: the balancer is no forward proxy."""
        self.assertRefused(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n", b"501")

    def test_http2(self):
        """A request line claiming HTTP/2.0 is refused with 505."""
        self.assertRefused(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", b"505")

    def test_unknownExpectation(self):
        """An Expect other than 100-continue is refused with 417."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: x\r\nExpect: magic\r\n\r\n", b"417")

    def test_requestLineTooLong(self):
        """A request line over max_header_bytes is refused with 414."""
        self.assertRefused(b"GET /" + b"a" * 200, b"414", max_header_bytes=100)

    def test_headTooLarge(self):
        """Headers over max_header_bytes are refused with 431."""
        self.assertRefused(b"GET / HTTP/1.1\r\nX: " + b"a" * 200, b"431", max_header_bytes=100)

    def test_tooManyHeaders(self):
        """More header lines than max_headers are refused with 431."""
        self.assertRefused(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 5 + b"\r\n", b"431", max_headers=4)

    def test_badChunkEnd(self):
        """A chunk longer than its announced size is refused with 400."""
        self.assertRefused(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n", b"400"
        )

    def test_hexPrefixInChunkSize(self):
        """A chunk size written with 0x is refused with 400."""
        self.assertRefused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n", b"400")

    def test_chunkedHTTP10(self):
        """Chunked transfer encoding on an HTTP/1.0 request is refused with 400."""
        self.assertRefused(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400")

    def test_invalidByteInTheVersion(self):
        """
        A non-ASCII byte where the version's dot goes is a malformed request
        line (400), not an exception (issue 22, case 1).
        """
        out = self.assertRefused(b"GET / HTTP/1\xab1\r\nHost: a\r\n\r\n", b"400")
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertNotIn(b"\xab", out)

    def test_unsupportedVersionIsQuotedAsASCII(self):
        """A well-formed version other than 1.0 and 1.1 gets 505 naming it."""
        out = self.assertRefused(b"GET / HTTP/3.7\r\nHost: a\r\n\r\n", b"505")
        self.assertIn(b"HTTP/3.7 is not supported", out)

    def test_aParserBugIsA400NotAnException(self):
        """
        Should the parser itself raise, the client gets 400 and a close, the
        error is logged, and nothing escapes to the caller of dataReceived
        (which, for a pipelined request, is a backend connection's callback).
        """
        proto, transport = self.connect()

        def broken(head):
            raise ValueError("a bug")

        proto._request_head = broken
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "), transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_aParserBugAfterAPipelinedResponseIsNotRaisedToTheResponder(self):
        """
        A pipelined request parsed when the response before it finishes (from
        the code that finished it) never raises into that code.
        """
        resource = Recorder(hold=True)
        proto, transport = self.connect(resource)
        proto.dataReceived(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")

        def broken(head):
            raise ValueError("a bug")

        proto._request_head = broken
        request = resource.requests[0]
        request.write(b"ok")
        request.finish()  # parses the next request: must not raise
        self.assertEqual([r[9:12] for r in responses(transport.value())], [b"200", b"400"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_refusalIsLogged(self):
        """After refusing a bad request on one connection, the listener serves the next connection normally."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", b"400")
        # (the log line is checked end to end in test_service; here: the
        # listener keeps serving other connections)
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))


class BodyTests(FrontTestCase):
    def test_contentLength(self):
        """
        A body is read to its Content-Length, even across reads, before rendering; the bytes after it are the
        next request.
        """
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
        self.assertEqual(self.resource.requests, [])
        proto.dataReceived(b"cdeGET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.resource.bodies, [b"abcde", b""])
        self.assertEqual(self.resource.requests[1].path, b"/next")

    def test_identicalContentLengthsAreOne(self):
        """Repeated identical Content-Length headers are accepted as one."""
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab")
        self.assertEqual(self.resource.bodies, [b"ab"])
        self.assertEqual(self.resource.requests[0].requestHeaders.getRawHeaders(b"content-length"), [b"2"])

    def test_chunkedIsDecodedAndTrailersDropped(self):
        """
        A chunked body split anywhere is decoded, chunk extensions and trailers dropped, and Transfer-Encoding
        removed.
        """
        proto, transport = self.connect()
        for piece in (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nab",
                      b"c\r\n", b"2\r\nde\r", b"\n0\r\nX-Trailer: 1\r\n", b"\r\n"):
            proto.dataReceived(piece)
        self.assertEqual(self.resource.bodies, [b"abcde"])
        headers = self.resource.requests[0].requestHeaders
        self.assertFalse(headers.hasHeader(b"transfer-encoding"))
        self.assertFalse(headers.hasHeader(b"x-trailer"))

    def test_largeBodyIsSpooledToAFile(self):
        """A body over the spool size is kept in a temporary file, not in memory."""
        resource = Recorder(hold=True)
        proto, transport = self.connect(resource)
        size = SPOOL_BYTES + 10
        proto.dataReceived(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 1000 + 1):
            proto.dataReceived(b"x" * 1000)
        self.assertEqual(len(resource.bodies[0]), size)
        self.assertTrue(resource.requests[0].content._rolled)

    def test_expectContinue(self):
        """
        Expect: 100-continue gets an interim 100 Continue, then the body is read; the Expect header is not
        passed on.
        """
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        proto.dataReceived(b"ok")
        self.assertEqual(self.resource.bodies, [b"ok"])
        self.assertFalse(self.resource.requests[0].requestHeaders.hasHeader(b"expect"))


class TimeoutTests(FrontTestCase):
    def test_idleKeepAliveIsClosed(self):
        """A keep-alive connection idle for client_idle_timeout is closed, not before."""
        proto, transport = self.connect(client_idle_timeout=10)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.reactor.advance(9)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_stalledBodyGets408(self):
        """
        A body that stops arriving for client_idle_timeout gets a 408 and the connection closed; a trickle
        keeps it alive.
        """
        proto, transport = self.connect(client_idle_timeout=10)
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        for _ in range(3):
            self.reactor.advance(9)  # a byte now and then keeps it alive
            proto.dataReceived(b"c")
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(10)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n"))
        self.assertTrue(transport.disconnecting)

    def test_busyRequestIsNotTimedOut(self):
        """A slow backend is the proxy's request_timeout's business, not the client's."""
        resource = Recorder(hold=True)
        proto, transport = self.connect(resource, client_idle_timeout=10)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.reactor.advance(100)
        self.assertFalse(transport.disconnecting)

    def test_clientThatNeverReadsIsCutOffAfterClosing(self):
        """A closing connection whose client never reads is aborted after client_idle_timeout."""
        proto, transport = self.connect(client_idle_timeout=10)
        proto.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        proto.pauseProducing()
        self.reactor.advance(9)
        self.assertFalse(transport.disconnected)
        self.reactor.advance(1)
        self.assertTrue(transport.disconnected)  # aborted, not waiting to flush


class FlowTests(FrontTestCase):
    def test_pauseReachesTheProducer(self):
        """Pausing, resuming and losing the client connection reach the producer registered on the request."""
        resource = Recorder(hold=True)
        proto, transport = self.connect(resource)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

        class Producer:
            state = "producing"

            def pauseProducing(self):
                self.state = "paused"

            def resumeProducing(self):
                self.state = "producing"

            def stopProducing(self):
                self.state = "stopped"

        producer = Producer()
        resource.requests[0].registerProducer(producer, True)
        proto.pauseProducing()
        self.assertEqual(producer.state, "paused")
        proto.resumeProducing()
        self.assertEqual(producer.state, "producing")
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(producer.state, "stopped")

    def test_pipelinedFloodStopsReading(self):
        """A flood of pipelined requests stops reading from the client until the current answer is finished."""
        resource = Recorder(hold=True)
        proto, transport = self.connect(resource, max_header_bytes=1000)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
        self.assertEqual(transport.producerState, "paused")
        resource.requests[0].finish()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(len(resource.requests), 2)

    def test_halfCloseAnswersThenCloses(self):
        """A client that half-closes after its request still gets the answer, then the connection closes."""
        resource = Recorder(hold=True)
        proto, transport = self.connect(resource)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        proto.readConnectionLost()
        self.assertFalse(transport.disconnecting)
        resource.requests[0].write(b"late")
        resource.requests[0].finish()
        self.assertIn(b"late", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_drain(self):
        """Draining closes idle keep-alive connections now and busy ones after their response."""
        resource = Recorder(hold=True)
        busy, busy_transport = self.connect(resource)
        busy.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        idle = self.factory.buildProtocol(CLIENT)
        idle_transport = StringTransport(peerAddress=CLIENT)
        idle.makeConnection(idle_transport)
        idle.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        resource.requests[1].finish()  # served one request: an idle keep-alive connection now
        self.assertFalse(idle_transport.disconnecting)
        done = []
        self.factory.drain(5).addCallback(done.append)
        self.assertTrue(idle_transport.disconnecting)
        self.assertFalse(busy_transport.disconnecting)
        idle.connectionLost(Failure(ConnectionLost()))
        resource.requests[0].write(b"x")
        resource.requests[0].finish()
        self.assertTrue(busy_transport.disconnecting)
        busy.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(done, [None])

    def test_drainAnswersAConnectionJustAccepted(self):
        """
        A connection accepted just before the drain (its first request not
        read yet) is not closed unanswered (a client would not retry it): its
        request is answered, then the connection closes.
        """
        resource = Recorder(hold=True)
        fresh, transport = self.connect(resource)
        self.factory.drain(5)
        self.assertFalse(transport.disconnecting)
        fresh.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        resource.requests[0].write(b"answered")
        resource.requests[0].finish()
        self.assertIn(b"answered", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_pullProducerIsDrivenByTheTransport(self):
        """A pull producer (FileSender) gets the transport until it is done."""
        from io import BytesIO

        from twisted.protocols.basic import FileSender

        resource = Recorder(hold=True)
        proto, transport = self.connect(resource)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        request = resource.requests[0]
        request.setHeader(b"content-length", b"70000")
        request.write(b"")
        sender = FileSender()
        done = sender.beginFileTransfer(BytesIO(b"y" * 70000), request)
        self.assertIs(transport.producer, sender)
        while not done.called:
            transport.producer.resumeProducing()  # what the transport does as its buffer empties
        request.finish()
        self.assertIs(transport.producer, proto)
        self.assertTrue(transport.value().endswith(b"y" * 70000))


class BodyLimitTests(FrontTestCase):
    def test_announcedBodyOverTheLimitIs413BeforeReading(self):
        """A Content-Length over max_body_bytes is refused with 413 at once, with no 100 Continue."""
        out = self.assertRefused(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\nExpect: 100-continue\r\n\r\n", b"413",
            max_body_bytes=100,
        )
        self.assertNotIn(b"100 Continue", out)

    def test_chunkedBodyOverTheLimitIs413(self):
        """A chunked body is refused with 413 as soon as it passes max_body_bytes, and never rendered."""
        proto, transport = self.connect(max_body_bytes=100)
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(2):
            proto.dataReceived(b"32\r\n" + b"x" * 50 + b"\r\n")
        self.assertEqual(transport.value(), b"")  # 100 bytes: at the limit, not over
        proto.dataReceived(b"1\r\nx\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 Content Too Large\r\n"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.resource.requests, [])

    def test_bodyAtTheLimitIsForwarded(self):
        """A body of exactly max_body_bytes is forwarded."""
        proto, transport = self.connect(max_body_bytes=3)
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        self.assertEqual(self.resource.bodies, [b"abc"])


class TunnelTests(FrontTestCase):
    def test_tunnelRelaysAndTimesOut(self):
        """
        After a 101 the connection becomes a tunnel: bytes flow both ways (early ones included) with back-
        pressure, and only tunnel_timeout of silence closes it.
        """
        resource = Recorder(hold=True)
        proto, transport = self.connect(resource, client_idle_timeout=10, tunnel_timeout=100)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: y\r\n\r\nearly")
        request = resource.requests[0]
        self.assertTrue(request.can_switch_protocols)
        peer = StringTransport()
        request.setResponseCode(101)
        request.setHeader(b"connection", b"Upgrade")
        request.switch_protocols(peer)
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), out)
        self.assertNotIn(b"Content-Length", out)
        self.assertNotIn(b"close", out)
        self.assertEqual(peer.value(), b"early")
        self.assertIs(transport.producer, peer)  # back-pressure both ways
        proto.dataReceived(b"more")
        self.assertEqual(peer.value(), b"earlymore")
        request.tunnel_write(b"back")
        self.assertTrue(transport.value().endswith(b"back"))
        self.reactor.advance(60)  # longer than client_idle_timeout: a tunnel has its own
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"x")
        self.reactor.advance(99)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_tunnelBytesFromTheClientCountIn(self):
        """A tunnel's bytes from the client (those sent early too) count in the listener's C{bytes_in}."""
        from twisted_slb.stats import ListenerStats

        resource = Recorder(hold=True)
        proto, transport = self.connect(resource)
        self.factory.stats = stats = ListenerStats("web", "http")
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: y\r\n\r\nearly")
        request = resource.requests[0]
        request.setResponseCode(101)
        request.setHeader(b"connection", b"Upgrade")
        request.switch_protocols(StringTransport())
        proto.dataReceived(b"more")
        self.assertEqual(stats.bytes_in, len(b"earlymore"))


class InterfaceTests(SynchronousTestCase):
    """The channel declares what the transports and the proxy rely on."""

    def test_channelProvidesItsInterfaces(self):
        """
        HTTPFrontChannel is a push producer (the client's back-pressure), a
        half-closeable protocol (a client's end of file is a half-close) and
        the body reader of its streamed request bodies.
        """
        from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer

        from twisted_slb.web.body import IBodyReader
        from twisted_slb.web.front import HTTPFrontChannel

        for interface in (IPushProducer, IHalfCloseableProtocol, IBodyReader):
            self.assertTrue(interface.implementedBy(HTTPFrontChannel), interface)
