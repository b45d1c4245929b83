"""
Tests for L{twisted_slb.check} (C{slb-check}) against real servers on
127.0.0.1: a sticky one, one that loses persistence, one whose 302 changes
the cookie, a refused port, and TCP listeners.
"""

from __future__ import annotations

import io
import json

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.ports import refusing_port
from twisted_slb.check import run
from twisted_slb.demo import EchoNameFactory


class Sticky(Resource):
    """Sets SERVERID on the first visit and always answers backend a."""

    isLeaf = True

    def render(self, request):
        if request.getCookie(b"SERVERID") is None:
            request.responseHeaders.addRawHeader(b"set-cookie", b"SERVERID=aaaa; Path=/")
        return b"backend=a\n"


class Alternating(Resource):
    """No persistence: backends a and b in turn."""

    isLeaf = True
    count = 0

    def render(self, request):
        self.count += 1
        return b"backend=%s\n" % (b"ab"[self.count % 2:][:1],)


class RedirectRepins(Resource):
    """Sticky, but the third request answers 302 with a new SERVERID."""

    isLeaf = True
    count = 0

    def render(self, request):
        self.count += 1
        if self.count == 1:
            request.responseHeaders.addRawHeader(b"set-cookie", b"SERVERID=aaaa")
            return b"page\n"
        if self.count == 3:
            request.setResponseCode(302)
            request.responseHeaders.addRawHeader(b"set-cookie", b"SERVERID=bbbb")
            return b"moved\n"
        return b"page\n"


class HeaderSticky(Resource):
    """Header persistence: backend a for requests with X-Session-Id, a and b in turn without; no cookie."""

    isLeaf = True
    count = 0

    def render(self, request):
        self.count += 1
        if request.getHeader(b"x-session-id") == b"abc":
            return b"backend=a\n"
        return b"backend=%s\n" % (b"ab"[self.count % 2:][:1],)


class CheckTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def serve(self, resource) -> str:
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(resource))
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/"

    @defer.inlineCallbacks
    def check(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        code = yield run(list(argv), reactor, out, err)
        return code, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def test_persistentExitsZero(self):
        """slb-check exits 0 and reports every request on one backend when the cookie keeps the client there."""
        url = yield self.serve(Sticky())
        code, out, _ = yield self.check(url, "-n", "5")
        self.assertEqual(code, 0)
        self.assertIn("persistent: 5/5 on backend a", out)

    @defer.inlineCallbacks
    def test_brokenPersistenceExitsOne(self):
        """slb-check exits 1 and says why when the balancer sets no persistence cookie."""
        url = yield self.serve(Alternating())
        code, out, _ = yield self.check(url, "-n", "4")
        self.assertEqual(code, 1)
        self.assertIn("no persistence cookie was set by the first response", out)

    @defer.inlineCallbacks
    def test_redirectThatChangesTheCookieIsNamed(self):
        """The verdict names the 302 that set a new cookie (the FAQ's case)."""
        url = yield self.serve(RedirectRepins())
        code, out, _ = yield self.check(url, "-n", "4", "--cookie", "SERVERID")
        self.assertEqual(code, 1)
        self.assertIn("request 2: backend changed aaaa -> bbbb: the response (status 302) set a new SERVERID", out)

    @defer.inlineCallbacks
    def test_matchNamesTheBackend(self):
        """--match takes the backend's name from the response body with a regular expression."""
        url = yield self.serve(Sticky())
        code, out, _ = yield self.check(url, "-n", "2", "--match", r"backend=(\w)")
        self.assertEqual(code, 0)
        self.assertIn("on backend a", out)

    @defer.inlineCallbacks
    def test_json(self):
        """--json prints a document with the verdict and every request (the first one and the -n that follow)."""
        url = yield self.serve(Sticky())
        code, out, _ = yield self.check(url, "-n", "3", "--json")
        doc = json.loads(out)
        self.assertEqual((code, doc["persistent"], len(doc["requests"])), (0, True, 4))

    @defer.inlineCallbacks
    def test_connectionRefusedExitsTwo(self):
        """A refused connection exits 2, saying it was refused."""
        number = refusing_port(self)
        code, _, err = yield self.check(f"http://127.0.0.1:{number}/", "-n", "1")
        self.assertEqual(code, 2)
        self.assertIn("refused", err)

    @defer.inlineCallbacks
    def test_usageErrorExitsTwo(self):
        """Without a URL, slb-check exits 2 with a usage message."""
        code, _, err = yield self.check("-n", "3")
        self.assertEqual(code, 2)
        self.assertIn("give a URL", err)

    @defer.inlineCallbacks
    def test_tcpFromSourceAddress(self):
        """
        --tcp with --source connects from one address each time and reports persistence on the backend named
        by the first line.
        """
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(EchoNameFactory("c"))
        self.addCleanup(port.stopListening)
        code, out, _ = yield self.check("--tcp", f"127.0.0.1:{port.getHost().port}", "--source", "127.0.0.5", "-n", "3")
        self.assertEqual(code, 0)
        self.assertIn("persistent: 3/3 on backend c", out)

    @defer.inlineCallbacks
    def test_headerSentWithEveryRequest(self):
        """--header X-Session-Id:abc is sent on every request: header persistence passes without any cookie."""
        url = yield self.serve(HeaderSticky())
        code, out, _ = yield self.check(url, "-n", "4", "--header", "X-Session-Id: abc")
        self.assertEqual(code, 0)
        self.assertIn("persistent: 4/4 on backend a", out)

    @defer.inlineCallbacks
    def test_headerNotHonouredIsNamed(self):
        """When the listener ignores the header, the verdict names the header that was sent."""
        url = yield self.serve(HeaderSticky())
        code, out, _ = yield self.check(url, "-n", "4", "--header", "X-Session-Id:other")
        self.assertEqual(code, 1)
        self.assertIn("with the same X-Session-Id: other: is header persistence enabled on this listener?", out)

    @defer.inlineCallbacks
    def test_badHeaderIsAUsageError(self):
        """--header without a colon, or with a bad name, exits 2 with a message."""
        for bad in ("X-Session-Id", "X Session:1"):
            code, _, err = yield self.check("http://127.0.0.1:1/", "--header", bad)
            self.assertEqual(code, 2)
            self.assertIn("--header wants NAME:VALUE", err)

class Anonymous(Resource):
    """A backend whose page does not say who it is."""

    isLeaf = True

    def render(self, request):
        return b"hello\n"


NAMED = """
[admin]
bind = "tcp:0:interface=127.0.0.1"

[backends.web]
servers = [ {{ name = "alpha", address = "127.0.0.1:{a}" }}, {{ name = "beta", address = "127.0.0.1:{b}" }} ]

[listeners.plain]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "insert_cookie" }}

[listeners.named]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "insert_cookie" }}
backend_header = "X-Backend"
"""


class BackendNameTests(TestCase):
    """slb-check names backends through the admin listener or the listener's backend_header."""

    timeout = 30
    check = CheckTests.check

    @defer.inlineCallbacks
    def setUp(self):
        import os

        from twisted_slb.config import load_config
        from twisted_slb.service import ADMIN, BalancerService

        ports = {}
        for name in "ab":
            port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(Anonymous()))
            self.addCleanup(port.stopListening)
            ports[name] = port.getHost().port
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(NAMED.format(**ports))
        service = BalancerService(load_config(path), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.ids = {b.name: b.id for b in service.groups["web"].backends}

        def url(name):
            return f"http://127.0.0.1:{service.getServiceNamed(name).port.getHost().port}/"

        self.plain, self.named, self.admin = url("plain"), url("named"), url(ADMIN)

    def served_by(self, out: str) -> str:
        return out.rsplit("on backend ", 1)[1].strip()

    @defer.inlineCallbacks
    def test_withoutHelpTheBackendIsAnId(self):
        """Without --admin or a backend_header, the cookie's opaque id is all slb-check can show."""
        code, out, _ = yield self.check(self.plain, "-n", "3")
        self.assertEqual(code, 0)
        self.assertIn(self.served_by(out), set(self.ids.values()))

    @defer.inlineCallbacks
    def test_adminNamesTheBackend(self):
        """--admin reads the id-to-name map from /stats: the report names the backend."""
        code, out, _ = yield self.check(self.plain, "-n", "3", "--admin", self.admin)
        self.assertEqual(code, 0)
        self.assertIn(self.served_by(out), {"alpha", "beta"})
        self.assertNotIn(self.ids["alpha"], out)
        self.assertNotIn(self.ids["beta"], out)

    @defer.inlineCallbacks
    def test_backendHeaderNamesTheBackend(self):
        """A listener with backend_header names the backend in each response; slb-check reads it."""
        code, out, err = yield self.check(self.named, "-n", "3")
        self.assertEqual(code, 0, err)
        self.assertIn(self.served_by(out), {"alpha", "beta"})

    @defer.inlineCallbacks
    def test_adminThatIsNotOneExitsTwo(self):
        """--admin pointing at something that is not an admin listener is a clear error, exit 2."""
        code, _, err = yield self.check(self.plain, "--admin", self.plain)
        self.assertEqual(code, 2)
        self.assertIn("--admin", err)
