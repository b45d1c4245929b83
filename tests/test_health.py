"""
Tests for L{twisted_slb.health}: the check state machine with a fake clock
and reactor, passive checks, and a real backend going down and up.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.config import HealthCheckConfig, PassiveHealthConfig
from twisted_slb.health import HealthMonitor


def group_of(*names) -> BackendGroup:
    return BackendGroup("web", [Backend(n, "127.0.0.1", 9000 + i) for i, n in enumerate(names)])


class StateMachineTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.group = group_of("a", "b")
        self.config = HealthCheckConfig(type="http", path="/health", interval=2, timeout=1,
                                        healthy_threshold=2, unhealthy_threshold=3)
        self.randoms = iter([0.25, 0.75] * 10)
        self.monitor = HealthMonitor(self.group, self.config, reactor=self.reactor,
                                     random=lambda: next(self.randoms))
        self.events = []
        observer = lambda e: self.events.append(e) if e.get("log_namespace") == "twisted_slb.health" else None
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.monitor.startService()
        self.addCleanup(self.monitor.stopService)

    def run_check(self, index: int, status: bytes = None, refuse: bool = False):
        """Let the next check of backend C{index} happen and answer it."""
        while True:
            before = len(self.reactor.tcpClients)
            while len(self.reactor.tcpClients) == before:
                self.reactor.advance(0.25)
            host, port, factory, timeout, _ = self.reactor.tcpClients[-1]
            if port == 9000 + index:
                break
            # A check of the other backend: it passes.
            other = factory.buildProtocol(None)
            other.makeConnection(StringTransport())
            other.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        if refuse:
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
            return factory
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        if status is not None:
            proto.dataReceived(b"HTTP/1.1 " + status + b"\r\n\r\n")
        return transport

    def test_firstChecksAreJittered(self):
        """Each backend's first check waits a random part of the interval."""
        delays = sorted(call.getTime() for call in self.reactor.getDelayedCalls())
        self.assertEqual(delays, [0.5, 1.5])

    def test_requestSent(self):
        """An http check is a GET of its path, naming the backend's address as Host."""
        transport = self.run_check(0)
        head = transport.value()
        self.assertTrue(head.startswith(b"GET /health HTTP/1.1\r\n"))
        self.assertIn(b"\r\nHost: 127.0.0.1:9000\r\n", head)

    def test_downAfterUnhealthyThreshold(self):
        """A backend goes down after unhealthy_threshold failed checks in a row, not before, with one warning."""
        a = self.group.get("a")
        for i in range(2):
            self.run_check(0, refuse=True)
            self.assertTrue(a.up)
        self.run_check(0, refuse=True)
        self.assertFalse(a.up)
        downs = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(downs), 1)

    def test_statusOutsideExpectIsFailure(self):
        """A check answered with a status outside the expected ones fails, and the reason names the status."""
        a = self.group.get("a")
        for _ in range(3):
            self.run_check(0, b"500 Oops")
        self.assertFalse(a.up)
        self.assertIn("status 500", a.extra["health"].last_reason)

    def test_upAfterHealthyThreshold(self):
        """A down backend comes up after healthy_threshold passing checks (any 2xx), not before."""
        a = self.group.get("a")
        a.up = False
        self.run_check(0, b"200 OK")
        self.assertFalse(a.up)
        self.run_check(0, b"204 No Content")
        self.assertTrue(a.up)

    def test_timeoutIsFailure(self):
        """A check with no answer within its timeout fails, saying so."""
        self.run_check(0)  # connected, never answers
        self.reactor.advance(1.0)
        self.assertEqual(self.group.get("a").extra["health"].last_reason, "no answer in 1 s")

    def test_stopCancelsEverything(self):
        """Stopping the monitor cancels its timers and detaches it from the backends."""
        self.run_check(0)
        self.monitor.stopService()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertIsNone(self.group.get("a").monitor)


