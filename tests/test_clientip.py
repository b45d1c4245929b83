"""
Tests for L{twisted_slb.clientip}: the client address behind trusted proxies
(X-Forwarded-For, Forwarded, PROXY protocol v1 and v2), in memory and end to
end over loopback in front of tcp, http and https listeners.

The PROXY headers here are byte strings written out by hand from HAProxy's
specification (proxy-protocol.txt, sections 2.1 and 2.2), not produced by
the code under test.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor, ssl
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.certs import CertificateAuthority
from twisted_slb._io import lean
from twisted_slb.clientip import (
    ClientIPPolicy,
    InvalidProxyHeader,
    ProxyProtocolFactory,
    TrustedNetworks,
    parse_proxy_header,
)
from twisted_slb.config import ConfigError, load_config, parse_config
from twisted_slb.persistence.interfaces import session_for
from twisted_slb.service import BalancerService

# --- hand-checked PROXY headers (HAProxy's proxy-protocol.txt) --------------------

SIG = bytes.fromhex("0d0a0d0a000d0a515549540a")  # "\r\n\r\n\0\r\nQUIT\n", 2.2
#: v1, TCP4: 192.0.2.1:56324 -> 198.51.100.2:443
V1_TCP4 = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
#: v1, TCP6: [2001:db8::1]:4711 -> [2001:db8::2]:443
V1_TCP6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 4711 443\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
#: v2, PROXY command (0x21), TCP over IPv4 (0x11), 12 address bytes:
#: 192.0.2.1 (c0 00 02 01), 198.51.100.2 (c6 33 64 02), 56324 (dc 04), 443 (01 bb)
V2_TCP4 = SIG + bytes.fromhex("21 11 000c c0000201 c6336402 dc04 01bb")
#: v2, PROXY, TCP over IPv6 (0x21), 36 address bytes: 2001:db8::1 -> 2001:db8::2, 4711 (12 67) -> 443
V2_TCP6 = SIG + bytes.fromhex(
    "21 21 0024"
    "20010db8000000000000000000000001"
    "20010db8000000000000000000000002"
    "1267 01bb"
)
#: v2, LOCAL command (0x20), AF_UNSPEC, no address bytes: a health check from the proxy itself
V2_LOCAL = SIG + bytes.fromhex("20 00 0000")
#: V2_TCP4 with a 7-byte TLV after the addresses (type 0x02 authority "example": 2.2.1)
V2_TCP4_TLV = SIG + bytes.fromhex("21 11 0016 c0000201 c6336402 dc04 01bb 02 0007") + b"example"


def header_for(source: str, version: str) -> bytes:
    """A hand-built v1 or v2 TCP4 header from C{source}:40000 to 127.0.0.1:80."""
    if version == "v1":
        return b"PROXY TCP4 %s 127.0.0.1 40000 80\r\n" % source.encode()
    return SIG + b"\x21\x11\x00\x0c" + bytes(int(o) for o in source.split(".")) + b"\x7f\x00\x00\x01" + \
        b"\x9c\x40\x00\x50"


class ProxyHeaderParserTests(SynchronousTestCase):
    def test_v1TCP4(self):
        """A v1 TCP4 header gives its source and destination, and its length."""
        src, dst, n = parse_proxy_header(V1_TCP4 + b"GET")
        self.assertEqual((src, dst, n), (IPv4Address("TCP", "192.0.2.1", 56324),
                                         IPv4Address("TCP", "198.51.100.2", 443), len(V1_TCP4)))

    def test_v1TCP6(self):
        """A v1 TCP6 header gives IPv6 addresses."""
        src, dst, n = parse_proxy_header(V1_TCP6)
        self.assertEqual(src, IPv6Address("TCP", "2001:db8::1", 4711))
        self.assertEqual(dst, IPv6Address("TCP", "2001:db8::2", 443))

    def test_v1Unknown(self):
        """PROXY UNKNOWN announces nothing: the connection's own addresses apply."""
        self.assertEqual(parse_proxy_header(V1_UNKNOWN + b"x"), (None, None, len(V1_UNKNOWN)))

    def test_v2TCP4(self):
        """A v2 TCP4 header decodes to the addresses written out in the spec's layout."""
        src, dst, n = parse_proxy_header(V2_TCP4 + b"rest")
        self.assertEqual((src, dst, n), (IPv4Address("TCP", "192.0.2.1", 56324),
                                         IPv4Address("TCP", "198.51.100.2", 443), 28))

    def test_v2TCP6(self):
        """A v2 TCP6 header decodes to compressed IPv6 addresses."""
        src, dst, n = parse_proxy_header(V2_TCP6)
        self.assertEqual((src, dst, n), (IPv6Address("TCP", "2001:db8::1", 4711),
                                         IPv6Address("TCP", "2001:db8::2", 443), 52))

    def test_v2Local(self):
        """A v2 LOCAL header is valid and announces nothing."""
        self.assertEqual(parse_proxy_header(V2_LOCAL), (None, None, 16))

    def test_v2WithTLVs(self):
        """TLVs after the addresses are part of the header and skipped."""
        src, _, n = parse_proxy_header(V2_TCP4_TLV + b"GET")
        self.assertEqual((src.host, n), ("192.0.2.1", len(V2_TCP4_TLV)))

    def test_everyPrefixNeedsMore(self):
        """Every strict prefix of a valid header asks for more bytes, never fails."""
        for header in (V1_TCP4, V1_TCP6, V2_TCP4, V2_TCP6, V2_LOCAL):
            for i in range(1, len(header)):
                self.assertIsNone(parse_proxy_header(header[:i]), (header, i))

    def test_garbage(self):
        """Anything that cannot start a header fails at once."""
        for data in (b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"PROXZ", b"proxy TCP4"):
            self.assertRaises(InvalidProxyHeader, parse_proxy_header, data)

    def test_v1Broken(self):
        """Bad v1 headers: a port that is not a number, a family mismatch, too few fields, too long."""
        for data in (b"PROXY TCP4 192.0.2.1 198.51.100.2 x 443\r\n",
                     b"PROXY TCP4 2001:db8::1 198.51.100.2 1 443\r\n",
                     b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",
                     b"PROXY TCP4 999.0.2.1 198.51.100.2 1 443\r\n",
                     b"PROXY TCP4 192.0.2.1 198.51.100.2 1 443 \r\n",
                     b"PROXY TCP4 192.0.2.1 198.51.100.2 1 70000\r\n",
                     b"PROXY " + b"1" * 120):
            self.assertRaises(InvalidProxyHeader, parse_proxy_header, data)

    def test_v2Broken(self):
        """Bad v2 headers: version 1, an unknown command, an address block shorter than its family."""
        for data in (SIG + bytes.fromhex("11 11 000c") + bytes(12),
                     SIG + bytes.fromhex("22 11 000c") + bytes(12),
                     SIG + bytes.fromhex("21 11 0004") + bytes(4),
                     SIG + bytes.fromhex("21 21 000c") + bytes(12)):
            self.assertRaises(InvalidProxyHeader, parse_proxy_header, data)


