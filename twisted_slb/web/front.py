"""
The client side of twisted_slb's HTTP and HTTPS listeners: a lean HTTP/1.1
server protocol.

twisted.web's L{HTTPChannel} and L{twisted.web.server.Request} serve any web
application, and pay for it on every request: a line-by-line parser, a
Request with dozens of attributes, a session and cookie machinery, a timer
reset per read.  A load balancer's listener needs less: find the request head,
check it strictly (a proxy must never read a request differently from the
backend behind it), read the body, and hand the request to the resource tree
that routes and proxies it.  L{HTTPFrontFactory} does that, and is what the
configured listeners run; it renders the same resources
(L{twisted_slb.web.routing.RuleRouter}, the persistence wrappers,
L{twisted_slb.web.proxy.BalancedProxyResource}) through L{FrontRequest}, which
has the part of L{twisted.web.iweb.IRequest} those resources use.  An
application that wants the proxy inside its own twisted.web site keeps using
L{twisted_slb.web.site.BalancerSite} or a plain L{twisted.web.server.Site}.

What it does, and what it refuses:

 - One request at a time per connection.  Pipelined requests wait in the
   buffer (reading stops when more than C{max_header_bytes} are waiting) and
   are answered in order; a bad one is answered with its error after the
   good ones before it, and the connection closes.
 - 400 for anything ambiguous: a bare CR or LF, obs-fold, a space before a
   colon, a control character, an invalid method or request target, both
   C{Content-Length} and C{Transfer-Encoding}, two different
   C{Content-Length}s, a C{Transfer-Encoding} other than C{chunked}, a bad
   chunk.  413 for a body over C{max_body_bytes} (announced, or as it
   arrives when chunked).  414 and 431 for a request line or a head over C{max_header_bytes},
   431 for more than C{max_headers} fields, 505 for an HTTP version other
   than 1.0 and 1.1, 417 for an expectation other than C{100-continue}.
 - Timeouts (C{client_idle_timeout}): an idle keep-alive connection is
   closed; a request head must arrive whole within one timeout of its first
   byte (slowloris); a body must keep arriving (one timeout between reads);
   a client that stops reading its response is closed after one timeout.
   There is one timer per connection, moved lazily, not one per read.
 - Bodies are streamed: the request is handed to the resource tree as soon
   as its head is read, with C{request.body}, a
   L{twisted_slb.web.body.StreamedBody} the channel feeds as body bytes
   arrive (framing removed: chunks are decoded, trailers dropped).  When its
   consumer (the backend connection) does not keep up, the body pauses the
   channel, which stops reading the client's socket.  A response that ends
   before the body does leaves the rest of the body to be read and dropped,
   so that the connection stays in step; a body that fails (a bad chunk,
   over C{max_body_bytes}, idle for C{client_idle_timeout}, the client
   half-closing) is answered with its error when no response has started,
   and the connection is closed.  With C{request_buffering} the body is
   read whole before the request is handed over (C{request.content}: up to
   100 KB in memory, spooled to a temporary file above that).
 - An HTTP/1.1 C{Upgrade} (WebSocket) is forwarded; when the backend answers
   101 the proxy calls L{FrontRequest.switch_protocols} and the connection
   becomes a tunnel, relayed both ways until either side closes or it is
   idle for C{tunnel_timeout}.
 - Over TLS, a connection whose handshake chose C{h2} (ALPN) is handed to
   L{twisted_slb.web.h2.H2FrontChannel} (see
   L{HTTPFrontChannel.protocol_for_alpn}) when the factory has C{h2}
   settings: HTTP/2 streams are L{FrontRequest}s too.
"""

from __future__ import annotations

import re
from tempfile import SpooledTemporaryFile
from typing import IO, TYPE_CHECKING, Any, Callable, List, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, ISSLTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from twisted_slb._io.headers import FastHeaders
from twisted_slb._io.sockets import close, set_nodelay, write_now
from twisted_slb._reactor import maybe_global_reactor

if TYPE_CHECKING:
    from twisted_slb.stats import ListenerStats
    from twisted_slb.web.h2 import H2Settings
from twisted_slb._typing import IStreamTransport
from twisted_slb.limits import ClientAddressLimit, ConnectionAdmission, ConnectionLimit, IListenerFactory
from twisted_slb.persistence.interfaces import normalise_ip
from twisted_slb.web.body import BodyError, IBodyReader, StreamedBody

log = Logger(namespace="twisted_slb.front")

#: RFC 9110 5.6.2 token: methods and field names.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
#: What a request target may not contain: controls, space, DEL, non-ASCII.
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f-\xff]")
#: Control characters a request head may not contain (HTAB, CR and LF are
#: checked separately).
_BAD_HEAD = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: An HTTP version (RFC 9112 2.3): ASCII digits only, so that it can be quoted back.
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]\Z")
#: A chunk size: hex digits only (no sign, no 0x, no spaces inside).
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}\Z")
#: Bodies up to this size stay in memory; larger ones go to a temporary file.
SPOOL_BYTES = 100 * 1024
#: What a client's connection holds in this process before the backend
#: connection feeding it stops reading: the transport pauses its producer
#: past this many buffered bytes (its C{bufferSize}, 64 KB by default, which
#: with a 64 KB read from the backend on top let each client that does not
#: read hold about 100 KB; 2,000 of them 200 MB).  The kernel's socket
#: buffers, outside the process, do the rest of the buffering.
CLIENT_WRITE_BUFFER = 16 * 1024
#: Longest chunk-size line (size plus extensions).
MAX_CHUNK_LINE = 4096

# Connection states.
_IDLE = 0  # waiting for the first byte of a request
_HEAD = 1  # a request head is arriving
_BODY = 2  # a Content-Length body is arriving
_CHUNK_SIZE_LINE = 3
_CHUNK_DATA = 4
_CHUNK_END = 5
_TRAILERS = 6
_BUSY = 7  # the request is being answered
_CLOSED = 8  # closing or closed: nothing more is read
_TUNNEL = 9  # after a 101: bytes are relayed as they are (WebSocket)