class PassiveTests(SynchronousTestCase):
    """Outlier detection (passive checks) with a fake clock."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.group = group_of("a", "b")
        self.monitor = self.start(self.group, PassiveHealthConfig())
        self.a = self.group.get("a")

    def start(self, group, passive, config=None):
        monitor = HealthMonitor(group, config, reactor=self.reactor, passive=passive)
        monitor.startService()
        self.addCleanup(monitor.stopService)
        return monitor

    def refuse(self, backend, times=3):
        for _ in range(times):
            backend.record_failure("connect connection refused")

    def test_refusedConnectsEject(self):
        """Three failed connects in a row eject the backend; the operator's state is untouched."""
        self.refuse(self.a, 2)
        self.assertTrue(self.a.up)
        self.refuse(self.a, 1)
        self.assertEqual((self.a.up, self.a.ejected, self.a.health_state, self.a.admin_state),
                         (False, True, "down", "ready"))

    def test_successResetsTheCount(self):
        """A success between failed connects starts the count again."""
        self.refuse(self.a, 2)
        self.a.record_success()
        self.refuse(self.a, 2)
        self.assertTrue(self.a.up)

    def test_requestFailuresAreJudgedByRate(self):
        """Failed requests (not connects) never eject by count, only by rate over min_requests."""
        for _ in range(19):
            self.a.record_failure("connection reset mid-response")
        self.assertFalse(self.a.ejected)
        self.a.record_failure("connection reset mid-response")  # 20 seen, all failed
        self.assertTrue(self.a.ejected)

    def test_failureRateEjects(self):
        """Half of 20 or more recent requests failing ejects the backend."""
        for i in range(20):
            self.a.record_success()
            if i % 3 == 0:
                self.a.record_failure("connection reset mid-response")
        self.a.record_failure("response timed out")
        self.a.record_failure("response timed out")
        self.assertFalse(self.a.ejected)  # 9 of 20 requests failed: 45%
        self.a.record_failure("response timed out")
        self.assertTrue(self.a.ejected)  # 10 of 20: 50%

    def test_oldFailuresAgeOut(self):
        """Failures older than two intervals no longer count towards the rate."""
        for _ in range(19):
            self.a.record_failure("reset")
        self.reactor.advance(20)
        self.a.record_failure("reset")
        self.assertFalse(self.a.ejected)

    def test_ejectionGrowsWithRepeatsAndDecays(self):
        """Ejections last 10, 20, 30 s while they repeat; time back in brings it down again."""
        lengths = []
        for _ in range(3):
            self.refuse(self.a)
            start = self.reactor.seconds()
            while self.a.ejected:
                self.reactor.advance(1)
            lengths.append(self.reactor.seconds() - start)
        self.assertEqual(lengths, [10, 20, 30])
        self.reactor.advance(20)  # two intervals back in: 3 -> 1
        self.refuse(self.a)
        self.assertEqual(self.a.extra["health"].ejection_count, 2)
        self.reactor.advance(20)
        self.reactor.advance(40)  # four intervals back in: 2 -> 0
        self.refuse(self.a)
        self.assertEqual(self.a.extra["health"].ejection_count, 1)

    def test_ejectionIsCapped(self):
        """No ejection lasts longer than max_ejection_time."""
        self.monitor.passive = PassiveHealthConfig(base_ejection_time=10, max_ejection_time=25)
        for expected in (10, 20, 25, 25):
            self.refuse(self.a)
            self.assertEqual(self.a.extra["health"].ejected_until - self.reactor.seconds(), expected)
            self.reactor.advance(expected)
            self.assertFalse(self.a.ejected)

    def test_returnIsNotOneStrike(self):
        """A backend back from an ejection needs a whole new run of failures to go out again."""
        self.refuse(self.a)
        self.reactor.advance(10)
        self.assertTrue(self.a.up)
        self.refuse(self.a, 2)
        self.assertTrue(self.a.up)

    def test_returnRampsUp(self):
        """A returning backend starts at a tenth of its weight and ramps up over passive.slow_start."""
        self.refuse(self.a)
        self.reactor.advance(10)
        self.assertEqual(self.a.share, 10.0)
        self.reactor.pump([1] * 5)
        self.assertEqual(self.a.share, 60.0)
        self.reactor.pump([1] * 5)
        self.assertEqual(self.a.share, 100.0)

    def test_maxEjectionPercent(self):
        """At most max_ejection_percent of a group is ejected, at least one backend, never all."""
        group = group_of("a", "b", "c", "d", "e")
        self.start(group, PassiveHealthConfig(max_ejection_percent=50))
        for b in group.backends:
            self.refuse(b)
        self.assertEqual([b.ejected for b in group.backends], [True, True, False, False, False])
        self.reactor.advance(10)
        self.assertEqual([b.ejected for b in group.backends], [False] * 5)

    def test_neverTheWholeGroup(self):
        """A group's last usable backend is never ejected, whatever max_ejection_percent says."""
        solo = group_of("a")
        self.start(solo, PassiveHealthConfig(max_ejection_percent=100))
        self.refuse(solo.backends[0], 10)
        self.assertTrue(solo.backends[0].up)
        b = self.group.get("b")
        b.up = False  # the other one is down by active checks
        self.refuse(self.a, 10)
        self.assertTrue(self.a.up)

    def test_ejectionEndsWithActiveChecksToo(self):
        """An ejection has its own timer; the active checks' verdict is kept apart from it."""
        monitor = self.start(self.group, PassiveHealthConfig(), HealthCheckConfig(interval=1000))
        self.refuse(self.a)
        self.assertEqual(self.a.extra["health"].down_by, "passive")
        monitor._mark(self.a, False, "checks failed")
        self.reactor.advance(10)
        self.assertFalse(self.a.ejected)
        self.assertFalse(self.a.up)  # still down by the active checks
        self.assertEqual(self.a.extra["health"].down_by, "active")

    def test_snapshot(self):
        """The passive view for /stats: ejected, for how long, how often, and the recent rate."""
        self.a.record_success()
        self.refuse(self.a)
        self.reactor.advance(4)
        snap = self.monitor.passive_snapshot(self.a)
        self.assertEqual((snap["ejected"], snap["ejected_for"], snap["ejections"], snap["ejection_multiplier"]),
                         (True, 6.0, 1, 1))
        self.assertEqual(snap["recent_failure_rate"], 75.0)
        self.assertIn("3 failed connects in a row", snap["last_ejection_reason"])


