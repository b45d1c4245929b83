"""
A lean TLS server transport for the HTTPS listeners.

Twisted serves TLS with a protocol wrapper over memory BIOs
(L{twisted.protocols.tls.TLSMemoryBIOProtocol}) on top of a TCP transport:
every read and every write crosses two transports, a BIO copy each way and
a few Python calls each (a write: the application's C{write}, C{SSL_write},
C{bio_read}, the TCP transport's C{write}, then its C{doWrite} on the next
reactor turn).  Measured with the benchmark, HTTPS keep-alive ran at about
half the rate of plain HTTP keep-alive on the lean transports.

L{LeanTLSServer} is the same idea as L{twisted_slb._io.lean.LeanServer}: an
L{OpenSSL.SSL.Connection} built on the accepted socket itself (OpenSSL reads
and writes the socket), registered with the reactor's L{IReactorFDSet}, and
giving the application the transport interface it already uses, with
Twisted's meaning: C{write}, C{loseConnection}, C{loseWriteConnection},
C{abortConnection}, C{registerProducer}, C{pauseProducing} /
C{resumeProducing}, C{getPeer} / C{getHost}, plus L{ISSLTransport}'s
C{getPeerCertificate} and L{INegotiated}'s C{negotiatedProtocol} (ALPN).
pyOpenSSL stays the TLS library; only the way bytes reach it changes.

What it keeps of the Twisted path (L{twisted_slb.tls.TLSServerFactory}):

  - The contexts: SNI certificate selection, ALPN, TLS 1.2 minimum, session
    tickets and their rotation, renegotiation refused; all come from the
    listener's L{twisted_slb.tls.SNIServerOptions} (a reload builds new
    ones), which gives each new connection its context.
  - The handshake timeout, and the one log line per failed handshake (with
    OpenSSL's reason, or the bytes a client sent before it closed).
  - Closing: C{loseConnection} sends close_notify once everything is sent,
    then closes without waiting for the client's.  A client's close_notify
    is answered with ours and the connection closes
    (C{connectionLost(ConnectionDone)}); a client that closes TCP without
    one is C{ConnectionLost}, as with Twisted (a TLS connection does not
    half-close by a FIN: the protocol hears C{connectionLost}, never
    C{readConnectionLost}).  C{loseWriteConnection} sends close_notify and
    shuts the socket's sending side down, and the client may still send.
  - C{abortConnection} resets the connection without close_notify.

OpenSSL may need to read to write and to write to read (a handshake
message, a TLS 1.3 key update, a socket that filled mid-record): each side
remembers what it waits for and is retried on the other event.  A write
that OpenSSL could not finish is retried with the same bytes, as it
requires.

It is used by https listeners when the reactor can drive lean transports
(L{twisted_slb._io.lean.usable}), the listener has no PROXY protocol header to
read first, and L{enabled} is true (the default):
C{TWISTED_SLB_LEAN_TLS=0} in the environment turns it off, and Twisted's TLS
then serves https listeners, as it always does with any other reactor.

The backend side: L{connect} (used by the HTTP proxy's connection pool for
groups with C{tls}) is C{connectSSL} on the same machinery.  The TLS half
above is L{LeanTLSConnection}, shared by L{LeanTLSServer} and
L{LeanTLSClient}; L{LeanTLSConnector} makes the TCP connect, runs the
handshake on the socket (SNI, a session of an earlier connection resumed)
and checks the certificate (the chain by OpenSSL during the handshake, the
name by service_identity after it) with the group's
L{twisted_slb.tls.BackendClientTLS}, and only then builds the protocol, on a
L{LeanTLSClient}: nothing can be written to a backend that failed, since
nobody has a transport to write to.  The same switch and the same reactors
decide, and a backend given by host name goes through C{connectSSL}.
"""

from __future__ import annotations

import os
import socket
from typing import Optional, Type, cast

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL
from twisted.internet import error, tcp
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    INegotiated,
    IReadWriteDescriptor,
    ISSLTransport,
    ISystemHandle,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_slb._io import lean
