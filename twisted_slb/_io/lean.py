"""
Lean TCP transports for the TCP relay (L{twisted_slb.tcp}), the plain HTTP
listeners and the HTTP proxy's backend connections.

A relayed TCP connection does little: accept, connect a backend, a few
reads and writes, two half-closes, two closes.  Through Twisted's own
C{tcp.Server} and C{reactor.connectTCP} each of those steps runs general
machinery (a C{Connector}, a L{Deferred} for the address, a C{callLater(0)}
before the connect, a C{Failure} built per close, log prefixes, producer
bookkeeping written for every kind of descriptor) and costs several times
what the relay itself does: about 160 microseconds of CPU per connection,
against 20 for the same relay written against the sockets directly.

The classes here are that direct version, kept inside Twisted's public
contracts: they are file descriptors registered with the reactor's
L{IReactorFDSet} (C{addReader} / C{addWriter}), and they give the relay's
protocols the transport interface they already use (C{write},
C{loseConnection}, C{loseWriteConnection}, C{abortConnection},
C{registerProducer}, C{pauseProducing} / C{resumeProducing}, C{getPeer} /
C{getHost}, C{setTcpNoDelay}), with Twisted's meaning, so the relay code is
the same whichever transport it runs on.  The HTTP listeners' server
(L{twisted_slb.web.front}) and the proxy's backend connections
(L{twisted_slb.web.upstream}) use the same interface, and pull producers
(a C{FileSender} streaming an upload to a backend).

  - L{LeanServer} is what a listening C{tcp.Port} builds for each accepted
    connection: C{Port.transport} is documented as replaceable, and
    L{serve_port} replaces it.  Accepting, C{EMFILE} recovery and pausing
    stay Twisted's (see L{twisted_slb._io.accept}).
  - L{connect} starts a non-blocking connect and reports to a
    C{ClientFactory} as C{connectTCP} does (C{buildProtocol}, then
    C{clientConnectionFailed} with the same exceptions: refused, timed
    out, ...).

Where they differ from Twisted's transports, on purpose:

  - C{write} sends at once when nothing is waiting (Twisted buffers until
    the reactor's next turn); what the socket does not take is buffered and
    sent when it is writable, and a registered producer is paused past
    C{bufferSize} bytes, as in Twisted.
  - C{loseConnection} and C{loseWriteConnection} act at once when nothing
    is buffered (Twisted waits for the next write event); the protocol's
    C{connectionLost} or C{writeConnectionLost} may therefore run before
    the call returns, as it already does in Twisted once the sending side
    is shut down.
  - A registered producer is told C{stopProducing} after, not before, the
    protocol's C{connectionLost}.

They are used only where they can be: a reactor built on Twisted's POSIX
reactor base (epoll, poll, select, asyncio, ...), backends given as IP
addresses (a host name goes through C{connectTCP}, which resolves it), and
plain TCP listeners (not TLS, not UNIX sockets).  Anything else keeps
Twisted's transports, and the relay works the same on both.
"""

from __future__ import annotations

import errno
import os
import platform
import socket
from functools import lru_cache
from typing import Optional, cast

from twisted.internet import error, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IPushProducer,
    IReadWriteDescriptor,
    ITCPTransport,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_slb._io.timers import Deadlines

log = Logger(namespace="twisted_slb._io.lean")

# Built once, as Twisted does for its own clean closes: a Failure per close
# would cost more than the rest of the close.
_DONE = Failure(error.ConnectionDone())
_ABORTED = Failure(error.ConnectionAborted())

_CONNECTING = (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY, errno.EISCONN)
# A socket made non-blocking as it is created (Linux): one ioctl fewer per
# backend connection than socket() then setblocking(False).
_NONBLOCKING_STREAM = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)

if platform.python_implementation() == "PyPy":
    # PyPy's socket.recv(n) allocates all n bytes in the garbage collector's
    # nursery, whatever arrives: at 64 KB a read, a proxied request filled
    # the 1 MB nursery every five requests, and the collector took almost a
    # quarter of the process's time.  Reading into one reused buffer, then
    # copying out what arrived, allocates only that (with the lean HTTP
    # transports, 45 to 32 us of CPU per keep-alive request).  The reactor
    # runs one read at a time.
    _READ_BUFFER = bytearray(2 ** 16)
    _READ_VIEW = memoryview(_READ_BUFFER)

    def recv(sock: socket.socket, size: int, /) -> bytes:
        """C{sock.recv(size)}, without a C{size}-byte allocation per call."""
        if size > len(_READ_BUFFER):
            return sock.recv(size)
        return _READ_VIEW[:sock.recv_into(_READ_BUFFER, size)].tobytes()

