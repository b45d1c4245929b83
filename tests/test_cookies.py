"""
Tests for L{twisted_slb.persistence.cookies} and
L{twisted_slb.persistence.resource}.

Requests go through a real L{twisted.web.server.Site} and
L{twisted.web.http.HTTPChannel} over a L{StringTransport}; behind the
persistence wrapper sits L{FakeProxy}, which does what
L{twisted_slb.web.proxy.BalancedProxyResource} promises: route on a real
L{BackendGroup}, put the backend's response headers in the request, call
C{session.policy.remember}, then write the body.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import attr
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.config import PersistenceConfig, ServerConfig
from twisted_slb.persistence.cookies import MAX_SKEW, FixedCookieValues, InsertCookie, RewriteCookie
from twisted_slb.persistence.interfaces import (
    EXPIRED, HIT, NEW, REPIN, STRICT, IPersistencePolicy, Session, session_for,
)
from twisted_slb.persistence.build import wrap_with_persistence
from twisted_slb.persistence.resource import PersistenceResource
from twisted_slb.scheduling import RoundRobin

NOW = 1_700_000_000


@attr.s(auto_attribs=True)
class Response:
    """A parsed HTTP response."""

    status: int
    headers: List[Tuple[bytes, bytes]]
    body: bytes

    def all(self, name: bytes) -> List[bytes]:
        return [v for k, v in self.headers if k == name.lower()]

    def one(self, name: bytes) -> Optional[bytes]:
        values = self.all(name)
        return values[0] if values else None


def parse_response(data: bytes) -> Response:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    return Response(status, headers, body)


@implementer(ISSLTransport)
class SecureStringTransport(StringTransport):
    """A StringTransport that says it is TLS, so that C{request.isSecure()}."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


def serve(resource, request: bytes, secure: bool = False) -> Response:
    """
    Send one raw request to C{resource} through a real L{Site} and
    L{HTTPChannel} over a L{StringTransport}; return the parsed response.
    """
    site = Site(resource, reactor=Clock())
    peer = IPv4Address("TCP", "10.0.0.7", 40000)
    channel = site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "10.0.0.1", 80))
    if secure:
        transport = SecureStringTransport(peerAddress=peer, hostAddress=transport.getHost())
    channel.makeConnection(transport)
    channel.dataReceived(request)
    channel.connectionLost(None)
    return parse_response(transport.value())


def get(path: bytes = b"/", cookies: Sequence[bytes] = (), host: bytes = b"www.example.com", method=b"GET") -> bytes:
    """A raw HTTP/1.1 request with one C{Cookie} header per item of C{cookies}."""
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: " + host, b"Connection: close"]
    lines += [b"Cookie: " + c for c in cookies]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@attr.s(auto_attribs=True)
class Seen:
    """What the fake backend saw of one request."""

    backend: Backend
    cookies: Optional[List[bytes]]
    outcome: str
    received_cookies: dict


class FakeProxy(Resource):
    """
    Stands in for BalancedProxyResource: routes on a real group, sets the
    "backend's" status and headers, calls remember, writes a body.
    """

    isLeaf = True

    def __init__(self, group: BackendGroup, status: int = 200, headers=()) -> None:
        Resource.__init__(self)
        self.group = group
        self.status = status
        self.headers = list(headers)
        self.seen: List[Seen] = []

    def render(self, request):
        session = session_for(request)
        backend = self.group.route(session, ())
        self.seen.append(
            Seen(
                backend,
                request.requestHeaders.getRawHeaders(b"cookie"),
                session.outcome,
                dict(getattr(request, "received_cookies", {})),
            )
        )
        request.setResponseCode(self.status)
        for name, value in self.headers:
            request.responseHeaders.addRawHeader(name, value)
        if session.policy is not None:
            session.policy.remember(session, backend)
        return b"served by " + backend.name.encode()


def make_group() -> BackendGroup:
    return BackendGroup(
        "web",
        [Backend("a", "10.0.0.11", 8080), Backend("b", "10.0.0.12", 8080), Backend("c", "10.0.0.13", 8080)],
        scheduler=RoundRobin(),
    )


class Fixture:
    """A group, a fake proxy and an InsertCookie in front of it."""

    def __init__(self, status: int = 200, headers=(), **options) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.group = make_group()
        self.proxy = FakeProxy(self.group, status, headers)
        self.policy = InsertCookie(self.proxy, reactor=self.clock, **options)

    def request(self, *args, secure: bool = False, **kwargs) -> Response:
        return serve(self.policy, get(*args, **kwargs), secure=secure)

    def cookie_for(self, name: str, stamp: Optional[int] = NOW) -> bytes:
        key = self.group.get(name).id
        if stamp is None:
            return b"SERVERID=" + key.encode()
        return b"SERVERID=" + key.encode() + b"." + _base36(stamp).encode()


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out or "0"


def set_cookie_named(response: Response, name: bytes) -> List[bytes]:
    return [v for v in response.all(b"set-cookie") if v.split(b"=", 1)[0] == name]


def cookie_pair(set_cookie: bytes) -> bytes:
    """The C{name=value} part of a C{Set-Cookie} header value."""
    return set_cookie.split(b";", 1)[0]


def attributes(set_cookie: bytes) -> List[bytes]:
    return [a.strip() for a in set_cookie.split(b";")[1:]]


# --- PersistenceResource -------------------------------------------------


@implementer(IPersistencePolicy)
class RecordingPolicy:
    name = "recording"

    def __init__(self, key: Optional[str] = None) -> None:
        self.key = key
        self.remembered: List[Tuple[str, str]] = []

    def find(self, session):
        return self.key

    def remember(self, session, backend):
        self.remembered.append((session.outcome, backend.name))


class PersistenceResourceTests(SynchronousTestCase):
    def test_findAnswerReachesTheProxy(self) -> None:
        """The policy's C{find} answer is the session's C{pinned_key}, so the proxy routes on it."""
        group = make_group()
        proxy = FakeProxy(group)
        serve(PersistenceResource(proxy, RecordingPolicy(group.get("c").id)), get())
        self.assertEqual((proxy.seen[0].backend.name, proxy.seen[0].outcome), ("c", HIT))

    def test_policyIsRememberedAfterRouting(self) -> None:
        """The proxy calls back the wrapper's policy with the chosen backend."""
        group = make_group()
        policy = RecordingPolicy()
        serve(PersistenceResource(FakeProxy(group), policy), get())
        self.assertEqual(policy.remembered, [(NEW, "a")])

    def test_subclassIsItsOwnPolicy(self) -> None:
        """A subclass that implements IPersistencePolicy needs no policy argument."""

        @implementer(IPersistencePolicy)
        class Sticky(PersistenceResource):
            name = "sticky"

            def find(self, session):
                return "b"

            def remember(self, session, backend):
                pass

        group = make_group()
        proxy = FakeProxy(group)
        wrapper = Sticky(proxy)
        serve(wrapper, get())
        self.assertIs(wrapper.policy, wrapper)
        self.assertEqual(proxy.seen[0].backend.name, "b")

    def test_missingPolicyIsTypeError(self) -> None:
        """A plain PersistenceResource without a policy is a programming error, said at once."""
        self.assertRaises(TypeError, PersistenceResource, Resource())

    def test_failingFindBalancesUnpinned(self) -> None:
        """A policy whose find raises is logged; the client is balanced, not given a 500."""

        class Broken(RecordingPolicy):
            def find(self, session):
                raise RuntimeError("bug")

        group = make_group()
        proxy = FakeProxy(group)
        response = serve(PersistenceResource(proxy, Broken()), get())
        self.assertEqual(response.status, 200)
        self.assertEqual(proxy.seen[0].outcome, NEW)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_wrappedTreeIsTraversed(self) -> None:
        """A wrapped resource that is not a leaf is traversed like Site would."""
        group = make_group()
        root = Resource()
        proxy = FakeProxy(group)
        root.putChild(b"app", proxy)
        response = serve(PersistenceResource(root, RecordingPolicy()), get(b"/app/x"))
        self.assertEqual(response.body, b"served by a")


