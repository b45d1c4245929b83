"""
HTTPS listeners end to end over loopback: TLS termination with a client that
verifies the certificate, the Secure cookie and X-Forwarded-Proto, the redirect
listener, certificates re-read on reload, and verified TLS to backends.
"""

from __future__ import annotations

import os
from typing import Dict, List

from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from tests.certs import CertificateAuthority
from twisted_slb._io import leantls
from twisted_slb.config import load_config
from twisted_slb.service import BalancerService


class EchoForwarded(Resource):
    isLeaf = True

    def __init__(self, name: str) -> None:
        Resource.__init__(self)
        self.name = name

    def render(self, request):
        proto = request.getHeader(b"x-forwarded-proto") or b"-"
        return b"backend=" + self.name.encode() + b" proto=" + proto + b"\n"


@implementer(IHandshakeListener)
class PeerCertificate(protocol.Protocol):
    """Reads the server's certificate once the handshake is done."""

    def __init__(self) -> None:
        self.serial: defer.Deferred = defer.Deferred()

    def handshakeCompleted(self) -> None:
        self.serial.callback(self.transport.getPeerCertificate().get_serial_number())
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.serial.called:
            self.serial.errback(reason)


CONFIG = """
[backends.web]
servers = [ {{ name = "a", address = "127.0.0.1:{a}" }}, {{ name = "b", address = "127.0.0.1:{b}" }} ]

[listeners.secure]
protocol = "https"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "insert_cookie", timeout = 3600 }}
certificates = [ {{ cert = "{cert}", key = "{key}" }} ]

[listeners.plain]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
https_redirect_port = {redirect}
"""


class HTTPSTests(TestCase):
    """The suite over the lean TLS transport (L{twisted_slb._io.leantls})."""

    timeout = 30
    #: whether the https listener serves its connections on L{leantls.LeanTLSServer}
    lean_tls = True

    @defer.inlineCallbacks
    def setUp(self):
        self.patch(leantls, "enabled", self.lean_tls)
        self.dir = os.path.abspath(self.mktemp())
        self.ca = CertificateAuthority()
        self.ca_path = self.ca.write(self.dir)
        self.cert, self.key = self.ca.issue(["localhost"], ip_addresses=["127.0.0.1"]).write(self.dir, "site")
        ports = {}
        for name in "ab":
            port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(EchoForwarded(name)))
            self.addCleanup(port.stopListening)
            ports[name] = port.getHost().port
        self.config_path = os.path.join(self.dir, "slb.toml")
        self.write_config(443, **ports)
        self.service = BalancerService(load_config(self.config_path), reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.https_port = self.service.getServiceNamed("secure").port.getHost().port
        self.http_port = self.service.getServiceNamed("plain").port.getHost().port
        self.ports = ports

    def write_config(self, redirect: int, **ports) -> None:
        with open(self.config_path, "w") as f:
            f.write(CONFIG.format(cert=self.cert, key=self.key, redirect=redirect, **ports))

    def agent(self) -> Agent:
        with open(self.ca_path, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        pool = HTTPConnectionPool(reactor, persistent=False)
        return Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=trust), pool=pool)

    @defer.inlineCallbacks
    def get(self, agent, url: str, cookies: Dict[str, str] = None, host: bytes = None):
        headers = Headers()
        if cookies:
            headers.addRawHeader(b"cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()).encode())
        if host:
            headers.addRawHeader(b"host", host)
        response = yield agent.request(b"GET", url.encode(), headers)
        body = yield readBody(response)
        return response, body.decode()

    @defer.inlineCallbacks
    def test_secureCookieAndForwardedProto(self):
        """
        Behind TLS, with a client that verifies the certificate, the insert
        cookie is Secure, the backend sees X-Forwarded-Proto: https, and
        persistence works as on HTTP.
        """
        agent = self.agent()
        url = f"https://localhost:{self.https_port}/"
        response, body = yield self.get(agent, url)
        self.assertIn("proto=https", body)
        set_cookie = response.headers.getRawHeaders(b"set-cookie")[0].decode()
        self.assertTrue(set_cookie.startswith("SERVERID="))
        self.assertIn("; Secure", set_cookie)
        jar = {"SERVERID": set_cookie.split(";")[0].split("=", 1)[1]}
        first = body.split()[0]
        for _ in range(6):
            _, body = yield self.get(agent, url, cookies=jar)
            self.assertEqual(body.split()[0], first)

    @defer.inlineCallbacks
    def test_redirectKeepsHostPathAndQuery(self):
        """The redirect listener answers 301 to https with host, path and query kept."""
        agent = Agent(reactor)
        response, _ = yield self.get(agent, f"http://127.0.0.1:{self.http_port}/a/b?x=1&y=2", host=b"example.com:80")
        self.assertEqual(response.code, 301)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"https://example.com/a/b?x=1&y=2"])

    @defer.inlineCallbacks
    def test_redirectNamesANonDefaultPort(self):
        """The HTTP-to-HTTPS redirect names the HTTPS port when it is not 443."""
        self.write_config(8443, **self.ports)
        self.assertTrue(self.service.reload())
        response, _ = yield self.get(Agent(reactor), f"http://127.0.0.1:{self.http_port}/p", host=b"example.com")
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"https://example.com:8443/p"])

    def served_serial(self) -> defer.Deferred:
        with open(self.ca_path, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        endpoint = wrapClientTLS(
            ssl.optionsForClientTLS("localhost", trustRoot=trust),
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.https_port),
        )
        client = PeerCertificate()
        return connectProtocol(endpoint, client).addCallback(lambda _: client.serial)

    @defer.inlineCallbacks
    def test_reloadRereadsCertificates(self):
        """
        A reload (SIGHUP) re-reads the certificate files: new connections get
        the new certificate, on the same port.
        """
        before = yield self.served_serial()
        renewed = self.ca.issue(["localhost"], ip_addresses=["127.0.0.1"])
        renewed.write(self.dir, "site")
        self.assertTrue(self.service.reload())
        after = yield self.served_serial()
        self.assertNotEqual(before, after)
        self.assertEqual(after, renewed.certificate.serial_number)

    def secure_transport(self):
        return self.service.getServiceNamed("secure").port.transport

    def test_transportOfTheHTTPSListener(self):
        """
        The https listener's port builds lean TLS transports (Twisted's TCP
        transport under Twisted's TLS when switched off), and again after a
        reload, which builds a new TLS factory; the plain listener keeps
        its lean TCP transport.
        """
        from twisted.internet import tcp

        from twisted_slb._io import lean

        for reloaded in (False, True):
            if reloaded:
                self.assertTrue(self.service.reload())
            transport = self.secure_transport()
            if self.lean_tls:
                self.assertTrue(issubclass(transport, leantls.LeanTLSServer))
                factory = self.service.getServiceNamed("secure").factory
                self.assertIs(transport.tls_factory, factory)
            else:
                self.assertIs(transport, tcp.Server)
            self.assertIs(self.service.getServiceNamed("plain").port.transport, lean.LeanServer)

    def test_proxyProtocolKeepsTwistedTLS(self):
        """An https listener reading a PROXY header first uses Twisted's TLS
        (the header is read before TLS starts, on a plain transport)."""
        with open(self.config_path) as f:
            config = f.read()
        config = config.replace('backends = "web"\n', 'backends = "web"\n'
                                'client_ip = { source = "proxy_protocol", trusted = ["127.0.0.1/32"] }\n', 1)
        with open(self.config_path, "w") as f:
            f.write(config)
        self.assertTrue(self.service.reload())
        self.assertFalse(issubclass(self.secure_transport(), leantls.LeanTLSServer))

    def test_reloadWithBrokenCertificateKeepsRunning(self):
        """A key that does not match its certificate fails the reload as a whole."""
        other = self.ca.issue(["localhost"])
        with open(self.key, "wb") as f:
            from tests.certs import key_pem

            f.write(key_pem(other.key))
        self.assertFalse(self.service.reload())
        self.assertEqual(self.service.getServiceNamed("secure").port.getHost().port, self.https_port)


