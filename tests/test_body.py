"""
Streamed request bodies (L{twisted_slb.web.body}, issue 20): the body
source itself, the HTTP/1.1 listener feeding it (in memory), and uploads
through the proxy end to end on 127.0.0.1: a gigabyte with bounded memory,
an early answer while the client is still sending, a chunked upload that
never ends, max_body_bytes passed mid-stream, request_buffering, retries.
"""

from __future__ import annotations

import os
import time
from typing import List

from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IPullProducer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.config import ConfigError, parse_config
from twisted_slb.web.body import HIGH_WATER, BodyError, IBodyReader, IRequestBody, StreamedBody
from twisted_slb.web.front import HTTPFrontFactory
from twisted_slb.web.proxy import BalancedProxyResource
from twisted_slb.web.upstream import UpstreamPool
from tests.test_smuggling import Client

from .test_stall import buffered

log = Logger(namespace="tests.test_body")
CLIENT = IPv4Address("TCP", "127.0.0.2", 5000)


@implementer(IBodyReader)
class Reader:
    """An L{IBodyReader} that records what its body asked."""

    def __init__(self) -> None:
        self.calls: List[str] = []

    def pause_body(self) -> None:
        self.calls.append("pause")

    def resume_body(self) -> None:
        self.calls.append("resume")

    def discard_body(self) -> None:
        self.calls.append("discard")


class Consumer:
    """An L{IBodyConsumer} that records what it was given."""

    def __init__(self) -> None:
        self.data: List[bytes] = []
        self.ended = False
        self.failure = None

    def body_data(self, data: bytes) -> None:
        self.data.append(data)

    def body_end(self) -> None:
        self.ended = True

    def body_failed(self, reason) -> None:
        self.failure = reason


class StreamedBodyTests(SynchronousTestCase):
    def test_providesTheInterface(self):
        """A L{StreamedBody} is an L{IRequestBody} (an IPushProducer with length and counters)."""
        self.assertTrue(verifyObject(IRequestBody, StreamedBody(Reader(), 3)))

    def test_heldUntilAConsumerThenDeliveredInOrder(self):
        """What arrives before the consumer is held, then delivered in order, then the end."""
        body = StreamedBody(Reader(), 5)
        body.feed(b"ab")
        body.feed(b"cde")
        body.finish()
        consumer = Consumer()
        body.deliver_to(consumer)
        self.assertEqual(consumer.data, [b"ab", b"cde"])
        self.assertTrue(consumer.ended)
        self.assertTrue(body.started)

    def test_pausedConsumerPausesTheReaderPastHighWater(self):
        """
        A paused consumer gets nothing; past L{HIGH_WATER} waiting bytes the
        reader is paused, and resumed once the consumer took them.
        """
        reader = Reader()
        body = StreamedBody(reader, None)
        consumer = Consumer()
        body.pauseProducing()
        body.deliver_to(consumer)
        body.feed(b"x" * (HIGH_WATER - 1))
        self.assertEqual((consumer.data, reader.calls), ([], []))
        body.feed(b"y")
        self.assertEqual(reader.calls, ["pause"])
        self.assertFalse(body.started)
        body.resumeProducing()
        self.assertEqual(b"".join(consumer.data), b"x" * (HIGH_WATER - 1) + b"y")
        self.assertEqual(reader.calls, ["pause", "resume"])

    def test_stopDropsTheRestAndTellsTheReader(self):
        """A consumer that stops gets nothing more; the reader is told to read and drop the rest."""
        reader = Reader()
        body = StreamedBody(reader, 10)
        consumer = Consumer()
        body.deliver_to(consumer)
        body.feed(b"abc")
        body.stopProducing()
        body.feed(b"def")
        body.finish()
        self.assertEqual(consumer.data, [b"abc"])
        self.assertFalse(consumer.ended)
        self.assertEqual(reader.calls, ["discard"])
        self.assertEqual(body.received, 6)

    def test_failureReachesAConsumerThatComesLater(self):
        """A body that failed before its consumer came tells the consumer at once."""
        body = StreamedBody(Reader(), None)
        body.feed(b"abc")
        body.fail(BodyError("bad chunk", 400))
        consumer = Consumer()
        body.deliver_to(consumer)
        self.assertEqual(consumer.data, [])
        self.assertEqual(consumer.failure.code, 400)


