"""
Tests for the admin listener (L{twisted_slb.admin}) through a real
L{BalancerService}: /stats, /metrics, the HTML page and the drain API.
"""

from __future__ import annotations

import json
import os

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.server import Site
from zope.interface import implementer

from tests.test_service import NamePage
from twisted_slb.admin import (
    CONTENT_SECURITY_POLICY, MAX_BODY_BYTES, REQUEST_TIMEOUT, AdminAccess, BackendAction, admin_site, bind_interface,
    exposed_without_token, render_page,
)
from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.config import ConfigError, load_config, parse_config
from twisted_slb.persistence.tables import StickTable
from twisted_slb.service import ADMIN, BalancerService
from twisted_slb.stats import StatsRegistry

CONFIG = """
[admin]
bind = "tcp:0:interface=127.0.0.1"
token = "{token}"

[backends.web]
servers = [ {{ name = "a", address = "127.0.0.1:{a}" }}, {{ name = "b", address = "127.0.0.1:{b}" }} ]

[listeners.web]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "insert_cookie" }}
"""


class AdminCase(TestCase):
    timeout = 30
    token = ""
    #: the balancer's configuration ({a} and {b}: the backends' ports)
    config = CONFIG

    @defer.inlineCallbacks
    def setUp(self):
        ports = {}
        for name in "ab":
            port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(NamePage(name)))
            self.addCleanup(port.stopListening)
            ports[name] = port.getHost().port
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(self.config.format(token=self.token, **ports))
        self.service = BalancerService(load_config(path), reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.admin = f"http://127.0.0.1:{self.service.getServiceNamed(ADMIN).port.getHost().port}"
        self.web = f"http://127.0.0.1:{self.service.getServiceNamed('web').port.getHost().port}"
        self.agent = Agent(reactor)

    @defer.inlineCallbacks
    def fetch(self, url, method=b"GET", headers=None):
        response = yield self.agent.request(method, url.encode(), Headers(headers or {}))
        body = yield readBody(response)
        return response, body


class AdminTests(AdminCase):
    @defer.inlineCallbacks
    def test_statsCountRequestsAndPersistence(self):
        """/stats counts the listener's requests, status classes and persistence outcomes."""
        for _ in range(3):
            yield self.fetch(self.web + "/")
        response, body = yield self.fetch(self.admin + "/stats")
        doc = json.loads(body)
        web = [l for l in doc["listeners"] if l["name"] == "web"][0]
        self.assertEqual(web["requests_total"], 3)
        self.assertEqual(web["requests_by_class"], {"2xx": 3})
        self.assertEqual(web["persistence"]["new"], 3)
        states = {b["name"]: b["state"] for b in doc["groups"][0]["backends"]}
        self.assertEqual(states, {"a": "up", "b": "up"})

    @defer.inlineCallbacks
    def test_cookieClientsPerBackend(self):
        """/stats and /metrics count the distinct insert-cookie clients each backend served: a client's
        later requests (with its cookie) add nothing, another client adds one."""
        response, body = yield self.fetch(self.web + "/", headers={b"user-agent": [b"one"]})
        served = body.split()[0].split(b"=")[1].decode()
        cookie = response.headers.getRawHeaders(b"set-cookie")[0].split(b";")[0]
        for _ in range(2):
            yield self.fetch(self.web + "/", headers={b"user-agent": [b"one"], b"cookie": [cookie]})
        yield self.fetch(self.web + "/", headers={b"user-agent": [b"two"]})
        _, body = yield self.fetch(self.admin + "/stats")
        counts = {b["name"]: b["cookie_clients"] for b in json.loads(body)["groups"][0]["backends"]}
        self.assertEqual(sum(counts.values()), 2)
        self.assertGreaterEqual(counts[served], 1)
        _, metrics = yield self.fetch(self.admin + "/metrics")
        self.assertIn(f'slb_backend_cookie_clients{{backend="{served}",group="web"}} {counts[served]}.0'.encode(),
                      metrics)

    @defer.inlineCallbacks
    def test_statsCountRequestBodyBytesIn(self):
        """
        On an HTTP listener C{bytes_in} counts request bodies (a 100 KB POST
        adds 102400) and C{bytes_out} response bodies, headers excluded.
        """
        from io import BytesIO

        from twisted.web.client import FileBodyProducer

        body = b"x" * 102400
        response = yield self.agent.request(b"POST", (self.web + "/").encode(), Headers({}),
                                            FileBodyProducer(BytesIO(body)))
        answer = yield readBody(response)
        _, stats = yield self.fetch(self.admin + "/stats")
        web = [l for l in json.loads(stats)["listeners"] if l["name"] == "web"][0]
        self.assertEqual((web["bytes_in"], web["bytes_out"]), (102400, len(answer)))

    @defer.inlineCallbacks
    def test_statsShowOperatorAndHealthState(self):
        """/stats gives each backend's operator state, health state and passive (ejection) view apart."""
        yield self.fetch(self.admin + "/backends/web/a/down", b"POST")
        _, body = yield self.fetch(self.admin + "/stats")
        a = [b for b in json.loads(body)["groups"][0]["backends"] if b["name"] == "a"][0]
        self.assertEqual((a["state"], a["admin_state"], a["health_state"]), ("down", "maint", "up"))
        self.assertEqual((a["passive"]["ejected"], a["passive"]["ejections"]), (False, 0))
        _, body = yield self.fetch(self.admin + "/metrics")
        self.assertIn(b'slb_backend_admin_state{backend="a",group="web",state="maint"} 1.0', body)
        self.assertIn(b'slb_backend_healthy{backend="a",group="web"} 1.0', body)

    @defer.inlineCallbacks
    def test_metricsAreLabelled(self):
        """/metrics has labelled Prometheus samples."""
        yield self.fetch(self.web + "/")
        _, body = yield self.fetch(self.admin + "/metrics")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }
        self.assertEqual(samples[("slb_backend_up", (("backend", "a"), ("group", "web")))], 1)
        requests = [v for (name, labels), v in samples.items() if name == "slb_requests_total"]
        self.assertEqual(sum(requests), 1)
        self.assertIn(("slb_persistence_total", (("listener", "web"), ("outcome", "new"))), samples)

    @defer.inlineCallbacks
    def test_pageShowsBackends(self):
        """The page lists the group's backends with their state, id and action buttons, and the listeners' binds."""
        response, body = yield self.fetch(self.admin + "/")
        self.assertEqual(response.code, 200)
        self.assertIn(b"<h2>Group web", body)
        self.assertIn(b'class="state up"', body)
        self.assertIn(self.service.groups["web"].get("a").id.encode(), body)
        self.assertIn(b'data-backend="a" data-action="drain"', body)
        self.assertIn(b"<code>tcp:0:interface=127.0.0.1</code>", body)

    @defer.inlineCallbacks
    def test_pageSendsSecurityHeaders(self):
        """The page forbids framing and inline script (CSP) and MIME sniffing, and names no server software."""
        response, _ = yield self.fetch(self.admin + "/")
        headers = response.headers
        self.assertEqual(headers.getRawHeaders(b"content-security-policy"), [CONTENT_SECURITY_POLICY])
        self.assertIn(b"frame-ancestors 'none'", CONTENT_SECURITY_POLICY)
        self.assertNotIn(b"unsafe-inline", CONTENT_SECURITY_POLICY)
        self.assertEqual(headers.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
        self.assertFalse(headers.hasHeader(b"server"))
        self.assertFalse(headers.hasHeader(b"access-control-allow-origin"))
        response, body = yield self.fetch(self.admin + "/admin.js")
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/javascript; charset=utf-8"])
        self.assertIn(b"X-SLB-Admin", body)

    @defer.inlineCallbacks
    def test_statsHasVersionUptimeAndBinds(self):
        """/stats carries the version, the uptime and each listener's bind."""
        _, body = yield self.fetch(self.admin + "/stats")
        doc = json.loads(body)
        self.assertIsInstance(doc["version"], str)
        self.assertGreaterEqual(doc["uptime"], 0)
        web = [l for l in doc["listeners"] if l["name"] == "web"][0]
        self.assertEqual(web["bind"], "tcp:0:interface=127.0.0.1")

    @defer.inlineCallbacks
    def test_hostOfAnotherNameIsRefused(self):
        """A DNS-rebinding request (Host: attacker.example) gets 421 for reads and actions; 127.0.0.1:PORT and
        localhost:PORT are served."""
        port = self.admin.rsplit(":", 1)[1]
        for path, method in (("/stats", b"GET"), ("/backends/web/a/down", b"POST")):
            response, body = yield self.fetch(self.admin + path, method, {b"host": [b"attacker.example:" + port.encode()]})
            self.assertEqual(response.code, 421, body)
            self.assertNotIn(b"127.0.0.1", body)
        self.assertEqual(self.service.groups["web"].get("a").state, "up")
        for host in (b"127.0.0.1:" + port.encode(), b"localhost:" + port.encode()):
            response, body = yield self.fetch(self.admin + "/stats", headers={b"host": [host]})
            self.assertEqual(response.code, 200, host)
            self.assertIn(b'"groups"', body)

    @defer.inlineCallbacks
    def test_drainFromLoopback(self):
        """A plain POST from loopback (as curl -X POST sends it) drains and enables a backend."""
        response, body = yield self.fetch(self.admin + "/backends/web/a/drain", b"POST")
        self.assertEqual(response.code, 200)
        a = self.service.groups["web"].get("a")
        self.assertEqual((a.state, a.admin_state, a.weight), ("drain", "drain", 100))
        response, _ = yield self.fetch(self.admin + "/backends/web/a/enable", b"POST")
        self.assertEqual((a.state, a.admin_state), ("up", "ready"))

    @defer.inlineCallbacks
    def test_unknownBackendIs404AndGetIs405(self):
        """An unknown backend is 404; GET on an action is 405."""
        response, _ = yield self.fetch(self.admin + "/backends/web/zz/drain", b"POST")
        self.assertEqual(response.code, 404)
        response, _ = yield self.fetch(self.admin + "/backends/web/a/drain")
        self.assertEqual(response.code, 405)


class TokenTests(AdminCase):
    token = "s3cret"

    @defer.inlineCallbacks
    def test_tokenRequiredEvenFromLoopback(self):
        """With a token, loopback is not enough."""
        response, body = yield self.fetch(self.admin + "/backends/web/a/drain", b"POST")
        self.assertEqual(response.code, 403)
        response, _ = yield self.fetch(self.admin + "/backends/web/a/drain", b"POST",
                                       {b"authorization": [b"Bearer s3cret"]})
        self.assertEqual(response.code, 200)


ADMIN_ADDRESS = IPv4Address("TCP", "127.0.0.1", 8404)


class MemoryAdmin:
    """An admin listener (L{admin_site}) over a L{StringTransport}, its time a L{Clock}."""

    def __init__(self, token="", hosts=(), peer="127.0.0.1", bind="tcp:8404:interface=127.0.0.1") -> None:
        self.clock = Clock()
        self.group = BackendGroup("web", [Backend("a", "10.0.0.1", 80), Backend("b", "10.0.0.2", 80)])
        self.registry = StatsRegistry({"web": self.group})
        # A source-IP table with three clients: two on a, one on b.
        self.table = StickTable(600, max_entries=1000, clock=self.clock)
        for client, backend in ((b"192.0.2.1", "a"), (b"192.0.2.2", "a"), (b"192.0.2.3", "b")):
            self.table.set(client, self.group.get(backend).id)
        self.registry.census.tables = {"web/web": self.table}
        self.factory = admin_site(self.registry, token, hosts=hosts, bind=bind, reactor=self.clock)
        client = IPv4Address("TCP", peer, 5555)
        self.protocol = self.factory.buildProtocol(client)
        self.transport = StringTransport(hostAddress=ADMIN_ADDRESS, peerAddress=client)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.protocol.dataReceived(data)
        return self.transport.value()

    @property
    def state(self) -> str:
        return self.group.get("a").state


def head(method=b"POST", path=b"/backends/web/a/down", host=b"127.0.0.1:8404", **headers) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (method, path), b"Host: " + host]
    lines += [name.replace("_", "-").encode() + b": " + value for name, value in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class HostTests(SynchronousTestCase):
    def test_foreignHostIs421(self):
        """A Host that is not one of the listener's names gets 421 and no data."""
        admin = MemoryAdmin()
        out = admin.send(head(b"GET", b"/stats", b"attacker.example"))
        self.assertTrue(out.startswith(b"HTTP/1.1 421 "), out)
        self.assertNotIn(b"10.0.0.1", out)
        self.assertTrue(admin.transport.disconnecting)

    def test_ownNamesAreServed(self):
        """The bind address, localhost (any case, trailing dot, with or without port) and [admin] hosts are served."""
        for host in (b"127.0.0.1:8404", b"localhost:8404", b"LOCALHOST", b"localhost.:8404", b"lb1.example.net"):
            admin = MemoryAdmin(hosts=("lb1.example.net",))
            out = admin.send(head(b"GET", b"/stats", host))
            self.assertTrue(out.startswith(b"HTTP/1.1 200 "), (host, out))

    def test_connectionAddressIsServedWhenBoundToAll(self):
        """Bound to every interface, the address the connection arrived on is a name of the listener."""
        admin = MemoryAdmin(bind="tcp:8404")
        self.assertTrue(admin.send(head(b"GET", b"/stats", b"127.0.0.1:8404")).startswith(b"HTTP/1.1 200 "))
        admin = MemoryAdmin(bind="tcp:8404")
        self.assertTrue(admin.send(head(b"GET", b"/stats", b"10.9.9.9:8404")).startswith(b"HTTP/1.1 421 "))

    def test_missingHostOnHTTP11Is400(self):
        """An HTTP/1.1 request without Host is 400; two Host headers are 400."""
        admin = MemoryAdmin()
        self.assertTrue(admin.send(b"GET /stats HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 "))
        admin = MemoryAdmin()
        out = admin.send(b"GET /stats HTTP/1.1\r\nHost: localhost\r\nHost: evil\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out)

    def test_bindInterface(self):
        """The bind address is read from tcp endpoint descriptions, escaped IPv6 colons included."""
        self.assertEqual(bind_interface("tcp:8404:interface=127.0.0.1"), "127.0.0.1")
        self.assertEqual(bind_interface(r"tcp6:8404:interface=\:\:1"), "::1")
        self.assertEqual(bind_interface("tcp:8404"), "")
        self.assertIsNone(bind_interface("unix:/run/slb.sock"))


class CrossSiteTests(SynchronousTestCase):
    def assertRefused(self, admin, raw, code=b"403"):
        out = admin.send(raw)
        self.assertTrue(out.startswith(b"HTTP/1.1 " + code + b" "), out)
        self.assertEqual(admin.state, "up")
        return out

    def test_curlStylePostIsAllowed(self):
        """A POST with no sign of a browser (curl -X POST) acts from loopback."""
        admin = MemoryAdmin()
        out = admin.send(head(User_Agent=b"curl/7.88.1", Accept=b"*/*"))
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
        self.assertEqual(admin.state, "down")

    def test_otherOriginIsRefused(self):
        """A POST whose Origin is another site, or 'null', is refused even with the admin header."""
        for origin in (b"http://127.0.0.1:9999", b"http://attacker.example", b"null", b"https://127.0.0.1:8404"):
            out = self.assertRefused(MemoryAdmin(), head(Origin=origin, X_SLB_Admin=b"1"))
            self.assertIn(b"another origin", out)

    def test_crossSiteFetchMetadataIsRefused(self):
        """A POST marked Sec-Fetch-Site same-site or cross-site is refused (another port of 127.0.0.1 is
        same-site)."""
        for site in (b"same-site", b"cross-site"):
            self.assertRefused(MemoryAdmin(), head(Sec_Fetch_Site=site, X_SLB_Admin=b"1"))

    def test_browserPostNeedsAdminHeader(self):
        """A same-origin browser POST without X-SLB-Admin (what a form sends) is refused; with it, it acts."""
        same = {"Origin": b"http://127.0.0.1:8404", "Sec_Fetch_Site": b"same-origin"}
        self.assertRefused(MemoryAdmin(), head(**same))
        self.assertRefused(MemoryAdmin(), head(Content_Type=b"application/x-www-form-urlencoded"))
        self.assertRefused(MemoryAdmin(), head(Referer=b"http://127.0.0.1:8404/"))
        admin = MemoryAdmin()
        out = admin.send(head(X_SLB_Admin=b"1", **same))
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
        self.assertEqual(admin.state, "down")

    def test_crossSiteReadIsRefused(self):
        """A cross-site fetch of /stats is refused; following a link to the page (a navigation) is not."""
        out = MemoryAdmin().send(head(b"GET", b"/stats", Sec_Fetch_Site=b"same-site", Sec_Fetch_Mode=b"cors"))
        self.assertTrue(out.startswith(b"HTTP/1.1 403 "), out)
        self.assertNotIn(b"10.0.0.1", out)
        out = MemoryAdmin().send(head(b"GET", b"/", Sec_Fetch_Site=b"cross-site", Sec_Fetch_Mode=b"navigate"))
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)

    def test_optionsIsNotAPreflightGrant(self):
        """OPTIONS (a CORS preflight) gets 405 and no Access-Control-Allow-* header."""
        out = MemoryAdmin().send(head(b"OPTIONS", b"/backends/web/a/down"))
        self.assertTrue(out.startswith(b"HTTP/1.1 405 "), out)
        self.assertNotIn(b"Access-Control", out)

    def test_nonLoopbackRefusedWithoutToken(self):
        """Without a token, actions from a non-loopback client are refused."""
        out = self.assertRefused(MemoryAdmin(peer="192.0.2.7"), head())
        self.assertIn(b"loopback", out)

    def test_tokenActsFromAnywhereAndWithoutAdminHeader(self):
        """With a token, the Authorization header is needed and enough (it cannot be sent cross-site)."""
        self.assertRefused(MemoryAdmin(token="s3cret"), head())
        self.assertRefused(MemoryAdmin(token="s3cret"), head(Authorization=b"Bearer wrong"))
        admin = MemoryAdmin(token="s3cret", peer="192.0.2.7")
        out = admin.send(head(Authorization=b"Bearer s3cret", Origin=b"http://127.0.0.1:8404"))
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
        self.assertEqual(admin.state, "down")


class BodyAndDeadlineTests(SynchronousTestCase):
    def test_wrongTokenRefusedBeforeBody(self):
        """A wrong token is refused on the head: no 100 Continue, no body byte read, the connection closed."""
        admin = MemoryAdmin(token="s3cret")
        out = admin.send(head(Authorization=b"Bearer wrong", Content_Length=b"100", Expect=b"100-continue"))
        self.assertTrue(out.startswith(b"HTTP/1.1 403 "), out)
        self.assertNotIn(b"100 Continue", out)
        self.assertTrue(admin.transport.disconnecting)
        self.assertIsNone(admin.protocol.pending)

    def test_bodyOverCapIs413(self):
        """A body announced or sent chunked over MAX_BODY_BYTES is 413, even with the token."""
        admin = MemoryAdmin(token="s3cret")
        out = admin.send(head(Authorization=b"Bearer s3cret", Content_Length=b"%d" % (200 * 1024 * 1024)))
        self.assertTrue(out.startswith(b"HTTP/1.1 413 "), out)
        admin = MemoryAdmin(token="s3cret")
        out = admin.send(head(Authorization=b"Bearer s3cret", Transfer_Encoding=b"chunked")
                         + b"%x\r\n" % (MAX_BODY_BYTES + 1) + b"x" * (MAX_BODY_BYTES + 1))
        self.assertTrue(out.startswith(b"HTTP/1.1 413 "), out)
        self.assertEqual(admin.state, "up")
        admin = MemoryAdmin()
        out = admin.send(head(Content_Length=b"%d" % MAX_BODY_BYTES) + b"x" * MAX_BODY_BYTES)
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)

    def test_headTrickleHitsDeadline(self):
        """A head sent one line every 3 s is cut at REQUEST_TIMEOUT from its first byte: bytes do not extend it."""
        admin = MemoryAdmin()
        admin.send(b"GET /stats HTTP/1.1\r\n")
        for i in range(3):
            admin.clock.advance(3)
            admin.send(b"X-Slow-%d: 1\r\n" % i)
        self.assertFalse(admin.transport.disconnecting)
        admin.clock.advance(REQUEST_TIMEOUT - 9)
        self.assertTrue(admin.transport.value().startswith(b"HTTP/1.1 408 "), admin.transport.value())
        self.assertTrue(admin.transport.disconnecting)

    def test_bodyTrickleHitsDeadline(self):
        """A body sent a byte every 3 s is cut at REQUEST_TIMEOUT from the request's first byte."""
        admin = MemoryAdmin()
        admin.send(head(Content_Length=b"100"))
        for _ in range(3):
            admin.clock.advance(3)
            admin.send(b"x")
        admin.clock.advance(REQUEST_TIMEOUT - 9)
        self.assertTrue(admin.transport.value().startswith(b"HTTP/1.1 408 "), admin.transport.value())
        self.assertEqual(admin.state, "up")

    def test_emptyLinesDoNotKeepAnIdleConnection(self):
        """Empty lines between requests do not restart the idle timeout."""
        admin = MemoryAdmin()
        for _ in range(3):
            admin.clock.advance(3)
            admin.send(b"\r\n")
        admin.clock.advance(REQUEST_TIMEOUT - 9)
        self.assertTrue(admin.transport.disconnecting)

    def test_connectionsOverTheLimitAreClosed(self):
        """The admin listener's connections count against its own limit."""
        from twisted_slb.limits import ConnectionLimit

        limit = ConnectionLimit(1, "[admin]")
        factory = admin_site(StatsRegistry({}), reactor=Clock(), limit=limit)
        client = IPv4Address("TCP", "127.0.0.1", 5555)
        self.assertIsNotNone(factory.buildProtocol(client))
        self.assertIsNone(factory.buildProtocol(client))


