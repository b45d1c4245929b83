"""
HTTP/2 on the listeners (L{twisted_slb.web.h2}), in memory: an C{h2} client
connection talks to an L{H2FrontChannel} over a L{StringTransport}, with a
L{MemoryReactorClock} for the timeouts.  Requests, the request interface the
resources see, flow control and back-pressure, the limits, the known attacks
(rapid reset, CONTINUATION flood, SETTINGS/PING/empty-frame floods, a body
never sent, a window left at 0), GOAWAY on drain and reload, and the switch
from HTTP/1.1 when ALPN chose h2.
"""

from __future__ import annotations

from typing import Dict, List

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated, DataReceived, RemoteSettingsChanged, ResponseReceived, StreamEnded, StreamReset,
)
from h2.settings import SettingCodes
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import ContinuationFrame, DataFrame, GoAwayFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_slb.limits import ConnectionLimit
from twisted_slb.web import h2 as slb_h2
from twisted_slb.web.body import HIGH_WATER, BodyError, IBodyConsumer, IBodyReader
from twisted_slb.web.front import HTTPFrontChannel, HTTPFrontFactory
from twisted_slb.web.h2 import H2FrontChannel, H2Request, H2Settings

CLIENT = IPv4Address("TCP", "127.0.0.2", 5000)
GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com"), (b":path", b"/a?b=1")]


class Recorder(Resource):
    """Records requests; answers at once, or holds them open."""

    isLeaf = True

    def __init__(self, hold: bool = False) -> None:
        Resource.__init__(self)
        self.hold = hold
        self.requests: List[H2Request] = []
        self.bodies: List[bytes] = []

    def render(self, request):
        self.requests.append(request)
        if request.body is not None:
            # Streamed: what arrived with the head; Collector has the rest.
            collector = Collector()
            request.body.deliver_to(collector)
            self.bodies.append(collector)
        else:
            self.bodies.append(request.content.read() if request.content is not None else b"")
        if self.hold:
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/plain")
        return b"hello " + request.path


@implementer(IBodyConsumer)
class Collector:
    """An L{IBodyConsumer} that keeps what it is given."""

    def __init__(self) -> None:
        self.data: List[bytes] = []
        self.ended = False
        self.failed: List[BodyError] = []

    def body_data(self, data: bytes) -> None:
        self.data.append(data)

    def body_end(self) -> None:
        self.ended = True

    def body_failed(self, reason: BodyError) -> None:
        self.failed.append(reason)

    def value(self) -> bytes:
        return b"".join(self.data)


@implementer(IPushProducer)
class Producer:
    """A push producer that records what it is told."""

    def __init__(self) -> None:
        self.calls: List[str] = []
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.paused = False
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


def frames(data: bytes) -> list:
    """The HTTP/2 frames a server wrote (as a client would parse them)."""
    buffer = FrameBuffer()
    buffer.max_frame_size = 16384
    buffer.add_data(data)
    return list(buffer)


