"""
TLS: terminating HTTPS for clients, and speaking TLS to backends.

Server side
===========

L{load_certificate_set} reads an https listener's C{certificates} (PEM
certificate, key and optional chain files), checks them and finds the names
each one serves.  L{SNIServerOptions} turns that set into one
L{OpenSSL.SSL.Context} per certificate, built once, and picks the context for
each connection from the client's SNI name: exact name, then wildcard, then
the default (the first certificate).  L{server_tls_factory} wraps a protocol
factory (a L{twisted.web.server.Site}) in TLS with a handshake timeout and a
single log line for each failed handshake.

Client side
===========

L{client_tls_options} builds the connection creator for TLS to one backend,
verified with service_identity against the group's C{server_name} or the
backend's host; L{ClientTLSCache} builds each of those once per group and
host rather than once per connection.
"""

from __future__ import annotations

import datetime
import re
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import attr
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_slb.errors import ConfigError

if TYPE_CHECKING:
    # Only for annotations: the interface of trust roots is not re-exported
    # by a public module (twisted.internet.ssl documents it but does not
    # export it).
    from twisted_slb._io.twisted_private import IOpenSSLTrustRoot
    from twisted_slb.config import BackendTLSConfig, CertificateConfig

log = Logger(namespace="twisted_slb.tls")

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

#: A certificate that expires sooner than this gets a warning at every load.
EXPIRY_WARNING = datetime.timedelta(days=14)

#: Same for every context: OpenSSL only resumes a session within the same
#: session id context, and a connection moved to another certificate's
#: context by SNI must keep matching.
_SESSION_ID_CONTEXT = b"twisted_slb"

_PRIVATE_KEY_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----.+?-----END \1-----", re.DOTALL
)


# --- loading certificates ---------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class LoadedCertificate:
    """
    One checked entry of an https listener's C{certificates}.

    @ivar where: the entry's field path, e.g.
        C{"listeners.secure.certificates[1]"}.
    @ivar config: the L{CertificateConfig} it was read from.
    @ivar certificate: the leaf certificate.
    @ivar key: the leaf's private key (a C{cryptography} private key).
    @ivar chain: intermediate certificates sent after the leaf: those that
        follow the leaf in its own file, then those of the C{chain} file.
    @ivar names: the lowercased DNS names it serves, from its subjectAltName
        extension or, only when it has none, its subject's common name.
        Wildcards look like C{"*.example.com"}.
    @ivar not_before: start of validity (aware UTC datetime).
    @ivar not_after: end of validity (aware UTC datetime).
    """

    where: str
    config: CertificateConfig
    certificate: x509.Certificate
    key: object
    chain: Tuple[x509.Certificate, ...]
    names: Tuple[str, ...]
    not_before: datetime.datetime
    not_after: datetime.datetime

    def summary(self) -> str:
        """
        One line for a person (C{--check}): the file, the names it serves and
        when it expires.
        """
        names = ", ".join(self.names) or "(no DNS names)"
        return f"{self.config.cert}: {names} (valid until {_when(self.not_after)})"


class CertificateSet:
    """
    The checked certificates of one https listener, and which one serves
    which name.

    The first certificate is the default: it serves clients that send no SNI
    name or a name no certificate has.  When two certificates claim the same
    name, the first one in the configuration serves it (and a warning says
    so).

    @ivar entries: the L{LoadedCertificate}s, in configuration order.
    @ivar warnings: problems that do not stop the listener (an expired
        certificate, a name claimed twice...), each a complete sentence
        naming the field and file; C{--check} prints them.
    """

    def __init__(
        self, entries: Sequence[LoadedCertificate], warnings: Sequence[str] = ()
    ) -> None:
        if not entries:
            raise ValueError("a CertificateSet needs at least one certificate")
        self.entries: Tuple[LoadedCertificate, ...] = tuple(entries)
        found: List[str] = list(warnings)
        self._exact: Dict[str, int] = {}
        self._wildcard: Dict[str, int] = {}
        for index, entry in enumerate(self.entries):
            for name in entry.names:
                if name.startswith("*."):
                    table, key = self._wildcard, name[2:]
                elif "*" in name:
                    found.append(
                        f"{entry.where}.cert: {entry.config.cert} has the name {name!r}; "
                        f"only a whole leftmost label can be a wildcard (*.example.com), "
                        f"so this name is not used to choose a certificate"
                    )
                    continue
                else:
                    table, key = self._exact, name
                first = table.setdefault(key, index)
                if first != index:
                    found.append(
                        f"{entry.where}.cert: the name {name!r} of {entry.config.cert} is "
                        f"also in {self.entries[first].where} "
                        f"({self.entries[first].config.cert}), which serves it"
                    )
        self.warnings: Tuple[str, ...] = tuple(found)

    @property
    def default(self) -> LoadedCertificate:
        """The certificate for clients without a known SNI name."""
        return self.entries[0]

    def index_for(self, server_name: Union[str, bytes, None]) -> Optional[int]:
        """
        Which certificate serves C{server_name}: exact name first, then a
        wildcard (C{*.example.com} matches exactly one more label:
        C{a.example.com} but neither C{example.com} nor C{a.b.example.com}).
        Names compare case-insensitively; a trailing dot is ignored.

        @param server_name: the client's SNI name, as OpenSSL gives it
            (ASCII bytes, IDNA-encoded) or text; L{None} when the client sent
            none.
        @return: an index into L{entries}, or L{None} when no certificate
            claims the name (the caller then uses the default, index 0).
        """
        if server_name is None:
            return None
        if isinstance(server_name, bytes):
            try:
                server_name = server_name.decode("ascii")
            except UnicodeDecodeError:
                return None
        name = server_name.lower().rstrip(".")
        index = self._exact.get(name)
        if index is None:
            label, dot, parent = name.partition(".")
            if label and parent:
                index = self._wildcard.get(parent)
        return index

    def certificate_for(self, server_name: Union[str, bytes, None]) -> LoadedCertificate:
        """The L{LoadedCertificate} that a client sending C{server_name} gets."""
        index = self.index_for(server_name)
        return self.entries[0 if index is None else index]