class WrapWithPersistenceTests(SynchronousTestCase):
    def test_noneReturnsResource(self) -> None:
        """No persistence configured: the resource is returned unwrapped."""
        proxy = Resource()
        self.assertIs(wrap_with_persistence(proxy, None), proxy)

    def test_insertCookie(self) -> None:
        """C{insert_cookie} builds an InsertCookie with the configured options; no name means SERVERID."""
        clock = Clock()
        wrapper = wrap_with_persistence(
            Resource(),
            PersistenceConfig(type="insert_cookie", timeout=600, samesite="strict", refresh=False),
            reactor=clock,
        )
        self.assertIsInstance(wrapper, InsertCookie)
        self.assertEqual(
            (wrapper.cookie_name, wrapper.timeout, wrapper.samesite, wrapper.refresh, wrapper.clock),
            (b"SERVERID", 600, "strict", False, clock),
        )

    def test_rewriteCookie(self) -> None:
        """A rewrite_cookie configuration builds a RewriteCookie on the configured cookie name."""
        wrapper = wrap_with_persistence(Resource(), PersistenceConfig(type="rewrite_cookie", cookie="PHPSESSID"))
        self.assertIsInstance(wrapper, RewriteCookie)
        self.assertEqual(wrapper.cookie_name, b"PHPSESSID")

    def test_unknownTypeIsValueError(self) -> None:
        """An unknown persistence type is a ValueError."""
        self.assertRaises(ValueError, wrap_with_persistence, Resource(), PersistenceConfig(type="bogus"))


# --- InsertCookie --------------------------------------------------------


class InsertCookieInterfaceTests(SynchronousTestCase):
    def test_providesPolicy(self) -> None:
        """InsertCookie provides IPersistencePolicy."""
        verifyObject(IPersistencePolicy, InsertCookie(Resource(), reactor=Clock()))

    def test_fromConfig(self) -> None:
        """Every option of the config's persistence table reaches the policy."""
        clock = Clock()
        policy = InsertCookie.from_config(
            Resource(),
            PersistenceConfig(
                type="insert_cookie",
                timeout=86400,
                cookie="LB",
                secure="always",
                httponly=False,
                samesite="none",
                domain="example.com",
                path="/app",
                refresh=False,
            ),
            reactor=clock,
        )
        self.assertEqual(
            (policy.cookie_name, policy.timeout, policy.secure, policy.httponly, policy.samesite,
             policy.domain, policy.path, policy.refresh, policy.clock),
            (b"LB", 86400, "always", False, "none", "example.com", "/app", False, clock),
        )

    def test_strNameAccepted(self) -> None:
        """A cookie name given as str is stored as bytes."""
        self.assertEqual(InsertCookie(Resource(), name="LB", reactor=Clock()).cookie_name, b"LB")

    def test_timeoutOutOfRange(self) -> None:
        """Timeouts of 0, over 86400, fractional or boolean are a ValueError."""
        for timeout in (0, 86401, 1.5, True):
            self.assertRaises(ValueError, InsertCookie, Resource(), timeout=timeout, reactor=Clock())

    def test_badOptions(self) -> None:
        """Bad names, secure and samesite values, and attribute injection are refused."""
        for options in (
            {"name": b"SERVER ID"},
            {"name": ""},
            {"name": "SÉRVER"},
            {"secure": "yes"},
            {"samesite": "Lax"},
            {"domain": "a.com; Secure"},
            {"path": "/a b"},
        ):
            self.assertRaises(ValueError, InsertCookie, Resource(), reactor=Clock(), **options)


