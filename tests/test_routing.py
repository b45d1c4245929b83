"""
Tests for L{twisted_slb.web.routing}: forwarding rules and the HTTPS
redirect, through a real L{Site} over a L{StringTransport}.
"""

from __future__ import annotations

from typing import List, Optional

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from tests.test_cookies import serve
from twisted_slb.web.routing import HTTPSRedirectResource, Route, RuleRouter


class Named(Resource):
    """A leaf that answers with its name and records the paths it saw."""

    isLeaf = True

    def __init__(self, name: bytes) -> None:
        Resource.__init__(self)
        self.name = name
        self.paths: List[bytes] = []

    def render(self, request):
        self.paths.append(request.uri)
        return self.name


def request(target: bytes = b"/", host: Optional[bytes] = b"www.example.com") -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Connection: close"]
    if host is not None:
        lines.append(b"Host: " + host)
    return b"\r\n".join(lines) + b"\r\n\r\n"


class RouteTests(SynchronousTestCase):
    def test_domainLowercased(self) -> None:
        """A route's domain is lowercased and its trailing dot dropped."""
        self.assertEqual(Route("App.Example.COM.", "/", Resource()).domain, "app.example.com")

    def test_badDomainRefused(self) -> None:
        """
        Domains with a wildcard not first, a bare wildcard, a double wildcard, a space or a slash are a
        ValueError.
        """
        for domain in ("a.*.com", "*", "**.a.com", "a com", "a/b"):
            self.assertRaises(ValueError, Route, domain, "/", Resource())

    def test_pathMustBeAbsolute(self) -> None:
        """A route path not starting with / is a ValueError."""
        self.assertRaises(ValueError, Route, "", "api", Resource())

    def test_wildcardMatchesExactlyOneLabel(self) -> None:
        """*.example.com matches one label before example.com: not the bare domain, two labels, or a longer name."""
        route = Route("*.example.com", "/", Resource())
        self.assertEqual(
            [route.matches_host(h) for h in ("a.example.com", "example.com", "a.b.example.com", "aexample.com")],
            [True, False, False, False],
        )

    def test_emptyDomainMatchesAnyHostAndNone(self) -> None:
        """A route without a domain matches every host, and requests without one."""
        route = Route("", "/", Resource())
        self.assertEqual([route.matches_host(h) for h in ("x.org", None)], [True, True])

    def test_pathPrefixIsSegmentAware(self) -> None:
        """A path prefix matches whole segments only, case-sensitively: /api matches /api/x, not /apix."""
        route = Route("", "/api", Resource())
        self.assertEqual(
            [route.matches_path(p) for p in (b"/api", b"/api/", b"/api/x", b"/apix", b"/", b"/API")],
            [True, True, True, False, False, False],
        )

    def test_trailingSlashInPrefixIgnored(self) -> None:
        """A prefix written /api/ matches as /api does."""
        route = Route("", "/api/", Resource())
        self.assertEqual([route.matches_path(p) for p in (b"/api", b"/api/x", b"/apix")], [True, True, False])


class RuleRouterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.app = Named(b"app")
        self.api = Named(b"api")
        self.wild = Named(b"wild")
        self.default = Named(b"default")
        self.router = RuleRouter(
            [
                Route("app.example.com", "/api", self.api),
                Route("app.example.com", "/", self.app),
                Route("*.example.org", "/", self.wild),
            ],
            self.default,
        )

    def body(self, target: bytes = b"/", host: Optional[bytes] = b"app.example.com") -> bytes:
        return serve(self.router, request(target, host)).body

    def test_exactHost(self) -> None:
        """A request for an exact host goes to that host's route."""
        self.assertEqual(self.body(b"/", b"app.example.com"), b"app")

    def test_hostCaseAndPortIgnored(self) -> None:
        """The Host header's case and port do not change the route."""
        self.assertEqual(self.body(b"/", b"APP.Example.com:8080"), b"app")

    def test_hostTrailingDotIgnored(self) -> None:
        """A Host with a trailing dot finds the same route."""
        self.assertEqual(self.body(b"/", b"app.example.com."), b"app")

    def test_firstMatchWins(self) -> None:
        """/api/v1 matches both app rules: the first listed serves it."""
        self.assertEqual(self.body(b"/api/v1?x=1"), b"api")

    def test_pathPrefixNotSegmentFallsThrough(self) -> None:
        """/apix does not match the /api rule: it falls through to the host's other route."""
        self.assertEqual(self.body(b"/apix"), b"app")

    def test_queryNotPartOfPath(self) -> None:
        """A path in the query string does not affect routing."""
        self.assertEqual(self.body(b"/api?next=/x"), b"api")

    def test_wildcardHost(self) -> None:
        """A host under a wildcard domain (with a port) goes to the wildcard route."""
        self.assertEqual(self.body(b"/", b"shop.example.org:80"), b"wild")

    def test_wildcardNotBareDomain(self) -> None:
        """The bare domain of a wildcard rule goes to the default."""
        self.assertEqual(self.body(b"/", b"example.org"), b"default")

    def test_unknownHostGoesToDefault(self) -> None:
        """A host no rule names goes to the default."""
        self.assertEqual(self.body(b"/", b"other.net"), b"default")

    def test_missingHostGoesToDefault(self) -> None:
        """A request without Host goes to the default."""
        self.assertEqual(self.body(b"/", None), b"default")

    def test_absoluteUriAuthorityUsed(self) -> None:
        """GET http://app.example.com/api HTTP/1.1: the URI's host and path decide."""
        self.assertEqual(self.body(b"http://app.example.com/api/x", b"other.net"), b"api")

    def test_routeSeesWholePath(self) -> None:
        """The chosen resource sees the whole path and query, prefix included."""
        self.body(b"/api/v1/users?id=3")
        self.assertEqual(self.api.paths, [b"/api/v1/users?id=3"])

    def test_noMatchNoDefaultIs404(self) -> None:
        """No matching route and no default: a 404 saying there is no route."""
        router = RuleRouter([Route("app.example.com", "/", self.app)], None)
        response = serve(router, request(b"/", b"nope.example.com"))
        self.assertEqual(response.status, 404)
        self.assertIn(b"no route", response.body)

    def test_ipv6HostLiteral(self) -> None:
        """A bracketed IPv6 Host with a port matches a route for that literal."""
        router = RuleRouter([Route("[::1]", "/", self.app)], None)
        self.assertEqual(serve(router, request(b"/", b"[::1]:8080")).body, b"app")

    def test_invalidHostOnlyMatchesAnyDomain(self) -> None:
        """A Host that is not a host name matches no named domain."""
        router = RuleRouter([Route("app.example.com", "/", self.app), Route("", "/", self.api)], None)
        self.assertEqual(serve(router, request(b"/", b"app.example.com/evil")).body, b"api")