class Client:
    """An h2 client connection, pumped by hand to and from the channel."""

    def __init__(self, proto, transport, settings: Dict[int, int] = None, validate: bool = True) -> None:
        self.proto = proto
        self.transport = transport
        # validate=False: a client that sends what its h2 would refuse to.
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None,
                                                 validate_outbound_headers=validate))
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.events: list = []
        self.pump()

    def pump(self) -> None:
        for _ in range(20):
            out = self.conn.data_to_send()
            if out:
                self.proto.dataReceived(out)
            got = self.transport.value()
            self.transport.clear()
            if got and not self.closed():
                self.events += self.conn.receive_data(got)
            if not out and not got:
                return

    def closed(self) -> bool:
        return any(isinstance(e, ConnectionTerminated) for e in self.events)

    def raw(self, data: bytes) -> None:
        """Bytes straight to the server, outside the client's own state."""
        self.proto.dataReceived(data)
        got = self.transport.value()
        self.transport.clear()
        if got and not self.closed():
            self.events += self.conn.receive_data(got)

    def request(self, headers=GET, body: bytes = None, end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=end and body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        self.pump()
        return sid

    def response(self, sid: int):
        headers, body, ended, reset = None, b"", False, None
        for e in self.events:
            if getattr(e, "stream_id", None) != sid:
                continue
            if isinstance(e, ResponseReceived):
                headers = dict(e.headers)
            elif isinstance(e, DataReceived):
                body += e.data
            elif isinstance(e, StreamEnded):
                ended = True
            elif isinstance(e, StreamReset):
                reset = e.error_code
        return headers, body, ended, reset

    def goaway(self):
        return [e for e in self.events if isinstance(e, ConnectionTerminated)]


class H2TestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resource = Recorder()

    def connect(self, resource=None, settings: Dict[int, int] = None, h2=None, validate: bool = True, **kwargs):
        factory = HTTPFrontFactory(resource or self.resource, reactor=self.reactor, secure=True, **kwargs)
        factory.h2 = h2 or H2Settings()
        self.factory = factory
        proto = H2FrontChannel(factory)
        transport = StringTransport(peerAddress=CLIENT)
        proto.makeConnection(transport)
        self.proto, self.transport = proto, transport
        return Client(proto, transport, settings, validate)


class RequestTests(H2TestCase):
    def test_getAnswered(self):
        """A GET stream is answered by the resource: status, body, a Date, the stream ended."""
        client = self.connect()
        sid = client.request()
        headers, body, ended, reset = client.response(sid)
        self.assertEqual(headers[b":status"], b"200")
        self.assertIn(b"date", headers)
        self.assertEqual(headers[b"content-length"], b"8")
        self.assertEqual(body, b"hello /a")
        self.assertTrue(ended)
        self.assertIsNone(reset)
        self.assertEqual(self.factory.channels, {self.proto})

    def test_requestInterface(self):
        """
        The resource sees what it sees over HTTP/1.1: method, uri, path,
        Host (from :authority), a secure request from the client's address,
        and the protocol HTTP/2.
        """
        self.connect().request()
        request = self.resource.requests[0]
        self.assertEqual((request.method, request.uri, request.path), (b"GET", b"/a?b=1", b"/a"))
        self.assertEqual(request.getHeader(b"host"), b"example.com")
        self.assertEqual(request.clientproto, b"HTTP/2")
        self.assertTrue(request.isSecure())
        self.assertEqual(request.getClientAddress(), CLIENT)
        self.assertFalse(request.can_switch_protocols)

    def test_cookiesJoined(self):
        """Cookie fields sent apart (RFC 9113 8.2.3) reach the policies as one header, joined with '; '."""
        client = self.connect()
        client.request(GET + [(b"cookie", b"SERVERID=a"), (b"x-other", b"1"), (b"cookie", b"b=2")])
        headers = self.resource.requests[0].requestHeaders
        self.assertEqual(headers.getRawHeaders(b"cookie"), [b"SERVERID=a; b=2"])

    def test_postBodyDeliveredWithRequestBuffering(self):
        """
        With request_buffering, a request body (several DATA frames) is in
        request.content when the resource renders, not before its end.
        """
        client = self.connect(request_buffering=True)
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, [(b":method", b"POST")] + GET[1:])
        client.conn.send_data(sid, b"x" * 1000)
        client.pump()
        self.assertEqual(self.resource.requests, [])  # not before the whole body
        client.conn.send_data(sid, b"y" * 1000, end_stream=True)
        client.pump()
        self.assertEqual(self.resource.bodies, [b"x" * 1000 + b"y" * 1000])
        self.assertIsNone(self.resource.requests[0].body)
        self.assertEqual(client.response(sid)[0][b":status"], b"200")

    def test_streamsAnsweredOutOfOrder(self):
        """Streams are independent: the second is answered while the first still waits."""
        self.resource.hold = True
        client = self.connect()
        first = client.request()
        second = client.request(GET[:3] + [(b":path", b"/2")])
        one, two = self.resource.requests
        two.setResponseCode(201)
        two.write(b"two")
        two.finish()
        client.pump()
        headers, body, ended, _ = client.response(second)
        self.assertEqual((headers[b":status"], body, ended), (b"201", b"two", True))
        self.assertIsNone(client.response(first)[0])
        one.write(b"one")
        one.finish()
        client.pump()
        self.assertEqual(client.response(first)[1:3], (b"one", True))

    def test_connectRefused(self):
        """
        CONNECT never reaches a resource: 501 on its stream (or, with an h2
        older than 4.4, which refuses a CONNECT without :scheme and :path
        itself, a protocol error).
        """
        client = self.connect(validate=False)
        connect = client.request([(b":method", b"CONNECT"), (b":authority", b"example.com:443")])
        headers, _, _, reset = client.response(connect)
        if headers is not None:
            self.assertEqual(headers[b":status"], b"501")
        else:
            self.assertTrue(reset == ErrorCodes.PROTOCOL_ERROR or client.goaway(), client.events)
        self.assertEqual(self.resource.requests, [])

    def test_badPathRefusedPerStream(self):
        """A bad :path gets 400 on its stream; the connection goes on."""
        client = self.connect()
        bad = client.request(GET[:3] + [(b":path", b"/a b")])
        self.assertEqual(client.response(bad)[0][b":status"], b"400")
        self.assertIsNone(client.response(bad)[3])  # the request was whole: no reset after the answer
        ok = client.request()
        self.assertEqual(client.response(ok)[0][b":status"], b"200")
        self.assertEqual(len(self.resource.requests), 1)

    def test_headResponseEndsWithItsHead(self):
        """
        A HEAD response ends its stream with the head, but the request is
        done (notifyFinish fires, the stream is forgotten) only at finish().
        """
        self.resource.hold = True
        client = self.connect()
        sid = client.request([(b":method", b"HEAD")] + GET[1:])
        request = self.resource.requests[0]
        finished = []
        request.notifyFinish().addCallback(finished.append)
        request.setHeader(b"content-length", b"100")
        request.write(b"")
        client.pump()
        self.assertTrue(client.response(sid)[2])
        self.assertEqual(finished, [])
        request.write(b"ignored")
        request.finish()
        self.assertEqual(finished, [None])
        self.assertEqual(self.proto.streams, {})

    def test_renderErrorIs500(self):
        """A resource that raises: 500 on that stream, logged; the connection goes on."""
        class Broken(Resource):
            isLeaf = True

            def render(self, request):
                raise ZeroDivisionError()

        client = self.connect(resource=Broken())
        sid = client.request()
        self.assertEqual(client.response(sid)[0][b":status"], b"500")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertFalse(self.transport.disconnecting)

    def test_bugEndsOnlyTheConnection(self):
        """An error of the listener's own while handling frames is logged and ends that connection, nothing more."""
        client = self.connect()

        def check_head(request):
            raise KeyError("a bug")

        self.factory.check_head = check_head
        client.request()
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertTrue(self.transport.disconnected or self.transport.disconnecting)
        self.assertEqual(self.proto.streams, {})

    def test_tooManyHeaders(self):
        """More than max_headers fields: 431 on that stream."""
        client = self.connect(max_headers=3)
        sid = client.request(GET + [(b"x-%d" % i, b"v") for i in range(4)])
        self.assertEqual(client.response(sid)[0][b":status"], b"431")

    def test_maxBodyBytes(self):
        """A body over max_body_bytes: 413 as soon as it is passed, and the rest is not wanted (reset)."""
        client = self.connect(max_body_bytes=100)
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, [(b":method", b"POST")] + GET[1:])
        client.conn.send_data(sid, b"x" * 101)
        client.pump()
        headers, _, ended, reset = client.response(sid)
        self.assertEqual(headers[b":status"], b"413")
        self.assertTrue(ended)
        self.assertEqual(reset, ErrorCodes.NO_ERROR)
        self.assertEqual(self.resource.requests, [])

    def test_announcedBodyOverLimit(self):
        """A content-length over max_body_bytes: 413 before any body byte."""
        client = self.connect(max_body_bytes=100)
        sid = client.request([(b":method", b"POST")] + GET[1:] + [(b"content-length", b"1000")], end=False)
        self.assertEqual(client.response(sid)[0][b":status"], b"413")

    def test_cutResetsOnlyThatStream(self):
        """The proxy cutting a response (request.channel.transport.loseConnection()) resets that stream only."""
        self.resource.hold = True
        client = self.connect()
        first, second = client.request(), client.request()
        lost = []
        one, two = self.resource.requests
        one.notifyFinish().addErrback(lost.append)
        one.write(b"part")
        one.channel.transport.loseConnection()
        client.pump()
        self.assertEqual(client.response(first)[3], ErrorCodes.INTERNAL_ERROR)
        self.assertEqual(lost, [])  # as with a connection closing: told later, not from inside the call
        self.reactor.advance(0)
        self.assertEqual(len(lost), 1)
        two.finish()
        client.pump()
        self.assertTrue(client.response(second)[2])
        self.assertFalse(self.transport.disconnecting)

    def test_connectionMarkShared(self):
        """The proxy's mark of a client connection that reached a backend is the connection's, for all streams."""
        self.resource.hold = True
        client = self.connect()
        client.request()
        client.request()
        one, two = self.resource.requests
        self.assertFalse(two.slb_proxied)
        one.slb_proxied = True
        self.assertTrue(two.slb_proxied)

    def test_clientResetTellsTheRequest(self):
        """A stream the client resets is a client gone: the request's producer is stopped."""
        self.resource.hold = True
        client = self.connect()
        sid = client.request()
        request = self.resource.requests[0]
        producer = Producer()
        request.write(b"")
        request.registerProducer(producer, True)
        client.conn.reset_stream(sid, ErrorCodes.CANCEL)
        client.pump()
        self.assertEqual(producer.calls, ["stop"])
        self.assertEqual(self.proto.streams, {})

    def test_settingsAdvertised(self):
        """The server's SETTINGS carry max_concurrent_streams, the header list size and the HPACK table size."""
        client = self.connect(h2=H2Settings(7, 8192, 1024))
        changed = [e for e in client.events if isinstance(e, RemoteSettingsChanged)][0].changed_settings
        self.assertEqual(changed[SettingCodes.MAX_CONCURRENT_STREAMS].new_value, 7)
        self.assertEqual(changed[SettingCodes.MAX_HEADER_LIST_SIZE].new_value, 8192)
        self.assertEqual(changed[SettingCodes.HEADER_TABLE_SIZE].new_value, 1024)
        self.assertEqual(changed[SettingCodes.ENABLE_PUSH].new_value, 0)

    def test_maxConcurrentStreams(self):
        """One stream over max_concurrent_streams is refused (REFUSED_STREAM); the connection goes on."""
        self.resource.hold = True
        client = self.connect(h2=H2Settings(max_concurrent_streams=2))
        # A client that ignores the limit (the h2 client would refuse to).
        client.conn.remote_settings = type(client.conn.remote_settings)(client=True)
        streams = [client.request() for _ in range(3)]
        self.assertEqual(client.response(streams[2])[3], ErrorCodes.REFUSED_STREAM)
        self.assertEqual(len(self.resource.requests), 2)
        self.assertEqual(client.goaway(), [])
        self.resource.requests[0].finish()
        later = client.request()
        self.assertIsNone(client.response(later)[3])
        self.assertEqual(len(self.resource.requests), 3)


