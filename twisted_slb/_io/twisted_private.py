"""
Every private API of Twisted (and of txredisapi) that twisted_slb relies
on, in one place, each with why nothing public does the job.

tests/test_twisted_private.py checks each of them against the installed
Twisted: an upgrade that renames or removes one fails that test loudly,
rather than degrading something at run time.  Three uses cannot live
here, because they are overrides in a subclass; they are listed so that the
same test covers them:

 - L{twisted_slb._io.reactor.SLBEPollReactor} overrides C{doPoll} of
   C{EPollReactor} and reads its L{EPOLL_REACTOR_PRIVATE} attributes;
 - L{twisted_slb.tls._server._CountingTLSProtocol} overrides
   C{_shutdownTLS} of C{TLSMemoryBIOProtocol} and reads
   L{TLS_PROTOCOL_PRIVATE};
 - the channel of L{twisted_slb.web.site.BalancerSite} reads
   L{HTTP_CHANNEL_PRIVATE} of C{HTTPChannel} (documented in its ivars) to
   answer 414 and 431 where twisted.web answers 400.
"""

from __future__ import annotations

from errno import EMFILE, ENFILE, ENOBUFS, ENOMEM
from typing import TYPE_CHECKING, List, Optional, Tuple

from twisted.internet import tcp
from twisted.logger import Logger

# twisted.protocols.haproxy exports only proxyEndpoint, whose wrapper cannot
# be used by a relay that reads the header itself (see
# twisted_slb.clientip.ProxyProtocolFactory); the parsers are what it needs.
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader as HAProxyInvalidHeader
from twisted.protocols.haproxy._v1parser import V1Parser as HAProxyV1Parser
from twisted.protocols.haproxy._v2parser import V2Parser as HAProxyV2Parser

if TYPE_CHECKING:
    # Only for annotations: twisted.internet.ssl documents the interface of
    # trust roots but does not export it.
    from twisted.internet._sslverify import IOpenSSLTrustRoot  # noqa: F401

__all__ = [
    "ACCEPT_RESOURCE_ERRORS",
    "EPOLL_REACTOR_PRIVATE",
    "HAProxyInvalidHeader",
    "HAProxyV1Parser",
    "HAProxyV2Parser",
    "HTTP_CHANNEL_PRIVATE",
    "TLS_PROTOCOL_PRIVATE",
    "file_observer_output",
    "keep_socket_on_close",
    "publisher_observers",
    "redis_pool_size",
    "tcp_is_idle_for_writing",
    "tcp_shutdown_write_now",
    "tcp_write_disconnecting",
    "watch_port",
]

#: Attributes of C{EPollReactor} that L{twisted_slb._io.reactor} reads (its
#: C{doPoll} without the per-event logging context).
EPOLL_REACTOR_PRIVATE = ("_poller", "_selectables", "_doReadOrWrite")

#: Attributes of C{TLSMemoryBIOProtocol} that the buffering transport of
#: L{twisted_slb.tls._server} overrides or reads (its TLS shutdown after a
#: streamed response).
TLS_PROTOCOL_PRIVATE = ("_shutdownTLS", "_tlsConnection", "_appSendBuffer")

#: Attributes of C{twisted.web.http.HTTPChannel} read by the channel of
#: L{twisted_slb.web.site.BalancerSite}: the size and count of the header
#: lines received so far.
HTTP_CHANNEL_PRIVATE = ("_receivedHeaderSize", "_receivedHeaderCount")

#: C{accept()} errors that mean the process (or the system) is out of
#: descriptors or memory for a new connection: what Twisted's port logs and
#: gives up on for this turn.
ACCEPT_RESOURCE_ERRORS = frozenset((EMFILE, ENFILE, ENOBUFS, ENOMEM))


# -- tcp.Connection: sending at once (twisted_slb._io.sockets) ---------------
#
# Twisted has no public "send now" nor "shut the sending side down now":
# these read and set the write state of twisted.internet.abstract's
# FileDescriptor as its own doWrite does (unchanged since Twisted 8).


