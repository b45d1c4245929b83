"""
L{BalancedProxyResource}: a streaming HTTP reverse proxy over a backend group.

For each request: the L{Session} (filled by a persistence wrapper in front of
this resource, if any) and the group choose a backend; the request goes to it
over a pooled keep-alive HTTP/1.1 connection (L{twisted_slb.web.upstream});
when the response head arrives, the persistence policy's C{remember} may add
or rewrite cookies before anything reaches the client; the body then streams
back with back-pressure (the upstream connection is the client's producer).

A backend that fails before answering is retried on another backend when the
request is safe to retry (an idempotent method with no body); otherwise the
client gets 502 (backend error), 503 (no usable backend) or 504 (no answer in
C{request_timeout}).  A response whose body stops arriving for
C{response_idle_timeout} is cut.

Request bodies stream (see L{twisted_slb.web.body}): a request with a
C{body} goes to the backend as soon as a connection is ready, and its body
follows as it arrives, the body being the backend transport's producer (a
backend that does not read pauses the client's upload).  A body of known
length goes with its C{Content-Length}; one whose length only its end says
(a chunked upload) goes chunked.  A request whose body has started to go
out is never sent again (a failed connect, before any byte, still moves to
another backend).  A backend that answers before the body ended gets the
rest of the body while its response is relayed (full duplex, as HAProxy);
if the response ends first, the upload stops, the backend connection is
reset and never reused, and the client's remaining body is read and dropped
by its listener.  With C{request_buffering} (or a request whose body was
read whole, C{request.content}, as twisted.web's L{Request} has) the whole
body is read first (spooled to a temporary file above 100 KB), and sent with
a C{Content-Length}.

Backend connections are reused safely (as HAProxy's C{http-reuse safe}): the
first request of a client connection, a request with a body and any
non-idempotent request get a new backend connection; only the later
idempotent requests of a client connection go on an idle one.  A connection
goes back to the pool only after an exchange that ended cleanly: the whole
request sent, the whole response read, nothing after it, no timeout.  An
idle connection on which the backend sends anything is closed.
"""

from __future__ import annotations

from tempfile import SpooledTemporaryFile
from typing import IO, TYPE_CHECKING, Callable, Dict, Hashable, List, Optional, cast

from twisted.internet import error
from twisted.internet.interfaces import IConnector, IPushProducer
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from twisted_slb._io.headers import FastHeaders
from twisted_slb._io.timers import Deadlines
from twisted_slb._reactor import maybe_global_reactor
from twisted_slb.accesslog import http_line, http_text
from twisted_slb.backends import Backend, BackendGroup, local_failure
from twisted_slb.persistence.interfaces import session_for, strict_refusal
from twisted_slb.web.body import BodyError, IBodyConsumer, StreamedBody
# BalancerSite lives in twisted_slb.web.site; importing it from here still works.
from twisted_slb.web.site import BalancerSite  # noqa: F401
from twisted_slb.web.upstream import UpstreamPool, UpstreamProtocol

if TYPE_CHECKING:
    from twisted_slb.web.front import FrontRequest

log = Logger(namespace="twisted_slb.proxy")
access = Logger(namespace="twisted_slb.access")

#: RFC 9110 7.6.1 hop-by-hop fields, plus the de facto ones.
HOP_BY_HOP = frozenset(
    [
        b"connection", b"proxy-connection", b"keep-alive", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
    ]
)
#: Methods a proxy may send again (RFC 9110 9.2.2).
IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])
# Headers we set ourselves on the way to the backend.
_FORWARDED = frozenset([b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"content-length"])
# Bytes read at a time from a backend until its client shows it reads: at
# the start of each response and after each stall of the client.  A client
# that never reads then makes this process hold its transport's buffer
# (CLIENT_WRITE_BUFFER) plus one such read, not plus 64 KB.
_STALLED_READ = 16 * 1024
# Bytes a client takes without stalling before its backend is read in the
# transport's own (64 KB) reads again: large reads cost a third less CPU per
# byte on a bulk download (docs/reliability.md).
_GROW_AFTER = 256 * 1024
# Bodies up to this size are written with the head in one go.
_SMALL_BODY = 65536
# A body spooled for request_buffering stays in memory up to this size.
_SPOOL_BYTES = 100 * 1024


_NO_TOKENS: frozenset = frozenset()
#: What is never copied from a client's request to the backend's.
_NOT_FORWARDED = HOP_BY_HOP | _FORWARDED


#: Fields a C{Connection} header may name but never remove (RFC 9110
#: 7.6.1 lets a sender name any field; these frame or route the message):
#: C{Host} (the backend must get one, the one we routed on), C{Content-Length}
#: and C{Transfer-Encoding} (the framing; the proxy writes its own), and
#: C{Cookie} (what the persistence policies read is what the backend gets).
NEVER_HOP_BY_HOP = frozenset([b"host", b"content-length", b"transfer-encoding", b"cookie"])


def _connection_tokens(headers) -> frozenset:
    """The fields a request's C{Connection} header names, less L{NEVER_HOP_BY_HOP}."""
    values = headers.getRawHeaders(b"connection")
    if not values:
        return _NO_TOKENS
    return frozenset(t.strip().lower() for v in values for t in v.split(b",")) - NEVER_HOP_BY_HOP


#: Connection header value -> the fields a response with it must lose.
_HOP_BY_HOP_FOR: Dict[bytes, frozenset] = {}