class HTTPSRedirectTests(SynchronousTestCase):
    def location(self, target: bytes, host: Optional[bytes], port: int = 443):
        response = serve(HTTPSRedirectResource(port), request(target, host))
        return response.status, response.one(b"location")

    def test_redirectKeepsHostPathAndQuery(self) -> None:
        """The HTTPS redirect is a 301 to the same host, path and query."""
        self.assertEqual(
            self.location(b"/a/b?c=1&d=2", b"www.example.com"), (301, b"https://www.example.com/a/b?c=1&d=2")
        )

    def test_portOfHostDropped443Omitted(self) -> None:
        """The HTTP port of the Host is dropped, and port 443 not written."""
        self.assertEqual(self.location(b"/", b"www.example.com:8080"), (301, b"https://www.example.com/"))

    def test_otherPortKept(self) -> None:
        """An HTTPS port other than 443 is written in the Location."""
        self.assertEqual(self.location(b"/x", b"www.example.com:8080", 8443), (301, b"https://www.example.com:8443/x"))

    def test_ipv6Host(self) -> None:
        """An IPv6 Host keeps its brackets in the Location."""
        self.assertEqual(self.location(b"/", b"[::1]:80"), (301, b"https://[::1]/"))

    def test_absoluteUri(self) -> None:
        """A request in absolute form redirects to its own host, path and query."""
        self.assertEqual(self.location(b"http://www.example.com:80/p?q", b"x"), (301, b"https://www.example.com/p?q"))

    def test_missingHostIs400(self) -> None:
        """A request without Host cannot be redirected: 400."""
        self.assertEqual(self.location(b"/", None), (400, None))

    def test_invalidHostIs400(self) -> None:
        """A Host that is not a host name is not echoed into a Location."""
        self.assertEqual(self.location(b"/", b"evil.com/x@a"), (400, None))

    def test_badPortRefused(self) -> None:
        """Ports 0, over 65535, or not an integer are a ValueError."""
        for port in (0, 70000, "443"):
            self.assertRaises(ValueError, HTTPSRedirectResource, port)


class GroupSplitTests(SynchronousTestCase):
    """Weighted splits between groups that keep a client in its group (issue 16 section 6)."""

    def setUp(self):
        from twisted_slb.backends import Backend, BackendGroup
        from twisted_slb.web.routing import GroupSplit, SplitChoice

        self.stable = BackendGroup("stable", [Backend("a", "10.0.0.1", 80), Backend("b", "10.0.0.2", 80)])
        self.canary = BackendGroup("canary", [Backend("c", "10.0.0.3", 80)])
        self.split = GroupSplit([SplitChoice(self.stable, 90, Named(b"stable")),
                                 SplitChoice(self.canary, 10, Named(b"canary"))])

    def render(self, pinned_key=None) -> bytes:
        from twisted.web.test.requesthelper import DummyRequest

        from twisted_slb.persistence.interfaces import Session

        request = DummyRequest([b""])
        request.slb_session = Session("192.0.2.1", request=request, pinned_key=pinned_key)
        return self.split.render(request)

    def test_newClientsByWeight(self):
        """Of 100 new clients, exactly 90 go to stable and 10 to canary, the canary ones spread out."""
        seen = [self.render() for _ in range(100)]
        self.assertEqual((seen.count(b"stable"), seen.count(b"canary")), (90, 10))
        self.assertEqual(seen[:10].count(b"canary"), 1)
        self.assertEqual(self.split.stats.clients, {"stable": 90, "canary": 10})

    def test_pinnedClientKeepsItsGroup(self):
        """A pin to a canary backend (by id or name) always reaches canary, and is not counted as a new client."""
        c = self.canary.get("c")
        for _ in range(20):
            self.assertEqual(self.render(c.id), b"canary")
        self.assertEqual(self.split.stats.clients, {})
        self.assertEqual(self.split.stats.requests, {"canary": 20})

    def test_changedWeightsMoveOnlyNewClients(self):
        """With canary's weight now 0 its pinned clients stay there, and every new client goes to stable."""
        self.split.choices[1].weight = 0
        self.assertEqual(self.render(self.canary.get("c").id), b"canary")
        self.assertEqual({self.render() for _ in range(10)}, {b"stable"})

    def test_unknownPinIsANewClient(self):
        """A pin naming no backend of the split (removed by a reload) is given a group by weight."""
        self.assertEqual(self.render("0123456789abcdef"), b"stable")
        self.assertEqual(self.split.stats.clients, {"stable": 1})

    def test_weightsChecked(self):
        """A split with no positive weight or a negative one is refused."""
        from twisted_slb.web.routing import GroupSplit, SplitChoice

        self.assertRaises(ValueError, GroupSplit, [SplitChoice(self.stable, 0, Named(b"s"))])
        self.assertRaises(ValueError, GroupSplit, [SplitChoice(self.stable, 1, Named(b"s")),
                                                   SplitChoice(self.canary, -1, Named(b"c"))])