from twisted_slb._io.lean import _ABORTED, _DONE, _LINGER_RESET, LeanConnection, LeanConnector, LeanServer
from twisted_slb.tls import TLSServerFactory, log_handshake_failure, log_handshake_timeout

#: whether https listeners use L{LeanTLSServer} where they can
#: (C{TWISTED_SLB_LEAN_TLS=0} in the environment: no; on by default)
enabled = os.environ.get("TWISTED_SLB_LEAN_TLS", "1").strip().lower() not in ("0", "false", "no", "off")

#: the largest TLS record's payload: one C{SSL_write} of at most this is one
#: record, written whole or not at all; one C{SSL_read} of this takes a
#: whole record, so OpenSSL keeps no decrypted bytes behind.
_RECORD = 2 ** 14

# The record calls go to OpenSSL directly through cryptography's documented
# bindings (the ones pyOpenSSL itself calls), on the connection's C{SSL *}
# (pyOpenSSL's private C{Connection._ssl}: it has no public accessor).  Only
# a call that fails goes back to pyOpenSSL, whose C{_raise_ssl_error} turns
# OpenSSL's error into the exception its C{recv}/C{send} would raise.
# pyOpenSSL's own C{recv} allocates a buffer and checks four things after
# every call, even one that succeeded: measured on this path, about 2 us of
# the 20 us TLS adds to a keep-alive request on CPython, and more on PyPy.
# L{tests.test_leantls} checks that these private names are still there.
_binding = Binding()
_ffi = _binding.ffi
_SSL_read = _binding.lib.SSL_read
_SSL_write = _binding.lib.SSL_write
_SSL_pending = _binding.lib.SSL_pending
_unpack = _ffi.unpack
_from_buffer = _ffi.from_buffer
_SSL_set_mode = _binding.lib.SSL_set_mode
#: a retried SSL_write may come from another address: the rest of a write
#: waits in the transport's buffer, whose storage moves as it is sent (on
#: PyPy as soon as its head is deleted).  pyOpenSSL 26 sets this on every
#: context; 24.3 (PyPy 3.9's, allowed on CPython) does not, and OpenSSL
#: then fails the retry ("bad write retry").  Set on each connection, so
#: that a context made elsewhere (the backends' client contexts) needs
#: nothing.
_MOVING_WRITE_BUFFER = _binding.lib.SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER


def _new_connection(context: SSL.Context, sock: socket.socket) -> SSL.Connection:
    """An L{SSL.Connection} on C{sock} whose writes may be retried from a moved buffer."""
    tls = SSL.Connection(context, sock)
    _SSL_set_mode(tls._ssl, _MOVING_WRITE_BUFFER)
    return tls
#: one buffer for every connection's reads: the reactor runs one read at a
#: time, and the bytes are copied out of it before anything else runs
_read_buffer = _ffi.new("char[]", 2 ** 14)


def _failed(tls: SSL.Connection, result: int) -> None:
    """Raise what pyOpenSSL raises for C{result}, a failed C{SSL_read}/C{SSL_write}."""
    tls._raise_ssl_error(tls._ssl, result)
    raise SSL.Error([("", "", "OpenSSL call returned %d without an error" % (result,))])


_WantRead = SSL.WantReadError
_WantWrite = SSL.WantWriteError
_ZeroReturn = SSL.ZeroReturnError
_SSLError = SSL.Error


def _lost(exc: BaseException) -> Failure:
    """A TCP-level end (EOF without close_notify, a reset) as Twisted reports it."""
    if isinstance(exc, SSL.SysCallError) and len(exc.args) == 2 and exc.args[0] > 0:
        return Failure(error.ConnectionLost(os.strerror(exc.args[0])))
    return Failure(error.ConnectionLost())


