"""
Hostile and broken traffic, as properties over generated input (hypothesis):

 - any bytes sent to an HTTP listener get a well-formed answer or a clean
   close, never an exception, never a 500, and the listener serves the next
   client;
 - any C{Cookie} header, with insert or rewrite persistence, is routed to a
   backend that is up and in the group (never to one that is down), and is
   never answered with a 500;

and backends that reset connections, end to end.
"""

from __future__ import annotations

from typing import List

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.persistence.cookies import InsertCookie, RewriteCookie
from twisted_slb.scheduling import RoundRobin
from twisted_slb.web.front import HTTPFrontFactory
from twisted_slb.web.proxy import BalancedProxyResource
from twisted_slb.web.upstream import UpstreamPool

CLIENT = IPv4Address("TCP", "192.0.2.9", 40000)


def _group() -> BackendGroup:
    group = BackendGroup(
        "g",
        [Backend("a", "10.0.0.1", 81), Backend("b", "10.0.0.2", 82), Backend("c", "10.0.0.3", 83)],
        scheduler=RoundRobin(),
    )
    group.get("b").up = False  # down: nobody may be sent there
    return group


class Stack:
    """A listener (front + persistence + proxy) over a memory reactor."""

    def __init__(self, policy: str) -> None:
        self.reactor = MemoryReactorClock()
        self.group = _group()
        proxy = BalancedProxyResource(
            self.group, reactor=self.reactor, pool=UpstreamPool(self.reactor), access_log=False
        )
        if policy == "insert":
            resource = InsertCookie(proxy, reactor=self.reactor)
        elif policy == "rewrite":
            resource = RewriteCookie(proxy, name=b"JSESSIONID")
        else:
            resource = proxy
        self.factory = HTTPFrontFactory(resource, reactor=self.reactor, max_header_bytes=16384)

    def send(self, data: bytes) -> StringTransport:
        proto = self.factory.buildProtocol(CLIENT)
        transport = StringTransport(peerAddress=CLIENT)
        proto.makeConnection(transport)
        proto.dataReceived(data)
        return transport

    def targets(self) -> List[str]:
        return [host for host, *_ in self.reactor.tcpClients]


# Request bytes: mostly request-shaped, with garbage spliced in.
_token = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"G T", b"", b"get", b"\x00", b"OPTIONS"])
_target = st.sampled_from([b"/", b"/a?b=1", b"*", b"http://h/x", b"//", b"/\xff", b"", b"/ /", b"h:1"])
_version = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1", b"HTTP/1"])
_header = st.one_of(
    st.sampled_from([
        b"Host: x", b"Host:", b"Host : x", b" folded", b"Content-Length: 3", b"Content-Length: -1",
        b"Content-Length: 99999999999999999999", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip",
        b"Connection: close", b"Connection: upgrade", b"Upgrade: websocket", b"Expect: 100-continue",
        b"Expect: x", b"Cookie: SERVERID=zz", b"X: \x7f", b"\x00: y",
    ]),
    st.binary(max_size=40).filter(lambda b: b"\r\n" not in b),
)
_eol = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\n"])


@st.composite
def _requests(draw) -> bytes:
    line = draw(_token) + b" " + draw(_target) + b" " + draw(_version)
    headers = draw(st.lists(_header, max_size=6))
    eol = draw(_eol)
    body = draw(st.binary(max_size=30))
    data = eol.join([line] + headers) + eol + eol + body
    if draw(st.booleans()):
        data += b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"  # a pipelined request after it
    return data


class FrontFuzzTests(SynchronousTestCase):
    """Whatever a client sends, the listener answers cleanly and keeps serving."""

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.one_of(_requests(), st.binary(max_size=300)))
    def test_anyBytes(self, data):
        stack = Stack("insert")
        transport = stack.send(data)
        out = transport.value()
        # A status line of ours, or nothing yet (waiting for more, or for the
        # backend): never a 500, never a traceback.  (501 and 505 are
        # refusals: CONNECT or Upgrade, and HTTP/2.0 in a request line.)
        self.assertTrue(out == b"" or out.startswith(b"HTTP/1.1 "), out[:80])
        statuses = [line[9:12] for line in out.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
        self.assertTrue(set(statuses) <= {b"100", b"400", b"408", b"414", b"417", b"431", b"501", b"505"},
                        out[:200])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertNotIn("10.0.0.2", stack.targets())
        # The listener serves the next client normally.
        transport = stack.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value(), b"")  # waiting for the backend it connected to
        self.assertIn(stack.targets()[-1], ("10.0.0.1", "10.0.0.3"))


