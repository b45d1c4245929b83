"""
C{workers = N}: a real twistd parent with two worker processes sharing the
listening sockets; cookie persistence holds whichever worker answers, and
SIGTERM stops them all.  Restart back-off is tested with a fake clock and fake
processes.
"""

from __future__ import annotations

import os
import signal
import sys

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from tests.test_service import NamePage
from tests.test_twistd import Twistd
from twisted_slb.config import Config
from twisted_slb.workers import WorkerPoolService

CONFIG = """
workers = 2

[backends.web]
servers = [ {{ name = "a", address = "127.0.0.1:{a}" }}, {{ name = "b", address = "127.0.0.1:{b}" }} ]

[listeners.web]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "insert_cookie" }}
"""

# Both workers' listening lines for one port, looked for in all the output:
# the second may arrive in the same chunk as the first, and a wait for it
# started once the first matched would never fire.
_LISTENING = r"listener web \(http\) listening on 127\.0\.0\.1:"
BOTH_LISTENING = _LISTENING + r"(\d+)[\s\S]*" + _LISTENING + r"\1\b"


class WorkersTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_twoWorkersServeWithPersistence(self):
        """
        With two worker processes, a client's cookie keeps it on one backend whichever worker accepts, and
        SIGTERM stops them cleanly.
        """
        ports = {}
        for name in "ab":
            port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(NamePage(name)))
            self.addCleanup(port.stopListening)
            ports[name] = port.getHost().port
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(CONFIG.format(**ports))
        proc = Twistd()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        transport = reactor.spawnProcess(proc, twistd, [twistd, "--pidfile=", "-n", "slb", "--config", path],
                                         env=os.environ.copy())
        self.addCleanup(lambda: proc.ended.called or transport.signalProcess("KILL"))
        yield proc.wait_for(r"worker 1 started", True)
        first = yield proc.wait_for(BOTH_LISTENING, True)
        url = f"http://127.0.0.1:{first.group(1)}/".encode()
        # A new connection per request, so that both workers get some.
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        response = yield agent.request(b"GET", url)
        body = yield readBody(response)
        cookie = [c for c in response.headers.getRawHeaders(b"set-cookie") if c.startswith(b"SERVERID=")][0]
        backend = body.split()[0]
        for _ in range(10):
            response = yield agent.request(b"GET", url, Headers({b"cookie": [cookie.split(b";")[0]]}))
            self.assertEqual((yield readBody(response)).split()[0], backend)
        transport.signalProcess("TERM")
        code, signum = yield proc.ended
        self.assertIn((code, signum), [(0, None), (None, signal.SIGTERM)])

    @defer.inlineCallbacks
    def test_workersExitWhenTheParentIsKilled(self):
        """A SIGKILLed parent leaves no worker serving on alone."""
        import re

        from twisted.internet.task import deferLater

        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(CONFIG.format(a=1, b=2))
        proc = Twistd()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        transport = reactor.spawnProcess(proc, twistd, [twistd, "--pidfile=", "-n", "slb", "--config", path],
                                         env=os.environ.copy())
        self.addCleanup(lambda: proc.ended.called or transport.signalProcess("KILL"))
        yield proc.wait_for(r"worker 1 started", True)
        yield proc.wait_for(BOTH_LISTENING, True)
        pids = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", proc.output)]
        self.assertEqual(len(pids), 2)
        transport.signalProcess("KILL")
        yield proc.ended

        def alive(pid: int) -> bool:
            try:
                with open(f"/proc/{pid}/status") as f:
                    return "\nState:\tZ" not in f.read()  # a zombie has exited
            except FileNotFoundError:
                return False

        for _ in range(400):  # at most 20 s
            if not any(alive(pid) for pid in pids):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual([pid for pid in pids if alive(pid)], [])


