"""
The benchmark harness's own tests (run by tests/test_bench.py, which does not
import bench: C{python -m twisted.trial bench.test_harness}): its CPU
accounting reads /proc correctly, the udp row configures both balancers
alike, and the https_h2 row reads h2load's figures.  The load harness itself (wrk, HAProxy, nginx) is not run here.
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


H2LOAD_OUTPUT = """starting benchmark...
spawning thread #0: 50 total client(s). Timing-based test with 0s of warm-up time and 5s of main duration for measurements.
TLS Protocol: TLSv1.3
Cipher: TLS_AES_256_GCM_SHA384
Server Temp Key: X25519 253 bits
Application protocol: h2
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 5.00s, 8130.20 req/s, 1.07MB/s
requests: 40651 total, 41151 started, 40651 done, 40640 succeeded, 11 failed, 11 errored, 0 timeout
status codes: 40640 2xx, 0 3xx, 0 4xx, 0 5xx
"""


class H2LoadTests(SynchronousTestCase):
    def run_with(self, out: str):
        from types import SimpleNamespace

        calls = []

        def run(argv, **kwargs):
            calls.append(argv)
            return SimpleNamespace(stdout=out)

        self.patch(harness.subprocess, "run", run)
        return calls, harness.h2load("https://127.0.0.1:1/", 5, 50, 10)

    def test_figuresRead(self) -> None:
        """The https_h2 row's figures: requests per second, requests succeeded and failed, from h2load's output."""
        calls, result = self.run_with(H2LOAD_OUTPUT)
        self.assertEqual(calls[0][1:], ["-t1", "-c50", "-m10", "-D5", "https://127.0.0.1:1/"])
        self.assertEqual(result, {"rps": 8130.2, "requests": 40640.0, "failed": 11.0, "non2xx": 0.0})

    def test_notHTTP2IsAnError(self) -> None:
        """A figure measured over HTTP/1.1 (no h2 negotiated) is refused: it would not be the row's."""
        self.assertRaises(RuntimeError, self.run_with,
                          H2LOAD_OUTPUT.replace("Application protocol: h2", "No protocol negotiated"))
