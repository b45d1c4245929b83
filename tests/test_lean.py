"""
Tests for L{twisted_slb._io.lean}: the relay's lean TCP transports, over real
sockets on 127.0.0.1 (the peer is a plain non-blocking socket), and their
connect's timeout and cancellation with a fake clock.
"""

from __future__ import annotations

import socket
from typing import List

from twisted.internet import defer, error, reactor, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from twisted_slb._io import lean
from twisted_slb._io.timers import Deadlines

from .buffers import small_tcp_pair


class Recorder(Protocol):
    """Records what the transport tells it."""

    def __init__(self) -> None:
        self.data = b""
        self.events: List[str] = []
        self.reason = None
        self.lost = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.events.append("connectionLost")
        self.reason = reason
        self.lost.callback(None)


@implementer(IHalfCloseableProtocol)
class HalfRecorder(Recorder):
    def readConnectionLost(self) -> None:
        self.events.append("readConnectionLost")

    def writeConnectionLost(self) -> None:
        self.events.append("writeConnectionLost")


class Producer:
    def __init__(self) -> None:
        self.calls: List[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class Connecting(ClientFactory):
    noisy = False

    def __init__(self, protocol=None) -> None:
        self.proto = protocol or HalfRecorder()
        self.addresses = []
        self.failures = []
        self.done = defer.Deferred()

    def buildProtocol(self, addr):
        self.addresses.append(addr)
        self.proto.factory = self
        return self.proto

    def clientConnectionFailed(self, connector, reason) -> None:
        self.failures.append(reason)
        self.done.callback(None)


def listening_socket() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    return server


class LeanConnectionTests(TestCase):
    """A L{lean.LeanConnection} against a plain socket peer."""

    timeout = 20

    def setUp(self):
        # Small buffers on both ends, set before connecting: the tests that
        # need "the socket does not take it all" must not depend on how
        # large the kernel lets a loopback socket grow (see tests.buffers).
        ours, self.peer = small_tcp_pair()
        self.addCleanup(self.peer.close)
        self.peer.setblocking(False)
        ours.setblocking(False)
        self.protocol = HalfRecorder()
        self.transport = lean.LeanConnection(ours, self.protocol, reactor)
        self.protocol.makeConnection(self.transport)
        self.transport.startReading()
        self.addCleanup(self.transport.abortConnection)
        self.received = b""

    def read_peer(self) -> bytes:
        """What the peer socket has received so far (b"" at its end of file stays b"")."""
        while True:
            try:
                chunk = self.peer.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                self.peer_eof = True
                break
            self.received += chunk
        return self.received

    peer_eof = False

    @defer.inlineCallbacks
    def until(self, predicate):
        """Let the reactor run until C{predicate()} holds."""
        while not predicate():
            yield deferLater(reactor, 0, lambda: None)

    def test_interfaces(self):
        """
        A lean connection answers getPeer, getHost, TCP options, getHandle and logPrefix as Twisted's
        transports do.
        """
        self.assertEqual(self.transport.getPeer(), IPv4Address("TCP", *self.peer.getsockname()))
        self.assertEqual(self.transport.getHost(), IPv4Address("TCP", *self.peer.getpeername()))
        self.transport.setTcpNoDelay(True)
        self.assertTrue(self.transport.getTcpNoDelay())
        self.transport.setTcpKeepAlive(True)
        self.assertTrue(self.transport.getTcpKeepAlive())
        self.assertIs(self.transport.getHandle(), self.transport.socket)
        self.assertEqual(self.transport.logPrefix(), "HalfRecorder")

    def test_writeSendsAtOnce(self):
        """With nothing buffered, write() sends before it returns: nothing is left to the reactor."""
        self.transport.write(b"hello")
        self.assertEqual(bytes(self.transport._buffer), b"")
        self.assertFalse(self.transport._writing)
        self.peer.setblocking(True)
        self.assertEqual(self.peer.recv(5), b"hello")

    @defer.inlineCallbacks
    def test_reads(self):
        """Bytes sent by the peer reach the protocol."""
        self.peer.sendall(b"from the peer")
        yield self.until(lambda: self.protocol.data == b"from the peer")

    @defer.inlineCallbacks
    def test_fullSocketBuffersInOrderAndPausesTheProducer(self):
        """
        What the socket does not take is kept and sent in order; past
        bufferSize a registered streaming producer is paused, and resumed
        once everything is sent.
        """
        producer = Producer()
        self.transport.registerProducer(producer, True)
        chunks = [bytes([65 + i % 26]) * 100000 for i in range(40)]  # 4 MB: more than the socket takes
        for chunk in chunks:
            self.transport.write(chunk)
        self.assertTrue(self.transport._buffer)
        self.assertEqual(producer.calls, ["pause"])
        expected = b"".join(chunks)
        yield self.until(lambda: len(self.read_peer()) == len(expected))
        self.assertEqual(self.received, expected)
        yield self.until(lambda: producer.calls == ["pause", "resume"])
        self.assertFalse(self.transport._writing)

    @defer.inlineCallbacks
    def test_pullProducerIsAskedForMore(self):
        """A pull producer is asked for more on registration and again once the write buffer has drained."""
        producer = Producer()
        self.transport.registerProducer(producer, False)
        self.assertEqual(producer.calls, ["resume"])
        self.transport.write(b"x" * 4000000)
        yield self.until(lambda: len(self.read_peer()) == 4000000)
        yield self.until(lambda: producer.calls == ["resume", "resume"])

    @defer.inlineCallbacks
    def test_pullProducerIsAskedForMoreAfterAWholeSend(self):
        """
        A write the socket takes whole still leads to the pull producer
        being asked for more: on the next write event, as Twisted does,
        not from inside the write.
        """
        producer = Producer()
        self.transport.registerProducer(producer, False)
        self.transport.write(b"small")
        self.assertEqual(producer.calls, ["resume"])  # not yet
        yield self.until(lambda: producer.calls == ["resume", "resume"])
        self.assertEqual(self.read_peer(), b"small")

    def test_registerTwice(self):
        """
        Registering a second producer without unregistering the first is a RuntimeError; after unregistering
        it works.
        """
        self.transport.registerProducer(Producer(), True)
        self.assertRaises(RuntimeError, self.transport.registerProducer, Producer(), True)
        self.transport.unregisterProducer()
        self.transport.registerProducer(Producer(), True)

    @defer.inlineCallbacks
    def test_peerEndOfFileIsAHalfClose(self):
        """The peer's end of file is readConnectionLost; we can still send."""
        self.peer.shutdown(socket.SHUT_WR)
        yield self.until(lambda: self.protocol.events == ["readConnectionLost"])
        self.transport.write(b"still here")
        yield self.until(lambda: self.read_peer() == b"still here")
        self.transport.resumeProducing()  # does not read the end of file again
        self.assertFalse(self.transport._reading)

    @defer.inlineCallbacks
    def test_endOfFileClosesAProtocolThatCannotHalfClose(self):
        """End of file from the peer closes a protocol that does not take half-closes, with ConnectionDone."""
        protocol = Recorder()
        self.transport.protocol = protocol
        self.transport._half = None
        self.peer.shutdown(socket.SHUT_WR)
        yield protocol.lost
        reason = protocol.reason
        self.assertTrue(reason.check(error.ConnectionDone))

    @defer.inlineCallbacks
    def test_loseWriteConnection(self):
        """
        loseWriteConnection sends what was written and then EOF, tells the protocol, keeps reading, and drops
        later writes.
        """
        self.transport.write(b"last words")
        self.transport.loseWriteConnection()
        self.assertEqual(self.protocol.events, ["writeConnectionLost"])
        yield self.until(lambda: self.read_peer() == b"last words" and self.peer_eof)
        self.peer.sendall(b"reply")  # the other direction still works
        yield self.until(lambda: self.protocol.data == b"reply")
        self.transport.write(b"dropped")  # writes after the half-close go nowhere
        self.assertEqual(bytes(self.transport._buffer), b"")

    @defer.inlineCallbacks
    def test_loseWriteConnectionWaitsForTheBuffer(self):
        """loseWriteConnection with a full buffer sends EOF only after the buffer is written."""
        self.transport.write(b"y" * 4000000)
        self.transport.loseWriteConnection()
        self.assertEqual(self.protocol.events, [])
        yield self.until(lambda: len(self.read_peer()) == 4000000 and self.peer_eof)
        self.assertEqual(self.protocol.events, ["writeConnectionLost"])

    def test_loseConnectionAtOnceWhenFlushed(self):
        """With nothing buffered, loseConnection closes at once, tells the protocol once, then stops the producer."""
        producer = Producer()
        self.transport.registerProducer(producer, True)
        self.transport.loseConnection()
        self.assertEqual(self.protocol.events, ["connectionLost"])
        self.assertTrue(self.protocol.reason.check(error.ConnectionDone))
        self.assertEqual(producer.calls, ["stop"])  # after the protocol heard of it
        self.assertEqual(self.transport.fileno(), -1)
        self.transport.loseConnection()
        self.transport.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(self.protocol.events, ["connectionLost"])  # once

    @defer.inlineCallbacks
    def test_loseConnectionDeliversWhatIsBuffered(self):
        """loseConnection delivers everything buffered before closing."""
        self.transport.write(b"z" * 4000000)
        self.transport.loseConnection()
        self.assertEqual(self.protocol.events, [])
        yield self.until(lambda: self.read_peer() is not None and self.peer_eof)
        self.assertEqual(len(self.received), 4000000)
        yield self.protocol.lost
        self.assertTrue(self.protocol.reason.check(error.ConnectionDone))

    @defer.inlineCallbacks
    def test_abortConnectionResets(self):
        """abortConnection drops the buffer and resets the connection: the peer sees a reset."""
        self.transport.write(b"w" * 4000000)
        self.transport.abortConnection()
        self.assertTrue(self.protocol.reason.check(error.ConnectionAborted))
        self.peer.setblocking(True)
        with self.assertRaises(ConnectionResetError):
            while self.peer.recv(65536):
                pass
        yield defer.succeed(None)

    def test_closeDropsWhatIsBuffered(self):
        """
        A connection closed with bytes still buffered (aborted, or lost)
        holds none of them after: a closed transport something still refers
        to costs no more than its object.
        """
        self.transport.write(b"w" * 4000000)
        self.assertTrue(self.transport._buffer)
        self.transport.abortConnection()
        self.assertEqual(len(self.transport._buffer), 0)

    @defer.inlineCallbacks
    def test_peerResetIsConnectionLost(self):
        """A reset by the peer is ConnectionLost, saying reset."""
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, lean._LINGER_RESET)
        self.peer.close()
        yield self.protocol.lost
        reason = self.protocol.reason
        self.assertTrue(reason.check(error.ConnectionLost))
        self.assertIn("reset", reason.getErrorMessage())

    @defer.inlineCallbacks
    def test_writeToAResetPeerClosesFromTheReactor(self):
        """A send that fails does not raise into the writer: the reactor's write event closes."""
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, lean._LINGER_RESET)
        self.peer.close()
        self.transport.stopReading()  # only the write path can notice
        for _ in range(3):
            self.transport.write(b"into the void")
        yield self.protocol.lost
        reason = self.protocol.reason
        self.assertTrue(reason.check(error.ConnectionLost))

    @defer.inlineCallbacks
    def test_pauseStopsReading(self):
        """pauseProducing stops reading from the socket until resumeProducing."""
        self.transport.pauseProducing()
        self.peer.sendall(b"later")
        for _ in range(20):
            yield deferLater(reactor, 0, lambda: None)
        self.assertEqual(self.protocol.data, b"")
        self.transport.resumeProducing()
        yield self.until(lambda: self.protocol.data == b"later")

    @defer.inlineCallbacks
    def test_protocolErrorClosesTheConnectionOnly(self):
        """An exception in dataReceived is logged and closes this connection, nothing else."""
        def broken(data):
            raise ZeroDivisionError("bad protocol")

        self.protocol.dataReceived = broken
        self.peer.sendall(b"boom")
        yield self.protocol.lost
        reason = self.protocol.reason
        self.assertTrue(reason.check(ZeroDivisionError))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class ConnectTests(TestCase):
    """L{lean.connect} over the real reactor."""

    timeout = 20

    @defer.inlineCallbacks
    def test_connects(self):
        """
        lean.connect gives the protocol a lean transport to the address, whose socket it owns; disconnect
        after connecting does nothing.
        """
        server = listening_socket()
        self.addCleanup(server.close)
        factory = Connecting()
        connector = lean.connect(reactor, "127.0.0.1", server.getsockname()[1], factory, 5)
        self.assertIsInstance(connector, lean.LeanConnector)
        self.assertEqual(connector.getDestination(), IPv4Address("TCP", "127.0.0.1", server.getsockname()[1]))
        while not factory.addresses:
            yield deferLater(reactor, 0, lambda: None)
        transport = factory.proto.transport
        self.assertIsInstance(transport, lean.LeanConnection)
        self.assertEqual(factory.addresses, [IPv4Address("TCP", "127.0.0.1", server.getsockname()[1])])
        self.assertEqual(transport.getPeer(), factory.addresses[0])
        self.assertEqual(connector.fileno(), -1)  # the socket is the transport's now
        accepted, _ = server.accept()
        self.addCleanup(accepted.close)
        transport.write(b"over lean")
        accepted.settimeout(5)
        self.assertEqual(accepted.recv(9), b"over lean")
        connector.disconnect()  # too late: nothing happens
        self.assertEqual(factory.failures, [])
        transport.loseConnection()

    @defer.inlineCallbacks
    def test_factoryDeclines(self):
        """A factory whose buildProtocol returns None fails the connection (NoProtocol), as connectTCP's."""
        server = listening_socket()
        self.addCleanup(server.close)
        factory = Connecting()
        factory.buildProtocol = lambda addr: None
        lean.connect(reactor, "127.0.0.1", server.getsockname()[1], factory, 5)
        yield factory.done
        [reason] = factory.failures
        self.assertTrue(reason.check(error.NoProtocol))
        accepted, _ = server.accept()
        accepted.settimeout(5)
        self.assertEqual(accepted.recv(10), b"")  # closed
        accepted.close()

    @defer.inlineCallbacks
    def test_refused(self):
        """A refused lean connect calls clientConnectionFailed with ConnectionRefusedError, and builds no protocol."""
        server = listening_socket()
        port = server.getsockname()[1]
        server.close()
        factory = Connecting()
        lean.connect(reactor, "127.0.0.1", port, factory, 5)
        yield factory.done
        [reason] = factory.failures
        self.assertTrue(reason.check(error.ConnectionRefusedError))
        self.assertEqual(factory.addresses, [])

    @defer.inlineCallbacks
    def test_ipv6(self):
        """lean.connect connects to an IPv6 address."""
        try:
            server = socket.socket(socket.AF_INET6)
            server.bind(("::1", 0))
        except OSError:
            raise self.skipTest("no IPv6 loopback here") from None
        server.listen(1)
        self.addCleanup(server.close)
        factory = Connecting()
        lean.connect(reactor, "::1", server.getsockname()[1], factory, 5)
        while not factory.addresses:
            yield deferLater(reactor, 0, lambda: None)
        self.assertEqual(factory.proto.transport.getPeer().host, "::1")
        factory.proto.transport.loseConnection()

    def test_hostNameGoesThroughConnectTCP(self):
        """A host name, or a reactor lean cannot drive, goes through the reactor's connectTCP."""
        clock = MemoryReactorClock()
        factory = Connecting()
        lean.connect(clock, "backend.example", 80, factory, 5)  # not a POSIX reactor either
        self.assertEqual(clock.tcpClients[0][:2], ("backend.example", 80))

        class Posix(MemoryReactorClock):
            pass

        self.patch(lean, "usable", lambda reactor: True)
        posix = Posix()
        lean.connect(posix, "backend.example", 81, factory, 5)
        self.assertEqual(posix.tcpClients[0][:2], ("backend.example", 81))