class Streamer(Resource):
    """Takes each request's body as it streams; answers when told to."""

    isLeaf = True

    def __init__(self, answer_at_once: bool = False) -> None:
        Resource.__init__(self)
        self.answer_at_once = answer_at_once
        self.requests = []
        self.contents: List[bytes] = []
        self.consumers: List[Consumer] = []

    def render(self, request):
        self.requests.append(request)
        if request.content is not None:
            self.contents.append(request.content.read())
        consumer = Consumer()
        self.consumers.append(consumer)
        if request.body is not None:
            request.body.deliver_to(consumer)
        if self.answer_at_once:
            request.setHeader(b"content-length", b"5")
            return b"early"
        return NOT_DONE_YET


class ChannelTests(SynchronousTestCase):
    """The HTTP/1.1 listener streams bodies (in memory)."""

    def connect(self, resource, **kwargs):
        self.reactor = MemoryReactorClock()
        factory = HTTPFrontFactory(resource, reactor=self.reactor, **kwargs)
        proto = factory.buildProtocol(CLIENT)
        transport = StringTransport(peerAddress=CLIENT)
        proto.makeConnection(transport)
        return proto, transport

    def test_requestIsRenderedBeforeItsBody(self):
        """The resource gets the request at its head, and the body bytes as they come (chunks decoded)."""
        resource = Streamer()
        proto, transport = self.connect(resource)
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(len(resource.requests), 1)
        self.assertIsNone(resource.requests[0].content)
        self.assertIsNone(resource.requests[0].body.length)
        proto.dataReceived(b"3\r\nabc\r\n")
        self.assertEqual(resource.consumers[0].data, [b"abc"])
        proto.dataReceived(b"2;x=y\r\nde\r\n0\r\nT: 1\r\n\r\n")
        self.assertEqual(resource.consumers[0].data, [b"abc", b"de"])
        self.assertTrue(resource.consumers[0].ended)

    def test_backendThatStopsReadingPausesTheClient(self):
        """
        A consumer that pauses the body (a backend that does not read) makes
        the listener stop reading the client's socket once the body holds
        L{HIGH_WATER} bytes; the client's idle timeout does not run meanwhile;
        resuming reads again.
        """
        resource = Streamer()
        proto, transport = self.connect(resource, client_idle_timeout=10)
        proto.dataReceived(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        body = resource.requests[0].body
        body.pauseProducing()
        proto.dataReceived(b"x" * HIGH_WATER)
        self.assertEqual(transport.producerState, "paused")
        self.reactor.advance(60)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        body.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(sum(map(len, resource.consumers[0].data)), HIGH_WATER)

    def test_earlyAnswerThenTheRestIsDroppedAndTheNextRequestRead(self):
        """
        A response that ends before the body (here at once, before any
        body byte): the body is read and dropped (the consumer is given
        nothing), then the next request on the connection is read as a
        request.
        """
        resource = Streamer(answer_at_once=True)
        proto, transport = self.connect(resource)
        proto.dataReceived(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        self.assertIn(b"\r\n\r\nearly", transport.value())
        proto.dataReceived(b"defghij" + b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(resource.consumers[0].data, [])
        self.assertEqual(resource.requests[0].body.received, 10)
        self.assertEqual([r.uri for r in resource.requests], [b"/a", b"/b"])
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 2)

    def test_chunkedBodyOverTheLimitMidStreamIs413(self):
        """
        A chunked body whose count passes max_body_bytes after it started to
        stream: the consumer is told (code 413), the client gets 413, and
        the connection closes.
        """
        resource = Streamer()
        proto, transport = self.connect(resource, max_body_bytes=10)
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n")
        self.assertEqual(resource.consumers[0].data, [b"12345678"])
        proto.dataReceived(b"8\r\n12345678\r\n")
        self.assertEqual(resource.consumers[0].failure.code, 413)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 Content Too Large\r\n"), transport.value())
        self.assertTrue(transport.disconnecting)

    def test_bodyThatStopsIsCutWith408(self):
        """A streamed body that stops arriving: 408 after client_idle_timeout, the consumer told."""
        resource = Streamer()
        proto, transport = self.connect(resource, client_idle_timeout=10)
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        self.reactor.advance(10)
        self.assertEqual(resource.consumers[0].failure.code, 408)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n"), transport.value())

    def test_requestBufferingFillsContent(self):
        """With request_buffering the body is read whole into content before the request is rendered."""
        resource = Streamer(answer_at_once=True)
        proto, transport = self.connect(resource, request_buffering=True)
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nab")
        self.assertEqual(resource.requests, [])
        proto.dataReceived(b"c")
        self.assertIsNone(resource.requests[0].body)
        self.assertEqual(resource.contents, [b"abc"])


class CountingBackend(protocol.Protocol):
    """
    Reads one request with a Content-Length body, counts its body bytes and
    answers with the count at the end; or, with C{early_after} set, answers
    once that many body bytes came.
    """

    def connectionMade(self):
        self.head = b""
        self.count = 0
        self.length = None
        self.answered = False
        self.closed: defer.Deferred = defer.Deferred()
        self.factory.connections.append(self)

    def dataReceived(self, data):
        if self.length is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            data = self.head[end + 4:]
            self.head = self.head[:end]
            self.length = -1
            for line in self.head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    self.length = int(value)
            self.factory.heads.append(self.head)
        self.count += len(data)
        self.factory.body.append(data) if self.factory.keep else None
        early = self.factory.early_after
        if not self.answered and ((early is not None and self.count >= early) or self.count == self.length):
            self.answered = True
            text = b"%d" % self.count
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))

    def connectionLost(self, reason):
        self.reason = reason
        self.closed.callback(None)