@implementer(ISSLTransport, INegotiated, ISystemHandle)
class LeanTLSConnection(LeanConnection):
    """
    The TLS half shared by L{LeanTLSServer} and L{LeanTLSClient}: reads and
    writes through OpenSSL on the socket, close_notify, and the bookkeeping
    of a read that waits for writability and a write that waits for
    readability.  A subclass does the handshake (C{_handshake}, called on
    the socket's events until C{_handshake_done}).

    @ivar tls: the L{SSL.Connection}; L{None} once closed.
    """

    tls: Optional[SSL.Connection] = None
    _handshake_done = False
    #: the last C{SSL_write} (or handshake, or close_notify) waits for the
    #: socket to take more
    _want_write = False
    #: a read waits for the socket to be writable, a write for it to be readable
    _read_wants_write = False
    _write_wants_read = False
    _shutdown_pending = False
    #: why a write failed; the next write event closes with it
    _write_failure: Optional[Failure] = None

    def getHandle(self):
        """The L{SSL.Connection}, as Twisted's TLS transport gives it (L{ISystemHandle})."""
        return self.tls

    def getPeerCertificate(self):
        tls = self.tls
        return None if tls is None else tls.get_peer_certificate()

    @property
    def negotiatedProtocol(self):
        """The protocol chosen by ALPN (C{b"h2"}, C{b"http/1.1"}), or L{None}."""
        tls = self.tls
        if tls is None:
            return None
        return tls.get_alpn_proto_negotiated() or None

    def _handshake(self) -> None:
        """One step of the handshake: the subclass's (the socket has an event for it)."""
        raise NotImplementedError()

    # -- reading ----------------------------------------------------------------

    def doRead(self) -> None:
        if self._write_failure is not None:
            self._close(self._write_failure)
            return
        if self._write_wants_read:
            self._write_wants_read = False
            self._flush()
            if not self.connected:
                return
        if not self._handshake_done:
            self._handshake()
            if not self._handshake_done or not self.connected:
                return
        self._read()

    def _read(self) -> None:
        tls = self.tls
        if tls is None:  # closed meanwhile (by the protocol, or a failed write)
            return
        if self._write_failure is not None:
            # A write failed meanwhile (the chosen protocol's first write,
            # during the handshake's read): OpenSSL's state is broken, and
            # the failure is the reason to report.
            self._close(self._write_failure)
            return
        # One record, more only while they come whole (a large upload): a
        # small request costs one SSL_read, not a second one meeting EAGAIN.
        ssl = tls._ssl
        for _ in range(4):
            try:
                result = _SSL_read(ssl, _read_buffer, _RECORD)
                if result <= 0:
                    _failed(tls, result)
            except _WantRead:
                return
            except _WantWrite:
                self._read_wants_write = True
                self._wait_writable()
                return
            except _ZeroReturn:
                self._peer_closed()
                return
            except SSL.SysCallError as e:
                self._close(_lost(e))
                return
            except _SSLError:
                self._close(Failure())
                return
            self.protocol.dataReceived(_unpack(_read_buffer, result))
            if self.tls is None:
                return
            if result < _RECORD or not self._reading:
                break
        if self._reading and _SSL_pending(ssl) > 0:
            # (Not with reads of a whole record; kept for safety.)
            self.reactor.callLater(0, self._read_pending)

    def _read_pending(self) -> None:
        if self.connected and self._reading:
            self._read()

    def _peer_closed(self) -> None:
        """The client sent close_notify: ours goes once what is buffered is sent, then we close."""
        self._read_closed = True
        self.stopReading()
        if not self.disconnecting:
            self.disconnecting = True
            if not self._buffer:
                self._shutdown_tls()

    # -- writing ----------------------------------------------------------------

    def _wait_writable(self) -> None:
        self._want_write = True
        self._start_writing()

    def _send_record(self, data, size: int) -> int:
        """
        One C{SSL_write} of C{size} bytes (at most a record) from C{data}
        (C{bytes}, or a cffi pointer into a buffer).

        @return: the bytes OpenSSL took, 0 when it waits for the socket, or
            -1 when the connection was closed.
        """
        tls = self.tls
        assert tls is not None  # written only while connected
        try:
            sent = _SSL_write(tls._ssl, data, size)
            if sent <= 0:
                _failed(tls, sent)
        except _WantWrite:
            self._wait_writable()
            return 0
        except _WantRead:
            self._write_wants_read = True
            return 0
        except SSL.SysCallError as e:
            return self._write_failed(_lost(e))
        except _SSLError:
            return self._write_failed(Failure())
        return sent

    def _write_failed(self, reason: Failure) -> int:
        """
        A write failed (the client reset the connection, a broken TLS
        state): nothing more is written, and the connection closes with
        C{reason} on the next write event, from the reactor, never inside
        the caller's C{write} (as Twisted's transports, and the lean TCP
        ones: the protocol does not hear C{connectionLost} in the middle
        of its own call).

        @return: -1
        """
        if self._write_failure is None:
            self._write_failure = reason
        self._wait_writable()
        return -1

    def _send(self, view) -> int:
        """
        C{SSL_write} C{view} a record at a time.

        @return: the bytes OpenSSL took, or -1 when the connection was closed.
        """
        total = 0
        size = len(view)
        while total < size:
            with view[total:total + _RECORD] as chunk, _from_buffer(chunk) as pointer:
                sent = self._send_record(pointer, len(chunk))
            if sent <= 0:
                return total if sent == 0 else -1
            total += sent
        return total

    def write(self, data: bytes) -> None:
        if not self.connected or self._write_closed or not data or self._write_failure is not None:
            return
        buffer = self._buffer
        if not buffer and self._handshake_done and not self._shutdown_pending:
            if type(data) is bytes and len(data) <= _RECORD:
                sent = self._send_record(data, len(data))  # (most writes: no view, no loop)
            else:
                with memoryview(data) as view:
                    sent = self._send(view)
            if sent < 0:
                return
            if sent == len(data):
                if self.producer is not None and not self.streamingProducer:
                    self._wait_writable()  # a pull producer is asked for more on the next write event
                return
            # (A copy, not a view: the caller may reuse a bytearray it wrote.)
            buffer += data[sent:]
        else:
            buffer += data
        if self.producer is not None and self.streamingProducer and not self.producerPaused \
                and len(buffer) > self.bufferSize:
            self.producerPaused = True
            self.producer.pauseProducing()

    def doWrite(self) -> None:
        self._want_write = False
        if self._write_failure is not None:
            self._close(self._write_failure)
            return
        if not self._handshake_done:
            self._handshake()
        elif self._read_wants_write:
            self._read_wants_write = False
            if self._reading:
                self._read()
            if not self.connected:
                return
            if not self._want_write:
                self._flush()
        elif self._shutdown_pending:
            if self.disconnecting:
                self._shutdown_tls()
            else:
                self._shutdown_write()
        else:
            self._flush()
        if not self._want_write and self.connected:
            self._stop_writing()

    def _flush(self) -> None:
        """Send what is buffered; then resume the producer, or finish a close."""
        buffer = self._buffer
        if buffer:
            with memoryview(buffer) as view:
                sent = self._send(view)
            if sent < 0:
                # (Called from the reactor: the failed write closes now.)
                assert self._write_failure is not None
                self._close(self._write_failure)
                return
            del buffer[:sent]
            if buffer:
                return
        producer = self.producer
        if producer is not None and (not self.streamingProducer or self.producerPaused):
            self.producerPaused = False
            producer.resumeProducing()
            if self._buffer or not self.connected or self._want_write:
                return  # it wrote again: finish on a later write event
        if self.disconnecting:
            self._shutdown_tls()
        elif self._write_closing and not self._write_closed:
            self._shutdown_write()

    # -- closing ----------------------------------------------------------------

    def _close_notify(self) -> bool:
        """Send close_notify; C{False} while the socket has no room for it."""
        if self._write_failure is not None:
            return False  # the connection is broken: the write event closes it
        self._shutdown_pending = False
        tls = self.tls
        assert tls is not None  # sent only while connected
        try:
            tls.shutdown()
        except _WantWrite:
            self._shutdown_pending = True
            self._wait_writable()
            return False
        except _SSLError:
            pass  # mid-handshake, or the connection broke: close anyway
        return True

    def _shutdown_tls(self) -> None:
        if self._close_notify():
            self._close(_DONE)

    def loseWriteConnection(self) -> None:
        """Send close_notify and shut the sending side down once what is buffered is sent."""
        if not self.connected or self._write_closing:
            return
        self._write_closing = True
        if not self._buffer and self._handshake_done:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        if not self._close_notify():
            return  # again when the socket takes it (doWrite -> _shutdown_tls)
        LeanConnection._shutdown_write(self)

    def loseConnection(self) -> None:
        """
        Close once what is buffered is sent, with close_notify first; at
        once, without one, while the handshake is not done (as Twisted).
        """
        if not self.connected or self.disconnecting:
            return
        if not self._handshake_done:
            self.abortConnection()
            return
        self.disconnecting = True
        self.stopReading()
        if not self._buffer:
            self._shutdown_tls()

    def abortConnection(self) -> None:
        """Close at once, dropping what is buffered, without close_notify; the client gets a reset."""
        if not self.connected:
            return
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
        self._close(_ABORTED)

    def _close(self, reason: Failure) -> None:
        LeanConnection._close(self, reason)
        self.tls = None

    def resumeProducing(self) -> None:
        LeanConnection.resumeProducing(self)
        tls = self.tls
        if self._reading and tls is not None and self._handshake_done and tls.pending():
            self.reactor.callLater(0, self._read_pending)