class ConnectTimeoutTests(SynchronousTestCase):
    """The connect's timer and cancellation, with a fake reactor (the socket is real)."""

    def setUp(self):
        self.server = listening_socket()
        self.addCleanup(self.server.close)
        self.reactor = MemoryReactorClock()
        self.factory = Connecting()
        self.connector = lean.LeanConnector(
            self.reactor, socket.AF_INET, "127.0.0.1", self.server.getsockname()[1], self.factory, 5
        )

    def test_nonBlockingFromTheStart(self):
        """
        The backend socket is non-blocking as it is made (C{SOCK_NONBLOCK}
        on Linux, no C{setblocking} call after it); the connect is under way.
        """
        self.assertEqual(self.connector.sock.gettimeout(), 0.0)
        self.assertEqual(self.connector.sock.type, socket.SOCK_STREAM)
        if hasattr(socket, "SOCK_NONBLOCK"):
            calls = []
            self.patch(socket.socket, "setblocking", lambda sock, flag: calls.append(flag))
            lean.LeanConnector(self.reactor, socket.AF_INET, "127.0.0.1", self.server.getsockname()[1],
                               self.factory, 5).stopConnecting()
            self.assertEqual(calls, [])

    def test_backendAddressMadeOnce(self):
        """Connects to one backend share its address object: it is made once, not per connection."""
        again = lean.LeanConnector(self.reactor, socket.AF_INET, "127.0.0.1", self.server.getsockname()[1],
                                   self.factory, 5)
        again.stopConnecting()
        self.assertIs(again.getDestination(), self.connector.getDestination())
        self.assertEqual(again.getDestination(), IPv4Address("TCP", "127.0.0.1", self.server.getsockname()[1]))

    def test_timesOut(self):
        """A connect not done within its timeout fails with TimeoutError and stops watching the socket."""
        self.assertIn(self.connector, self.reactor.writers)
        self.reactor.advance(4.9)
        self.assertEqual(self.factory.failures, [])
        self.reactor.advance(0.1)
        [reason] = self.factory.failures
        self.assertTrue(reason.check(error.TimeoutError))
        self.assertNotIn(self.connector, self.reactor.writers)
        self.assertEqual(self.connector.fileno(), -1)

    def test_disconnect(self):
        """disconnect() while connecting fails the attempt once with UserError and cancels its timer."""
        self.connector.disconnect()
        [reason] = self.factory.failures
        self.assertTrue(reason.check(error.UserError))
        self.assertNotIn(self.connector, self.reactor.writers)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.connector.disconnect()
        self.reactor.advance(10)
        self.assertEqual(len(self.factory.failures), 1)

    def test_reactorHangUp(self):
        """The reactor's connectionLost (a refused connect's hang-up) is reported with its errno."""
        self.connector.connectionLost(Failure(error.ConnectionLost()))
        [reason] = self.factory.failures
        self.assertTrue(reason.check(error.ConnectError))

    def test_socketShortage(self):
        """No descriptor for the socket: reported later (never from inside connect), as a local failure."""
        class NoSockets:
            def __getattr__(self, name):
                return getattr(socket, name)

            def socket(self, *args):
                raise OSError(24, "Too many open files")

        self.patch(lean, "socket", NoSockets())
        factory = Connecting()
        lean.LeanConnector(self.reactor, socket.AF_INET, "127.0.0.1", 1, factory, 5)
        self.assertEqual(factory.failures, [])
        self.reactor.advance(0)
        [reason] = factory.failures
        self.assertEqual(reason.value.osError, 24)
        from twisted_slb.backends import local_failure

        self.assertTrue(local_failure(reason))