def drive(reactor, backend, seconds, rate, fails, http=True):
    """
    Offer C{backend} C{rate} requests a second for C{seconds}, as a proxy does
    (each request it may take reports success, then perhaps failure), and
    return the share of the time it was out.

    @param fails: called with the time, returns C{None} (the request
        succeeds), C{"connect"} (the connect fails) or C{"reset"} (the
        response breaks after its head).
    """
    out = 0
    steps = int(seconds * rate)
    for _ in range(steps):
        reactor.advance(1.0 / rate)
        if not backend.takes_new_clients:
            out += 1
            continue
        what = fails(reactor.seconds())
        if what == "connect":
            backend.record_failure("connect connection refused")
        elif what == "early":
            backend.record_failure("connection closed before the response head")
        else:
            backend.record_success()
            if what == "reset":
                backend.record_failure("connection reset mid-response")
    return out / steps


class IssueCasesTests(SynchronousTestCase):
    """The two cases of issue 29, with the default settings and a fake clock."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.group = group_of("a", "b")
        self.monitor = HealthMonitor(self.group, None, reactor=self.reactor, passive=PassiveHealthConfig())
        self.monitor.startService()
        self.addCleanup(self.monitor.stopService)

    def test_tenPercentResetsStayIn(self):
        """A backend that breaks 10% of its connections at 200 requests/s (half before the response head,
        half after) is not kept out (the old three-in-a-row rule kept it out ~90% of the time)."""
        import random

        rng = random.Random(29)
        a = self.group.get("a")

        def fails(t):
            x = rng.random()
            return "early" if x < 0.05 else "reset" if x < 0.1 else None

        out = drive(self.reactor, a, 600, 200, fails)
        self.assertLess(out, 0.01)
        self.assertEqual(a.extra["health"].ejections, 0)

    def test_mostlyFailingBackendIsEjected(self):
        """The same backend breaking 60% of its responses is ejected most of the time."""
        import random

        rng = random.Random(29)
        a = self.group.get("a")
        out = drive(self.reactor, a, 600, 200, lambda t: "reset" if rng.random() < 0.6 else None)
        self.assertGreater(out, 0.8)

    def test_flappingBackendComesBack(self):
        """Refusing every other 2 s with no active checks, it is given back again and again, serves, and
        stays in once it stops flapping."""
        a = self.group.get("a")
        served = []

        def flap(t):
            if int(t // 2) % 2:
                return "connect"
            served.append(t)
            return None

        drive(self.reactor, a, 600, 20, flap)
        state = a.extra["health"]
        self.assertGreater(state.ejections, 10)
        returns = [t for t in served if t > 60]
        self.assertGreater(len(returns), 20)  # it came back and served after the first minute
        # Healthy from now on: back for good once the current ejection ends.
        while a.ejected:
            self.reactor.advance(1)
        out = drive(self.reactor, a, 600, 20, lambda t: None)
        self.assertEqual(out, 0.0)
        self.assertEqual(self.monitor.passive_snapshot(a)["ejection_multiplier"], 0)


class HealthPage(Resource):
    isLeaf = True

    def __init__(self, requests=None) -> None:
        Resource.__init__(self)
        self.requests = requests if requests is not None else []

    def render(self, request):
        self.requests.append(request.path)
        return b"ok"


class EndToEndTests(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_backendGoesDownAndComesBack(self):
        """Over real sockets, a backend whose port closes is marked down, and up again when it listens again."""
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(HealthPage()))
        number = port.getHost().port
        group = BackendGroup("web", [Backend("a", "127.0.0.1", number)])
        config = HealthCheckConfig(type="http", path="/health", interval=0.05, timeout=1,
                                   healthy_threshold=1, unhealthy_threshold=1)
        monitor = HealthMonitor(group, config, reactor=reactor)
        monitor.startService()
        self.addCleanup(monitor.stopService)
        a = group.get("a")
        yield port.stopListening()
        yield monitor.when(a, up=False)
        port = yield TCP4ServerEndpoint(reactor, number, interface="127.0.0.1").listen(Site(HealthPage()))
        self.addCleanup(port.stopListening)
        yield monitor.when(a, up=True)
        self.assertTrue(a.up)


TLS_CHECKED = """
[backends.secure]
tls = {{ verify = true, ca = "{ca}", server_name = "{name}" }}
health_check = {{ type = "http", path = "/health", interval = 0.05, timeout = 2, healthy_threshold = 1, unhealthy_threshold = 1 }}
servers = [ {{ name = "a", address = "127.0.0.1:{port}" }} ]

