"""
Tests for the lean TLS client of backend connections
(L{twisted_slb._io.leantls.connect}, used by L{UpstreamPool.get} for groups
with C{tls}), end to end over loopback against a TLS backend that logs
every decrypted byte it receives and the SNI name it was sent.

What they hold it to: the certificate is verified as on Twisted's path (the
chain by OpenSSL, the name by service_identity, DNS name or IP address), not
one byte of a request reaches a backend that fails, and once verified the
connection is a lean transport that carries requests, large bodies both
ways under back-pressure, and closes as TLS does (close_notify or not).
"""

from __future__ import annotations

import os
import socket
from typing import List, Optional

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL, crypto
from twisted.internet import defer, error, reactor
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.testing import MemoryReactor
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from tests.buffers import shrink
from tests.certs import CertificateAuthority
from twisted_slb._io import lean, leantls
from twisted_slb.backends import Backend
from twisted_slb.config import BackendTLSConfig
from twisted_slb.tls import ClientTLSCache, client_tls_options
from twisted_slb.web.upstream import UpstreamPool

_lib = Binding.lib


@implementer(IOpenSSLServerConnectionCreator)
class ServerContext:
    """A backend's TLS context that records the SNI name of each handshake."""

    def __init__(self, issued) -> None:
        self.names: List[Optional[bytes]] = []
        ctx = self.context = SSL.Context(SSL.TLS_METHOD)
        ctx.use_certificate(crypto.X509.from_cryptography(issued.certificate))
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(issued.key))
        ctx.set_tlsext_servername_callback(lambda conn: self.names.append(conn.get_servername()))

    def serverConnectionForTLS(self, protocol) -> SSL.Connection:
        return SSL.Connection(self.context, None)


class BackendProtocol(Protocol):
    """
    A backend: logs what it receives (decrypted) and answers each request
    head with C{factory.response}; then, with C{factory.close}, closes:
    C{"tls"} with close_notify, C{"tcp"} the TCP connection without one.
    """

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.received = b""
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.factory.log.append(data)
        self.received += data
        while self.factory.respond and b"\r\n\r\n" in self.received:
            head, _, self.received = self.received.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            self.body_left = length[0] if length else 0
            if self.body_left:
                self.factory.bodies.append(self)
                return
            self.answer()

    def answer(self) -> None:
        self.transport.write(self.factory.response)
        if self.factory.close == "tls":
            self.transport.loseConnection()
        elif self.factory.close == "tcp":
            self.transport.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.lost.callback(None)


class BackendFactory(ServerFactory):
    protocol = BackendProtocol

    def __init__(self) -> None:
        self.connections: List[BackendProtocol] = []
        self.log: List[bytes] = []
        self.bodies: List[BackendProtocol] = []
        self.respond = True
        self.response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        self.close: Optional[str] = None


class Handler:
    """An L{IResponseHandler} that keeps the response."""

    def __init__(self) -> None:
        self.code: Optional[int] = None
        self.body = b""
        self.done: defer.Deferred = defer.Deferred()

    def response_head(self, code, reason, headers) -> None:
        self.code = code

    def response_data(self, data: bytes) -> None:
        self.body += data

    def response_end(self) -> None:
        self.done.callback(self)

    def response_failed(self, reason, received: bool) -> None:
        self.done.errback(reason)