class Recorder(Protocol):
    """Records the address it was built for, its transport's view, and what it receives."""

    def __init__(self, addr):
        self.addr = addr
        self.data = b""
        self.lost = False

    def connectionMade(self):
        self.peer = self.transport.getPeer()
        self.host = self.transport.getHost()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = True


class RecordingFactory(Factory):
    def __init__(self):
        self.built = []

    def buildProtocol(self, addr):
        p = Recorder(addr)
        self.built.append(p)
        return p


class ProxyProtocolFactoryTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.inner = RecordingFactory()
        self.policy = ClientIPPolicy("proxy_protocol", ["10.0.0.0/8"], "web")
        self.factory = ProxyProtocolFactory(self.inner, self.policy, reactor=self.clock, timeout=10)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def connect(self, peer="10.1.2.3"):
        proto = self.factory.buildProtocol(IPv4Address("TCP", peer, 5000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 5000),
                                    hostAddress=IPv4Address("TCP", "10.9.9.9", 80))
        proto.makeConnection(transport)
        return proto, transport

    def warnings(self):
        return [e for e in self.events if e.get("log_namespace") == "twisted_slb.clientip"
                and e["log_level"].name == "warn"]

    def test_headerSplitAcrossReads(self):
        """A v2 header arriving one byte per read is assembled; the data after it reaches the protocol."""
        proto, transport = self.connect()
        for i in range(len(V2_TCP4)):
            self.assertEqual(self.inner.built, [])
            proto.dataReceived(V2_TCP4[i:i + 1])
        proto.dataReceived(b"hello")
        [inner] = self.inner.built
        self.assertEqual(inner.addr, IPv4Address("TCP", "192.0.2.1", 56324))
        self.assertEqual(inner.peer, IPv4Address("TCP", "192.0.2.1", 56324))
        self.assertEqual(inner.host, IPv4Address("TCP", "198.51.100.2", 443))
        self.assertEqual(inner.data, b"hello")
        self.assertFalse(transport.disconnecting)

    def test_dataInTheSameReadAsTheHeader(self):
        """Bytes following a v1 header in the same read are handed on."""
        proto, _ = self.connect()
        proto.dataReceived(V1_TCP6 + b"GET / HTTP/1.1\r\n")
        [inner] = self.inner.built
        self.assertEqual(inner.peer, IPv6Address("TCP", "2001:db8::1", 4711))
        self.assertEqual(inner.data, b"GET / HTTP/1.1\r\n")

    def test_localKeepsTheConnectionAddresses(self):
        """After a LOCAL header the protocol sees the real peer (the proxy's own health check)."""
        proto, _ = self.connect("10.1.2.3")
        proto.dataReceived(V2_LOCAL)
        [inner] = self.inner.built
        self.assertEqual(inner.peer, IPv4Address("TCP", "10.1.2.3", 5000))

    def test_garbageIsClosedAndCounted(self):
        """A connection that starts with anything but a header is closed, never built."""
        proto, transport = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.inner.built, [])
        self.assertEqual(self.policy.counts["refused"], 1)

    def test_untrustedPeerIsClosed(self):
        """A connection from an address outside trusted is closed before it sends anything."""
        proto, transport = self.connect("192.168.1.1")
        self.assertTrue(transport.disconnecting)
        proto.dataReceived(V1_TCP4)
        self.assertEqual(self.inner.built, [])

    def test_noHeaderInTime(self):
        """A trusted peer that sends no whole header within the timeout is closed."""
        proto, transport = self.connect()
        proto.dataReceived(V1_TCP4[:10])
        self.clock.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.inner.built, [])

    def test_loggedOncePerEpisode(self):
        """Refusals are logged once until a valid header arrives, then the end is logged."""
        for _ in range(3):
            proto, _ = self.connect()
            proto.dataReceived(b"garbage!")
        self.assertEqual(len(self.warnings()), 1)
        proto, _ = self.connect()
        proto.dataReceived(V1_TCP4)
        self.assertTrue(any("after" in e.get("log_format", "") and e.get("count") == 3 for e in self.events))
        proto, _ = self.connect()
        proto.dataReceived(b"garbage!")
        self.assertEqual(len(self.warnings()), 2)

    def test_halfCloseIsPassedOn(self):
        """A half-closeable wrapped protocol gets readConnectionLost, not a close."""
        from twisted.internet.interfaces import IHalfCloseableProtocol
        from zope.interface import alsoProvides

        proto, transport = self.connect()
        proto.dataReceived(V1_TCP4)
        [inner] = self.inner.built
        calls = []
        inner.readConnectionLost = lambda: calls.append("read")
        alsoProvides(inner, IHalfCloseableProtocol)
        proto.readConnectionLost()
        self.assertEqual(calls, ["read"])
        self.assertFalse(transport.disconnecting)

    def test_leanFollowsTheWrappedFactory(self):
        """The wrapper asks for lean transports exactly when the factory it wraps does."""
        self.inner.lean = True
        self.assertTrue(self.factory.lean)
        self.inner.lean = False
        self.assertFalse(self.factory.lean)