class HTTPSOverTwistedTLSTests(HTTPSTests):
    """The same suite with the lean TLS transport switched off: Twisted's TLS."""

    lean_tls = False


BACKEND_TLS = """
[backends.secure]
tls = {{ verify = true, ca = "{ca}", server_name = "{name}" }}
servers = [ {{ name = "a", address = "127.0.0.1:{port}" }} ]

[listeners.web]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "secure"
"""


class BackendTLSTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        ca = CertificateAuthority()
        self.ca_path = ca.write(self.dir)
        issued = ca.issue(["backend.internal"])
        with open(os.path.join(self.dir, "b.pem"), "wb") as f:
            from tests.certs import cert_pem, key_pem

            f.write(key_pem(issued.key) + cert_pem(issued.certificate))
        options = ssl.PrivateCertificate.loadPEM(open(os.path.join(self.dir, "b.pem"), "rb").read()).options()
        # What the backend's HTTP server receives, decrypted.
        self.backend_received: List[bytes] = []
        site = Site(EchoForwarded("tls"))
        build = site.buildProtocol

        def buildProtocol(addr):
            channel = build(addr)
            deliver = channel.dataReceived

            def dataReceived(data: bytes) -> None:
                self.backend_received.append(data)
                deliver(data)

            channel.dataReceived = dataReceived
            return channel

        site.buildProtocol = buildProtocol
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            __import__("twisted.protocols.tls", fromlist=["TLSMemoryBIOFactory"]).TLSMemoryBIOFactory(
                options, False, site
            )
        )
        self.addCleanup(port.stopListening)
        self.backend_port = port.getHost().port

    @defer.inlineCallbacks
    def run_with(self, name: str):
        path = os.path.join(self.dir, "slb.toml")
        with open(path, "w") as f:
            f.write(BACKEND_TLS.format(ca=self.ca_path, name=name, port=self.backend_port))
        service = BalancerService(load_config(path), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.getServiceNamed("web").port.getHost().port
        response = yield Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/".encode())
        body = yield readBody(response)
        return response.code, body

    @defer.inlineCallbacks
    def test_rightNameAccepted(self):
        """A TLS backend whose certificate names the configured server name is accepted and proxied to."""
        code, body = yield self.run_with("backend.internal")
        self.assertEqual(code, 200)
        self.assertIn(b"backend=tls", body)
        self.assertIn(b"GET / HTTP/1.1", b"".join(self.backend_received))

    @defer.inlineCallbacks
    def test_wrongNameRefused(self):
        """
        A backend whose certificate does not name it is never used: 502, and
        not a byte of the request reaches it.
        """
        code, _ = yield self.run_with("other.internal")
        self.assertEqual(code, 502)
        self.assertEqual(self.backend_received, [])
        self.flushLoggedErrors()