class FlowControlTests(H2TestCase):
    def hold(self, settings=None):
        self.resource.hold = True
        client = self.connect(settings=settings)
        sid = client.request()
        request = self.resource.requests[0]
        producer = Producer()
        request.write(b"")
        request.registerProducer(producer, True)
        return client, sid, request, producer

    def test_windowLimitsWhatIsSent(self):
        """
        What does not fit the client's window is held, the producer paused
        (so at most a read more arrives); when the client opens the window
        the rest is sent and the producer resumed.
        """
        client, sid, request, producer = self.hold({SettingCodes.INITIAL_WINDOW_SIZE: 1000})
        request.write(b"a" * 1500)
        client.pump()
        self.assertEqual(len(client.response(sid)[1]), 1000)
        self.assertEqual(producer.calls, ["pause"])
        self.assertEqual(request.pending_bytes, 500)
        client.conn.acknowledge_received_data(1000, sid)
        client.pump()
        self.assertEqual(len(client.response(sid)[1]), 1500)
        self.assertEqual(producer.calls, ["pause", "resume"])
        request.unregisterProducer()
        request.finish()
        client.pump()
        self.assertTrue(client.response(sid)[2])

    def test_finishWaitsForWindow(self):
        """finish() with bytes still held: END_STREAM goes after them, once the window opens."""
        client, sid, request, producer = self.hold({SettingCodes.INITIAL_WINDOW_SIZE: 10})
        request.unregisterProducer()
        request.write(b"b" * 30)
        request.finish()
        client.pump()
        self.assertFalse(client.response(sid)[2])
        client.conn.acknowledge_received_data(10, sid)
        client.pump()
        client.conn.acknowledge_received_data(10, sid)
        client.pump()
        self.assertEqual(client.response(sid)[1:3], (b"b" * 30, True))

    def test_clientNotReadingPausesEveryStream(self):
        """The client's socket full: every stream's producer is paused, and resumed when it drains."""
        client, sid, request, producer = self.hold()
        self.proto.pauseProducing()
        self.assertEqual(producer.calls, ["pause"])
        self.proto.resumeProducing()
        self.assertEqual(producer.calls, ["pause", "resume"])

    def test_producerRegisteredWhilePaused(self):
        """A producer registered while the client is not reading starts paused."""
        self.resource.hold = True
        client = self.connect()
        client.request()
        self.proto.pauseProducing()
        producer = Producer()
        self.resource.requests[0].registerProducer(producer, True)
        self.assertEqual(producer.calls, ["pause"])

    def test_clientNotReadingIsClosed(self):
        """A client that reads nothing for client_idle_timeout is disconnected, its streams told."""
        client, sid, request, producer = self.hold()
        self.proto.pauseProducing()
        self.reactor.advance(61)
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)
        self.assertIn("stop", producer.calls)

    def test_windowStaysAtZero(self):
        """
        A stream whose window stays at 0 for client_idle_timeout is reset
        (CANCEL) and its producer stopped; the connection goes on.
        """
        client, sid, request, producer = self.hold({SettingCodes.INITIAL_WINDOW_SIZE: 0})
        request.write(b"x" * 100)
        client.pump()
        self.reactor.advance(30)
        self.assertIsNone(client.response(sid)[3])
        self.reactor.advance(31)
        client.pump()
        self.assertEqual(client.response(sid)[3], ErrorCodes.CANCEL)
        self.assertIn("stop", producer.calls)
        self.assertEqual(self.proto.streams, {})
        self.assertFalse(self.transport.disconnecting)

    def test_connectionWindowStaysAtZero(self):
        """When it is the connection's window that stays at 0, the connection is closed (GOAWAY)."""
        client, sid, request, producer = self.hold()
        request.write(b"x" * 65535)  # the connection's whole window (the client never acknowledges)
        request.write(b"y")
        client.pump()
        self.assertEqual(request.pending_bytes, 1)
        self.reactor.advance(61)
        client.pump()
        self.assertEqual(client.goaway()[0].error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(self.transport.disconnecting)


class AttackTests(H2TestCase):
    def test_rapidReset(self):
        """
        CVE-2023-44487: streams opened and reset at once.  Past the budget,
        GOAWAY with ENHANCE_YOUR_CALM, and the connection closes; every
        reset request was told its client left.
        """
        self.resource.hold = True
        client = self.connect()
        for _ in range(slb_h2.RESET_BURST + 1):
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(sid, GET, end_stream=True)
            client.conn.reset_stream(sid, ErrorCodes.CANCEL)
            client.pump()
            if client.goaway():
                break
        self.assertEqual(client.goaway()[0].error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.resource.requests), slb_h2.RESET_BURST)
        self.assertTrue(all(r.channel is None for r in self.resource.requests))

    def test_resetsWithinBudgetAreFine(self):
        """Resets at the refill rate (a browser cancelling now and then) never end the connection."""
        self.resource.hold = True
        client = self.connect()
        for _ in range(slb_h2.RESET_BURST * 2):
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(sid, GET, end_stream=True)
            client.conn.reset_stream(sid, ErrorCodes.CANCEL)
            client.pump()
            self.reactor.advance(1.0 / slb_h2.RESET_RATE)
        self.assertEqual(client.goaway(), [])

    def test_continuationFlood(self):
        """
        2024's CONTINUATION flood: a header block that never ends.  Once it
        passes max_header_list_size the connection gets GOAWAY
        (ENHANCE_YOUR_CALM) and is closed, long before h2's own limit.
        """
        client = self.connect(h2=H2Settings(max_header_list_size=4096))
        start = HeadersFrame(1)
        start.data = client.conn.encoder.encode(GET)
        start.flags.add("END_STREAM")
        client.raw(start.serialize())
        sent = len(start.data)
        for _ in range(20):
            frame = ContinuationFrame(1)
            frame.data = b"\x00" * 1000
            client.raw(frame.serialize())
            sent += 1000
            if self.transport.disconnecting:
                break
        self.assertTrue(self.transport.disconnecting)
        self.assertLess(sent, 6000)
        self.assertEqual(client.goaway()[0].error_code, ErrorCodes.ENHANCE_YOUR_CALM)

    def test_headerBlockTooSlow(self):
        """A header block left open (no END_HEADERS) for client_idle_timeout closes the connection."""
        client = self.connect()
        start = HeadersFrame(1)
        start.data = client.conn.encoder.encode(GET)
        client.raw(start.serialize())
        self.reactor.advance(61)
        self.assertTrue(self.transport.disconnecting)

    def flood(self, frame_bytes: bytes) -> int:
        client = self.connect()
        for n in range(slb_h2.CONTROL_BURST + 2):
            client.raw(frame_bytes)
            if self.transport.disconnecting:
                break
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(client.goaway()[-1].error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        return n

    def test_pingFlood(self):
        """
        CVE-2019-9512: PING after PING (each wanting an answer) ends in
        GOAWAY past the budget (the client's first SETTINGS took one).
        """
        self.assertEqual(self.flood(PingFrame(0, opaque_data=b"12345678").serialize()), slb_h2.CONTROL_BURST - 1)

    def test_settingsFlood(self):
        """CVE-2019-9515: SETTINGS after SETTINGS ends in GOAWAY past the budget."""
        frame = SettingsFrame(0)
        frame.settings[SettingCodes.ENABLE_PUSH] = 0
        self.assertEqual(self.flood(frame.serialize()), slb_h2.CONTROL_BURST - 1)

    def test_emptyFrameFlood(self):
        """CVE-2019-9518: empty DATA frames (no END_STREAM) on an open stream end in GOAWAY past the budget."""
        self.resource.hold = True
        client = self.connect()
        client.request([(b":method", b"POST")] + GET[1:], end=False)
        for _ in range(slb_h2.CONTROL_BURST + 2):
            client.raw(DataFrame(1).serialize())
            if self.transport.disconnecting:
                break
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(client.goaway()[-1].error_code, ErrorCodes.ENHANCE_YOUR_CALM)

    def test_controlFramesAtARateAreFine(self):
        """PINGs at the refill rate never end the connection."""
        client = self.connect()
        for _ in range(slb_h2.CONTROL_BURST * 2):
            client.raw(PingFrame(0, opaque_data=b"12345678").serialize())
            self.reactor.advance(1.0 / slb_h2.CONTROL_RATE)
        self.assertEqual(client.goaway(), [])
        self.assertFalse(self.transport.disconnecting)

    def test_bodyNeverSent(self):
        """
        A stream that announces a body and stops sending it gets 408 after
        client_idle_timeout; its streamed body fails with 408 (the proxy
        drops its backend connection).
        """
        self.resource.hold = True
        client = self.connect()
        sid = client.request([(b":method", b"POST")] + GET[1:], body=b"part", end=False)
        collector = self.resource.bodies[0]
        self.reactor.advance(59)
        client.pump()
        self.assertIsNone(client.response(sid)[0])
        self.reactor.advance(2)
        client.pump()
        self.assertEqual(client.response(sid)[0][b":status"], b"408")
        self.assertEqual([f.code for f in collector.failed], [408])

    def test_spooledBodyNeverSent(self):
        """With request_buffering, a body that stops gets 408 and never reaches a resource."""
        client = self.connect(request_buffering=True)
        sid = client.request([(b":method", b"POST")] + GET[1:], body=b"part", end=False)
        self.reactor.advance(61)
        client.pump()
        self.assertEqual(client.response(sid)[0][b":status"], b"408")
        self.assertEqual(self.resource.requests, [])

    def test_protocolErrorClosesConnection(self):
        """Bytes that are not HTTP/2 close the connection (GOAWAY from h2), the streams told."""
        self.resource.hold = True
        client = self.connect()
        client.request()
        client.raw(b"\x00\x00\x01\x09\x00\x00\x00\x00\x07x")  # a CONTINUATION out of a header block
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.resource.requests[0].channel)


