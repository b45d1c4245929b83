"""
Server TLS: terminating HTTPS for clients.

L{SNIServerOptions} turns a L{CertificateSet} (see
L{twisted_slb.tls.load_certificate_set}) into one L{OpenSSL.SSL.Context}
per certificate, built once, and picks the context for each connection from
the client's SNI name: exact name, then wildcard, then the default (the
first certificate).  L{server_tls_factory} wraps a protocol factory (a
L{twisted.web.server.Site}) in TLS with a handshake timeout and a single log
line for each failed handshake.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from OpenSSL import SSL
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_slb._reactor import maybe_global_reactor
from twisted_slb._typing import IStreamTransport
from twisted_slb.errors import ConfigError
from twisted_slb.tls._certificates import CertificateSet, LoadedCertificate

log = Logger(namespace="twisted_slb.tls")

#: OpenSSL's SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER (ssl.h; pyOpenSSL does not
#: name it): a retried SSL_write may pass the same bytes from another address.
_MODE_ACCEPT_MOVING_WRITE_BUFFER = getattr(SSL, "MODE_ACCEPT_MOVING_WRITE_BUFFER", 0x2)

#: TLS 1.2 cipher suites offered to clients: ECDHE key exchange only (forward
#: secrecy) with AEAD ciphers only (AES-GCM, ChaCha20-Poly1305), ECDSA before
#: RSA, 128-bit AES first (as fast, and as strong in practice).  This is
#: Mozilla's "intermediate" list without its finite-field DHE suites, which
#: are slow and rarely needed.  TLS 1.3 suites are all forward secret and
#: AEAD, so OpenSSL's defaults for them are kept.
MODERN_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

#: The allowed values of a listener's C{min_tls}, and OpenSSL's constants.
TLS_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


#: Same for every context: OpenSSL only resumes a session within the same
#: session id context, and a connection moved to another certificate's
#: context by SNI must keep matching.
_SESSION_ID_CONTEXT = b"twisted_slb"


# --- server contexts --------------------------------------------------------


def _use(method, value, convert) -> None:
    """
    Call a pyOpenSSL C{Context} method with a C{cryptography} object: newer
    pyOpenSSL takes those directly (and deprecates its own wrappers), the
    older one PyPy is pinned to needs the wrapper.
    """
    try:
        method(value)
    except TypeError:
        method(convert(value))


class _ContextsSnapshot:
    """
    The contexts of one L{CertificateSet}: replaced as a whole on reload, so
    a connection sees either the old set or the new one, never a mixture.
    """

    def __init__(self, certificate_set: CertificateSet, contexts: List[SSL.Context], built_at: float) -> None:
        self.built_at = built_at
        self.certificate_set = certificate_set
        self.contexts = contexts
        self.default = contexts[0]


@implementer(IOpenSSLServerConnectionCreator)
class SNIServerOptions:
    """
    Server TLS settings choosing a certificate by SNI: pass it to
    L{TLSMemoryBIOFactory} (or L{server_tls_factory}).

    Every certificate gets its own L{SSL.Context}, built once.  A connection
    starts on the default certificate's context; when the client's hello
    names a server, a servername callback moves the connection to that
    name's context.

    Each context: TLS 1.2 or 1.3 minimum; no compression (CRIME); no
    client-initiated renegotiation; server cipher preference with
    L{MODERN_CIPHERS}; ALPN chosen in C{alpn}'s order; and session
    resumption both by an in-memory session cache and by session tickets.
    OpenSSL never rotates a context's ticket key by itself, and a stolen
    ticket key decrypts every TLS 1.2 session made while it was in use: so
    the contexts (with a new random ticket key, and an empty cache) are
    built again once C{ticket_key_lifetime} seconds have passed, at the
    next new connection, as they are at every reload.  A ticket made with
    the previous key then gets a full handshake.

    pyOpenSSL (26) and the OpenSSL bindings of cryptography (50) expose no
    way to set a ticket key (C{SSL_CTX_set_tlsext_ticket_keys}, or the key
    callback), so each process has keys of its own: with C{workers}, a
    client resumes its session when it reaches the same worker again.

    @ivar min_tls: C{"1.2"} or C{"1.3"}.
    @ivar alpn: protocols offered over ALPN, best first.
    @ivar ticket_key_lifetime: seconds a ticket key is used for, or
        L{None} for no rotation but by reloads.
    """

    def __init__(
        self,
        certificate_set: CertificateSet,
        min_tls: str = "1.2",
        alpn: Sequence[str] = ("http/1.1",),
        ticket_key_lifetime: Optional[float] = 3600.0,
        clock: Optional[IReactorTime] = None,
    ) -> None:
        """
        @param clock: tells the age of the ticket key; default: the global
            reactor.
        @raise ValueError: C{min_tls} or an C{alpn} name is invalid.
        @raise ConfigError: OpenSSL refuses a certificate or key (the message
            names its field and file).
        """
        if min_tls not in TLS_VERSIONS:
            raise ValueError(f"min_tls must be one of {sorted(TLS_VERSIONS)}, not {min_tls!r}")
        protocols = []
        for name in alpn:
            encoded = name.encode("ascii") if isinstance(name, str) else bytes(name)
            if not 0 < len(encoded) < 256:
                raise ValueError(f"an ALPN protocol name must be 1..255 bytes, not {name!r}")
            protocols.append(encoded)
        self.min_tls = min_tls
        self.alpn: Tuple[bytes, ...] = tuple(protocols)
        self._clock = maybe_global_reactor(clock)
        self.ticket_key_lifetime = ticket_key_lifetime
        self._reported_names: Dict[bytes, None] = {}
        self._current = self._build(certificate_set)

    @property
    def certificate_set(self) -> CertificateSet:
        """The certificates new connections are served with."""
        return self._current.certificate_set

    def reload(self, certificate_set: CertificateSet) -> None:
        """
        Serve new connections with C{certificate_set}.  Every context is built
        before the switch, which is a single assignment: connections already
        open (or mid-handshake) keep the context they have.

        @raise ConfigError: OpenSSL refuses a certificate; the old set stays.
        """
        self._current = self._build(certificate_set)

    def _build(self, certificate_set: CertificateSet) -> _ContextsSnapshot:
        contexts = [self._context_for(entry) for entry in certificate_set.entries]
        snapshot = _ContextsSnapshot(certificate_set, contexts, self._clock.seconds())
        snapshot.default.set_tlsext_servername_callback(self._servername_callback(snapshot))
        return snapshot

    def _context_for(self, entry: LoadedCertificate) -> SSL.Context:
        from OpenSSL import crypto

        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(TLS_VERSIONS[self.min_tls])
        ctx.set_options(
            SSL.OP_NO_COMPRESSION
            | SSL.OP_CIPHER_SERVER_PREFERENCE
            | getattr(SSL, "OP_NO_RENEGOTIATION", 0)
        )
        # Idle keep-alive connections give their buffers back. A write that
        # OpenSSL could not finish (the socket full, on the lean transport,
        # twisted_slb._io.leantls) is retried with the same bytes, but not
        # from the same address: the rest of a write is copied into the
        # transport's buffer, whose storage may move as it is sent (on PyPy
        # when its head is deleted). Without ACCEPT_MOVING_WRITE_BUFFER
        # OpenSSL fails that retry ("bad write retry") and the connection is
        # lost. Recent pyOpenSSL (26.4) sets the mode on every context, as
        # Python's ssl module does; 24.3 (the last with PyPy 3.9 wheels, and
        # allowed on CPython too) does not.
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS | _MODE_ACCEPT_MOVING_WRITE_BUFFER)
        ctx.set_cipher_list(MODERN_CIPHERS.encode("ascii"))
        ctx.set_session_id(_SESSION_ID_CONTEXT)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        if self.alpn:
            ctx.set_alpn_select_callback(self._select_alpn)
        try:
            _use(ctx.use_certificate, entry.certificate, crypto.X509.from_cryptography)
            _use(ctx.use_privatekey, entry.key, crypto.PKey.from_cryptography_key)
            for extra in entry.chain:
                _use(ctx.add_extra_chain_cert, extra, crypto.X509.from_cryptography)
            ctx.check_privatekey()
        except SSL.Error as e:
            raise ConfigError(
                f"{entry.where}: OpenSSL refuses {entry.config.cert} with key "
                f"{entry.config.key}: {_ssl_reason(e)}"
            ) from None
        return ctx

    def _select_alpn(self, conn: SSL.Connection, offered: List[bytes]):
        for protocol in self.alpn:
            if protocol in offered:
                return protocol
        # No overlap: carry on without ALPN (the client then speaks its
        # default, HTTP/1.1) rather than failing the handshake.
        return getattr(SSL, "NO_OVERLAPPING_PROTOCOLS", b"")

    def _servername_callback(self, snapshot: _ContextsSnapshot):
        certificate_set = snapshot.certificate_set
        contexts = snapshot.contexts

        def on_servername(conn: SSL.Connection) -> None:
            # An exception must not escape into OpenSSL; the connection then
            # simply keeps the default certificate.
            try:
                name = conn.get_servername()
                index = certificate_set.index_for(name)
                if index is None:
                    if name is not None:
                        self._report_unknown(name)
                elif index:
                    conn.set_context(contexts[index])
            except BaseException:
                log.failure("while choosing a certificate by SNI")

        return on_servername

    def _report_unknown(self, name: bytes) -> None:
        # Once per name (a bounded memory of them), at debug level: a scanner
        # sending random names must not flood the log.
        if name in self._reported_names or len(self._reported_names) >= 1024:
            return
        self._reported_names[name] = None
        log.debug(
            "no certificate for SNI name {name}: serving the default certificate",
            name=name.decode("ascii", "replace"),
        )

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        """
        A new server connection starting on the default certificate's context
        (L{IOpenSSLServerConnectionCreator}), with a new ticket key once the
        current one is C{ticket_key_lifetime} old.
        """
        return SSL.Connection(self.server_context(), None)

    def server_context(self) -> SSL.Context:
        """
        The context a new connection starts on (the default certificate's;
        SNI may move it), with a new ticket key once the current one is
        C{ticket_key_lifetime} old.  L{twisted_slb._io.leantls} builds its
        connections on a socket with it.
        """
        current = self._current
        lifetime = self.ticket_key_lifetime
        if lifetime is not None and self._clock.seconds() - current.built_at >= lifetime:
            try:
                current = self._current = self._build(current.certificate_set)
            except ConfigError as e:  # the files were read and checked at load: unlikely
                log.error("TLS ticket key rotation failed, keeping the current key: {error}", error=str(e))
        return current.default


# --- the server factory: handshake timeout and failures ---------------------


def _ssl_reason(error: BaseException) -> str:
    """A short text for an L{SSL.Error}: OpenSSL's reason strings."""
    args: Tuple[object, ...] = getattr(error, "args", ())
    if args and isinstance(args[0], list):
        reasons = [str(entry[-1]) for entry in args[0] if entry and entry[-1]]
        if reasons:
            return "; ".join(reasons)
    if len(args) == 2 and isinstance(args[1], str):  # SysCallError(-1, "Unexpected EOF")
        return args[1]
    return str(error) or error.__class__.__name__