class InsertCookieTests(SynchronousTestCase):
    def test_newClientGetsCookieNamingItsBackend(self) -> None:
        """The first response carries SERVERID=<backend id>.<issue time>."""
        f = Fixture()
        response = f.request()
        self.assertEqual([cookie_pair(v) for v in set_cookie_named(response, b"SERVERID")], [f.cookie_for("a")])
        self.assertEqual(f.proxy.seen[0].outcome, NEW)

    def test_cookieNeverRevealsAddress(self) -> None:
        """The inserted cookie's value carries no part of the backend's address or port."""
        f = Fixture()
        value = set_cookie_named(f.request(), b"SERVERID")[0]
        self.assertNotIn(b"10.0.0", value)
        self.assertNotIn(b"8080", value)

    def test_cookieValueIsStableAcrossProcesses(self) -> None:
        """Two balancers built from the same config give the same cookie at the same time."""
        one, two = Fixture(), Fixture()
        self.assertEqual(set_cookie_named(one.request(), b"SERVERID"), set_cookie_named(two.request(), b"SERVERID"))

    def test_clientWithCookieStaysOnItsBackend(self) -> None:
        """The FAQ's curl loop: 30 requests with the cookie all reach one backend."""
        f = Fixture()
        jar = cookie_pair(set_cookie_named(f.request(), b"SERVERID")[0])
        bodies = {f.request(cookies=[jar]).body for _ in range(30)}
        self.assertEqual(bodies, {b"served by a"})

    def test_clientWithoutCookieIsBalanced(self) -> None:
        """Without the cookie (curl without -b) requests are spread: persistence needs the cookie."""
        f = Fixture()
        bodies = {f.request().body for _ in range(3)}
        self.assertEqual(len(bodies), 3)

    def test_freshCookieGetsNoSetCookie(self) -> None:
        """A client with a fresh, valid cookie is a hit and gets no new Set-Cookie."""
        f = Fixture()
        response = f.request(cookies=[f.cookie_for("b")])
        self.assertEqual(response.all(b"set-cookie"), [])
        self.assertEqual(f.proxy.seen[0].outcome, HIT)

    def _new_client_with_status(self, status: int) -> Response:
        f = Fixture(status=status, headers=[(b"Location", b"/elsewhere")] if status == 302 else [])
        response = f.request()
        self.assertEqual(response.status, status)
        return response

    def test_cookieInsertedInto404(self) -> None:
        """Unlike the FAQ's balancer, a 4xx response carries the cookie."""
        self.assertEqual(len(set_cookie_named(self._new_client_with_status(404), b"SERVERID")), 1)

    def test_cookieInsertedInto500(self) -> None:
        """A new client gets its cookie even on a 500 answer."""
        self.assertEqual(len(set_cookie_named(self._new_client_with_status(500), b"SERVERID")), 1)

    def test_cookieInsertedInto302(self) -> None:
        """A new client gets its cookie on a 302 redirect."""
        self.assertEqual(len(set_cookie_named(self._new_client_with_status(302), b"SERVERID")), 1)

    def test_redirectNeverRepinsClientWithValidCookie(self) -> None:
        """A 302 to a client holding a valid cookie changes nothing: no Set-Cookie, same backend."""
        f = Fixture(status=302, headers=[(b"Location", b"/login")])
        responses = [f.request(cookies=[f.cookie_for("c")]) for _ in range(5)]
        self.assertEqual([r.all(b"set-cookie") for r in responses], [[]] * 5)
        self.assertEqual({s.backend.name for s in f.proxy.seen}, {"c"})

    def test_errorStatusNeverRepinsClientWithValidCookie(self) -> None:
        """An error answer from the pinned backend leaves the client's pin alone: same backend, no Set-Cookie."""
        f = Fixture(status=503)
        response = f.request(cookies=[f.cookie_for("b")])
        self.assertEqual((response.all(b"set-cookie"), f.proxy.seen[0].backend.name), ([], "b"))

    def test_cookieNamingDownBackendIsRepinned(self) -> None:
        """The pinned backend is down: another serves, and the client gets its cookie."""
        f = Fixture()
        f.group.get("a").up = False
        response = f.request(cookies=[f.cookie_for("a")])
        seen = f.proxy.seen[0]
        self.assertEqual(seen.outcome, REPIN)
        self.assertNotEqual(seen.backend.name, "a")
        self.assertEqual(
            [cookie_pair(v) for v in set_cookie_named(response, b"SERVERID")], [f.cookie_for(seen.backend.name)]
        )

    def test_drainedBackendKeepsItsClients(self) -> None:
        """Weight 0 takes no new clients but keeps pinned ones."""
        f = Fixture()
        f.group.get("c").weight = 0
        f.request(cookies=[f.cookie_for("c")])
        self.assertEqual((f.proxy.seen[0].backend.name, f.proxy.seen[0].outcome), ("c", HIT))

    def test_unknownBackendIdIsRepinned(self) -> None:
        """A cookie naming an unknown backend id is re-pinned: the request is served and a new cookie set."""
        f = Fixture()
        response = f.request(cookies=[b"SERVERID=0123456789abcdef." + _base36(NOW).encode()])
        self.assertEqual(f.proxy.seen[0].outcome, REPIN)
        self.assertEqual(response.status, 200)
        self.assertEqual(len(set_cookie_named(response, b"SERVERID")), 1)

    def _ignored(self, cookie: bytes) -> None:
        """C{cookie} is ignored: 200, balanced as new, re-pinned, not forwarded."""
        f = Fixture()
        response = f.request(cookies=[cookie])
        self.assertEqual(response.status, 200)
        self.assertEqual(f.proxy.seen[0].outcome, NEW)
        self.assertEqual(len(set_cookie_named(response, b"SERVERID")), 1)
        self.assertIsNone(f.proxy.seen[0].cookies)

    def test_garbageValueIgnored(self) -> None:
        """A cookie value with markup in it is ignored: the client is balanced as new."""
        self._ignored(b"SERVERID=<script>alert(1)</script>")

    def test_backendNameInsteadOfIdIgnored(self) -> None:
        """Only ids are accepted: a cookie cannot name a backend by its configured name."""
        self._ignored(b"SERVERID=a")

    def test_hugeValueIgnored(self) -> None:
        """A 10,000-byte cookie value is ignored: the client is balanced as new."""
        self._ignored(b"SERVERID=" + b"f" * 10000)

    def test_nonAsciiValueIgnored(self) -> None:
        """A cookie value with non-ASCII bytes is ignored: the client is balanced as new."""
        self._ignored("SERVERID=caf\u00e9\u2603".encode("utf-8"))

    def test_emptyValueIgnored(self) -> None:
        """An empty cookie value is ignored: the client is balanced as new."""
        self._ignored(b"SERVERID=")

    def test_badStampIgnored(self) -> None:
        """A cookie whose time stamp is not base 36 is ignored: the client is balanced as new."""
        f = Fixture()
        self._ignored(f.cookie_for("a", stamp=None) + b".NOT-BASE36")

    def test_quotedValueAccepted(self) -> None:
        """A cookie value in double quotes is read as the same pin (a hit)."""
        f = Fixture()
        pair = f.cookie_for("b")
        name, value = pair.split(b"=", 1)
        f.request(cookies=[name + b'="' + value + b'"'])
        self.assertEqual((f.proxy.seen[0].backend.name, f.proxy.seen[0].outcome), ("b", HIT))

    def test_cookieStrippedBeforeBackend(self) -> None:
        """The backend sees the client's other cookies, never ours."""
        f = Fixture()
        f.request(cookies=[b"lang=en; " + f.cookie_for("b") + b"; theme=dark"])
        self.assertEqual(f.proxy.seen[0].cookies, [b"lang=en; theme=dark"])

    def test_cookieStrippedFromReceivedCookies(self) -> None:
        """The balancer's cookie is removed from the cookies the backend receives; the others stay."""
        f = Fixture()
        f.request(cookies=[b"lang=en; " + f.cookie_for("b")])
        self.assertEqual(f.proxy.seen[0].received_cookies, {b"lang": b"en"})

    def test_headerWithOnlyOurCookieRemoved(self) -> None:
        """A Cookie header holding only the balancer's cookie is dropped; other Cookie headers are forwarded."""
        f = Fixture()
        f.request(cookies=[f.cookie_for("b"), b"lang=en"])
        self.assertEqual(f.proxy.seen[0].cookies, [b"lang=en"])

    def test_headersWithoutOurCookieUntouched(self) -> None:
        """A Cookie header that does not carry ours is forwarded byte for byte."""
        f = Fixture()
        f.request(cookies=[b"a=1;b=2 ;  c", b"x=1; " + f.cookie_for("a")])
        self.assertEqual(f.proxy.seen[0].cookies, [b"a=1;b=2 ;  c", b"x=1"])

    def test_cookieNamesAreCaseSensitive(self) -> None:
        """serverid is not SERVERID: it is the backend's business and is forwarded."""
        f = Fixture()
        f.request(cookies=[b"serverid=" + f.group.get("c").id.encode()])
        self.assertEqual(f.proxy.seen[0].outcome, NEW)
        self.assertEqual(f.proxy.seen[0].cookies, [b"serverid=" + f.group.get("c").id.encode()])

    def test_firstValidOfSeveralCookiesWins(self) -> None:
        """Several SERVERID cookies (several headers, or repeated): the first valid one decides."""
        f = Fixture()
        f.request(cookies=[b"SERVERID=junk", f.cookie_for("c") + b"; " + f.cookie_for("b")])
        self.assertEqual(f.proxy.seen[0].backend.name, "c")
        self.assertIsNone(f.proxy.seen[0].cookies)

    def test_backendSetCookieKept(self) -> None:
        """Our cookie is added next to the backend's own Set-Cookie headers, never instead."""
        f = Fixture(headers=[(b"Set-Cookie", b"sid=1; Path=/"), (b"Set-Cookie", b"lang=en")])
        response = f.request()
        names = [cookie_pair(v).split(b"=")[0] for v in response.all(b"set-cookie")]
        self.assertEqual(names, [b"sid", b"lang", b"SERVERID"])
        self.assertEqual(response.all(b"set-cookie")[:2], [b"sid=1; Path=/", b"lang=en"])

    def test_backendOwnServeridRemoved(self) -> None:
        """A backend setting a cookie of our name would overwrite the pin: it is dropped."""
        f = Fixture(headers=[(b"Set-Cookie", b"SERVERID=mine; Path=/")])
        response = f.request(cookies=[f.cookie_for("a")])
        self.assertEqual(response.all(b"set-cookie"), [])

    def test_attributesByDefault(self) -> None:
        """Max-Age, Expires, Path=/, HttpOnly and SameSite=Lax; no Secure over HTTP, no Domain."""
        f = Fixture()
        value = set_cookie_named(f.request(), b"SERVERID")[0]
        self.assertEqual(
            attributes(value),
            [b"Max-Age=3600", b"Expires=" + datetimeToString(NOW + 3600), b"Path=/", b"HttpOnly", b"SameSite=Lax"],
        )

    def test_maxAgeIsTimeout(self) -> None:
        """The cookie's Max-Age is the timeout, and Expires the same moment as a date."""
        f = Fixture(timeout=86400)
        value = set_cookie_named(f.request(), b"SERVERID")[0]
        self.assertIn(b"Max-Age=86400", attributes(value))
        self.assertIn(b"Expires=" + datetimeToString(NOW + 86400), attributes(value))

    def test_secureAutoOnHttps(self) -> None:
        """secure = "auto" marks the cookie Secure on HTTPS."""
        f = Fixture()
        self.assertIn(b"Secure", attributes(set_cookie_named(f.request(secure=True), b"SERVERID")[0]))

    def test_secureAutoNotOnHttp(self) -> None:
        """secure = "auto" leaves Secure out on plain HTTP."""
        f = Fixture()
        self.assertNotIn(b"Secure", attributes(set_cookie_named(f.request(), b"SERVERID")[0]))

    def test_secureAlways(self) -> None:
        """secure = "always" marks the cookie Secure even on plain HTTP."""
        f = Fixture(secure="always")
        self.assertIn(b"Secure", attributes(set_cookie_named(f.request(), b"SERVERID")[0]))

    def test_secureNever(self) -> None:
        """secure = "never" leaves Secure out even on HTTPS."""
        f = Fixture(secure="never")
        self.assertNotIn(b"Secure", attributes(set_cookie_named(f.request(secure=True), b"SERVERID")[0]))

    def test_sameSiteStrict(self) -> None:
        """samesite = "strict" sets SameSite=Strict."""
        f = Fixture(samesite="strict")
        self.assertIn(b"SameSite=Strict", attributes(set_cookie_named(f.request(), b"SERVERID")[0]))

    def test_sameSiteEmptyOmitted(self) -> None:
        """An empty samesite leaves the SameSite attribute out."""
        f = Fixture(samesite="")
        value = set_cookie_named(f.request(), b"SERVERID")[0]
        self.assertFalse([a for a in attributes(value) if a.startswith(b"SameSite")])

    def test_sameSiteNoneWithSecure(self) -> None:
        """samesite = "none" sets SameSite=None (on a Secure cookie)."""
        f = Fixture(samesite="none")
        self.assertIn(b"SameSite=None", attributes(set_cookie_named(f.request(secure=True), b"SERVERID")[0]))

    def test_sameSiteNoneLeftOutWithoutSecure(self) -> None:
        """Browsers reject SameSite=None without Secure; leaving it out keeps the pin working."""
        f = Fixture(samesite="none")
        value = set_cookie_named(f.request(), b"SERVERID")[0]
        self.assertFalse([a for a in attributes(value) if a.startswith(b"SameSite")])

    def test_httpOnlyOff(self) -> None:
        """httponly = false leaves HttpOnly out."""
        f = Fixture(httponly=False)
        self.assertNotIn(b"HttpOnly", attributes(set_cookie_named(f.request(), b"SERVERID")[0]))

    def test_domainAndPath(self) -> None:
        """The configured domain and path become the cookie's Domain and Path."""
        f = Fixture(domain="example.com", path="/shop")
        value = attributes(set_cookie_named(f.request(), b"SERVERID")[0])
        self.assertIn(b"Domain=example.com", value)
        self.assertIn(b"Path=/shop", value)

    def test_otherName(self) -> None:
        """A cookie of another name pins by that name, is stripped before the backend, and is the one set."""
        f = Fixture(name=b"LBID")
        response = f.request(cookies=[b"LBID=" + f.group.get("c").id.encode()])
        self.assertEqual(f.proxy.seen[0].backend.name, "c")
        self.assertIsNone(f.proxy.seen[0].cookies)
        self.assertEqual(response.all(b"set-cookie")[0][:5], b"LBID=")