[listeners.web]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "secure"
"""


class TLSCheckTests(TestCase):
    """http checks of a group with C{tls} speak TLS to the backend, as the proxy does."""

    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        from twisted.internet import ssl
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from tests.certs import CertificateAuthority, cert_pem, key_pem

        self.dir = os.path.abspath(self.mktemp())
        ca = CertificateAuthority()
        self.ca_path = ca.write(self.dir)
        issued = ca.issue(["backend.internal"])
        options = ssl.PrivateCertificate.loadPEM(key_pem(issued.key) + cert_pem(issued.certificate)).options()
        self.server_names = []
        options.getContext().set_tlsext_servername_callback(
            lambda connection: self.server_names.append(connection.get_servername()))
        self.requests = []
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            TLSMemoryBIOFactory(options, False, Site(HealthPage(self.requests))))
        self.addCleanup(port.stopListening)
        self.backend_port = port.getHost().port

    def start(self, name: str):
        from twisted_slb.config import load_config
        from twisted_slb.service import BalancerService

        path = os.path.join(self.dir, "slb.toml")
        with open(path, "w") as f:
            f.write(TLS_CHECKED.format(ca=self.ca_path, name=name, port=self.backend_port))
        service = BalancerService(load_config(path), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        backend = service.groups["secure"].get("a")
        return service.getServiceNamed("health:secure"), backend

    @defer.inlineCallbacks
    def test_checkSpeaksTLSWithTheGroupsServerName(self):
        """
        The check's TLS handshake sends the group's C{server_name} (SNI) and
        verifies the certificate against the group's C{ca}; the GET inside
        passes, and the backend stays up.
        """
        monitor, backend = self.start("backend.internal")
        monitor._mark(backend, False, "marked down by the test: only a passing check brings it up")
        yield monitor.when(backend, up=True)
        state = backend.extra["health"]
        self.assertEqual((state.last_status, state.last_reason), ("ok", "status 200"))
        self.assertTrue(backend.up)
        self.assertIn(b"backend.internal", self.server_names)
        self.assertIn(b"/health", self.requests)

    @defer.inlineCallbacks
    def test_checkVerifiesTheCertificate(self):
        """A certificate that does not name C{server_name} fails the check: the backend goes down."""
        monitor, backend = self.start("other.internal")
        yield monitor.when(backend, up=False)
        self.assertEqual(self.requests, [])
        self.assertIn("no response", backend.extra["health"].last_reason)
        self.flushLoggedErrors()


class SlowStartTests(SynchronousTestCase):
    def test_shareRampsAfterComingUp(self):
        """A backend back up by active checks gets a tenth of its weight, growing to all of it."""
        reactor = MemoryReactorClock()
        group = group_of("a", "b")
        monitor = HealthMonitor(group, HealthCheckConfig(interval=1000), reactor=reactor, slow_start=10)
        monitor.startService()
        self.addCleanup(monitor.stopService)
        a = group.get("a")
        monitor._mark(a, False, "checks failed")
        monitor._mark(a, True, "checks passed")
        self.assertTrue(a.up)
        self.assertEqual(a.share, 10.0)
        reactor.pump([1] * 5)
        self.assertEqual(a.share, 60.0)
        reactor.pump([1] * 5)
        self.assertEqual(a.share, 100.0)
        self.assertEqual(monitor._ramps, {})
        self.assertEqual(a.weight, 100)  # the configured weight is never touched

    def test_schedulerHonoursTheShare(self):
        """A backend ramping up at 10% gets a tenth of the share of a full one."""
        group = group_of("a", "b")
        group.get("a").ramp = 0.1
        from collections import Counter

        counts = Counter(group.choose("").name for _ in range(110))
        self.assertEqual(counts, {"a": 10, "b": 100})
