"""
Tests for L{twisted_slb._io.leantls}: TLS served by OpenSSL on the socket, end
to end over loopback, against the ideas of Twisted's own TLS tests (a
close_notify each way, half-close, renegotiation refused, garbage before the
handshake, a handshake that never finishes, back-pressure under a slow
reader, large writes), and the behaviour of the Twisted path it replaces
(SNI, ALPN, session tickets, the failed-handshake log lines).

The client is pyOpenSSL on memory BIOs over a Twisted TCP connection, so a
test decides exactly what it sends: a close_notify or none, a
renegotiation, half a ClientHello.
"""

from __future__ import annotations

import socket
import struct
from typing import List, Optional

from OpenSSL import SSL
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    INegotiated,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from tests.buffers import small_tcp_pair
from tests.test_tls import DEFAULT, EXACT, LogCapture, _client_hello, certificate_set, names_of
from twisted_slb import tls
from twisted_slb._io import leantls


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class App(Protocol):
    """The server's application: records what happens, echoes on request."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.received = b""
        self.handshakes = 0
        self.write_closed = False
        self.lost: defer.Deferred = defer.Deferred()
        self.paused = 0
        self.resumed = 0

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            self.transport.write(data)

    def readConnectionLost(self) -> None:
        raise AssertionError("a TLS connection is never half-closed by the client's FIN")

    def writeConnectionLost(self) -> None:
        self.write_closed = True

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.lost.callback(None)

    # as the HTTPS listener's connection: the producer of its transport
    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


class Apps(ServerFactory):
    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.protocols: List[App] = []
        self.built: defer.Deferred = defer.Deferred()

    def buildProtocol(self, addr):
        app = App(self.echo)
        app.factory = self
        self.protocols.append(app)
        if not self.built.called:
            self.built.callback(app)
        return app


@implementer(IHalfCloseableProtocol)
class Client(Protocol):
    """
    A TLS client on memory BIOs: it sends only what the test asks for (no
    close_notify of its own unless told), and keeps sending after the
    server's FIN.
    """

    eof = False
    #: after the server's FIN: keep the connection open to send more
    keep_sending = False

    def readConnectionLost(self) -> None:
        self.eof = True
        if not self.keep_sending:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def __init__(self, context: SSL.Context, server_name: Optional[bytes] = None, session=None) -> None:
        self.tls = SSL.Connection(context, None)
        self.tls.set_connect_state()
        if server_name is not None:
            self.tls.set_tlsext_host_name(server_name)
        if session is not None:
            self.tls.set_session(session)
        self.handshake: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()
        self.received = b""
        self.close_notify = False
        self.error: Optional[BaseException] = None
        self._waiting: List[tuple] = []

    def connectionMade(self) -> None:
        self.step()

    def dataReceived(self, data: bytes) -> None:
        self.tls.bio_write(data)
        self.step()

    def step(self) -> None:
        if not self.handshake.called:
            try:
                self.tls.do_handshake()
            except SSL.WantReadError:
                self.flush()
                return
            except SSL.Error as e:
                self.error = e
                self.flush()
                self.handshake.errback(e)
                return
            self.handshake.callback(self)
        while True:
            try:
                data = self.tls.recv(65536)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self.close_notify = True
                break
            except SSL.Error as e:
                self.error = e
                break
            self.received += data
        self.flush()
        waiting, self._waiting = self._waiting, []
        for size, d in waiting:
            if len(self.received) >= size:
                d.callback(self.received)
            else:
                self._waiting.append((size, d))

    def flush(self) -> None:
        out = b""
        while True:
            try:
                out += self.tls.bio_read(65536)
            except SSL.WantReadError:
                break
        if out and self.transport is not None:
            self.transport.write(out)

    def send(self, data: bytes) -> None:
        self.tls.sendall(data)
        self.flush()

    def receive(self, size: int) -> defer.Deferred:
        """Fires with everything received once C{size} bytes have come."""
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((size, d))
        self.step()
        return d

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.lost.callback(None)


def client_context(version: Optional[int] = None, alpn=()) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if version is not None:
        ctx.set_max_proto_version(version)
    if alpn:
        ctx.set_alpn_protos(list(alpn))
    return ctx


class LeanTLSTests(TestCase):
    """An https listener's connections on L{leantls.LeanTLSServer}."""

    timeout = 20

    def setUp(self) -> None:
        self.patch(leantls, "enabled", True)  # whatever the environment says
        self.logs = LogCapture(self)
        self.clock = Clock()  # the handshake timeout's
        self.options = tls.SNIServerOptions(
            certificate_set(self, DEFAULT, EXACT), alpn=("h2", "http/1.1"), clock=reactor
        )
        self.apps = Apps()
        self.factory = tls.server_tls_factory(self.options, self.apps, reactor=self.clock)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.assertTrue(leantls.serve_port(self.port, self.factory, self.factory))

    @defer.inlineCallbacks
    def connect(self, client: Protocol):
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        return client

    @defer.inlineCallbacks
    def handshake(self, version: Optional[int] = None, **kwargs):
        client = yield self.connect(Client(client_context(version, kwargs.pop("alpn", ())), **kwargs))
        yield client.handshake
        app = yield self.apps.built
        # A round trip: the server's side of the handshake is done too.
        client.send(b"!")
        yield client.receive(1)
        client.received = app.received = b""
        return client, app

    @defer.inlineCallbacks
    def test_echoOverTheLeanTransport(self):
        """The application's transport is a L{leantls.LeanTLSServer}, an
        L{ISSLTransport}; it hears handshakeCompleted once and sees the
        client's address; bytes go both ways."""
        client, app = yield self.handshake()
        self.assertIsInstance(app.transport, leantls.LeanTLSServer)
        self.assertTrue(ISSLTransport.providedBy(app.transport))
        self.assertEqual(app.transport.getPeer(), client.transport.getHost())
        client.send(b"ping")
        received = yield client.receive(4)
        self.assertEqual((received, app.handshakes), (b"ping", 1))

    @defer.inlineCallbacks
    def test_everyKindOfWrite(self):
        """C{bytes} (the direct path), a C{bytearray} and a C{memoryview}
        (through a buffer pointer), and bytes longer than a record all
        arrive whole and in order."""
        client, app = yield self.handshake()
        big = bytes(range(256)) * 100  # 25,600 bytes: two records
        app.transport.write(b"one,")
        app.transport.write(bytearray(b"two,"))
        app.transport.write(memoryview(b"xthree,")[1:])
        app.transport.write(big)
        received = yield client.receive(14 + len(big))
        self.assertEqual(received, b"one,two,three," + big)

    @defer.inlineCallbacks
    def test_failedWriteClosesFromTheReactor(self):
        """A write that fails (the client reset the connection) returns to
        its caller normally; the protocol hears C{connectionLost}
        (L{error.ConnectionLost}) afterwards, from the reactor, not in the
        middle of its own C{write}; later writes are dropped."""
        client, app = yield self.handshake()
        app.transport.pauseProducing()  # the server does not read: its write meets the reset first
        sock = client.transport.getHandle()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.transport.abortConnection()
        yield client.lost  # closed: the reset reached the server's socket (loopback)
        app.transport.write(b"x" * 100)
        self.assertFalse(app.lost.called, "connectionLost came from inside write")
        app.transport.write(b"more")
        self.assertFalse(app.lost.called)
        yield app.lost
        self.assertTrue(app.reason.check(error.ConnectionLost), app.reason)

    @defer.inlineCallbacks
    def test_sniChoosesTheCertificate(self):
        """The client's SNI name chooses the certificate; no name gets the default."""
        client, _ = yield self.handshake(server_name=b"a.example.com")
        self.assertEqual(names_of(client.tls.get_peer_certificate().to_cryptography()), ["a.example.com"])
        other = yield self.connect(Client(client_context()))
        yield other.handshake
        self.assertEqual(names_of(other.tls.get_peer_certificate().to_cryptography())[0], "default.example")

    @defer.inlineCallbacks
    def test_alpnNegotiatedProtocol(self):
        """ALPN picks h2 from the listener's list; the server transport says
        so by C{negotiatedProtocol} (L{INegotiated}), as Twisted's does."""
        client, app = yield self.handshake(alpn=[b"http/1.1", b"h2"])
        self.assertEqual(client.tls.get_alpn_proto_negotiated(), b"h2")
        self.assertTrue(INegotiated.providedBy(app.transport))
        self.assertEqual(app.transport.negotiatedProtocol, b"h2")

    @defer.inlineCallbacks
    def test_noALPN(self):
        """A client offering no ALPN: C{negotiatedProtocol} is None."""
        _, app = yield self.handshake()
        self.assertIsNone(app.transport.negotiatedProtocol)

    @defer.inlineCallbacks
    def resumes(self, version: int) -> bool:
        from OpenSSL._util import lib

        ctx = client_context(version)
        first = yield self.connect(Client(ctx))
        yield first.handshake
        first.send(b"x")
        yield first.receive(1)  # TLS 1.3: the tickets came after the handshake
        session = first.tls.get_session()
        first.tls.shutdown()
        first.flush()
        yield first.lost
        again = yield self.connect(Client(ctx, session=session))
        yield again.handshake
        return bool(lib.SSL_session_reused(again.tls._ssl))

    @defer.inlineCallbacks
    def test_ticketResumptionTLS12(self):
        """A TLS 1.2 session resumes by its ticket with the session cache off."""
        for context in self.options._current.contexts:
            context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        self.assertTrue((yield self.resumes(SSL.TLS1_2_VERSION)))

    @defer.inlineCallbacks
    def test_ticketResumptionTLS13(self):
        """A TLS 1.3 session resumes."""
        self.assertTrue((yield self.resumes(SSL.TLS1_3_VERSION)))

    @defer.inlineCallbacks
    def test_clientCloseNotify(self):
        """The client's close_notify is answered with ours and the
        connection closes; the application hears ConnectionDone."""
        client, app = yield self.handshake()
        client.tls.shutdown()
        client.flush()
        yield app.lost
        reason = app.reason
        self.assertTrue(reason.check(error.ConnectionDone))
        yield client.lost
        self.assertTrue(client.close_notify)

    @defer.inlineCallbacks
    def test_loseConnectionSendsCloseNotifyWithoutWaiting(self):
        """loseConnection sends what is buffered, then close_notify, and
        closes without waiting for the client's close_notify."""
        client, app = yield self.handshake()
        app.transport.write(b"bye")
        app.transport.loseConnection()
        yield client.lost
        self.assertEqual((client.received, client.close_notify), (b"bye", True))
        yield app.lost
        reason = app.reason
        self.assertTrue(reason.check(error.ConnectionDone))

    @defer.inlineCallbacks
    def test_eofWithoutCloseNotifyIsConnectionLost(self):
        """A client closing TCP without close_notify: the application hears
        ConnectionLost (not readConnectionLost), as over Twisted's TLS."""
        client, app = yield self.handshake()
        client.transport.loseConnection()
        yield app.lost
        reason = app.reason
        self.assertTrue(reason.check(error.ConnectionLost))

    @defer.inlineCallbacks
    def test_halfClose(self):
        """loseWriteConnection sends close_notify and shuts the sending side
        down; the application hears writeConnectionLost and still reads what
        the client sends afterwards (TLS 1.3 allows it)."""
        client, app = yield self.handshake(SSL.TLS1_3_VERSION)
        client.keep_sending = True
        app.echo = False
        app.transport.write(b"last")
        app.transport.loseWriteConnection()
        yield client.receive(4)
        self.assertTrue(client.close_notify)
        self.assertTrue(app.write_closed)
        while not client.eof:  # the FIN follows the close_notify
            yield deferLater(0.01)
        client.send(b"after")
        while app.received != b"after":
            yield deferLater(0.01)
        self.assertFalse(app.lost.called)
        app.transport.loseConnection()
        yield app.lost

    @defer.inlineCallbacks
    def test_renegotiationRefused(self):
        """A TLS 1.2 client asking to renegotiate is refused, as over
        Twisted's TLS: a handshake_failure alert, the connection closed, the
        application told of the SSL error and never of a second handshake."""
        client, app = yield self.handshake(SSL.TLS1_2_VERSION)
        self.assertTrue(client.tls.renegotiate())
        try:
            client.tls.do_handshake()
        except SSL.WantReadError:
            pass
        client.flush()
        yield app.lost
        self.assertTrue(app.reason.check(SSL.Error))
        self.assertEqual(app.handshakes, 1)
        yield client.lost
        self.assertIn("no renegotiation", str(client.error))

    @defer.inlineCallbacks
    def test_garbageBeforeTheHandshake(self):
        """Plain HTTP sent to the TLS port: closed, one info line with
        OpenSSL's reason, the application hears the SSL error."""
        raw = yield self.connect(Recorder())
        raw.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        yield raw.lost
        app = yield self.apps.built
        yield app.lost
        reason = app.reason
        self.assertTrue(reason.check(SSL.Error))
        (line,) = [e for e in self.logs.from_tls() if "client" in e]
        self.assertEqual((line["log_level"], line["reason"]), (LogLevel.info, "http request"))

    @defer.inlineCallbacks
    def test_truncatedHelloLoggedWithItsSize(self):
        """Half a ClientHello then a close: one info line saying how many
        bytes came."""
        hello = _client_hello()
        raw = yield self.connect(Recorder())
        raw.transport.write(hello[: len(hello) // 2])
        app = yield self.apps.built
        while not app.transport.received_bytes:
            yield deferLater(0.01)
        raw.transport.loseConnection()
        yield app.lost
        reason = app.reason
        self.assertTrue(reason.check(error.ConnectionLost))
        (line,) = [e for e in self.logs.from_tls() if "client" in e]
        self.assertEqual((line["log_level"], line["received"]), (LogLevel.info, len(hello) // 2))

    @defer.inlineCallbacks
    def test_silentCloseOnlyDebug(self):
        """A connection closed before sending anything (a port check) is a debug line only."""
        raw = yield self.connect(Recorder())
        app = yield self.apps.built
        raw.transport.loseConnection()
        yield app.lost
        self.assertEqual([e["log_level"] for e in self.logs.from_tls() if "client" in e], [LogLevel.debug])

    @defer.inlineCallbacks
    def test_handshakeThatNeverFinishes(self):
        """A client that sends part of a hello and stops is cut off after
        handshake_timeout, with a log line; not a moment before."""
        raw = yield self.connect(Recorder())
        raw.transport.write(_client_hello()[:10])
        app = yield self.apps.built
        self.clock.advance(9.9)
        self.assertFalse(app.lost.called)
        self.clock.advance(0.1)
        yield app.lost
        reason = app.reason
        self.assertTrue(reason.check(error.ConnectionAborted))
        yield raw.lost
        (line,) = [e for e in self.logs.from_tls() if "client" in e]
        self.assertIn("timed out after 10.0s", line["log_format"].format(**line))

    @defer.inlineCallbacks
    def test_finishedHandshakeIsNotTimedOut(self):
        """Once the handshake is done its timer is gone."""
        yield self.handshake()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_abortConnection(self):
        """abortConnection resets the connection without close_notify."""
        client, app = yield self.handshake()
        app.transport.abortConnection()
        yield client.lost
        reason = client.reason
        self.assertFalse(client.close_notify)
        self.assertTrue(reason.check(error.ConnectionLost))
        yield app.lost
        self.assertTrue(app.reason.check(error.ConnectionAborted))

    @defer.inlineCallbacks
    def test_writeBeforeTheHandshakeWaitsForIt(self):
        """What the application writes before the handshake is done goes
        out once it is."""
        apps = Apps(echo=False)
        apps.protocol_made = []
        original = apps.buildProtocol

        def build(addr):
            app = original(addr)
            app.connectionMade = lambda: app.transport.write(b"early")
            return app

        apps.buildProtocol = build
        self.factory.wrappedFactory = apps
        client = yield self.connect(Client(client_context()))
        received = yield client.receive(5)
        self.assertEqual(received, b"early")


    @defer.inlineCallbacks
    def test_closeWhileTheChosenProtocolConnectsReachesIt(self):
        """
        The protocol ALPN chose (C{protocol_for_alpn}, as an HTTP listener's
        channel hands an h2 connection to HTTP/2) writes as it connects, to
        a client that sent its last handshake message and reset the
        connection (as Chromium does with a spare connection): the broken
        pipe closes the connection, and connectionLost reaches the chosen
        protocol, the one the transport serves from then on, never the one
        that handed it over.
        """
        apps = Apps(echo=False)
        chosen = App(echo=False)
        original = apps.buildProtocol

        def build(addr):
            app = original(addr)

            def protocol_for_alpn(negotiated):
                self.assertEqual(negotiated, b"h2")
                chosen.makeConnection(app.transport)  # as H2FrontChannel.take_over does
                return chosen

            app.protocol_for_alpn = protocol_for_alpn
            return app

        apps.buildProtocol = build
        chosen.connectionMade = lambda: chosen.transport.write(b"SETTINGS" * 1000)
        self.factory.wrappedFactory = apps
        client = yield self.connect(ResettingClient(client_context(alpn=[b"h2"])))
        yield chosen.lost
        self.assertTrue(chosen.reason.check(error.ConnectionLost), chosen.reason)
        self.assertIs(chosen.transport.protocol, None)
        [handed_over] = apps.protocols
        self.assertFalse(handed_over.lost.called)
        yield client.lost


class ResettingClient(Client):
    """A TLS client that sends its last handshake message and resets the
    connection at once (TLS 1.3: its handshake ends before the server's)."""

    def step(self) -> None:
        if self.handshake.called:
            return
        try:
            self.tls.do_handshake()
        except SSL.WantReadError:
            self.flush()
            return
        self.handshake.callback(self)
        out = b""
        while True:
            try:
                out += self.tls.bio_read(65536)
            except SSL.WantReadError:
                break
        sock = self.transport.getHandle()
        sock.sendall(out)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abortConnection()


class Recorder(Protocol):
    """A plain TCP client."""

    def __init__(self) -> None:
        self.lost: defer.Deferred = defer.Deferred()
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.lost.callback(None)


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


class SlowReaderTests(TestCase):
    """Back-pressure with small socket buffers (L{tests.buffers})."""

    timeout = 30

    def setUp(self) -> None:
        self.patch(leantls, "enabled", True)  # whatever the environment says

    def small_connection(self, echo: bool):
        """
        A lean TLS connection on a small-buffered socket pair, its
        application registered as the transport's streaming producer.

        @return: C{(app, transport, client)}; the handshake is not done yet.
        """
        options = tls.SNIServerOptions(certificate_set(self, DEFAULT), clock=reactor)
        apps = Apps(echo=echo)
        factory = tls.server_tls_factory(options, apps, reactor=reactor)
        factory.lean_transport = type("LeanTLSServer", (leantls.LeanTLSServer,), {"tls_factory": factory})
        accepted, peer = small_tcp_pair()
        self.addCleanup(accepted.close)
        self.addCleanup(peer.close)
        peer.setblocking(False)
        client = Client(client_context())
        client_port = reactor.adoptStreamConnection(peer.fileno(), socket.AF_INET, Factory.forProtocol(lambda: client))
        del client_port
        app = factory.buildProtocol(accepted.getpeername())
        transport = factory.lean_transport(accepted, app, accepted.getpeername(), None, 0, reactor)
        app.makeConnection(transport)
        transport.registerProducer(app, True)
        self.addCleanup(lambda: transport.abortConnection())
        return app, transport, client

    @defer.inlineCallbacks
    def test_slowReaderPausesTheProducerAndGetsEverything(self):
        """
        A client that stops reading: a 4 MB write fills the small socket,
        the transport pauses its producer (the application) and sends the
        rest as the client reads again, then resumes it; the client gets
        every byte in order.
        """
        app, transport, client = self.small_connection(echo=False)
        yield client.handshake
        client.transport.pauseProducing()
        payload = bytes(range(256)) * (4 * 4096)
        app.transport.write(payload)
        self.assertEqual(app.paused, 1)
        self.assertGreater(len(transport._buffer), 1024 * 1024)
        client.transport.resumeProducing()
        received = yield client.receive(len(payload))
        self.assertEqual(received, payload)
        self.assertEqual(app.resumed, 1)
        self.assertEqual(len(transport._buffer), 0)

    @defer.inlineCallbacks
    def test_writeRetriedFromTheTransportsCopy(self):
        """
        A write the full socket takes only part of, once the handshake is
        done: OpenSSL stopped mid-record, the rest is copied into the
        transport's buffer, and the record is retried from that copy (the
        same bytes at another address) as the client reads again; the
        client gets every byte in order and the connection stays up.
        Without OpenSSL's ACCEPT_MOVING_WRITE_BUFFER mode on the server's
        contexts (pyOpenSSL 24.3 does not set it; 26.4 does) the retry fails
        ("bad write retry") and the connection is lost.
        """
        app, transport, client = self.small_connection(echo=True)
        yield client.handshake
        # A round trip: the server's side of the handshake is done too.
        client.send(b"!")
        yield client.receive(1)
        client.transport.pauseProducing()
        payload = bytes(range(256)) * (4 * 4096)
        app.transport.write(payload)
        self.assertEqual(app.paused, 1)
        self.assertGreater(len(transport._buffer), 0)
        self.assertLess(len(transport._buffer), len(payload))  # the first part went directly
        client.transport.resumeProducing()
        received = yield client.receive(1 + len(payload))
        self.assertEqual(received, b"!" + payload)
        self.assertIsNone(client.error)
        self.assertTrue(transport.connected)
        self.assertEqual(len(transport._buffer), 0)

    @defer.inlineCallbacks
    def test_largeWritesBothWays(self):
        """Many large writes each way arrive whole and in order."""
        options = tls.SNIServerOptions(certificate_set(self, DEFAULT), clock=reactor)
        apps = Apps(echo=True)
        factory = tls.server_tls_factory(options, apps, reactor=reactor)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertTrue(leantls.serve_port(port, factory, factory))
        client = Client(client_context())
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)
        self.addCleanup(lambda: client.transport.abortConnection())
        yield client.handshake
        payload = b"".join(bytes([i % 251]) * 70001 for i in range(20))
        for start in range(0, len(payload), 300000):
            client.send(payload[start:start + 300000])
        received = yield client.receive(len(payload))
        self.assertEqual(received, payload)


class DirectCallTests(SynchronousTestCase):
    """What L{leantls} takes from pyOpenSSL beyond its public API."""

    def test_pyOpenSSLStillHasWhatLeanTLSUses(self) -> None:
        """A connection still has the C{SSL *} (C{_ssl}) and the error
        mapping (C{_raise_ssl_error}) that the direct record calls use:
        a pyOpenSSL release that renames them fails here, by name."""
        connection = SSL.Connection(SSL.Context(SSL.TLS_SERVER_METHOD), None)
        self.assertTrue(hasattr(connection, "_ssl"), "pyOpenSSL's Connection has no _ssl")
        self.assertTrue(callable(getattr(connection, "_raise_ssl_error", None)),
                        "pyOpenSSL's Connection has no _raise_ssl_error")

    def test_failedCallMapsToPyOpenSSLsError(self) -> None:
        """A failed C{SSL_read} raises what pyOpenSSL's C{recv} raises: on a
        memory-BIO connection mid-handshake with nothing to read, a
        L{SSL.WantReadError}."""
        connection = SSL.Connection(SSL.Context(SSL.TLS_SERVER_METHOD), None)
        connection.set_accept_state()
        result = leantls._SSL_read(connection._ssl, leantls._read_buffer, 10)
        self.assertLessEqual(result, 0)
        self.assertRaises(SSL.WantReadError, leantls._failed, connection, result)

    def test_everyConnectionAcceptsAMovedWriteBuffer(self) -> None:
        """Connections of any context (a backend's client context made
        elsewhere too) may retry a write from a moved buffer: without it
        pyOpenSSL 24.3 (PyPy 3.9's) fails the retry of a write the socket
        took only part of ("bad write retry")."""
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        tls = leantls._new_connection(SSL.Context(SSL.TLS_CLIENT_METHOD), a)
        mode = leantls._SSL_set_mode(tls._ssl, 0)  # (0 adds nothing and returns the mode)
        self.assertTrue(mode & leantls._MOVING_WRITE_BUFFER)

    def test_failureWithoutAnErrorStillRaises(self) -> None:
        """Should OpenSSL report no error for a failed call, the caller
        still gets an L{SSL.Error} (never a negative byte count used as a
        length)."""

        class Quiet:
            _ssl = None

            def _raise_ssl_error(self, ssl, result) -> None:
                pass

        self.assertRaises(SSL.Error, leantls._failed, Quiet(), -1)


class FallbackTests(SynchronousTestCase):
    """Where the lean transport is not used, Twisted's TLS is."""

    def setUp(self) -> None:
        self.patch(leantls, "enabled", True)  # each test says what turns it off
        self.options = tls.SNIServerOptions(certificate_set(self, DEFAULT), clock=Clock())
        self.factory = tls.server_tls_factory(self.options, Apps(), reactor=Clock())

    def test_switchedOff(self) -> None:
        """With L{leantls.enabled} false, the port keeps Twisted's transport
        and the factory wraps its protocols in Twisted's TLS."""
        self.patch(leantls, "enabled", False)
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertFalse(leantls.serve_port(port, self.factory, self.factory))
        self.assertIsNone(self.factory.lean_transport)
        self.assertIsInstance(self.factory.buildProtocol(None), tls._CountingTLSProtocol)

    def test_notALeanReactor(self) -> None:
        """A reactor without file descriptors (here a MemoryReactor) keeps Twisted's TLS."""
        memory = MemoryReactor()
        port = memory.listenTCP(0, self.factory)
        self.assertFalse(leantls.serve_port(port, self.factory, self.factory))

    def test_otherFactoriesUntouched(self) -> None:
        """A factory that is not an https listener's TLS factory is left alone."""
        port = reactor.listenTCP(0, Apps(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertFalse(leantls.serve_port(port, port.factory, port.factory))

    def test_environmentSwitch(self) -> None:
        """It is on by default (or with TWISTED_SLB_LEAN_TLS=1); TWISTED_SLB_LEAN_TLS=0 or off turns it off."""
        import subprocess
        import sys

        for value, expected in (("0", "False"), ("1", "True"), ("off", "False"), (None, "True")):
            out = subprocess.run(
                [sys.executable, "-c", "from twisted_slb._io import leantls; print(leantls.enabled)"],
                env={"PYTHONPATH": ":".join(sys.path), **({"TWISTED_SLB_LEAN_TLS": value} if value else {})},
                capture_output=True, text=True, check=True,
            ).stdout.strip()
            self.assertEqual(out, expected)