class FakeRequest:
    """What C{session_for} reads of a request."""

    def __init__(self, peer: str, policy, **headers):
        self.peer = peer
        self.client_ip_policy = policy
        self.requestHeaders = Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()})

    def getClientAddress(self):
        return IPv4Address("TCP", self.peer, 1234) if ":" not in self.peer else IPv6Address("TCP", self.peer, 1)

    def isSecure(self):
        return False


class HeaderTests(SynchronousTestCase):
    def setUp(self):
        self.xff = ClientIPPolicy("x-forwarded-for", ["10.0.0.0/8", "127.0.0.1/32", "::1/128"], "web")
        self.fwd = ClientIPPolicy("forwarded", ["10.0.0.0/8", "::1/128"], "web")

    def client(self, policy, peer, **headers):
        session = session_for(FakeRequest(peer, policy, **headers))
        return session.client_ip

    def test_trustedPeerGivesTheForwardedAddress(self):
        """From a trusted peer, the X-Forwarded-For address is the client; the peer is kept apart."""
        session = session_for(FakeRequest("10.0.0.5", self.xff, x_forwarded_for="203.0.113.7"))
        self.assertEqual((session.client_ip, session.peer_ip), ("203.0.113.7", "10.0.0.5"))
        self.assertEqual(self.xff.counts["forwarded"], 1)

    def test_untrustedPeerIsIgnored(self):
        """The same header from an untrusted peer is ignored (and counted)."""
        self.assertEqual(self.client(self.xff, "198.51.100.9", x_forwarded_for="203.0.113.7"), "198.51.100.9")
        self.assertEqual(self.xff.counts["untrusted"], 1)

    def test_spoofedLeftEntriesIgnored(self):
        """The rightmost untrusted address wins: entries the client wrote to its left do not count."""
        self.assertEqual(
            self.client(self.xff, "10.0.0.5", x_forwarded_for="1.1.1.1, garbage, 203.0.113.7, 10.0.0.9"),
            "203.0.113.7")

    def test_everyHopTrustedGivesTheLeftmost(self):
        """When every address is trusted, the leftmost is the client (nginx's behaviour)."""
        self.assertEqual(self.client(self.xff, "10.0.0.5", x_forwarded_for="10.1.1.1, 10.2.2.2"), "10.1.1.1")

    def test_malformedFallsBackToThePeer(self):
        """A malformed entry where the client should be gives the peer, counted."""
        self.assertEqual(self.client(self.xff, "10.0.0.5", x_forwarded_for="203.0.113.7, not-an-ip"), "10.0.0.5")
        self.assertEqual(self.xff.counts["malformed"], 1)

    def test_xffForms(self):
        """Ports, bracketed IPv6, IPv4-mapped IPv6 and several header lines are read."""
        for value, expected in (("203.0.113.7:4711", "203.0.113.7"), ("[2001:db8::1]:80", "2001:db8::1"),
                                ("2001:DB8:0::1", "2001:db8::1"), ("::ffff:203.0.113.7", "203.0.113.7")):
            self.assertEqual(self.client(self.xff, "127.0.0.1", x_forwarded_for=value), expected, value)
        request = FakeRequest("10.0.0.5", self.xff)
        request.requestHeaders.setRawHeaders(b"x-forwarded-for", [b"203.0.113.1", b"203.0.113.2, 10.0.0.1"])
        self.assertEqual(session_for(request).client_ip, "203.0.113.2")

    def test_forwardedIPv6(self):
        """Forwarded: for="[2001:db8::1]:4711" parses to 2001:db8::1."""
        self.assertEqual(self.client(self.fwd, "10.0.0.5", forwarded='for="[2001:db8::1]:4711"'), "2001:db8::1")

    def test_forwardedChain(self):
        """Several elements and parameters: the rightmost untrusted for= wins; quoted commas stay inside."""
        value = 'for=198.51.100.1;proto=https, for="203.0.113.7:80";by="[::1]";host="a,b", for=10.0.0.9'
        self.assertEqual(self.client(self.fwd, "::1", forwarded=value), "203.0.113.7")

    def test_forwardedUnknownAndObfuscated(self):
        """An unknown or obfuscated node stops the walk at the proxy that reported it."""
        self.assertEqual(self.client(self.fwd, "10.0.0.5", forwarded="for=unknown"), "10.0.0.5")
        self.assertEqual(self.client(self.fwd, "10.0.0.5", forwarded="for=_hidden, for=10.0.0.7"), "10.0.0.7")
        self.assertEqual(self.fwd.counts["malformed"], 0)

    def test_forwardedMalformed(self):
        """Unquoted IPv6, a bad token or an unterminated quote fall back to the peer, counted."""
        for value in ("for=2001:db8::1", 'for="[2001:db8::1]', "for", 'for="1.2.3.4', "for=[::1]"):
            self.assertEqual(self.client(self.fwd, "10.0.0.5", forwarded=value), "10.0.0.5", value)
        self.assertEqual(self.fwd.counts["malformed"], 5)

    def test_trustedIPv4Mapped(self):
        """A dual-stack listener's IPv4-mapped peer is matched against IPv4 blocks."""
        self.assertIn("::ffff:10.1.2.3", TrustedNetworks(["10.0.0.0/8"]))
        self.assertNotIn("::ffff:11.1.2.3", TrustedNetworks(["10.0.0.0/8"]))