@implementer(ISSLTransport, INegotiated, ISystemHandle)
class LeanTLSServer(LeanTLSConnection, LeanServer):
    """
    An accepted connection served over TLS by OpenSSL on the socket.

    A listening C{tcp.Port} builds it (see L{serve_port}) with the
    signature of C{tcp.Server}; the class the port holds is a subclass
    made for one L{TLSServerFactory}, L{tls_factory}.

    @cvar tls_factory: the listener's L{TLSServerFactory}: its C{options}
        give the context, its C{handshake_timeout} and C{reactor} the
        handshake's deadline.
    """

    tls_factory: TLSServerFactory = None  # type: ignore[assignment]
    _timer = None
    _timed_out = False
    #: the protocol ALPN chose is being connected; a close meanwhile is held
    #: in C{_held_close} until it is this transport's protocol
    _choosing = False
    _held_close = None
    #: bytes the client had sent when its first read came (for the log line
    #: of a handshake that fails)
    received_bytes = 0

    def __init__(self, sock, protocol, client, server, sessionno, reactor) -> None:
        factory = self.tls_factory
        LeanServer.__init__(self, sock, protocol, client, server, sessionno, reactor)
        self.tls = _new_connection(factory.options.server_context(), sock)
        self.tls.set_accept_state()
        timeout = factory.handshake_timeout
        if timeout:
            self._timer = factory.reactor.callLater(timeout, self._handshake_timed_out)

    # -- the handshake ----------------------------------------------------------

    def _handshake(self) -> None:
        tls = self.tls
        assert tls is not None  # the handshake runs on an open connection
        try:
            tls.do_handshake()
        except _WantRead:
            return
        except _WantWrite:
            self._wait_writable()
            return
        except _SSLError as e:
            self._handshake_failed(e)
            return
        self._handshake_done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        protocol = self.protocol
        # The protocol ALPN chose decides who serves the connection (as
        # twisted_slb.tls's guard does on Twisted's TLS): an HTTP listener's
        # channel hands it to HTTP/2 for "h2".
        # The chosen protocol is connected (and may write, or close) before
        # it is returned: a close meanwhile (its first write meeting a
        # client already gone, a broken pipe) waits until it is this
        # transport's protocol, so that it hears connectionLost, not the
        # protocol it replaced (which let go of the connection, and whose
        # factory would forget the wrong one).
        choose = getattr(protocol, "protocol_for_alpn", None)
        if choose is not None:
            self._choosing = True
            try:
                chosen = choose(self.negotiatedProtocol)
            finally:
                self._choosing = False
            if chosen is not protocol:
                protocol = self.protocol = chosen
                self._half = protocol if IHalfCloseableProtocol.providedBy(protocol) else None
            held, self._held_close = self._held_close, None
            if held is not None:
                self._close(held)
                return
        completed = getattr(protocol, "handshakeCompleted", None)
        if completed is not None:
            completed()
        if (self._buffer or self._write_closing) and self.connected:
            self._flush()

    def _handshake_failed(self, e: BaseException) -> None:
        if isinstance(e, SSL.SysCallError):
            reason = _lost(e)
        else:
            reason = Failure(e)
        if not self._timed_out:
            log_handshake_failure(self.getPeer(), reason, self.received_bytes)
        self._close(reason)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self._timed_out = True
        timeout = self.tls_factory.handshake_timeout
        assert timeout is not None  # the timer is only set with a timeout
        log_handshake_timeout(self.getPeer(), timeout)
        self.abortConnection()

    def doRead(self) -> None:
        if not self._handshake_done and not self.received_bytes:
            try:
                self.received_bytes = len(self.socket.recv(_RECORD, socket.MSG_PEEK))
            except OSError:
                pass
        LeanTLSConnection.doRead(self)

    def _close(self, reason: Failure) -> None:
        if not self.connected:
            return
        if self._choosing:
            # (See _handshake: done once the chosen protocol is in place.)
            if self._held_close is None:
                self._held_close = reason
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._handshake_done and not self._timed_out and reason is not _DONE \
                and not reason.check(SSL.Error, error.ConnectionLost):
            # The client's EOF, a reset, the reactor's shutdown: as the
            # guard of Twisted's path, one line for a failed handshake
            # (those of OpenSSL and of an EOF were logged already).
            log_handshake_failure(self.getPeer(), reason, self.received_bytes)
        LeanTLSConnection._close(self, reason)


