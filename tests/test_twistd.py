"""
The real C{twistd slb} process: it starts from a config file, reloads on
SIGHUP (keeping the old config when the new one is broken), and stops on
SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody
from twisted.web.server import Site

from tests.test_service import NamePage

CONFIG = """
[admin]
bind = "tcp:0:interface=127.0.0.1"

[backends.web]
servers = [ {{ name = "a", address = "127.0.0.1:{port}", weight = {weight} }} ]

[listeners.web]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "insert_cookie" }}
"""


class Twistd(protocol.ProcessProtocol):
    """Collects the output and fires Deferreds when a pattern appears."""

    def __init__(self) -> None:
        self.output = ""
        self.waits = []
        self.ended: defer.Deferred = defer.Deferred()

    def wait_for(self, pattern: str, anywhere: bool = False) -> defer.Deferred:
        """Fires with the match of C{pattern} in output from now on (or ever)."""
        d = defer.Deferred()
        self.waits.append((re.compile(pattern), d, 0 if anywhere else len(self.output)))
        self._check()
        return d

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")
        self._check()

    errReceived = outReceived

    def _check(self) -> None:
        for item in list(self.waits):
            pattern, d, start = item
            m = pattern.search(self.output, start)
            if m:
                self.waits.remove(item)
                d.callback(m)

    def processEnded(self, reason) -> None:
        for pattern, d, _ in self.waits:
            d.errback(AssertionError(f"twistd ended before {pattern.pattern!r}:\n{self.output}"))
        self.waits = []
        self.ended.callback((reason.value.exitCode, reason.value.signal))


class TwistdTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_reloadAndStop(self):
        """
        twistd slb serves, applies a valid configuration on SIGHUP, keeps running on an invalid one, stops
        cleanly on SIGTERM, and runs twisted_slb's reactor.
        """
        backend = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(NamePage("a")))
        self.addCleanup(backend.stopListening)
        path = os.path.abspath(self.mktemp() + ".toml")

        def write(weight, extra=""):
            with open(path, "w") as f:
                f.write(CONFIG.format(port=backend.getHost().port, weight=weight) + extra)

        write(100)
        proc = Twistd()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        transport = reactor.spawnProcess(
            proc, twistd, [twistd, "--pidfile=", "-n", "slb", "--config", path], env=os.environ.copy()
        )
        self.addCleanup(lambda: proc.ended.called or transport.signalProcess("KILL"))
        admin = yield proc.wait_for(r"listener \[admin\] \(admin\) listening on 127\.0\.0\.1:(\d+)", True)
        web = yield proc.wait_for(r"listener web \(http\) listening on 127\.0\.0\.1:(\d+)", True)
        agent = Agent(reactor)

        @defer.inlineCallbacks
        def weight():
            response = yield agent.request(b"GET", f"http://127.0.0.1:{admin.group(1)}/stats".encode())
            doc = json.loads((yield readBody(response)))
            return doc["groups"][0]["backends"][0]["weight"]

        self.assertEqual((yield weight()), 100)
        write(7)
        reloaded = proc.wait_for(r"configuration reloaded")
        transport.signalProcess("HUP")
        yield reloaded
        self.assertEqual((yield weight()), 7)

        write(7, extra="\n[listeners.bad]\nprotocol = 'ftp'\n")
        failed = proc.wait_for(r"reload failed, keeping the running configuration: .*listeners\.bad\.protocol")
        transport.signalProcess("HUP")
        yield failed
        self.assertEqual((yield weight()), 7)
        response = yield agent.request(b"GET", f"http://127.0.0.1:{web.group(1)}/".encode())
        self.assertEqual(response.code, 200)
        yield readBody(response)

        transport.signalProcess("TERM")
        code, signum = yield proc.ended
        # twistd ends by re-raising the signal it stopped for, after a clean
        # shutdown of every service.
        self.assertIn((code, signum), [(0, None), (None, signal.SIGTERM)])
        self.assertIn("Server Shut Down.", proc.output)
        # twistd slb runs twisted_slb's reactor when none was chosen.
        self.assertIn("reactor class: twisted_slb.reactor.SLBEPollReactor.", proc.output)

    @defer.inlineCallbacks
    def test_sighupWithBrokenCAChangesNothing(self):
        """
        SIGHUP with a file that sets the weight to 0 and names a non-PEM
        C{tls.ca}: twistd logs one "reload failed" line naming the field, no
        traceback, and the weight stays what it was.
        """
        backend = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(NamePage("a")))
        self.addCleanup(backend.stopListening)
        path = os.path.abspath(self.mktemp() + ".toml")
        ca = path + ".ca.pem"
        with open(ca, "w") as f:
            f.write("not PEM\n")
        with open(path, "w") as f:
            f.write(CONFIG.format(port=backend.getHost().port, weight=100))
        proc = Twistd()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        transport = reactor.spawnProcess(
            proc, twistd, [twistd, "--pidfile=", "-n", "slb", "--config", path], env=os.environ.copy()
        )
        self.addCleanup(lambda: proc.ended.called or transport.signalProcess("KILL"))
        admin = yield proc.wait_for(r"listener \[admin\] \(admin\) listening on 127\.0\.0\.1:(\d+)", True)
        yield proc.wait_for(r"listener web \(http\) listening on", True)
        stats = f"http://127.0.0.1:{admin.group(1)}/stats".encode()

        @defer.inlineCallbacks
        def weight():
            response = yield Agent(reactor).request(b"GET", stats)
            doc = json.loads((yield readBody(response)))
            return doc["groups"][0]["backends"][0]["weight"]

        # An answer also means the services started, the SIGHUP handler too.
        self.assertEqual((yield weight()), 100)
        with open(path, "w") as f:
            f.write(CONFIG.format(port=backend.getHost().port, weight=0).replace(
                "\n[listeners.web]", f'tls = {{ ca = "{ca}" }}\n\n[listeners.web]'))
        failed = proc.wait_for(r"reload failed, keeping the running configuration: .*backends\.web\.tls\.ca: .*"
                               r"is not a PEM certificate file")
        transport.signalProcess("HUP")
        yield failed
        self.assertEqual((yield weight()), 100)
        self.assertNotIn("Traceback", proc.output)
        self.assertEqual(proc.output.count("reload failed"), 1)
        transport.signalProcess("TERM")
        yield proc.ended
