"""
A real twistd process with a lowered file descriptor limit (C{ulimit -n 40}):
when descriptors run out, the listener logs it once per episode (not once
per refused client), pauses accepting so that new clients wait in the
backlog, keeps serving the clients it has, and accepts the waiting clients
once descriptors free up.
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
        self.transport.write(b"hi\n")


class Client(protocol.Protocol):
    """Fires C{done} with True when greeted, False when closed first."""

    def __init__(self) -> None:
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.done.called:
            self.done.callback(True)

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            self.done.callback(False)


class FileDescriptorLimitTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_outOfDescriptorsIsLoggedOnceAndRecovers(self):
        backend = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.ServerFactory.forProtocol(Greeter)
        )
        self.addCleanup(backend.stopListening)
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(CONFIG.format(port=backend.getHost().port))
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
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
        self.addCleanup(lambda: proc.ended.called or transport.signalProcess("KILL"))
        listening = yield proc.wait_for(r"listener t \(tcp\) listening on 127\.0\.0\.1:(\d+)", True)
        port = int(listening.group(1))

        def connect():
            return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Client())

        clients: List[Client] = []

        def close_all():
            for client in clients:
                if client.transport is not None:
                    client.transport.abortConnection()

        self.addCleanup(close_all)
        for _ in range(CLIENTS):
            clients.append((yield connect()))
        # Descriptors run out: logged once; those over the limit wait.
        yield proc.wait_for(r"cannot accept \(EMFILE", True)
        first = [c for c in clients if c.done.called]
        while not any(c.done.result for c in first):
            yield deferLater(reactor, 0.05, lambda: None)
            first = [c for c in clients if c.done.called]
        served_first = [c for c in first if c.done.result]
        waiting = [c for c in clients if not c.done.called]
        # The clients being served leave: descriptors free up, and clients
        # still waiting in the backlog (if the pause cycles have not closed
        # them all by now) are accepted, as are new ones.
        for client in served_first:
            client.transport.loseConnection()
        results = yield defer.gatherResults([c.done for c in waiting])
        ok = True in results
        for _ in range(100):
            if ok:
                break
            client = yield connect()
            clients.append(client)
            ok = yield client.done
            if not ok:
                yield deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(ok)
        yield proc.wait_for(r"accepting connections again \(\d+ closed while out of file descriptors\)", True)
        # One warning per episode (an episode ends when a connection is
        # accepted again), not one per closed client.
        warnings = proc.output.count("cannot accept (EMFILE")
        closed = [c for c in clients if c.done.called and not c.done.result]
        self.assertLessEqual(warnings, proc.output.count("accepting connections again") + 1, proc.output)
        self.assertLess(warnings, max(len(closed), 2), proc.output)
        self.assertNotIn("EMFILE recovery: Closed socket", proc.output)
        for client in clients:
            client.transport.loseConnection()
        transport.signalProcess("TERM")
        code, signum = yield proc.ended
        self.assertIn((code, signum), [(0, None), (None, signal.SIGTERM)])