def serve_port(port, switch, factory) -> bool:
    """
    Make the listening C{port}, whose factory is C{switch}, give the
    connections it accepts for C{factory} a L{LeanTLSServer} transport,
    when C{factory} is an https listener's L{TLSServerFactory} with
    L{twisted_slb.tls.SNIServerOptions}, L{enabled} is true, and the port
    is a plain TCP port of a reactor that can drive lean transports.

    Otherwise the port's transports are left as they are (Twisted's), and
    C{factory} keeps wrapping its protocols in Twisted's TLS.

    @return: whether it does now.
    """
    if (
        enabled
        and isinstance(factory, TLSServerFactory)
        and getattr(factory, "lean_tls", True)
        and callable(getattr(factory.options, "server_context", None))
        and type(port) is tcp.Port
        and port.transport is tcp.Server
        and getattr(port, "factory", None) is switch
        and lean.usable(getattr(port, "reactor", None))
    ):
        transport = factory.lean_transport
        if transport is None:
            transport = type("LeanTLSServer", (LeanTLSServer,), {"tls_factory": factory})
        # tcp.Port documents its transport attribute as replaceable: it
        # builds the class with tcp.Server's signature, which ours has.
        port.transport = factory.lean_transport = cast("Type[tcp.Server]", transport)
        return True
    return False