#: Reason phrases for the statuses the listener answers itself (RFC 9110
#: wording; twisted.web's table has older ones, e.g. "Request Time-out").
_REASONS = {
    400: b"Bad Request", 403: b"Forbidden", 408: b"Request Timeout", 413: b"Content Too Large", 414: b"URI Too Long",
    417: b"Expectation Failed", 421: b"Misdirected Request",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented", 505: b"HTTP Version Not Supported",
}

#: the second and its C{Date} value
_date: List[Any] = [0, b""]


def _http_date(now: float) -> bytes:
    """The C{Date} header value for C{now}, computed once per second."""
    second = int(now)
    if _date[0] != second:
        _date[0] = second
        _date[1] = datetimeToString(second)
    return _date[1]


class BadRequest(Exception):
    """A request the listener refuses: C{code}, C{reason} and why."""

    def __init__(self, why: str, code: int = 400) -> None:
        Exception.__init__(self, why)
        self.code = code


class FrontRequest:
    """
    One request on an L{HTTPFrontChannel}, with the part of
    L{twisted.web.iweb.IRequest} that twisted_slb's resources and persistence
    policies use: C{method}, C{uri}, C{path}, C{clientproto},
    C{requestHeaders}, C{responseHeaders}, C{content} (or C{body}), C{getHeader},
    C{setHeader}, C{setResponseCode}, C{write}, C{finish}, C{notifyFinish},
    C{registerProducer}, C{unregisterProducer}, C{isSecure},
    C{getClientAddress}, C{getHost}.

    The response is framed from its headers: a C{Content-Length} is kept;
    otherwise an HTTP/1.1 client gets a chunked body and an HTTP/1.0 client a
    body that ends when the connection closes.  No C{Server} header is added;
    a C{Date} header is added when the response has none.
    """

    code = 200
    code_message: Optional[bytes] = None
    started = False
    finished = False
    chunked = False
    no_body = False
    producer = None
    streaming = True
    defaultContentType = None
    slb_session = None
    #: the L{twisted_slb.web.body.IRequestBody} of a streamed body (then
    #: C{content} is L{None}), or L{None}
    body: Optional[StreamedBody] = None
    #: unlike twisted.web's Request, no Server, Date or Content-Type is preset
    adds_default_headers = False
    #: the proxy may answer an Upgrade with L{switch_protocols}
    can_switch_protocols = True
    _lost_callback = None
    #: the listener's L{twisted_slb.clientip.ClientIPPolicy} when the client
    #: address comes from a forwarding header, read by C{session_for}
    client_ip_policy = None
    #: the connection's L{HTTPFrontChannel} (an L{H2Request} is its own),
    #: or L{None} once the client's connection is lost
    channel: Optional[HTTPFrontChannel]
    #: the spooled request body (request_buffering), or L{None}
    content: Optional[IO[bytes]]

    def __init__(self, channel: HTTPFrontChannel, method: bytes, uri: bytes, clientproto: bytes,
                 headers: Headers, persistent: bool) -> None:
        self.channel = channel
        self.method = method
        self.uri = uri
        self.path = uri.split(b"?", 1)[0]
        self.clientproto = clientproto
        self.requestHeaders = headers
        self.responseHeaders = FastHeaders()
        self.persistent = persistent
        self.content = None
        self.prepath: List[bytes] = []
        self.postpath = self.path.split(b"/")[1:] if self.path.startswith(b"/") else []
        self._finished_ds: Optional[List[Deferred]] = None
        self.channel_secure = channel.secure
        self.client_address = channel.peer
        self.host_address = channel.host
        if channel.factory.client_ip_policy is not None:
            self.client_ip_policy = channel.factory.client_ip_policy

    def __repr__(self) -> str:
        return f"<FrontRequest {self.method!r} {self.uri!r} {self.clientproto!r}>"

    # -- what the request says --------------------------------------------

    def getHeader(self, name: bytes) -> Optional[bytes]:
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def isSecure(self) -> bool:
        return self.channel_secure

    def getClientAddress(self):
        return self.client_address

    def getHost(self):
        return self.host_address

    # -- the response ---------------------------------------------------------

    def setResponseCode(self, code: int, message: Optional[bytes] = None) -> None:
        if self.started:
            raise RuntimeError("the response head was already sent")
        self.code = code
        self.code_message = message

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def notifyFinish(self) -> Deferred:
        """
        A L{Deferred} that fires when the response is complete, or fails when
        the client's connection is lost before.
        """
        if self.finished:
            return succeed(None)
        d: Deferred = Deferred()
        if self._finished_ds is None:
            self._finished_ds = []
        self._finished_ds.append(d)
        return d

    def on_connection_lost(self, callback) -> None:
        """
        Call C{callback(reason)} if the client's connection is lost before
        the response ends: what C{notifyFinish().addErrback(callback)} does,
        without a L{Deferred} (one callback; the proxy's, on its hot path).
        """
        self._lost_callback = callback

    def switch_protocols(self, peer_transport) -> None:
        """
        Send the C{101} response head (code and headers set by the caller,
        C{Connection: Upgrade} among them), then relay bytes between the
        client and C{peer_transport} as they are, both ways, until either
        side closes or nothing passes for the listener's C{tunnel_timeout}.
        """
        channel = self.channel
        if channel is None:
            return
        self.persistent = True  # no "Connection: close" on a 101
        write_now(channel.transport, self._head(b"", False))
        channel.start_tunnel(peer_transport)

    def tunnel_closed(self) -> None:
        """The peer ended the tunnel: close the client's connection."""
        channel = self.channel
        if channel is not None:
            channel._close()

    def tunnel_write(self, data: bytes) -> None:
        """Bytes from the peer of a tunnel, for the client."""
        channel = self.channel
        if channel is not None:
            channel.last = channel.clock.seconds()
            write_now(channel.transport, data)

    def registerProducer(self, producer, streaming: bool) -> None:
        """
        Register the producer of the response body: a push producer is paused
        while the client does not read; a pull producer is asked for more
        whenever the client's socket can take it.
        """
        if self.producer is not None:
            raise RuntimeError(f"a producer is already registered: {self.producer!r}")
        self.producer = producer
        self.streaming = streaming
        channel = self.channel
        if channel is None:
            producer.stopProducing()
            return
        channel.producer_registered(self)

    def unregisterProducer(self) -> None:
        producer, self.producer = self.producer, None
        if producer is not None and not self.streaming and self.channel is not None:
            self.channel.pull_producer_done()

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("write() after finish()")
        channel = self.channel
        if channel is None:
            return  # the client is gone
        if not self.started:
            write_now(channel.transport, self._head(data, False))
        elif data and not self.no_body:
            if self.chunked:
                write_now(channel.transport, b"%x\r\n%s\r\n" % (len(data), data))
            else:
                write_now(channel.transport, data)

    def finish(self) -> None:
        if self.finished:
            raise RuntimeError("finish() called twice")
        self.finished = True
        self._lost_callback = None  # the response is whole: nothing to tell any more
        channel = self.channel
        if channel is None:
            return
        if not self.started:
            write_now(channel.transport, self._head(b"", True))
        elif self.chunked:
            write_now(channel.transport, b"0\r\n\r\n")
        ds, self._finished_ds = self._finished_ds, None
        if ds:
            for d in ds:
                d.callback(None)
        channel.request_done(self)

    def _head(self, body: bytes, complete: bool) -> bytes:
        """The response head, with C{body} after it, framed."""
        self.started = True
        code = self.code
        headers = self.responseHeaders
        # The listeners' own FastHeaders are read directly; anything else
        # a resource may have put here goes through the Headers API.
        fields = headers.by_name if type(headers) is FastHeaders else None
        if fields is None:
            fields = {name: list(values) for name, values in headers.getAllRawHeaders()}
        no_body = self.no_body = self.method == b"HEAD" or code in (204, 304) or code < 200
        if not no_body and b"Content-Length" not in fields:
            if complete:
                fields[b"Content-Length"] = [b"%d" % len(body)]
            elif self.clientproto == b"HTTP/1.1":
                self.chunked = True
                fields[b"Transfer-Encoding"] = [b"chunked"]
            else:
                self.persistent = False  # the body ends when the connection closes
        connection = fields.get(b"Connection")
        if connection and b"close" in b",".join(connection).lower():
            self.persistent = False
        if b"Date" not in fields:
            channel = self.channel
            assert channel is not None  # the callers write to it
            fields[b"Date"] = [_http_date(channel.clock.seconds())]
        if not self.persistent:
            fields[b"Connection"] = [b"close"]
        elif self.clientproto == b"HTTP/1.0":
            fields[b"Connection"] = [b"keep-alive"]
        reason = self.code_message or RESPONSES.get(code, b"Unknown")
        parts = [b"HTTP/1.1 %d %s\r\n" % (code, reason)]
        for name, values in fields.items():
            for value in values:
                parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(b"\r\n")
        if body and not no_body:
            if self.chunked:
                parts.append(b"%x\r\n%s\r\n" % (len(body), body))
            else:
                parts.append(body)
        return b"".join(parts)

    def _lost(self, reason: Failure) -> None:
        """The client's connection is gone before the response ended."""
        self.channel = None
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        callback, self._lost_callback = self._lost_callback, None
        if callback is not None:
            callback(reason)
        ds, self._finished_ds = self._finished_ds, None
        if ds:
            for d in ds:
                d.errback(reason)