@implementer(IPullProducer)
class Upload:
    """A body of C{size} bytes, written as the client's transport asks for it."""

    chunk = b"u" * (256 * 1024)

    def __init__(self, transport, size: int, sample) -> None:
        self.transport = transport
        self.left = size
        self.sample = sample
        self.done: defer.Deferred = defer.Deferred()

    def resumeProducing(self) -> None:
        self.sample()
        if self.left <= 0:
            self.transport.unregisterProducer()
            self.done.callback(None)
            return
        n = min(self.left, len(self.chunk))
        self.left -= n
        self.transport.write(self.chunk if n == len(self.chunk) else self.chunk[:n])

    def stopProducing(self) -> None:
        self.left = 0


def rss() -> int:
    """This process's resident set size, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class UploadTests(TestCase):
    """Uploads through the proxy, end to end on 127.0.0.1."""

    timeout = 240

    @defer.inlineCallbacks
    def setUp(self):
        self.backend = protocol.ServerFactory.forProtocol(CountingBackend)
        self.backend.connections = []
        self.backend.heads = []
        self.backend.body = []
        self.backend.keep = False
        self.backend.early_after = None
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.backend)
        self.addCleanup(port.stopListening)
        self.backend_port = port.getHost().port

    @defer.inlineCallbacks
    def balancer(self, clock=None, request_buffering: bool = False, backends=None, **kwargs):
        self.pool = UpstreamPool(reactor)
        self.addCleanup(self.pool.close)
        self.group = BackendGroup("g", backends or [Backend("a", "127.0.0.1", self.backend_port)])
        self.resource = BalancedProxyResource(self.group, reactor=clock or reactor, pool=self.pool,
                                              access_log=False, request_buffering=request_buffering)
        self.site = HTTPFrontFactory(self.resource, reactor=clock or reactor, **kwargs)
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.site)
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    @defer.inlineCallbacks
    def connect(self) -> Client:
        client = Client()
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", self.port)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        return client

    def held(self) -> int:
        """Body bytes this process's balancer holds: listeners' buffers, bodies, backend write buffers."""
        total = 0
        for channel in self.site.channels:
            total += len(channel.buffer)
            if channel.body is not None:
                total += channel.body.waiting_bytes
            exchange = getattr(channel.request, "slb_exchange", None)
            if exchange is not None and exchange.upstream is not None:
                total += buffered(exchange.upstream.transport)
        return total

    @defer.inlineCallbacks
    def test_gigabyteUploadWithBoundedMemory(self):
        """
        A 1 GB upload, generated as the client's socket takes it, reaches
        the backend whole; the bytes the balancer holds stay under 1 MB all
        along (sampled at each client write), and the process's RSS grows by
        less than 64 MB (logged).
        """
        yield self.balancer()
        size = 1024 ** 3
        client = yield self.connect()
        client.transport.write(b"PUT /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        peak = [0]

        def sample():
            peak[0] = max(peak[0], self.held())

        before = rss()
        started = time.monotonic()
        upload = Upload(client.transport, size, sample)
        client.transport.registerProducer(upload, False)
        received = yield client.until(b"\r\n\r\n%d" % size)
        elapsed = time.monotonic() - started
        after = rss()
        log.info("1 GB upload: {seconds:.1f} s, balancer held at most {peak} bytes, RSS {before} -> {after} "
                 "(pid {pid})", seconds=elapsed, peak=peak[0], before=before, after=after, pid=os.getpid())
        self.assertTrue(received.startswith(b"HTTP/1.1 200 OK"), received[:100])
        self.assertEqual(self.backend.connections[0].count, size)
        self.assertLess(peak[0], 1024 * 1024)
        self.assertLess(after - before, 64 * 1024 * 1024)

    @defer.inlineCallbacks
    def test_backendSeesTheFirstBytesBeforeTheClientSendsTheLast(self):
        """
        The backend answers once it has 1000 body bytes, while the client has
        sent 1000 of 10,000: the client gets the answer, so the body
        streamed.  The client then sends the rest (read and dropped) and a
        second request on the same connection, which is answered; the first
        backend connection, owed the rest of the body, was closed, not
        reused, and the backend is not counted as failing.
        """
        self.backend.early_after = 1000
        yield self.balancer()
        client = yield self.connect()
        client.transport.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n" + b"a" * 1000)
        received = yield client.until(b"\r\n\r\n1000")
        self.assertTrue(received.startswith(b"HTTP/1.1 200 OK"), received[:100])
        yield self.backend.connections[0].closed
        self.backend.early_after = None
        client.transport.write(b"b" * 9000 + b"POST /next HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz")
        yield client.until(b"\r\n\r\n3")
        self.assertEqual(len(self.backend.connections), 2)
        self.assertTrue(self.backend.heads[1].startswith(b"POST /next "))
        self.assertEqual(self.group.backends[0].failures, 0)
        self.assertEqual(self.group.backends[0].active, 0)

    @defer.inlineCallbacks
    def test_chunkedUploadThatNeverEndsIsCutByTheIdleTimeout(self):
        """
        A chunked upload whose chunks stop: the backend got the first one
        (streamed), then after client_idle_timeout the client gets 408, the
        backend connection is closed, and the backend is not counted as
        failing.
        """
        self.backend.keep = True
        clock = Clock()
        yield self.balancer(clock, client_idle_timeout=10)
        client = yield self.connect()
        client.transport.write(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        while b"hello" not in b"".join(self.backend.body):
            yield deferLater(0.001)
        self.assertIn(b"Transfer-Encoding: chunked", self.backend.heads[0])
        clock.advance(10)
        received = yield client.done
        self.assertTrue(received.startswith(b"HTTP/1.1 408 Request Timeout"), received[:100])
        yield self.backend.connections[0].closed
        self.assertEqual(self.group.backends[0].failures, 0)

    @defer.inlineCallbacks
    def test_chunkedBodyOverTheLimitAfterItStartedIs413(self):
        """
        max_body_bytes passed by a chunked body that is already streaming:
        the client gets 413 at once, the backend connection is reset, the
        backend is not counted as failing.
        """
        self.backend.keep = True
        yield self.balancer(max_body_bytes=100)
        client = yield self.connect()
        client.transport.write(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n50\r\n" + b"a" * 80
                               + b"\r\n")
        while len(b"".join(self.backend.body)) < 80:
            yield deferLater(0.001)
        client.transport.write(b"50\r\n" + b"b" * 80 + b"\r\n")
        received = yield client.done
        self.assertTrue(received.startswith(b"HTTP/1.1 413 Content Too Large"), received[:100])
        yield self.backend.connections[0].closed
        self.assertEqual(self.group.backends[0].failures, 0)

    @defer.inlineCallbacks
    def test_requestBufferingSendsTheWholeBodyWithAContentLength(self):
        """
        With request_buffering, a chunked upload reaches the backend only
        once it is whole, with a Content-Length and no Transfer-Encoding.
        """
        self.backend.keep = True
        yield self.balancer(request_buffering=True)
        client = yield self.connect()
        client.transport.write(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        for _ in range(50):
            yield deferLater(0.001)
        self.assertEqual(self.backend.connections, [])
        client.transport.write(b"2\r\nde\r\n0\r\n\r\n")
        yield client.until(b"\r\n\r\n5")
        self.assertIn(b"\r\nContent-Length: 5", self.backend.heads[0])
        self.assertNotIn(b"transfer-encoding", self.backend.heads[0].lower())
        self.assertEqual(b"".join(self.backend.body), b"abcde")

    @defer.inlineCallbacks
    def test_streamedBodyIsNotRetriedOnAnotherBackend(self):
        """
        A PUT (idempotent) whose body has started to stream to a backend
        that then closes without answering gets 502; the other backend
        never sees it.
        """
        dying = protocol.ServerFactory.forProtocol(DiesAfterBody)
        dying.connections = []
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(dying)
        self.addCleanup(port.stopListening)
        # Round robin starts with the first backend: the one that dies.
        yield self.balancer(backends=[Backend("dies", "127.0.0.1", port.getHost().port),
                                      Backend("a", "127.0.0.1", self.backend_port)])
        client = yield self.connect()
        client.transport.write(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        yield until_connected(dying)
        client.transport.write(b"defghij")
        received = yield client.until(b"\r\n\r\n")
        self.assertTrue(received.startswith(b"HTTP/1.1 502"), received[:100])
        self.assertEqual(self.backend.connections, [])


class DiesAfterBody(protocol.Protocol):
    """A backend that closes its connection once it has read some body bytes."""

    def connectionMade(self):
        self.closed: defer.Deferred = defer.Deferred()
        self.factory.connections.append(self)
        self.buffer = b""

    def dataReceived(self, data):
        self.buffer += data
        if b"\r\n\r\nabc" in self.buffer:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.closed.callback(None)


@defer.inlineCallbacks
def until_connected(factory):
    while not factory.connections:
        yield deferLater(0.001)
    yield factory.connections[0].closed


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


class ConfigTests(SynchronousTestCase):
    CONFIG = """