class PageTests(SynchronousTestCase):
    def test_namesAreEscaped(self):
        """Names shown on the page are escaped by twisted.web.template, in text and attributes."""
        group = BackendGroup("w<b>", [Backend("b<i>\"", "10.0.0.1", 80)])
        page = render_page(StatsRegistry({"w": group}).snapshot())
        self.assertIn(b"b&lt;i&gt;", page)
        self.assertIn(b'data-backend="b&lt;i&gt;&quot;"', page)
        self.assertNotIn(b"<i>", page)
        self.assertNotIn(b"<b>", page)

    def test_downAndDrainColours(self):
        """Drained and down backends get their state classes; the page refreshes itself and has no inline script."""
        group = BackendGroup("web", [Backend("a", "10.0.0.1", 80, weight=0), Backend("b", "10.0.0.2", 80)])
        group.get("b").up = False
        page = render_page(StatsRegistry({"web": group}).snapshot())
        self.assertIn(b'class="state drain"', page)
        self.assertIn(b'class="state down"', page)
        self.assertIn(b'http-equiv="refresh"', page)
        self.assertIn(b'<script src="/admin.js"></script>', page)
        self.assertNotIn(b"<style", page)

    def test_tokenFieldOnlyWithToken(self):
        """The token field is shown only when actions need a token."""
        snapshot = StatsRegistry({}).snapshot()
        self.assertNotIn(b'id="token"', render_page(snapshot))
        self.assertIn(b'id="token"', render_page(snapshot, token_required=True))


