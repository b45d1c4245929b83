# -*- test-case-name: tests.test_h2 -*-
"""
HTTP/2 on the HTTPS listeners, built on the C{h2} library (python-hyper, the
library Twisted's own HTTP/2 server uses).

An https listener offers C{h2} over ALPN (its C{alpn}, by default
C{["h2", "http/1.1"]}).  The connection starts as an ordinary
L{twisted_slb.web.front.HTTPFrontChannel}; when the TLS handshake ends with
C{h2} negotiated, L{twisted_slb.tls} asks that channel for the protocol to
use (L{twisted_slb.web.front.HTTPFrontChannel.protocol_for_alpn}) and an
L{H2FrontChannel} takes the connection over, with the same factory, limits,
counters and client address.

Each stream is an L{H2Request}: a L{twisted_slb.web.front.FrontRequest} (the
same request interface, and most of the same code) whose response goes out
as HTTP/2 frames.  So every stream takes the same path as an HTTP/1.1
request: rules, persistence (cookies read and set the same way; the
C{Cookie} fields HTTP/2 splits are joined with C{"; "} first), the
X-Forwarded-* fields, limits, retries, the access log (with the protocol,
C{HTTP/2}) and the stats.  Backends are still spoken to over HTTP/1.1 from
the shared pool.

Request bodies stream (L{twisted_slb.web.body}): a stream is handed to the
resource tree once the read that brought its HEADERS is handled, with
C{request.body}, a L{twisted_slb.web.body.StreamedBody} fed with its DATA
(no body when END_STREAM came with the HEADERS; a body that ended in that
same read gets its length).  The stream is the body's
L{twisted_slb.web.body.IBodyReader}: paused, it stops acknowledging DATA,
so the stream's window is not opened again and the client stops once it is
used; resumed, it gives back what it withheld.  With C{request_buffering}
the body is spooled and the stream handed over at its end, as before.  A
body that does not match its C{content-length} is a stream error
(C{RST_STREAM PROTOCOL_ERROR}, see L{_Connection}).

Flow control and back-pressure: a response is sent within the stream's and
the connection's windows; what does not fit is kept (at most one read of the
backend per stream, as the stream's producer, the proxy's exchange, is
paused at once) until the client opens its window again.  When the client's
socket is full, every stream's producer is paused.  So a slow client, or
one that never opens its window, never makes the balancer buffer more than a
bounded amount.  The other way, a request body held back by its backend
holds at most L{twisted_slb.web.body.HIGH_WATER} plus one stream window;
the connection's window is always opened again, so that one slow backend
does not stall the other streams.

What it refuses (each is a known attack on HTTP/2 servers):

 - rapid reset (CVE-2023-44487): streams the client resets, or that are
   refused because C{max_concurrent_streams} are already open, draw from a
   budget (L{RESET_BURST}, refilled at L{RESET_RATE} a second); past it,
   GOAWAY with C{ENHANCE_YOUR_CALM} and the connection closes;
 - CONTINUATION flood (2024): a header block (HEADERS and its CONTINUATION
   frames) longer than C{max_header_list_size} closes the connection, before
   the block is decoded; so does one that does not end within the idle
   timeout;
 - SETTINGS, PING, PRIORITY, empty DATA and unknown frame floods
   (CVE-2019-9512, -9515, -9518): frames that carry no request work draw
   from a budget (L{CONTROL_BURST}, L{CONTROL_RATE}); past it, GOAWAY with
   C{ENHANCE_YOUR_CALM};
 - a stream that never sends its (whole) body: 408 after
   C{client_idle_timeout} without a body byte (not counting the time its
   window is withheld because the backend does not read);
 - a window that stays at 0: a stream with a response waiting for window for
   C{client_idle_timeout} is reset; if it is the connection's window, the
   connection is closed.  A client that stops reading its socket is closed
   after the same time, as over HTTP/1.1.

Graceful: on shutdown (L{H2FrontChannel.goaway}) and on a reload that
replaces the listener's factory, the connection sends GOAWAY naming the last
stream it accepted; streams in flight finish (within the grace period), later
ones are refused (C{REFUSED_STREAM}, which clients retry on a new
connection), and the connection closes once the last stream is answered.
"""

from __future__ import annotations

import struct
from tempfile import SpooledTemporaryFile
from typing import Dict, List, Optional, Tuple, cast

import attr
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated, DataReceived, RemoteSettingsChanged, RequestReceived, StreamEnded, StreamReset,
    TrailersReceived, WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_slb._io.headers import FastHeaders
from twisted_slb._typing import IStreamTransport
from twisted_slb.web.front import (
    _BAD_TARGET, _REASONS, _TOKEN, SPOOL_BYTES, BadRequest, FrontRequest, HTTPFrontChannel, _http_date, render,
)
from twisted_slb.web.body import BodyError, IBodyReader, StreamedBody

log = Logger(namespace="twisted_slb.front")

