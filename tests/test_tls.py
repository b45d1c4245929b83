"""
Tests for L{twisted_slb.tls}: loading certificates, choosing them by SNI,
protocol versions and ALPN, reloading, handshake failures and timeouts, and
verified TLS to backends.

Certificates are generated at test time (L{tests.certs}).  Handshakes run in
memory through L{twisted.test.iosim} pumps with real OpenSSL on both sides;
one end-to-end test uses real loopback sockets.
"""

from __future__ import annotations

import datetime
import os
from typing import List, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, endpoints, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import FakeTransport, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site
from twisted.web.resource import Resource
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.certs import CertificateAuthority, Issued, key_pem, new_key, utc_now
from twisted_slb import tls
from twisted_slb.config import BackendTLSConfig, CertificateConfig, ConfigError

CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.7", 40007)

# One CA and a few leaves for the whole module: generating them is cheap,
# but there is no reason to do it per test.
CA = CertificateAuthority()
DEFAULT = CA.issue(["default.example", "www.default.example"])
EXACT = CA.issue(["a.example.com"])
WILDCARD = CA.issue(["*.example.com"])
CN_ONLY = CA.issue(common_name="cn-only.example")


def names_of(certificate: x509.Certificate) -> List[str]:
    """The DNS names of C{certificate}'s subjectAltName, else its CN."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return [a.value for a in certificate.subject]
    return san.value.get_values_for_type(x509.DNSName)


class LogCapture:
    """Every log event published while a test runs."""

    def __init__(self, case) -> None:
        self.events: List[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def from_tls(self, level: Optional[LogLevel] = None) -> List[dict]:
        return [
            e
            for e in self.events
            if e.get("log_namespace") == "twisted_slb.tls"
            and (level is None or e.get("log_level") == level)
        ]

    def mentioning(self, text: str) -> List[dict]:
        from twisted.logger import formatEvent

        return [e for e in self.events if text in formatEvent(e)]


def write_certificates(case, *issued: Issued, chain: bool = False) -> List[CertificateConfig]:
    """Write C{issued} into a fresh temporary directory; return their configs."""
    directory = case.mktemp()
    configs = []
    for index, leaf in enumerate(issued):
        cert, key = leaf.write(directory, f"leaf{index}")
        chain_path = CA.write(directory) if chain else None
        configs.append(CertificateConfig(cert=cert, key=key, chain=chain_path))
    return configs


def certificate_set(case, *issued: Issued) -> tls.CertificateSet:
    return tls.load_certificate_set(
        write_certificates(case, *issued), "listeners.secure.certificates"
    )


# --- a TLS client for tests -------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class TestClientTLS:
    """
    A client that sends a chosen SNI name, does not verify (so that any
    certificate can be inspected), and can be forced to old protocols.
    """

    def __init__(
        self,
        server_name: Optional[str] = None,
        max_version: Optional[int] = None,
        min_version: Optional[int] = None,
        ciphers: Optional[bytes] = None,
        alpn: Sequence[bytes] = (),
    ) -> None:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if ciphers is not None:
            ctx.set_cipher_list(ciphers)
        if min_version is not None:
            ctx.set_min_proto_version(min_version)
        if max_version is not None:
            ctx.set_max_proto_version(max_version)
        if alpn:
            ctx.set_alpn_protos(list(alpn))
        self.context = ctx
        self.server_name = server_name

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        conn = SSL.Connection(self.context, None)
        if self.server_name is not None:
            conn.set_tlsext_host_name(self.server_name.encode("ascii"))
        return conn


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """Records what happens to a connection; echoes when asked to."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.handshake_done = False
        self.received = b""
        self.lost: Optional[object] = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            self.transport.write(data)

    def connectionLost(self, reason) -> None:
        self.lost = reason

    def peer_names(self) -> List[str]:
        return names_of(self.transport.getPeerCertificate().to_cryptography())


class Requester(Recorder):
    """
    A client that writes a request as soon as it is connected (Twisted's
    TLS holds it until the handshake is done), and another one when told the
    handshake completed: as a proxy writes to a backend.
    """

    def connectionMade(self) -> None:
        self.transport.write(b"GET /early HTTP/1.1\r\n\r\n")

    def handshakeCompleted(self) -> None:
        Recorder.handshakeCompleted(self)
        self.transport.write(b"GET /late HTTP/1.1\r\n\r\n")


class RecordingFactory(ServerFactory):
    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.protocols: List[Recorder] = []

    def buildProtocol(self, addr):
        p = Recorder(self.echo)
        p.factory = self
        self.protocols.append(p)
        return p


class Connection:
    """One in-memory client/server TLS connection and its pump."""

    def __init__(
        self, server_factory, client_creator, clock: Clock, server_protocol=None, client_app=None
    ) -> None:
        self.client_app = Recorder() if client_app is None else client_app
        client_factory = TLSMemoryBIOFactory(
            client_creator, True, Factory.forProtocol(lambda: self.client_app), clock=clock
        )
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(CLIENT_ADDRESS),
            lambda: client_factory.buildProtocol(None),
            clock=clock,
        )
        self.pump.flush()


class SNIServer:
    """An L{SNIServerOptions} behind L{server_tls_factory}, in memory."""

    def __init__(self, certificate_set, clock: Optional[Clock] = None, **options) -> None:
        self.clock = clock if clock is not None else Clock()
        self.options = tls.SNIServerOptions(certificate_set, **options)
        self.app = RecordingFactory(echo=True)
        self.factory = tls.server_tls_factory(self.options, self.app, reactor=self.clock)

    def connect(self, client_creator, client_app=None) -> Connection:
        return Connection(self.factory, client_creator, self.clock, client_app=client_app)

    def names_for(self, server_name: Optional[str]) -> List[str]:
        c = self.connect(TestClientTLS(server_name))
        assert c.client_app.handshake_done, c.client_app.lost
        return c.client_app.peer_names()