else:
    #: C{recv(sock, size)}: C{sock.recv(size)} (on CPython, which allocates
    #: only what arrives).
    recv = socket.socket.recv

#: the SO_LINGER value that makes close() send a reset (abortConnection)
_LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"


def usable(reactor) -> bool:
    """Whether C{reactor} can run lean transports (a POSIX, file-descriptor reactor)."""
    return isinstance(reactor, PosixReactorBase)


@lru_cache(maxsize=1024)
def _family(host: str) -> Optional[int]:
    """C{AF_INET} or C{AF_INET6} for an IP address; L{None} for a host name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        return family
    return None


def _address(family: int, host: str, port: int):
    if family == socket.AF_INET6:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


# A backend's address, made once rather than for every connect (backends
# are few; Twisted's address classes are values nobody changes).
_backend_address = lru_cache(maxsize=1024)(_address)


def _lost(exc: OSError) -> Failure:
    """The Failure for a connection that broke with C{exc} (a reset, ...)."""
    return Failure(error.ConnectionLost(exc.strerror or str(exc)))


@implementer(ITCPTransport, IPushProducer, IConsumer, IReadWriteDescriptor)
class LeanConnection:
    """
    A connected, non-blocking TCP socket driven by the reactor: the
    transport of one side of a relayed connection.  Call C{startReading}
    once the protocol is connected.

    @ivar connected: the socket is open.
    @ivar disconnecting: C{loseConnection} was called; the socket closes
        once what is buffered is sent.
    @ivar bufferSize: bytes read at a time, and the write buffer size past
        which a registered producer is paused.
    """

    bufferSize = 2 ** 16
    connected = True
    disconnecting = False
    disconnected = False
    producer = None
    streamingProducer = False
    #: we paused the registered producer because our buffer is full
    producerPaused = False
    _peer = None
    _host = None
    _reading = False
    _writing = False
    _read_closed = False
    _write_closing = False
    _write_closed = False

    def __init__(self, sock: socket.socket, protocol, reactor) -> None:
        self.socket = sock
        self.protocol = protocol
        self.reactor = reactor
        self.fileno = sock.fileno
        # (providedBy: an adapter lookup per connection costs more.)
        self._half = protocol if IHalfCloseableProtocol.providedBy(protocol) else None
        self._buffer = bytearray()

    def __repr__(self) -> str:
        return f"<{self.__class__.__name__} {self.logPrefix()} fd={self.fileno()}>"

    def logPrefix(self) -> str:
        return "-" if self.protocol is None else self.protocol.__class__.__name__

    def getHandle(self) -> socket.socket:
        return self.socket

    # -- addresses and options ------------------------------------------------

    def getPeer(self):
        if self._peer is None:
            self._peer = _address(self.socket.family, *self.socket.getpeername()[:2])
        return self._peer

    def getHost(self):
        if self._host is None:
            self._host = _address(self.socket.family, *self.socket.getsockname()[:2])
        return self._host

    def setTcpNoDelay(self, enabled: bool) -> None:
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, bool(enabled))
        except OSError:  # the peer already reset it: nothing to tune
            pass

    def getTcpNoDelay(self) -> bool:
        return bool(self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, bool(enabled))

    def getTcpKeepAlive(self) -> bool:
        return bool(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))

    # -- reactor registration -------------------------------------------------

    def startReading(self) -> None:
        if not self._reading:
            self._reading = True
            self.reactor.addReader(self)

    def stopReading(self) -> None:
        if self._reading:
            self._reading = False
            self.reactor.removeReader(self)

    def _start_writing(self) -> None:
        if not self._writing:
            self._writing = True
            self.reactor.addWriter(self)

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self.reactor.removeWriter(self)

    # -- reading ----------------------------------------------------------------

    def doRead(self) -> None:
        try:
            data = recv(self.socket, self.bufferSize)
        except BlockingIOError:
            return
        except OSError as e:
            self._close(_lost(e))
            return
        if data:
            self.protocol.dataReceived(data)
            return
        # End of file: the peer will send no more.
        self._read_closed = True
        self.stopReading()
        if self._half is None:
            self._close(_DONE)
        else:
            self._half.readConnectionLost()

    # -- writing ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.connected or self._write_closed or not data:
            return
        buffer = self._buffer
        if not buffer:
            try:
                sent = self.socket.send(data)
            except OSError:
                # Full (EAGAIN), or broken: the write event meets the error
                # and closes from the reactor, not from inside the caller.
                sent = 0
            if sent == len(data):
                if self.producer is not None and not self.streamingProducer:
                    # A pull producer is asked for more on the next write
                    # event, as Twisted's transports ask it: not from
                    # inside its own write.
                    self._start_writing()
                return
            data = memoryview(data)[sent:]
        buffer += data
        self._start_writing()
        if self.producer is not None and self.streamingProducer and not self.producerPaused \
                and len(buffer) > self.bufferSize:
            self.producerPaused = True
            self.producer.pauseProducing()

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def doWrite(self) -> None:
        buffer = self._buffer
        if buffer:
            try:
                sent = self.socket.send(buffer)
            except BlockingIOError:
                return
            except OSError as e:
                self._close(_lost(e))
                return
            del buffer[:sent]
            if buffer:
                return
        self._stop_writing()
        producer = self.producer
        if producer is not None and (not self.streamingProducer or self.producerPaused):
            self.producerPaused = False
            producer.resumeProducing()
            if self._buffer or not self.connected:
                return  # it wrote again: finish on a later write event
        if self.disconnecting:
            self._close(_DONE)
        elif self._write_closing and not self._write_closed:
            self._shutdown_write()

    # -- closing ----------------------------------------------------------------

    def loseWriteConnection(self) -> None:
        """Shut the sending side down once what is buffered is sent."""
        if not self.connected or self._write_closing:
            return
        self._write_closing = True
        if not self._buffer:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        self._write_closed = True
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if self._half is not None:
            self._half.writeConnectionLost()

    def loseConnection(self) -> None:
        """Close once what is buffered is sent (at once if nothing is)."""
        if not self.connected or self.disconnecting:
            return
        self.disconnecting = True
        self.stopReading()
        if not self._buffer:
            self._close(_DONE)

    def abortConnection(self) -> None:
        """Close at once, dropping what is buffered; the peer gets a reset."""
        if not self.connected:
            return
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
        self._close(_ABORTED)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor gives up on this socket (a hang-up, or its shutdown)."""
        self._close(reason)

    def _close(self, reason: Failure) -> None:
        if not self.connected:
            return
        self.connected = False
        self.disconnected = True
        self.disconnecting = True
        # Unregistered before the socket closes: its number is reused by
        # the next socket the process opens.
        self.stopReading()
        self._stop_writing()
        self.socket.close()
        # What was not sent never will be: not kept while anything still
        # refers to this transport.
        self._buffer = bytearray()
        protocol = self.protocol
        producer, self.producer = self.producer, None
        # Without the transport <-> protocol cycle, reference counting
        # frees both, rather than the garbage collector (as Twisted does).
        self.protocol = self._half = None
        try:
            protocol.connectionLost(reason)
        finally:
            if producer is not None:
                producer.stopProducing()

    # -- as a consumer (IConsumer) --------------------------------------------

    def registerProducer(self, producer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(f"cannot register producer {producer!r}: {self.producer!r} is registered already")
        if not self.connected:
            producer.stopProducing()
            return
        self.producer = producer
        self.streamingProducer = bool(streaming)
        self.producerPaused = False
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producerPaused = False

    # -- as a producer (IPushProducer) ----------------------------------------

    def pauseProducing(self) -> None:
        self.stopReading()

    def resumeProducing(self) -> None:
        if self.connected and not self.disconnecting and not self._read_closed:
            self.startReading()

    def stopProducing(self) -> None:
        self.loseConnection()


class LeanServer(LeanConnection):
    """
    An accepted connection: what L{serve_port} makes a C{tcp.Port} build,
    with the signature of C{tcp.Server}.
    """

    def __init__(self, sock, protocol, client, server, sessionno, reactor) -> None:
        sock.setblocking(False)
        LeanConnection.__init__(self, sock, protocol, reactor)
        self.server = server
        self.sessionno = sessionno
        self._client = client
        self.startReading()

    def getPeer(self):
        if self._peer is None:
            client = self._client
            self._peer = (IPv4Address if len(client) == 2 else IPv6Address)("TCP", client[0], client[1])
        return self._peer


def serve_port(port, factory) -> bool:
    """
    Make the listening C{port} give the connections it accepts for
    C{factory} a L{LeanServer} transport, if it is a plain TCP port of a
    reactor that can drive one.

    @return: whether it does now.
    """
    if (
        type(port) is tcp.Port
        and port.transport is tcp.Server
        and getattr(port, "factory", None) is factory
        and usable(getattr(port, "reactor", None))
    ):
        # tcp.Port documents its transport attribute as replaceable.
        port.transport = cast("type[tcp.Server]", LeanServer)
        return True
    return False


@implementer(IReadWriteDescriptor)
class LeanConnector:
    """
    One non-blocking connect (see L{connect}): the C{IConnector} methods
    the relay uses (C{disconnect}, C{stopConnecting}, C{getDestination}).
    """

    _done = False
    _timer = None
    _deadlines = None
    sock = None

    def __init__(self, reactor, family: int, host: str, port: int, factory, timeout: float,
                 deadlines: Optional[Deadlines] = None) -> None:
        self.reactor = reactor
        self.factory = factory
        self.address = _backend_address(family, host, port)
        try:
            sock = self.sock = socket.socket(family, _NONBLOCKING_STREAM)
            if _NONBLOCKING_STREAM == socket.SOCK_STREAM:
                sock.setblocking(False)
            err = sock.connect_ex((host, port))
        except OSError as e:
            # Out of descriptors, ...: reported on the reactor's next turn,
            # as connectTCP reports its failures.
            self._done = True
            if self.sock is not None:
                self.sock.close()
            reactor.callLater(0, self._report, error.getConnectError((e.errno, e.strerror)))
            return
        if err not in _CONNECTING:
            self._done = True
            sock.close()
            reactor.callLater(0, self._report, error.getConnectError((err, os.strerror(err))))
            return
        # The socket's descriptor until _finish: an instance attribute
        # that shadows the fileno method (-1) while connecting.
        self.fileno = sock.fileno  # type: ignore[method-assign]  # until _finish
        reactor.addWriter(self)
        if timeout:
            if deadlines is not None:
                self._deadlines = deadlines
                deadlines.add(self, timeout)
            else:
                self._timer = reactor.callLater(timeout, self._fail, error.TimeoutError())

    def __repr__(self) -> str:
        return f"<LeanConnector to {self.address.host}:{self.address.port}>"

    def fileno(self) -> int:
        return -1

    def logPrefix(self) -> str:
        return "LeanConnector"

    def getDestination(self):
        return self.address

    def doRead(self) -> None:
        pass  # never registered for reading

    def doWrite(self) -> None:
        # Writable: the connect finished, one way or the other.  Registered
        # for writing only while connecting, with its socket.
        assert self.sock is not None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(error.getConnectError((err, os.strerror(err))))
            return
        protocol = self.factory.buildProtocol(self.address)
        if protocol is None:
            # As connectTCP: a factory that declines the connection fails it.
            self._fail(error.NoProtocol())
            return
        sock, self.sock = self.sock, None
        transport = LeanConnection(sock, protocol, self.reactor)
        transport._peer = self.address
        # The transport registers for reading before this connector stops
        # waiting for writability: the reactor then modifies the socket's
        # registration twice, rather than removing it and adding it back
        # (epoll: two EPOLL_CTL_MODs, about 1 us less in the kernel than a
        # DEL and an ADD).
        transport.startReading()
        self._finish()
        protocol.makeConnection(transport)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor saw the socket fail (a refused connect) or is shutting down."""
        err = 0
        if self.sock is not None:
            try:
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError:
                pass
        if err:
            self._fail(error.getConnectError((err, os.strerror(err))))
        else:
            self._fail(error.ConnectError(string=reason.getErrorMessage()))

    def stopConnecting(self) -> None:
        """Give up; the factory hears of it as C{connectTCP}'s does (a L{error.UserError})."""
        self._fail(error.UserError(string="connect cancelled"))

    disconnect = stopConnecting

    def _finish(self) -> None:
        self._done = True
        self.reactor.removeWriter(self)
        # The socket may live on in a transport: this one no longer has it.
        del self.fileno
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._deadlines is not None:
            self._deadlines.discard(self)

    def _fail(self, exc: Exception) -> None:
        if self._done:
            return
        self._finish()
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        self._report(exc)

    def _report(self, exc: Exception) -> None:
        self.factory.clientConnectionFailed(self, Failure(exc))

    def timed_out(self) -> None:
        """The connect took longer than its timeout (called by L{Deadlines})."""
        self._fail(error.TimeoutError())


def connect(reactor, host: str, port: int, factory, timeout: float = 30, deadlines: Optional[Deadlines] = None):
    """
    Connect to C{host}:C{port} for C{factory} (a C{ClientFactory}) as
    C{reactor.connectTCP} does: on success C{factory.buildProtocol(address)}
    gets a L{LeanConnection}; on failure
    C{factory.clientConnectionFailed(connector, reason)} is called, never
    before this returns.

    A host name (not an IP address), or a reactor L{usable} says no to,
    goes through C{reactor.connectTCP} instead.

    @param deadlines: a L{Deadlines} of C{reactor} whose C{expired} is
        L{LeanConnector.timed_out}, shared by many connects: their timeouts
        then share one timer instead of one each.

    @return: the connector (C{disconnect()} gives up on it).
    """
    family = _family(host) if usable(reactor) else None
    if family is None:
        return reactor.connectTCP(host, port, factory, timeout=timeout)
    return LeanConnector(reactor, family, host, port, factory, timeout, deadlines)