class InsertCookieCacheControlTests(SynchronousTestCase):
    def test_nocacheAdded(self) -> None:
        """A response that sets our cookie is kept out of shared caches."""
        self.assertEqual(Fixture().request().all(b"cache-control"), [b'no-cache="Set-Cookie"'])

    def test_nocacheMergedWithExisting(self) -> None:
        """With a cookie set, no-cache="Set-Cookie" joins the backend's Cache-Control values in one header."""
        f = Fixture(headers=[(b"Cache-Control", b"public"), (b"Cache-Control", b"max-age=60")])
        self.assertEqual(f.request().all(b"cache-control"), [b'public, max-age=60, no-cache="Set-Cookie"'])

    def test_privateLeftAlone(self) -> None:
        """A response already marked private keeps its Cache-Control unchanged when a cookie is inserted."""
        f = Fixture(headers=[(b"Cache-Control", b"private, max-age=60")])
        self.assertEqual(f.request().all(b"cache-control"), [b"private, max-age=60"])

    def test_noStoreLeftAlone(self) -> None:
        """A response marked no-store keeps its Cache-Control unchanged when a cookie is inserted."""
        f = Fixture(headers=[(b"Cache-Control", b"no-store")])
        self.assertEqual(f.request().all(b"cache-control"), [b"no-store"])

    def test_notAddedWithoutOurCookie(self) -> None:
        """A hit sets no cookie, so the backend's caching is not touched."""
        f = Fixture(headers=[(b"Cache-Control", b"max-age=60")])
        self.assertEqual(f.request(cookies=[f.cookie_for("a")]).all(b"cache-control"), [b"max-age=60"])


