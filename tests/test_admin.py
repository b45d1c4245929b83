"""
Tests for the admin listener (L{twisted_slb.admin}) through a real
L{BalancerService}: /stats, /metrics, the HTML page and the drain API.
"""

from __future__ import annotations

import json
import os

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from tests.test_service import NamePage
from twisted_slb.admin import BackendAction, render_page
from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.config import load_config
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

    @defer.inlineCallbacks
    def setUp(self):
        ports = {}
        for name in "ab":
            port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(NamePage(name)))
            self.addCleanup(port.stopListening)
            ports[name] = port.getHost().port
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(CONFIG.format(token=self.token, **ports))
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
        _, body = yield self.fetch(self.admin + "/")
        self.assertIn(b"<h2>Group web", body)
        self.assertIn(b"class='state up'", body)

    @defer.inlineCallbacks
    def test_drainFromLoopback(self):
        response, body = yield self.fetch(self.admin + "/backends/web/a/drain", b"POST")
        self.assertEqual(response.code, 200)
        a = self.service.groups["web"].get("a")
        self.assertEqual((a.state, a.admin_state, a.weight), ("drain", "drain", 100))
        response, _ = yield self.fetch(self.admin + "/backends/web/a/enable", b"POST")
        self.assertEqual((a.state, a.admin_state), ("up", "ready"))

    @defer.inlineCallbacks
    def test_unknownBackendIs404AndGetIs405(self):
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


class RemoteClientTests(SynchronousTestCase):
    def test_nonLoopbackRefusedWithoutToken(self):
        from twisted.web.test.requesthelper import DummyRequest
        from twisted.internet.address import IPv4Address

        group = BackendGroup("web", [Backend("a", "10.0.0.1", 80)])
        action = BackendAction(StatsRegistry({"web": group}), token="")
        request = DummyRequest([b"web", b"a", b"drain"])
        request.method = b"POST"
        request.client = IPv4Address("TCP", "192.0.2.7", 5555)
        body = action.render_POST(request)
        self.assertEqual(request.responseCode, 403)
        self.assertIn(b"loopback", body)
        self.assertEqual(group.get("a").weight, 100)


class PageTests(SynchronousTestCase):
    def test_namesAreEscaped(self):
        group = BackendGroup("w<b>", [Backend("b<i>", "10.0.0.1", 80)])
        page = render_page(StatsRegistry({"w": group}).snapshot())
        self.assertIn(b"b&lt;i&gt;", page)
        self.assertNotIn(b"<i>", page)

    def test_downAndDrainColours(self):
        group = BackendGroup("web", [Backend("a", "10.0.0.1", 80, weight=0), Backend("b", "10.0.0.2", 80)])
        group.get("b").up = False
        page = render_page(StatsRegistry({"web": group}).snapshot())
        self.assertIn(b"class='state drain'", page)
        self.assertIn(b"class='state down'", page)
        self.assertIn(b"http-equiv=refresh", page)


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
        self.action = BackendAction(StatsRegistry({"web": self.group}), "")
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
