# -*- test-case-name: tests.test_clientip -*-
"""
Where a listener's client address comes from: the real client behind a CDN,
a cloud load balancer or another proxy.

A listener's C{client_ip} setting names the source:

 - C{"peer"} (the default): the address at the other end of the connection.
 - C{"x-forwarded-for"} / C{"forwarded"} (RFC 7239): when the connection
   comes from a C{trusted} address, the client is the rightmost address of
   the header that is not trusted itself (nginx's C{real_ip_recursive on}):
   entries to its left were written by the client and may be forged.  A
   header that cannot be read there falls back to the peer and is counted,
   never answered with an error.  From an untrusted peer the header is
   ignored.
 - C{"proxy_protocol"}: the listener reads a PROXY protocol header (HAProxy's
   v1 text or v2 binary) at the start of every connection, before anything
   else (before the TLS handshake on https).  Connections from untrusted
   peers, and connections without a valid header, are closed.

L{ClientIPPolicy.resolve} is the one function that turns a peer (and request
headers) into the client address; L{ProxyProtocolFactory} wraps any listener
factory (TCP relay, HTTP front, TLS) and hands it a transport whose
C{getPeer} and C{getHost} are the addresses the header announced, so that
everything downstream (persistence, C{hash} scheduling, per-IP limits, the
PROXY header sent on to backends, the access log) uses them unchanged.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from typing import Dict, Iterable, List, Optional, Union, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from twisted_slb._io.twisted_private import HAProxyInvalidHeader as TwistedInvalid
from twisted_slb._io.twisted_private import HAProxyV1Parser as V1Parser
from twisted_slb._io.twisted_private import HAProxyV2Parser as V2Parser
from twisted_slb._reactor import maybe_global_reactor
from twisted_slb._typing import IStreamTransport
from twisted_slb.config import parse_cidr
from twisted_slb.persistence.interfaces import normalise_ip

log = Logger(namespace="twisted_slb.clientip")

#: The values of a listener's C{client_ip.source}.
SOURCES = ("peer", "x-forwarded-for", "forwarded", "proxy_protocol")
#: The sources read from request headers (HTTP and HTTPS listeners only).
HEADER_SOURCES = ("x-forwarded-for", "forwarded")

_NETWORKS = (ipaddress.IPv4Network, ipaddress.IPv6Network)


class TrustedNetworks:
    """
    A set of CIDR blocks, and the question: is this address in one of them?

    Answers are cached (peers repeat: a handful of proxies carry every
    request), in a dictionary cleared when it grows past L{CACHE}.
    """

    CACHE = 4096

    def __init__(self, networks: Iterable = ()) -> None:
        self.networks = tuple(n if isinstance(n, _NETWORKS) else parse_cidr(n) for n in networks)
        self._cache: Dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, ip: str) -> bool:
        cache = self._cache
        known = cache.get(ip)
        if known is not None:
            return known
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            answer = False
        else:
            mapped = getattr(address, "ipv4_mapped", None)
            if mapped is not None:
                address = mapped
            answer = any(address.version == n.version and address in n for n in self.networks)
        if len(cache) >= self.CACHE:
            cache.clear()
        cache[ip] = answer
        return answer

    def trusts(self, address) -> bool:
        """
        Whether a connection's peer (an L{IAddress}) is trusted.  A peer with
        no IP address (a UNIX socket: only local processes reach it) is.
        """
        host = getattr(address, "host", None)
        if not isinstance(address, (IPv4Address, IPv6Address)) or host is None:
            return True
        return normalise_ip(host) in self


# --- request headers --------------------------------------------------------


class MalformedHeader(ValueError):
    """A forwarding header that cannot be read where it matters."""


#: A Forwarded node that names no address: C{unknown} or an obfuscated
#: identifier (C{_hidden}).
UNKNOWN = object()

_TCHARS = r"!#$%&'*+.^_`|~0-9A-Za-z-"
_FORWARDED_PAIR = re.compile(r'[ \t]*([%s]+)=(?:([%s]+)|"((?:[^"\\]|\\.)*)")[ \t]*' % (_TCHARS, _TCHARS))
_OBFUSCATED = re.compile(r"_[A-Za-z0-9._-]+\Z")
_PORT = re.compile(r"(?:[0-9]{1,5}|_[A-Za-z0-9._-]+)\Z")


def _ip_text(host: str) -> str:
    """The canonical text of an IP address (L{normalise_ip}), or L{MalformedHeader}."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise MalformedHeader(f"not an IP address: {host[:60]!r}") from None
    return normalise_ip(str(address))