def _response_hop_by_hop(headers) -> frozenset:
    """
    The lowercase names of the fields of a response that are not
    forwarded: L{HOP_BY_HOP}, and those its C{Connection} header names.
    Backends send few distinct C{Connection} values (C{keep-alive},
    C{close}): the set for each is computed once (a bounded cache).
    """
    drop = HOP_BY_HOP
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            named = _HOP_BY_HOP_FOR.get(value)
            if named is None:
                named = HOP_BY_HOP | (frozenset(t.strip().lower() for t in value.split(b",")) - NEVER_HOP_BY_HOP)
                if len(_HOP_BY_HOP_FOR) < 1000:
                    _HOP_BY_HOP_FOR[value] = named
            drop = drop | named if drop is not HOP_BY_HOP else named
    return drop


def _origin_form(uri: bytes):
    """
    The request target to send (origin-form) and, for an absolute-form
    target (C{GET http://host/path}), its authority.
    """
    if uri[:1] == b"/":
        return uri, None  # the usual case
    lower = uri[:8].lower()
    if not (lower.startswith(b"http://") or lower.startswith(b"https://")):
        return uri, None
    rest = uri.split(b"://", 1)[1]
    slash = [i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0]
    cut = min(slash) if slash else len(rest)
    authority, target = rest[:cut], rest[cut:]
    if target.startswith(b"?") or not target:
        target = b"/" + target
    return target, authority


def _close_after(request) -> None:
    """Close the client's connection once this response is sent."""
    request.setHeader(b"connection", b"close")
    channel = getattr(request, "channel", None)
    if isinstance(channel, HTTPChannel):
        # twisted.web decides keep-alive from the request alone.
        channel.persistent = False


def _valid_authority(authority: bytes) -> bool:
    """
    Whether the authority of an absolute-form target is C{host[:port]} with
    a port of 0..65535 (RFC 3986 3.2; no userinfo).
    """
    if not authority or b"@" in authority:
        return False
    if authority[:1] == b"[":
        end = authority.find(b"]")
        if end < 0:
            return False
        rest = authority[end + 1:]
    else:
        colon = authority.find(b":")
        rest = authority[colon:] if colon >= 0 else b""
        if colon == 0:
            return False
    if not rest:
        return True
    port = rest[1:]
    return rest[:1] == b":" and (not port or (port.isdigit() and len(port) <= 5 and int(port) <= 65535))


def _listener_authority(request) -> bytes:
    """C{host:port} of the listener address a request came to, for a C{Host} header."""
    address = request.getHost()
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if not host or port is None:
        return b"localhost"
    host = host.encode("ascii")
    if b":" in host:
        host = b"[" + host + b"]"
    return b"%s:%d" % (host, port)


def _request_problem(request) -> Optional[str]:
    """Why a request must not be forwarded (RFC 9112 3.2), or L{None}."""
    if b"#" in request.uri:
        return "a fragment (#) in the request target"
    hosts = request.requestHeaders.getRawHeaders(b"host") or []
    if len(hosts) > 1:
        return "more than one Host header"
    if request.clientproto == b"HTTP/1.1" and not hosts and _origin_form(request.uri)[1] is None:
        return "an HTTP/1.1 request needs a Host header"
    if hosts and (not hosts[0] or b"," in hosts[0] or b" " in hosts[0].strip()):
        return "invalid Host header"
    authority = _origin_form(request.uri)[1]
    if authority is not None and not _valid_authority(authority):
        return "invalid absolute-form request target"
    return None


def _first_on_connection(request) -> bool:
    """
    Whether C{request} is the first one of its client connection to go to a
    backend (which marks the connection, for the next ones).
    """
    channel = getattr(request, "channel", None)
    if channel is None:
        return True
    if getattr(channel, "slb_proxied", False):
        return False
    try:
        channel.slb_proxied = True
    except AttributeError:
        pass  # a channel that takes no attribute: every request is a first
    return True


