"""
L{BalancerSite}: the twisted.web L{Site} of an embedded twisted_slb HTTP
proxy, with the listeners' limits (414 and 431 for oversized heads, 408
for a head trickling in, a closed idle keep-alive client, C{max_connections}
and C{max_connections_per_ip}) and a graceful drain.

C{twistd slb}'s own listeners run L{twisted_slb.web.front.HTTPFrontFactory}
instead; both render the same resources (L{twisted_slb.web.proxy}).
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Site
from zope.interface import implementer

from twisted_slb._io.sockets import set_nodelay
from twisted_slb._reactor import maybe_global_reactor
from twisted_slb._typing import IStreamTransport
from twisted_slb.limits import (
    ClientAddressLimit,
    ConnectionAdmission,
    ConnectionLimit,
    IListenerFactory,
    TooManyConnections,
)

__all__ = ["BalancerSite"]

log = Logger(namespace="twisted_slb.proxy")


class _BalancerChannel(HTTPChannel):
    """
    An L{HTTPChannel} that answers oversized requests with the right status:
    414 for a request line over the limit, 431 for header lines or a header
    block over it (twisted.web answers 400, or closes silently).
    """

    # Connected before any method below runs (see twisted_slb._typing).
    transport: IStreamTransport
    # Set by Site.buildProtocol before the channel is connected.
    site: BalancerSite

    def lineLengthExceeded(self, line):
        # _receivedHeaderSize is documented in HTTPChannel's ivars; it is 0
        # until the request line has been received (guarded with
        # twisted_slb._io.twisted_private.HTTP_CHANNEL_PRIVATE).
        first = self._receivedHeaderSize == 0
        self._too_large(414 if first else 431, b"URI Too Long" if first else b"Request Header Fields Too Large")

    def lineReceived(self, line):
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            first = self._receivedHeaderSize == 0
            self._too_large(414 if first else 431, b"URI Too Long" if first else b"Request Header Fields Too Large")
            return
        if self._receivedHeaderCount >= self.maxHeaders and line:
            self._too_large(431, b"Request Header Fields Too Large")
            return
        if self._receivedHeaderSize == 0 and line and self.header_deadline is None and self.site.timeOut:
            # The idle timeout restarts with every byte, so a client that
            # trickles its headers (slowloris) would never be timed out: the
            # whole head must arrive within one timeout of its first line.
            self.header_deadline = self.callLater(self.site.timeOut, self._headers_too_slow)
        return HTTPChannel.lineReceived(self, line)

    def allHeadersReceived(self) -> None:
        self._cancel_header_deadline()
        HTTPChannel.allHeadersReceived(self)

    def _cancel_header_deadline(self) -> None:
        if self.header_deadline is not None and self.header_deadline.active():
            self.header_deadline.cancel()
        self.header_deadline = None

    def _headers_too_slow(self) -> None:
        self.header_deadline = None
        self._too_large(408, b"Request Timeout")

    client_ip = None
    header_deadline = None
    stalled = None  # the timer of a client that stopped reading
    #: a request head was refused (L{_too_large}): what follows is not read
    refused = False

    def dataReceived(self, data: bytes) -> None:
        if not self.refused:
            HTTPChannel.dataReceived(self, data)

    def pauseProducing(self) -> None:
        # The client stopped reading (our send buffer is full).  twisted.web
        # suspends the idle timeout while a request is being answered, so a
        # client that never reads would hold the connection (and the paused
        # backend connection) for as long as the backend keeps it: give it
        # one idle timeout to read again.
        HTTPChannel.pauseProducing(self)
        # The site's timeout: the channel's own is set to None during a request.
        timeout = self.site.timeOut
        if self.stalled is None and timeout:
            self.stalled = self.callLater(timeout, self._stopped_reading)

    def resumeProducing(self) -> None:
        self._cancel_stalled()
        HTTPChannel.resumeProducing(self)

    def _cancel_stalled(self) -> None:
        if self.stalled is not None and self.stalled.active():
            self.stalled.cancel()
        self.stalled = None

    def _stopped_reading(self) -> None:
        self.stalled = None
        log.info("client {client} read nothing for {timeout} s: closing its connection",
                 client=self.transport.getPeer(), timeout=self.site.timeOut)
        self.transport.abortConnection()

    def connectionMade(self) -> None:
        HTTPChannel.connectionMade(self)
        set_nodelay(self.transport)
        self.site.admission.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_header_deadline()
        self._cancel_stalled()
        HTTPChannel.connectionLost(self, reason)
        self.site.admission.remove(self, self.client_ip)

    def _too_large(self, code: int, reason: bytes) -> None:
        self._cancel_header_deadline()
        log.info(
            "request from {client} refused: {code} {reason}",
            client=self.transport.getPeer(), code=code, reason=reason.decode("ascii"),
        )
        body = b"%d %s\n" % (code, reason)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (code, reason, len(body), body)
        )
        self.refused = True
        self.loseConnection()


def _abort(channel) -> None:
    channel.transport.abortConnection()


@implementer(IListenerFactory)
class BalancerSite(Site):
    """
    The L{Site} of a twisted_slb HTTP listener: idle keep-alive clients are
    closed after C{client_idle_timeout}; request heads over
    C{max_header_bytes} get 414 or 431, more than C{max_headers} header
    lines get 431.  Over C{max_connections} open connections, new ones are
    closed at once; a client address over C{max_connections_per_ip} gets 429
    and a close.  (0: no limit.)

    @ivar admission: the L{twisted_slb.limits.IConnectionAdmission} of its
        connections (the limits and the drain on stop).
    @ivar limit: the admission's L{ConnectionLimit}.
    @ivar per_ip: the admission's L{ClientAddressLimit}.
    @ivar channels: the open channels (the admission's set).
    """

    noisy = False
    # HTTPFactory types protocol as its generic-channel factory function;
    # Factory.buildProtocol only calls it, and a channel class works as well.
    protocol = _BalancerChannel  # type: ignore[assignment]

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
        limit: Optional[ConnectionLimit] = None,
    ) -> None:
        reactor = maybe_global_reactor(reactor)
        Site.__init__(self, resource, reactor=reactor, timeout=client_idle_timeout)
        self.admission = ConnectionAdmission(
            limit if limit is not None else ConnectionLimit(max_connections, listener_name),
            ClientAddressLimit(max_connections_per_ip, listener_name),
            reactor,
        )
        self.limit = self.admission.limit
        self.per_ip = self.admission.per_ip
        self.listener_name = listener_name
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.channels: set = self.admission.connections
        self.stats = None

    def drain(self, grace: float) -> Deferred:
        """
        Graceful shutdown (after the port stopped listening): idle keep-alive
        connections are closed now, busy ones after their response; those
        still open after C{grace} seconds are closed.

        @return: a L{Deferred} that fires when no connection is left.
        """
        for channel in list(self.channels):
            if channel.requests:
                channel.persistent = False
            else:
                channel.loseConnection()

        return self.admission.drain(grace, _abort)

    def retire(self, grace: float) -> None:
        """A reload replaced this site: its connections carry on as they are."""

    def log(self, request) -> None:
        # The proxy writes its own access line (with backend and persistence).
        pass

    def buildProtocol(self, addr):
        channel = self.admission.build(getattr(addr, "host", None), Site.buildProtocol, self, addr)
        if channel is None or isinstance(channel, TooManyConnections):
            return channel  # refused
        if self.stats is not None:
            self.stats.connections_total += 1
        channel.MAX_LENGTH = self.max_header_bytes
        channel.totalHeadersSize = self.max_header_bytes
        channel.maxHeaders = self.max_headers
        return channel