def parse_xff_entry(entry: str) -> str:
    """
    One X-Forwarded-For entry: C{1.2.3.4}, C{1.2.3.4:80}, C{2001:db8::1},
    C{[2001:db8::1]} or C{[2001:db8::1]:80}.

    @return: the address, canonical (L{normalise_ip}).
    @raise MalformedHeader: anything else.
    """
    entry = entry.strip()
    if entry.startswith("["):
        end = entry.find("]")
        rest = entry[end + 1:] if end > 0 else "x"
        if rest and not (rest[0] == ":" and rest[1:].isdigit()):
            raise MalformedHeader(f"not an address: {entry[:60]!r}")
        return _ip_text(entry[1:end])
    if entry.count(":") == 1:
        host, port = entry.split(":")
        if not port.isdigit():
            raise MalformedHeader(f"not an address: {entry[:60]!r}")
        entry = host
    return _ip_text(entry)


def parse_forwarded(value: str) -> List[Dict[str, str]]:
    """
    The elements of a C{Forwarded} header (RFC 7239 section 4), left to
    right, each a dictionary of its parameters (names lowercased, quoted
    strings unquoted).

    @raise MalformedHeader: the value does not follow the grammar.
    """
    elements: List[Dict[str, str]] = [{}]
    pos, end = 0, len(value)
    expect_pair = True
    while pos < end:
        char = value[pos]
        if char in " \t":
            pos += 1
        elif char == ",":
            elements.append({})
            expect_pair = True
            pos += 1
        elif char == ";":
            expect_pair = True
            pos += 1
        else:
            m = _FORWARDED_PAIR.match(value, pos)
            if m is None or not expect_pair:
                raise MalformedHeader(f"not a forwarded-pair at {value[pos:pos + 40]!r}")
            name = m.group(1).lower()
            text = m.group(2) if m.group(2) is not None else re.sub(r"\\(.)", r"\1", m.group(3))
            element = elements[-1]
            if name in element:
                raise MalformedHeader(f"{name!r} twice in one element")
            element[name] = text
            expect_pair = False
            pos = m.end()
    return elements


def parse_forwarded_node(node: str):
    """
    A C{for=} value (RFC 7239 section 6): C{192.0.2.43}, C{192.0.2.43:80},
    C{[2001:db8::1]}, C{[2001:db8::1]:4711}, C{unknown} or an obfuscated
    C{_identifier} (a port may be obfuscated too).

    @return: the address, canonical, or L{UNKNOWN}.
    @raise MalformedHeader: anything else (an IPv6 address must be in
        brackets).
    """
    if node.lower() == "unknown" or _OBFUSCATED.match(node):
        return UNKNOWN
    if node.startswith("["):
        end = node.find("]")
        if end < 0:
            raise MalformedHeader(f"unterminated IPv6 node: {node[:60]!r}")
        rest = node[end + 1:]
        if rest and not (rest[0] == ":" and _PORT.match(rest[1:])):
            raise MalformedHeader(f"not a node: {node[:60]!r}")
        host = node[1:end]
        if ":" not in host:
            raise MalformedHeader(f"brackets around a non-IPv6 node: {node[:60]!r}")
        return _ip_text(host)
    host, colon, port = node.partition(":")
    if colon and not _PORT.match(port):
        raise MalformedHeader(f"not a node: {node[:60]!r}")
    if host.lower() == "unknown" or _OBFUSCATED.match(host):
        return UNKNOWN
    address = _ip_text(host)
    if ":" in address:
        raise MalformedHeader(f"an IPv6 node without brackets: {node[:60]!r}")
    return address