def render(factory, request, internal_error: Callable[[Any], None]) -> None:
    """
    Render C{request} with C{factory}'s resource, as twisted.web's
    C{Request.render} does, for a request of the HTTP/1.1 channel or an
    HTTP/2 stream: a resource that raises or renders something other than
    bytes is logged and the request gets C{internal_error}; bytes are the
    whole body (with its C{Content-Length}); C{NOT_DONE_YET} leaves the
    request to the resource.
    """
    try:
        body = getChildForRequest(factory.resource, request).render(request)
    except Exception:
        log.failure("listener {listener}: error rendering {request!r}", listener=factory.listener_name,
                    request=request)
        internal_error(request)
        return
    if body is NOT_DONE_YET:
        return
    if not isinstance(body, bytes):
        log.error("listener {listener}: {resource!r} rendered {type} instead of bytes",
                  listener=factory.listener_name, resource=factory.resource, type=type(body).__name__)
        internal_error(request)
        return
    if request.finished:
        return
    if request.code not in (204, 304):
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    request.write(body)
    request.finish()


@implementer(IPushProducer, IHalfCloseableProtocol, IBodyReader)
class HTTPFrontChannel(Protocol):
    """
    One client connection of an L{HTTPFrontFactory}.

    It is its transport's push producer for the whole connection: when the
    client stops reading, the response's producer (the backend connection)
    is paused.  It is also the L{IBodyReader} of the streamed body being
    read, if any: the body pauses it (it stops reading the client's socket)
    while its consumer does not keep up.
    """

    # Connected before any method below runs (see twisted_slb._typing).
    transport: IStreamTransport

    request: Optional[FrontRequest] = None
    #: the streamed body being read (its request may be answered already:
    #: then the rest is read and dropped)
    body: Optional[StreamedBody] = None
    body_paused = False
    #: whether the connection closes once the body being dropped has ended
    close_after_body = False
    client_ip: Optional[str] = None
    timer = None
    paused = False
    paused_at = 0.0
    reading_paused = False
    read_closed = False
    draining = False
    served = False  # a response was completed on this connection
    parsing = False
    closed_at = 0.0
    closing = False  # _close() was called
    lost = False  # connectionLost() was called
    remaining = 0
    body_read = 0  # chunked body bytes so far, against max_body_bytes
    pending: Optional[FrontRequest] = None  # a request whose body is arriving
    head_started = 0.0
    tunnel: Optional[IStreamTransport] = None  # the peer transport of a tunnel (after a 101)

    def __init__(self, factory: HTTPFrontFactory) -> None:
        self.factory = factory
        self.clock = factory.reactor
        self.buffer = b""
        self.state = _IDLE

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        set_nodelay(transport)
        # bufferSize is a public attribute of Twisted's FileDescriptor (and
        # of twisted_slb._io.lean's transports): the write buffer size past
        # which the producer is paused, and the size of a read.
        transport.bufferSize = self.factory.write_buffer
        transport.registerProducer(self, True)
        self.peer = transport.getPeer()
        self.host = transport.getHost()
        self.secure = self.factory.secure or ISSLTransport.providedBy(transport)
        self.last = self.clock.seconds()
        self.factory.admission.add(self)
        if self.factory.timeout:
            self.timer = self.clock.callLater(self.factory.timeout, self._check_timeout)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.state = _CLOSED
        self.lost = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        pending, self.pending = self.pending, None
        if pending is not None and pending.content is not None:
            pending.content.close()
        request, self.request = self.request, None
        if request is not None and not request.finished:
            request._lost(reason)
        body, self.body = self.body, None
        if body is not None:
            body.fail(BodyError("the client's connection was lost"))
        self.factory.channel_closed(self)

    def protocol_for_alpn(self, protocol: Optional[bytes]):
        """
        The protocol to serve this connection with once TLS negotiated
        C{protocol} over ALPN (L{twisted_slb.tls} asks when the handshake
        ends): an L{twisted_slb.web.h2.H2FrontChannel} taking over for
        C{h2} when the factory serves HTTP/2 (its C{h2} settings), else
        this channel.
        """
        h2 = self.factory.h2
        if protocol != b"h2" or h2 is None or self.lost or self.state != _IDLE or self.buffer:
            return self
        return h2.take_over(self)

    def hand_over(self) -> None:
        """
        Another protocol serves this connection from now on (HTTP/2): this
        channel lets go of the transport and the factory's connection set,
        and keeps nothing running; its place in the connection limits goes
        with the connection.
        """
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.state = _CLOSED
        self.lost = True
        self.transport.unregisterProducer()
        self.factory.admission.forget(self)

    def readConnectionLost(self) -> None:
        # The client sent FIN: answer what it asked for, then close (as
        # HAProxy does without "option abortonclose").  A tunnel ends.
        self.read_closed = True
        if self.state != _BUSY:
            self._sender_done()

    def _sender_done(self) -> None:
        """The client will send nothing more: close, unless a response is due."""
        if self.body is not None and self.state != _CLOSED:
            self._refuse(400, "the client ended its side of the connection before the end of the body")
        else:
            self._close()

    def writeConnectionLost(self) -> None:
        if not self.closing:
            self._close()

    def _close(self) -> None:
        self.state = _CLOSED
        self.closed_at = self.clock.seconds()
        # With nothing left to send this closes at once (connectionLost
        # runs before it returns); writeConnectionLost is ours then.
        self.closing = True
        close(self.transport)
        if self.timer is None and self.factory.timeout and not self.lost:
            # A client that never reads what is left is cut off (see _check_timeout).
            self.timer = self.clock.callLater(self.factory.timeout, self._check_timeout)

    # -- IPushProducer: the client's socket is full, or has room again ------

    def pauseProducing(self) -> None:
        self.paused = True
        self.paused_at = self.clock.seconds()
        request = self.request
        if request is not None and request.producer is not None and request.streaming:
            request.producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        request = self.request
        if request is not None and request.producer is not None and request.streaming:
            request.producer.resumeProducing()

    def stopProducing(self) -> None:
        pass  # connectionLost follows

    def producer_registered(self, request: FrontRequest) -> None:
        producer = request.producer
        assert producer is not None  # it was just registered
        if request.streaming:
            if self.paused:
                producer.pauseProducing()
            return
        # A pull producer is asked for more each time the transport's buffer
        # empties, which only the transport knows: hand it the producer
        # until the body is done, then take the transport back.
        self.transport.unregisterProducer()
        self.transport.registerProducer(producer, False)

    def pull_producer_done(self) -> None:
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)

    # -- IBodyReader: the consumer of the body does not keep up, or does --

    def pause_body(self) -> None:
        if not self.body_paused and self.state != _CLOSED:
            self.body_paused = True
            if not self.reading_paused:
                self.transport.pauseProducing()

    def resume_body(self) -> None:
        if self.body_paused:
            self.body_paused = False
            if not self.reading_paused and self.state != _CLOSED:
                self.transport.resumeProducing()

    def discard_body(self) -> None:
        self.resume_body()  # the rest is read, and dropped by the body

    # -- reading ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == _TUNNEL:
            self.last = self.clock.seconds()
            self._count_in(data)
            tunnel = self.tunnel
            assert tunnel is not None  # set with the _TUNNEL state
            tunnel.write(data)
            return
        if state == _CLOSED:
            return
        self.buffer = self.buffer + data if self.buffer else data
        if state == _BUSY:
            # Pipelined: keep it for later, but not without bound.
            if len(self.buffer) > self.factory.max_header_bytes and not self.reading_paused:
                self.reading_paused = True
                self.transport.pauseProducing()
            return
        if state != _IDLE:
            # Not while idle: empty lines between requests must not keep a
            # connection open (the idle deadline runs from the last response).
            self.last = self.clock.seconds()
        self._feed()

    def _feed(self) -> None:
        """Parse what is buffered, as far as it goes."""
        if self.parsing:
            return  # a request answered synchronously: the loop below goes on
        self.parsing = True
        try:
            while self.buffer and self.state < _BUSY:
                if not self._step():
                    break
        except BadRequest as e:
            self._refuse(e.code, str(e))
        except Exception:
            # A bug of ours, never the client's doing: the client still gets
            # a 400 and a close, and the error is logged, but it never
            # escapes.  _feed also runs from the end of a response, that is
            # from the backend connection's callbacks, which must never see
            # an exception caused by the next request's bytes.
            log.failure("listener {listener}: error parsing a request from {client}",
                        listener=self.factory.listener_name, client=self.client_ip or self.peer)
            if self.request is not None:
                self.state = _CLOSED  # a response is under way: it cannot be followed by a 400
                self.transport.abortConnection()
            elif self.state != _CLOSED:
                self._refuse(400, "a request this listener could not parse")
        finally:
            self.parsing = False
        if self.read_closed and self.state < _BUSY:
            self._sender_done()

    def _step(self) -> bool:
        """Parse one piece of the buffer; C{False} when more bytes are needed."""
        state = self.state
        buffer = self.buffer
        if state <= _HEAD:
            if state == _IDLE:
                # RFC 9112 2.2: empty lines before a request line are ignored.
                while buffer.startswith(b"\r\n"):
                    buffer = buffer[2:]
                self.buffer = buffer
                if not buffer:
                    return False
                self.state = _HEAD
                self.head_started = self.last = self.clock.seconds()
            end = buffer.find(b"\r\n\r\n")
            limit = self.factory.max_header_bytes
            if end < 0:
                if len(buffer) > limit:
                    self._head_too_large(buffer)
                if buffer.startswith(b"\n") or b"\n\n" in buffer or b"\r\n\n" in buffer:
                    raise BadRequest("a bare LF in the request head")
                return False
            if end > limit:
                self._head_too_large(buffer[:end])
            self.buffer = buffer[end + 4:]
            self._request_head(buffer[:end])
            return True
        if state == _BODY:
            n = self.remaining
            body = self.body
            if len(buffer) < n:
                self.remaining = n - len(buffer)
                self.buffer = b""
                if body is not None:
                    body.feed(buffer)
                else:
                    self._spool().write(buffer)
                return False
            self.buffer = buffer[n:]
            if body is not None:
                self.remaining = 0
                body.feed(buffer[:n])
                if self.body is body:
                    self._body_done()
            else:
                self._spool().write(buffer[:n])
                self._dispatch()
            return True
        if state == _CHUNK_SIZE_LINE:
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > MAX_CHUNK_LINE:
                    raise BadRequest("a chunk-size line over 4096 bytes")
                return False
            line = buffer[:end]
            self.buffer = buffer[end + 2:]
            size = line.split(b";", 1)[0].rstrip(b" \t")
            if not _CHUNK_SIZE.match(size) or b"\n" in line or b"\r" in line:
                raise BadRequest(f"invalid chunk size {line[:20]!r}")
            n = int(size, 16)
            if n:
                self.remaining = n
                self.state = _CHUNK_DATA
            else:
                self.state = _TRAILERS
            return True
        if state == _CHUNK_DATA:
            n = self.remaining
            limit = self.factory.max_body_bytes
            if limit:
                self.body_read += min(n, len(buffer))
                if self.body_read > limit:
                    raise BadRequest(f"a chunked body over max_body_bytes ({limit})", 413)
            write = self.body.feed if self.body is not None else self._spool().write
            if len(buffer) <= n:
                self.buffer = b""
                self.remaining = n - len(buffer)
                if not self.remaining:
                    self.state = _CHUNK_END
                write(buffer)
                return False
            self.buffer = buffer[n:]
            self.state = _CHUNK_END
            write(buffer[:n])
            return True
        if state == _CHUNK_END:
            if len(buffer) < 2:
                return False
            if buffer[:2] != b"\r\n":
                raise BadRequest("a chunk not followed by CRLF")
            self.buffer = buffer[2:]
            self.state = _CHUNK_SIZE_LINE
            return True
        # _TRAILERS: fields after the last chunk are read and dropped (the
        # body is forwarded with new framing, without trailers).
        end = buffer.find(b"\r\n")
        if end < 0:
            if len(buffer) > self.factory.max_header_bytes:
                raise BadRequest("trailer fields over max_header_bytes", 431)
            return False
        line = buffer[:end]
        self.buffer = buffer[end + 2:]
        if not line:
            if self.body is not None:
                self._body_done()
            else:
                self._dispatch()
        elif b":" not in line or b"\n" in line or b"\r" in line or _BAD_HEAD.search(line):
            raise BadRequest("an invalid trailer field")
        return True

    def _spool(self) -> IO[bytes]:
        """The spool of the request whose body is being read (request_buffering)."""
        pending = self.pending
        assert pending is not None and pending.content is not None
        return pending.content

    def _head_too_large(self, head: bytes) -> None:
        line_end = head.find(b"\r\n")
        if line_end < 0 or line_end > self.factory.max_header_bytes:
            raise BadRequest("the request line is over max_header_bytes", 414)
        raise BadRequest("the request head is over max_header_bytes", 431)

    def _request_head(self, head: bytes) -> None:
        """Check a request head and start the request (or its body)."""
        lines = head.split(b"\r\n")
        crlfs = len(lines) - 1
        if head.count(b"\n") != crlfs:
            raise BadRequest("a bare LF in the request head")
        if head.count(b"\r") != crlfs:
            raise BadRequest("a bare CR in the request head")
        if _BAD_HEAD.search(head):
            raise BadRequest("a control character in the request head")
        if crlfs > self.factory.max_headers:
            raise BadRequest(f"more than {self.factory.max_headers} header fields", 431)
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise BadRequest("the request line is not 'method target HTTP/version'")
        method, target, version = parts
        if version != b"HTTP/1.1" and version != b"HTTP/1.0":
            # Only HTTP/DIGIT.DIGIT is a version (RFC 9112 2.3); any other
            # byte there (b"HTTP/1\xab1") is a malformed request line.
            if _VERSION.match(version):
                raise BadRequest(f"HTTP version {version.decode('ascii')} is not supported", 505)
            raise BadRequest("the request line is not 'method target HTTP/version'")
        if not _TOKEN.match(method):
            raise BadRequest("an invalid method")
        if not target or _BAD_TARGET.search(target):
            raise BadRequest("an invalid request target")
        if method == b"CONNECT":
            raise BadRequest("CONNECT is not supported by this balancer", 501)
        if target[:1] != b"/" and target != b"*" and target[:7].lower() != b"http://" \
                and target[:8].lower() != b"https://":
            raise BadRequest("the request target is not a path, an http(s) URL or '*'")
        headers = FastHeaders()
        try:
            headers.add_fields(lines[1:])
        except ValueError:
            for line in lines[1:]:
                if line[:1] in (b" ", b"\t"):
                    raise BadRequest("a folded header line (obs-fold)")
                name, colon, _ = line.partition(b":")
                if not colon or not _TOKEN.match(name):
                    raise BadRequest(f"an invalid header line {line[:40]!r}")
            raise BadRequest("an invalid header line")  # not reached: add_fields found one
        fields = headers.by_name
        persistent = version == b"HTTP/1.1"
        connection = fields.get(b"Connection")
        if connection:
            tokens = {t.strip().lower() for v in connection for t in v.split(b",")}
            if b"close" in tokens:
                persistent = False
            elif b"keep-alive" in tokens:
                persistent = True
        if self.draining or self.read_closed:
            persistent = False
        request = FrontRequest(self, method, target, version, headers, persistent)
        length = fields.get(b"Content-Length")
        chunked = fields.get(b"Transfer-Encoding")
        if chunked is not None:
            if length is not None:
                raise BadRequest("both Content-Length and Transfer-Encoding")
            if len(chunked) != 1 or chunked[0].lower() != b"chunked":
                raise BadRequest(f"Transfer-Encoding {b', '.join(chunked)[:40]!r} is not 'chunked'")
            if version == b"HTTP/1.0":
                raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
            del fields[b"Transfer-Encoding"]
            n = -1
        elif length is not None:
            if len(set(length)) != 1 or not length[0].isdigit() or len(length[0]) > 15:
                raise BadRequest(f"invalid Content-Length {b', '.join(length)[:40]!r}")
            n = int(length[0])
            if len(length) > 1:
                fields[b"Content-Length"] = [length[0]]
        else:
            n = 0
        limit = self.factory.max_body_bytes
        if limit and n > limit:
            raise BadRequest(f"a body of {n} bytes, over max_body_bytes ({limit})", 413)
        check_head = self.factory.check_head
        if check_head is not None:
            check_head(request)  # before any body byte is read (or 100 Continue sent)
        self.body_read = 0
        expect = fields.pop(b"Expect", None)
        if expect is not None:
            if len(expect) != 1 or expect[0].lower() != b"100-continue":
                raise BadRequest("an expectation other than 100-continue", 417)
            if n and version == b"HTTP/1.1":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if n == 0:
            self.pending = request
            self._dispatch()
            return
        self.pending = request
        if n > 0:
            self.remaining = n
            self.state = _BODY
        else:
            self.state = _CHUNK_SIZE_LINE
        if self.factory.request_buffering:
            request.content = SpooledTemporaryFile(max_size=SPOOL_BYTES)
        else:
            # Streamed: the request goes on now, its body follows.
            self.body = request.body = StreamedBody(self, n if n > 0 else None)
            self._dispatch()

    def _body_done(self) -> None:
        """The last byte of a streamed body was read."""
        body, self.body = self.body, None
        assert body is not None  # called while a streamed body is read
        self.resume_body()
        if self.request is not None and self.request.body is body:
            self.state = _BUSY  # what follows waits for the response
            body.finish()
        else:
            # The response came first; the rest of the body was dropped.
            self.state = _IDLE
            close, self.close_after_body = self.close_after_body, False
            self._next_request(not close)

    # -- answering ----------------------------------------------------------

    def _dispatch(self) -> None:
        request, self.pending = self.pending, None
        assert request is not None  # called once a request's head is read
        if self.body is None:
            self.state = _BUSY
        self.request = request
        if request.content is not None:
            request.content.seek(0, 0)
        render(self.factory, request, self._internal_error)

    def _internal_error(self, request: FrontRequest) -> None:
        if request.finished or request.channel is None:
            return
        if request.started:
            self.transport.abortConnection()
            return
        request.code = 500
        request.code_message = None
        request.responseHeaders = FastHeaders({b"content-type": [b"text/plain; charset=utf-8"]})
        request.persistent = False
        request.write(b"500 Internal Server Error\n")
        request.finish()

    def _count_in(self, data: bytes) -> None:
        """A tunnel's bytes from the client count in the listener's C{bytes_in}."""
        stats = self.factory.stats
        if stats is not None:
            stats.bytes_in += len(data)

    def start_tunnel(self, peer_transport) -> None:
        """Relay bytes between the client and C{peer_transport} from now on."""
        self.state = _TUNNEL
        self.tunnel = peer_transport
        self.last = self.clock.seconds()
        transport = self.transport
        # Each side is the producer of the other, as in a TCP listener.
        transport.unregisterProducer()
        transport.registerProducer(peer_transport, True)
        if getattr(peer_transport, "producer", None) is None:  # not still sending a request body
            peer_transport.registerProducer(transport, True)
        if self.reading_paused:
            self.reading_paused = False
            transport.resumeProducing()
        early, self.buffer = self.buffer, b""
        if early:
            self._count_in(early)
            peer_transport.write(early)  # sent before the 101 arrived

    def request_done(self, request: FrontRequest) -> None:
        """The response to C{request} is complete."""
        self.request = None
        self.served = True
        if request.content is not None:
            request.content.close()
        body = self.body
        if body is not None and body is request.body and self.state != _CLOSED:
            # Answered before its body ended (an early answer): the rest of
            # the body is read and dropped, then the next request is read.
            self.close_after_body = not request.persistent
            body.stopProducing()
            return
        self._next_request(request.persistent)

    def _next_request(self, persistent: bool) -> None:
        """A request is over, body and response: read the next one, or close."""
        if not persistent or self.draining or self.state == _CLOSED:
            self._close()
            return
        self.state = _IDLE
        self.last = self.clock.seconds()
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resumeProducing()
        if self.buffer or self.read_closed:
            self._feed()

    def _refuse(self, code: int, why: str) -> None:
        """Answer a request the listener will not forward, and close."""
        if self.body is not None:
            self._body_error(code, why)
            return
        factory = self.factory
        log.info("listener {listener}: {code} for {client}: {why}", listener=factory.listener_name, code=code,
                 client=self.client_ip or getattr(self.peer, "host", self.peer), why=why)
        if factory.stats is not None:
            factory.stats.request_done(None, code, "none", 0)
        pending, self.pending = self.pending, None
        if pending is not None and pending.content is not None:
            pending.content.close()
        self.state = _CLOSED
        self.closed_at = self.clock.seconds()
        reason = _REASONS[code]
        body = b"%d %s: %s\n" % (code, reason, why.encode("ascii", "replace"))
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (code, reason, len(body), body)
        )
        self.transport.loseConnection()

    def _body_error(self, code: int, why: str) -> None:
        """
        A streamed body will never be whole: its consumer is told (the proxy
        drops its backend connection), and the client gets the error if no
        response has started (the connection is cut if one has); the
        connection closes.
        """
        factory = self.factory
        log.info("listener {listener}: {code} for {client}: {why}", listener=factory.listener_name, code=code,
                 client=self.client_ip or getattr(self.peer, "host", self.peer), why=why)
        body, self.body = self.body, None
        assert body is not None  # called while a streamed body is read
        request = self.request
        self.buffer = b""
        self.state = _BUSY  # nothing more is read as a request
        told = body.consumer is not None  # the proxy counts the request in the stats itself
        body.fail(BodyError(why, code))
        if request is None or request.finished:
            self._close()  # answered already: the rest of the body was being dropped
            return
        request.persistent = False
        if request.started:
            # Part of a response went out: it cannot be followed by an error.
            self.state = _CLOSED
            self.transport.abortConnection()
            return
        if not told and factory.stats is not None:
            factory.stats.request_done(None, code, "none", 0)
        text = b"%d %s: %s\n" % (code, _REASONS[code], why.encode("ascii", "replace"))
        request.code = code
        request.code_message = _REASONS[code]
        request.responseHeaders = FastHeaders({b"Content-Type": [b"text/plain; charset=utf-8"],
                                               b"Content-Length": [b"%d" % len(text)]})
        request.write(text)
        request.finish()

    # -- timeouts -----------------------------------------------------------

    def _check_timeout(self) -> None:
        """
        The connection's one timer.  Activity only records the time; when the
        timer fires it finds the deadline that applies now and either acts or
        waits until then.
        """
        self.timer = None
        timeout = self.factory.timeout
        now = self.clock.seconds()
        state = self.state
        if state == _TUNNEL:
            timeout = self.factory.tunnel_timeout
            if not timeout:
                return
            deadline = self.last + timeout
            if now >= deadline:
                log.info("listener {listener}: tunnel of {client} idle for {timeout} s: closing it",
                         listener=self.factory.listener_name, client=self.client_ip or self.peer, timeout=timeout)
                self._close()
            else:
                self.timer = self.clock.callLater(deadline - now, self._check_timeout)
            return
        if state == _CLOSED:
            # Closing waits for the client to read what is left; one that
            # never does is cut off.
            deadline = self.closed_at + timeout
        elif state == _BUSY:
            deadline = self.paused_at + timeout if self.paused else now + timeout
        elif state == _HEAD or (state != _IDLE and self.factory.whole_request_deadline):
            deadline = self.head_started + timeout
        elif self.body_paused:
            # The body's consumer (a backend that does not read) holds the
            # client back: not the client's doing (the proxy's
            # request_timeout covers the backend).
            deadline = now + timeout
        else:
            deadline = self.last + timeout
        if now < deadline:
            self.timer = self.clock.callLater(deadline - now, self._check_timeout)
            return
        client: object = self.client_ip or getattr(self.peer, "host", self.peer)
        if state == _CLOSED or (state == _IDLE and self.paused):
            self.transport.abortConnection()
        elif state == _BUSY:
            log.info("listener {listener}: client {client} read nothing for {timeout} s: closing its connection",
                     listener=self.factory.listener_name, client=client, timeout=timeout)
            self.state = _CLOSED
            self.transport.abortConnection()
        elif state == _IDLE:
            self._close()  # an idle keep-alive connection: close quietly
        elif state == _HEAD:
            self._refuse(408, f"the request head took over {timeout:g} s")
        else:
            self._refuse(408, f"no request body bytes for {timeout:g} s")