def describe_address(address) -> str:
    """C{host:port} of an address, IPv6 hosts in brackets (for log lines)."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class _CountingTLSProtocol(BufferingTLSTransport):
    """
    Twisted's TLS protocol, counting the bytes the client sent: a connection
    closed before the handshake ended with nothing received (a port check)
    is not worth a log line, one that sent a partial hello is.

    @ivar received_bytes: bytes received from the client so far.
    """

    received_bytes = 0

    def dataReceived(self, data: bytes) -> None:
        self.received_bytes += len(data)
        BufferingTLSTransport.dataReceived(self, data)

    def _shutdownTLS(self) -> None:
        # Twisted sends close_notify and then keeps the TCP connection open
        # until the client answers with its own close_notify, which many
        # clients never send (openssl s_time, scripts that read to the end),
        # so a closed HTTPS connection could linger until the idle timeout.
        # As nginx and HAProxy do, and as TLS allows (RFC 8446 6.1, RFC
        # 5246 7.2.1), close once our close_notify is written.  Every
        # caller of this private method closes the whole connection
        # (loseConnection, abortConnection, a received close_notify);
        # tests/test_tls.py fails if Twisted stops calling it there.
        if self._tlsConnection is None:
            return  # the connection is gone already (an unregisterProducer after it)
        BufferingTLSTransport._shutdownTLS(self)
        transport = self.transport
        if transport is not None and not self._aborted:
            transport.loseConnection()

    _streaming_producer = False

    def registerProducer(self, producer, streaming: bool) -> None:
        self._streaming_producer = bool(streaming)
        BufferingTLSTransport.registerProducer(self, producer, streaming)

    def unregisterProducer(self) -> None:
        self._streaming_producer = False
        BufferingTLSTransport.unregisterProducer(self)

    def loseConnection(self) -> None:
        # Twisted's TLS transport does not close while a producer is
        # registered; a TCP transport closes once its buffer is sent even
        # with a streaming producer registered, and the HTTPS listener's
        # connection (twisted_slb.web.front), written for those, stays
        # registered as the producer of its client's socket for its whole
        # life.  Without this, a connection closed by the balancer
        # (Connection: close, HTTP/1.0, an error answer) sent nothing and
        # lingered until the idle timeout.
        BufferingTLSTransport.loseConnection(self)
        if self._streaming_producer and not self._appSendBuffer and self._tlsConnection is not None:
            self._shutdownTLS()


@implementer(IHandshakeListener)
class _HandshakeGuard(Protocol):
    """
    Sits between the TLS layer and the application protocol until, and
    after, the handshake: it closes a connection whose handshake takes too
    long and logs one line when a handshake fails.

    It is not a transport: the application protocol's transport is the TLS
    protocol itself, so writes do not pass through here and the application
    sees the TLS transport's interfaces (C{ISSLTransport}) unchanged.

    @ivar wrapped: the application protocol.
    """

    # Connected before any method below runs (see twisted_slb._typing).
    transport: IStreamTransport

    def __init__(self, wrapped, clock: IReactorTime, timeout: Optional[float], addr) -> None:
        self.wrapped = wrapped
        self._clock = clock
        self._timeout = timeout
        self._addr = addr
        self._timer: Optional[IDelayedCall] = None
        self._handshake_done = False
        self._timed_out = False

    def logPrefix(self) -> str:
        prefix = getattr(self.wrapped, "logPrefix", None)
        return prefix() if prefix is not None else self.wrapped.__class__.__name__

    def makeConnection(self, transport) -> None:
        Protocol.makeConnection(self, transport)
        if self._timeout:
            self._timer = self._clock.callLater(self._timeout, self._handshake_timed_out)
        self.wrapped.makeConnection(transport)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self._timed_out = True
        assert self._timeout is not None  # the timer runs only with a timeout
        log_handshake_timeout(self._addr, self._timeout)
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        self._handshake_done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # The protocol ALPN chose decides who serves the connection: an
        # HTTP listener's channel hands it to HTTP/2 for "h2".
        choose = getattr(self.wrapped, "protocol_for_alpn", None)
        if choose is not None:
            self.wrapped = choose(getattr(self.transport, "negotiatedProtocol", None))
        if IHandshakeListener.providedBy(self.wrapped):
            self.wrapped.handshakeCompleted()

    def dataReceived(self, data: bytes) -> None:
        self.wrapped.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._handshake_done and not self._timed_out:
            self._log_failure(reason)
        self.connected = False
        self.wrapped.connectionLost(reason)

    def _log_failure(self, reason: Failure) -> None:
        log_handshake_failure(self._addr, reason, getattr(self.transport, "received_bytes", 0))


def log_handshake_failure(addr, reason: Failure, received: int) -> None:
    """
    The one log line of a handshake that failed (not one that timed out):
    OpenSSL's reason, or how much the client sent before it closed.

    @param addr: the client's address.
    @param reason: why the connection ended before the handshake did.
    @param received: bytes the client had sent.
    """
    client = describe_address(addr)
    if reason.check(SSL.Error):
        log.info(
            "TLS handshake from {client} failed: {reason}",
            client=client,
            reason=_ssl_reason(reason.value),
        )
        return
    if received:
        log.info(
            "TLS handshake from {client} failed: connection closed mid-handshake "
            "after {received} bytes",
            client=client,
            received=received,
        )
    else:
        log.debug("connection from {client} closed before any TLS data", client=client)


def log_handshake_timeout(addr, timeout: float) -> None:
    """The log line of a handshake that did not finish within C{timeout} seconds."""
    log.info(
        "TLS handshake from {client} timed out after {timeout}s: closing",
        client=describe_address(addr),
        timeout=timeout,
    )


class TLSServerFactory(TLSMemoryBIOFactory):
    """
    A L{TLSMemoryBIOFactory} for servers that closes connections whose
    handshake does not finish within C{handshake_timeout} seconds and logs
    each failed handshake once, in one line with the client's address and
    OpenSSL's reason.  Other connections are never affected.

    @ivar options: the L{IOpenSSLServerConnectionCreator} (usually
        L{SNIServerOptions}: call its C{reload} to change certificates).
    @ivar handshake_timeout: seconds, or L{None} for no limit.
    """

    protocol = _CountingTLSProtocol

    def __init__(
        self,
        options,
        wrapped_factory: IProtocolFactory,
        reactor: IReactorTime,
        handshake_timeout: Optional[float] = 10.0,
    ) -> None:
        TLSMemoryBIOFactory.__init__(self, options, False, wrapped_factory, clock=reactor)
        self.options = options
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout

    #: set by L{twisted_slb._io.leantls.serve_port} while a listening port gives
    #: this factory's connections lean TLS transports (the class the port
    #: builds), which do TLS, the handshake timeout and its log lines
    #: themselves: the factory then builds the application's protocol alone.
    lean_transport: Optional[type] = None

    def buildProtocol(self, addr):
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None or self.lean_transport is not None:
            return wrapped
        guard = _HandshakeGuard(wrapped, self.reactor, self.handshake_timeout, addr)
        return self.protocol(self, guard)


def server_tls_factory(
    options,
    wrapped_factory: IProtocolFactory,
    reactor: Optional[IReactorTime] = None,
    handshake_timeout: Optional[float] = 10.0,
) -> TLSServerFactory:
    """
    Serve C{wrapped_factory}'s protocol over TLS.

    @param options: an L{IOpenSSLServerConnectionCreator}, normally an
        L{SNIServerOptions}.
    @param wrapped_factory: the application's factory, e.g. a C{Site}.
    @param reactor: for the handshake timeout and write batching; default:
        the global reactor.
    @param handshake_timeout: seconds a client has to finish its handshake,
        or L{None} for no limit.
    """
    return TLSServerFactory(options, wrapped_factory, maybe_global_reactor(reactor), handshake_timeout)