#: The protocol name requests carry (C{clientproto}, and the access log).
PROTOCOL = b"HTTP/2"
#: The connection's receive window (the streams' stay at 65,535, the
#: default): how much request body all streams together may have in flight.
CONNECTION_WINDOW = 1 << 20
#: Streams reset by the client or refused, at most this many at once...
RESET_BURST = 200
#: ...and this many a second after that (rapid reset, CVE-2023-44487).
RESET_RATE = 20.0
#: Frames that carry no request work (SETTINGS, PING, PRIORITY, empty DATA,
#: empty CONTINUATION, unknown types), at most this many at once...
CONTROL_BURST = 1000
#: ...and this many a second after that.
CONTROL_RATE = 100.0
#: Response fields HTTP/2 forbids (RFC 9113 8.2.2); the proxy has dropped the
#: backend's already, these are the ones the balancer itself may set.
_CONNECTION_FIELDS = frozenset(
    [b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"])
_PREFACE_LENGTH = 24
_FRAME_HEAD = struct.Struct(">HBBBL")  # length (24 bits as 16 + 8), type, flags, stream id
# Frame types and flags (RFC 9113 6).
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, \
    _CONTINUATION = range(10)
_END_STREAM = 0x1
_END_HEADERS = 0x4
_ACK = 0x1


def _no_length_check(length: int, end_stream: bool) -> None:
    """See L{_Connection}."""


class _Connection(H2Connection):
    """
    h2's connection, less its check of request bodies against their
    C{content-length}: h2 treats a mismatch as a connection error (GOAWAY,
    every stream on the connection lost), raised in the middle of a read
    (so that the other streams' frames of that read are lost too).  RFC 9113
    8.1.1 makes it a stream error, which L{H2FrontChannel} applies itself
    (L{H2FrontChannel._malformed}).  h2 has no public switch for it (4.x):
    its streams' C{_track_content_length} is replaced by a no-op when h2
    creates them; with an h2 that changes these names, h2's own (stricter)
    check stays, and the backend never gets more than the announced length
    either way.
    """

    def _begin_new_stream(self, stream_id, allowed_ids):
        stream = H2Connection._begin_new_stream(self, stream_id, allowed_ids)
        if hasattr(stream, "_track_content_length"):
            stream._track_content_length = _no_length_check
        return stream


@attr.s(frozen=True, auto_attribs=True)
class H2Settings:
    """
    What an HTTP listener's HTTP/2 connections advertise and enforce.

    @ivar max_concurrent_streams: streams a client may have open at once
        (C{SETTINGS_MAX_CONCURRENT_STREAMS}); one more is refused.
    @ivar max_header_list_size: the longest header list, decoded, in bytes
        (C{SETTINGS_MAX_HEADER_LIST_SIZE}); also the longest header block
        (HEADERS and CONTINUATION frames) accepted, encoded.
    @ivar header_table_size: the HPACK dynamic table the client may make this
        side keep (C{SETTINGS_HEADER_TABLE_SIZE}).
    """

    max_concurrent_streams: int = 100
    max_header_list_size: int = 65536
    header_table_size: int = 4096

    @staticmethod
    def take_over(channel) -> "H2FrontChannel":
        """
        The L{H2FrontChannel} serving C{channel}'s connection from now on
        (C{h2} was negotiated over ALPN): the HTTP/1.1 server asks the
        factory's settings, so that it need not import this module.
        """
        return H2FrontChannel.take_over(channel)


class _Budget:
    """A token bucket: C{burst} at once, refilled at C{rate} a second."""

    __slots__ = ("burst", "rate", "tokens", "at")

    def __init__(self, burst: int, rate: float, now: float) -> None:
        self.burst = burst
        self.rate = rate
        self.tokens = float(burst)
        self.at = now

    def take(self, n: int, now: float) -> bool:
        """Spend C{n}; C{False} once the budget is overdrawn."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate) - n
        self.at = now
        return self.tokens >= 0


@implementer(IBodyReader)
class H2Request(FrontRequest):
    """
    One stream of an L{H2FrontChannel}: a L{FrontRequest} (same interface,
    same header store) whose response goes out as HTTP/2 frames.

    The proxy reaches a request's connection through C{request.channel}
    (C{channel.transport.loseConnection()} to cut a response short, and the
    C{slb_proxied} mark of a client connection that already sent a request
    to a backend).  Over HTTP/2 cutting the connection would cut every other
    stream too, so a stream is its own C{channel} and C{transport}: closing
    it resets the stream, and C{slb_proxied} is the connection's.
    """

    clientproto = PROTOCOL
    can_switch_protocols = False
    dispatched = False
    #: the client sent END_STREAM: the request is whole
    request_ended = False
    #: the response's END_STREAM (or a reset) was sent
    closed = False
    #: response bytes waiting for window, and whether END_STREAM follows them
    pending_bytes = 0
    ending = False
    blocked_at = 0.0
    producer_paused = False
    #: response body bytes still due by its Content-Length, or None
    length_left: Optional[int] = None
    body_read = 0
    last_in = 0.0
    #: the streamed request body (an L{IRequestBody}), or None (no body, or
    #: spooled into C{content} with request_buffering)
    body: Optional[StreamedBody] = None
    #: the body's consumer does not keep up: DATA is not acknowledged
    body_paused = False
    #: flow-controlled bytes received while paused, not yet acknowledged
    withheld = 0
    #: the announced content-length, or None
    length: Optional[int] = None

    def __init__(self, connection: H2FrontChannel, stream_id: int, method: bytes, uri: bytes,
                 headers: FastHeaders) -> None:
        # A stream stands for its channel (and is its own transport): it
        # overrides each FrontRequest method that uses the channel as an
        # HTTPFrontChannel; FrontRequest.__init__ reads only what
        # H2FrontChannel has too (secure, peer, host, factory).
        FrontRequest.__init__(self, cast("HTTPFrontChannel", connection), method, uri, PROTOCOL, headers, True)
        self.connection = connection
        self.stream_id = stream_id
        self.channel = cast("HTTPFrontChannel", self)
        self.transport = self
        self.pending: List[bytes] = []
        self.last_in = connection.clock.seconds()

    def __repr__(self) -> str:
        return f"<H2Request {self.stream_id} {self.method!r} {self.uri!r}>"

    @property
    def slb_proxied(self) -> bool:
        return self.connection.slb_proxied

    @slb_proxied.setter
    def slb_proxied(self, value: bool) -> None:
        self.connection.slb_proxied = value

    # -- the request body ------------------------------------------------------
    #
    # Streamed (the default): the stream is the IBodyReader of its
    # StreamedBody.  Received DATA is acknowledged (the stream's window
    # opened again) as it is fed to the body, unless the body is paused: then
    # the stream's window is withheld, so the client stops after what its
    # window allowed, and given back when the body resumes.  The connection's
    # window is always acknowledged at once (one slow backend must not stall
    # the other streams).  With request_buffering the body is spooled
    # (body_received, body_ended) and the request handed over at its end.

    def body_received(self, data: bytes) -> None:
        """Request body bytes to spool (request_buffering)."""
        if self.content is None:
            self.content = SpooledTemporaryFile(max_size=SPOOL_BYTES)
        self.content.write(data)

    def body_ended(self) -> None:
        """The whole spooled request is here: it can be answered."""
        if self.content is not None:
            self.content.seek(0, 0)

    def pause_body(self) -> None:
        """L{IBodyReader}: the body's consumer does not keep up; withhold this stream's window."""
        self.body_paused = True

    def resume_body(self) -> None:
        """L{IBodyReader}: give back the window withheld while paused."""
        if self.body_paused:
            self.body_paused = False
            self.last_in = self.connection.clock.seconds()  # the client was held back, not idle
            self.connection.acknowledge(self)

    def discard_body(self) -> None:
        """
        L{IBodyReader}: nobody wants the rest: it is drained (acknowledged as
        it comes, dropped by the body) until the response ends the stream,
        which then resets it (C{NO_ERROR}) if the body has not ended.
        """
        self.resume_body()

    # -- as the proxy's "channel" and "transport" ------------------------------

    def loseConnection(self) -> None:
        """
        Cut this response short: the stream is reset, the others go on.  As
        with a connection closing, the request hears of it later, not from
        inside this call.
        """
        self.connection.reset(self, ErrorCodes.INTERNAL_ERROR, notify=False)

    abortConnection = loseConnection

    # -- the response -----------------------------------------------------------

    def registerProducer(self, producer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(f"a producer is already registered: {self.producer!r}")
        self.producer = producer
        self.streaming = streaming
        self.producer_paused = False
        if self.channel is None:
            producer.stopProducing()
            return
        connection = self.connection
        if streaming:
            if connection.paused or self.pending:
                self.producer_paused = True
                producer.pauseProducing()
        else:
            connection.pull(self)

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producer_paused = False

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("write() after finish()")
        if self.channel is None:
            return  # the stream is gone
        connection = self.connection
        if not self.started:
            connection.send_head(self, False)
        if data and not self.no_body and not self.closed:
            connection.send_body(self, data)

    def finish(self) -> None:
        if self.finished:
            raise RuntimeError("finish() called twice")
        self.finished = True
        self._lost_callback = None
        if self.channel is not None:
            connection = self.connection
            if not self.started:
                connection.send_head(self, True)
            elif not self.closed:
                connection.end_body(self)
            elif not self.pending:
                connection.done(self)  # its END_STREAM went already
        ds, self._finished_ds = self._finished_ds, None
        if ds:
            for d in ds:
                d.callback(None)

    def response_fields(self) -> List[Tuple[bytes, bytes]]:
        """The response head as HTTP/2 fields: C{:status}, then lowercase names."""
        self.started = True
        code = self.code
        self.no_body = self.method == b"HEAD" or code in (204, 304) or code < 200
        headers = self.responseHeaders
        items = headers.by_name.items() if type(headers) is FastHeaders else headers.getAllRawHeaders()
        fields = [(b":status", b"%d" % code)]
        date = False
        for name, values in items:
            lower = name.lower()
            if lower in _CONNECTION_FIELDS:
                continue
            if lower == b"date":
                date = True
            for value in values:
                if 0 in value:
                    continue  # NUL: never valid in HTTP/2 (RFC 9113 8.2.1); CR and LF are folded already
                fields.append((lower, value))
        if not date:
            fields.append((b"date", _http_date(self.connection.clock.seconds())))
        length = headers.getRawHeaders(b"content-length")
        if length and len(length) == 1 and length[0].isdigit():
            self.length_left = int(length[0])
        return fields


@implementer(IPushProducer)
class H2FrontChannel(Protocol):
    """
    One HTTP/2 client connection of an L{twisted_slb.web.front.HTTPFrontFactory}.

    It is its transport's push producer: when the client's socket is full,
    every stream's producer is paused.

    @ivar streams: stream id -> the L{H2Request} being received or answered.
    """

    # Connected before any method below runs (see twisted_slb._typing).
    transport: IStreamTransport

    timer = None
    paused = False
    paused_at = 0.0
    lost = False
    closing = False
    closed_at = 0.0
    draining = False  # GOAWAY sent: no new stream is accepted
    drain_after_first = False
    goaway_id = 0
    client_goaway = False
    slb_proxied = False
    served = False
    client_ip: Optional[str] = None
    # The frame scanner (see _scan): preface bytes still to skip, payload
    # bytes of the current frame still to skip, a partial frame header.
    _preface_left = _PREFACE_LENGTH
    _skip = 0
    _partial = b""
    # The header block being received: its bytes so far, and its start.
    _block: Optional[int] = None
    _block_started = 0.0

    def __init__(self, factory, settings: Optional[H2Settings] = None) -> None:
        self.factory = factory
        self.settings = settings or getattr(factory, "h2", None) or H2Settings()
        self.clock = factory.reactor
        self.streams: Dict[int, H2Request] = {}
        #: streams whose head came in the read being handled, to hand over
        #: once its frames are handled
        self._ready: List[H2Request] = []
        self.secure = True

    @classmethod
    def take_over(cls, channel) -> H2FrontChannel:
        """
        Serve the connection of C{channel}, an HTTP/1.1 channel that has
        read nothing yet (the TLS handshake just chose C{h2}): it leaves the
        factory's connections without giving back its place in the limits,
        which the new channel keeps.
        """
        transport = channel.transport
        channel.hand_over()
        new = cls(channel.factory)
        new.client_ip = channel.client_ip
        new.drain_after_first = channel.draining
        new.makeConnection(transport)
        return new

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        factory = self.factory
        settings = self.settings
        transport.bufferSize = factory.write_buffer
        transport.registerProducer(self, True)
        self.peer = transport.getPeer()
        self.host = transport.getHost()
        now = self.last = self.clock.seconds()
        self.resets = _Budget(RESET_BURST, RESET_RATE, now)
        self.controls = _Budget(CONTROL_BURST, CONTROL_RATE, now)
        conn = self.conn = _Connection(H2Configuration(
            client_side=False, header_encoding=None, normalize_outbound_headers=False,
            # The response fields are the backend's, already checked by the
            # upstream parser (tokens), lowercased and without NUL here,
            # less the connection-specific ones: checking them again per
            # response costs a fifth of the HTTP/2 path.
            validate_outbound_headers=False))
        advertised = {
            SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
            SettingCodes.HEADER_TABLE_SIZE: settings.header_table_size,
            SettingCodes.ENABLE_PUSH: 0,
        }
        conn.local_settings = Settings(client=False, initial_values=advertised)
        conn.initiate_connection()  # sends the advertised values
        # In force from the first frame (h2 would apply them only once the
        # client acknowledges them).  The stream limit is enforced here, as
        # a stream error (REFUSED_STREAM, RFC 9113 5.1.2), not by h2, which
        # would end the whole connection.
        conn.decoder.max_header_list_size = settings.max_header_list_size
        conn.decoder.max_allowed_table_size = settings.header_table_size
        conn.local_settings = Settings(client=False, initial_values={
            **advertised, SettingCodes.MAX_CONCURRENT_STREAMS: 2 ** 31 - 1})
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        factory.admission.add(self)
        self._flush()
        if factory.timeout:
            self.timer = self.clock.callLater(factory.timeout, self._check_timeout)

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self.lost = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            self._forget(stream, reason or Failure(ConnectionLost()))
        self.factory.channel_closed(self)

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.lost:
            self.transport.write(data)

    def _close(self) -> None:
        """Close once what is written is sent (a client that never reads is cut later)."""
        if self.closing or self.lost:
            return
        self.closing = True
        self.closed_at = self.clock.seconds()
        self._flush()
        self.transport.loseConnection()

    def _calm_down(self, why: str) -> None:
        """An abusive client: GOAWAY with ENHANCE_YOUR_CALM, then close."""
        log.info("listener {listener}: HTTP/2 client {client}: {why}: GOAWAY (ENHANCE_YOUR_CALM)",
                 listener=self.factory.listener_name, client=self._client(), why=why)
        self._goaway_frame(ErrorCodes.ENHANCE_YOUR_CALM)
        self.abort_streams()
        self._close()

    def _client(self):
        return self.client_ip or getattr(self.peer, "host", self.peer)

    def _goaway_frame(self, code: int) -> None:
        # A GOAWAY of our own rather than H2Connection.close_connection,
        # which ends the connection's state machine: the streams in flight
        # must still be answered after a graceful GOAWAY.
        self._flush()
        frame = GoAwayFrame(0, last_stream_id=self.goaway_id or self.conn.highest_inbound_stream_id,
                            error_code=code)
        if not self.lost:
            self.transport.write(frame.serialize())

    def goaway(self) -> None:
        """
        Graceful end (shutdown, reload): GOAWAY naming the last stream
        accepted; those finish, later ones are refused; the connection
        closes after the last response.
        """
        if self.draining or self.closing or self.lost:
            return
        self.draining = True
        self.goaway_id = self.conn.highest_inbound_stream_id
        self._goaway_frame(ErrorCodes.NO_ERROR)
        if not self.streams:
            self._close()

    def abort_streams(self) -> None:
        """Every stream ends now, as its client went away."""
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            self._forget(stream, Failure(ConnectionLost("the HTTP/2 connection is closing")))

    # -- IPushProducer: the client's socket is full, or has room again ------

    def pauseProducing(self) -> None:
        self.paused = True
        self.paused_at = self.clock.seconds()
        for stream in list(self.streams.values()):
            self._pause(stream)

    def resumeProducing(self) -> None:
        self.paused = False
        for stream in list(self.streams.values()):
            if not stream.pending:
                self._resume(stream)

    def stopProducing(self) -> None:
        pass  # connectionLost follows

    def _pause(self, stream: H2Request) -> None:
        producer = stream.producer
        if producer is not None and stream.streaming and not stream.producer_paused:
            stream.producer_paused = True
            producer.pauseProducing()

    def _resume(self, stream: H2Request) -> None:
        producer = stream.producer
        if producer is None:
            return
        if not stream.streaming:
            self.pull(stream)
        elif stream.producer_paused:
            stream.producer_paused = False
            producer.resumeProducing()

    def pull(self, stream: H2Request) -> None:
        """Ask a pull producer for more, soon, if the stream has room."""
        def more() -> None:
            producer = stream.producer
            if producer is not None and not stream.streaming and not stream.pending and not self.paused \
                    and stream.channel is not None:
                producer.resumeProducing()
                if stream.producer is producer:
                    self.pull(stream)
        self.clock.callLater(0, more)

    # -- reading ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing or self.lost:
            return
        now = self.last = self.clock.seconds()
        why = self._scan(data, now)
        if why is not None:
            self._calm_down(why)
            return
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as e:
            log.info("listener {listener}: HTTP/2 protocol error from {client}: {error}",
                     listener=self.factory.listener_name, client=self._client(), error=str(e) or type(e).__name__)
            self.abort_streams()
            self._close()  # h2 has queued its GOAWAY
            return
        try:
            self._handle(events)
        except Exception:
            # A bug of ours, never the client's doing: logged, and the
            # connection (not the listener) ends.
            log.failure("listener {listener}: error handling HTTP/2 frames from {client}",
                        listener=self.factory.listener_name, client=self._client())
            self.abort_streams()
            if not self.lost:
                self.transport.abortConnection()

    def _handle(self, events: list) -> None:
        try:
            self._handle_events(events)
        finally:
            ready, self._ready = self._ready, []
        for stream in ready:
            if self.lost or self.closing:
                return
            if stream.dispatched or stream.finished or self.streams.get(stream.stream_id) is not stream:
                continue
            body = stream.body
            if body is not None and body.complete:
                # The whole body came with the head, in one read: the
                # backend gets it with a Content-Length (or as no body).
                if not body.received:
                    stream.body = None
                elif body.length is None:
                    body.length = body.received
            self._dispatch(stream)
        self._flush()

    def _handle_events(self, events: list) -> None:
        for event in events:
            if self.lost or self.closing:
                return
            kind = type(event)
            if kind is RequestReceived:
                self._request(event)
            elif kind is DataReceived:
                self._data(event)
            elif kind is StreamEnded:
                self._request_ended(event.stream_id)
            elif kind is WindowUpdated or kind is RemoteSettingsChanged:
                self._window_opened()
            elif kind is StreamReset:
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    self._forget(stream, Failure(ConnectionLost("the client reset the stream")))
            elif kind is TrailersReceived:
                # Request trailers are read and dropped (the body goes to the
                # backend with a Content-Length), as over HTTP/1.1; the
                # StreamEnded that follows ends the request.
                pass
            elif kind is ConnectionTerminated:
                # The client's GOAWAY: h2 sends nothing more after one (its
                # connection state is closed), so the streams still open
                # end as if the client had closed (clients send GOAWAY when
                # they are done, or give up).
                self.client_goaway = True
                self.abort_streams()
                self._close()
                return

    def _scan(self, data: bytes, now: float) -> Optional[str]:
        """
        Walk the frame headers in C{data} (payloads are skipped, not
        copied) before h2 parses them, counting what the budgets count and
        the length of a header block still open.  A reason to close the
        connection, or L{None}.
        """
        view = memoryview(data)
        pos = 0
        end = len(view)
        if self._preface_left:
            pos = min(self._preface_left, end)
            self._preface_left -= pos
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            partial = self._partial
            if partial or end - pos < 9:
                need = 9 - len(partial)
                partial += bytes(view[pos:pos + need])
                pos += min(need, end - pos)
                if len(partial) < 9:
                    self._partial = partial
                    return None
                self._partial = b""
                high, low, kind, flags, _ = _FRAME_HEAD.unpack(partial)
            else:
                high, low, kind, flags, _ = _FRAME_HEAD.unpack_from(view, pos)
                pos += 9
            length = (high << 8) | low
            self._skip = length
            if kind == _DATA:
                if not length and not flags & _END_STREAM and not self.controls.take(1, now):
                    return "too many empty DATA frames"
            elif kind == _HEADERS:
                if not flags & _END_HEADERS:
                    self._block = length
                    self._block_started = now
            elif kind == _CONTINUATION:
                if self._block is not None:
                    self._block += length
                    if flags & _END_HEADERS:
                        self._block = None
                if not length and not self.controls.take(1, now):
                    return "too many empty CONTINUATION frames"
            elif kind == _RST_STREAM:
                if not self.resets.take(1, now):
                    return "too many streams reset (rapid reset)"
            elif kind in (_SETTINGS, _PING, _PRIORITY) or kind > _CONTINUATION:
                if not (kind == _SETTINGS and flags & _ACK) and not self.controls.take(1, now):
                    return "too many SETTINGS, PING, PRIORITY or unknown frames"
            if self._block is not None and self._block > self.settings.max_header_list_size:
                return (f"a header block over max_header_list_size ({self.settings.max_header_list_size} bytes, "
                        "CONTINUATION flood)")
        return None

    def _request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        if self.draining and stream_id > self.goaway_id:
            self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        if len(self.streams) >= self.settings.max_concurrent_streams:
            # Over the limit (which h2 only enforces once the client has
            # acknowledged it): refused, and it counts as a reset.
            self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            if not self.resets.take(1, self.last):
                self._calm_down("too many streams refused over max_concurrent_streams")
            return
        method = path = authority = scheme = None
        headers = FastHeaders()
        cookies = []
        count = 0
        try:
            for name, value in event.headers:
                if name[:1] == b":":
                    if name == b":method":
                        method = value
                    elif name == b":path":
                        path = value
                    elif name == b":authority":
                        authority = value
                    elif name == b":scheme":
                        scheme = value
                    continue
                count += 1
                if name == b"cookie":
                    cookies.append(value)
                elif name == b"host" and authority is not None:
                    continue  # :authority wins (h2 checked that they agree)
                else:
                    headers.addRawHeader(name, value)
            if authority is not None:
                headers.setRawHeaders(b"host", [authority])
            if cookies:
                # RFC 9113 8.2.3: split cookie fields are joined with "; "
                # (what an HTTP/1.1 request carries, and the policies read).
                headers.setRawHeaders(b"cookie", [b"; ".join(cookies)])
        except ValueError:
            method = None
        stream = H2Request(self, stream_id, method or b"GET", path or b"/", headers)
        # The request may be whole already (END_STREAM on its HEADERS): a
        # refusal then needs no RST_STREAM after it.
        stream.request_ended = event.stream_ended is not None
        self.streams[stream_id] = stream
        if self.drain_after_first:
            # The listener began draining during this connection's
            # handshake: its first stream is answered, no other.
            self.drain_after_first = False
            self.goaway()
        factory = self.factory
        try:
            if method is None or not _TOKEN.match(method):
                raise BadRequest("an invalid method or header name")
            if method == b"CONNECT":
                raise BadRequest("CONNECT is not supported by this balancer", 501)
            if not path or _BAD_TARGET.search(path) or (path[:1] != b"/" and path != b"*"):
                raise BadRequest("an invalid :path")
            if scheme not in (b"https", b"http"):
                raise BadRequest("an invalid :scheme")
            if count > factory.max_headers:
                raise BadRequest(f"more than {factory.max_headers} header fields", 431)
            length = headers.getRawHeaders(b"content-length")
            limit = factory.max_body_bytes
            if limit and length and length[0].isdigit() and int(length[0]) > limit:
                raise BadRequest(f"a body of {int(length[0])} bytes, over max_body_bytes ({limit})", 413)
            if method == b"HEAD":
                stream.length = 0  # as h2 has it: a HEAD request has no body
            elif length and length[0].isdigit():
                stream.length = int(length[0])
            if factory.check_head is not None:
                factory.check_head(stream)
        except BadRequest as e:
            self._refuse(stream, e.code, str(e))
            return
        if stream.request_ended or stream.length == 0:
            self._ready.append(stream)  # no body
        elif not factory.request_buffering:
            # Streamed: the request goes on once this read's frames are
            # handled (see _handle), its body follows as it comes.
            stream.body = StreamedBody(stream, stream.length)
            self._ready.append(stream)
        # else spooled: handed over at the end of the body (_request_ended)

    def _data(self, event: DataReceived) -> None:
        stream_id = event.stream_id
        size = event.flow_controlled_length
        conn = self.conn
        stream = self.streams.get(stream_id)
        if stream is not None and stream.length is not None and stream.body_read + len(event.data) > stream.length:
            if size:
                conn.acknowledge_received_data(size, stream_id)
            self._malformed(stream, f"a body longer than its content-length ({stream.length})")
            return
        body = stream.body if stream is not None else None
        if stream is None or (body is None and stream.dispatched) or (
                body is not None and (body.stopped or body.failure is not None)):
            # Refused, answered already, failed or drained: acknowledged, dropped.
            if size:
                conn.acknowledge_received_data(size, stream_id)
            return
        stream.last_in = self.last
        data = event.data
        limit = self.factory.max_body_bytes
        stream.body_read += len(data)
        if limit and stream.body_read > limit:
            if size:
                conn.acknowledge_received_data(size, stream_id)
            why = f"a body over max_body_bytes ({limit})"
            if body is None:
                self._refuse(stream, 413, why)
            else:
                self._body_error(stream, 413, why)
            return
        if body is None:
            stream.body_received(data)  # spooled
        else:
            body.feed(data)
        if not size:
            return
        if stream.body_paused:
            # The body's consumer does not keep up: the stream's window is
            # withheld (given back by resume_body); the connection's is not.
            stream.withheld += size
            conn.increment_flow_control_window(size)
        else:
            conn.acknowledge_received_data(size, stream_id)

    def acknowledge(self, stream: H2Request) -> None:
        """Give back the stream window withheld while C{stream}'s body was paused."""
        size, stream.withheld = stream.withheld, 0
        if not size or self.lost or self.streams.get(stream.stream_id) is not stream or stream.request_ended:
            return
        try:
            self.conn.increment_flow_control_window(size, stream.stream_id)
        except (H2Error, KeyError):
            return  # the stream is closed already: no window to open
        self._flush()

    def _request_ended(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.request_ended = True
        if stream.length is not None and stream.body_read != stream.length:
            self._malformed(stream, f"a body of {stream.body_read} bytes, not its content-length ({stream.length})")
            return
        body = stream.body
        if body is not None:
            stream.body_paused = False
            stream.withheld = 0  # no window update for a stream the client ended
            body.finish()
            return
        if stream.dispatched or stream.started:
            return
        stream.body_ended()
        self._dispatch(stream)

    def _malformed(self, stream: H2Request, why: str) -> None:
        """
        A malformed request (RFC 9113 8.1.1: a body that does not match its
        content-length): a stream error, RST_STREAM with C{PROTOCOL_ERROR};
        its body fails (the backend connection is dropped, never sent more
        than the announced length); the other streams go on.
        """
        factory = self.factory
        log.info("listener {listener}: HTTP/2 client {client}, stream {stream}: {why}: stream reset",
                 listener=factory.listener_name, client=self._client(), stream=stream.stream_id, why=why)
        body = stream.body
        if body is not None and body.consumer is not None:
            body.fail(BodyError(why, 400))  # the proxy counts it
        elif not stream.finished and factory.stats is not None:
            factory.stats.request_done(None, 400, "none", 0)
        self.reset(stream, ErrorCodes.PROTOCOL_ERROR)

    def _body_error(self, stream: H2Request, code: int, why: str) -> None:
        """
        A streamed body will never be whole: its consumer is told (the proxy
        drops its backend connection), and the client gets the error if no
        response has started, else the stream is reset; the other streams
        go on.
        """
        factory = self.factory
        log.info("listener {listener}: {code} for {client}: {why}", listener=factory.listener_name, code=code,
                 client=self._client(), why=why)
        body = stream.body
        assert body is not None  # the callers checked
        told = body.consumer is not None  # the proxy counts the request in the stats itself
        body.fail(BodyError(why, code))
        if stream.finished or stream.channel is None or self.streams.get(stream.stream_id) is not stream:
            return
        if stream.started:
            self.reset(stream, ErrorCodes.CANCEL)  # part of a response went: no error can follow it
            return
        if not told and factory.stats is not None:
            factory.stats.request_done(None, code, "none", 0)
        stream.dispatched = True
        stream._lost_callback = None
        text = b"%d %s: %s\n" % (code, _REASONS[code], why.encode("ascii", "replace"))
        stream.code = code
        stream.responseHeaders = FastHeaders({b"content-type": [b"text/plain; charset=utf-8"],
                                              b"content-length": [b"%d" % len(text)]})
        stream.write(text)
        stream.finish()

    # -- answering ----------------------------------------------------------

    def _dispatch(self, stream: H2Request) -> None:
        stream.dispatched = True
        render(self.factory, stream, self._internal_error)

    def _internal_error(self, stream: H2Request) -> None:
        if stream.finished or stream.channel is None:
            return
        if stream.started:
            self.reset(stream, ErrorCodes.INTERNAL_ERROR)
            return
        stream.code = 500
        stream.responseHeaders = FastHeaders({b"content-type": [b"text/plain; charset=utf-8"]})
        stream.write(b"500 Internal Server Error\n")
        stream.finish()

    def _refuse(self, stream: H2Request, code: int, why: str) -> None:
        """Answer a stream the listener will not forward (the others go on)."""
        factory = self.factory
        log.info("listener {listener}: {code} for {client}: {why}", listener=factory.listener_name, code=code,
                 client=self._client(), why=why)
        if factory.stats is not None:
            factory.stats.request_done(None, code, "none", 0)
        stream.dispatched = True
        stream._lost_callback = None
        body = b"%d %s: %s\n" % (code, _REASONS[code], why.encode("ascii", "replace"))
        stream.code = code
        stream.responseHeaders = FastHeaders({b"content-type": [b"text/plain; charset=utf-8"],
                                              b"content-length": [b"%d" % len(body)]})
        stream.write(body)
        stream.finish()

    # A stream is over when both its END_STREAM was sent (closed) and the
    # resource called finish(): whichever comes last calls _done.

    def send_head(self, stream: H2Request, end: bool) -> None:
        fields = stream.response_fields()
        end = end or stream.no_body
        try:
            self.conn.send_headers(stream.stream_id, fields, end_stream=end)
        except H2Error as e:
            log.error("listener {listener}: response head of {request!r} not sendable over HTTP/2: {error}",
                      listener=self.factory.listener_name, request=stream, error=str(e))
            self.reset(stream, ErrorCodes.INTERNAL_ERROR)
            return
        if end:
            stream.closed = True
            if stream.finished:
                self._done(stream)
        self._flush()

    def send_body(self, stream: H2Request, data: bytes) -> None:
        # The write that completes an announced Content-Length carries
        # END_STREAM: no empty DATA frame after it.
        left = stream.length_left
        last = False
        if left is not None:
            left = stream.length_left = left - len(data)
            last = left == 0
        if stream.pending:
            stream.pending.append(data)
            stream.pending_bytes += len(data)
            stream.ending = stream.ending or last
            return
        rest = self._send_fitting(stream, data, last)
        if rest:
            stream.pending.append(rest)
            stream.pending_bytes = len(rest)
            stream.ending = last
            stream.blocked_at = self.clock.seconds()
            self._pause(stream)  # at most one more read of the backend lands here
        self._flush()

    def end_body(self, stream: H2Request) -> None:
        if stream.pending:
            stream.ending = True  # after the rest, once the client makes room
            return
        self._send_fitting(stream, b"", True)
        if stream.finished:
            self._done(stream)
        self._flush()

    def _send_fitting(self, stream: H2Request, data: bytes, end: bool = False) -> bytes:
        """
        Send what the windows allow of C{data}, with END_STREAM on the last
        frame if C{end} and all of it fits; the rest is returned.
        """
        conn = self.conn
        sid = stream.stream_id
        try:
            room = conn.local_flow_control_window(sid)
        except H2Error:
            stream.closed = True
            return b""  # the stream is closed: nothing to send any more
        size = conn.max_outbound_frame_size
        length = len(data)
        n = min(room, length)
        end = end and n == length
        if end and not length:
            conn.end_stream(sid)
        pos = 0
        while pos < n:
            chunk = min(size, n - pos)
            conn.send_data(sid, data if chunk == length else data[pos:pos + chunk],
                           end_stream=end and pos + chunk == n)
            pos += chunk
        if end:
            stream.closed = True
        return data[n:]

    def _window_opened(self) -> None:
        """The client made room: send what waits, then let producers go on."""
        for stream in sorted(self.streams.values(), key=lambda s: s.stream_id):
            if not stream.pending:
                continue
            pending, stream.pending = stream.pending, []
            data = b"".join(pending)
            rest = self._send_fitting(stream, data, stream.ending)
            if rest:
                stream.pending = [rest]
                stream.pending_bytes = len(rest)
                continue
            stream.pending_bytes = 0
            if stream.closed:
                if stream.finished:
                    self._done(stream)
            elif not self.paused:
                self._resume(stream)

    def reset(self, stream: H2Request, code: int, notify: bool = True) -> None:
        """
        End one stream with RST_STREAM; the request is told its client is
        gone (now, or with C{notify=False} in a moment).
        """
        if self.streams.pop(stream.stream_id, None) is None:
            return
        stream.closed = True
        try:
            self.conn.reset_stream(stream.stream_id, code)
        except H2Error:
            pass
        self._flush()
        reason = Failure(ConnectionLost("the stream was reset"))
        if notify:
            self._forget(stream, reason)
        else:
            self.clock.callLater(0, self._forget, stream, reason)
        self._maybe_close()

    def _forget(self, stream: H2Request, reason: Failure) -> None:
        stream.closed = True
        stream.pending = []
        if stream.content is not None:
            stream.content.close()
        if not stream.finished and stream.channel is not None:
            stream._lost(reason)
        stream.channel = None
        if stream.body is not None:
            stream.body.fail(BodyError(reason.getErrorMessage() or "the stream ended"))

    def done(self, stream: H2Request) -> None:
        """A response whose head ended its stream is finished."""
        self._done(stream)

    def _done(self, stream: H2Request) -> None:
        """The response's END_STREAM is sent."""
        if self.streams.get(stream.stream_id) is not stream:
            return
        if not stream.request_ended:
            # Answered before the whole request came (a refusal, an early
            # answer): RFC 9113 8.1, the rest is not wanted.
            try:
                self.conn.reset_stream(stream.stream_id, ErrorCodes.NO_ERROR)
            except H2Error:
                pass
        del self.streams[stream.stream_id]
        body = stream.body
        if body is not None and not body.complete:
            body.stopProducing()  # the rest is dropped (the stream is reset)
        self.served = True
        if stream.content is not None:
            stream.content.close()
        stream.channel = None
        self.last = self.clock.seconds()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if not self.streams and (self.draining or self.client_goaway):
            self._close()

    # -- timeouts -----------------------------------------------------------

    def _check_timeout(self) -> None:
        """
        The connection's one timer: it finds the earliest deadline that
        applies (idle connection, a header block or request body not
        arriving, a response waiting for window, a client not reading),
        acts on those past, and waits for the next.
        """
        self.timer = None
        if self.lost:
            return
        timeout = self.factory.timeout
        now = self.clock.seconds()
        client = self._client()
        listener = self.factory.listener_name
        if self.closing:
            if now >= self.closed_at + timeout:
                self.transport.abortConnection()
                return
            self.timer = self.clock.callLater(self.closed_at + timeout - now, self._check_timeout)
            return
        if self.paused and now >= self.paused_at + timeout:
            log.info("listener {listener}: HTTP/2 client {client} read nothing for {timeout} s: closing its "
                     "connection", listener=listener, client=client, timeout=timeout)
            self.abort_streams()
            self.transport.abortConnection()
            return
        if self._block is not None and now >= self._block_started + timeout:
            self._calm_down(f"a header block not ended in {timeout:g} s")
            return
        if not self.streams and now >= self.last + timeout:
            self.goaway()  # idle: closes at once, no stream being open
            self._close()
            return
        deadlines = [self.last + timeout] if not self.streams else []
        if self.paused:
            deadlines.append(self.paused_at + timeout)
        if self._block is not None:
            deadlines.append(self._block_started + timeout)
        for stream in list(self.streams.values()):
            body = stream.body
            if (not stream.dispatched and not stream.started) or (
                    body is not None and not stream.request_ended and not stream.body_paused and not body.stopped
                    and body.failure is None):
                # A body (spooled, or streamed and not held back by its
                # consumer: then the proxy's request_timeout covers the
                # backend) must keep arriving.
                deadline = stream.last_in + timeout
                if now >= deadline:
                    why = f"no request body bytes for {timeout:g} s"
                    if body is None:
                        self._refuse(stream, 408, why)
                    else:
                        self._body_error(stream, 408, why)
                    continue
                deadlines.append(deadline)
            if stream.pending:
                deadline = stream.blocked_at + timeout
                if now < deadline:
                    deadlines.append(deadline)
                    continue
                if self.conn.outbound_flow_control_window <= 0:
                    self._calm_down(f"the connection's window stayed at 0 for {timeout:g} s")
                    return
                log.info("listener {listener}: HTTP/2 client {client} left stream {stream}'s window at 0 for "
                         "{timeout} s: stream reset", listener=listener, client=client,
                         stream=stream.stream_id, timeout=timeout)
                self.reset(stream, ErrorCodes.CANCEL)
        self._flush()
        if self.lost or self.closing:
            if self.closing and self.timer is None and not self.lost:
                self.timer = self.clock.callLater(timeout, self._check_timeout)
            return
        next_at = min(deadlines) if deadlines else now + timeout
        self.timer = self.clock.callLater(max(next_at - now, 0.001), self._check_timeout)