class ClientIPPolicy:
    """
    A listener's C{client_ip} setting, at runtime: L{resolve} turns the peer
    of a connection (and the headers of a request) into the client address.

    @ivar source: one of L{SOURCES}.
    @ivar trusted: the L{TrustedNetworks} whose headers are believed.
    @ivar counts: C{"forwarded"} (requests whose client came from a header),
        C{"malformed"} (headers that fell back to the peer),
        C{"untrusted"} (headers ignored because the peer is not trusted),
        C{"refused"} (connections closed for want of a valid PROXY header);
        usually the listener's L{twisted_slb.stats.ListenerStats.client_ip},
        so that the counts survive a reload.
    """

    def __init__(self, source: str = "peer", trusted: Iterable = (), listener_name: str = "",
                 counts: Optional[Dict[str, int]] = None) -> None:
        if source not in SOURCES:
            raise ValueError(f"client_ip source must be one of {SOURCES}, not {source!r}")
        self.source = source
        self.trusted = trusted if isinstance(trusted, TrustedNetworks) else TrustedNetworks(trusted)
        self.listener_name = listener_name
        self.counts = counts if counts is not None else new_counts()
        self._header = {"x-forwarded-for": b"x-forwarded-for", "forwarded": b"forwarded"}.get(source)
        self.malformed_episode = Episode(
            f"listener {listener_name}: malformed {source} header",
            "well-formed headers again",
        )

    @property
    def reads_headers(self) -> bool:
        """Whether the client address comes from request headers."""
        return self._header is not None

    def resolve(self, peer: str, headers=None) -> str:
        """
        The client address of a request (or connection) from C{peer}.

        @param peer: the connection's peer, canonical (L{normalise_ip}).
        @param headers: the request's L{twisted.web.http_headers.Headers}
            (L{None} for a TCP connection).
        @return: the client address, canonical.
        """
        name = self._header
        if name is None or headers is None:
            return peer
        values = headers.getRawHeaders(name)
        if not values:
            return peer
        if peer not in self.trusted:
            self.counts["untrusted"] += 1
            return peer
        try:
            text = ",".join(v.decode("latin-1") for v in values)
            if name == b"forwarded":
                client = self._from_forwarded(peer, text)
            else:
                client = self._from_xff(peer, text)
        except MalformedHeader as e:
            self.counts["malformed"] += 1
            self.malformed_episode.bad(f"from {peer}: {e}")
            return peer
        self.malformed_episode.good()
        self.counts["forwarded"] += 1
        return client

    def _walk(self, peer: str, nodes) -> str:
        """The rightmost address not trusted; C{nodes} yields right to left."""
        client = peer
        trusted = self.trusted
        for node in nodes:
            if node is UNKNOWN:
                return client  # the hop that reported it: the nearest known address
            client = node
            if node not in trusted:
                return node
        return client  # every hop trusted: the leftmost one

    def _from_xff(self, peer: str, text: str) -> str:
        entries = [e for e in text.split(",") if e.strip()]
        return self._walk(peer, (parse_xff_entry(e) for e in reversed(entries)))

    def _from_forwarded(self, peer: str, text: str) -> str:
        elements = parse_forwarded(text)

        def nodes():
            for element in reversed(elements):
                node = element.get("for")
                if node is None:
                    if element:
                        yield UNKNOWN  # a hop that did not say whom it forwarded for
                    continue  # an empty element (",,")
                yield parse_forwarded_node(node)

        return self._walk(peer, nodes())


def new_counts() -> Dict[str, int]:
    """The counters of L{ClientIPPolicy.counts}, all zero."""
    return {"forwarded": 0, "malformed": 0, "untrusted": 0, "refused": 0}


class Episode:
    """
    Log a condition once when it starts and once when it ends, never once
    per connection or request: C{bad(detail)} for each occurrence,
    C{good()} when things are right again.
    """

    def __init__(self, what: str, recovered: str) -> None:
        self.what = what
        self.recovered = recovered
        self.count = 0

    def bad(self, detail: str) -> None:
        self.count += 1
        if self.count == 1:
            log.warn("{what} ({detail}); logged once until {recovered}",
                     what=self.what, detail=detail, recovered=self.recovered)

    def good(self) -> None:
        if self.count:
            log.info("{what}: {recovered} after {count} times", what=self.what, recovered=self.recovered,
                     count=self.count)
            self.count = 0