class InsertCookieRefreshTests(SynchronousTestCase):
    def test_youngCookieNotRefreshed(self) -> None:
        """A cookie younger than half its timeout is not set again."""
        f = Fixture(timeout=3600)
        cookie = f.cookie_for("b")
        f.clock.advance(1800)
        self.assertEqual(f.request(cookies=[cookie]).all(b"set-cookie"), [])

    def test_cookiePastHalfItsLifeRefreshed(self) -> None:
        """Sliding expiry: an active client's cookie is re-issued, same backend, new stamp."""
        f = Fixture(timeout=3600)
        cookie = f.cookie_for("b")
        f.clock.advance(1801)
        response = f.request(cookies=[cookie])
        self.assertEqual(
            [cookie_pair(v) for v in set_cookie_named(response, b"SERVERID")], [f.cookie_for("b", NOW + 1801)]
        )
        self.assertEqual(f.proxy.seen[0].outcome, HIT)
        self.assertEqual(response.all(b"cache-control"), [b'no-cache="Set-Cookie"'])

    def test_noRefreshWhenOff(self) -> None:
        """With refresh off, even an old cookie is not set again."""
        f = Fixture(timeout=3600, refresh=False)
        cookie = f.cookie_for("b", stamp=None)
        f.clock.advance(3000)
        self.assertEqual(f.request(cookies=[cookie]).all(b"set-cookie"), [])

    def test_stampedWhenRefreshOff(self) -> None:
        """Without refresh the value still carries when it was written, so that max_idle is enforced."""
        f = Fixture(refresh=False)
        self.assertEqual(cookie_pair(set_cookie_named(f.request(), b"SERVERID")[0]), f.cookie_for("a"))

    def test_unstampedCookieRestampedWhenRefreshOn(self) -> None:
        """A cookie issued while refresh was off is accepted, and re-issued with a stamp."""
        f = Fixture()
        response = f.request(cookies=[f.cookie_for("c", stamp=None)])
        self.assertEqual(f.proxy.seen[0].outcome, HIT)
        self.assertEqual([cookie_pair(v) for v in set_cookie_named(response, b"SERVERID")], [f.cookie_for("c")])

    def test_futureStampExpired(self) -> None:
        """A stamp far in the future (forged, or a skewed clock) counts as expired: balanced anew, new cookie."""
        f = Fixture(timeout=3600)
        response = f.request(cookies=[f.cookie_for("c", stamp=NOW + 100000)])
        self.assertEqual((f.proxy.seen[0].backend.name, f.proxy.seen[0].outcome), ("a", EXPIRED))
        self.assertEqual([cookie_pair(v) for v in set_cookie_named(response, b"SERVERID")], [f.cookie_for("a")])


class InsertCookieSubclassTests(SynchronousTestCase):
    def test_customValueFormat(self) -> None:
        """Overriding cookie_value_for and parse_cookie_value changes the format end to end."""

        class NamedCookie(InsertCookie):
            def cookie_value_for(self, backend):
                return "srv-" + backend.id

            def parse_cookie_value(self, value):
                if value.startswith("srv-"):
                    return value[4:], None
                return None

        clock = Clock()
        group = make_group()
        proxy = FakeProxy(group)
        policy = NamedCookie(proxy, refresh=False, reactor=clock)
        first = serve(policy, get())
        self.assertEqual(cookie_pair(first.all(b"set-cookie")[0]), b"SERVERID=srv-" + group.get("a").id.encode())
        serve(policy, get(cookies=[b"SERVERID=srv-" + group.get("c").id.encode()]))
        self.assertEqual(proxy.seen[1].backend.name, "c")


# --- RewriteCookie -------------------------------------------------------


class RewriteFixture:
    def __init__(self, headers=(), status: int = 200, name=b"JSESSIONID") -> None:
        self.group = make_group()
        self.proxy = FakeProxy(self.group, status, headers)
        self.policy = RewriteCookie(self.proxy, name=name)

    def request(self, *args, **kwargs) -> Response:
        return serve(self.policy, get(*args, **kwargs))

    def prefix(self, name: str) -> bytes:
        return self.group.get(name).id.encode() + b"~"