class _FakeProcess:
    """What L{WorkerPoolService} uses of a process transport."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list = []

    def signalProcess(self, signum) -> None:
        self.signals.append(signum)


class _SpawningClock(MemoryReactorClock):
    """A clock whose spawnProcess only records the worker it was asked for."""

    def __init__(self) -> None:
        MemoryReactorClock.__init__(self)
        self.spawned: list = []

    def spawnProcess(self, proto, executable, args, env=None, childFDs=None, **kw):
        transport = _FakeProcess(1000 + len(self.spawned))
        proto.makeConnection(transport)
        self.spawned.append(proto)
        return transport


class RestartTests(SynchronousTestCase):
    """Restarts of dead workers, with a fake clock and fake processes."""

    def setUp(self):
        self.clock = _SpawningClock()
        config = Config(path="slb.toml", backends={}, listeners={}, workers=2)
        self.pool = WorkerPoolService(config, reactor=self.clock, python="python3")
        self.pool.startService()
        self.assertEqual(len(self.clock.spawned), 2)

    def kill(self, index: int):
        """SIGKILL the running worker C{index}; return its protocol."""
        proto = [w for w in self.pool.workers if w.index == index][0]
        proto.processEnded(Failure(ProcessTerminated(signal=signal.SIGKILL)))
        return proto

    def running(self, index: int) -> int:
        return len([w for w in self.pool.workers if w.index == index])

    def test_healthyWorkerIsRestartedAtOnce(self):
        """A worker killed after a normal run is back without any delay, every time."""
        for _ in range(5):
            self.clock.advance(20)  # 20 s of healthy uptime, as in the issue
            self.kill(0)
            self.assertEqual(self.running(0), 0)
            self.clock.advance(0)
            self.assertEqual(self.running(0), 1)

    def test_bothKilledAreBackAtOnce(self):
        """Killing every worker (after normal runs) leaves the pool empty for no time at all."""
        self.clock.advance(20)
        for _ in range(5):
            self.kill(0)
            self.kill(1)
            self.clock.advance(0)
            self.assertEqual(len(self.pool.workers), 2)
            self.clock.advance(6)

    def test_crashLoopBacksOff(self):
        """A worker that keeps dying right after starting waits 1, 2, 4 ... up to 30 s."""
        delays = []
        for _ in range(8):
            self.clock.advance(0.5)  # dies half a second after starting
            self.kill(0)
            waited = 0.0
            while not self.running(0):
                self.clock.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0])

    def test_backOffResetsAfterHealthyUptime(self):
        """Once a crash-looping worker has run normally, its next death restarts it at once."""
        for _ in range(3):
            self.clock.advance(0.5)
            self.kill(0)
            self.clock.advance(30)
        self.clock.advance(self.pool.crash_window)  # now it runs normally
        self.kill(0)
        self.clock.advance(0)
        self.assertEqual(self.running(0), 1)
        self.clock.advance(0.5)  # and a new quick death starts the back-off from 1 s again
        self.kill(0)
        self.clock.advance(0.9)
        self.assertEqual(self.running(0), 0)
        self.clock.advance(0.1)
        self.assertEqual(self.running(0), 1)

    def test_backOffIsPerWorker(self):
        """One worker's crash loop neither delays the other's restart nor touches the other."""
        for _ in range(4):
            self.clock.advance(0.5)
            self.kill(0)
            self.clock.advance(30)
        other = [w for w in self.pool.workers if w.index == 1][0]
        self.clock.advance(10)
        self.kill(0)
        self.kill(1)
        self.clock.advance(0)
        self.assertEqual(self.running(1), 1)
        self.assertEqual(other.transport.signals, [])

    def test_othersKeepRunningWhileOneIsDown(self):
        """While a crash-looping worker waits, the other worker is neither signalled nor replaced."""
        other = [w for w in self.pool.workers if w.index == 1][0]
        self.clock.advance(0.5)
        self.kill(0)
        self.assertEqual(self.pool.workers, [other])
        self.assertEqual(other.transport.signals, [])
        self.assertEqual(len(self.clock.spawned), 2)

    def test_noRestartWhileStopping(self):
        """A worker that ends during shutdown is not restarted."""
        self.clock.advance(20)
        self.pool.stopService()
        self.kill(0)
        self.clock.advance(60)
        self.assertEqual(self.running(0), 0)