def _read(path: str, field: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{field}: cannot read {path}: {e.strerror or e}") from None


def _read_certificates(path: str, field: str) -> List[x509.Certificate]:
    data = _read(path, field)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(
            f"{field}: {path} is not a PEM certificate file "
            f"(no -----BEGIN CERTIFICATE----- block)"
        )
    try:
        return list(x509.load_pem_x509_certificates(data))
    except ValueError as e:
        raise ConfigError(f"{field}: {path} has a PEM certificate that cannot be parsed ({e})") from None


def _read_key(path: str, field: str):
    data = _read(path, field)
    # The key may share its file with certificates (a combined PEM): take the
    # key's own block.
    match = _PRIVATE_KEY_BLOCK.search(data)
    if match is None:
        raise ConfigError(
            f"{field}: {path} is not a PEM private key (no -----BEGIN ... PRIVATE KEY----- block)"
        )
    try:
        return serialization.load_pem_private_key(match.group(0), password=None)
    except TypeError:
        raise ConfigError(
            f"{field}: {path} is an encrypted private key; twisted_slb cannot ask for a "
            f"passphrase, so give it an unencrypted key readable only by its user"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"{field}: {path} has a private key that cannot be parsed ({e})") from None


def _public_der(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _names(certificate: x509.Certificate) -> Tuple[str, ...]:
    """
    The DNS names a certificate serves: its subjectAltName DNS names, or only
    when it has no subjectAltName extension at all, its subject's CN (as
    browsers and RFC 6125 do).
    """
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        names = [
            a.value
            for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if isinstance(a.value, str)
        ]
    else:
        names = san.value.get_values_for_type(x509.DNSName)
    unique: Dict[str, None] = {}
    for n in names:
        unique[n.strip().lower().rstrip(".")] = None
    return tuple(n for n in unique if n)


def _validity(certificate: x509.Certificate) -> Tuple[datetime.datetime, datetime.datetime]:
    # cryptography >= 42 has the aware *_utc properties; older ones (PyPy's
    # pinned version) give naive datetimes that are UTC.
    before = getattr(certificate, "not_valid_before_utc", None)
    after = getattr(certificate, "not_valid_after_utc", None)
    if before is None or after is None:
        utc = datetime.timezone.utc
        before = certificate.not_valid_before.replace(tzinfo=utc)
        after = certificate.not_valid_after.replace(tzinfo=utc)
    return before, after


def _when(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def load_certificate(
    config: CertificateConfig, where: str, now: Optional[datetime.datetime] = None
) -> Tuple[LoadedCertificate, List[str]]:
    """
    Read and check one certificate entry.

    @param config: the entry.
    @param where: its field path, e.g. C{"listeners.secure.certificates[1]"}.
    @param now: the time validity is judged at (aware datetime); default: now.
    @return: the L{LoadedCertificate} and a list of warnings about it.
    @raise ConfigError: a file is missing or unreadable, is not PEM, or the
        key does not match the certificate.
    """
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    certificates = _read_certificates(config.cert, f"{where}.cert")
    leaf, chain = certificates[0], certificates[1:]
    key = _read_key(config.key, f"{where}.key")
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        raise ConfigError(
            f"{where}.key: {config.key} does not match certificate {config.cert}"
        )
    if config.chain is not None:
        chain = chain + _read_certificates(config.chain, f"{where}.chain")
    warnings: List[str] = []
    if chain and chain[0].subject != leaf.issuer:
        warnings.append(
            f"{where}.chain: the chain of {config.cert} does not start with the certificate "
            f"of its issuer ({leaf.issuer.rfc4514_string()}); clients may not be able to "
            f"verify it"
        )
    not_before, not_after = _validity(leaf)
    # Expired and not-yet-valid certificates are loaded with a loud warning,
    # not refused.  Refusing would make a routine SIGHUP reload (or a restart
    # at 3 a.m.) take every name of the listener down because one certificate
    # lapsed, where serving it only breaks the clients of that one name, who
    # see a clear browser error; HAProxy and nginx serve such certificates too.
    # The warning is logged at every load and reload, and --check prints it.
    if not_after < now:
        warnings.append(
            f"{where}.cert: {config.cert} expired on {_when(not_after)}; it is still served, "
            f"but clients will refuse it: renew it and reload"
        )
    elif not_before > now:
        warnings.append(
            f"{where}.cert: {config.cert} is not valid before {_when(not_before)}; it is still "
            f"served, but clients will refuse it until then"
        )
    elif not_after - now < EXPIRY_WARNING:
        warnings.append(
            f"{where}.cert: {config.cert} expires soon, on {_when(not_after)}: renew it"
        )
    loaded = LoadedCertificate(
        where=where,
        config=config,
        certificate=leaf,
        key=key,
        chain=tuple(chain),
        names=_names(leaf),
        not_before=not_before,
        not_after=not_after,
    )
    return loaded, warnings


def load_certificate_set(
    certs: Sequence[CertificateConfig],
    where: str,
    now: Optional[datetime.datetime] = None,
) -> CertificateSet:
    """
    Read and check every certificate of an https listener.

    Files are read here, at configuration load and reload, never while
    serving a connection.  Each warning of the result is also logged.

    @param certs: the listener's C{certificates}; the first is the default.
    @param where: the field path of the list, for messages, e.g.
        C{"listeners.secure.certificates"}.
    @param now: the time validity is judged at (aware datetime); default: now.
    @return: the L{CertificateSet}.
    @raise ConfigError: the list is empty, a file is missing or unreadable or
        not PEM, or a key does not match its certificate.  The message names
        the field (C{listeners.secure.certificates[1].key}) and the file.
    """
    if not certs:
        raise ConfigError(f"{where}: an https listener needs at least one certificate")
    entries = []
    warnings: List[str] = []
    for index, config in enumerate(certs):
        entry, found = load_certificate(config, f"{where}[{index}]", now)
        if not entry.names and index > 0:
            found.append(
                f"{where}[{index}].cert: {config.cert} has no DNS name, so no client can "
                f"select it by SNI; only the first certificate serves clients without a name"
            )
        entries.append(entry)
        warnings.extend(found)
    certificate_set = CertificateSet(entries, warnings)
    for problem in certificate_set.warnings:
        # (Not "warning=": trial and the legacy log take an event with a
        # "warning" key for a Python warning.)
        log.warn("{problem}", problem=problem)
    return certificate_set


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
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
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
        # Idle keep-alive connections give their buffers back.
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
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
    args = getattr(error, "args", ())
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

    def __init__(self, wrapped, clock: IReactorTime, timeout: Optional[float], addr) -> None:
        self.wrapped = wrapped
        self._clock = clock
        self._timeout = timeout
        self._addr = addr
        self._timer = None
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
    lean_transport = None

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
    if reactor is None:
        from twisted.internet import reactor
    return TLSServerFactory(options, wrapped_factory, reactor, handshake_timeout)


# --- TLS to backends --------------------------------------------------------


def load_trust_root(ca: str, where: str) -> IOpenSSLTrustRoot:
    """
    The certificates of the PEM file C{ca} (one or several), as a trust root
    for L{optionsForClientTLS}.

    @param where: the field path for messages, e.g. C{"backends.web.tls.ca"}.
    @raise ConfigError: the file is missing, unreadable or holds no PEM
        certificate.
    """
    certificates = _read_certificates(ca, where)
    return trustRootFromCertificates(
        [
            Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
            for c in certificates
        ]
    )


def _server_name(group_tls: BackendTLSConfig, host: str) -> str:
    name = group_tls.server_name or host
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """
    Client TLS that accepts any certificate (C{verify = false}), still
    sending the server name by SNI so that a backend hosting several names
    answers with the right one.
    """

    def __init__(self, server_name: str) -> None:
        self._context = CertificateOptions(verify=False).getContext()
        self._sni: Optional[bytes] = None
        if not (isIPAddress(server_name) or isIPv6Address(server_name)):
            self._sni = server_name.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        conn = SSL.Connection(self._context, None)
        if self._sni:
            conn.set_tlsext_host_name(self._sni)
        return conn


def warn_unverified(group_name: str) -> None:
    """Log that TLS to the backends of C{group_name} is not verified."""
    log.warn(
        "backends.{group}.tls.verify is false: TLS to these backends is encrypted but "
        "their certificates are not checked, so anyone on the path can impersonate them",
        group=group_name,
    )


def client_tls_options(
    group_tls: BackendTLSConfig,
    host: str,
    trust_root: Optional[IOpenSSLTrustRoot] = None,
    where: str = "backends.tls.ca",
) -> IOpenSSLClientConnectionCreator:
    """
    The TLS settings for connecting to one backend.

    With C{verify} (the default), the backend's certificate must chain to
    C{trust_root} (else to the C{ca} file, else to the system's trust store)
    and service_identity checks that it names C{server_name}, or when that
    is empty the backend's C{host} (DNS name or IP address).  Without
    C{verify}, any certificate is accepted (see L{warn_unverified}).

    Building the options reads the C{ca} file when no C{trust_root} is
    given: do it at configuration time (L{ClientTLSCache} does), not per
    connection.

    @raise ConfigError: the C{ca} file cannot be read (named by C{where}).
    """
    name = _server_name(group_tls, host)
    if not group_tls.verify:
        return _UnverifiedClientTLS(name)
    if trust_root is None:
        trust_root = platformTrust() if group_tls.ca is None else load_trust_root(group_tls.ca, where)
    return optionsForClientTLS(name, trustRoot=trust_root)


@attr.s(frozen=True, auto_attribs=True)
class StagedClientTLS:
    """Trust roots loaded by L{ClientTLSCache.stage}, not yet in use."""

    groups: Mapping[str, Tuple[BackendTLSConfig, Optional[IOpenSSLTrustRoot]]]


class ClientTLSCache:
    """
    The client TLS options of every backend, built once per (group, host)
    and reused by every connection (building them loads trust roots and
    creates an OpenSSL context, far too slow to do per connection).

    A group whose C{tls} settings change (a reload) gets fresh options; the
    C{ca} file is re-read then.
    """

    def __init__(self) -> None:
        self._groups: Dict[str, Tuple[BackendTLSConfig, Optional[IOpenSSLTrustRoot]]] = {}
        self._options: Dict[Tuple[str, BackendTLSConfig, str], IOpenSSLClientConnectionCreator] = {}

    def prepare(self, group_name: str, group_tls: BackendTLSConfig) -> None:
        """
        Load what C{group_name}'s TLS needs (its C{ca} file) and warn when it
        is unverified.  Nothing is done when the settings did not change.

        @raise ConfigError: the C{ca} file cannot be read.
        """
        self.install(self.stage({group_name: group_tls}))

    def stage(self, groups: Mapping[str, BackendTLSConfig]) -> "StagedClientTLS":
        """
        Load the trust roots of every group in C{groups} whose TLS settings
        changed, without changing what connections use: the first half of a
        start or reload, which must fail as a whole before anything changes.
        Give the result to L{install}.

        @param groups: group name -> its C{tls} settings (groups without TLS
            left out).
        @raise ConfigError: a C{ca} file cannot be read or holds no PEM
            certificate (named by its field, C{backends.NAME.tls.ca}).
        """
        staged: Dict[str, Tuple[BackendTLSConfig, Optional[IOpenSSLTrustRoot]]] = {}
        for group_name, group_tls in groups.items():
            known = self._groups.get(group_name)
            if known is not None and known[0] == group_tls:
                continue
            trust_root = None
            if group_tls.verify and group_tls.ca is not None:
                trust_root = load_trust_root(group_tls.ca, f"backends.{group_name}.tls.ca")
            staged[group_name] = (group_tls, trust_root)
        return StagedClientTLS(staged)

    def install(self, staged: "StagedClientTLS") -> None:
        """
        Use the trust roots of L{stage} from now on (it cannot fail), and warn
        about each group that newly has C{verify = false}.
        """
        for group_name, (group_tls, trust_root) in staged.groups.items():
            if not group_tls.verify:
                warn_unverified(group_name)
            self._groups[group_name] = (group_tls, trust_root)
        if staged.groups:
            self._options = {k: v for k, v in self._options.items() if k[0] not in staged.groups}

    def options_for(
        self, group_name: str, group_tls: BackendTLSConfig, host: str
    ) -> IOpenSSLClientConnectionCreator:
        """
        The TLS options for a connection to C{host} in group C{group_name}.

        @raise ConfigError: the group was not prepared and its C{ca} file
            cannot be read.
        """
        key = (group_name, group_tls, host)
        options = self._options.get(key)
        if options is None:
            self.prepare(group_name, group_tls)
            trust_root = self._groups[group_name][1]
            options = client_tls_options(
                group_tls, host, trust_root=trust_root, where=f"backends.{group_name}.tls.ca"
            )
            self._options[key] = options
        return options