class RecvTests(SynchronousTestCase):
    """L{lean.recv}: what a transport reads with (a reused buffer on PyPy)."""

    def setUp(self):
        self.a, self.b = socket.socketpair()
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)

    def test_readsWhatArrived(self):
        """lean.recv returns new bytes objects: a later read does not change an earlier one."""
        self.a.sendall(b"first")
        first = lean.recv(self.b, 65536)
        self.a.sendall(b"2nd")
        second = lean.recv(self.b, 65536)
        # Each read is bytes of its own: a later read does not change it.
        self.assertEqual((first, second), (b"first", b"2nd"))
        self.assertIs(type(first), bytes)

    def test_sizeIsTheMost(self):
        """lean.recv returns at most the size asked, and sizes over its buffer work."""
        self.a.sendall(b"abcdef")
        self.assertEqual(lean.recv(self.b, 4), b"abcd")
        self.assertEqual(lean.recv(self.b, 1 << 20), b"ef")  # larger than the buffer

    def test_endOfFile(self):
        """lean.recv returns b"" at end of file."""
        self.a.shutdown(socket.SHUT_WR)
        self.assertEqual(lean.recv(self.b, 65536), b"")

    def test_wouldBlock(self):
        """lean.recv on a non-blocking socket with nothing to read raises BlockingIOError."""
        self.b.setblocking(False)
        self.assertRaises(BlockingIOError, lean.recv, self.b, 65536)