class ConfigTests(SynchronousTestCase):
    BASE = """
[backends.web]
servers = [ { name = "a", address = "127.0.0.1:1" } ]
[listeners.web]
protocol = "http"
bind = "tcp:0"
backends = "web"
[admin]
bind = "tcp:0:interface=127.0.0.1"
"""

    def test_hostsAreRead(self):
        """[admin] hosts and max_connections are read; names are lower-cased."""
        config = parse_config(self.BASE + 'hosts = ["LB1.example.net", "10.0.0.5", "[::1]"]\nmax_connections = 3\n')
        self.assertEqual(config.admin.hosts, ("lb1.example.net", "10.0.0.5", "::1"))
        self.assertEqual(config.admin.max_connections, 3)

    def test_badHostsNameTheField(self):
        """A host with a scheme or port, or not a list, is a ConfigError naming the field and the value."""
        for value, field in (('["http://lb1"]', "admin.hosts[0]"), ('["lb1:8404"]', "admin.hosts[0]"),
                             ('"lb1"', "admin.hosts"), ('["ok", 3]', "admin.hosts[1]")):
            with self.assertRaises(ConfigError) as cm:
                parse_config(self.BASE + f"hosts = {value}\n")
            self.assertIn(field + ":", str(cm.exception))
            self.assertIn("allowed:", str(cm.exception))


