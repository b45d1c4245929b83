"""
Tests for L{twisted_slb._io.reactor}: Twisted's own reactor tests for TCP,
half-close, producers, time and threads run against L{SLBEPollReactor}, and
an exception escaping its dispatch is logged without stopping the loop.
"""

from __future__ import annotations

import os

from twisted.internet import main
from twisted.internet.test import test_core, test_tcp, test_time
from twisted.internet.test.connectionmixins import ConnectableProtocol, runProtocolsWithReactor
from twisted.python import context
from twisted.python.log import ILogContext
from twisted.trial.unittest import SynchronousTestCase

from twisted_slb._io import reactor as slb_reactor

_OURS = ["twisted_slb._io.reactor.SLBEPollReactor"]


class _LogPrefixDifference:
    def test_logPrefix(self):
        """
        The one documented difference from Twisted's reactor: no logging
        context per event, so old-style log lines written while handling an
        event have the system C{-}; the transports still name their protocol.
        """

        class Recorder(ConnectableProtocol):
            def __init__(self, prefix):
                self._prefix = prefix
                self.system = self.transport_prefix = None

            def connectionMade(self):
                self.transport.write(b"a")

            def logPrefix(self):
                return self._prefix

            def dataReceived(self, data):
                self.system = context.get(ILogContext)["system"]
                self.transport_prefix = self.transport.logPrefix()
                self.transport.write(b"b")
                if b"b" in data:
                    self.transport.loseConnection()

        client, server = Recorder("Custom Client"), Recorder("Custom Server")
        runProtocolsWithReactor(self, server, client, self.endpoints)
        self.assertEqual((client.system, server.system), ("-", "-"))
        self.assertIn("Custom Client", client.transport_prefix)
        self.assertIn("Custom Server", server.transport_prefix)


def _builders(*builders):
    """Twisted's test-case builders, made for our reactor only."""
    classes = {}
    for builder in builders:
        bases = (_LogPrefixDifference, builder) if hasattr(builder, "test_logPrefix") else (builder,)
        ours = type("SLB" + builder.__name__, bases, {"_reactors": _OURS, "__module__": __name__})
        classes.update(ours.makeTestCaseClasses())
    return classes


globals().update(_builders(
    test_core.SystemEventTestsBuilder,
    test_time.TimeTestsBuilder,
    test_tcp.TCP4ClientTestsBuilder,
    test_tcp.TCPConnectionTestsBuilder,
    test_tcp.TCP4ConnectorTestsBuilder,
    test_tcp.TCPPortTestsBuilder,
    test_tcp.TCPTransportTestsBuilder,
    test_tcp.AbortConnectionTests,
))


class _Unlucky:
    """A readable pipe whose disconnection raises (which Twisted's dispatch does not catch)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reads = 0

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "unlucky"

    def doRead(self):
        self.reads += 1
        return main.CONNECTION_DONE

    def connectionLost(self, reason) -> None:
        raise RuntimeError("connectionLost failed")


class DispatchTests(SynchronousTestCase):
    def test_escapingErrorIsLoggedAndTheLoopGoesOn(self) -> None:
        """An exception escaping a reader is logged, the reader removed, and the reactor loop goes on."""
        if slb_reactor.SLBEPollReactor is None:
            raise self.skipTest("no epoll here")  # pragma: no cover (CI runs on Linux)
        reactor = slb_reactor.SLBEPollReactor()
        self.addCleanup(reactor._poller.close)
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, write_end)
        self.addCleanup(lambda: os.close(read_end) if reactor.getReaders() else None)
        unlucky = _Unlucky(read_end)
        reactor.addReader(unlucky)
        os.write(write_end, b"x")
        reactor.doIteration(0)
        self.assertEqual(unlucky.reads, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertNotIn(unlucky, reactor.getReaders())
        # The loop still runs: a timed call fires on the next iteration.
        fired = []
        reactor.callLater(0, fired.append, True)
        reactor.runUntilCurrent()
        self.assertEqual(fired, [True])

    def test_installDefaultKeepsAnInstalledReactor(self) -> None:
        """With a reactor installed (trial's), install_default leaves it and names it."""
        from twisted.internet import reactor

        self.assertEqual(slb_reactor.install_default(), type(reactor).__name__)
