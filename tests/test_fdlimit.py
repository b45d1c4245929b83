"""
A real twistd process with a lowered file descriptor limit (C{ulimit -n 40}):
when descriptors run out, the listener logs it once per episode (not once
per refused client), pauses accepting so that new clients wait in the
backlog, keeps serving the clients it has, and serves new clients once
descriptors free up.

Twisted alone (see L{twisted_slb._io.accept}) logs C{EMFILE recovery: Closed
socket from ...} for every client it accepts and closes while out of
descriptors; that line must not reach the log.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import List

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.test_twistd import Twistd

CONFIG = """
[backends.t]
servers = [ {{ name = "a", address = "127.0.0.1:{port}" }} ]

[listeners.t]
protocol = "tcp"
bind = "tcp:0:interface=127.0.0.1"
backends = "t"
access_log = false
"""

LIMIT = 40
CLIENTS = 45


class Greeter(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.open.append(self)
        self.transport.write(b"hi\n")

    def connectionLost(self, reason) -> None:
        self.factory.open.remove(self)


class Client(protocol.Protocol):
    """Fires C{done} with True when greeted, False when closed first."""

    greeted = False

    def __init__(self) -> None:
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.done.called:
            self.greeted = True
            self.done.callback(True)

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            self.done.callback(False)


class FileDescriptorLimitTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def poll(self, condition, what: str, output: Twistd, tries: int = 200):
        """Wait (at most C{tries} times 50 ms) until C{condition()} is true."""
        for _ in range(tries):
            if condition():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"{what}: not after {tries * 0.05:.0f} s; twistd said:\n{output.output}")

    @defer.inlineCallbacks
    def test_outOfDescriptorsIsLoggedOnceAndRecovers(self):
        """
        A twistd slb out of file descriptors warns once per episode (not once per client), answers or closes
        the waiting clients, serves new ones once descriptors free up, and stops cleanly.
        """
        backend_factory = protocol.ServerFactory.forProtocol(Greeter)
        backend_factory.open = []
        backend = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(backend_factory)
        self.addCleanup(backend.stopListening)
        self.addCleanup(lambda: [g.transport.abortConnection() for g in list(backend_factory.open)])
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(CONFIG.format(port=backend.getHost().port))
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        # Only the twistd process gets the low limit, set before it execs.
        launcher = (
            "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({LIMIT}, {LIMIT})); "
            "os.execv(sys.argv[1], sys.argv[1:])"
        )
        proc = Twistd()
        transport = reactor.spawnProcess(
            proc, sys.executable,
            [sys.executable, "-c", launcher, twistd, "--pidfile=", "-n", "slb", "--config", path],
            env=os.environ.copy(),
        )

        def kill():
            if not proc.ended.called:
                transport.signalProcess("KILL")
            return proc.ended

        self.addCleanup(kill)
        listening = yield proc.wait_for(r"listener t \(tcp\) listening on 127\.0\.0\.1:(\d+)", True)
        port = int(listening.group(1))

        def connect():
            return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Client())

        clients: List[Client] = []
        self.addCleanup(lambda: [c.transport.abortConnection() for c in clients if c.transport is not None])
        for _ in range(CLIENTS):
            clients.append((yield connect()))
        # Descriptors run out (each relayed client holds two of them).
        yield self.poll(lambda: "EMFILE" in proc.output, "twistd ran out of descriptors", proc)
        yield self.poll(lambda: any(c.greeted for c in clients), "a client was served", proc)
        # The clients being served leave: descriptors free up, and clients
        # still waiting in the backlog are accepted (or closed, if they
        # waited through a pause while none was free).
        for client in clients:
            if client.greeted:
                client.transport.loseConnection()
        yield self.poll(lambda: all(c.done.called for c in clients), "every waiting client was answered", proc)
        # Those leave too; then a new client is served normally (at most
        # one back-off away).
        for client in clients:
            client.transport.loseConnection()
        for _ in range(20):
            client = yield connect()
            clients.append(client)
            if (yield client.done):
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(clients[-1].greeted, proc.output)
        # The log: no line per closed client, and one warning per episode (an
        # episode ends when a connection is accepted again).
        self.assertEqual(proc.output.count("EMFILE recovery: Closed socket"), 0, proc.output)
        yield self.poll(lambda: "accepting connections again" in proc.output, "recovery was logged", proc)
        warnings = proc.output.count("cannot accept (EMFILE")
        self.assertGreaterEqual(warnings, 1, proc.output)
        self.assertLessEqual(warnings, proc.output.count("accepting connections again") + 1, proc.output)
        for client in clients:
            client.transport.loseConnection()
        transport.signalProcess("TERM")
        code, signum = yield proc.ended
        self.assertIn((code, signum), [(0, None), (None, signal.SIGTERM)])