class ServiceTests(SynchronousTestCase):
    def warnings(self, admin_lines: str):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = BalancerService(parse_config(ConfigTests.BASE.replace(
            'bind = "tcp:0:interface=127.0.0.1"\n', admin_lines)), Clock())
        return service, [e for e in events if e.get("log_namespace") == "twisted_slb.service"
                         and "admin listener binds" in e.get("log_format", "")]

    def test_warnsWhenExposedWithoutToken(self):
        """Binding the admin beyond loopback without a token logs a warning at start; loopback or a token do not."""
        _, warned = self.warnings('bind = "tcp:0"\n')
        self.assertEqual(len(warned), 1)
        _, warned = self.warnings('bind = "tcp:0:interface=127.0.0.1"\n')
        self.assertEqual(warned, [])
        _, warned = self.warnings('bind = "tcp:0"\ntoken = "x"\n')
        self.assertEqual(warned, [])
        self.assertTrue(exposed_without_token("tcp:0:interface=0.0.0.0", ""))
        self.assertFalse(exposed_without_token(r"tcp6:0:interface=\:\:1", ""))

    def test_adminHasItsOwnLimit(self):
        """The admin listener counts its connections against [admin] max_connections, not the global limit."""
        service, _ = self.warnings('bind = "tcp:0:interface=127.0.0.1"\nmax_connections = 2\n')
        factory = service.getServiceNamed(ADMIN).factory
        self.assertEqual(factory.limit.limit, 2)
        self.assertIsNone(factory.limit.parent)

    def test_accessChecksUseConfiguredHosts(self):
        """The service builds the admin with [admin] hosts and the bind address as its names."""
        service, _ = self.warnings('bind = "tcp:0:interface=127.0.0.2"\nhosts = ["lb1"]\n')
        access = service.getServiceNamed(ADMIN).factory.check_head.__self__
        self.assertIsInstance(access, AdminAccess)
        self.assertEqual(access.names, {"localhost", "lb1", "127.0.0.2"})