# --- loading ----------------------------------------------------------------


class LoadCertificateSetTests(SynchronousTestCase):
    def test_namesComeFromSubjectAltNames(self) -> None:
        """
        A certificate's names are its subjectAltName DNS names, lowercased;
        its CN is not added when it has a subjectAltName.
        """
        leaf = CA.issue(["Shop.Example", "api.shop.example"], common_name="ignored.example")
        loaded = certificate_set(self, leaf).default
        self.assertEqual(loaded.names, ("shop.example", "api.shop.example"))

    def test_commonNameUsedWithoutSubjectAltName(self) -> None:
        """A certificate without subjectAltName serves its subject's CN."""
        self.assertEqual(certificate_set(self, CN_ONLY).default.names, ("cn-only.example",))

    def test_firstCertificateIsDefault(self) -> None:
        """The first certificate of the list is the default one."""
        loaded = certificate_set(self, EXACT, DEFAULT)
        self.assertEqual(loaded.default.names, ("a.example.com",))

    def test_emptyListIsAnError(self) -> None:
        """An https listener without certificates is a configuration error."""
        e = self.assertRaises(
            ConfigError, tls.load_certificate_set, [], "listeners.secure.certificates"
        )
        self.assertIn("listeners.secure.certificates: ", str(e))

    def test_missingCertificateFileNamesFieldAndFile(self) -> None:
        """A certificate file that does not exist: the field and the path."""
        (config,) = write_certificates(self, EXACT)
        missing = config.cert + ".missing"
        e = self.assertRaises(
            ConfigError,
            tls.load_certificate_set,
            [CertificateConfig(cert=missing, key=config.key)],
            "listeners.secure.certificates",
        )
        self.assertEqual(
            str(e),
            f"listeners.secure.certificates[0].cert: cannot read {missing}: "
            f"No such file or directory",
        )

    def test_missingKeyFileNamesFieldAndFile(self) -> None:
        """A key file that does not exist: the key field and the path."""
        configs = write_certificates(self, DEFAULT, EXACT)
        missing = os.path.join(self.mktemp(), "nope.key")
        configs[1] = CertificateConfig(cert=configs[1].cert, key=missing)
        e = self.assertRaises(
            ConfigError, tls.load_certificate_set, configs, "listeners.secure.certificates"
        )
        self.assertTrue(
            str(e).startswith(f"listeners.secure.certificates[1].key: cannot read {missing}"),
            str(e),
        )

    def test_certificateNotPEMNamesFieldAndFile(self) -> None:
        """A certificate file that is not PEM: the field and the path."""
        (config,) = write_certificates(self, EXACT)
        with open(config.cert, "wb") as f:
            f.write(EXACT.certificate.public_bytes(serialization.Encoding.DER))
        e = self.assertRaises(
            ConfigError, tls.load_certificate_set, [config], "listeners.secure.certificates"
        )
        self.assertEqual(
            str(e),
            f"listeners.secure.certificates[0].cert: {config.cert} is not a PEM certificate "
            f"file (no -----BEGIN CERTIFICATE----- block)",
        )

    def test_keyNotPEMNamesFieldAndFile(self) -> None:
        """A key file holding a certificate instead: the key field and path."""
        (config,) = write_certificates(self, EXACT)
        config = CertificateConfig(cert=config.cert, key=config.cert)
        e = self.assertRaises(
            ConfigError, tls.load_certificate_set, [config], "listeners.secure.certificates"
        )
        self.assertIn(
            f"listeners.secure.certificates[0].key: {config.cert} is not a PEM private key",
            str(e),
        )

    def test_keyNotMatchingCertificate(self) -> None:
        """A key of another certificate: both files are named."""
        configs = write_certificates(self, DEFAULT, WILDCARD)
        with open(configs[1].key, "wb") as f:
            f.write(key_pem(new_key()))
        e = self.assertRaises(
            ConfigError, tls.load_certificate_set, configs, "listeners.secure.certificates"
        )
        self.assertEqual(
            str(e),
            f"listeners.secure.certificates[1].key: {configs[1].key} does not match "
            f"certificate {configs[1].cert}",
        )

    def test_encryptedKeyIsAClearError(self) -> None:
        """An encrypted key cannot be used and the message says why."""
        (config,) = write_certificates(self, EXACT)
        with open(config.key, "wb") as f:
            f.write(
                EXACT.key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.BestAvailableEncryption(b"secret"),
                )
            )
        e = self.assertRaises(
            ConfigError, tls.load_certificate_set, [config], "listeners.secure.certificates"
        )
        self.assertIn(f"[0].key: {config.key} is an encrypted private key", str(e))

    def test_unparsableChain(self) -> None:
        """A chain file that is not PEM certificates: the chain field and path."""
        (config,) = write_certificates(self, EXACT)
        chain = os.path.join(os.path.dirname(config.cert), "chain.pem")
        with open(chain, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
        config = CertificateConfig(cert=config.cert, key=config.key, chain=chain)
        e = self.assertRaises(
            ConfigError, tls.load_certificate_set, [config], "listeners.secure.certificates"
        )
        self.assertIn(f"listeners.secure.certificates[0].chain: {chain} ", str(e))

    def test_combinedPEMFile(self) -> None:
        """
        One file holding the key, the certificate and its chain (a combined
        PEM) serves as both C{cert} and C{key}; the certificates after the
        leaf are its chain.
        """
        from tests.certs import cert_pem

        path = os.path.join(self.mktemp() + ".pem")
        with open(path, "wb") as f:
            f.write(key_pem(EXACT.key) + cert_pem(EXACT.certificate) + cert_pem(CA.certificate))
        loaded = tls.load_certificate_set([CertificateConfig(cert=path, key=path)], "c").default
        self.assertEqual((loaded.names, loaded.chain), (("a.example.com",), (CA.certificate,)))

    def test_expiredCertificateLoadsWithWarning(self) -> None:
        """
        An expired certificate is loaded (so that a reload does not take the
        listener down) with a warning naming the field, file and date.
        """
        now = utc_now()
        expired = CA.issue(
            ["old.example"],
            not_before=now - datetime.timedelta(days=40),
            not_after=now - datetime.timedelta(days=10),
        )
        configs = write_certificates(self, DEFAULT, expired)
        loaded = tls.load_certificate_set(configs, "listeners.secure.certificates")
        self.assertEqual(loaded.entries[1].names, ("old.example",))
        (warning,) = loaded.warnings
        self.assertTrue(
            warning.startswith(
                f"listeners.secure.certificates[1].cert: {configs[1].cert} expired on "
            ),
            warning,
        )

    def test_notYetValidCertificateWarns(self) -> None:
        """A certificate valid only from tomorrow gets a warning too."""
        now = utc_now()
        future = CA.issue(["new.example"], not_before=now + datetime.timedelta(days=1))
        loaded = certificate_set(self, future)
        (warning,) = loaded.warnings
        self.assertIn("is not valid before", warning)

    def test_expiryIsJudgedAtNow(self) -> None:
        """C{now} decides validity: a valid certificate is expired next year."""
        configs = write_certificates(self, EXACT)
        later = utc_now() + datetime.timedelta(days=365)
        loaded = tls.load_certificate_set(configs, "l", now=later)
        self.assertIn("expired on", loaded.warnings[0])
        self.assertEqual(tls.load_certificate_set(configs, "l").warnings, ())

    def test_warningsAreLogged(self) -> None:
        """Each warning is logged when the set is loaded (and so at reload)."""
        logs = LogCapture(self)
        configs = write_certificates(self, EXACT)
        loaded = tls.load_certificate_set(configs, "l", now=utc_now() + datetime.timedelta(days=365))
        warned = [e["problem"] for e in logs.from_tls(LogLevel.warn)]
        self.assertEqual(warned, list(loaded.warnings))

    def test_duplicateNameFirstCertificateWins(self) -> None:
        """
        Two certificates with the same name: the first serves it, and a
        warning says so.
        """
        again = CA.issue(["a.example.com", "b.example.com"])
        loaded = certificate_set(self, DEFAULT, EXACT, again)
        self.assertEqual(loaded.index_for("a.example.com"), 1)
        self.assertEqual(loaded.index_for("b.example.com"), 2)
        self.assertEqual(len(loaded.warnings), 1)
        self.assertIn("'a.example.com'", loaded.warnings[0])

    def test_summaryNamesFileNamesAndExpiry(self) -> None:
        """L{LoadedCertificate.summary} is the line C{--check} can print."""
        configs = write_certificates(self, DEFAULT)
        summary = tls.load_certificate_set(configs, "l").default.summary()
        self.assertTrue(
            summary.startswith(f"{configs[0].cert}: default.example, www.default.example (valid until "),
            summary,
        )


class CertificateLookupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.set = certificate_set(self, DEFAULT, EXACT, WILDCARD)

    def test_exactName(self) -> None:
        """A certificate is found by an exact server name."""
        self.assertEqual(self.set.index_for(b"a.example.com"), 1)

    def test_exactBeforeWildcard(self) -> None:
        """An exact name wins over a wildcard that also matches."""
        self.assertEqual(self.set.index_for("a.example.com"), 1)
        self.assertEqual(self.set.index_for("b.example.com"), 2)

    def test_wildcardMatchesExactlyOneLabel(self) -> None:
        """C{*.example.com} matches neither C{example.com} nor C{x.y.example.com}."""
        self.assertEqual(
            [self.set.index_for(n) for n in ("example.com", "x.y.example.com", ".example.com")],
            [None, None, None],
        )

    def test_caseInsensitive(self) -> None:
        """Certificate lookup ignores the case of the name."""
        self.assertEqual(
            [self.set.index_for(n) for n in (b"A.Example.COM", b"B.EXAMPLE.com")], [1, 2]
        )

    def test_trailingDotIgnored(self) -> None:
        """Certificate lookup ignores a trailing dot, and takes a str name."""
        self.assertEqual(self.set.index_for("a.example.com."), 1)

    def test_unknownOrMissingName(self) -> None:
        """No certificate for the name (or no name): L{None}, the default."""
        self.assertEqual(
            [self.set.index_for(n) for n in (b"other.test", None, b"\xff.example.com")],
            [None, None, None],
        )
        self.assertIs(self.set.certificate_for(b"other.test"), self.set.default)


# --- serving ----------------------------------------------------------------


class SNISelectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = SNIServer(certificate_set(self, DEFAULT, EXACT, WILDCARD))

    def test_interface(self) -> None:
        """The server and client TLS options provide Twisted's connection creator interfaces."""
        verifyObject(IOpenSSLServerConnectionCreator, self.server.options)
        verifyObject(
            IOpenSSLClientConnectionCreator,
            tls.client_tls_options(BackendTLSConfig(verify=False), "a.example.com"),
        )

    def test_exactName(self) -> None:
        """SNI for an exact name selects that name's certificate."""
        self.assertEqual(self.server.names_for("a.example.com"), ["a.example.com"])

    def test_wildcardName(self) -> None:
        """SNI for a name under a wildcard selects the wildcard certificate."""
        self.assertEqual(self.server.names_for("shop.example.com"), ["*.example.com"])

    def test_noSNIGetsDefault(self) -> None:
        """A client without SNI gets the default certificate."""
        self.assertEqual(
            self.server.names_for(None), ["default.example", "www.default.example"]
        )

    def test_unknownNameGetsDefault(self) -> None:
        """An unknown name gets the default, logged at debug once per name."""
        logs = LogCapture(self)
        self.assertEqual(self.server.names_for("other.test")[0], "default.example")
        self.server.names_for("other.test")
        self.assertEqual(
            [e["log_level"] for e in logs.from_tls() if e.get("name") == "other.test"],
            [LogLevel.debug],
        )

    def test_caseInsensitiveName(self) -> None:
        """SNI selection ignores the case of the name."""
        self.assertEqual(self.server.names_for("A.EXAMPLE.com"), ["a.example.com"])

    def test_contextsBuiltOnce(self) -> None:
        """Connections share one context per certificate: none is built per connection."""
        first = self.server.options.serverConnectionForTLS(None)
        second = self.server.options.serverConnectionForTLS(None)
        self.assertIs(first.get_context(), second.get_context())

    def test_chainIsSent(self) -> None:
        """The chain file's certificates follow the leaf."""
        server = SNIServer(
            tls.load_certificate_set(write_certificates(self, EXACT, chain=True), "l")
        )
        c = server.connect(TestClientTLS("a.example.com"))
        chain = c.client.getHandle().get_peer_cert_chain()
        self.assertEqual(
            [cert.to_cryptography() for cert in chain], [EXACT.certificate, CA.certificate]
        )


class ProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.set = certificate_set(self, DEFAULT)

    def test_tls11Refused(self) -> None:
        """
        A client that speaks at most TLS 1.1 (with every old cipher allowed)
        is refused for its protocol version.  (OpenSSL 3's default security
        level refuses it too; the minimum version makes sure of it whatever
        the system's OpenSSL policy, as L{test_minTLS13RefusesTLS12} shows.)
        """
        server = SNIServer(self.set)
        c = server.connect(
            TestClientTLS(
                min_version=SSL.TLS1_VERSION,
                max_version=SSL.TLS1_1_VERSION,
                ciphers=b"DEFAULT:@SECLEVEL=0",
            )
        )
        self.assertFalse(c.client_app.handshake_done)
        self.assertTrue(self.logs.mentioning("unsupported protocol"))

    def test_tls12Accepted(self) -> None:
        """By default a TLS 1.2 client is accepted."""
        server = SNIServer(self.set)
        c = server.connect(TestClientTLS(max_version=SSL.TLS1_2_VERSION))
        self.assertEqual(c.client.getHandle().get_protocol_version_name(), "TLSv1.2")

    def test_minTLS13RefusesTLS12(self) -> None:
        """min_tls = "1.3" refuses a TLS 1.2 client, and the failure is logged."""
        server = SNIServer(self.set, min_tls="1.3")
        c = server.connect(TestClientTLS(max_version=SSL.TLS1_2_VERSION))
        self.assertFalse(c.client_app.handshake_done)
        self.assertTrue(self.logs.mentioning("unsupported protocol"))

    def test_minTLS13AcceptsTLS13(self) -> None:
        """min_tls = "1.3" accepts a TLS 1.3 client."""
        server = SNIServer(self.set, min_tls="1.3")
        c = server.connect(TestClientTLS())
        self.assertEqual(c.client.getHandle().get_protocol_version_name(), "TLSv1.3")

    def test_invalidMinTLS(self) -> None:
        """An unsupported min_tls is a ValueError naming the value."""
        e = self.assertRaises(ValueError, tls.SNIServerOptions, self.set, min_tls="1.1")
        self.assertIn("'1.1'", str(e))

    def test_forwardSecretCiphersOnly(self) -> None:
        """A TLS 1.2 client offering only static-RSA key exchange is refused."""
        rsa = CA.issue(["rsa.example"], key=_rsa_key())
        server = SNIServer(certificate_set(self, rsa))
        c = server.connect(
            TestClientTLS(max_version=SSL.TLS1_2_VERSION, ciphers=b"AES128-GCM-SHA256")
        )
        self.assertFalse(c.client_app.handshake_done)
        self.assertTrue(self.logs.mentioning("no shared cipher"))

    def test_serverCipherPreference(self) -> None:
        """The server's cipher order wins over the client's."""
        server = SNIServer(self.set)
        c = server.connect(
            TestClientTLS(
                max_version=SSL.TLS1_2_VERSION,
                ciphers=b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
            )
        )
        self.assertEqual(c.client.getHandle().get_cipher_name(), "ECDHE-ECDSA-AES128-GCM-SHA256")

    def test_alpnNegotiated(self) -> None:
        """By default ALPN negotiates http/1.1 with a client offering h2 and http/1.1."""
        server = SNIServer(self.set)
        c = server.connect(TestClientTLS(alpn=[b"h2", b"http/1.1"]))
        self.assertEqual(c.client.negotiatedProtocol, b"http/1.1")

    def test_alpnServerOrderWins(self) -> None:
        """ALPN picks the server's preferred protocol, whatever the client's order."""
        server = SNIServer(self.set, alpn=("h2", "http/1.1"))
        c = server.connect(TestClientTLS(alpn=[b"http/1.1", b"h2"]))
        self.assertEqual(c.client.negotiatedProtocol, b"h2")

    def test_alpnWithoutOverlapStillConnects(self) -> None:
        """A client offering only protocols we lack connects, without ALPN."""
        server = SNIServer(self.set)
        c = server.connect(TestClientTLS(alpn=[b"h2"]))
        self.assertTrue(c.client_app.handshake_done)
        self.assertIsNone(c.client.negotiatedProtocol)

    def test_alpnOnSNISelectedCertificate(self) -> None:
        """A connection moved to another certificate by SNI still gets ALPN."""
        server = SNIServer(certificate_set(self, DEFAULT, EXACT))
        c = server.connect(TestClientTLS("a.example.com", alpn=[b"http/1.1"]))
        self.assertEqual(
            (c.client_app.peer_names(), c.client.negotiatedProtocol),
            (["a.example.com"], b"http/1.1"),
        )


def _rsa_key():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class ReloadTests(SynchronousTestCase):
    def test_reloadServesNewCertificatesToNewConnections(self) -> None:
        """
        After C{reload}, new connections get the new certificate for a name,
        while a connection made before keeps working over its own.
        """
        server = SNIServer(certificate_set(self, DEFAULT, EXACT))
        before = server.connect(TestClientTLS("a.example.com"))
        renewed = CA.issue(["a.example.com"])
        server.options.reload(certificate_set(self, DEFAULT, renewed))

        after = server.connect(TestClientTLS("a.example.com"))
        self.assertEqual(
            after.client.getPeerCertificate().to_cryptography(), renewed.certificate
        )

        before.client.write(b"still here")
        before.pump.flush()
        self.assertEqual(
            (before.client_app.received, before.client_app.lost),
            (b"still here", None),
        )
        self.assertEqual(
            before.client.getPeerCertificate().to_cryptography(), EXACT.certificate
        )

    def test_reloadAddsNames(self) -> None:
        """A name only the new set has is served after the reload."""
        server = SNIServer(certificate_set(self, DEFAULT))
        server.options.reload(certificate_set(self, DEFAULT, WILDCARD))
        self.assertEqual(server.names_for("new.example.com"), ["*.example.com"])
        self.assertIsNot(server.options.certificate_set.entries[1:], ())


class HandshakeFailureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.server = SNIServer(certificate_set(self, DEFAULT))

    def raw_connection(self, data: bytes = b"", close: bool = False):
        """
        A plain TCP client sending C{data} to the TLS server; returns its
        client protocol and the pump.
        """
        client_app = Recorder()
        client, server, pump = connectedServerAndClient(
            lambda: self.server.factory.buildProtocol(CLIENT_ADDRESS),
            lambda: client_app,
            clock=self.server.clock,
        )
        if data:
            client.transport.write(data)
        if close:
            client.transport.loseConnection()
        pump.flush()
        return client_app, server, pump

    def test_plainHTTPClosedAndLoggedOnce(self) -> None:
        """
        Plain HTTP to the TLS port: the connection is closed and one line is
        logged with the client's address and OpenSSL's reason.
        """
        client, server, pump = self.raw_connection(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIsNotNone(client.lost)
        (line,) = self.logs.mentioning("127.0.0.7")
        self.assertEqual(line["log_level"], LogLevel.info)
        self.assertEqual(line["client"], "127.0.0.7:40007")
        self.assertEqual(line["reason"], "http request")
        self.assertEqual([e for e in self.logs.events if e.get("log_failure")], [])

    def test_applicationSeesTheFailure(self) -> None:
        """The application protocol is told the connection was lost, and why."""
        self.raw_connection(b"GET / HTTP/1.1\r\n\r\n")
        (app,) = self.server.app.protocols
        self.assertTrue(app.lost.check(SSL.Error))

    def test_goodClientServedAfterBadOne(self) -> None:
        """A failed handshake does not disturb the next client."""
        self.raw_connection(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(self.server.names_for(None)[0], "default.example")

    def test_truncatedClientHelloLogged(self) -> None:
        """Half a ClientHello then a close is logged, with the bytes received."""
        hello = _client_hello()
        self.raw_connection(hello[: len(hello) // 2], close=True)
        (line,) = self.logs.mentioning("127.0.0.7")
        self.assertEqual(
            (line["log_level"], line["received"]), (LogLevel.info, len(hello) // 2)
        )

    def test_silentCloseNotLoggedAtInfo(self) -> None:
        """A connection closed without sending anything (a port check) is only debug."""
        self.raw_connection(close=True)
        self.assertEqual(
            [e["log_level"] for e in self.logs.mentioning("127.0.0.7")], [LogLevel.debug]
        )

    def test_handshakeTimeout(self) -> None:
        """A client that never finishes its handshake is closed after 10 s."""
        client, server, pump = self.raw_connection(_client_hello()[:10])
        self.server.clock.advance(9.9)
        pump.flush()
        self.assertIsNone(client.lost)
        self.server.clock.advance(0.1)
        pump.flush()
        self.assertIsNotNone(client.lost)
        (line,) = self.logs.mentioning("127.0.0.7")
        self.assertIn("timed out after 10.0s", _format(line))

    def test_handshakeTimeoutConfigurable(self) -> None:
        """A handshake not done within handshake_timeout closes the connection."""
        factory = tls.server_tls_factory(
            self.server.options, self.server.app, reactor=self.server.clock, handshake_timeout=3
        )
        self.server.factory = factory
        client, server, pump = self.raw_connection()
        self.server.clock.advance(3)
        pump.flush()
        self.assertIsNotNone(client.lost)

    def test_completedHandshakeIsNotTimedOut(self) -> None:
        """A connection whose handshake finished stays open past the timeout."""
        c = self.server.connect(TestClientTLS())
        self.server.clock.advance(60)
        c.pump.flush()
        self.assertEqual((c.client_app.handshake_done, c.client_app.lost), (True, None))
        self.assertEqual(self.server.clock.getDelayedCalls(), [])

    def test_handshakeListenerForwarded(self) -> None:
        """The application protocol still hears that the handshake completed."""
        self.server.connect(TestClientTLS())
        (app,) = self.server.app.protocols
        self.assertTrue(app.handshake_done)

    def test_applicationTransportIsTheTLSTransport(self) -> None:
        """The application writes straight to the TLS transport, which is secure."""
        from twisted.internet.interfaces import ISSLTransport

        self.server.connect(TestClientTLS())
        (app,) = self.server.app.protocols
        self.assertTrue(ISSLTransport.providedBy(app.transport))

    def test_refusedByWrappedFactory(self) -> None:
        """A wrapped factory that refuses a connection (returns None) is respected."""
        refusing = ServerFactory()
        refusing.buildProtocol = lambda addr: None
        factory = tls.server_tls_factory(self.server.options, refusing, reactor=Clock())
        self.assertIsNone(factory.buildProtocol(CLIENT_ADDRESS))


def _client_hello() -> bytes:
    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(65536)


def _format(event: dict) -> str:
    from twisted.logger import formatEvent

    return formatEvent(event)


# --- end to end over loopback -----------------------------------------------


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        return b"hello over tls"


class _Collect(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.done.callback(self.data)


class LoopbackTests(TestCase):
    @defer.inlineCallbacks
    def test_plainHTTPThenHTTPSOnRealSocket(self) -> None:
        """
        Over real sockets: a plain-HTTP client of the TLS port is closed with
        one log line; then a verifying HTTPS client is served.
        """
        logs = LogCapture(self)
        root = Hello()
        options = tls.SNIServerOptions(certificate_set(self, DEFAULT, EXACT))
        factory = tls.server_tls_factory(options, Site(root), reactor=reactor)
        port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            factory
        )
        self.addCleanup(port.stopListening)
        address = port.getHost()

        plain = _Collect(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        yield endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", address.port), plain
        )
        answer = yield plain.done
        self.assertNotIn(b"hello", answer)
        self.assertEqual(len(logs.mentioning("http request")), 1)

        secure = _Collect(b"GET / HTTP/1.0\r\nHost: a.example.com\r\n\r\n")
        endpoint = endpoints.wrapClientTLS(
            optionsForClientTLS("a.example.com", trustRoot=Certificate(_x509(CA.certificate))),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", address.port),
        )
        yield endpoints.connectProtocol(endpoint, secure)
        answer = yield secure.done
        self.assertIn(b"hello over tls", answer)


def _x509(certificate: x509.Certificate):
    from OpenSSL import crypto

    return crypto.X509.from_cryptography(certificate)


# --- TLS to backends ----------------------------------------------------------


class BackendTLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.directory = self.mktemp()
        self.ca_path = CA.write(self.directory)
        backend = CA.issue(["backend.internal"], ip_addresses=["10.0.0.5"])
        self.backend = SNIServer(certificate_set(self, backend))

    def connect(self, group_tls: BackendTLSConfig, host: str) -> Connection:
        return self.backend.connect(tls.client_tls_options(group_tls, host), Requester())

    def received_by_backend(self) -> bytes:
        """What the backend's application received on its latest connection."""
        return self.backend.app.protocols[-1].received

    def test_rightNameAccepted(self) -> None:
        """
        A backend certificate for the expected name, signed by the configured
        CA, is accepted, and the client's requests reach the backend.
        """
        c = self.connect(BackendTLSConfig(ca=self.ca_path), "backend.internal")
        self.assertTrue(c.client_app.handshake_done)
        self.assertEqual(
            self.received_by_backend(), b"GET /early HTTP/1.1\r\n\r\nGET /late HTTP/1.1\r\n\r\n"
        )

    def test_wrongNameRefused(self) -> None:
        """
        A backend certificate for another name is refused with a
        VerificationError, and no byte of the requests the client wrote
        (before the handshake, and when told it completed) reaches the
        backend.  (Twisted before 26 checks the name once the handshake is
        done and may still call C{handshakeCompleted}; its transport is
        aborted by then, and nothing is sent.)
        """
        c = self.connect(BackendTLSConfig(ca=self.ca_path), "other.internal")
        self.assertTrue(c.client_app.lost.check(VerificationError))
        self.assertEqual(self.received_by_backend(), b"")

    def test_serverNameOverridesHost(self) -> None:
        """C{server_name} is the name verified, whatever the backend's address."""
        c = self.connect(
            BackendTLSConfig(ca=self.ca_path, server_name="backend.internal"), "10.9.9.9"
        )
        self.assertTrue(c.client_app.handshake_done)

    def test_ipAddressVerifiedAgainstIPSAN(self) -> None:
        """
        A backend addressed by IP is verified against its IP subjectAltName:
        its own address is accepted and gets the requests; another address
        is refused with a VerificationError and gets none.
        """
        good = self.connect(BackendTLSConfig(ca=self.ca_path), "10.0.0.5")
        good_received = self.received_by_backend()
        bad = self.connect(BackendTLSConfig(ca=self.ca_path), "10.0.0.6")
        self.assertIsNone(good.client_app.lost)
        self.assertIn(b"GET /late", good_received)
        self.assertTrue(bad.client_app.lost.check(VerificationError))
        self.assertEqual(self.received_by_backend(), b"")

    def test_untrustedCARefused(self) -> None:
        """A certificate from another CA is refused even with the right name."""
        other = CertificateAuthority("another CA").write(self.mktemp())
        c = self.connect(BackendTLSConfig(ca=other), "backend.internal")
        self.assertFalse(c.client_app.handshake_done)

    def test_verifyFalseAcceptsAnyCertificateWithWarning(self) -> None:
        """
        C{verify = false} accepts a certificate for another name from an
        unknown CA, and the group's settings are warned about once.
        """
        cache = tls.ClientTLSCache()
        unverified = BackendTLSConfig(verify=False)
        cache.prepare("web", unverified)
        c = self.backend.connect(cache.options_for("web", unverified, "other.internal"))
        cache.options_for("web", unverified, "third.internal")
        self.assertTrue(c.client_app.handshake_done)
        (warning,) = self.logs.from_tls(LogLevel.warn)
        self.assertIn("backends.web.tls.verify is false", _format(warning))

    def test_unverifiedStillSendsServerName(self) -> None:
        """Without verification the backend still receives the server name by SNI."""
        backend = SNIServer(certificate_set(self, DEFAULT, EXACT))
        c = backend.connect(tls.client_tls_options(BackendTLSConfig(verify=False), "a.example.com"))
        self.assertEqual(c.client_app.peer_names(), ["a.example.com"])

    def test_missingCAFileNamesField(self) -> None:
        """A CA file that cannot be read is a ConfigError naming the field and the path."""
        missing = os.path.join(self.directory, "nope.pem")
        e = self.assertRaises(
            ConfigError, tls.ClientTLSCache().prepare, "web", BackendTLSConfig(ca=missing)
        )
        self.assertTrue(str(e).startswith(f"backends.web.tls.ca: cannot read {missing}"), str(e))

    def test_optionsBuiltOncePerGroupAndHost(self) -> None:
        """Client TLS options are built once per group and host, then reused."""
        cache = tls.ClientTLSCache()
        config = BackendTLSConfig(ca=self.ca_path)
        first = cache.options_for("web", config, "backend.internal")
        self.assertIs(cache.options_for("web", config, "backend.internal"), first)
        self.assertIsNot(cache.options_for("web", config, "other.internal"), first)

    def test_changedSettingsRebuildOptions(self) -> None:
        """A reload that changes a group's TLS settings gets new options."""
        cache = tls.ClientTLSCache()
        first = cache.options_for("web", BackendTLSConfig(ca=self.ca_path), "backend.internal")
        changed = BackendTLSConfig(ca=self.ca_path, server_name="backend.internal")
        self.assertIsNot(cache.options_for("web", changed, "backend.internal"), first)

    def test_stageChangesNothingUntilInstalled(self) -> None:
        """
        C{stage} loads a changed group's CA without touching the options in
        use (a reload that fails later changes nothing); C{install} switches.
        """
        cache = tls.ClientTLSCache()
        config = BackendTLSConfig(ca=self.ca_path)
        first = cache.options_for("web", config, "backend.internal")
        changed = BackendTLSConfig(ca=self.ca_path, server_name="backend.internal")
        staged = cache.stage({"web": changed})
        self.assertEqual(list(staged.groups), ["web"])
        self.assertIs(cache.options_for("web", config, "backend.internal"), first)
        cache.install(staged)
        self.assertIsNot(cache.options_for("web", changed, "backend.internal"), first)

    def test_stageWithBadCARaisesAndKeepsTheOld(self) -> None:
        """A non-PEM CA fails C{stage}, naming the field; the group keeps its trust root."""
        cache = tls.ClientTLSCache()
        config = BackendTLSConfig(ca=self.ca_path)
        first = cache.options_for("web", config, "backend.internal")
        bad = os.path.join(self.directory, "bad.pem")
        with open(bad, "w") as f:
            f.write("not PEM\n")
        e = self.assertRaises(ConfigError, cache.stage, {"web": BackendTLSConfig(ca=bad)})
        self.assertTrue(str(e).startswith(f"backends.web.tls.ca: {bad} is not a PEM certificate file"), str(e))
        self.assertIs(cache.options_for("web", config, "backend.internal"), first)


# --- session tickets, their rotation, and closing without waiting ------------


class RawClient:
    """
    A pyOpenSSL client on memory BIOs talking to the server protocol of
    L{server_tls_factory} over a L{StringTransport}: it answers nothing it
    is not asked to (no close_notify of its own), as many real clients.
    """

    def __init__(self, factory, context: SSL.Context, session=None) -> None:
        from twisted.internet.testing import StringTransport

        self.conn = SSL.Connection(context, None)
        self.conn.set_connect_state()
        if session is not None:
            self.conn.set_session(session)
        self.server = factory.buildProtocol(CLIENT_ADDRESS)
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)

    def pump(self) -> None:
        for _ in range(10):
            try:
                self.conn.do_handshake()
            except SSL.WantReadError:
                pass
            out = b""
            while True:
                try:
                    out += self.conn.bio_read(65536)
                except SSL.WantReadError:
                    break
            if out:
                self.server.dataReceived(out)
            back = self.transport.value()
            self.transport.clear()
            if back:
                self.conn.bio_write(back)
            if not out and not back:
                return
        # Read (and so process) what the server sent after the handshake:
        # TLS 1.3 tickets, close_notify.

    def read(self) -> None:
        try:
            self.conn.recv(65536)
        except (SSL.WantReadError, SSL.ZeroReturnError):
            pass


def client_context(max_version=SSL.TLS1_2_VERSION) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(max_version)
    return ctx


class SessionTicketTests(SynchronousTestCase):
    """Sessions resume by ticket; the ticket key is replaced after its lifetime."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.options = tls.SNIServerOptions(certificate_set(self, DEFAULT), clock=self.clock)
        self.factory = tls.server_tls_factory(self.options, RecordingFactory(), reactor=self.clock)

    def first_session(self, version):
        ctx = client_context(version)
        client = RawClient(self.factory, ctx)
        client.pump()
        client.read()
        client.pump()
        # Kept open: OpenSSL marks the session of a connection freed without
        # a shutdown as not resumable.
        self.addCleanup(lambda: client)
        return ctx, client.conn.get_session()

    def resumes(self, ctx, session) -> bool:
        from OpenSSL._util import lib  # pyOpenSSL 26 has no Connection.session_reused

        again = RawClient(self.factory, ctx, session)
        again.pump()
        return bool(lib.SSL_session_reused(again.conn._ssl))

    def test_ticketResumesWithoutTheCache(self) -> None:
        """A TLS 1.2 session resumes by its ticket even with the server's
        session cache off: tickets are on."""
        for context in self.options._current.contexts:
            context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx, session = self.first_session(SSL.TLS1_2_VERSION)
        self.assertTrue(self.resumes(ctx, session))

    def test_tls13Resumes(self) -> None:
        """A TLS 1.3 session resumes too."""
        ctx, session = self.first_session(SSL.TLS1_3_VERSION)
        self.assertTrue(self.resumes(ctx, session))

    def test_ticketKeyRotated(self) -> None:
        """Once the ticket key is ticket_key_lifetime old, new connections get
        a new key: a ticket from before no longer resumes."""
        ctx, session = self.first_session(SSL.TLS1_2_VERSION)
        self.clock.advance(self.options.ticket_key_lifetime - 1)
        self.assertTrue(self.resumes(ctx, session))
        self.clock.advance(1)
        self.assertFalse(self.resumes(ctx, session))

    def test_noRotationWithoutLifetime(self) -> None:
        """ticket_key_lifetime None: the key lives until a reload."""
        self.options.ticket_key_lifetime = None
        ctx, session = self.first_session(SSL.TLS1_2_VERSION)
        self.clock.advance(10 * 86400)
        self.assertTrue(self.resumes(ctx, session))


class CloseWithoutWaitingTests(SynchronousTestCase):
    """Closing an HTTPS connection sends close_notify and closes at once."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.options = tls.SNIServerOptions(certificate_set(self, DEFAULT), clock=self.clock)
        self.app = RecordingFactory()
        self.factory = tls.server_tls_factory(self.options, self.app, reactor=self.clock)

    def test_closedWithoutThePeersCloseNotify(self) -> None:
        """The server's loseConnection closes the TCP connection once its
        close_notify is written, without waiting for the client's (which
        openssl s_time and many scripts never send)."""
        client = RawClient(self.factory, client_context())
        client.pump()
        self.app.protocols[0].transport.loseConnection()
        self.assertTrue(client.transport.disconnecting)
        client.conn.bio_write(client.transport.value())
        self.assertRaises(SSL.ZeroReturnError, client.conn.recv, 100)  # close_notify came first

    def test_closedWithAStreamingProducerRegistered(self) -> None:
        """As a TCP transport does, loseConnection closes once everything is
        sent even while a streaming producer (the HTTPS listener's
        connection, for its whole life) is registered."""
        client = RawClient(self.factory, client_context())
        client.pump()
        app = self.app.protocols[0]
        app.transport.registerProducer(app, True)
        app.pauseProducing = app.resumeProducing = app.stopProducing = lambda: None
        app.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        app.transport.loseConnection()
        self.assertTrue(client.transport.disconnecting)
        client.conn.bio_write(client.transport.value())
        self.assertEqual(client.conn.recv(100), b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.assertRaises(SSL.ZeroReturnError, client.conn.recv, 100)
        app.transport.unregisterProducer()  # later, as the listener does: no error

    def test_abortStillAborts(self) -> None:
        """abortConnection aborts the TCP connection, as before."""
        client = RawClient(self.factory, client_context())
        client.pump()
        self.app.protocols[0].transport.abortConnection()
        self.assertTrue(client.transport.disconnected)

    def test_twistedStillCallsShutdownTLS(self) -> None:
        """
        The override relies on Twisted's private _shutdownTLS being what
        loseConnection calls: if Twisted renames it, this fails loudly.
        """
        from twisted.protocols.tls import TLSMemoryBIOProtocol

        self.assertTrue(callable(getattr(TLSMemoryBIOProtocol, "_shutdownTLS", None)))
        client = RawClient(self.factory, client_context())
        client.pump()
        calls = []
        server = client.server
        original = server._shutdownTLS
        server._shutdownTLS = lambda: (calls.append(1), original())
        self.app.protocols[0].transport.loseConnection()
        self.assertEqual(calls, [1])