class LifetimeTests(H2TestCase):
    def test_idleConnectionClosed(self):
        """A connection with no stream for client_idle_timeout gets GOAWAY and is closed."""
        client = self.connect()
        client.request()
        self.reactor.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.reactor.advance(2)
        client.pump()
        self.assertEqual(client.goaway()[0].error_code, ErrorCodes.NO_ERROR)
        self.assertTrue(self.transport.disconnecting)

    def test_drainSendsGoawayAndFinishesStreams(self):
        """
        Graceful shutdown: GOAWAY naming the last stream accepted; that
        stream is still answered, a later one is refused, and the connection
        closes after the last response (the drain then ends).
        """
        self.resource.hold = True
        client = self.connect()
        sid = client.request()
        done = self.factory.drain(10)
        client.pump()
        goaway = client.goaway()
        self.assertEqual((goaway[0].error_code, goaway[0].last_stream_id), (ErrorCodes.NO_ERROR, sid))
        self.assertFalse(self.transport.disconnecting)
        # A stream the client opened before it read the GOAWAY.
        later = HeadersFrame(sid + 2)
        later.data = client.conn.encoder.encode(GET)
        later.flags.add("END_HEADERS")
        later.flags.add("END_STREAM")
        self.proto.dataReceived(later.serialize())
        resets = [f for f in frames(self.transport.value()) if isinstance(f, RstStreamFrame)]
        self.assertEqual([(f.stream_id, f.error_code) for f in resets], [(sid + 2, ErrorCodes.REFUSED_STREAM)])
        self.assertEqual(len(self.resource.requests), 1)
        request = self.resource.requests[0]
        request.write(b"done")
        request.finish()
        self.assertTrue(self.transport.disconnecting)
        self.proto.connectionLost(None)
        self.assertTrue(done.called)

    def test_drainForcesAfterGrace(self):
        """A stream still open after the grace period is cut with the connection."""
        self.resource.hold = True
        client = self.connect()
        client.request()
        done = self.factory.drain(5)
        self.reactor.advance(5)
        self.assertTrue(self.transport.disconnected or self.transport.disconnecting)
        self.proto.connectionLost(None)
        self.assertTrue(done.called)

    def test_drainDuringHandshake(self):
        """
        A connection still in its TLS handshake when draining began (an
        HTTP/1.1 channel then): once h2 takes over, its first stream is
        answered and GOAWAY names it.
        """
        factory = HTTPFrontFactory(self.resource, reactor=self.reactor, secure=True)
        factory.h2 = H2Settings()
        channel = factory.buildProtocol(CLIENT)
        transport = StringTransport(peerAddress=CLIENT)
        channel.makeConnection(transport)
        factory.drain(10)
        proto = channel.protocol_for_alpn(b"h2")
        client = Client(proto, transport)
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, GET, end_stream=True)
        proto.dataReceived(client.conn.data_to_send())
        sent = frames(transport.value())
        self.assertEqual([f.last_stream_id for f in sent if isinstance(f, GoAwayFrame)], [sid])
        self.assertEqual([type(f) for f in sent if f.stream_id == sid], [HeadersFrame, DataFrame])
        self.assertIn("END_STREAM", sent[-1].flags)
        self.assertTrue(transport.disconnecting)

    def test_retireOnReload(self):
        """A reload retiring the factory: GOAWAY, in-flight streams finish, then the connection closes."""
        self.resource.hold = True
        client = self.connect()
        client.request()
        self.factory.retire(10)
        client.pump()
        self.assertEqual(client.goaway()[0].error_code, ErrorCodes.NO_ERROR)
        self.resource.requests[0].finish()
        self.assertTrue(self.transport.disconnecting)
        self.proto.connectionLost(None)
        self.assertEqual(self.reactor.getDelayedCalls(), [])  # the grace's cut is cancelled

    def test_retireCutsAfterGrace(self):
        """A stream still open when the reload's grace period ends is cut with its connection."""
        self.resource.hold = True
        client = self.connect()
        client.request()
        lost = []
        self.resource.requests[0].notifyFinish().addErrback(lost.append)
        self.factory.retire(10)
        self.reactor.advance(10)
        self.assertEqual(len(lost), 1)
        self.assertTrue(self.transport.disconnected or self.transport.disconnecting)

    def test_clientGoawayEndsConnection(self):
        """
        A client's GOAWAY (h2 sends nothing after one): the streams still
        open end as if the client had closed, and the connection closes.
        """
        self.resource.hold = True
        client = self.connect()
        client.request()
        lost = []
        self.resource.requests[0].notifyFinish().addErrback(lost.append)
        client.conn.close_connection()
        client.pump()
        self.assertEqual(len(lost), 1)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.proto.streams, {})

    def test_connectionLostTellsStreams(self):
        """The connection lost: every open stream's request is told, and the factory forgets it."""
        self.resource.hold = True
        client = self.connect()
        client.request()
        client.request()
        lost = []
        for request in self.resource.requests:
            request.notifyFinish().addErrback(lost.append)
        self.proto.connectionLost(None)
        self.assertEqual(len(lost), 2)
        self.assertEqual(self.factory.channels, set())