class OperatorStateTests(SynchronousTestCase):
    """Issue 28: an operator's down or drain holds until the operator lifts it."""

    def setUp(self):
        from twisted.internet.testing import MemoryReactorClock

        from twisted_slb.config import HealthCheckConfig
        from twisted_slb.health import HealthMonitor

        self.group = BackendGroup("web", [Backend("a", "10.0.0.1", 80), Backend("b", "10.0.0.2", 80)])
        self.monitor = HealthMonitor(self.group, HealthCheckConfig(interval=1000), reactor=MemoryReactorClock())
        self.monitor.startService()
        self.addCleanup(self.monitor.stopService)
        self.action = BackendAction(AdminAccess(""), StatsRegistry({"web": self.group}))
        self.a = self.group.get("a")

    def post(self, action):
        from twisted.internet.address import IPv4Address
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b"web", b"a", action])
        request.method = b"POST"
        request.client = IPv4Address("TCP", "127.0.0.1", 5555)
        return self.action.render_POST(request)

    def test_downHoldsWhateverTheChecksSay(self):
        """Passing health checks do not undo an operator's down; the operator's up does."""
        self.post(b"down")
        for _ in range(5):
            self.monitor._checked(self.a, True, "status 200")
        self.assertEqual((self.a.up, self.a.state, self.a.health_state), (False, "down", "up"))
        self.assertIsNone(self.group.pinned(self.a.id))
        self.post(b"up")
        self.assertEqual((self.a.up, self.a.state), (True, "up"))

    def test_drainHoldsWhateverTheChecksSay(self):
        """A drained backend that fails and recovers stays drained: pins kept, no new clients."""
        self.post(b"drain")
        for ok in [False] * 3 + [True] * 3:
            self.monitor._checked(self.a, ok, "x")
        self.assertEqual((self.a.state, self.a.takes_new_clients, self.a.takes_pinned_clients),
                         ("drain", False, True))
        self.assertEqual({self.group.choose("").name for _ in range(10)}, {"b"})
        self.post(b"enable")
        self.assertTrue(self.a.takes_new_clients)

    def test_upDoesNotOverrideFailingChecks(self):
        """The operator's up lifts maintenance only: a backend the checks find down stays out."""
        self.post(b"down")
        for _ in range(3):
            self.monitor._checked(self.a, False, "connect refused")
        body = self.post(b"up")
        self.assertEqual((self.a.admin_state, self.a.up), ("ready", False))
        self.assertIn(b"operator ready, health down", body)

    def test_pageShowsOperatorAndHealthState(self):
        """The page shows the operator's state and the health state apart, as /stats does."""
        self.post(b"down")
        for _ in range(3):
            self.monitor._checked(self.group.get("b"), False, "connect refused")
        page = render_page(StatsRegistry({"web": self.group}).snapshot())
        self.assertIn(b"<td>maint</td><td>up</td>", page)
        self.assertIn(b"<td>ready</td><td>down</td>", page)


