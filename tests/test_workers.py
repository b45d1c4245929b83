"""
C{workers = N}: a real twistd parent with two worker processes sharing the
listening sockets; cookie persistence holds whichever worker answers, and
SIGTERM stops them all.
"""

from __future__ import annotations

import os
import signal
import sys

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from tests.test_service import NamePage
from tests.test_twistd import Twistd

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