[backends.web]
servers = [ { name = "a", address = "127.0.0.1:8001" } ]

[listeners.web]
protocol = "http"
bind = "tcp:8080"
backends = "web"
"""

    def test_streamingByDefault(self):
        """Without request_buffering, a listener streams and its rules take the listener's setting."""
        config = parse_config(self.CONFIG + '[[listeners.web.rules]]\npath = "/a"\n')
        self.assertFalse(config.listeners["web"].request_buffering)
        self.assertIsNone(config.listeners["web"].rules[0].request_buffering)

    def test_listenerAndRuleSettings(self):
        """A listener and a rule each read their own request_buffering."""
        config = parse_config(self.CONFIG.replace('backends = "web"\n', 'backends = "web"\nrequest_buffering = true\n')
                              + '[[listeners.web.rules]]\npath = "/a"\nrequest_buffering = false\n')
        self.assertTrue(config.listeners["web"].request_buffering)
        self.assertFalse(config.listeners["web"].rules[0].request_buffering)

    def test_notABoolean(self):
        """A request_buffering that is not a boolean is an error naming the field, the value and what is allowed."""
        with self.assertRaises(ConfigError) as cm:
            parse_config(self.CONFIG + 'request_buffering = "yes"\n', "slb.toml")
        self.assertIn("slb.toml: listeners.web.request_buffering: must be true or false, not a string; got 'yes'; "
                      "allowed: true | false", str(cm.exception))
