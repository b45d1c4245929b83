"""
L{twisted_slb._io.accept}: a listening port out of file descriptors logs one
warning per episode and pauses accepting for a back-off, instead of one log
line per refused client (or per turn of the reactor, with no reserve
descriptor left); and port pauses keep their reasons apart.
"""

from __future__ import annotations

from errno import EAGAIN, EMFILE

from twisted.internet import tcp
from twisted.internet.task import Clock
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twisted_slb._io.accept import AcceptGuard, pause_port, resume_port


class FakePort(tcp.Port):
    """
    A C{tcp.Port} that never listened, with a L{FakeListener} for its
    socket: the parts the guard uses are its socket, its logger and its
    reading state.
    """

    connected = True
    disconnecting = False
    _logger = Logger(namespace="twisted.internet.tcp.Port")

    def __init__(self) -> None:
        self.socket = FakeListener()
        self.reading = True
        self.stops = 0

    def stopReading(self) -> None:
        self.reading = False
        self.stops += 1

    def startReading(self) -> None:
        self.reading = True


class FakeListener:
    """A listening socket whose C{accept} raises or returns, in turn, what it is given."""

    def __init__(self, *results) -> None:
        self.results = list(results)

    def accept(self):
        result = self.results.pop(0)
        if isinstance(result, int):
            raise OSError(result, "")
        return result


class FakeClient:
    closed = False

    def close(self) -> None:
        self.closed = True


class FakeReservation:
    """Twisted's reserve descriptor, held (C{available}) or not."""

    def __init__(self, available: bool) -> None:
        self._available = available

    def available(self) -> bool:
        return self._available

    def __enter__(self):
        self._available = False

    def __exit__(self, *exc) -> None:
        self._available = True


class AcceptGuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.clock = Clock()
        self.port = FakePort()
        self.guard = AcceptGuard(self.port, "web", self.clock, backoff=0.5)

    def run_accept_loop(self, listener, reservation) -> list:
        """
        Run Twisted's own accept loop (C{tcp._accept}, private) on the
        port's socket (which the guard watches) with the port's logger, the
        results of C{accept} taken from C{listener}: this checks the
        guard against what the installed Twisted does.
        """
        self.port.socket._socket.results = list(listener.results)
        return list(tcp._accept(self.port._logger, range(100), self.port.socket, reservation))

    def warnings(self) -> list:
        return [e for e in self.events if e.get("log_namespace") == "twisted_slb._io.accept"
                and "cannot accept" in e["log_format"]]

    def test_emfileWithoutReserveIsOneWarningAndAPause(self):
        """
        With no reserve descriptor, Twisted logs "Could not accept" and
        returns with the client still pending: the reactor calls it again at
        once, for as long as descriptors are short.  The guard warns once and
        stops reading until the back-off is over.
        """
        for _ in range(50):
            if self.port.reading:
                self.run_accept_loop(FakeListener(EMFILE), FakeReservation(available=False))
        self.assertEqual((len(self.warnings()), self.port.stops, self.port.reading), (1, 1, False))
        self.assertFalse([e for e in self.events if e.get("log_namespace") == "twisted.internet.tcp.Port"])

    def test_pauseEndsAfterTheBackoff(self):
        """
        Out of descriptors, the port stops accepting for the backoff (0.5 s) and then reads again; pausing
        again later does not warn twice.
        """
        self.run_accept_loop(FakeListener(EMFILE), FakeReservation(available=False))
        self.clock.advance(0.4)
        self.assertFalse(self.port.reading)
        self.clock.advance(0.1)
        self.assertTrue(self.port.reading)
        # Still out of descriptors: paused again, but no second warning.
        self.run_accept_loop(FakeListener(EMFILE), FakeReservation(available=False))
        self.assertEqual((len(self.warnings()), self.port.stops, self.port.reading), (1, 2, False))

    def test_clientsClosedWithTheReserveAreCountedNotLogged(self):
        """
        With the reserve, Twisted accepts and closes every pending client,
        logging each one: the guard counts them and says how many when
        accepting again.
        """
        clients = [FakeClient() for _ in range(3)]
        listener = FakeListener(EMFILE, *[(c, ("127.0.0.1", 5000 + i)) for i, c in enumerate(clients)], EAGAIN)
        self.assertEqual(self.run_accept_loop(listener, FakeReservation(available=True)), [])
        self.assertTrue(all(c.closed for c in clients))
        self.assertEqual((len(self.warnings()), self.guard.closed), (1, 3))
        self.assertFalse([e for e in self.events if e.get("log_namespace") == "twisted.internet.tcp.Port"])
        self.guard.accepted()
        self.guard.accepted()
        again = [e for e in self.events if "accepting connections again" in e.get("log_format", "")]
        self.assertEqual([e["closed"] for e in again], [3])
        self.assertFalse(self.guard.episode)

    def test_otherPortEventsPassThrough(self):
        """Log events of the port other than the EMFILE one reach observers unchanged."""
        self.port._logger.info("something else {x}", x=1)
        self.assertEqual([e["x"] for e in self.events if e.get("log_format") == "something else {x}"], [1])

    def test_stopCancelsTheResume(self):
        """Stopping the guard cancels the pending resume of a paused port: no timer is left behind."""
        self.run_accept_loop(FakeListener(EMFILE), FakeReservation(available=False))
        self.guard.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PausePortTests(SynchronousTestCase):
    def test_portAcceptsWhenNoReasonHoldsIt(self):
        """A port paused for two reasons accepts again only once both are resumed."""
        port = FakePort()
        pause_port(port, "limit")
        pause_port(port, "emfile")
        resume_port(port, "limit")
        self.assertFalse(port.reading)
        resume_port(port, "emfile")
        self.assertTrue(port.reading)

    def test_resumingAnUnknownReasonDoesNothing(self):
        """Resuming a reason the port was not paused for leaves it paused for its real reason."""
        port = FakePort()
        pause_port(port, "limit")
        resume_port(port, "emfile")
        self.assertFalse(port.reading)