CONFIG_HEAD = """
[backends.web]
servers = [ {{ name = "a", address = "127.0.0.1:{a}" }}, {{ name = "b", address = "127.0.0.1:{b}" }} ]
"""


class ConfigTests(SynchronousTestCase):
    def load(self, listener: str):
        return parse_config(CONFIG_HEAD.format(a=1, b=2) + "[listeners.web]\n" + listener, "slb.toml")

    def test_parsed(self):
        """Trusted entries are kept canonical; a bare address is a /32."""
        config = self.load('protocol = "http"\nbind = "tcp:0"\nbackends = "web"\n'
                           'client_ip = { source = "x-forwarded-for", trusted = ["10.0.0.0/8", "127.0.0.1", '
                           '"::1/128"] }\n')
        c = config.listeners["web"].client_ip
        self.assertEqual((c.source, c.trusted), ("x-forwarded-for", ("10.0.0.0/8", "127.0.0.1/32", "::1/128")))

    def test_badEntryNamed(self):
        """A bad trusted entry is named by its index, with the value and what is allowed."""
        e = self.assertRaises(ConfigError, self.load,
                              'protocol = "http"\nbind = "tcp:0"\nbackends = "web"\n'
                              'client_ip = { source = "forwarded", trusted = ["10.0.0.0/8", "10.0.0.1/8"] }\n')
        self.assertIn("listeners.web.client_ip.trusted[1]", str(e))
        self.assertIn("10.0.0.0/8", str(e).split("trusted[1]")[1])  # the hint
        e = self.assertRaises(ConfigError, self.load,
                              'protocol = "http"\nbind = "tcp:0"\nbackends = "web"\n'
                              'client_ip = { source = "forwarded", trusted = ["cdn.example.com"] }\n')
        self.assertIn("listeners.web.client_ip.trusted[0]", str(e))
        self.assertIn("'cdn.example.com'", str(e))

    def test_tcpReadsNoHeaders(self):
        """A tcp listener cannot take its client address from an HTTP header."""
        e = self.assertRaises(ConfigError, self.load,
                              'protocol = "tcp"\nbind = "tcp:0"\nbackends = "web"\n'
                              'client_ip = { source = "x-forwarded-for", trusted = ["10.0.0.0/8"] }\n')
        self.assertIn("listeners.web.client_ip.source", str(e))
        self.assertIn("'proxy_protocol'", str(e))

    def test_trustedRequiredExceptForPeer(self):
        """A header or PROXY source needs trusted proxies; the peer source takes none."""
        e = self.assertRaises(ConfigError, self.load,
                              'protocol = "tcp"\nbind = "tcp:0"\nbackends = "web"\n'
                              'client_ip = { source = "proxy_protocol" }\n')
        self.assertIn("listeners.web.client_ip.trusted", str(e))
        e = self.assertRaises(ConfigError, self.load,
                              'protocol = "tcp"\nbind = "tcp:0"\nbackends = "web"\n'
                              'client_ip = { trusted = ["10.0.0.0/8"] }\n')
        self.assertIn("listeners.web.client_ip.trusted", str(e))