class RegistrationOrderTests(SynchronousTestCase):
    """How a finished connect hands its socket's reactor registration over."""

    def test_readingBeforeTheConnectorLetsGo(self):
        """
        The new transport is added as a reader before the connector is
        removed as a writer: an epoll reactor then modifies the socket's
        registration instead of removing it and adding it back.
        """
        calls = []

        class Recording(MemoryReactorClock):
            def addReader(self, reader):
                calls.append(("addReader", type(reader).__name__))
                MemoryReactorClock.addReader(self, reader)

            def removeWriter(self, writer):
                calls.append(("removeWriter", type(writer).__name__))
                MemoryReactorClock.removeWriter(self, writer)

        server = listening_socket()
        self.addCleanup(server.close)
        factory = Connecting()
        connector = lean.LeanConnector(Recording(), socket.AF_INET, "127.0.0.1", server.getsockname()[1], factory, 5)
        connector.doWrite()  # a loopback connect to a listening socket does not fail
        self.assertEqual(calls, [("addReader", "LeanConnection"), ("removeWriter", "LeanConnector")])
        self.assertIsInstance(factory.proto.transport, lean.LeanConnection)
        self.addCleanup(factory.proto.transport.abortConnection)

    def test_declinedConnectionIsClosed(self):
        """A factory declining the connection: the connector lets go and the socket is closed."""
        server = listening_socket()
        self.addCleanup(server.close)
        factory = Connecting()
        factory.buildProtocol = lambda addr: None
        reactor = MemoryReactorClock()
        connector = lean.LeanConnector(reactor, socket.AF_INET, "127.0.0.1", server.getsockname()[1], factory, 5)
        sock = connector.sock
        connector.doWrite()
        [reason] = factory.failures
        self.assertTrue(reason.check(error.NoProtocol))
        self.assertEqual((reactor.readers, reactor.writers), (set(), set()))
        self.assertEqual(sock.fileno(), -1)