class SwitchTests(SynchronousTestCase):
    def channel(self, h2=True):
        reactor = MemoryReactorClock()
        limit = ConnectionLimit(10, "test")
        factory = HTTPFrontFactory(Recorder(), reactor=reactor, secure=True, limit=limit)
        if h2:
            factory.h2 = H2Settings()
        channel = factory.buildProtocol(CLIENT)
        transport = StringTransport(peerAddress=CLIENT)
        channel.makeConnection(transport)
        return factory, channel, transport, reactor

    def test_h2TakesOver(self):
        """
        ALPN chose h2: the HTTP/1.1 channel hands the connection to an
        H2FrontChannel, which keeps its place in the limits and the
        factory's connections, and its producer registration.
        """
        factory, channel, transport, reactor = self.channel()
        new = channel.protocol_for_alpn(b"h2")
        self.assertIsInstance(new, H2FrontChannel)
        self.assertEqual(factory.channels, {new})
        self.assertEqual(factory.limit.open, 1)
        self.assertIs(transport.producer, new)
        self.assertTrue(transport.value().startswith(b"\x00"))  # the server's SETTINGS frame
        self.assertEqual(reactor.getDelayedCalls()[0].func, new._check_timeout)
        new.connectionLost(None)
        self.assertEqual(factory.limit.open, 0)

    def test_http11Stays(self):
        """http/1.1 (or no ALPN), or a factory without HTTP/2: the HTTP/1.1 channel goes on."""
        factory, channel, transport, reactor = self.channel()
        self.assertIs(channel.protocol_for_alpn(b"http/1.1"), channel)
        self.assertIs(channel.protocol_for_alpn(None), channel)
        factory, channel, transport, reactor = self.channel(h2=False)
        self.assertIs(channel.protocol_for_alpn(b"h2"), channel)
        self.assertIsInstance(channel, HTTPFrontChannel)