#: TLS sessions kept for resumption, at most (one per backend and settings)
_MAX_SESSIONS = 4096


class BackendTLSError(error.ConnectError):
    """
    TLS to a backend failed: the handshake (OpenSSL's reason, such as
    C{certificate verify failed}), or the check of the certificate's name.
    A L{error.ConnectError}: nothing was sent, the connect failed.
    """

    def __str__(self) -> str:
        return f"TLS to the backend failed: {self.args[0]}"


@implementer(ISSLTransport, INegotiated, ISystemHandle)
class LeanTLSClient(LeanTLSConnection):
    """
    A backend connection over TLS, made by L{LeanTLSConnector} once the
    handshake is done and the backend's certificate verified: its protocol
    is connected only to a verified peer, so nothing it writes can reach
    another.

    @ivar _sessions: where to keep the connection's TLS session once it is
        resumable (after the first read: a TLS 1.3 ticket comes after the
        handshake), under C{_session_key}; L{None} once kept, or without.
    """

    _handshake_done = True
    _sessions: Optional[dict] = None
    _session_key = None

    def __init__(self, sock: socket.socket, protocol, reactor, tls: SSL.Connection) -> None:
        LeanConnection.__init__(self, sock, protocol, reactor)
        self.tls = tls

    def _handshake(self) -> None:
        """Never called: the connector did it."""

    def doRead(self) -> None:
        LeanTLSConnection.doRead(self)
        sessions = self._sessions
        if sessions is not None:
            tls = self.tls
            if tls is not None:
                self._sessions = None
                session = tls.get_session()
                if session is not None:
                    if len(sessions) >= _MAX_SESSIONS and self._session_key not in sessions:
                        sessions.clear()  # (keys of backends long gone, after many reloads)
                    sessions[self._session_key] = (tls.get_context(), session)