# --- end to end over loopback ---------------------------------------------------


class EchoHeaders(Resource):
    isLeaf = True

    def __init__(self, name):
        Resource.__init__(self)
        self.name = name

    def render(self, request):
        xff = request.getHeader(b"x-forwarded-for") or b"-"
        return b"backend=" + self.name.encode() + b" xff=" + xff + b"\n"


class HeadRecorder(Protocol):
    """
    A TCP backend: records the bytes it receives and answers with its name
    once the client's payload (C{hello} or C{ping}) is there: the PROXY
    header the balancer sends first may come in a read of its own.
    """

    def connectionMade(self):
        self.data = b""

    def dataReceived(self, data):
        self.factory.received.append(data)
        self.data += data
        if self.data.endswith((b"hello", b"ping")):
            self.transport.write(b"backend=" + self.factory.name + b"\n")
            self.transport.loseConnection()


class Client(Protocol):
    """Sends C{chunks} (bytes, or the string "tls" to start TLS there), collects the answer."""

    def __init__(self, chunks, tls=None):
        self.chunks = chunks
        self.tls = tls
        self.received = b""
        self.done = defer.Deferred()

    def connectionMade(self):
        for chunk in self.chunks:
            if chunk == "tls":
                self.transport.startTLS(self.tls)
            else:
                self.transport.write(chunk)

    def dataReceived(self, data):
        self.received += data
        if b"\r\n\r\n" in self.received and self.received.endswith(b"\n"):
            # The whole (one-line) body is here.  Close ourselves: a
            # startTLS client does not answer the server's close_notify.
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback(self.received)