# --- PROXY protocol ---------------------------------------------------------

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The longest v1 header, CRLF included (HAProxy's spec, section 2.1).
V1_MAX = 107
#: The longest v2 header we wait for: the 16 fixed bytes and a length field
#: that HAProxy caps in practice far below 65535.
V2_MAX = 16 + 65535


class InvalidProxyHeader(ValueError):
    """Not a PROXY protocol header, or a broken one."""


def _address(address):
    """A parsed header address, canonical, as a TCP L{IPv4Address} / L{IPv6Address}."""
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        raise InvalidProxyHeader(f"not an IP address: {address.host[:60]!r}") from None
    if not 0 <= address.port <= 65535:
        raise InvalidProxyHeader(f"port out of range: {address.port}")
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return IPv4Address("TCP", str(ip.ipv4_mapped), address.port)
    return (IPv4Address if ip.version == 4 else IPv6Address)("TCP", str(ip), address.port)


def parse_proxy_header(data: bytes):
    """
    Read a PROXY protocol header (v1 or v2) at the start of C{data}.

    Twisted's parsers (L{twisted.protocols.haproxy}) decode a whole header;
    this frames it (how many bytes, whether more are needed) and checks what
    they leave unchecked: v1 field count, address families and ports.

    @return: L{None} when C{data} is the beginning of a header and more bytes
        are needed; otherwise C{(source, destination, length)}: the announced
        addresses (both L{None} for C{LOCAL}, C{UNKNOWN}, or a non-IP
        family: use the connection's own) and the header's length in bytes.
    @raise InvalidProxyHeader: C{data} does not start a valid header.
    """
    n = len(data)
    if data[:12] == V2_SIGNATURE[:min(n, 12)]:
        if n < 16:
            return None
        if data[12] >> 4 != 2 or data[12] & 0x0F not in (0, 1):
            raise InvalidProxyHeader(f"PROXY v2: bad version/command byte {data[12]:#04x}")
        length = 16 + struct.unpack("!H", data[14:16])[0]
        if n < length:
            return None
        family = data[13] >> 4
        if data[12] & 0x0F == 1 and family in (1, 2) and length < (28 if family == 1 else 52):
            raise InvalidProxyHeader("PROXY v2: address block shorter than its family")
        try:
            info = V2Parser.parse(data[:length])
        except (TwistedInvalid, ValueError, KeyError, struct.error) as e:
            raise InvalidProxyHeader(f"PROXY v2: {e.__class__.__name__}") from None
    elif data[:6] == V1_PREFIX[:min(n, 6)]:
        end = data.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if n >= V1_MAX or b"\n" in data or (n >= 1 and data.find(b"\r", 0, n - 1) >= 0):
                raise InvalidProxyHeader("PROXY v1: no CRLF within 107 bytes")
            return None
        line = data[:end]
        fields = line.split(b" ")
        if fields[1:2] != [b"UNKNOWN"] and len(fields) != 6:
            raise InvalidProxyHeader(f"PROXY v1: {len(fields)} fields, not 6")
        if len(fields) == 6 and not (fields[4].isdigit() and fields[5].isdigit()):
            raise InvalidProxyHeader("PROXY v1: ports must be decimal numbers")
        length = end + 2
        if fields[1:2] == [b"UNKNOWN"]:
            return None, None, length  # V1Parser wants more fields after UNKNOWN; the spec does not
        try:
            info = V1Parser.parse(line)
        except (TwistedInvalid, ValueError) as e:
            raise InvalidProxyHeader(f"PROXY v1: {e.__class__.__name__}") from None
        if info.source is not None:
            want = 4 if fields[1] == b"TCP4" else 6
            for address in (info.source, info.destination):
                # V1Parser gives IPv4Address or IPv6Address for a TCP4 or TCP6 line.
                host = cast("Union[IPv4Address, IPv6Address]", address).host
                if _ip_version(host) != want:
                    raise InvalidProxyHeader(f"PROXY v1: {host[:40]!r} is not of family TCP{want}")
    else:
        raise InvalidProxyHeader("not a PROXY protocol header")
    source, destination = info.source, info.destination
    if not isinstance(source, (IPv4Address, IPv6Address)) or not isinstance(destination, (IPv4Address, IPv6Address)):
        return None, None, length  # LOCAL, UNKNOWN, AF_UNIX, AF_UNSPEC
    return _address(source), _address(destination), length


def _ip_version(host: str) -> int:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        raise InvalidProxyHeader(f"not an IP address: {host[:60]!r}") from None


@implementer(IHalfCloseableProtocol)
class _ProxyHeaderProtocol(ProtocolWrapper):
    """
    Reads the PROXY header of one connection, then builds the listener's
    protocol (with the announced client address) and stands as its
    transport: C{getPeer} and C{getHost} are the header's addresses, the
    rest is the real transport's.
    """

    # Connected before any method below runs (see twisted_slb._typing).
    transport: IStreamTransport

    # None until the header is read (ProtocolWrapper's is always set).
    wrappedProtocol: Optional[IProtocol] = None  # type: ignore[assignment]
    source = None
    destination = None
    timer = None
    refused = False

    def __init__(self, factory: ProxyProtocolFactory) -> None:
        self.factory = factory
        self.buffer = b""

    def logPrefix(self) -> str:
        # ProtocolWrapper's names the wrapped protocol, which the port asks
        # for before there is one.
        return "PROXY protocol"

    def makeConnection(self, transport) -> None:
        # Not ProtocolWrapper's: the wrapped protocol does not exist yet.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        factory = self.factory
        if not factory.policy.trusted.trusts(self.transport.getPeer()):
            self.refuse("not a trusted address")
            return
        if factory.timeout:
            self.timer = factory.reactor.callLater(factory.timeout, self.timed_out)

    def refuse(self, why: str) -> None:
        self.refused = True
        self.buffer = b""
        self.factory.refused(self.transport.getPeer(), why)
        self.transport.loseConnection()

    def timed_out(self) -> None:
        self.timer = None
        if self.wrappedProtocol is None and not self.refused:
            self.refuse(f"no complete PROXY header within {self.factory.timeout:g} s")

    def dataReceived(self, data: bytes) -> None:
        wrapped = self.wrappedProtocol
        if wrapped is not None:
            wrapped.dataReceived(data)
            return
        if self.refused:
            return
        buffer = self.buffer + data if self.buffer else data
        try:
            parsed = parse_proxy_header(buffer)
        except InvalidProxyHeader as e:
            self.refuse(str(e))
            return
        if parsed is None:
            self.buffer = buffer
            return
        self.buffer = b""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.source, self.destination, length = parsed
        factory = self.factory
        factory.accepted()
        wrapped = factory.wrappedFactory.buildProtocol(self.getPeer())
        if wrapped is None:
            self.refused = True
            self.transport.loseConnection()  # over a connection limit
            return
        self.wrappedProtocol = wrapped
        wrapped.makeConnection(self)
        rest = buffer[length:]
        if rest and self.wrappedProtocol is not None:
            wrapped.dataReceived(rest)

    def getPeer(self):
        return self.source or self.transport.getPeer()

    def getHost(self):
        return self.destination or self.transport.getHost()

    def readConnectionLost(self) -> None:
        wrapped = self.wrappedProtocol
        if wrapped is not None and IHalfCloseableProtocol.providedBy(wrapped):
            wrapped.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        wrapped = self.wrappedProtocol
        if wrapped is not None and IHalfCloseableProtocol.providedBy(wrapped):
            wrapped.writeConnectionLost()
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        wrapped, self.wrappedProtocol = self.wrappedProtocol, None
        if wrapped is not None:
            wrapped.connectionLost(reason)


class ProxyProtocolFactory(Factory):
    """
    Wraps a listener's factory (a L{twisted_slb.tcp.TCPBalancerFactory}, an
    L{twisted_slb.web.front.HTTPFrontFactory}, or a TLS factory around one)
    so that each connection starts with a PROXY protocol header, v1 or v2,
    from a trusted peer.  The wrapped factory's C{buildProtocol} is called
    once the header is read, with the client address it announced (the
    connection's own for C{LOCAL}); a connection from an untrusted peer, with
    anything but a valid header, or with no whole header within C{timeout}
    seconds, is closed and counted, and logged once per episode.

    Twisted's own C{HAProxyWrappingFactory} is not used: it connects the
    wrapped protocol before the header has arrived (our protocols choose a
    backend and count per-IP limits at that moment), closes a connection
    whose first read is shorter than 16 bytes (v2) or 8 (v1), checks no
    trusted peers, and lets a malformed v1 port escape as C{ValueError}.

    Lean transports: the wrapper is C{lean} when the wrapped factory is, and
    works on a L{twisted_slb._io.lean.LeanServer} as on Twisted's transports.
    """

    noisy = False

    def __init__(self, wrapped_factory, policy: ClientIPPolicy, reactor=None, timeout: float = 10.0) -> None:
        reactor = maybe_global_reactor(reactor)
        self.wrappedFactory = wrapped_factory
        self.policy = policy
        self.reactor = reactor
        self.timeout = timeout
        self.episode = Episode(
            f"listener {policy.listener_name}: closing connections without a valid PROXY header from a trusted "
            "address", "a valid one arrived")

    @property
    def lean(self) -> bool:
        return getattr(self.wrappedFactory, "lean", False)

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def buildProtocol(self, addr) -> _ProxyHeaderProtocol:
        return _ProxyHeaderProtocol(self)

    def refused(self, peer, why: str) -> None:
        self.policy.counts["refused"] += 1
        self.episode.bad(f"first: {getattr(peer, 'host', peer)}: {why}")

    def accepted(self) -> None:
        self.episode.good()