@implementer(IReadWriteDescriptor)
class LeanTLSConnector(LeanConnector):
    """
    One TLS connect (see L{connect}): the TCP connect of L{LeanConnector},
    then the TLS handshake on the socket, then the check of the backend's
    certificate by C{client_tls}.  Only then is the factory's protocol
    built, on a L{LeanTLSClient}: before, nobody can write.

    The connect's timeout covers the handshake too (a backend that accepts
    and never answers its ClientHello times out as one that never accepts).
    A failed handshake or check is reported to the factory's
    C{clientConnectionFailed} as a L{BackendTLSError} saying why; the
    socket is closed without a byte of the application's.

    @ivar client_tls: a L{twisted_slb.tls.BackendClientTLS}: the context,
        the SNI name, the check of the certificate.
    @ivar sessions: a dictionary of TLS sessions (of earlier connections)
        to resume, by C{session_key}; L{None} for none.
    """

    _tls: Optional[SSL.Connection] = None
    #: registered with the reactor for reading / for writing (the TCP
    #: connect waits for writability)
    _tls_reading = False
    _tls_writing = True

    def __init__(self, reactor, family: int, host: str, port: int, factory, timeout: float, client_tls,
                 sessions: Optional[dict] = None, session_key=None, deadlines=None) -> None:
        self.client_tls = client_tls
        self.sessions = sessions
        self.session_key = session_key
        LeanConnector.__init__(self, reactor, family, host, port, factory, timeout, deadlines)

    def __repr__(self) -> str:
        return f"<LeanTLSConnector to {self.address.host}:{self.address.port}>"

    def logPrefix(self) -> str:
        return "LeanTLSConnector"

    def doWrite(self) -> None:
        if self._tls is None:
            self._tcp_connected()
        else:
            self._handshake()

    def doRead(self) -> None:
        if self._tls is not None:
            self._handshake()

    def _tcp_connected(self) -> None:
        sock = self.sock
        assert sock is not None  # registered only while connecting, with its socket
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(error.getConnectError((err, os.strerror(err))))
            return
        client_tls = self.client_tls
        try:
            tls = _new_connection(client_tls.context(), sock)
            tls.set_connect_state()
            if client_tls.sni is not None:
                tls.set_tlsext_host_name(client_tls.sni)
            sessions = self.sessions
            if sessions is not None:
                kept = sessions.get(self.session_key)
                # (Only a session of this context: the options of a group
                # whose settings changed have a new one.)
                if kept is not None and kept[0] is tls.get_context():
                    tls.set_session(kept[1])
        except _SSLError as e:
            self._fail(BackendTLSError(string=f"cannot start TLS: {_describe(e)}"))
            return
        self._tls = tls
        self._handshake()

    def _wait(self, readable: bool) -> None:
        """Be called back when the socket is readable (else writable), not on the other event."""
        reactor = self.reactor
        if readable:
            if not self._tls_reading:
                self._tls_reading = True
                reactor.addReader(self)
            if self._tls_writing:
                self._tls_writing = False
                reactor.removeWriter(self)
        else:
            if not self._tls_writing:
                self._tls_writing = True
                reactor.addWriter(self)
            if self._tls_reading:
                self._tls_reading = False
                reactor.removeReader(self)

    def _handshake(self) -> None:
        tls = self._tls
        assert tls is not None  # set by _tcp_connected
        try:
            tls.do_handshake()
        except _WantRead:
            self._wait(True)
            return
        except _WantWrite:
            self._wait(False)
            return
        except SSL.SysCallError as e:
            self._fail(BackendTLSError(string=f"connection lost in the handshake: {_lost(e).getErrorMessage()}"))
            return
        except _SSLError as e:
            self._fail(BackendTLSError(string=f"handshake: {_describe(e)}"))
            return
        client_tls = self.client_tls
        try:
            client_tls.check(tls)
        except Exception as e:
            # (service_identity's VerificationError, or its
            # CertificateError for a certificate it cannot read.)
            self._fail(BackendTLSError(
                string=f"its certificate is not valid for {client_tls.server_name!r}: {e}"))
            return
        # Verified: the application may have the connection.
        protocol = self.factory.buildProtocol(self.address)
        if protocol is None:
            self._fail(error.NoProtocol())
            return
        sock, self.sock = self.sock, None
        assert sock is not None
        self._tls = None
        self._finish()
        transport = LeanTLSClient(sock, protocol, self.reactor, tls)
        transport._peer = self.address
        if self.sessions is not None:
            transport._sessions = self.sessions
            transport._session_key = self.session_key
        transport.startReading()
        protocol.makeConnection(transport)
        completed = getattr(protocol, "handshakeCompleted", None)
        if completed is not None and transport.connected:
            completed()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor saw the socket fail, or is shutting down."""
        if self._tls is None:
            LeanConnector.connectionLost(self, reason)
        else:
            self._fail(BackendTLSError(string=f"connection lost in the handshake: {reason.getErrorMessage()}"))

    def _finish(self) -> None:
        if self._tls_reading:
            self._tls_reading = False
            self.reactor.removeReader(self)
        self._tls_writing = False
        LeanConnector._finish(self)  # (removes it as a writer)
        self._tls = None


def _describe(e: BaseException) -> str:
    """OpenSSL's reason for a failed handshake: C{certificate verify failed}, ..."""
    args = getattr(e, "args", ())
    if args and isinstance(args[0], list):
        reasons = [str(entry[-1]) for entry in args[0] if isinstance(entry, tuple) and entry]
        if reasons:
            return ", ".join(reasons)
    return str(e) or e.__class__.__name__


def connect(reactor, host: str, port: int, factory, client_tls, timeout: float = 30,
            sessions: Optional[dict] = None, session_key=None):
    """
    Connect to C{host}:C{port} over TLS for C{factory} (a C{ClientFactory})
    with the settings of C{client_tls} (a
    L{twisted_slb.tls.BackendClientTLS}), as C{reactor.connectSSL} does with
    its connection creator, but on a L{LeanTLSClient}, and with the
    protocol built only once the backend's certificate passed (see
    L{LeanTLSConnector}).

    A host name (not an IP address), a reactor that cannot drive lean
    transports, or L{enabled} false: C{reactor.connectSSL} with
    C{client_tls} as its connection creator.

    @param sessions: TLS sessions to resume and keep, by C{session_key}.
    @return: the connector (C{disconnect()} gives up on it).
    """
    family = lean._family(host) if enabled and lean.usable(reactor) else None
    if family is None:
        return reactor.connectSSL(host, port, factory, client_tls, timeout=timeout)
    return LeanTLSConnector(reactor, family, host, port, factory, timeout, client_tls, sessions, session_key)