def body_of(out: bytes) -> bytes:
    """The body of the one response in C{out} (its framing left aside: these are short)."""
    head, _, body = out.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        size, _, rest = body.partition(b"\r\n")
        return rest[:int(size, 16)]
    return body


class TablesMemoryTests(SynchronousTestCase):
    """C{/tables} in memory: listing, entries, unpin and clear, and who may do them."""

    def get(self, admin, path: bytes):
        out = admin.send(head(b"GET", path))
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
        return json.loads(body_of(out))

    def test_listTables(self):
        """GET /tables names each table with its type, entries, bound, timeout and URL."""
        admin = MemoryAdmin()
        admin.registry.census.table_routes["web/web"] = ["web"]
        (table,) = self.get(admin, b"/tables")["tables"]
        self.assertEqual(table, {"name": "web/web", "type": "source_ip", "routes": ["web"], "entries": 3,
                                 "max_entries": 1000, "timeout": 600, "url": "/tables/web%2Fweb"})

    def test_entriesWithBackendNamesAndIdleTime(self):
        """GET /tables/NAME lists key, backend name and id, idle seconds and the entry's URL."""
        admin = MemoryAdmin()
        admin.clock.advance(2.5)
        admin.table.set(b"192.0.2.3", admin.group.get("b").id)
        doc = self.get(admin, b"/tables/web%2Fweb")
        self.assertEqual(doc["backends"], {"a": 2, "b": 1})
        self.assertEqual([(e["key"], e["backend"], e["idle"]) for e in doc["items"]],
                         [("192.0.2.1", "a", 2.5), ("192.0.2.2", "a", 2.5), ("192.0.2.3", "b", 0.0)])
        self.assertEqual(doc["items"][0]["backend_id"], admin.group.get("a").id)
        self.assertEqual(doc["items"][0]["url"], "/tables/web%2Fweb/192.0.2.1")

    def test_filterByBackendAndLimit(self):
        """backend=B keeps B's entries (by name or id); limit caps the list and says it was truncated."""
        admin = MemoryAdmin()
        doc = self.get(admin, b"/tables/web%2Fweb?backend=a&limit=1")
        self.assertEqual((doc["matched"], doc["shown"], doc["truncated"]), (2, 1, True))
        self.assertEqual([e["key"] for e in doc["items"]], ["192.0.2.1"])
        doc = self.get(MemoryAdmin(), b"/tables/web%2Fweb?backend=" + admin.group.get("b").id.encode())
        self.assertEqual([e["key"] for e in doc["items"]], ["192.0.2.3"])
        out = MemoryAdmin().send(head(b"GET", b"/tables/web%2Fweb?limit=lots"))
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out)
        self.assertIn(b"limit 'lots' is not an integer from 0 to 100000", out)

    def test_binaryKeysAreEscapedAndAddressable(self):
        """A key that is not printable is shown escaped, and its URL (percent-encoded bytes) finds it."""
        admin = MemoryAdmin()
        admin.table.set(b"tok\x00\xff\\/x", admin.group.get("b").id)
        entry = [e for e in self.get(admin, b"/tables/web%2Fweb")["items"] if e["backend"] == "b"][-1]
        self.assertEqual(entry["key"], "tok\\x00\\xff\\\\/x")
        self.assertEqual(entry["url"], "/tables/web%2Fweb/tok%00%FF%5C%2Fx")
        doc = self.get(MemoryAdmin(), b"/tables/web%2Fweb/192.0.2.2")
        self.assertEqual((doc["key"], doc["backend"]), ("192.0.2.2", "a"))
        admin2 = MemoryAdmin()
        admin2.table.set(b"tok\x00\xff\\/x", admin.group.get("b").id)
        out = admin2.send(head(b"DELETE", entry["url"].encode()))
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
        self.assertIsNone(admin2.table.get(b"tok\x00\xff\\/x"))

    def test_unencodedNameIsFound(self):
        """The table name may also be written with its slash as it is, when that is unambiguous."""
        doc = self.get(MemoryAdmin(), b"/tables/web/web/192.0.2.3")
        self.assertEqual(doc["backend"], "b")

    def test_unknownTableOrKeyIs404(self):
        """An unknown table, or a key not in the table, is 404 for GET and DELETE."""
        for method, path in ((b"GET", b"/tables/nope"), (b"GET", b"/tables/web%2Fweb/10.9.9.9"),
                             (b"DELETE", b"/tables/web%2Fweb/10.9.9.9"), (b"DELETE", b"/tables/nope")):
            admin = MemoryAdmin()
            out = admin.send(head(method, path))
            self.assertTrue(out.startswith(b"HTTP/1.1 404 "), (method, path, out))
            self.assertEqual(len(admin.table), 3)

    def test_unpinOneClient(self):
        """DELETE /tables/NAME/KEY (as curl sends it) forgets that client only, and logs who did it."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        admin = MemoryAdmin()
        out = admin.send(head(b"DELETE", b"/tables/web%2Fweb/192.0.2.1", User_Agent=b"curl/7.88.1"))
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
        self.assertIn(b"web/web: 192.0.2.1 unpinned from backend a", out)
        self.assertEqual(sorted(k for k, _, _ in admin.table.items()), [b"192.0.2.2", b"192.0.2.3"])
        self.assertTrue(any("unpinned" in e.get("log_format", "") and e.get("client") == "127.0.0.1"
                            for e in events))

    def test_clearTable(self):
        """DELETE /tables/NAME removes every entry and says how many."""
        admin = MemoryAdmin()
        out = admin.send(head(b"DELETE", b"/tables/web%2Fweb"))
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
        self.assertIn(b"3 entries removed", out)
        self.assertEqual(len(admin.table), 0)
        out = MemoryAdmin().send(head(b"DELETE", b"/tables"))
        self.assertTrue(out.startswith(b"HTTP/1.1 405 "), out)

    def assertDeleteRefused(self, admin, raw):
        out = admin.send(raw)
        self.assertTrue(out.startswith(b"HTTP/1.1 403 "), out)
        self.assertEqual(len(admin.table), 3)
        return out

    def test_crossSiteDeleteIsRefused(self):
        """A DELETE from another origin or site, or a browser's without X-SLB-Admin, changes nothing."""
        path = b"/tables/web%2Fweb/192.0.2.1"
        self.assertDeleteRefused(MemoryAdmin(), head(b"DELETE", path, Origin=b"http://attacker.example",
                                                     X_SLB_Admin=b"1"))
        self.assertDeleteRefused(MemoryAdmin(), head(b"DELETE", b"/tables/web%2Fweb", Sec_Fetch_Site=b"cross-site",
                                                     X_SLB_Admin=b"1"))
        self.assertDeleteRefused(MemoryAdmin(), head(b"DELETE", path, Origin=b"http://127.0.0.1:8404",
                                                     Sec_Fetch_Site=b"same-origin"))
        admin = MemoryAdmin()
        out = admin.send(head(b"DELETE", path, Origin=b"http://127.0.0.1:8404", Sec_Fetch_Site=b"same-origin",
                              X_SLB_Admin=b"1"))
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)

    def test_crossSiteReadOfTablesIsRefused(self):
        """A cross-site fetch of a table's entries is refused, as one of /stats is."""
        out = MemoryAdmin().send(head(b"GET", b"/tables/web%2Fweb", Sec_Fetch_Site=b"cross-site",
                                      Sec_Fetch_Mode=b"cors"))
        self.assertTrue(out.startswith(b"HTTP/1.1 403 "), out)
        self.assertNotIn(b"192.0.2.1", out)

    def test_deleteNeedsLoopbackOrToken(self):
        """Without a token a DELETE from another host is refused; with one, only with the token."""
        self.assertDeleteRefused(MemoryAdmin(peer="192.0.2.7"), head(b"DELETE", b"/tables/web%2Fweb"))
        self.assertDeleteRefused(MemoryAdmin(token="s3cret"), head(b"DELETE", b"/tables/web%2Fweb"))
        admin = MemoryAdmin(token="s3cret", peer="192.0.2.7")
        out = admin.send(head(b"DELETE", b"/tables/web%2Fweb", Authorization=b"Bearer s3cret"))
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
        self.assertEqual(len(admin.table), 0)

    def test_pinnedCountsInStatsMetricsAndPage(self):
        """Each backend's pinned clients are in /stats, in /metrics and on the page."""
        stats = self.get(MemoryAdmin(), b"/stats")
        self.assertEqual({b["name"]: b["pinned_clients"] for b in stats["groups"][0]["backends"]}, {"a": 2, "b": 1})
        self.assertEqual(stats["tables"][0]["entries"], 3)
        out = body_of(MemoryAdmin().send(head(b"GET", b"/metrics")))
        samples = {(s.name, s.labels.get("backend")): s.value
                   for family in text_string_to_metric_families(out.decode())
                   for s in family.samples}
        self.assertEqual(samples[("slb_backend_pinned_clients", "a")], 2)
        self.assertEqual(samples[("slb_backend_pinned_clients", "b")], 1)
        self.assertEqual(samples[("slb_backend_cookie_clients", "a")], 0)
        page = body_of(MemoryAdmin().send(head(b"GET", b"/")))
        self.assertIn(b"<th>pinned</th><th>cookie clients</th>", page)
        self.assertIn(b'<td class="num">2</td><td class="num">0</td>', page)
        self.assertIn(b'<a href="/tables/web%2Fweb"><code>web/web</code></a>', page)