class SharedConnectTimeoutTests(ConnectTimeoutTests):
    """The same, with the timeouts of many connects behind one timer (L{Deadlines})."""

    def setUp(self):
        self.server = listening_socket()
        self.addCleanup(self.server.close)
        self.reactor = MemoryReactorClock()
        self.factory = Connecting()
        self.deadlines = Deadlines(self.reactor, lean.LeanConnector.timed_out)
        self.connector = lean.LeanConnector(
            self.reactor, socket.AF_INET, "127.0.0.1", self.server.getsockname()[1], self.factory, 5,
            self.deadlines,
        )

    def test_oneTimer(self):
        """Connects sharing a Deadlines share one timer; a disconnected one is not timed out with the others."""
        other = Connecting()
        second = lean.LeanConnector(self.reactor, socket.AF_INET, "127.0.0.1", self.server.getsockname()[1],
                                    other, 5, self.deadlines)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        second.disconnect()
        self.reactor.advance(5)
        [reason] = self.factory.failures
        self.assertTrue(reason.check(error.TimeoutError))
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class ServePortTests(TestCase):
    """L{lean.serve_port}: a plain TCP port of the factory builds L{lean.LeanServer}s."""

    timeout = 20

    @defer.inlineCallbacks
    def test_acceptedConnectionsAreLean(self):
        """After serve_port, accepted connections get lean transports with the right addresses."""
        protocols = []

        class Collect(Factory):
            noisy = False

            def buildProtocol(self, addr):
                p = HalfRecorder()
                protocols.append(p)
                return p

        factory = Collect()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertTrue(lean.serve_port(port, factory))
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        client.sendall(b"hi")
        while not protocols or protocols[0].data != b"hi":
            yield deferLater(reactor, 0, lambda: None)
        transport = protocols[0].transport
        self.assertIsInstance(transport, lean.LeanServer)
        self.assertEqual(transport.getPeer(), IPv4Address("TCP", *client.getsockname()))
        self.assertEqual(transport.getHost(), IPv4Address("TCP", *client.getpeername()))
        transport.loseConnection()

    def test_onlyPlainPortsOfTheFactory(self):
        """serve_port refuses a port serving another factory (such as a TLS wrapper) and an object that is no port."""
        factory, other = Factory(), Factory()
        port = reactor.listenTCP(0, other, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertFalse(lean.serve_port(port, factory))  # TLS wraps the factory: not ours
        self.assertIs(port.transport, tcp.Server)
        self.assertFalse(lean.serve_port(object(), factory))