class SmugglingTests(H2TestCase):
    """What an HTTP/2 request could smuggle into the HTTP/1.1 request to the backend never reaches a resource."""

    def send(self, headers, body=None):
        client = self.connect()
        frame = HeadersFrame(1)
        frame.data = client.conn.encoder.encode(headers)
        frame.flags.add("END_HEADERS")
        if body is None:
            frame.flags.add("END_STREAM")
        client.raw(frame.serialize())
        if body is not None:
            data = DataFrame(1)
            data.data = body
            data.flags.add("END_STREAM")
            client.raw(data.serialize())
        return client

    def test_refusedFields(self):
        """
        CR/LF or NUL in a value, surrounding spaces, an uppercase or invalid
        name, Transfer-Encoding, Connection: each is a protocol error (h2
        checks inbound fields), the connection closes and no request is
        rendered.
        """
        for extra in [(b"x-a", b"a\r\nX-Injected: 1"), (b"x-a", b"a\x00b"), (b"x-a", b" v"), (b"X-Upper", b"v"),
                      (b"bad name", b"v"), (b"transfer-encoding", b"chunked"), (b"connection", b"close")]:
            client = self.send(GET + [extra])
            self.assertTrue(self.transport.disconnecting, extra)
            self.assertEqual(client.goaway()[0].error_code, ErrorCodes.PROTOCOL_ERROR, extra)
        self.assertEqual(self.resource.requests, [])

    def test_bodyLongerThanContentLength(self):
        """
        A body longer than its content-length is a stream error (RST_STREAM
        PROTOCOL_ERROR): the body's consumer never gets more than the
        announced bytes, and fails; the connection goes on.
        """
        self.resource.hold = True
        client = self.connect()
        sid = client.request(POST + [(b"content-length", b"3")], body=b"abc", end=False)
        client.conn.send_data(sid, b"de", end_stream=True)
        client.pump()
        collector = self.resource.bodies[0]
        self.assertEqual(collector.value(), b"abc")
        self.assertFalse(collector.ended)
        self.assertEqual(len(collector.failed), 1)
        self.assertEqual(client.response(sid)[3], ErrorCodes.PROTOCOL_ERROR)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(client.goaway(), [])
        client.request()
        self.assertEqual(len(self.resource.requests), 2)

    def test_bodyLongerThanContentLengthInOneRead(self):
        """
        The same, when HEADERS and the too long DATA come in one read: the
        stream is reset before any resource sees it, the connection goes on.
        """
        client = self.connect()
        head = HeadersFrame(1)
        head.data = client.conn.encoder.encode(POST + [(b"content-length", b"3")])
        head.flags.add("END_HEADERS")
        data = DataFrame(1)
        data.data = b"hello"
        data.flags.add("END_STREAM")
        self.transport.clear()
        self.proto.dataReceived(head.serialize() + data.serialize())
        resets = [f for f in frames(self.transport.value()) if isinstance(f, RstStreamFrame)]
        self.assertEqual([(f.stream_id, f.error_code) for f in resets], [(1, ErrorCodes.PROTOCOL_ERROR)])
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.resource.requests, [])
        self.assertEqual(self.proto.streams, {})

    def test_bodyShorterThanContentLength(self):
        """A body that ends before its content-length: a stream error, its body fails and never ends."""
        self.resource.hold = True
        client = self.connect()
        sid = client.request(POST + [(b"content-length", b"10")], body=b"abc", end=False)
        client.conn.send_data(sid, b"", end_stream=True)
        client.pump()
        collector = self.resource.bodies[0]
        self.assertFalse(collector.ended)
        self.assertEqual(len(collector.failed), 1)
        self.assertEqual(client.response(sid)[3], ErrorCodes.PROTOCOL_ERROR)
        self.assertFalse(self.transport.disconnecting)