SOURCE_IP_CONFIG = """
[admin]
bind = "tcp:0:interface=127.0.0.1"
token = "{token}"

[backends.web]
scheduler = "rr"
servers = [ {{ name = "a", address = "127.0.0.1:{a}" }}, {{ name = "b", address = "127.0.0.1:{b}" }} ]

[listeners.web]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "source_ip", timeout = 600 }}
"""


@implementer(IAgentEndpointFactory)
class FromSource:
    """Connections from one loopback address (127.0.0.N): a client of its own for source-IP persistence."""

    def __init__(self, source: str) -> None:
        self.source = source

    def endpointForURI(self, uri):
        return TCP4ClientEndpoint(reactor, uri.host.decode("ascii"), uri.port, bindAddress=(self.source, 0))


class TablesEndToEndTests(AdminCase):
    """The runtime tables API over real sockets: clients from 127.0.0.2-4 through a source_ip listener."""

    config = SOURCE_IP_CONFIG
    clients = ("127.0.0.2", "127.0.0.3", "127.0.0.4")

    @defer.inlineCallbacks
    def setUp(self):
        yield AdminCase.setUp(self)
        self.table = self.admin + "/tables/web%2Fweb"

    @defer.inlineCallbacks
    def visit(self, source):
        """One request from C{source}; the name of the backend that answered."""
        agent = Agent.usingEndpointFactory(reactor, FromSource(source))
        response = yield agent.request(b"GET", self.web.encode())
        body = yield readBody(response)
        return body.split()[0].split(b"=")[1].decode()

    @defer.inlineCallbacks
    def json(self, url):
        response, body = yield self.fetch(url)
        self.assertEqual(response.code, 200, body)
        return json.loads(body)

    @defer.inlineCallbacks
    def pinned(self):
        """backend name -> pinned clients, from /stats."""
        stats = yield self.json(self.admin + "/stats")
        return {b["name"]: b["pinned_clients"] for b in stats["groups"][0]["backends"]}

    @defer.inlineCallbacks
    def pin_three(self):
        pins = {}
        for source in self.clients:
            pins[source] = yield self.visit(source)
        return pins

    @defer.inlineCallbacks
    def test_listAndUnpin(self):
        """Three clients are listed with their backends; an unpinned one is balanced anew, the others stay."""
        pins = yield self.pin_three()
        self.assertEqual(set(pins.values()), {"a", "b"})
        (table,) = (yield self.json(self.admin + "/tables"))["tables"]
        self.assertEqual((table["name"], table["type"], table["routes"], table["entries"]),
                         ("web/web", "source_ip", ["web"], 3))
        doc = yield self.json(self.table)
        self.assertEqual({e["key"]: e["backend"] for e in doc["items"]}, pins)
        entry = yield self.json(self.table + "/127.0.0.2")
        self.assertEqual(entry["backend"], pins["127.0.0.2"])

        response, body = yield self.fetch(self.table + "/127.0.0.2", b"DELETE")
        self.assertEqual(response.code, 200, body)
        response, _ = yield self.fetch(self.table + "/127.0.0.2")
        self.assertEqual(response.code, 404)
        before = (yield self.json(self.admin + "/stats"))["listeners"][0]["persistence"]
        yield self.visit("127.0.0.2")
        self.assertEqual((yield self.visit("127.0.0.3")), pins["127.0.0.3"])
        after = (yield self.json(self.admin + "/stats"))["listeners"][0]["persistence"]
        self.assertEqual((after["new"] - before["new"], after["hit"] - before["hit"]), (1, 1))
        self.assertEqual((yield self.json(self.table))["entries"], 3)

    @defer.inlineCallbacks
    def test_countsFallAfterDrainAndClear(self):
        """After drain the drained backend's count falls as its clients are unpinned; clear empties the table."""
        pins = yield self.pin_three()
        counts = yield self.pinned()
        self.assertEqual(counts, {name: list(pins.values()).count(name) for name in "ab"})
        drained = pins["127.0.0.2"]
        response, _ = yield self.fetch(self.admin + f"/backends/web/{drained}/drain", b"POST")
        self.assertEqual(response.code, 200)
        mine = [e for e in (yield self.json(self.table + f"?backend={drained}"))["items"]]
        self.assertEqual(len(mine), counts[drained])
        for n, entry in enumerate(mine, 1):
            response, _ = yield self.fetch(self.admin + entry["url"], b"DELETE")
            self.assertEqual(response.code, 200)
            self.assertEqual((yield self.pinned())[drained], counts[drained] - n)
        metrics = (yield self.fetch(self.admin + "/metrics"))[1].decode()
        self.assertIn(f'slb_backend_pinned_clients{{backend="{drained}",group="web"}} 0.0', metrics)
        self.assertNotEqual((yield self.visit("127.0.0.2")), drained)  # balanced anew, not to the drained one
        response, body = yield self.fetch(self.table, b"DELETE")
        self.assertEqual(response.code, 200, body)
        self.assertEqual((yield self.pinned()), {"a": 0, "b": 0})
        self.assertEqual((yield self.json(self.table))["items"], [])