def tcp_is_idle_for_writing(transport) -> bool:
    """
    C{transport} is a plain TCP connection (not TLS), open for writing,
    with nothing in its write buffer.
    """
    return (
        isinstance(transport, tcp.Connection)
        and bool(transport.connected)
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and not getattr(transport, "TLS", False)
    )


def tcp_write_disconnecting(transport) -> bool:
    """C{loseWriteConnection} was called on the TCP C{transport}."""
    return transport._writeDisconnecting


def tcp_shutdown_write_now(transport) -> None:
    """
    Shut down the sending side of an idle TCP C{transport} at once: the
    state and the call C{FileDescriptor.doWrite} makes on the next write
    event after C{loseWriteConnection}.
    """
    transport._writeDisconnecting = True
    transport._writeDisconnected = True
    transport._closeWriteConnection()


# -- tcp.Port -----------------------------------------------------------------


def keep_socket_on_close(port) -> None:
    """
    Make C{port.stopListening()} close only this process's descriptor,
    without C{shutdown()} (which, on Linux, stops the socket listening in
    every process sharing it).  Twisted skips the shutdown for adopted
    sockets through the private C{_shouldShutdown} flag; no public API sets
    it.
    """
    if hasattr(port, "_shouldShutdown"):
        port._shouldShutdown = False


class _WatchedListener:
    """
    A listening socket whose C{accept} reports to a watcher: resource
    errors (by errno) and successes.  Everything else is the socket's.
    """

    __slots__ = ("_socket", "_watcher")

    def __init__(self, socket, watcher) -> None:
        self._socket = socket
        self._watcher = watcher

    def accept(self):
        try:
            pair = self._socket.accept()
        except OSError as e:
            self._watcher.accept_failed(e.errno)
            raise
        self._watcher.socket_accepted()
        return pair

    def __getattr__(self, name):
        return getattr(self._socket, name)


def watch_port(port, watcher) -> bool:
    """
    Have a listening C{tcp.Port} report its accepts to C{watcher}, and send
    the port's own log events (its accept loop's) to C{watcher} instead of
    the global log.

    C{tcp.Port.doRead} accepts through the port's C{socket} attribute and
    logs through its private C{_logger} (a class attribute); the accept
    errors are only visible there.  C{watcher} provides
    C{accept_failed(errno)}, C{socket_accepted()} and is called with each
    log event of the port.

    @return: whether C{port} is such a port (C{False}: nothing changed).
    """
    if not isinstance(port, tcp.Port) or not hasattr(port, "_logger") or getattr(port, "socket", None) is None:
        return False
    port.socket = _WatchedListener(port.socket, watcher)
    port._logger = Logger(namespace=port._logger.namespace, observer=watcher)
    return True


# -- twisted.logger (twisted_slb.accesslog) -----------------------------------
#
# Twisted has no public way to list a publisher's observers nor to get a
# FileLogObserver's file; both are unchanged since twisted.logger appeared
# (Twisted 15.2).


def publisher_observers(publisher) -> Optional[List]:
    """The observers of a C{LogPublisher} (its private C{_observers}), or L{None}."""
    observers = getattr(publisher, "_observers", None)
    return observers if isinstance(observers, list) else None


def file_observer_output(observer) -> Optional[Tuple[object, Optional[str]]]:
    """
    The file a C{FileLogObserver} writes to and its encoding (L{None} for a
    text file): its private C{_outFile} and C{_encoding}; L{None} if it has
    no such attributes.
    """
    try:
        return observer._outFile, observer._encoding
    except AttributeError:
        return None


# -- txredisapi (twisted_slb.persistence.store) -------------------------------


def redis_pool_size(handler) -> int:
    """
    How many connections of a txredisapi C{lazyConnection} handler are up
    now: its factory's C{size}.  txredisapi has no public "connected"
    question, and a command sent while it is down waits for a connection
    rather than failing.
    """
    return handler._factory.size