class RewriteCookieTests(SynchronousTestCase):
    def test_providesPolicy(self) -> None:
        """RewriteCookie provides IPersistencePolicy."""
        verifyObject(IPersistencePolicy, RewriteCookie(Resource()))

    def test_fromConfigNeedsCookieName(self) -> None:
        """A rewrite_cookie configuration without a cookie name is a ValueError."""
        self.assertRaises(ValueError, RewriteCookie.from_config, Resource(), PersistenceConfig(type="rewrite_cookie"))

    def test_badNameRefused(self) -> None:
        """A cookie name that is not a token (a space in it) is a ValueError."""
        self.assertRaises(ValueError, RewriteCookie, Resource(), name=b"J SESSION")

    def test_backendCookiePrefixedAttributesKept(self) -> None:
        """JSESSIONID=abc; Path=/; HttpOnly reaches the client as JSESSIONID=<id>~abc; Path=/; HttpOnly."""
        f = RewriteFixture(headers=[(b"Set-Cookie", b"JSESSIONID=abc; Path=/; HttpOnly")])
        response = f.request()
        self.assertEqual(response.all(b"set-cookie"), [b"JSESSIONID=" + f.prefix("a") + b"abc; Path=/; HttpOnly"])

    def test_backendExpiryKept(self) -> None:
        """Expiry and lifetime stay the backend's: Max-Age and Expires are passed verbatim."""
        header = b"JSESSIONID=abc; Max-Age=120; Expires=Wed, 21 Oct 2026 07:28:00 GMT; Secure"
        f = RewriteFixture(headers=[(b"Set-Cookie", header)])
        value = f.request().all(b"set-cookie")[0]
        self.assertEqual(attributes(value), [b"Max-Age=120", b"Expires=Wed, 21 Oct 2026 07:28:00 GMT", b"Secure"])

    def test_otherSetCookieUntouched(self) -> None:
        """
        Only the backend's session cookie is prefixed with the backend id; its other Set-Cookie headers pass
        unchanged.
        """
        f = RewriteFixture(headers=[(b"Set-Cookie", b"lang=en; Path=/"), (b"Set-Cookie", b"JSESSIONID=abc")])
        self.assertEqual(
            f.request().all(b"set-cookie"), [b"lang=en; Path=/", b"JSESSIONID=" + f.prefix("a") + b"abc"]
        )

    def test_quotedValuePrefixedInsideQuotes(self) -> None:
        """A quoted session cookie value gets its prefix inside the quotes."""
        f = RewriteFixture(headers=[(b"Set-Cookie", b'JSESSIONID="abc"; Path=/')])
        self.assertEqual(f.request().all(b"set-cookie"), [b'JSESSIONID="' + f.prefix("a") + b'abc"; Path=/'])

    def test_deletionLeftAlone(self) -> None:
        """An empty value deletes the cookie: there is nothing to pin."""
        f = RewriteFixture(headers=[(b"Set-Cookie", b"JSESSIONID=; Max-Age=0")])
        self.assertEqual(f.request().all(b"set-cookie"), [b"JSESSIONID=; Max-Age=0"])

    def test_noSetCookieNothingAdded(self) -> None:
        """Without the backend's cookie the response is untouched (no cookie, no Cache-Control)."""
        f = RewriteFixture()
        response = f.request()
        self.assertEqual((response.all(b"set-cookie"), response.all(b"cache-control")), ([], []))

    def test_prefixedCookieRoutesAndIsRestored(self) -> None:
        """JSESSIONID=<id>~abc goes to that backend, which receives JSESSIONID=abc."""
        f = RewriteFixture()
        f.request(cookies=[b"lang=en; JSESSIONID=" + f.prefix("c") + b"abc"])
        seen = f.proxy.seen[0]
        self.assertEqual((seen.backend.name, seen.outcome, seen.cookies), ("c", HIT, [b"lang=en; JSESSIONID=abc"]))
        self.assertEqual(seen.received_cookies[b"JSESSIONID"], b"abc")

    def test_roundTrip(self) -> None:
        """The cookie the client got back in the next request lands on the same backend as the original."""
        f = RewriteFixture(headers=[(b"Set-Cookie", b"JSESSIONID=s3cr3t; Path=/")])
        f.proxy.group.scheduler = RoundRobin()
        pair = cookie_pair(f.request().all(b"set-cookie")[0])
        for _ in range(5):
            f.request(cookies=[pair])
        self.assertEqual({s.backend.name for s in f.proxy.seen}, {"a"})
        self.assertEqual({tuple(s.cookies) for s in f.proxy.seen[1:]}, {(b"JSESSIONID=s3cr3t",)})

    def test_quotedIncomingRestoredWithQuotes(self) -> None:
        """A quoted, prefixed cookie from the client pins its backend, which receives its own value, quotes kept."""
        f = RewriteFixture()
        f.request(cookies=[b'JSESSIONID="' + f.prefix("b") + b'abc"'])
        self.assertEqual((f.proxy.seen[0].backend.name, f.proxy.seen[0].cookies), ("b", [b'JSESSIONID="abc"']))

    def test_unprefixedValuePassedThrough(self) -> None:
        """A value without our prefix is the backend's business: unchanged, and the client is new."""
        f = RewriteFixture()
        f.request(cookies=[b"JSESSIONID=abc~def"])
        self.assertEqual((f.proxy.seen[0].outcome, f.proxy.seen[0].cookies), (NEW, [b"JSESSIONID=abc~def"]))

    def test_forgedPrefixStrippedAndRepinned(self) -> None:
        """A prefix naming no backend is still removed; the client is re-pinned."""
        f = RewriteFixture()
        f.request(cookies=[b"JSESSIONID=0123456789abcdef~abc"])
        self.assertEqual((f.proxy.seen[0].outcome, f.proxy.seen[0].cookies), (REPIN, [b"JSESSIONID=abc"]))

    def test_everyOccurrenceRestored(self) -> None:
        """The backend never sees a prefix, even with the cookie sent twice; the first decides."""
        f = RewriteFixture()
        f.request(cookies=[b"JSESSIONID=" + f.prefix("b") + b"x", b"JSESSIONID=" + f.prefix("c") + b"y"])
        self.assertEqual(f.proxy.seen[0].backend.name, "b")
        self.assertEqual(f.proxy.seen[0].cookies, [b"JSESSIONID=x", b"JSESSIONID=y"])

    def test_hugeAndNonAsciiValuesNeverFail(self) -> None:
        """Huge, non-ASCII and bare-quote cookie values are served (200), never an error."""
        f = RewriteFixture()
        for value in (b"J" * 10000, f.prefix("b") + "\u00e9\u2603".encode("utf-8"), b'"', b'""'):
            self.assertEqual(f.request(cookies=[b"JSESSIONID=" + value]).status, 200)

    def test_repinnedClientGetsNewPrefix(self) -> None:
        """Pinned backend down: the new backend's cookie carries the new backend's prefix."""
        f = RewriteFixture(headers=[(b"Set-Cookie", b"JSESSIONID=fresh; Path=/")])
        f.group.get("a").up = False
        response = f.request(cookies=[b"JSESSIONID=" + f.prefix("a") + b"old"])
        seen = f.proxy.seen[0]
        self.assertEqual(seen.outcome, REPIN)
        self.assertEqual(seen.cookies, [b"JSESSIONID=old"])
        self.assertEqual(response.all(b"set-cookie"), [b"JSESSIONID=" + f.prefix(seen.backend.name) + b"fresh; Path=/"])

    def test_rotatedSessionIdOnHitPrefixed(self) -> None:
        """A backend that rotates its session id on a hit keeps the client pinned."""
        f = RewriteFixture(headers=[(b"Set-Cookie", b"JSESSIONID=rotated")])
        response = f.request(cookies=[b"JSESSIONID=" + f.prefix("c") + b"abc"])
        self.assertEqual(response.all(b"set-cookie"), [b"JSESSIONID=" + f.prefix("c") + b"rotated"])

    def test_rewrittenWhateverTheStatus(self) -> None:
        """The rewrite is done whatever the status."""
        f = RewriteFixture(status=404, headers=[(b"Set-Cookie", b"JSESSIONID=abc")])
        response = f.request()
        self.assertEqual((response.status, response.all(b"set-cookie")), (404, [b"JSESSIONID=" + f.prefix("a") + b"abc"]))

    def test_customPrefixFormat(self) -> None:
        """Overriding cookie_value_for and split_cookie_value changes the prefix end to end."""

        class Dotted(RewriteCookie):
            def cookie_value_for(self, backend, value):
                return value + b"." + backend.id.encode()

            def split_cookie_value(self, value):
                original, dot, key = value.rpartition(b".")
                return (key.decode("ascii"), original) if dot else None

        group = make_group()
        proxy = FakeProxy(group, headers=[(b"Set-Cookie", b"sid=abc")])
        policy = Dotted(proxy, name="sid")
        self.assertEqual(serve(policy, get()).all(b"set-cookie"), [b"sid=abc." + group.get("a").id.encode()])
        serve(policy, get(cookies=[b"sid=abc." + group.get("b").id.encode()]))
        self.assertEqual((proxy.seen[1].backend.name, proxy.seen[1].cookies), ("b", [b"sid=abc"]))


# --- examples/sticky_header_policy.py -----------------------------------


