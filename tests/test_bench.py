"""
Smoke tests of the benchmark tools that need nothing installed: the
in-memory request-path benchmark runs and checks its answers, and the load
harness's CPU accounting reads /proc correctly.  The load harness itself
(wrk, HAProxy, nginx) is not run here: no timed test in the suite.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from bench import __main__ as harness
from bench import inproc


class InprocTests(SynchronousTestCase):
    def test_requestsGoThroughAndAreMeasured(self) -> None:
        """Each round is one proxied request, answered with a cookie; the figure is positive."""
        rig = inproc.Rig()
        rig.front.dataReceived(inproc.REQUEST)
        host, port, factory, _, _ = rig.reactor.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 8001))
        rig.reactor.tcpClients.clear()
        self.assertGreater(inproc.measure(requests=20, repeat=1, warmup=5), 0)

    def test_aBrokenAnswerIsAnError(self) -> None:
        """The rig refuses to measure a path that no longer answers 200: a benchmark of errors is worthless."""
        rig = inproc.Rig()
        self.patch(inproc, "RESPONSE", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
        self.assertRaises(RuntimeError, rig.one)


class CPUAccountingTests(SynchronousTestCase):
    def test_cpuSecondsGrows(self) -> None:
        """CPU time of this process, read from /proc, grows as it works."""
        before = harness.cpu_seconds(os.getpid())
        deadline = before + 0.05
        while harness.cpu_seconds(os.getpid()) < deadline:
            sum(range(10000))
        self.assertGreaterEqual(harness.cpu_seconds(os.getpid()), deadline)
        self.assertLessEqual(harness.cpu_seconds(os.getpid(), (12,)), harness.cpu_seconds(os.getpid()))

    def test_withCpuDividesByRequests(self) -> None:
        """with_cpu adds microseconds of CPU per request when the run reports its request count."""
        spent = iter([1.0, 0.25, 1.5, 0.5])  # total, kernel before; total, kernel after
        self.patch(harness, "cpu_seconds", lambda pid, kinds=(11, 12): next(spent))
        result = harness.with_cpu(1, lambda: {"rps": 10.0, "requests": 1000.0})()
        self.assertAlmostEqual(result["cpu_us"], 500.0)
        self.assertAlmostEqual(result["cpu_sys_share"], 0.5)
        spent = iter([1.0, 0.25, 1.5, 0.5])
        self.assertEqual(harness.with_cpu(1, lambda: {"mb_s": 1.0})(), {"mb_s": 1.0})
