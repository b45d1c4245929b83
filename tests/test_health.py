"""
Tests for L{twisted_slb.health}: the check state machine with a fake clock
and reactor, passive checks, and a real backend going down and up.
"""

from __future__ import annotations

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
from twisted_slb.config import HealthCheckConfig
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
        transport = self.run_check(0)
        self.assertTrue(transport.value().startswith(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:900"))

    def test_downAfterUnhealthyThreshold(self):
        a = self.group.get("a")
        for i in range(2):
            self.run_check(0, refuse=True)
            self.assertTrue(a.up)
        self.run_check(0, refuse=True)
        self.assertFalse(a.up)
        downs = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(downs), 1)

    def test_statusOutsideExpectIsFailure(self):
        a = self.group.get("a")
        for _ in range(3):
            self.run_check(0, b"500 Oops")
        self.assertFalse(a.up)
        self.assertIn("status 500", a.extra["health"].last_reason)

    def test_upAfterHealthyThreshold(self):
        a = self.group.get("a")
        a.up = False
        self.run_check(0, b"200 OK")
        self.assertFalse(a.up)
        self.run_check(0, b"204 No Content")
        self.assertTrue(a.up)

    def test_timeoutIsFailure(self):
        self.run_check(0)  # connected, never answers
        self.reactor.advance(1.0)
        self.assertEqual(self.group.get("a").extra["health"].last_reason, "no answer in 1 s")

    def test_stopCancelsEverything(self):
        self.run_check(0)
        self.monitor.stopService()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertIsNone(self.group.get("a").monitor)


class PassiveTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.group = group_of("a", "b")
        self.monitor = HealthMonitor(self.group, None, reactor=self.reactor, passive_threshold=3, cooldown=10)
        self.monitor.startService()
        self.addCleanup(self.monitor.stopService)
        self.a = self.group.get("a")

    def test_refusedConnectsTakeBackendOut(self):
        for _ in range(3):
            self.a.record_failure("connect refused")
        self.assertFalse(self.a.up)

    def test_successResetsTheCount(self):
        self.a.record_failure("x")
        self.a.record_failure("x")
        self.a.record_success()
        self.a.record_failure("x")
        self.assertTrue(self.a.up)

    def test_backAfterCooldownAndOutAgainOnNextFailure(self):
        for _ in range(3):
            self.a.record_failure("refused")
        self.reactor.advance(10)
        self.assertTrue(self.a.up)
        self.a.record_failure("refused")
        self.assertFalse(self.a.up)

    def test_noCooldownWithActiveChecks(self):
        monitor = HealthMonitor(self.group, HealthCheckConfig(), reactor=self.reactor, passive_threshold=1)
        monitor.startService()
        self.addCleanup(monitor.stopService)
        self.a.record_failure("refused")
        self.assertFalse(self.a.up)
        self.reactor.advance(monitor.cooldown + 1)
        self.assertEqual(self.a.extra["health"].down_by, "passive")


class HealthPage(Resource):
    isLeaf = True

    def render(self, request):
        return b"ok"


class EndToEndTests(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_backendGoesDownAndComesBack(self):
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


class SlowStartTests(SynchronousTestCase):
    def test_shareRampsAfterComingUp(self):
        """A backend back from down gets a tenth of its weight, growing to all of it."""
        reactor = MemoryReactorClock()
        group = group_of("a", "b")
        monitor = HealthMonitor(group, None, reactor=reactor, passive_threshold=1, cooldown=5, slow_start=10)
        monitor.startService()
        self.addCleanup(monitor.stopService)
        a = group.get("a")
        a.record_failure("refused")
        reactor.advance(5)  # cool-down over: up again, slowly
        self.assertTrue(a.up)
        self.assertEqual(a.share, 10.0)
        reactor.pump([1] * 5)
        self.assertEqual(a.share, 60.0)
        reactor.pump([1] * 5)
        self.assertEqual(a.share, 100.0)
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertEqual(a.weight, 100)  # the configured weight is never touched

    def test_schedulerHonoursTheShare(self):
        group = group_of("a", "b")
        group.get("a").ramp = 0.1
        from collections import Counter

        counts = Counter(group.choose("").name for _ in range(110))
        self.assertEqual(counts, {"a": 10, "b": 100})
