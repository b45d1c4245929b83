"""
The upstream side of the HTTP proxy: a lean HTTP/1.1 client protocol and a
keep-alive connection pool per backend.

Twisted's L{twisted.web.client.Agent} is general and correct, but its
per-request Deferred chains and header objects cost more than a proxy can
afford (a naive Agent proxy reaches a quarter of what twisted.web serves),
and it hides the connection, which the proxy needs for back-pressure.  This
client does only what a reverse proxy needs: send one request at a time on a
connection, parse the response head, and hand body bytes over as they come,
with the framing (Content-Length, chunked, or until close) decoded.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Protocol as TypingProtocol, Tuple

from twisted.internet import error
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_slb._io import lean, leantls
from twisted_slb._io.headers import cached_name, canonical_name
from twisted_slb._io.sockets import set_nodelay, write_now
from twisted_slb._reactor import maybe_global_reactor
from twisted_slb._typing import IStreamTransport
from twisted_slb.shutdown import IdleTracker

log = Logger(namespace="twisted_slb.upstream")

#: Most bytes a response head (status line and headers) may take.
MAX_HEAD = 65536


class UpstreamError(Exception):
    """The backend broke the protocol (an invalid response)."""


class IResponseHandler(TypingProtocol):
    """
    What an L{UpstreamProtocol} tells about the response to its request
    (a typing protocol: any object with these methods will do).
    """

    def response_head(self, code: int, reason: bytes, headers: List[Tuple[bytes, bytes]]) -> None:
        """The status line and headers (1xx responses are skipped)."""

    def response_data(self, data: bytes) -> None:
        """Body bytes, framing removed."""

    def response_end(self) -> None:
        """The response is complete."""

    def response_failed(self, reason, received: bool) -> None:
        """
        The connection failed; C{received} says whether any byte of the
        response had arrived.
        """

    def response_switch(self, code: int, reason: bytes, headers: List[Tuple[bytes, bytes]]) -> None:
        """
        A 101 answered a request sent with C{upgrade=True}: from now on the
        connection is a tunnel (L{tunnel_data}, L{tunnel_closed}).
        """

    def tunnel_data(self, data: bytes) -> None:
        """Bytes from the backend after a 101, as they are."""

    def tunnel_closed(self, reason) -> None:
        """The backend closed the tunnel."""


# The fields that frame the message or the connection.
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))

# Parser states.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _IDLE, _TUNNEL = range(9)


class UpstreamProtocol(Protocol):
    """
    One keep-alive HTTP/1.1 connection to a backend.

    It is also the push producer of the response body it reads (see
    L{pauseProducing}): the proxy registers it with the client's request, so
    that it knows whether the client is holding the backend back.

    @ivar handler: the handler of the request in flight, or L{None} when idle.
    @ivar reusable: whether the connection may carry another request.  Any
    irregularity clears it for good (bytes after a response, an answer that
    came before the request was sent whole, a timeout, a response cut short):
    the connection is then closed instead of going back to the pool.
    @ivar paused: whether the client's back-pressure paused reading.
    """

    # Connected before any method below runs (see twisted_slb._typing).
    transport: IStreamTransport

    handler: Optional[IResponseHandler] = None
    pool: Optional[UpstreamPool] = None
    #: the pool's key of its connections (set with C{pool})
    key: Optional[tuple] = None
    idle_since = 0.0
    paused = False

    def __init__(self) -> None:
        self.buffer = b""
        self.state = _IDLE
        self.remaining = 0
        self.reusable = True
        self.received = False
        self.head_request = False
        self.upgrade = False
        self.connected = False

    def connectionMade(self) -> None:
        self.connected = True
        set_nodelay(self.transport)

    @property
    def body_follows(self) -> bool:
        """Whether the response whose head just arrived still has a body to come."""
        return self.state != _IDLE

    def send(self, head: bytes, handler: IResponseHandler, head_request: bool = False, upgrade: bool = False) -> None:
        """
        Send a request head (request line and headers, ending with the blank
        line); the caller writes the body, if any, to C{self.transport}.

        @param upgrade: the request asks for a protocol upgrade: a 101
            answer turns the connection into a tunnel (see
            L{IResponseHandler.response_switch}); it is never reused.
        """
        self.handler = handler
        self.state = _HEAD
        self.received = False
        self.head_request = head_request
        self.upgrade = upgrade
        if upgrade:
            self.reusable = False
        write_now(self.transport, head)

    def dataReceived(self, data: bytes) -> None:
        if self.handler is None:
            # Bytes from a backend on an idle connection: it is confused;
            # never reuse this connection.
            self.reusable = False
            self.transport.loseConnection()
            return
        self.received = True
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        try:
            self._parse(data)
        except UpstreamError as e:
            self.reusable = False
            handler, self.handler = self.handler, None
            self.transport.loseConnection()
            if handler is not None:
                handler.response_failed(e, True)

    def _parse(self, data: bytes) -> None:
        while data and self.handler is not None:
            state = self.state
            if state == _TUNNEL:
                self.handler.tunnel_data(data)
                return
            if state == _LENGTH:
                n = self.remaining
                if len(data) < n:
                    self.remaining = n - len(data)
                    self.handler.response_data(data)
                    return
                chunk, data = data[:n], data[n:]
                self.remaining = 0
                if chunk:
                    self.handler.response_data(chunk)
                self._done(data)
            elif state == _UNTIL_CLOSE:
                self.handler.response_data(data)
                return
            elif state == _HEAD:
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    if len(data) > MAX_HEAD:
                        raise UpstreamError("response head too large")
                    self.buffer = data
                    return
                head, data = data[:end], data[end + 4:]
                self._head(head, data)
            elif state == _CHUNK_SIZE:
                end = data.find(b"\r\n")
                if end < 0:
                    if len(data) > 4096:
                        raise UpstreamError("chunk size line too long")
                    self.buffer = data
                    return
                line, data = data[:end], data[end + 2:]
                size = line.split(b";", 1)[0].strip()
                try:
                    n = int(size, 16)
                except ValueError:
                    raise UpstreamError(f"invalid chunk size {size[:20]!r}") from None
                if n < 0 or not size or size.startswith((b"-", b"+", b"0x", b"0X")):
                    raise UpstreamError(f"invalid chunk size {size[:20]!r}")
                if n == 0:
                    self.state = _TRAILERS
                else:
                    self.remaining = n
                    self.state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                n = self.remaining
                if len(data) <= n:
                    self.remaining = n - len(data)
                    self.handler.response_data(data)
                    if self.remaining == 0:
                        self.state = _CHUNK_END
                    return
                self.handler.response_data(data[:n])
                data = data[n:]
                self.remaining = 0
                self.state = _CHUNK_END
            elif state == _CHUNK_END:
                if len(data) < 2:
                    self.buffer = data
                    return
                if data[:2] != b"\r\n":
                    raise UpstreamError("missing CRLF after a chunk")
                data = data[2:]
                self.state = _CHUNK_SIZE
            elif state == _TRAILERS:
                # Trailer fields are dropped (we re-chunk without trailers).
                end = data.find(b"\r\n")
                if end < 0:
                    if len(data) > MAX_HEAD:
                        raise UpstreamError("trailers too large")
                    self.buffer = data
                    return
                line, data = data[:end], data[end + 2:]
                if not line:
                    self._done(data)
            else:  # _IDLE with bytes left over: the backend sent too much
                raise UpstreamError("data after the end of the response")
        if data and self.handler is None and self.state == _IDLE:
            # Extra bytes after a complete response: never reuse.
            self.reusable = False
            self.transport.loseConnection()

    def _head(self, head: bytes, rest: bytes) -> None:
        status_end = head.find(b"\r\n")
        if status_end < 0:
            status_end = len(head)
        status = head[:status_end].split(b" ", 2)
        if len(status) < 2 or not status[0].startswith(b"HTTP/1.") or len(status[1]) != 3 or not status[1].isdigit():
            raise UpstreamError(f"invalid status line {head[:min(status_end, 80)]!r}")
        version = status[0]
        code = int(status[1])
        reason = status[2] if len(status) > 2 else b""
        headers: List[Tuple[bytes, bytes]] = []
        length = None
        chunked = False
        close = version == b"HTTP/1.0"
        for line in head[status_end + 2:].split(b"\r\n") if status_end < len(head) else ():
            name, sep, value = line.partition(b":")
            # A token, checked once per distinct name (a bounded cache).
            names = cached_name(name)
            if names is None:
                try:
                    names = canonical_name(name)
                except ValueError:
                    names = None
            if names is None or not sep:
                raise UpstreamError(f"invalid header line {line[:80]!r}")
            lower = names[0]
            value = value.strip()
            headers.append((name, value))
            if lower not in _FRAMING:
                continue
            if lower == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise UpstreamError(f"invalid Content-Length {value[:20]!r}")
                length = int(value)
            elif lower == b"transfer-encoding":
                codings = [c.strip().lower() for c in value.split(b",")]
                if codings[-1] != b"chunked":
                    # Not chunked last: the body runs until close.
                    close = True
                else:
                    chunked = True
            elif lower == b"connection":
                tokens = value.lower().replace(b" ", b"").replace(b"\t", b"").split(b",")
                if b"close" in tokens:
                    close = True
                elif b"keep-alive" in tokens and version == b"HTTP/1.0":
                    close = False
        handler = self.handler
        # _parse calls this only while a request is in flight.
        assert handler is not None
        if 100 <= code < 200:
            if code == 101:
                if not self.upgrade:
                    raise UpstreamError("101 Switching Protocols to a request that did not ask to upgrade")
                self.state = _TUNNEL
                self.reusable = False
                handler.response_switch(code, reason, headers)
                return
            # Interim response (100 Continue, 103 Early Hints): skip it.
            return
        if close:
            self.reusable = False
        if self.head_request or code in (204, 304):
            handler.response_head(code, reason, headers)
            self._done(rest)
        elif chunked:
            if length is not None:
                # RFC 9112 6.3: Transfer-Encoding overrides Content-Length,
                # and such a message must not be reused.
                self.reusable = False
                headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
            self.state = _CHUNK_SIZE
            handler.response_head(code, reason, headers)
        elif length is not None:
            self.remaining = length
            self.state = _LENGTH
            handler.response_head(code, reason, headers)
            if length == 0:
                self._done(rest)
        else:
            self.state = _UNTIL_CLOSE
            self.reusable = False
            handler.response_head(code, reason, headers)

    def _done(self, rest: bytes) -> None:
        """
        The response is complete; C{rest} is what the backend sent after it.
        Anything there is a desync (a second response nobody asked for, or a
        body after a bodiless response): the connection must not be reused,
        and it must be known before the handler hears of the end, since the
        handler may at once give the connection back and take it again for
        the client's next request.
        """
        self.state = _IDLE
        if rest:
            self.reusable = False
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.response_end()

    def release(self) -> None:
        """The response was consumed: give the connection back to the pool."""
        if self.pool is not None and self.reusable and self.connected and self.handler is None:
            if self.paused:
                # An idle connection keeps reading: any byte that arrives
                # on it closes it (see dataReceived).
                self.paused = False
                self.transport.resumeProducing()
            self.pool.put(self)
        else:
            self.reusable = False
            self.transport.loseConnection()

    def discard(self, abort: bool = False) -> None:
        """
        Never reuse this connection: close it, at once (dropping what is
        buffered, the peer gets a reset) when C{abort}.
        """
        self.reusable = False
        self.handler = None
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    # -- IPushProducer, for the client's back-pressure on the response body --

    def pauseProducing(self) -> None:
        self.paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.reusable = False
        self.transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        if self.pool is not None:
            self.pool.forget(self)
        handler, self.handler = self.handler, None
        if handler is None:
            return
        if self.state == _TUNNEL:
            handler.tunnel_closed(reason)
        elif self.state == _UNTIL_CLOSE and reason.check(error.ConnectionDone):
            handler.response_end()
        else:
            handler.response_failed(reason, self.received)


class _Connector(ClientFactory):
    noisy = False

    def __init__(self, pool: UpstreamPool, key, ready, failed) -> None:
        self.pool = pool
        self.key = key
        self.ready = ready
        self.failed = failed

    def buildProtocol(self, addr):
        proto = _ReadyProtocol()
        proto.factory = self
        proto.pool = self.pool
        proto.key = self.key
        self.pool.all.add(proto)
        return proto

    def clientConnectionFailed(self, connector, reason) -> None:
        self.failed(reason)


class UpstreamPool:
    """
    Keep-alive connections to backends, reused most-recently-idle first.

    @ivar max_idle: idle connections kept per backend.  An HTTP/2 client
        connection carries up to C{max_concurrent_streams} requests at once,
        and they end in bursts: with 64 (the old default) an h2load run of
        50 connections with 10 streams each closed and reopened a backend
        connection for three requests in four.
    @ivar idle_timeout: seconds an idle connection is kept.
    @ivar lean: whether backend connections use L{twisted_slb._io.lean}'s
        transports where the reactor can drive them, and TLS ones
        L{twisted_slb._io.leantls}'s (unless C{TWISTED_SLB_LEAN_TLS=0});
        otherwise C{connectTCP}'s and C{connectSSL}'s.
    @ivar tls_sessions: the TLS session of a recent connection of each key,
        resumed by the next (a shorter handshake, no certificate to send).
    """

    lean = True

    def __init__(self, reactor=None, max_idle: int = 512, idle_timeout: float = 30.0) -> None:
        reactor = maybe_global_reactor(reactor)
        self.reactor = reactor
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: Dict[tuple, List[UpstreamProtocol]] = {}
        self.all: set = set()
        self.tls_sessions: Dict[tuple, object] = {}
        self._closed = IdleTracker()
        # One timer for the whole pool closes connections idle for longer
        # than idle_timeout (a timer per connection would be set and
        # cancelled on every request).
        self._sweeper = None

    def get(self, backend, connect_timeout: float, ready, failed, tls_options=None, reuse: bool = True,
            shape=None):
        """
        An idle connection to C{backend}, or a new one.

        Connections are pooled by everything that shapes them: the backend's
        address, whether it is TLS, and C{shape}, which the caller sets to
        the settings behind C{tls_options} (verification, trusted CAs, the
        server name, a client certificate) and whether a PROXY protocol
        header is sent.  A request never goes on a connection made with
        other settings than its own (one group's unverified connection for
        another group that verifies, say).

        C{ready(protocol, reused)} is called with the connection (at once for
        a reused one); C{failed(reason)} if connecting fails.

        @param reuse: whether an idle connection may be used.  A request that
            cannot be sent again must not go on one: the backend may close an
            idle connection just as the request is written, and then nobody
            knows whether it was processed.  Nor may the first request of a
            client connection (see L{twisted_slb.web.proxy}).
        @param shape: a hashable value: connections are only shared between
            requests with equal ones.
        @return: the connector of a new connection (to cancel it), or L{None}.
        """
        key = (backend.host, backend.port, tls_options is not None, shape)
        idle = self.idle.get(key) if reuse else None
        while idle:
            proto = idle.pop()
            if proto.connected and proto.reusable:
                ready(proto, True)
                return None

        factory = _Connector(self, key, ready, failed)
        if tls_options is not None:
            # The lean TLS client where it can run (see
            # twisted_slb._io.leantls.connect, which falls back on
            # connectSSL): the protocol is connected once the backend's
            # certificate passed, and TLS sessions are resumed per key.
            if self.lean and callable(getattr(tls_options, "context", None)):
                return leantls.connect(self.reactor, backend.host, backend.port, factory, tls_options,
                                       connect_timeout, self.tls_sessions, key)
            return self.reactor.connectSSL(backend.host, backend.port, factory, tls_options, timeout=connect_timeout)
        # A lean transport where the reactor can drive one (see
        # twisted_slb._io.lean): fewer calls per read and write than
        # connectTCP's, and, on PyPy, no 64 KB allocation per read.
        if self.lean:
            return lean.connect(self.reactor, backend.host, backend.port, factory, connect_timeout)
        return self.reactor.connectTCP(backend.host, backend.port, factory, timeout=connect_timeout)

    def put(self, proto: UpstreamProtocol) -> None:
        # A connection of the pool: its _Connector gave it its key.
        assert proto.key is not None
        idle = self.idle.setdefault(proto.key, [])
        if len(idle) >= self.max_idle:
            proto.transport.loseConnection()
            return
        proto.idle_since = self.reactor.seconds()
        idle.append(proto)
        if self._sweeper is None:
            self._sweeper = self.reactor.callLater(self.idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for C{idle_timeout}; come back for the rest."""
        self._sweeper = None
        now = self.reactor.seconds()
        oldest = None
        for idle in list(self.idle.values()):
            # Each list is in the order connections became idle.
            while idle and now - idle[0].idle_since >= self.idle_timeout:
                proto = idle.pop(0)
                proto.reusable = False
                proto.transport.loseConnection()
            if idle and (oldest is None or idle[0].idle_since < oldest):
                oldest = idle[0].idle_since
        if oldest is not None:
            self._sweeper = self.reactor.callLater(oldest + self.idle_timeout - now, self._sweep)

    def forget(self, proto: UpstreamProtocol) -> None:
        """A connection closed: it is no longer idle nor open."""
        self.all.discard(proto)
        # A connection of the pool: its _Connector gave it its key.
        assert proto.key is not None
        idle = self.idle.get(proto.key)
        if idle and proto in idle:
            idle.remove(proto)
        if not self.all:
            self._closed.idle()

    def close(self) -> Deferred:
        """
        Close every connection (idle and busy) at once.

        @return: a L{Deferred} that fires when they are all closed.
        """
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        for proto in list(self.all):
            proto.reusable = False
            proto.transport.abortConnection()
        self.idle.clear()
        return self._closed.wait(not self.all, 0, lambda: None, self.reactor)


class _ReadyProtocol(UpstreamProtocol):
    """A new pooled connection: tells its requester (its factory's C{ready}) once connected."""

    def connectionMade(self) -> None:
        UpstreamProtocol.connectionMade(self)
        ready = self.factory.ready
        # The connector's callbacks are the requesting exchange's: a pooled
        # connection outlives it, and must not keep it (its request, its
        # client's connection and what that still buffers) alive.
        self.factory.ready = self.factory.failed = None
        if ready is not None:
            ready(self, False)
