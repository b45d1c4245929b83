# -*- test-case-name: tests.test_twisted_private -*-
"""
Tests for L{twisted_slb._io.twisted_private}: every private API of Twisted
(and of txredisapi) that twisted_slb relies on is still there and still
does what we rely on.  A Twisted upgrade that changes one fails here,
loudly, instead of degrading something at run time.
"""

from __future__ import annotations

import io
import socket
from errno import EAGAIN, EMFILE

from twisted.internet import protocol, tcp
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import LogPublisher, globalLogPublisher, textFileLogObserver
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase

from twisted_slb._io import twisted_private as private


class TCPConnectionWriteStateTests(SynchronousTestCase):
    """The write state of C{tcp.Connection} that L{twisted_slb._io.sockets} reads and sets."""

    def connection(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        conn = tcp.Connection(ours, protocol.Protocol(), MemoryReactor())
        conn.connected = 1
        return conn, theirs

    def test_idleConnectionIsIdleForWriting(self):
        """A fresh connection with nothing buffered reads as idle; a buffered write makes it not."""
        conn, _ = self.connection()
        self.assertTrue(private.tcp_is_idle_for_writing(conn))
        self.assertFalse(private.tcp_write_disconnecting(conn))
        conn.write(b"x")  # Twisted buffers it for the next write event
        self.assertFalse(private.tcp_is_idle_for_writing(conn))

    def test_shutdownWriteNowSendsEOF(self):
        """Setting the private write state and calling _closeWriteConnection shuts the socket's sending side."""
        conn, theirs = self.connection()
        private.tcp_shutdown_write_now(conn)
        self.assertEqual(theirs.recv(10), b"")
        self.assertTrue(private.tcp_write_disconnecting(conn))
        self.assertFalse(private.tcp_is_idle_for_writing(conn))


class FakeListener:
    """A listening socket whose C{accept} raises, in turn, the errnos it is given."""

    def __init__(self, *errnos: int) -> None:
        self.errnos = list(errnos)

    def accept(self):
        raise OSError(self.errnos.pop(0), "")


class Watcher:
    """Records what L{private.watch_port} reports."""

    def __init__(self) -> None:
        self.failed = []
        self.accepted = 0
        self.events = []

    def accept_failed(self, errno: int) -> None:
        self.failed.append(errno)

    def socket_accepted(self) -> None:
        self.accepted += 1

    def __call__(self, event) -> None:
        self.events.append(event)


class TCPPortTests(SynchronousTestCase):
    """The parts of C{tcp.Port} the accept guard and the upgrade use."""

    def test_portAcceptsThroughItsSocketAndLogsThroughItsLogger(self):
        """
        C{tcp.Port.doRead} accepts with C{port.socket.accept} and logs its
        accept errors through the private C{_logger}: a watched port reports
        EMFILE by its errno, and its log events go to the watcher only.
        """
        port = tcp.Port(0, protocol.ServerFactory(), reactor=MemoryReactor())
        port.numberAccepts = 10
        port.socket = FakeListener(EMFILE, EAGAIN, EAGAIN)
        watcher = Watcher()
        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        self.assertTrue(private.watch_port(port, watcher))
        port.doRead()
        self.assertEqual(watcher.failed[0], EMFILE)
        self.assertTrue(watcher.events)
        self.assertFalse([e for e in seen if e.get("log_namespace") == port._logger.namespace])

    def test_otherPortsAreNotWatched(self):
        """watch_port leaves alone what is not a tcp.Port (a UNIX or adopted port of another kind)."""
        self.assertFalse(private.watch_port(object(), Watcher()))

    def test_shutdownFlag(self):
        """
        keep_socket_on_close relies on tcp.Port's private C{_shouldShutdown}:
        if Twisted renames it, this fails (and an upgrade would leave the new
        process a dead socket).
        """
        self.assertTrue(tcp.Port._shouldShutdown)
        port = tcp.Port(0, protocol.ServerFactory())
        private.keep_socket_on_close(port)
        self.assertFalse(port._shouldShutdown)


class LoggerTests(SynchronousTestCase):
    """
    L{twisted_slb.accesslog.twistd_file_observer} reads a publisher's
    observers and a FileLogObserver's file: if Twisted renames them, these
    fail, loudly, instead of the access log silently falling back to (slow)
    events.
    """

    def test_publisherObservers(self):
        """A LogPublisher's observers are found (its list _observers)."""
        observer = textFileLogObserver(io.StringIO())
        self.assertEqual(private.publisher_observers(LogPublisher(observer)), [observer])
        self.assertIsInstance(private.publisher_observers(globalLogPublisher), list)

    def test_fileObserverOutput(self):
        """A FileLogObserver's file is found, with encoding None for a text file and utf-8 for a binary one."""
        out = io.StringIO()
        self.assertEqual(private.file_observer_output(textFileLogObserver(out)), (out, None))
        binary = io.BytesIO()
        self.assertEqual(private.file_observer_output(textFileLogObserver(binary)), (binary, "utf-8"))

    def test_otherObserverHasNoOutput(self):
        """An observer that is not a FileLogObserver has no output to find."""
        self.assertIsNone(private.file_observer_output(lambda event: None))


class SubclassedInternalsTests(SynchronousTestCase):
    """The private names that our subclasses of Twisted's classes override or read."""

    def test_epollReactor(self):
        """EPollReactor still has the attributes SLBEPollReactor's doPoll reads."""
        from twisted.internet.epollreactor import EPollReactor

        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.assertEqual([n for n in private.EPOLL_REACTOR_PRIVATE if not hasattr(reactor, n)], [])
        self.assertTrue(callable(reactor._doReadOrWrite))

    def test_tlsProtocol(self):
        """A connected TLSMemoryBIOProtocol still has what twisted_slb.tls._server's transport overrides and reads."""
        factory = TLSMemoryBIOFactory(optionsForClientTLS("example.com"), True, protocol.Factory.forProtocol(protocol.Protocol))
        tls = factory.buildProtocol(None)
        tls.makeConnection(StringTransport())
        self.assertIsInstance(tls, TLSMemoryBIOProtocol)
        self.assertEqual([n for n in private.TLS_PROTOCOL_PRIVATE if not hasattr(tls, n)], [])
        self.assertTrue(callable(TLSMemoryBIOProtocol._shutdownTLS))


    def test_httpChannelHeaderCounters(self):
        """HTTPChannel still counts the bytes and the lines of the head received so far."""
        from twisted.web.http import HTTPChannel

        channel = HTTPChannel()
        channel.makeConnection(StringTransport())
        self.addCleanup(channel.connectionLost, None)
        size, count = private.HTTP_CHANNEL_PRIVATE
        self.assertEqual((getattr(channel, size), getattr(channel, count)), (0, 0))
        channel.dataReceived(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n")
        self.assertGreater(getattr(channel, size), len(b"GET / HTTP/1.1"))
        self.assertEqual(getattr(channel, count), 1)  # a header line counts once the next one shows it is whole


class ThirdPartyTests(SynchronousTestCase):
    """Private parts of other libraries."""

    def test_redisPoolSize(self):
        """A txredisapi handler's factory counts its connections (0 before any is up)."""
        import txredisapi

        factory = txredisapi.RedisFactory("127.0.0.1:1", None, 1, True, txredisapi.ConnectionHandler)
        self.assertEqual(private.redis_pool_size(factory.handler), 0)

    def test_haproxyParsers(self):
        """Twisted's private PROXY protocol parsers still parse a header and refuse a bad one."""
        info = private.HAProxyV1Parser.parse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 80")
        self.assertEqual((info.source.host, info.source.port), ("192.0.2.1", 1234))
        self.assertRaises(private.HAProxyInvalidHeader, private.HAProxyV1Parser.parse, b"PROXY NOPE")
        self.assertTrue(callable(private.HAProxyV2Parser.parse))