class ReloadTests(SynchronousTestCase):
    def test_reconfigureRetiresTheOldFactory(self):
        """
        A reload that gives a listener a new factory retires the old one
        (under its TLS wrapper) with the listener's grace period: its HTTP/2
        connections get GOAWAY and move to the new configuration.
        """
        from zope.interface import implementer

        from twisted_slb.config import ListenerConfig
        from twisted_slb.limits import ConnectionAdmission, ConnectionLimit, IListenerFactory
        from twisted_slb.service import ListenerService

        @implementer(IListenerFactory)
        class Old:
            retired = None
            admission = ConnectionAdmission(ConnectionLimit(), reactor=MemoryReactorClock())

            def retire(self, grace):
                self.retired = grace

        class Wrapper:
            def __init__(self, inner):
                self.wrappedFactory = inner

        old = Old()
        config = ListenerConfig(name="secure", protocol="https", bind="tcp:0")
        service = ListenerService(config, Wrapper(old), MemoryReactorClock())
        service.grace_period = 7.0
        service.reconfigure(config, Wrapper(Old()))
        self.assertEqual(old.retired, 7.0)


POST = [(b":method", b"POST")] + GET[1:]


class StreamedBodyTests(H2TestCase):
    """Request bodies stream to the resource (the proxy) with per-stream flow control as back-pressure."""

    def send(self, client, sid: int, data: bytes, end: bool = False) -> int:
        """Send what the client's windows allow of C{data}; the number of bytes sent."""
        conn = client.conn
        room = min(conn.local_flow_control_window(sid), len(data))
        pos = 0
        while pos < room:
            n = min(conn.max_outbound_frame_size, room - pos)
            conn.send_data(sid, data[pos:pos + n], end_stream=end and pos + n == len(data))
            pos += n
        client.pump()
        return pos

    def test_streamIsAnIBodyReader(self):
        """An H2Request is the IBodyReader of its body."""
        self.resource.hold = True
        self.connect().request(POST, end=False)
        request = self.resource.requests[0]
        self.assertTrue(verifyObject(IBodyReader, request))
        self.assertIs(request.body.reader, request)

    def test_requestHandedOverBeforeEndStream(self):
        """
        A POST reaches the resource as soon as its head is in, with a
        streamed body (no content): DATA frames reach the body's consumer
        as they arrive, END_STREAM ends it.
        """
        self.resource.hold = True
        client = self.connect()
        sid = client.request(POST + [(b"content-length", b"8")], body=b"abcd", end=False)
        request = self.resource.requests[0]
        self.assertIsNone(request.content)
        self.assertEqual(request.body.length, 8)
        collector = self.resource.bodies[0]
        self.assertEqual((collector.value(), collector.ended), (b"abcd", False))
        client.conn.send_data(sid, b"efgh", end_stream=True)
        client.pump()
        self.assertEqual((collector.value(), collector.ended), (b"abcdefgh", True))
        request.finish()
        client.pump()
        self.assertTrue(client.response(sid)[2])
        self.assertIsNone(client.response(sid)[3])  # the request was whole: no reset

    def test_endStreamOnHeadersIsNoBody(self):
        """END_STREAM on HEADERS: no body at all (so the proxy may retry the request)."""
        self.connect().request()
        request = self.resource.requests[0]
        self.assertIsNone(request.body)
        self.assertIsNone(request.content)

    def test_wholeBodyInTheFirstReadGetsItsLength(self):
        """A body that ends in the read that brought its head (no content-length) is handed over with its length."""
        self.resource.hold = True
        self.connect().request(POST, body=b"hello")
        body = self.resource.requests[0].body
        self.assertEqual((body.length, body.complete), (5, True))
        self.assertEqual(self.resource.bodies[0].value(), b"hello")

    def test_emptyBodyWithItsHeadIsNoBody(self):
        """HEADERS then an empty DATA with END_STREAM, in one read: no body."""
        self.resource.hold = True
        self.connect().request(body=b"")
        self.assertIsNone(self.resource.requests[0].body)

    def test_slowConsumerWithholdsTheStreamWindow(self):
        """
        A consumer (backend) that does not read: past HIGH_WATER the
        stream's window is no longer given back, so the client's window
        runs out and it stops; the balancer holds at most HIGH_WATER plus
        one window (and one frame).  Other streams still get the
        connection's window.  When the consumer reads again, the window
        comes back and the whole body arrives in order.
        """
        self.resource.hold = True
        client = self.connect()
        sid = client.request(POST, end=False)
        request = self.resource.requests[0]
        collector = self.resource.bodies[0]
        request.body.pauseProducing()  # the backend is not reading
        data = bytes(range(256)) * 4096  # 1 MiB
        sent = 0
        for _ in range(100):
            n = self.send(client, sid, data[sent:])
            sent += n
            if not n:
                break
        self.assertEqual(client.conn.local_flow_control_window(sid), 0)
        self.assertTrue(request.body_paused)
        self.assertLessEqual(sent, HIGH_WATER + 65535 + 16384)
        self.assertLessEqual(request.body.waiting_bytes, HIGH_WATER + 65535 + 16384)
        self.assertEqual(collector.value(), b"")
        # The connection's window was given back: another stream can send.
        other = client.request(POST, end=False)
        self.assertEqual(self.send(client, other, b"z" * 1000), 1000)
        self.assertEqual(self.resource.bodies[1].value(), b"z" * 1000)
        # The backend reads again: the window comes back, the rest flows.
        request.body.resumeProducing()
        client.pump()
        for _ in range(100):
            sent += self.send(client, sid, data[sent:], end=True)
            if sent == len(data):
                break
        self.assertEqual(collector.value(), data)
        self.assertTrue(collector.ended)

    def test_maxBodyBytesMidStream(self):
        """
        A streamed body passing max_body_bytes: 413 at once, the body's
        consumer told (413), and the rest of the stream not wanted (reset
        NO_ERROR after the answer).
        """
        self.resource.hold = True
        client = self.connect(max_body_bytes=100)
        sid = client.request(POST, body=b"x" * 60, end=False)
        collector = self.resource.bodies[0]
        self.assertEqual(collector.value(), b"x" * 60)
        client.conn.send_data(sid, b"y" * 60)
        client.pump()
        headers, _, ended, reset = client.response(sid)
        self.assertEqual(headers[b":status"], b"413")
        self.assertTrue(ended)
        self.assertEqual(reset, ErrorCodes.NO_ERROR)
        self.assertEqual([f.code for f in collector.failed], [413])
        self.assertEqual(collector.value(), b"x" * 60)
        self.assertEqual(self.proto.streams, {})

    def test_dataAfterA408WaitingForWindowIsDropped(self):
        """
        DATA that comes after its body failed (408), while the answer waits
        for the client's window, is acknowledged and dropped: the failed
        body holds nothing, and the stream's window is not withheld.
        """
        self.resource.hold = True
        client = self.connect(settings={SettingCodes.INITIAL_WINDOW_SIZE: 0})
        sid = client.request(POST, body=b"x" * 10, end=False)
        request = self.resource.requests[0]
        self.reactor.advance(61)
        client.pump()
        self.assertEqual(request.code, 408)
        self.assertIn(sid, self.proto.streams)  # the 408's body waits for window
        for _ in range(8):
            client.conn.send_data(sid, b"y" * 16000)
            client.pump()
        self.assertEqual(request.body.waiting, [])
        self.assertFalse(request.body_paused)
        self.assertEqual([f.code for f in self.resource.bodies[0].failed], [408])

    def test_maxBodyBytesAfterTheResponseStarted(self):
        """Over max_body_bytes once the response has started: the stream is reset (CANCEL), the others go on."""
        self.resource.hold = True
        client = self.connect(max_body_bytes=100)
        sid = client.request(POST, body=b"x" * 60, end=False)
        request = self.resource.requests[0]
        request.write(b"early")
        client.conn.send_data(sid, b"y" * 60)
        client.pump()
        self.assertEqual(client.response(sid)[3], ErrorCodes.CANCEL)
        self.assertEqual([f.code for f in self.resource.bodies[0].failed], [413])
        self.assertFalse(self.transport.disconnecting)

    def test_requestBufferingKeepsSpooling(self):
        """request_buffering on the listener: the resource gets the whole body in content, after END_STREAM."""
        client = self.connect(request_buffering=True)
        sid = client.request(POST, end=False)
        self.assertEqual(self.send(client, sid, b"a" * 60000), 60000)
        self.assertEqual(self.resource.requests, [])
        client.conn.send_data(sid, b"b", end_stream=True)
        client.pump()
        self.assertEqual(self.resource.bodies, [b"a" * 60000 + b"b"])
        self.assertIsNone(self.resource.requests[0].body)

    def test_earlyAnswerDrainsTheRest(self):
        """
        A response that ends before the body: the stream is reset with
        NO_ERROR after it, the body stopped, and DATA still in flight is
        acknowledged on the connection (the next streams are not starved).
        """
        client = self.connect()  # the Recorder answers at once, reading nothing
        sid = client.request(POST, body=b"x" * 100, end=False)
        headers, body, ended, reset = client.response(sid)
        self.assertEqual((headers[b":status"], ended, reset), (b"200", True, ErrorCodes.NO_ERROR))
        self.assertTrue(self.resource.requests[0].body.stopped)
        self.assertEqual(self.proto.streams, {})
        # DATA the client sent before it saw the reset: more than the whole connection window.
        for _ in range(70):
            frame = DataFrame(sid)
            frame.data = b"y" * 16384
            client.raw(frame.serialize())
        self.assertFalse(self.transport.disconnecting)
        later = client.request(POST, body=b"z" * 1000)
        self.assertEqual(client.response(later)[0][b":status"], b"200")

    def test_earlyAnswerWhileStreamingKeepsReading(self):
        """
        A response that starts before the body ended (full duplex): the body
        goes on reaching its consumer, and the response ends once both are done.
        """
        self.resource.hold = True
        client = self.connect()
        sid = client.request(POST, body=b"a", end=False)
        request = self.resource.requests[0]
        request.write(b"answer")
        client.conn.send_data(sid, b"b", end_stream=True)
        client.pump()
        self.assertEqual(self.resource.bodies[0].value(), b"ab")
        self.assertTrue(self.resource.bodies[0].ended)
        request.finish()
        client.pump()
        self.assertEqual(client.response(sid)[1:], (b"answer", True, None))

    def test_clientResetFailsTheBody(self):
        """A stream the client resets mid-body: its body fails, so the proxy drops the backend connection."""
        self.resource.hold = True
        client = self.connect()
        sid = client.request(POST, body=b"a", end=False)
        client.conn.reset_stream(sid, ErrorCodes.CANCEL)
        client.pump()
        self.assertEqual(len(self.resource.bodies[0].failed), 1)

    def test_connectionLostFailsTheBodies(self):
        """The connection lost mid-body: every streamed body fails."""
        self.resource.hold = True
        client = self.connect()
        client.request(POST, body=b"a", end=False)
        self.proto.connectionLost(None)
        self.assertEqual(len(self.resource.bodies[0].failed), 1)

    def test_pausedBodyIsNotAnIdleClient(self):
        """A body held back by its consumer past client_idle_timeout is not the client's fault: no 408."""
        self.resource.hold = True
        client = self.connect()
        sid = client.request(POST, end=False)
        request = self.resource.requests[0]
        request.body.pauseProducing()
        while self.send(client, sid, b"x" * 65536):
            pass
        self.assertTrue(request.body_paused)
        self.reactor.advance(200)
        client.pump()
        self.assertIsNone(client.response(sid)[0])
        self.assertEqual(self.resource.bodies[0].failed, [])