@implementer(IPushProducer, IBodyConsumer)
class _Exchange:
    """
    One client request's trip through the proxy (and its retries).

    It is the producer of the response body for the client's connection
    (pausing and resuming the backend connection), so that whatever ends
    the client's side (the client closing, the listener's timeout, a
    limit, the grace period of a shutdown) reaches the exchange through
    L{stopProducing} before the backend connection is closed: see
    L{_ended_by_us}.

    It is also the L{IBodyConsumer} of a streamed request body: it writes
    it to the backend connection (or, with C{request_buffering}, to a
    spool file first).
    """

    upstream: Optional[UpstreamProtocol] = None
    connector: Optional[IConnector] = None
    sender: Optional[FileSender] = None
    status = 0
    bytes_sent = 0
    finished = False
    # Whether the whole request (head and body) was handed to the backend
    # connection, and whether the response head came before that.
    request_sent = False
    early = False
    last_data = 0.0  # when the last body bytes came from the backend
    reused = False  # whether the current backend connection was an idle pooled one
    #: the backend connection is read _STALLED_READ bytes at a time (its
    #: transport's bufferSize is set)
    small_reads = False
    #: bytes written to the client since the response began or it last stalled
    unstalled = 0
    # A streamed request body (IRequestBody) still to send, whether it goes
    # chunked, when its last bytes went to the backend, and the spool file
    # it goes to first with request_buffering.
    body: Optional[StreamedBody] = None
    chunked = False
    body_sent_at = 0.0
    spool: Optional[SpooledTemporaryFile[bytes]] = None
    body_registered = False  # the body is the backend transport's producer
    corked: Optional[List[bytes]] = None  # body bytes gathered to go out with the request head
    waiting_for_body = False  # start() called while the body is being spooled

    def __init__(self, resource: BalancedProxyResource, request: Request, upgrade: Optional[bytes] = None) -> None:
        self.resource = resource
        self.request = request
        # The Upgrade header of a request to tunnel (WebSocket), or None.
        self.upgrade = upgrade
        self.session = session_for(request)
        self.started = resource.reactor.seconds()
        self.tried: List[Backend] = []
        self.backend: Optional[Backend] = None
        self.client_gone = False
        self.responding = False
        body = getattr(request, "body", None)
        content = request.content
        length: Optional[int] = 0
        if body is not None:
            self.body = body
            length = body.length
            self.chunked = length is None
        elif content is not None:
            content.seek(0, 2)
            length = content.tell()
            content.seek(0, 0)
        self.body_length = length
        # Safe to send again if a backend fails before answering.
        self.retryable = request.method in IDEMPOTENT and not length and self.body is None
        # A client's first request never goes on a connection another
        # client used (what that client sent may not have been what the
        # backend read: a request hidden in a body it ignored, say).
        self.first = _first_on_connection(request)
        self.head = self._build_head()
        setattr(request, "slb_exchange", self)  # for introspection (tests, debugging)
        on_lost = getattr(request, "on_connection_lost", None)
        if on_lost is not None:
            on_lost(self._client_lost)  # the listeners' server: no Deferred per request
        else:
            request.notifyFinish().addErrback(self._client_lost)
        if body is not None:
            # Held until a backend connection is ready (the body keeps at
            # most HIGH_WATER bytes, then pauses the client), or spooled.
            if resource.request_buffering:
                self.spool = SpooledTemporaryFile(max_size=_SPOOL_BYTES)
            else:
                body.pauseProducing()
            body.deliver_to(self)

    def _build_head(self) -> bytes:
        request = self.request
        headers = request.requestHeaders
        tokens = _connection_tokens(headers)
        drop = _NOT_FORWARDED | tokens if tokens else _NOT_FORWARDED
        target, authority = _origin_form(request.uri)
        lines = [request.method, b" ", target, b" HTTP/1.1\r\n"]
        host = authority
        if authority is not None:
            # RFC 9112 3.2.2: with an absolute-form target, the Host field
            # is replaced by the target's authority, so that the backend can
            # never read a host other than the one we routed on.
            drop = drop | {b"host"}
            lines += [b"Host: ", authority, b"\r\n"]
        forwarded_for = None
        for name, values in headers.getAllRawHeaders():
            lower = name.lower()
            if lower == b"host" and host is None:
                host = values[0]
            elif lower == b"x-forwarded-for":
                forwarded_for = b", ".join(values)
            if lower in drop:
                continue
            for value in values:
                lines += [name, b": ", value, b"\r\n"]
        if host is None:
            # An HTTP/1.0 request without Host (HTTP/1.1 ones are refused):
            # the backend gets HTTP/1.1, which needs one (RFC 9112 3.2).  The
            # listener's address is what the client connected to, so URLs
            # the backend builds from it (redirects) lead back through the
            # balancer, never to a backend's own address.
            lines += [b"Host: ", _listener_authority(request), b"\r\n"]
        # The connection's peer: with a client address read from a
        # forwarding header, that header already names the client.
        client = (self.session.peer_ip or self.session.client_ip).encode("ascii")
        lines += [b"X-Forwarded-For: ", (forwarded_for + b", " + client) if forwarded_for else client, b"\r\n"]
        proto = b"https" if (request.isSecure() or self.resource.forwarded_proto == "https") else b"http"
        lines += [b"X-Forwarded-Proto: ", proto, b"\r\n"]
        if host is not None:
            lines += [b"X-Forwarded-Host: ", host, b"\r\n"]
        if self.chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif self.body_length or request.method in (b"POST", b"PUT", b"PATCH"):
            # Not chunked: the length is known.
            lines += [b"Content-Length: ", b"%d" % cast(int, self.body_length), b"\r\n"]
        if self.upgrade is not None:
            lines += [b"Connection: Upgrade\r\nUpgrade: ", self.upgrade, b"\r\n"]
        lines.append(b"\r\n")
        return b"".join(lines)

    # -- choosing and connecting --------------------------------------------

    def start(self) -> None:
        if self.spool is not None:
            self.waiting_for_body = True  # see body_end
            return
        lookup = self.session.lookup
        if lookup is not None:
            # The persistence wrapper's shared table is asking its store
            # (within the store's timeout): choose once it answers.
            self.session.lookup = None
            lookup.addCallback(self._pin_found)
            return
        resource = self.resource
        group = resource.group
        backend = None
        if len(self.tried) <= group.retries:
            backend = group.route(self.session, self.tried)
        if backend is None:
            if strict_refusal(self.session):
                self.refuse_pinned()
            elif self.tried:
                self.fail(502, "Bad Gateway", "no backend could answer")
            else:
                self.fail(503, "Service Unavailable", "no backend is available")
            return
        self.start_on(backend)

    def _pin_found(self, key: Optional[str]) -> None:
        if self.client_gone or self.finished:
            return
        self.session.pinned_key = key
        self.start()

    def start_on(self, backend) -> None:
        """Connect to C{backend} (or take an idle connection to it) and send the request."""
        resource = self.resource
        group = resource.group
        self.backend = backend
        self.session.backend = backend
        self.tried.append(backend)
        tls = resource.tls_options_for(backend)
        self.connector = resource.pool.get(
            backend, group.connect_timeout, self._connected, self._connect_failed, tls,
            # A tunnel takes its connection for good: never an idle one.
            reuse=self.retryable and self.upgrade is None and not self.first,
            shape=resource.connection_shape(),
        )

    def _connect_failed(self, reason) -> None:
        self.connector = None
        if self.finished:
            return  # this side gave up on the connect (the client gone, its body failed)
        backend = self.backend
        assert backend is not None  # chosen by start_on
        why = "timed out" if reason.check(error.TimeoutError) else reason.getErrorMessage()
        if local_failure(reason):
            why += " (a shortage in this process, not counted against the backend)"
        else:
            backend.record_failure(f"connect {why}")
        log.warn(
            "listener {listener}: connect to backend {backend} ({address}) failed: {why}",
            listener=self.resource.listener_name, backend=backend.name, address=backend.address, why=why,
        )
        if not self.client_gone:
            self.start()  # nothing was sent: always safe to try another backend

    def _connected(self, upstream, reused: bool) -> None:
        self.connector = None
        if self.client_gone:
            upstream.release()
            return
        self.upstream = upstream
        self.reused = reused
        if self.upgrade is None:
            # bufferSize is the read size of twisted_slb._io.lean's transports
            # and Twisted's own (a public attribute of FileDescriptor).
            upstream.transport.bufferSize = _STALLED_READ
            self.small_reads = True
        backend = self.backend
        assert backend is not None  # chosen by start_on
        backend.active += 1
        backend.total += 1
        request = self.request
        self.request_sent = self.early = False
        resource = self.resource
        body = self.body
        if body is not None:
            # Streamed: the head now, the body as it comes (the body is the
            # backend transport's producer: a backend that does not read
            # pauses it, and so the client).
            # What of the body is here already goes in the head's write (a
            # small POST: one write, as a spooled one).
            resource.response_deadlines.add(self, resource.request_timeout)
            self.body_sent_at = resource.reactor.seconds()
            self.body_registered = True
            upstream.transport.registerProducer(body, True)
            corked = self.corked = [self.head]
            if self.upstream is upstream:
                body.resumeProducing()
            self.corked = None
            backend.bytes_out += len(self.head)
            upstream.send(b"".join(corked), self, head_request=request.method == b"HEAD",
                          upgrade=self.upgrade is not None)
            return
        length = self.body_length
        assert length is not None  # only a streamed body has no length
        upstream.send(self.head if length > _SMALL_BODY else self.head + self._small_body(),
                      self, head_request=request.method == b"HEAD", upgrade=self.upgrade is not None)
        backend.bytes_out += len(self.head) + length
        if length > _SMALL_BODY:
            # Twisted types Request.content as None (its class default); here it is the body's file.
            content = cast("IO[bytes]", request.content)
            content.seek(0, 0)
            sender = self.sender = FileSender()
            sender.beginFileTransfer(content, upstream.transport).addCallbacks(
                self._body_sent, lambda f: None)
        else:
            self.request_sent = True
        resource.response_deadlines.add(self, resource.request_timeout)

    # -- IBodyConsumer: a streamed request body ------------------------------

    def body_data(self, data: bytes) -> None:
        spool = self.spool
        if spool is not None:
            spool.write(data)
            return
        upstream = self.upstream
        if upstream is None:
            return
        corked = self.corked
        if corked is not None:
            corked += (b"%x\r\n" % len(data), data, b"\r\n") if self.chunked else (data,)
        elif self.chunked:
            upstream.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            upstream.transport.write(data)
        backend = self.backend
        assert backend is not None  # chosen by start_on
        backend.bytes_out += len(data)
        self.body_sent_at = self.resource.reactor.seconds()

    def body_end(self) -> None:
        spool = self.spool
        if spool is not None:
            # request_buffering: the whole body is here; on as a spooled one.
            self.spool = None
            self.body = None
            self.chunked = False
            spool.seek(0, 2)
            self.body_length = spool.tell()
            spool.seek(0, 0)
            # Twisted types Request.content as None (its class default), not as the body's file.
            self.request.content = spool  # type: ignore[assignment]  # closed by the listener with the request
            self.retryable = self.request.method in IDEMPOTENT and not self.body_length
            self.head = self._build_head()
            if self.waiting_for_body and not self.finished:
                self.waiting_for_body = False
                self.start()
            return
        upstream = self.upstream
        if upstream is None:
            return
        if self.chunked:
            if self.corked is not None:
                self.corked.append(b"0\r\n\r\n")
            else:
                upstream.transport.write(b"0\r\n\r\n")
            backend = self.backend
            assert backend is not None  # chosen by start_on
            backend.bytes_out += 5
        self.body_registered = False
        upstream.transport.unregisterProducer()
        self.request_sent = True
        if not self.responding and not self.finished:
            # The backend has request_timeout from the end of the request.
            resource = self.resource
            resource.response_deadlines.add(self, resource.request_timeout)

    def body_failed(self, reason: BodyError) -> None:
        """
        The client's body will never be whole (a bad chunk, over
        max_body_bytes, the client idle or gone): the backend connection is
        reset (not the backend's doing), and the listener answers the
        client (or cuts it, if the response has started).
        """
        spool, self.spool = self.spool, None
        if spool is not None:
            spool.close()
        if self.finished or self.client_gone:
            return
        self._cancel_timeout()
        self.finished = True
        if self.connector is not None:
            self.connector.disconnect()
            self.connector = None
        if self.upstream is not None:
            self._end_upstream(False)
        if self.responding:
            request = self.request
            if request.producer is not None:
                request.unregisterProducer()
        else:
            self.status = reason.code
        self._over()

    def _small_body(self) -> bytes:
        if not self.body_length:
            return b""
        # Twisted types Request.content as None (its class default); here it is the body's file.
        content = cast("IO[bytes]", self.request.content)
        content.seek(0, 0)
        return content.read()

    def _body_sent(self, _) -> None:
        self.sender = None
        self.request_sent = True

    def _end_upstream(self, reusable: bool) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is None:
            return
        backend = self.backend
        assert backend is not None  # chosen by start_on
        backend.active -= 1
        owed = not self.request_sent
        body = self.body
        if body is not None and owed:
            # The upload stops with the connection (an early answer, a
            # failure): the client's listener reads and drops the rest.
            if self.body_registered:
                self.body_registered = False
                upstream.transport.unregisterProducer()
            body.stopProducing()
        sender, self.sender = self.sender, None
        if sender is not None and owed:
            # The upload is abandoned with the connection: the file sender
            # stops, and no longer is the transport's producer (which would
            # ask it for more, from a spool file closed by then).
            upstream.transport.unregisterProducer()
            sender.file = None
            sender.stopProducing()
        if reusable and not owed and not self.early:
            transport = upstream.transport
            if self.small_reads:
                self.small_reads = False
                del transport.bufferSize  # the class's own again
            # Paused by the response's last write? release() resumes it: an
            # idle connection must read (the next response, or the backend's
            # close), or the next request on it waits for a 504.
            upstream.release()
        else:
            # The backend still expects request bytes (it answered early),
            # or the exchange did not end cleanly: the next request on this
            # connection could be read as part of this one.  Never reuse;
            # what the backend is still owed is dropped with a reset.
            upstream.discard(abort=owed)

    def _cancel_timeout(self) -> None:
        self.resource.response_deadlines.discard(self)

    def _timed_out(self) -> None:
        """
        No response head came in C{request_timeout}, or no body bytes in
        C{response_idle_timeout} (L{Deadlines} calls this).
        """
        if self.responding:
            self._response_idle()
            return
        body = self.body
        if body is not None and not self.request_sent and self.upstream is not None:
            # The body is still going out: the backend is late only if it
            # stopped reading it (a client that sends slowly has its own
            # client_idle_timeout).
            resource = self.resource
            timeout = resource.request_timeout
            quiet = resource.reactor.seconds() - self.body_sent_at
            if not body.paused or quiet < timeout:
                resource.response_deadlines.add(self, timeout if not body.paused else timeout - quiet)
                return
        backend = self.backend
        assert backend is not None  # chosen by start_on
        backend.record_failure("response timed out")
        log.warn(
            "listener {listener}: backend {backend} ({address}) sent no response in {timeout} s",
            listener=self.resource.listener_name, backend=backend.name, address=backend.address,
            timeout=self.resource.request_timeout,
        )
        self._end_upstream(False)
        self.fail(504, "Gateway Timeout", "the backend did not answer in time")

    # -- the response (called by UpstreamProtocol) ----------------------------

    def _response_idle(self) -> None:
        upstream = self.upstream
        if upstream is None or self.finished:
            return
        resource = self.resource
        timeout = resource.response_idle_timeout
        quiet = resource.reactor.seconds() - self.last_data
        if upstream.paused or quiet < timeout:
            # Bytes came since, or the client is the one not reading (its
            # own timeout covers that): look again later.
            resource.response_deadlines.add(self, timeout if upstream.paused else timeout - quiet)
            return
        backend = self.backend
        assert backend is not None  # chosen by start_on
        why = f"response stalled: no data for {timeout} s"
        backend.record_failure(why)
        log.warn(
            "listener {listener}: backend {backend} ({address}) sent nothing more of its response in "
            "{timeout} s: both connections closed",
            listener=resource.listener_name, backend=backend.name, address=backend.address, timeout=timeout,
        )
        self._end_upstream(False)
        self._cut_client()

    def _cut_client(self) -> None:
        """
        Part of the response reached the client and the rest never will: cut
        its connection, so that the client sees the response incomplete.
        """
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        if request.channel is not None:
            # What was sent is flushed, then the connection closes: the
            # client sees a response shorter than announced (or a chunked
            # body without its last chunk), never one that looks complete.
            transport = request.channel.transport
            assert transport is not None  # the channel is connected while it has the request
            transport.loseConnection()
        self.finished = True  # the client's loss that follows is not logged again
        self._over()

    def response_head(self, code: int, reason: bytes, headers) -> None:
        self._cancel_timeout()
        backend = self.backend
        assert backend is not None  # chosen by start_on
        backend.record_success()
        if not self.request_sent:
            # An answer before the whole request went out (a 401 or 413 to
            # an upload, say): the connection is not reused after it.
            self.early = True
        if self.client_gone:
            return
        self.responding = True
        request = self.request
        self.status = code
        request.setResponseCode(code, reason or None)
        out = request.responseHeaders
        if getattr(request, "adds_default_headers", True):
            # twisted.web's Site.process set these; the backend's own (or
            # none) replace them.
            out.removeHeader(b"server")
            out.removeHeader(b"date")
            request.defaultContentType = None
        drop = _response_hop_by_hop(headers)
        if type(out) is FastHeaders:
            out.add_pairs(headers, drop)
        else:
            for name, value in headers:
                if name.lower() not in drop:
                    out.addRawHeader(name, value)
        backend_header = self.resource.backend_header
        if backend_header is not None:
            out.setRawHeaders(backend_header, [backend.name.encode("utf-8")])
        session = self.session
        if session.policy is not None:
            session.policy.remember(session, backend)
        upstream = self.upstream
        if upstream is not None and upstream.body_follows:
            # The exchange, not the backend connection, is the client
            # connection's producer: a cut on the client's side reaches it
            # first (see pauseProducing, stopProducing).
            request.registerProducer(self, True)
            resource = self.resource
            self.last_data = resource.reactor.seconds()
            resource.response_deadlines.add(self, resource.response_idle_timeout)

    # -- IPushProducer, for the client's connection ------------------------------

    def pauseProducing(self) -> None:
        """
        The client is not reading: stop reading from the backend.  Reads from
        this backend connection are small again (until the client has taken
        C{_GROW_AFTER} bytes without stalling), so that what a client that
        reads slowly makes this process hold stays small (each read lands in
        the client's buffer whole).
        """
        upstream = self.upstream
        if upstream is not None:
            # Through the backend connection's own pauseProducing: the
            # response idle timeout then knows the client is the one
            # waiting, and the pool resumes it when it goes back idle.
            upstream.pauseProducing()
            upstream.transport.bufferSize = _STALLED_READ
            self.small_reads = True
            self.unstalled = 0

    def resumeProducing(self) -> None:
        if self.upstream is not None:
            self.upstream.resumeProducing()

    def stopProducing(self) -> None:
        """The client's connection is closing, whoever closed it: never the backend's doing."""
        self._client_lost(None)

    def response_switch(self, code: int, reason: bytes, headers) -> None:
        """The backend accepted the upgrade (101): tunnel both connections."""
        self._cancel_timeout()
        backend = self.backend
        assert backend is not None  # chosen by start_on
        backend.record_success()
        if self.client_gone:
            return
        self.responding = True
        # Only the listeners' FrontRequest can switch protocols (see render).
        request = cast("FrontRequest", self.request)
        self.status = code
        request.setResponseCode(code, reason or None)
        out = request.responseHeaders
        drop = HOP_BY_HOP - {b"upgrade"}
        for name, value in headers:
            lower = name.lower()
            if lower not in drop:
                out.addRawHeader(name, value)
        out.setRawHeaders(b"connection", [b"Upgrade"])
        session = self.session
        if session.policy is not None:
            session.policy.remember(session, backend)
        upstream = self.upstream
        assert upstream is not None  # the connection that answered 101
        request.switch_protocols(upstream.transport)

    def tunnel_data(self, data: bytes) -> None:
        if self.client_gone:
            return
        self.bytes_sent += len(data)
        cast("FrontRequest", self.request).tunnel_write(data)

    def tunnel_closed(self, reason) -> None:
        """The backend ended the tunnel: the client's connection ends too."""
        upstream, self.upstream = self.upstream, None
        backend = self.backend
        assert backend is not None  # chosen by start_on
        if upstream is not None:
            backend.active -= 1
        if self.client_gone or self.finished:
            return
        self.finished = True
        backend.bytes_in += self.bytes_sent
        self._over()
        cast("FrontRequest", self.request).tunnel_closed()

    def response_data(self, data: bytes) -> None:
        if self.client_gone:
            return
        self.last_data = self.resource.reactor.seconds()
        self.bytes_sent += len(data)
        self.unstalled += len(data)
        self.request.write(data)  # may stall: unstalled is 0 again
        if self.small_reads and self.unstalled >= _GROW_AFTER and self.upstream is not None:
            self.small_reads = False
            del self.upstream.transport.bufferSize  # the client reads: large reads again

    def response_end(self) -> None:
        self._cancel_timeout()
        if self.client_gone:
            self._end_upstream(False)
            return
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        backend = self.backend
        assert backend is not None  # chosen by start_on
        backend.bytes_in += self.bytes_sent
        self._end_upstream(True)
        self.finish()

    def _ended_by_us(self, reason) -> bool:
        """
        Passive health's one rule: a backend connection that fails counts
        against the backend only if this side did not end it.  This side
        ended it when the client's side of the exchange is over, however
        (the client closed or reset its connection, was cut for not reading
        within C{client_idle_timeout}, by a limit, or by the grace period of
        a shutdown: all of those reach L{_client_lost}), or when this
        process aborted the backend connection itself (the pool closing at
        shutdown: L{error.ConnectionAborted} is only ever raised by a local
        C{abortConnection}).  What is left is what the backend did: refused,
        reset, closed early, timed out, or answered garbage.
        """
        return self.client_gone or (hasattr(reason, "check") and reason.check(error.ConnectionAborted) is not None)

    def response_failed(self, reason, received: bool) -> None:
        self._cancel_timeout()
        backend = self.backend
        assert backend is not None  # chosen by start_on
        self._end_upstream(False)
        why = reason.getErrorMessage() if hasattr(reason, "getErrorMessage") else str(reason)
        if self._ended_by_us(reason):
            log.info(
                "listener {listener}: connection to backend {backend} ({address}) ended by this side: {why}"
                " (not counted against the backend)",
                listener=self.resource.listener_name, backend=backend.name, address=backend.address, why=why,
            )
            if not self.client_gone and not self.finished:
                # The balancer cut the backend while the client waits (the
                # pool closing at shutdown): the client's connection ends too.
                if self.responding:
                    request = self.request
                    if request.producer is not None:
                        request.unregisterProducer()
                    channel = getattr(request, "channel", None)
                    if channel is not None:
                        channel.transport.loseConnection()
                    self.finished = True
                    self._over()
                else:
                    self.fail(503, "Service Unavailable", "the balancer closed its backend connections")
            return
        if self.reused and not received and self.retryable:
            # An idle kept-alive connection the backend closed (its keep-alive
            # timeout) just as this request went out: a race, not a failure of
            # the backend.  The same backend again, on a new connection
            # (HAProxy and browsers do the same), so that a pinned client stays
            # where it is, even with on_failure = "strict".
            log.info(
                "listener {listener}: idle connection to backend {backend} ({address}) closed as it was "
                "reused ({why}); sending again on a new connection",
                listener=self.resource.listener_name, backend=backend.name, address=backend.address, why=why,
            )
            self.tried.remove(backend)
            self.first = True  # a new connection, never another idle one
            self.start_on(backend)
            return
        backend.record_failure(why)
        if self.responding:
            # Part of the response reached the client: all we can do is cut the
            # connection so that the client sees it incomplete.
            log.warn(
                "listener {listener}: backend {backend} ({address}) failed mid-response: {why}",
                listener=self.resource.listener_name, backend=backend.name, address=backend.address, why=why,
            )
            self._cut_client()
            return
        log.warn(
            "listener {listener}: backend {backend} ({address}) failed before answering: {why}",
            listener=self.resource.listener_name, backend=backend.name, address=backend.address, why=why,
        )
        if not received and self.retryable:
            self.start()
        else:
            self.fail(502, "Bad Gateway", "the backend failed to answer")

    # -- ending ---------------------------------------------------------------

    def fail(self, code: int, reason: str, text: str) -> None:
        if self.client_gone or self.finished:
            return
        request = self.request
        self.status = code
        request.setResponseCode(code, reason.encode("ascii"))
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
        request.responseHeaders.removeHeader(b"server")
        body = f"{code} {reason}: {text}\n".encode("utf-8")
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        self.bytes_sent = len(body)
        request.write(body)
        self.finish()

    def refuse_pinned(self) -> None:
        """
        Strict persistence: the client's backend is down or refused, and the
        client is not moved.  503 with C{Retry-After}; the body does not name
        the backend; the pin (cookie, table entry) is left as it was.
        """
        session = self.session
        backend = self.resource.group.get(session.pinned_key or "") or self.backend
        log.info(
            "listener {listener}: client {client} is pinned to backend {backend}, which is down or refused; "
            "503 (on_failure = strict)",
            listener=self.resource.listener_name, client=session.client_ip,
            backend=backend.name if backend is not None else session.pinned_key,
        )
        retry_after = getattr(session.policy, "retry_after", 5)
        self.request.responseHeaders.setRawHeaders(b"retry-after", [b"%d" % (retry_after,)])
        self.fail(503, "Service Unavailable", "the server holding this session is not available; retry later")

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.request.finish()
        self._over()

    def _client_lost(self, reason) -> None:
        if self.client_gone:
            return  # told twice: as the producer, and by the request
        self.client_gone = True
        self._cancel_timeout()
        if self.connector is not None:
            self.connector.disconnect()
            self.connector = None
        if self.upstream is not None:
            self._end_upstream(False)
        if not self.finished:
            self.finished = True
            self._over(client_gone=True)

    def _over(self, client_gone: bool = False) -> None:
        """
        The exchange is over: log it, and drop the request's references to
        the exchange and its session.  Those are the per-request reference
        cycles (request, session, exchange); without them reference
        counting frees a request at once instead of the garbage collector
        later.
        """
        self.log_access(client_gone)
        request = self.request
        # Attributes this package sets on any request (setattr: Request does not declare them).
        if getattr(request, "slb_exchange", None) is self:
            setattr(request, "slb_exchange", None)
        if getattr(request, "slb_session", None) is self.session:
            setattr(request, "slb_session", None)

    def log_access(self, client_gone: bool = False) -> None:
        backend = self.backend
        resource = self.resource
        if resource.access_log:
            self._log_line(backend, client_gone)
        stats = resource.stats
        if stats is not None:
            body = getattr(self.request, "body", None)
            stats.request_done(backend, 0 if client_gone else self.status, self.session.outcome, self.bytes_sent,
                               body.received if body is not None else self.body_length)

    def _log_line(self, backend, client_gone: bool) -> None:
        request = self.request
        session = self.session
        resource = self.resource
        now = resource.reactor.seconds()
        host = request.getHeader(b"host") or b"-"
        access_file = resource.access_file
        fields = None
        if getattr(access_file, "batch_format", False):  # (an embedder's file may have only write_line)
            # The line's fields (accesslog.HTTP_FORMAT), formatted by the
            # access log with its batch: a tuple per request, no format.
            try:
                fields = (resource.listener_name.encode("utf-8", "replace"),
                          session.client_ip.encode("utf-8", "replace"),
                          host, request.method, request.uri, request.clientproto, self.status,
                          backend.name.encode("utf-8", "replace") if backend else b"-",
                          session.outcome.encode("utf-8", "replace"), self.bytes_sent, now - self.started,
                          b" (client closed)" if client_gone else b"")
            except AttributeError:
                pass  # a name that is not text (set by a policy of an embedder's): the text shows it as it is
        if fields is not None:
            if access_file.write_http(now, fields):
                return
            line = http_line(fields)
        else:
            line = http_text(resource.listener_name, session.client_ip, host, request.method, request.uri,
                             request.clientproto, self.status, backend.name if backend else "-", session.outcome,
                             self.bytes_sent, now - self.started, " (client closed)" if client_gone else "")
        if access_file is None or not access_file.write_line(line):
            # A log event also keeps every field for observers.
            access.info("{line}", line=line, listener=resource.listener_name, client=session.client_ip,
                        host=host.decode("latin-1"), method=request.method.decode("latin-1"),
                        path=request.uri.decode("latin-1"), protocol=request.clientproto.decode("latin-1"),
                        status=self.status, backend=backend.name if backend else "-", outcome=session.outcome,
                        bytes=self.bytes_sent, duration=now - self.started,
                        gone=" (client closed)" if client_gone else "")