_ids = st.sampled_from(
    [Backend(n, "h", 1).id.encode("ascii") for n in "abcz"] + [b"a", b"", b"\"\"", b"x" * 5000]
)


@st.composite
def _cookie_values(draw) -> bytes:
    value = draw(st.one_of(_ids, st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b)))
    if draw(st.booleans()):
        value += b"." + draw(st.sampled_from([b"s4x2kq", b"", b"!!", b"zzzzzzzzzzzz"]))
    if draw(st.booleans()):
        value = b'"' + value + b'"'
    return value


@st.composite
def _cookie_headers(draw) -> bytes:
    pairs = []
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from([b"SERVERID", b"JSESSIONID", b"serverid", b"other", b""]))
        value = draw(_cookie_values())
        if name == b"JSESSIONID" and draw(st.booleans()):
            value = draw(_ids) + b"~" + value
        pairs.append(name + b"=" + value)
    return draw(st.sampled_from([b"; ", b";", b", "])).join(pairs)


class CookieFuzzTests(SynchronousTestCase):
    """Whatever the Cookie header, the client goes to a backend that is up and in the group."""

    def check(self, policy: str, cookie: bytes) -> None:
        stack = Stack(policy)
        transport = stack.send(b"GET / HTTP/1.1\r\nHost: x\r\nCookie: " + cookie + b"\r\n\r\n")
        out = transport.value()
        self.assertFalse(out.startswith(b"HTTP/1.1 5"), out[:200])
        self.assertEqual(self.flushLoggedErrors(), [])
        if out:
            # Refused before routing: a control byte in the header (400), or
            # a header over max_header_bytes (431).
            self.assertTrue(out.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ")), out[:200])
            self.assertEqual(stack.targets(), [])
        else:
            self.assertEqual(len(stack.targets()), 1)
            self.assertIn(stack.targets()[0], ("10.0.0.1", "10.0.0.3"))

    @settings(max_examples=300, deadline=None)
    @given(cookie=_cookie_headers())
    def test_insertCookie(self, cookie):
        self.check("insert", cookie)

    @settings(max_examples=300, deadline=None)
    @given(cookie=_cookie_headers())
    def test_rewriteCookie(self, cookie):
        self.check("rewrite", cookie)

    def test_pinToADownBackendIsRepinned(self):
        stack = Stack("insert")
        down = stack.group.get("b").id
        stack.send(b"GET / HTTP/1.1\r\nHost: x\r\nCookie: SERVERID=" + down.encode() + b"\r\n\r\n")
        self.assertEqual(stack.targets(), ["10.0.0.1"])


class Hello(Resource):
    isLeaf = True

    def render(self, request):
        return b"hello"


class ResetBeforeAnswer(protocol.Protocol):
    """Resets the connection (RST) as soon as a request arrives."""

    def dataReceived(self, data):
        self.factory.resets += 1
        self.transport.abortConnection()


class BackendResetTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        resetting = protocol.ServerFactory.forProtocol(ResetBeforeAnswer)
        resetting.resets = 0
        self.resetting = resetting
        bad = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(resetting)
        self.addCleanup(bad.stopListening)
        good = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(Hello()))
        self.addCleanup(good.stopListening)
        group = BackendGroup(
            "g", [Backend("bad", "127.0.0.1", bad.getHost().port), Backend("good", "127.0.0.1", good.getHost().port)],
            scheduler=RoundRobin(),
        )
        pool = UpstreamPool(reactor)
        self.addCleanup(pool.close)
        factory = HTTPFrontFactory(BalancedProxyResource(group, pool=pool, access_log=False))
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}/".encode()
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    @defer.inlineCallbacks
    def test_resetGetIsRetriedElsewhere(self):
        response = yield self.agent.request(b"GET", self.url)
        self.assertEqual((response.code, (yield readBody(response))), (200, b"hello"))
        self.assertEqual(self.resetting.resets, 1)  # round robin tried "bad" first

    @defer.inlineCallbacks
    def test_resetPostIs502(self):
        from twisted.web.client import FileBodyProducer
        from io import BytesIO

        response = yield self.agent.request(b"POST", self.url, None, FileBodyProducer(BytesIO(b"data")))
        body = yield readBody(response)
        self.assertEqual(response.code, 502, body)
        self.assertEqual(self.resetting.resets, 1)
