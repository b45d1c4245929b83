"""
Smoke tests of the benchmark tools through their command lines (the suite
does not import C{bench}, which is not installed): the in-memory
request-path benchmark runs and checks its answers, and the harness's own
tests (CPU accounting read from /proc, the udp row's configurations) pass.
The load harness itself (wrk, HAProxy, nginx) is not run here: no timed test
in the suite.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchCommandTests(TestCase):
    timeout = 60

    def run_bench(self, *args: str):
        """C{python args...} from the checkout's root, the checkout first on the path: (out, err, exit code)."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        return getProcessOutputAndValue(sys.executable, args, env=env, path=ROOT)

    @defer.inlineCallbacks
    def test_inprocMeasuresProxiedRequests(self) -> None:
        """python -m bench.inproc proxies its requests (each answered 200, or it stops) and prints a positive figure."""
        out, err, code = yield self.run_bench("-m", "bench.inproc", "--requests", "20", "--repeat", "1",
                                              "--warmup", "5")
        self.assertEqual(code, 0, err)
        figure = float(out.split()[0])
        self.assertGreater(figure, 0)
        self.assertIn(b"us of CPU per proxied request", out)

    @defer.inlineCallbacks
    def test_inprocRefusesABrokenAnswer(self) -> None:
        """The benchmark refuses to measure a path that no longer answers 200: a benchmark of errors is worthless."""
        broken = self.mktemp()
        with open(broken, "wb") as f:
            f.write(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
        out, err, code = yield self.run_bench("-m", "bench.inproc", "--requests", "5", "--repeat", "1",
                                              "--warmup", "1", "--response", os.path.abspath(broken))
        self.assertEqual(code, 1)
        self.assertIn(b"bench.inproc: unexpected answer: b'HTTP/1.1 502", err)
        self.assertEqual(out, b"")

    @defer.inlineCallbacks
    def test_harnessOwnTestsPass(self) -> None:
        """The harness's own tests (bench/test_harness.py: CPU accounting, the udp row's configurations) pass."""
        out, err, code = yield self.run_bench("-m", "twisted.trial", "--temp-directory",
                                              os.path.abspath(self.mktemp()), "bench.test_harness")
        self.assertEqual(code, 0, out + err)
        self.assertRegex(out, rb"PASSED \(successes=5\)")