class BalancedProxyResource(Resource):
    """
    A twisted.web resource that proxies every request to a backend of a
    L{BackendGroup}.

    It can be mounted anywhere in a resource tree (the request URI is
    forwarded as received) and put behind a persistence wrapper
    (L{twisted_slb.persistence.cookies.InsertCookie},
    L{twisted_slb.persistence.cookies.RewriteCookie},
    L{twisted_slb.persistence.resource.PersistenceResource}).

    @ivar group: the backends.
    @ivar pool: the L{UpstreamPool} of keep-alive backend connections.
    @ivar request_timeout: seconds a backend has to start answering.
    @ivar response_idle_timeout: seconds a backend may send nothing while a
        response body is due (the client not reading does not count): the
        backend connection is then closed, and the client's cut.
    @ivar tls: a L{twisted_slb.tls.ClientTLSCache}-like object with
        C{options_for(group, tls, host)}, for groups with TLS to backends.
    @ivar stats: an object with C{request_done(backend, status, outcome,
        bytes_sent, bytes_received)} (a L{twisted_slb.stats.ListenerStats}),
        or L{None}.
    @ivar backend_header: the name of a response header that names the
        backend which answered (C{b"X-Backend"}), or L{None}.
    @ivar access_log: whether to log one line per request.
    @ivar access_file: a L{twisted_slb.accesslog.AccessLogFile} or
        L{twisted_slb.accesslog.TwistdLog} the lines go to (when its C{write_line}
        returns C{False}, or with L{None}: log events in the C{twisted_slb.access} namespace).
        One whose C{batch_format} is true is given each line's fields instead
        (C{write_http}), formatted with their batch; any object with
        C{write_line} will do.
    @ivar request_buffering: whether a streamed request body is read whole
        (spooled) before the request goes to a backend, for backends that
        need whole bodies (nginx's C{proxy_request_buffering}); otherwise it
        streams.
    """

    isLeaf = True

    def __init__(
        self,
        group: BackendGroup,
        reactor=None,
        pool: Optional[UpstreamPool] = None,
        request_timeout: float = 60.0,
        listener_name: str = "http",
        forwarded_proto: Optional[str] = None,
        tls=None,
        stats=None,
        access_log: bool = True,
        access_file=None,
        response_idle_timeout: float = 60.0,
        backend_header: Optional[bytes] = None,
        request_buffering: bool = False,
    ) -> None:
        Resource.__init__(self)
        reactor = maybe_global_reactor(reactor)
        self.group = group
        self.reactor = reactor
        self.pool = pool if pool is not None else UpstreamPool(reactor)
        self.request_timeout = request_timeout
        self.response_idle_timeout = response_idle_timeout
        self.listener_name = listener_name
        self.forwarded_proto = forwarded_proto
        self.tls = tls
        self.stats = stats
        self.access_log = access_log
        self.access_file = access_file
        self.backend_header = backend_header or None
        self.request_buffering = request_buffering
        # Each request's response timeout; one timer for them all.
        # Only exchanges are added to it.
        self.response_deadlines = Deadlines(reactor, cast("Callable[[Hashable], None]", _Exchange._timed_out))

    def connection_shape(self):
        """
        What, beyond the address, shapes this group's backend connections:
        the pool shares a connection only between requests with equal
        shapes.  The group's whole C{tls} setting (verification, CA file,
        server name, and whatever it grows, such as a client certificate),
        and the PROXY protocol header sent first (the HTTP proxy sends none).
        """
        return (self.group.tls, None)

    def tls_options_for(self, backend: Backend):
        group = self.group
        if group.tls is None:
            return None
        if self.tls is None:
            from twisted_slb.tls import ClientTLSCache

            self.tls = ClientTLSCache()
        return self.tls.options_for(group.name, group.tls, backend.host)

    def render(self, request: Request):
        problem = _request_problem(request)
        if problem is not None:
            request.setResponseCode(400, b"Bad Request")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            _close_after(request)  # as for any malformed request
            request.responseHeaders.removeHeader(b"server")
            log.info("listener {listener}: 400 for {client}: {problem}",
                     listener=self.listener_name, client=request.getClientAddress(), problem=problem)
            return f"400 Bad Request: {problem}\n".encode("utf-8")
        upgrade = request.getHeader(b"upgrade")
        if upgrade is not None and b"upgrade" in _connection_tokens(request.requestHeaders):
            if getattr(request, "can_switch_protocols", False) and request.clientproto == b"HTTP/1.1":
                # The listeners' server can hand the connection over (WebSocket).
                _Exchange(self, request, upgrade=upgrade).start()
                return NOT_DONE_YET
            request.setResponseCode(501, b"Not Implemented")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            # What follows on this connection may be the other protocol's.
            _close_after(request)
            request.responseHeaders.removeHeader(b"server")
            log.info(
                "listener {listener}: refused Upgrade: {upgrade} from {client}",
                listener=self.listener_name, upgrade=upgrade, client=request.getClientAddress(),
            )
            return b"501 Not Implemented: protocol upgrades are not supported by this balancer\n"
        _Exchange(self, request).start()
        return NOT_DONE_YET
