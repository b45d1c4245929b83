"""
The benchmark harness's own tests (run by tests/test_bench.py, which does not
import bench: C{python -m twisted.trial bench.test_harness}): its CPU
accounting reads /proc correctly, and the udp row configures both balancers
alike.  The load harness itself (wrk, HAProxy, nginx) is not run here.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from bench import __main__ as harness


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


class UDPRowTests(SynchronousTestCase):
    def test_bothBalancersAreConfiguredAlike(self):
        """The udp row gives nginx a udp listener hashing on the client address, and twisted_slb a valid udp listener with source-IP persistence over the same echo backends."""
        from types import SimpleNamespace

        from bench import udp
        from twisted_slb.config import parse_config

        conf = udp.nginx_stream_conf("/tmp/x", 5000, [5001, 5002], 30)
        self.assertIn("listen 127.0.0.1:5000 udp;", conf)
        self.assertIn("hash $remote_addr consistent; server 127.0.0.1:5001; server 127.0.0.1:5002;", conf)
        self.assertIn(f"load_module {udp.STREAM_MODULE};", conf)
        setup = SimpleNamespace(udp_backends=[5001, 5002], slb_udp=5000)
        config = parse_config(harness.Setup.slb_udp_config(setup))
        listener = config.listeners["udp"]
        self.assertEqual((listener.protocol, listener.bind, listener.persistence.type),
                         ("udp", "udp:5000:interface=127.0.0.1", "source_ip"))
        self.assertEqual([s.port for s in config.backends["udpecho"].servers], [5001, 5002])