def load_example():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "sticky_header_policy.py")
    spec = importlib.util.spec_from_file_location("sticky_header_policy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StickyHeaderExampleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.group = make_group()
        self.proxy = FakeProxy(self.group)
        self.policy = load_example().StickyHeader(self.proxy, self.group)

    def served(self, user: Optional[bytes]) -> str:
        raw = get()
        if user is not None:
            raw = raw[:-2] + b"X-User-Id: " + user + b"\r\n\r\n"
        serve(self.policy, raw)
        return self.proxy.seen[-1].backend.name

    def test_sameHeaderSameBackend(self) -> None:
        """The example policy sends every request with one header value to one backend."""
        self.assertEqual({self.served(b"alice") for _ in range(10)}, {self.served(b"alice")})

    def test_usersSpreadOverBackends(self) -> None:
        """The example policy spreads different header values over more than one backend."""
        self.assertGreater(len({self.served(b"user%d" % i) for i in range(30)}), 1)

    def test_noHeaderBalanced(self) -> None:
        """A request without the header is balanced by the scheduler (outcome "new")."""
        self.served(None)
        self.assertEqual(self.proxy.seen[-1].outcome, NEW)

    def test_downBackendMovesOnlyItsUsers(self) -> None:
        """When a backend goes down, exactly the users it served move; every other user keeps its backend."""
        users = [b"user%d" % i for i in range(30)]
        before = {u: self.served(u) for u in users}
        self.group.get("a").up = False
        after = {u: self.served(u) for u in users}
        self.assertEqual({u for u in users if before[u] != after[u]}, {u for u in users if before[u] == "a"})


# --- lifetimes (max_idle, max_life) ---------------------------------------


def stamped(f: Fixture, name: str, *stamps: int) -> bytes:
    """C{SERVERID=<id of name>.<stamp>...}: a value with the given time stamps."""
    key = f.group.get(name).id
    return b"SERVERID=" + ".".join([key] + [_base36(t) for t in stamps]).encode()


class InsertCookieLifetimeTests(SynchronousTestCase):
    def test_idleCookieExpires(self) -> None:
        """A cookie last written more than max_idle ago counts as absent: balanced anew, outcome expired."""
        f = Fixture(timeout=3600, max_idle=600)
        cookie = f.cookie_for("c")
        f.clock.advance(601)
        response = f.request(cookies=[cookie])
        self.assertEqual((f.proxy.seen[0].backend.name, f.proxy.seen[0].outcome), ("a", EXPIRED))
        self.assertEqual([cookie_pair(v) for v in set_cookie_named(response, b"SERVERID")],
                         [stamped(f, "a", NOW + 601)])

    def test_cookieWithinMaxIdleIsHit(self) -> None:
        """A cookie written less than max_idle ago still pins."""
        f = Fixture(timeout=3600, max_idle=600)
        cookie = f.cookie_for("c")
        f.clock.advance(599)
        f.request(cookies=[cookie])
        self.assertEqual((f.proxy.seen[0].backend.name, f.proxy.seen[0].outcome), ("c", HIT))

    def test_maxIdleDefaultsToTimeout(self) -> None:
        """Without max_idle, a cookie older than the timeout (a replayed one) has expired."""
        f = Fixture(timeout=3600)
        cookie = f.cookie_for("c")
        f.clock.advance(3601)
        f.request(cookies=[cookie])
        self.assertEqual(f.proxy.seen[0].outcome, EXPIRED)

    def test_refreshAtHalfMaxIdle(self) -> None:
        """With refresh, the stamp is re-written once past half of max_idle (not of timeout)."""
        f = Fixture(timeout=3600, max_idle=600)
        cookie = f.cookie_for("c")
        f.clock.advance(301)
        response = f.request(cookies=[cookie])
        self.assertEqual(f.proxy.seen[0].outcome, HIT)
        self.assertEqual([cookie_pair(v) for v in set_cookie_named(response, b"SERVERID")],
                         [stamped(f, "c", NOW + 301)])

    def test_maxLifeValueCarriesIssueTime(self) -> None:
        """With max_life, a new cookie is <id>.<issued>.<written>."""
        f = Fixture(timeout=3600, max_life=7200)
        response = f.request()
        self.assertEqual([cookie_pair(v) for v in set_cookie_named(response, b"SERVERID")],
                         [stamped(f, "a", NOW, NOW)])

    def test_activeClientKeptUntilMaxLifeThenExpired(self) -> None:
        """
        An active client (a request every 301 s, max_idle 600) is refreshed
        and never cut before max_life; its issue time is kept, so the first
        request past max_life is balanced anew.
        """
        f = Fixture(timeout=3600, max_idle=600, max_life=3000)
        jar = cookie_pair(set_cookie_named(f.request(), b"SERVERID")[0])
        outcomes = []
        for _ in range(10):
            f.clock.advance(301)
            response = f.request(cookies=[jar])
            outcomes.append(f.proxy.seen[-1].outcome)
            for value in set_cookie_named(response, b"SERVERID"):
                jar = cookie_pair(value)
        self.assertEqual(outcomes, [HIT] * 9 + [EXPIRED])

    def test_tooOldCookieExpiresThoughRecentlyWritten(self) -> None:
        """A cookie first issued more than max_life ago expires even if written a moment ago."""
        f = Fixture(timeout=3600, max_life=7200)
        f.request(cookies=[stamped(f, "c", NOW - 7201, NOW - 10)])
        self.assertEqual(f.proxy.seen[0].outcome, EXPIRED)

    def test_unstampedCookieAcceptedAndStampedWithMaxLife(self) -> None:
        """A bare cookie (issued by the previous release) still pins, and is re-issued with both stamps."""
        f = Fixture(timeout=3600, max_life=7200)
        response = f.request(cookies=[f.cookie_for("c", stamp=None)])
        self.assertEqual(f.proxy.seen[0].outcome, HIT)
        self.assertEqual([cookie_pair(v) for v in set_cookie_named(response, b"SERVERID")],
                         [stamped(f, "c", NOW, NOW)])

    def test_oneStampCookieWithMaxLifeGetsIssueTime(self) -> None:
        """A cookie with only its write time (max_life just turned on) pins and is given an issue time."""
        f = Fixture(timeout=3600, max_life=7200)
        response = f.request(cookies=[stamped(f, "c", NOW - 5)])
        self.assertEqual(f.proxy.seen[0].outcome, HIT)
        self.assertEqual([cookie_pair(v) for v in set_cookie_named(response, b"SERVERID")],
                         [stamped(f, "c", NOW, NOW)])

    def test_smallSkewAccepted(self) -> None:
        """A stamp a little in the future (another balancer's clock) is accepted."""
        f = Fixture(timeout=3600)
        f.request(cookies=[stamped(f, "c", NOW + MAX_SKEW)])
        self.assertEqual(f.proxy.seen[0].outcome, HIT)

    def test_futureIssueTimeExpired(self) -> None:
        """An issue time beyond the skew in the future counts as expired."""
        f = Fixture(timeout=3600, max_life=7200)
        f.request(cookies=[stamped(f, "c", NOW + MAX_SKEW + 1, NOW)])
        self.assertEqual(f.proxy.seen[0].outcome, EXPIRED)

    def test_laterFreshCookieWinsOverExpiredOne(self) -> None:
        """An expired occurrence is skipped; a fresh one after it still pins."""
        f = Fixture(timeout=3600, max_idle=600)
        f.request(cookies=[stamped(f, "b", NOW - 601), f.cookie_for("c")])
        self.assertEqual((f.proxy.seen[0].backend.name, f.proxy.seen[0].outcome), ("c", HIT))

    def test_expiredCookieStrippedFromRequest(self) -> None:
        """An expired cookie is removed before the request reaches the backend, like a valid one."""
        f = Fixture(timeout=3600, max_idle=600)
        f.request(cookies=[stamped(f, "b", NOW - 601) + b"; other=1"])
        self.assertEqual(f.proxy.seen[0].cookies, [b"other=1"])

    def test_badLifetimesRejected(self) -> None:
        """max_idle beyond the timeout and max_life out of range are ValueErrors naming the option."""
        for options, word in (({"max_idle": 3601}, "max_idle"), ({"max_life": -1}, "max_life"),
                              ({"on_failure": "sometimes"}, "on_failure")):
            with self.assertRaises(ValueError) as cm:
                InsertCookie(Resource(), timeout=3600, **options)
            self.assertIn(word, str(cm.exception))


# --- fixed cookie values per server ----------------------------------------


class FixedValueTests(SynchronousTestCase):
    def fixture(self, **options) -> Fixture:
        return Fixture(server_cookies={"a": "s1", "b": "s2"}, **options)

    def test_newClientGetsTheFixedValue(self) -> None:
        """A server with cookie = "s1" is named s1 in the cookie (with its stamp)."""
        f = self.fixture()
        response = f.request()
        self.assertEqual([cookie_pair(v) for v in set_cookie_named(response, b"SERVERID")],
                         [b"SERVERID=s1." + _base36(NOW).encode()])

    def test_haproxyBareValuePins(self) -> None:
        """An HAProxy-issued SERVERID=s2 (no stamps) reaches server b."""
        f = self.fixture(refresh=False)
        response = f.request(cookies=[b"SERVERID=s2"])
        self.assertEqual((f.proxy.seen[0].backend.name, f.proxy.seen[0].outcome), ("b", HIT))
        self.assertEqual(response.all(b"set-cookie"), [])

    def test_stampedFixedValuePinsAndExpires(self) -> None:
        """Stamps after the fixed value are read: a fresh one pins, a stale one expires."""
        f = self.fixture(max_idle=600)
        f.request(cookies=[b"SERVERID=s2." + _base36(NOW - 10).encode()])
        f.request(cookies=[b"SERVERID=s2." + _base36(NOW - 601).encode()])
        self.assertEqual([s.outcome for s in f.proxy.seen], [HIT, EXPIRED])

    def test_idValueStillAcceptedForFixedServer(self) -> None:
        """A cookie naming the server by its id (issued before cookie = was set) still pins."""
        f = self.fixture()
        f.request(cookies=[f.cookie_for("b")])
        self.assertEqual((f.proxy.seen[0].backend.name, f.proxy.seen[0].outcome), ("b", HIT))

    def test_serverWithoutFixedValueUsesItsId(self) -> None:
        """Servers with no fixed value are still named by their id."""
        f = self.fixture()
        f.request(cookies=[f.cookie_for("c")])
        self.assertEqual((f.proxy.seen[0].backend.name, f.proxy.seen[0].outcome), ("c", HIT))

    def test_unknownFixedValueIgnored(self) -> None:
        """A value that is no server's (s9) is treated as no cookie."""
        f = self.fixture()
        f.request(cookies=[b"SERVERID=s9"])
        self.assertEqual(f.proxy.seen[0].outcome, NEW)

    def test_invalidOrDuplicateValuesRejected(self) -> None:
        """Values must be cookie-safe tokens without '.' or '~', unique in the group."""
        for values in ({"a": "s.1"}, {"a": "s~1"}, {"a": "s 1"}, {"a": "s1", "b": "s1"}):
            self.assertRaises(ValueError, FixedCookieValues, values)

    def test_fromServerConfigs(self) -> None:
        """from_config takes the group's ServerConfigs and reads their cookie."""
        proxy = FakeProxy(make_group())
        policy = InsertCookie.from_config(
            proxy, PersistenceConfig(type="insert_cookie", timeout=60),
            servers=[ServerConfig("a", "10.0.0.11", 8080, cookie="s1"), ServerConfig("b", "10.0.0.12", 8080)],
        )
        serve(policy, get(cookies=[b"SERVERID=s1"]))
        self.assertEqual(proxy.seen[0].backend.name, "a")

    def test_rewritePrefixIsTheFixedValue(self) -> None:
        """rewrite_cookie prefixes with s1~, and routes s1~abc to server a, which sees abc."""
        group = make_group()
        proxy = FakeProxy(group, headers=[(b"Set-Cookie", b"JSESSIONID=abc; Path=/")])
        policy = RewriteCookie(proxy, server_cookies={"a": "s1", "b": "s2"})
        response = serve(policy, get())
        self.assertEqual(cookie_pair(response.all(b"set-cookie")[0]), b"JSESSIONID=s1~abc")
        serve(policy, get(cookies=[b"JSESSIONID=s2~xyz"]))
        self.assertEqual((proxy.seen[1].backend.name, proxy.seen[1].cookies), ("b", [b"JSESSIONID=xyz"]))

    def test_rewriteUnknownPrefixPassedThrough(self) -> None:
        """A value whose part before '~' is no server's is the application's own, passed unchanged."""
        group = make_group()
        proxy = FakeProxy(group)
        policy = RewriteCookie(proxy, server_cookies={"a": "s1"})
        serve(policy, get(cookies=[b"JSESSIONID=s9~xyz"]))
        self.assertEqual((proxy.seen[0].outcome, proxy.seen[0].cookies), (NEW, [b"JSESSIONID=s9~xyz"]))


class OnFailureTests(SynchronousTestCase):
    def test_policiesCarryOnFailure(self) -> None:
        """Every shipped policy takes on_failure from its configuration; repin is the default."""
        proxy = FakeProxy(make_group())
        for kind, extra in (("insert_cookie", {"timeout": 60}), ("rewrite_cookie", {"cookie": "J"}),
                            ("source_ip", {"timeout": 60})):
            default = wrap_with_persistence(proxy, PersistenceConfig(type=kind, **extra), reactor=Clock())
            strict = wrap_with_persistence(proxy, PersistenceConfig(type=kind, on_failure="strict", **extra),
                                           reactor=Clock())
            self.assertEqual((default.policy.on_failure, strict.policy.on_failure), ("repin", "strict"), kind)

    def test_strictPinKeptOnRefusal(self) -> None:
        """A strict refusal sets no cookie: the client keeps its pin for when its backend is back."""
        f = Fixture(on_failure="strict")
        f.group.get("c").up = False
        session = Session("10.0.0.7", policy=f.policy, pinned_key=f.group.get("c").id)
        self.assertIsNone(f.group.route(session))
        self.assertEqual(session.outcome, STRICT)
