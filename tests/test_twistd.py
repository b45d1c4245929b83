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
        self.assertIn("reactor class: twisted_slb._io.reactor.SLBEPollReactor.", proc.output)

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


ACCESS_CONFIG = """
[backends.web]
servers = [ {{ name = "a", address = "127.0.0.1:{port}" }} ]

[backends.echo]
servers = [ {{ name = "e", address = "127.0.0.1:{echo}" }} ]

[listeners.web]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"

[listeners.tcp]
protocol = "tcp"
bind = "tcp:0:interface=127.0.0.1"
backends = "echo"
"""

ACCESS_LINE = (r"^\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{{4}} \[twisted_slb\.access#info\] "
               r'web 127\.0\.0\.1 127\.0\.0\.1:{port} "GET /{i} HTTP/1\.1" 200 -> a persistence=none bytes=\d+ \d+\.\d{{3}}s$')


class TwistdAccessLogTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_noAccessLineLost(self):
        """
        Under twistd, the default access log writes straight to twistd's
        log, with twistd's own line format; every request's line is there
        by the time a SIGHUP reload is done (well before the 0.1 s a batch
        may wait when the requests are quick), and a connection still open at
        SIGTERM gets its line too, written while the process shuts down.
        """
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from tests.test_service import NameEcho

        class StaysOpen(protocol.Protocol):
            def __init__(self):
                self.first = defer.Deferred()

            def dataReceived(self, data):
                if not self.first.called:
                    self.first.callback(data)

        backend = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(NamePage("a")))
        self.addCleanup(backend.stopListening)
        echo_factory = protocol.ServerFactory.forProtocol(NameEcho)
        echo_factory.name = "e"
        echo = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(echo_factory)
        self.addCleanup(echo.stopListening)
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(ACCESS_CONFIG.format(port=backend.getHost().port, echo=echo.getHost().port))
        proc = Twistd()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        transport = reactor.spawnProcess(
            proc, twistd, [twistd, "--pidfile=", "-n", "slb", "--config", path], env=os.environ.copy()
        )
        self.addCleanup(lambda: proc.ended.called or transport.signalProcess("KILL"))
        web = yield proc.wait_for(r"listener web \(http\) listening on 127\.0\.0\.1:(\d+)", True)
        tcp = yield proc.wait_for(r"listener tcp \(tcp\) listening on 127\.0\.0\.1:(\d+)", True)
        web_port = web.group(1)
        agent = Agent(reactor)
        count = 20
        responses = yield defer.gatherResults(
            [agent.request(b"GET", f"http://127.0.0.1:{web_port}/{i}".encode()) for i in range(count)]
        )
        yield defer.gatherResults([readBody(r) for r in responses])
        client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", int(tcp.group(1))), StaysOpen())
        self.addCleanup(client.transport.abortConnection)
        yield client.first
        # The access log found twistd's file observer (not events).
        self.assertIn("access lines go to twistd's log, written in batches", proc.output)

        reloaded = proc.wait_for(r"configuration reloaded")
        transport.signalProcess("HUP")
        yield reloaded
        before_term = proc.output
        for i in range(count):
            self.assertRegex(before_term, re.compile(ACCESS_LINE.format(port=web_port, i=i), re.M))

        transport.signalProcess("TERM")
        yield proc.ended
        lines = [l for l in proc.output.splitlines() if "[twisted_slb.access#info]" in l]
        self.assertEqual(len([l for l in lines if " web " in l]), count)
        self.assertEqual(len([l for l in lines if " tcp 127.0.0.1 -> e " in l]), 1, proc.output)