CONFIG = """
[backends.web]
servers = [ {{ name = "a", address = "127.0.0.1:{a}" }}, {{ name = "b", address = "127.0.0.1:{b}" }} ]

[backends.raw]
servers = [ {{ name = "ta", address = "127.0.0.1:{ta}" }}, {{ name = "tb", address = "127.0.0.1:{tb}" }} ]

[listeners.xff]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "source_ip", timeout = 600 }}
client_ip = {{ source = "x-forwarded-for", trusted = ["127.0.0.1/32"] }}

[listeners.pp_http]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "source_ip", timeout = 600 }}
client_ip = {{ source = "proxy_protocol", trusted = ["127.0.0.1/32"] }}

[listeners.pp_https]
protocol = "https"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
certificates = [ {{ cert = "{cert}", key = "{key}" }} ]
client_ip = {{ source = "proxy_protocol", trusted = ["127.0.0.1/32"] }}

[listeners.pp_tcp]
protocol = "tcp"
bind = "tcp:0:interface=127.0.0.1"
backends = "raw"
persistence = {{ type = "source_ip", timeout = 600 }}
proxy_protocol = "v1"
client_ip = {{ source = "proxy_protocol", trusted = ["127.0.0.1/32"] }}
"""


class EndToEndTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        ca = CertificateAuthority()
        self.ca_path = ca.write(self.dir)
        cert, key = ca.issue(["localhost"], ip_addresses=["127.0.0.1"]).write(self.dir, "site")
        ports = {}
        for name in "ab":
            port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(EchoHeaders(name)))
            self.addCleanup(port.stopListening)
            ports[name] = port.getHost().port
        self.received = {}
        for name in ("ta", "tb"):
            factory = Factory.forProtocol(HeadRecorder)
            factory.name = name.encode()
            factory.received = self.received.setdefault(name, [])
            port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
            self.addCleanup(port.stopListening)
            ports[name] = port.getHost().port
        path = os.path.join(self.dir, "slb.toml")
        with open(path, "w") as f:
            f.write(CONFIG.format(cert=cert, key=key, **ports))
        self.service = BalancerService(load_config(path), reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def port(self, name):
        return self.service.getServiceNamed(name).port.getHost().port

    def table(self, key):
        return {client.decode("ascii"): backend for client, backend, _ in self.service.stick_tables[key].items()}

    @defer.inlineCallbacks
    def send(self, listener, chunks, source="127.0.0.1", tls=None):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port(listener), bindAddress=(source, 0))
        client = yield connectProtocol(endpoint, Client(chunks, tls))
        answer = yield client.done
        return answer

    def get(self, extra=b""):
        return b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + extra + b"\r\n"

    @defer.inlineCallbacks
    def test_xffFromTrustedPeerPins(self):
        """A trusted peer's X-Forwarded-For pins by the forwarded address; the peer is appended on."""
        answer = yield self.send("xff", [self.get(b"X-Forwarded-For: 6.6.6.6, 203.0.113.7\r\n")])
        self.assertIn(b"xff=6.6.6.6, 203.0.113.7, 127.0.0.1\n", answer)
        self.assertEqual(list(self.table("xff/web")), ["203.0.113.7"])

    @defer.inlineCallbacks
    def test_xffFromUntrustedPeerIgnored(self):
        """The same header from 127.0.0.2 (not trusted) pins by the peer."""
        yield self.send("xff", [self.get(b"X-Forwarded-For: 203.0.113.7\r\n")], source="127.0.0.2")
        self.assertEqual(list(self.table("xff/web")), ["127.0.0.2"])
        stats = self.service.stats.listeners["xff"].snapshot()["client_ip"]
        self.assertEqual(stats["untrusted"], 1)

    @defer.inlineCallbacks
    def test_proxyV1InFrontOfHTTP(self):
        """A v1 header before an HTTP request: the announced client is pinned and forwarded."""
        answer = yield self.send("pp_http", [header_for("203.0.113.8", "v1"), self.get()])
        self.assertIn(b"xff=203.0.113.8\n", answer)
        self.assertEqual(list(self.table("pp_http/web")), ["203.0.113.8"])

    @defer.inlineCallbacks
    def test_proxyV2InFrontOfHTTPOnLeanTransports(self):
        """A v2 header works on the plain HTTP listener, whose connections keep lean transports."""
        port = self.service.getServiceNamed("pp_http").port
        if lean.usable(reactor):
            self.assertIs(port.transport, lean.LeanServer)
        answer = yield self.send("pp_http", [header_for("203.0.113.9", "v2") + self.get()])
        self.assertIn(b"xff=203.0.113.9\n", answer)

    @defer.inlineCallbacks
    def test_proxyRefusedFromUntrustedOrWithGarbage(self):
        """No header, or an untrusted peer: closed with no answer and no backend."""
        answer = yield self.send("pp_http", [self.get()])
        self.assertEqual(answer, b"")
        answer = yield self.send("pp_http", [header_for("203.0.113.9", "v1") + self.get()], source="127.0.0.3")
        self.assertEqual(answer, b"")
        self.assertEqual(self.table("pp_http/web"), {})
        self.assertEqual(self.service.stats.listeners["pp_http"].client_ip["refused"], 2)

    @defer.inlineCallbacks
    def test_proxyInFrontOfHTTPS(self):
        """The header comes before the TLS handshake; the request inside TLS has the announced client."""
        with open(self.ca_path, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        options = ssl.optionsForClientTLS("localhost", trustRoot=trust)
        for version, source in (("v1", "203.0.113.10"), ("v2", "203.0.113.11")):
            answer = yield self.send("pp_https", [header_for(source, version), "tls", self.get()], tls=options)
            self.assertIn(b"xff=" + source.encode() + b"\n", answer)

    @defer.inlineCallbacks
    def test_proxyInFrontOfTCP(self):
        """TCP listener: pinned by the announced client, which the PROXY header to the backend names."""
        for header, client in ((V1_TCP6, "2001:db8::1"), (header_for("203.0.113.12", "v2"), "203.0.113.12")):
            answer = yield self.send("pp_tcp", [header + b"hello"])
            self.assertIn(b"backend=t", answer)
        table = self.table("pp_tcp/raw")
        self.assertEqual(sorted(table), ["2001:db8::1", "203.0.113.12"])
        sent = b"".join(b"".join(chunks) for chunks in self.received.values())
        self.assertIn(b"PROXY TCP6 2001:db8::1 2001:db8::2 4711 443\r\nhello", sent)
        self.assertIn(b"PROXY TCP4 203.0.113.12 127.0.0.1 40000 80\r\nhello", sent)

    @defer.inlineCallbacks
    def test_proxyLocalInFrontOfTCP(self):
        """A LOCAL header (the proxy's health check) is served as a connection from the proxy itself."""
        answer = yield self.send("pp_tcp", [V2_LOCAL + b"ping"], source="127.0.0.1")
        self.assertIn(b"backend=t", answer)
        self.assertEqual(list(self.table("pp_tcp/raw")), ["127.0.0.1"])
