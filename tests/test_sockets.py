"""
Tests for L{twisted_slb._io.sockets.write_now}: it sends at once when a TCP
transport has nothing buffered, and never reorders, loses or duplicates
bytes when it cannot.
"""


from twisted.internet import tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twisted_slb._io.sockets import close, half_close, write_now
from zope.interface import implementer

from .buffers import small_unix_pair


class _FDReactor:
    """Just what L{tcp.Connection} asks of a reactor: the reader and writer sets."""

    def __init__(self) -> None:
        self.readers = set()
        self.writers = set()

    def addReader(self, fd) -> None:
        self.readers.add(fd)

    def removeReader(self, fd) -> None:
        self.readers.discard(fd)

    def addWriter(self, fd) -> None:
        self.writers.add(fd)

    def removeWriter(self, fd) -> None:
        self.writers.discard(fd)


@implementer(IHalfCloseableProtocol)
class _Recorder(Protocol):
    def __init__(self) -> None:
        self.events = []

    def readConnectionLost(self) -> None:
        self.events.append("readConnectionLost")

    def writeConnectionLost(self) -> None:
        self.events.append("writeConnectionLost")

    def connectionLost(self, reason) -> None:
        self.events.append("connectionLost")


class _Paused:
    """A streaming producer that the transport paused."""

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _SocketPairCase(SynchronousTestCase):
    def setUp(self) -> None:
        # Small buffers: the partial-send test needs a socket that cannot take 4 MB (see tests.buffers).
        ours, self.peer = small_unix_pair()
        self.addCleanup(ours.close)
        self.addCleanup(self.peer.close)
        self.peer.setblocking(False)
        self.reactor = _FDReactor()
        self.protocol = _Recorder()
        self.transport = tcp.Connection(ours, self.protocol, self.reactor)
        self.transport.connected = 1

    def eof(self) -> bool:
        """Whether the peer has read everything up to an end of file."""
        try:
            return self.peer.recv(1 << 20) == b""
        except BlockingIOError:
            return False

    def received(self) -> bytes:
        chunks = []
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return b"".join(chunks)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

class WriteNowTests(_SocketPairCase):
    def test_sends_at_once(self) -> None:
        """With nothing buffered, the bytes are sent without waiting for the reactor."""
        write_now(self.transport, b"hello")
        self.assertEqual(self.received(), b"hello")
        self.assertNotIn(self.transport, self.reactor.writers)

    def test_keeps_order_behind_buffered_bytes(self) -> None:
        """Bytes already waiting in the transport go first."""
        self.transport.write(b"first ")
        write_now(self.transport, b"second")
        self.assertEqual(self.received(), b"")
        self.assertIn(self.transport, self.reactor.writers)
        self.transport.doWrite()
        self.assertEqual(self.received(), b"first second")

    def test_partial_send_buffers_the_rest(self) -> None:
        """What the socket does not take is buffered, in order, and sent later."""
        payload = bytes(range(256)) * 16384  # 4 MB, more than a socket buffer
        write_now(self.transport, payload)
        self.assertIn(self.transport, self.reactor.writers)
        got = [self.received()]
        self.assertLess(len(got[0]), len(payload))
        write_now(self.transport, b"tail")
        while self.transport in self.reactor.writers:
            self.transport.doWrite()
            got.append(self.received())
        self.assertEqual(b"".join(got), payload + b"tail")

    def test_disconnecting_uses_write(self) -> None:
        """After loseConnection, bytes go through Twisted's write path (sent before the close)."""
        self.transport.loseConnection()
        write_now(self.transport, b"late")
        self.assertEqual(self.received(), b"")
        self.assertEqual(self.transport._tempDataBuffer, [b"late"])

    def test_send_error_left_to_twisted(self) -> None:
        """A send that fails (the peer is gone) raises nothing here; Twisted's write path meets the error."""
        self.peer.close()
        write_now(self.transport, b"x" * 100000)
        self.assertIn(self.transport, self.reactor.writers)

    def test_other_transports(self) -> None:
        """Any other transport (TLS, a UNIX socket, a test fake) just gets write()."""
        transport = StringTransport()
        write_now(transport, b"data")
        self.assertEqual(transport.value(), b"data")


class CloseTests(_SocketPairCase):
    def test_half_close_at_once(self) -> None:
        """With nothing buffered, the peer sees the end of file at once and the protocol is told."""
        half_close(self.transport)
        self.assertTrue(self.eof())
        self.assertEqual(self.protocol.events, ["writeConnectionLost"])
        self.assertNotIn(self.transport, self.reactor.writers)
        self.assertTrue(self.transport.connected)  # still reading

    def test_half_close_after_buffered_bytes(self) -> None:
        """Buffered bytes go first: the shutdown waits for Twisted's write event."""
        self.transport.write(b"pending")
        half_close(self.transport)
        self.assertFalse(self.eof())
        self.assertEqual(self.protocol.events, [])
        self.transport.doWrite()
        self.assertEqual(self.received(), b"pending")
        self.assertTrue(self.eof())
        self.assertEqual(self.protocol.events, ["writeConnectionLost"])

    def test_half_close_waits_for_a_paused_producer(self) -> None:
        """A paused producer is resumed by the next write event, as Twisted does, before any shutdown."""
        self.transport.registerProducer(_Paused(), True)
        self.transport.producerPaused = True
        half_close(self.transport)
        self.assertFalse(self.eof())
        self.assertIn(self.transport, self.reactor.writers)

    def test_close_at_once(self) -> None:
        """With nothing buffered, the connection is closed on the spot."""
        close(self.transport)
        self.assertEqual(self.protocol.events, ["writeConnectionLost", "connectionLost"])
        self.assertFalse(self.transport.connected)
        self.assertTrue(self.eof())

    def test_close_after_buffered_bytes(self) -> None:
        """Buffered bytes are sent before the close, on Twisted's write event."""
        self.transport.write(b"last words")
        close(self.transport)
        self.assertEqual(self.protocol.events, [])
        self.assertTrue(self.transport.disconnecting)
        self.assertIn(self.transport, self.reactor.writers)

    def test_other_transports(self) -> None:
        """Any other transport gets loseWriteConnection / loseConnection."""
        transport = StringTransport()
        half_close(transport)
        self.assertTrue(transport.disconnecting)  # StringTransport has no half-close
        transport = StringTransport()
        close(transport)
        self.assertTrue(transport.disconnecting)