class Base(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.ca = CertificateAuthority()
        self.ca_path = self.ca.write(os.path.abspath(self.mktemp()))
        self.pool = UpstreamPool(reactor)
        self.addCleanup(self.pool.close)
        self.backend_factory = BackendFactory()
        self.cache = ClientTLSCache()

    def listen(self, names=("backend.internal",), ip_addresses=(), issuer=None, small: bool = False) -> int:
        """A TLS backend with a certificate for C{names} / C{ip_addresses}; its port."""
        issued = (issuer or self.ca).issue(list(names), ip_addresses=list(ip_addresses))
        self.server_context = ServerContext(issued)
        sock = socket.socket()
        if small:
            shrink(sock)  # (inherited by the accepted sockets)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)  # (adoptStreamPort's requirement)
        port = reactor.adoptStreamPort(
            sock.fileno(), socket.AF_INET, TLSMemoryBIOFactory(self.server_context, False, self.backend_factory))
        sock.close()
        self.addCleanup(port.stopListening)
        self.addCleanup(self.close_backends)
        return port.getHost().port

    def close_backends(self) -> None:
        for connection in self.backend_factory.connections:
            if not connection.lost.called:
                connection.transport.abortConnection()

    def small_client_sockets(self) -> None:
        """Backend connections made from now on get small buffers, set before they connect (tests.buffers)."""

        class Sockets:
            def __getattr__(self, name: str):
                return getattr(socket, name)

            def socket(self, *args):
                return shrink(socket.socket(*args))

        self.patch(lean, "socket", Sockets())

    def get(self, port: int, tls: BackendTLSConfig, reuse: bool = False, timeout: float = 10) -> defer.Deferred:
        """A connection from the pool to the backend at C{port}: fires with C{(protocol, reused)}."""
        d: defer.Deferred = defer.Deferred()
        options = self.cache.options_for("b", tls, "127.0.0.1")
        self.pool.get(Backend("b", "127.0.0.1", port), timeout, lambda proto, reused: d.callback((proto, reused)),
                      d.errback, options, reuse=reuse, shape=(tls, None))
        return d

    def verified(self, server_name: str = "backend.internal") -> BackendTLSConfig:
        return BackendTLSConfig(verify=True, ca=self.ca_path, server_name=server_name)

    @defer.inlineCallbacks
    def request(self, proto, head: bytes = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"):
        handler = Handler()
        proto.send(head, handler)
        yield handler.done
        return handler


class VerificationTests(Base):
    """The backend's certificate is checked as on Twisted's path, before anything is sent."""

    @defer.inlineCallbacks
    def test_verifiedNameAccepted(self):
        """
        A backend whose certificate (from the group's CA) names the group's
        server_name: the connection is a lean TLS transport, SNI carried
        the name, and a request gets its answer.
        """
        port = self.listen()
        proto, reused = yield self.get(port, self.verified())
        self.assertIsInstance(proto.transport, leantls.LeanTLSClient)
        self.assertFalse(reused)
        self.assertEqual(self.server_context.names, [b"backend.internal"])
        self.assertIsNotNone(proto.transport.getPeerCertificate())
        handler = yield self.request(proto)
        self.assertEqual((handler.code, handler.body), (200, b"ok"))
        self.assertEqual(b"".join(self.backend_factory.log), b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")

    @defer.inlineCallbacks
    def assertRefused(self, port: int, tls: BackendTLSConfig, why: str):
        failure = yield self.assertFailure(self.get(port, tls), leantls.BackendTLSError)
        self.assertIn(why, str(failure))
        # (The pool's factory adds every protocol it builds to pool.all.)
        self.assertEqual(self.pool.all, set(), "a protocol was built for an unverified backend")
        # The backend saw the handshake and then the end, never a byte of data.
        self.assertEqual(len(self.backend_factory.connections), 1)
        yield self.backend_factory.connections[0].lost
        self.assertEqual(self.backend_factory.log, [])
        return failure

    @defer.inlineCallbacks
    def test_wrongNameRefused(self):
        """
        A certificate that does not name the server_name: the connect fails
        with service_identity's reason, no protocol is built, and the
        backend receives not one byte of data.
        """
        port = self.listen()
        yield self.assertRefused(port, self.verified("other.internal"), "'other.internal'")

    @defer.inlineCallbacks
    def test_unknownIssuerRefused(self):
        """A certificate the group's CA did not issue fails OpenSSL's chain check: refused, 0 bytes."""
        port = self.listen(issuer=CertificateAuthority("another CA"))
        yield self.assertRefused(port, self.verified(), "certificate verify failed")

    @defer.inlineCallbacks
    def test_ipAddressSAN(self):
        """
        Without server_name the backend's IP address is checked against the
        certificate's IP SANs (no SNI is sent for an address); a
        certificate naming only DNS names is refused.
        """
        port = self.listen(names=["backend.internal"], ip_addresses=["127.0.0.1"])
        proto, _ = yield self.get(port, self.verified(""))
        self.assertIsInstance(proto.transport, leantls.LeanTLSClient)
        self.assertEqual(self.server_context.names, [None])
        handler = yield self.request(proto)
        self.assertEqual(handler.code, 200)

    @defer.inlineCallbacks
    def test_ipAddressNotInCertificateRefused(self):
        """A certificate with DNS names only, for a backend checked by its IP address: refused, 0 bytes."""
        port = self.listen(names=["backend.internal"])
        yield self.assertRefused(port, self.verified(""), "'127.0.0.1'")

    @defer.inlineCallbacks
    def test_unverifiedStillSendsSNI(self):
        """
        verify = false: any certificate (here from an unknown CA, naming
        something else) is accepted, and the server name still goes by SNI.
        """
        port = self.listen(names=["whatever.example"], issuer=CertificateAuthority("unknown"))
        proto, _ = yield self.get(port, BackendTLSConfig(verify=False, server_name="a.test"))
        self.assertIsInstance(proto.transport, leantls.LeanTLSClient)
        self.assertEqual(self.server_context.names, [b"a.test"])
        handler = yield self.request(proto)
        self.assertEqual(handler.code, 200)


class ConnectFailureTests(Base):
    """A backend that cannot be reached, or never finishes the handshake."""

    @defer.inlineCallbacks
    def test_connectionRefused(self):
        """Nobody listening: the connect fails with ConnectionRefusedError, as connectSSL's."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        yield self.assertFailure(self.get(port, self.verified()), error.ConnectionRefusedError)

    @defer.inlineCallbacks
    def test_handshakeTimesOut(self):
        """
        A backend that accepts TCP and never answers the ClientHello: the
        connect timeout covers the handshake, and the socket is closed.
        """
        silent = ServerFactory.forProtocol(Protocol)
        lost: defer.Deferred = defer.Deferred()

        class Silent(Protocol):
            def connectionLost(self, reason) -> None:
                lost.callback(None)

        silent.protocol = Silent
        port = reactor.listenTCP(0, silent, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        yield self.assertFailure(self.get(port.getHost().port, self.verified(), timeout=0.2), error.TimeoutError)
        yield lost

    @defer.inlineCallbacks
    def test_closedInTheHandshake(self):
        """A backend that closes as the ClientHello arrives: a BackendTLSError saying the handshake lost it."""

        class Closer(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.loseConnection()

        port = reactor.listenTCP(0, ServerFactory.forProtocol(Closer), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        failure = yield self.assertFailure(self.get(port.getHost().port, self.verified()), leantls.BackendTLSError)
        self.assertIn("handshake", str(failure))


class ConnectionTests(Base):
    """A verified connection: closes, large bodies, reuse."""

    @defer.inlineCallbacks
    def test_backendCloseNotify(self):
        """
        A response delimited by the close, closed with close_notify: it is
        complete (response_end), and the transport says ConnectionDone.
        """
        self.backend_factory.response = b"HTTP/1.1 200 OK\r\n\r\nuntil close"
        self.backend_factory.close = "tls"
        port = self.listen()
        proto, _ = yield self.get(port, self.verified())
        handler = yield self.request(proto)
        self.assertEqual(handler.body, b"until close")
        self.assertFalse(proto.connected)
        self.assertNotIn(proto, self.pool.all)

    @defer.inlineCallbacks
    def test_backendClosesTCPWithoutCloseNotify(self):
        """
        A response delimited by the close, ended by a TCP close without
        close_notify (a truncation attack looks the same): a failure, never
        a complete response.
        """
        self.backend_factory.response = b"HTTP/1.1 200 OK\r\n\r\ncut"
        self.backend_factory.close = "tcp"
        port = self.listen()
        proto, _ = yield self.get(port, self.verified())
        handler = Handler()
        proto.send(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n", handler)
        failure = yield self.assertFailure(handler.done, Exception)
        self.assertFalse(isinstance(failure, error.ConnectionDone), failure)
        self.assertEqual(handler.body, b"cut")

    @defer.inlineCallbacks
    def test_largeResponseUnderBackPressure(self):
        """
        A 4 MB response through small socket buffers while the reader is
        paused: the backend cannot send it all; resumed, every byte arrives
        in order.
        """
        body = os.urandom(4 * 2 ** 20)
        self.backend_factory.response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        port = self.listen(small=True)
        self.small_client_sockets()
        proto, _ = yield self.get(port, self.verified())
        handler = Handler()
        proto.pauseProducing()
        proto.send(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n", handler)
        backend = self.backend_factory.connections[0]
        # Wait until the backend has written the response and the buffers are full.
        while not backend.transport.transport.dataBuffer and not backend.transport.transport._tempDataBuffer:
            yield deferLater(0.01)
        self.assertEqual(handler.body, b"")
        proto.resumeProducing()
        yield handler.done
        self.assertEqual(len(handler.body), len(body))
        self.assertEqual(handler.body, body)

    @defer.inlineCallbacks
    def test_largeRequestBodyUnderBackPressure(self):
        """
        A 4 MB request body written while the backend does not read: the
        transport buffers what the socket does not take and pauses a
        streaming producer; the backend then gets every byte in order.
        """
        self.backend_factory.response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        port = self.listen(small=True)
        self.small_client_sockets()
        proto, _ = yield self.get(port, self.verified())
        backend = self.backend_factory.connections[0]
        backend.transport.pauseProducing()
        body = os.urandom(4 * 2 ** 20)

        class Producer:
            paused = 0

            def pauseProducing(self) -> None:
                self.paused += 1

            def resumeProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        producer = Producer()
        proto.transport.registerProducer(producer, True)
        handler = Handler()
        handler.done.addErrback(lambda f: None)  # (no answer: the pool's close cuts it)
        proto.send(b"POST / HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n\r\n" % len(body), handler)
        proto.transport.write(body)
        self.assertGreater(producer.paused, 0)
        self.assertGreater(len(proto.transport._buffer), 0)
        backend.factory.respond = False
        backend.transport.resumeProducing()
        while sum(map(len, self.backend_factory.log)) < len(body):
            yield deferLater(0.01)
        received = b"".join(self.backend_factory.log)
        self.assertEqual(received[received.index(b"\r\n\r\n") + 4:], body)
        proto.transport.unregisterProducer()

    @defer.inlineCallbacks
    def test_poolReusesTheConnection(self):
        """
        A verified connection given back to the pool carries the next
        request of the same group; a new connection to the same key resumes
        the TLS session of the first.
        """
        port = self.listen()
        proto, _ = yield self.get(port, self.verified())
        yield self.request(proto)
        proto.release()
        again, reused = yield self.get(port, self.verified(), reuse=True)
        self.assertIs(again, proto)
        self.assertTrue(reused)
        handler = yield self.request(again)
        self.assertEqual(handler.body, b"ok")
        self.assertEqual(len(self.backend_factory.connections), 1)
        fresh, reused = yield self.get(port, self.verified(), reuse=False)
        self.assertIsNot(fresh, proto)
        self.assertFalse(reused)
        self.assertEqual(_lib.SSL_session_reused(fresh.transport.tls._ssl), 1)
        self.assertEqual(_lib.SSL_session_reused(proto.transport.tls._ssl), 0)

    @defer.inlineCallbacks
    def test_otherSettingsOnTheSameAddressStillChecked(self):
        """
        After a verified connection left its session, a group with another
        server_name on the same backend address (its own pool key: no
        session to resume, no connection to reuse) is still refused.
        """
        port = self.listen()
        proto, _ = yield self.get(port, self.verified())
        yield self.request(proto)
        failure = yield self.assertFailure(self.get(port, self.verified("other.internal")), leantls.BackendTLSError)
        self.assertIn("'other.internal'", str(failure))


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


class FallbackTests(SynchronousTestCase):
    """Where the lean client cannot run, connectSSL does, with the same options."""

    def options(self):
        return client_tls_options(BackendTLSConfig(verify=False, server_name="a.test"), "127.0.0.1")

    def test_notALeanReactor(self) -> None:
        """A reactor the lean transports cannot drive: connectSSL with the group's options."""
        memory = MemoryReactor()
        pool = UpstreamPool(memory)
        options = self.options()
        pool.get(Backend("b", "127.0.0.1", 443), 5, lambda *a: None, lambda *a: None, options)
        self.assertEqual(len(memory.sslClients), 1)
        self.assertIs(memory.sslClients[0][3], options)

    def test_switchedOff(self) -> None:
        """TWISTED_SLB_LEAN_TLS=0 (L{leantls.enabled} false): connectSSL, on any reactor."""
        self.patch(leantls, "enabled", False)
        calls = []
        self.patch(reactor, "connectSSL", lambda *a, **kw: calls.append(a))
        pool = UpstreamPool(reactor)
        pool.get(Backend("b", "127.0.0.1", 443), 5, lambda *a: None, lambda *a: None, self.options())
        self.assertEqual(len(calls), 1)

    def test_hostName(self) -> None:
        """A backend given by host name: connectSSL, which resolves it."""
        calls = []
        self.patch(reactor, "connectSSL", lambda *a, **kw: calls.append(a))
        pool = UpstreamPool(reactor)
        pool.get(Backend("b", "localhost", 443), 5, lambda *a: None, lambda *a: None, self.options())
        self.assertEqual(calls[0][:2], ("localhost", 443))

    def test_poolNotLean(self) -> None:
        """A pool told not to use lean transports: connectSSL."""
        calls = []
        self.patch(reactor, "connectSSL", lambda *a, **kw: calls.append(a))
        pool = UpstreamPool(reactor)
        pool.lean = False
        pool.get(Backend("b", "127.0.0.1", 443), 5, lambda *a: None, lambda *a: None, self.options())
        self.assertEqual(len(calls), 1)


class TwistedPathTests(Base):
    """The same options on Twisted's path (connectSSL, the health checks) still verify."""

    @defer.inlineCallbacks
    def test_connectSSLStillVerifies(self):
        """With the lean client off, a wrong name still fails and a right one still works."""
        self.patch(leantls, "enabled", False)
        port = self.listen()
        proto, _ = yield self.get(port, self.verified())
        self.assertIsInstance(proto.transport, TLSMemoryBIOProtocol)
        handler = yield self.request(proto)
        self.assertEqual(handler.code, 200)
        proto2, _ = yield self.get(port, self.verified("other.internal"))
        handler = Handler()
        proto2.send(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n", handler)
        yield self.assertFailure(handler.done, Exception)
        self.assertEqual(b"".join(self.backend_factory.log).count(b"GET"), 1)
        self.flushLoggedErrors()



class ProxyTests(Base):
    """Through the HTTP proxy: the lean TLS client under a listener, as a client sees it."""

    @defer.inlineCallbacks
    def proxied(self, tls: BackendTLSConfig, request: bytes) -> defer.Deferred:
        from twisted.internet.protocol import ClientCreator

        from tests.test_smuggling import Client
        from twisted_slb.backends import BackendGroup
        from twisted_slb.web.front import HTTPFrontFactory
        from twisted_slb.web.proxy import BalancedProxyResource

        port = self.listen()
        group = BackendGroup("b", [Backend("s", "127.0.0.1", port)], tls=tls)
        resource = BalancedProxyResource(group, pool=self.pool, tls=self.cache, access_log=False)
        listening = reactor.listenTCP(0, HTTPFrontFactory(resource, reactor=reactor), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        client = Client()
        yield ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", listening.getHost().port)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        client.transport.write(request)
        received = yield client.until(b"\r\n\r\n")
        return received

    @defer.inlineCallbacks
    def test_wrongNameIs502WithTheReasonLogged(self):
        """
        A POST (not retried once sent) to a backend whose certificate names
        another host: 502, the reason in the proxy's log line, and not a
        byte of the request at the backend.
        """
        from tests.test_tls import LogCapture

        logs = LogCapture(self)
        received = yield self.proxied(self.verified("other.internal"),
                                      b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        self.assertTrue(received.startswith(b"HTTP/1.1 502 "), received)
        self.assertEqual(self.backend_factory.log, [])
        self.assertTrue(logs.mentioning("TLS to the backend failed: its certificate is not valid for 'other.internal'"))

    @defer.inlineCallbacks
    def test_rightNameProxied(self):
        """The right name: the backend's answer, over a lean TLS connection of the pool."""
        received = yield self.proxied(self.verified(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received)
        self.assertTrue(self.pool.all)
        self.assertTrue(all(isinstance(p.transport, leantls.LeanTLSClient) for p in self.pool.all))