def _abort(channel) -> None:
    channel.transport.abortConnection()


@implementer(IListenerFactory)
class HTTPFrontFactory(Factory):
    """
    The factory of an HTTP listener: serves C{resource} (usually a
    L{twisted_slb.web.proxy.BalancedProxyResource}, behind persistence and
    routing resources) over HTTP/1.1 and HTTP/1.0.

    Over C{max_connections} open connections, new ones are closed at once; a
    client address over C{max_connections_per_ip} gets 429 and a close
    (0: no limit).  Put it under L{twisted_slb.tls.server_tls_factory} (or
    any TLS wrapper) for HTTPS, with C{secure=True} so that requests say so
    even if the wrapper's transport does not provide L{ISSLTransport}.

    @ivar admission: the L{twisted_slb.limits.IConnectionAdmission} of its
        connections: C{max_connections}, C{max_connections_per_ip} and the
        drain on stop.
    @ivar limit: the admission's L{ConnectionLimit}.
    @ivar per_ip: the admission's L{ClientAddressLimit}.
    @ivar channels: the open L{HTTPFrontChannel}s (the admission's set).
    @ivar stats: the listener's L{twisted_slb.stats.ListenerStats}, or
        L{None}.
    @ivar lean: whether a listener serving this factory directly (plain
        HTTP) gives its connections L{twisted_slb._io.lean} transports.
    @ivar request_buffering: whether a request body is read whole (into
        C{request.content}) before the request is handed to the resource;
        otherwise (the default) it is streamed (C{request.body}).
    """

    noisy = False
    lean = True
    #: called with each L{FrontRequest} once its head is read, before its
    #: body: raises L{BadRequest} to refuse it (the admin listener checks
    #: Host, origin and authorization there)
    check_head: Optional[Callable[[FrontRequest], None]] = None
    #: whether the body, too, must arrive within one timeout of the
    #: request's first byte (rather than one timeout between reads)
    whole_request_deadline = False
    #: see L{CLIENT_WRITE_BUFFER}
    write_buffer = CLIENT_WRITE_BUFFER
    #: a L{twisted_slb.clientip.ClientIPPolicy} reading X-Forwarded-For or
    #: Forwarded, or L{None}: the client is the connection's peer
    client_ip_policy = None
    #: the L{twisted_slb.web.h2.H2Settings} of the HTTP/2 connections of an
    #: https listener that offers C{h2} over ALPN, or L{None}: HTTP/1.1 only
    h2: Optional[H2Settings] = None

    def __init__(
        self,
        resource,
        reactor=None,
        client_idle_timeout: float = 60.0,
        max_header_bytes: int = 65536,
        max_headers: int = 100,
        max_connections: int = 0,
        max_connections_per_ip: int = 0,
        listener_name: str = "http",
        secure: bool = False,
        limit: Optional[ConnectionLimit] = None,
        max_body_bytes: int = 0,
        tunnel_timeout: float = 3600.0,
        request_buffering: bool = False,
    ) -> None:
        reactor = maybe_global_reactor(reactor)
        self.resource = resource
        self.reactor = reactor
        self.timeout = client_idle_timeout
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_body_bytes = max_body_bytes
        self.tunnel_timeout = tunnel_timeout
        self.request_buffering = request_buffering
        self.admission = ConnectionAdmission(
            limit if limit is not None else ConnectionLimit(max_connections, listener_name),
            ClientAddressLimit(max_connections_per_ip, listener_name),
            reactor,
        )
        self.limit = self.admission.limit
        self.per_ip = self.admission.per_ip
        self.listener_name = listener_name
        self.secure = secure
        self.channels: set = self.admission.connections
        self.stats: Optional[ListenerStats] = None

    def buildProtocol(self, addr):
        ip = getattr(addr, "host", None)
        policy = self.client_ip_policy
        if ip is not None and policy is not None and normalise_ip(ip) in policy.trusted:
            ip = None  # a trusted proxy's connections carry many clients: not limited per IP
        channel = self.admission.build(ip, HTTPFrontChannel, self)
        if self.stats is not None and isinstance(channel, HTTPFrontChannel):
            self.stats.connections_total += 1
        return channel

    _retiring = None  # HTTP/2 connections a reload sent GOAWAY, and the call cutting them after the grace

    def channel_closed(self, channel: HTTPFrontChannel) -> None:
        self.channels.discard(channel)
        if self._retiring is not None and not (self._retiring[0] & self.channels):
            self._retiring[1].cancel()  # all gone before the grace ended
            self._retiring = None
        self.admission.remove(channel, channel.client_ip)

    def drain(self, grace: float) -> Deferred:
        """
        Graceful shutdown (after the port stopped listening): idle
        connections are closed now, busy ones after their response (HTTP/2
        ones send GOAWAY and close after their last stream); those still
        open after C{grace} seconds are closed.

        @return: a L{Deferred} that fires when no connection is left.
        """
        for channel in list(self.channels):
            goaway = getattr(channel, "goaway", None)
            if goaway is not None:
                goaway()  # HTTP/2: GOAWAY; in-flight streams finish
                continue
            channel.draining = True
            # An idle keep-alive connection is closed now (a client retries a
            # request that crossed the close on a reused connection); a
            # connection accepted a moment ago has its first request on the
            # way, and none would retry it: it is answered, then closed.
            if channel.state == _IDLE and channel.served:
                channel._close()

        return self.admission.drain(grace, _abort)

    def retire(self, grace: float) -> None:
        """
        A reload replaced this factory: its HTTP/2 connections send GOAWAY, so
        that their clients open new ones (served by the new configuration)
        once the streams in flight are answered; those still open after
        C{grace} seconds are closed.  HTTP/1.1 connections carry on.
        """
        retiring = {c for c in self.channels if getattr(c, "goaway", None) is not None}
        for channel in retiring:
            channel.goaway()

        def force() -> None:
            self._retiring = None
            for channel in retiring & self.channels:
                channel.abort_streams()
                channel.transport.abortConnection()

        if retiring & self.channels:
            self._retiring = (retiring, self.reactor.callLater(grace, force))
