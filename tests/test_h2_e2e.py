"""
HTTP/2 on an https listener end to end, over loopback: the real service with
its default ALPN (h2, http/1.1), Twisted backends behind it, and real
clients: C{curl --http2} with a cookie jar, C{h2load} (Debian's
nghttp2-client, installed by C{run-tests}), a WebSocket client that offers
only http/1.1, and a headless Chromium (Debian's C{chromium}) whose cookie
pins it to one backend, with the access log saying HTTP/2.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.certs import CertificateAuthority
from tests.test_admin_browser import COMMON, DevTools
from tests.test_leantls import ResettingClient, client_context
from tests.test_proxy import SwitchingBackend, TunnelClient
from twisted_slb._io import leantls
from twisted_slb.config import load_config
from twisted_slb.service import BalancerService
from twisted_slb.web.h2 import H2FrontChannel

CURL = shutil.which("curl") or "/usr/bin/curl"
H2LOAD = shutil.which("h2load") or "/usr/bin/h2load"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class Named(Resource):
    """A backend page naming its backend, with what the request looked like."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        Resource.__init__(self)
        self.name = name

    def render(self, request):
        request.setHeader(b"content-type", b"text/html")
        proto = (request.getHeader(b"x-forwarded-proto") or b"-").decode()
        cookie = (request.getHeader(b"cookie") or b"").decode()
        return (f"<html><body><p id=who>backend={self.name}</p><p>proto={proto} cookie=[{cookie}] "
                f"body={len(request.content.read())}</p></body></html>").encode()


class Watched(Request):
    """A backend request that tells its site when body bytes arrive (before the body ended)."""

    def handleContentChunk(self, data):
        Request.handleContentChunk(self, data)
        self.channel.site.body_chunk(data)


CONFIG = """
[backends.web]
servers = [ {{ name = "a", address = "127.0.0.1:{a}" }}, {{ name = "b", address = "127.0.0.1:{b}" }} ]

[backends.ws]
servers = [ {{ name = "w", address = "127.0.0.1:{ws}" }} ]

[listeners.secure]
protocol = "https"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "insert_cookie", timeout = 3600 }}
certificates = [ {{ cert = "{cert}", key = "{key}" }} ]
access_log = "{log}"
{extra}

[[listeners.secure.rules]]
path = "/ws"
backends = "ws"
"""


class H2EndToEndTests(TestCase):
    timeout = 120
    config = CONFIG

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.ca = CertificateAuthority()
        self.ca_path = self.ca.write(self.dir)
        self.cert, self.key = self.ca.issue(["localhost"], ip_addresses=["127.0.0.1"]).write(self.dir, "site")
        self.log_path = os.path.join(self.dir, "access.log")
        ports = {}
        for name in "ab":
            port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(Named(name)))
            self.addCleanup(port.stopListening)
            ports[name] = port.getHost().port
        self.ws_backend = protocol.ServerFactory.forProtocol(SwitchingBackend)
        self.ws_backend.connections, self.ws_backend.heads = [], []
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.ws_backend)
        self.addCleanup(port.stopListening)
        ports["ws"] = port.getHost().port
        self.ports = ports

    def start(self, extra: str = "") -> None:
        path = os.path.join(self.dir, "slb.toml")
        with open(path, "w") as f:
            f.write(self.config.format(cert=self.cert, key=self.key, log=self.log_path, extra=extra, **self.ports))
        self.service = BalancerService(load_config(path), reactor)
        self.service.startService()
        self.stopped = False
        self.addCleanup(self.stop)
        self.port = self.service.getServiceNamed("secure").port.getHost().port
        self.url = f"https://localhost:{self.port}/"

    def stop(self):
        if self.stopped:
            return None
        self.stopped = True
        return self.service.stopService()

    @defer.inlineCallbacks
    def access_lines(self):
        """The access log, once the service stopped (which flushes it)."""
        yield self.stop()
        with open(self.log_path) as f:
            return f.read().splitlines()

    def curl(self, *args: str):
        argv = ["-sS", "--cacert", self.ca_path, "--resolve", f"localhost:{self.port}:127.0.0.1", *args]
        return getProcessOutputAndValue(CURL, argv, env=os.environ)

    @defer.inlineCallbacks
    def test_curlHttp2CookiePinsAndLogSaysHTTP2(self):
        """
        curl --http2 with a cookie jar: HTTP/2 is negotiated, the first
        response sets the Secure insert cookie, the next requests carry it
        and reach the same backend (persistence=hit), a POST body arrives,
        and the access log has the protocol: "GET / HTTP/2".
        """
        self.start()
        jar = os.path.join(self.dir, "jar")
        bodies = []
        for i in range(4):
            out, err, code = yield self.curl("--http2", "-c", jar, "-b", jar, "-D", "-",
                                             "-w", "\nversion=%{http_version}", self.url)
            self.assertEqual(code, 0, err)
            text = out.decode()
            self.assertIn("version=2", text)
            self.assertTrue(text.startswith("HTTP/2 200"), text)
            if i == 0:
                self.assertIn("set-cookie: SERVERID=", text)
                self.assertIn("; Secure", text)
            bodies.append(re.search(r"backend=(\w)", text).group(1))
        self.assertEqual(len(set(bodies)), 1, bodies)
        upload = os.path.join(self.dir, "upload")
        with open(upload, "wb") as f:
            f.write(b"x" * 300000)
        out, err, code = yield self.curl("--http2", "-b", jar, "--data-binary", "@" + upload, self.url)
        self.assertEqual(code, 0, err)
        self.assertIn(f"backend={bodies[0]}", out.decode())
        self.assertIn("body=300000", out.decode())
        self.assertIn("proto=https", out.decode())
        lines = yield self.access_lines()
        h2_lines = [line for line in lines if '"GET / HTTP/2" 200' in line]
        self.assertEqual(len(h2_lines), 4, lines)
        self.assertIn("persistence=new", h2_lines[0])
        self.assertTrue(all("persistence=hit" in line for line in h2_lines[1:]), h2_lines)
        self.assertTrue(any('"POST / HTTP/2" 200' in line for line in lines), lines)

    @defer.inlineCallbacks
    def test_http11StillServedAndCanBeTheOnlyOne(self):
        """A client offering only http/1.1 gets HTTP/1.1; alpn = ["http/1.1"] turns HTTP/2 off."""
        self.start()
        out, err, code = yield self.curl("--http1.1", "-o", "/dev/null", "-w", "%{http_version}", self.url)
        self.assertEqual(out, b"1.1", err)
        yield self.stop()
        self.start('alpn = ["http/1.1"]')
        out, err, code = yield self.curl("--http2", "-o", "/dev/null", "-w", "%{http_version}", self.url)
        self.assertEqual(out, b"1.1", err)

    @defer.inlineCallbacks
    def test_h2load(self):
        """
        h2load, 4 connections of 10 concurrent streams each: every request
        succeeds with 200 (streams multiplexed on each connection).
        """
        self.start()
        out, err, code = yield getProcessOutputAndValue(
            H2LOAD, ["-n", "400", "-c", "4", "-m", "10", f"https://127.0.0.1:{self.port}/"], env=os.environ)
        text = out.decode()
        self.assertEqual(code, 0, text + err.decode())
        self.assertIn("Application protocol: h2", text)
        self.assertRegex(text, r"requests: 400 total, 400 started, 400 done, 400 succeeded")
        self.assertRegex(text, r"status codes: 400 2xx")
        lines = yield self.access_lines()
        self.assertEqual(len([line for line in lines if '"GET / HTTP/2" 200' in line]), 400)

    @defer.inlineCallbacks
    def test_websocketOverHttp11(self):
        """
        A WebSocket client offers http/1.1 over ALPN (as browsers do for
        WebSockets without RFC 8441): the Upgrade is forwarded and the
        connection becomes a tunnel, on a listener that offers h2 too.
        """
        self.start()
        with open(self.ca_path, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        options = ssl.optionsForClientTLS("localhost", trustRoot=trust, acceptableProtocols=[b"http/1.1"])
        client = TunnelClient(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
                              b"Upgrade: websocket\r\n\r\n")
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port))
        yield connectProtocol(endpoint, client)
        yield client.wait_for(b"hello")
        self.assertTrue(client.received.startswith(b"HTTP/1.1 101 "), client.received)
        self.assertEqual(client.transport.negotiatedProtocol, b"http/1.1")
        client.transport.write(b"ping")
        yield client.wait_for(b"PING")
        client.transport.loseConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_gracefulShutdownFinishesStreams(self):
        """
        Shutdown while an HTTP/2 upload is in flight: the listener stops,
        GOAWAY goes out, and the stream in flight still gets its answer.
        """
        self.start()
        # curl reads its upload from a pipe that the test feeds: the stream
        # is in flight (headers sent, body arriving) when shutdown begins.
        argv = [CURL, "-sS", "--http2", "--cacert", self.ca_path, "--resolve", f"localhost:{self.port}:127.0.0.1",
                "-H", "Expect:", "-T", "-", "-X", "POST", self.url]
        done: defer.Deferred = defer.Deferred()

        class Curl(protocol.ProcessProtocol):
            out = b""

            def outReceived(self, data):
                self.out += data

            def processEnded(self, reason):
                done.callback((self.out, reason.value.exitCode))

        factory = self.service.getServiceNamed("secure").factory.wrappedFactory
        arrived: defer.Deferred = defer.Deferred()
        # Called with each request once its head is read (before its body).
        factory.check_head = lambda request: arrived.called or arrived.callback(request)
        curl = Curl()
        reactor.spawnProcess(curl, CURL, argv, env=os.environ)
        curl.transport.write(b"x" * 1000)
        self.addCleanup(lambda: done.called or curl.transport.signalProcess("KILL"))
        request = yield arrived
        self.assertEqual(request.clientproto, b"HTTP/2")
        channel = next(iter(factory.channels))
        went: defer.Deferred = defer.Deferred()
        goaway = channel.goaway

        def goaway_sent():
            goaway()
            went.callback(None)

        channel.goaway = goaway_sent
        stopping = self.service.stopService()
        self.stopped = True
        yield went
        self.assertTrue(channel.draining)
        curl.transport.write(b"y" * 1000)
        curl.transport.closeStdin()
        out, code = yield done
        self.assertEqual(code, 0)
        self.assertIn(b"body=2000", out)
        yield stopping

    @defer.inlineCallbacks
    def test_leanTLSClientGoneBeforeSettingsStillDrains(self):
        """
        On the lean TLS transport, a client that offers h2, sends its last
        handshake message and resets the connection at once (as Chromium
        does with a spare connection): the HTTP/2 channel taking over meets
        a broken pipe with its SETTINGS, and it is that channel whose close
        the listener hears, so no connection is left and stopService ends
        (it waited for the HTTP/2 channel forever).
        """
        self.patch(leantls, "enabled", True)
        self.start()
        factory = self.service.getServiceNamed("secure").factory.wrappedFactory
        closed: defer.Deferred = defer.Deferred()
        channel_closed = factory.channel_closed

        def record(channel):
            channel_closed(channel)
            if not closed.called:
                closed.callback(channel)

        factory.channel_closed = record
        client = ResettingClient(client_context(alpn=[b"h2"]))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        channel = yield closed
        self.assertIsInstance(channel.transport, leantls.LeanTLSServer)
        self.assertIsInstance(channel, H2FrontChannel)
        self.assertEqual((factory.channels, factory.limit.open), (set(), 0))
        yield self.stop()

    @defer.inlineCallbacks
    def test_chromiumOverHttp2IsPinnedByItsCookie(self):
        """
        A real headless Chromium loads a page through the listener three
        times: it speaks HTTP/2 (nextHopProtocol "h2"), its SERVERID cookie
        keeps it on one backend, and the access log says HTTP/2 with
        persistence new, then hit.
        """
        self.start()
        devtools = DevTools()
        profile = os.path.abspath(self.mktemp())
        reactor.spawnProcess(
            devtools, CHROMIUM,
            [CHROMIUM, *COMMON, "--ignore-certificate-errors", f"--user-data-dir={profile}",
             "--host-resolver-rules=MAP localhost 127.0.0.1", "--remote-debugging-pipe"],
            env=os.environ, childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"},
        )

        def close():
            if devtools.ended.called:
                return None
            devtools.send("Browser.close").addErrback(lambda _: None)
            return devtools.ended

        self.addCleanup(close)
        seen = []
        session = yield devtools.open(self.url)
        for i in range(3):
            if i:
                loaded = devtools.event("Page.loadEventFired")
                yield devtools.send("Page.reload", session)
                yield loaded
            found = yield devtools.evaluate(session, "JSON.stringify({who: document.getElementById('who')"
                                                     ".textContent, proto: performance.getEntriesByType("
                                                     "'navigation')[0].nextHopProtocol})")
            seen.append(json.loads(found))
        self.assertEqual({s["proto"] for s in seen}, {"h2"}, seen)
        self.assertEqual(len({s["who"] for s in seen}), 1, seen)
        yield close()
        lines = yield self.access_lines()
        page = [line for line in lines if '"GET / HTTP/2" 200' in line]
        self.assertEqual(len(page), 3, lines)
        self.assertIn("persistence=new", page[0])
        self.assertTrue(all("persistence=hit" in line for line in page[1:]), page)


    @defer.inlineCallbacks
    def test_curlUploadOfSeveralMegabytesIsWhole(self):
        """
        curl --http2 --data-binary @file of 4 MB: the backend gets the
        whole body (its count is in the response), the stream's window
        having been opened again and again as the body went on.
        """
        self.start()
        upload = os.path.join(self.dir, "upload")
        size = 4 * 1024 * 1024
        with open(upload, "wb") as f:
            f.write(os.urandom(size))
        out, err, code = yield self.curl("--http2", "--data-binary", "@" + upload, "-w", "\nversion=%{http_version}",
                                         self.url)
        self.assertEqual(code, 0, err)
        self.assertIn(f"body={size}", out.decode())
        self.assertIn("version=2", out.decode())

    @defer.inlineCallbacks
    def test_backendSeesTheFirstBytesBeforeTheLast(self):
        """
        curl --http2 uploads from a pipe the test feeds: the backend gets
        the first bytes while curl has not sent the rest (nor END_STREAM);
        then the rest comes and the backend counts the whole body.
        """
        arrived: list = []
        first: defer.Deferred = defer.Deferred()
        site = Site(Named("s"))
        site.requestFactory = Watched

        def body_chunk(data):
            arrived.append(data)
            if sum(map(len, arrived)) >= 5000 and not first.called:
                first.callback(None)

        site.body_chunk = body_chunk
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        self.ports["a"] = self.ports["b"] = port.getHost().port
        self.start()
        argv = [CURL, "-sS", "--http2", "--cacert", self.ca_path, "--resolve", f"localhost:{self.port}:127.0.0.1",
                "-H", "Expect:", "-T", "-", "-X", "POST", self.url]
        done: defer.Deferred = defer.Deferred()

        class Curl(protocol.ProcessProtocol):
            out = b""

            def outReceived(self, data):
                self.out += data

            def processEnded(self, reason):
                done.callback((self.out, reason.value.exitCode))

        curl = Curl()
        reactor.spawnProcess(curl, CURL, argv, env=os.environ)
        self.addCleanup(lambda: done.called or curl.transport.signalProcess("KILL"))
        curl.transport.write(b"x" * 5000)
        yield first  # the backend has 5000 bytes; curl still waits for more from the pipe
        self.assertFalse(done.called)
        curl.transport.write(b"y" * 3000)
        curl.transport.closeStdin()
        out, code = yield done
        self.assertEqual(code, 0)
        self.assertIn(b"body=8000", out)
        self.assertEqual(b"".join(arrived), b"x" * 5000 + b"y" * 3000)

    @defer.inlineCallbacks
    def test_requestBufferingOnARuleSendsAContentLength(self):
        """
        request_buffering = true on a rule: an HTTP/2 upload without a
        content-length (curl -T from a pipe) reaches the backend whole,
        with a Content-Length (no chunked body).
        """
        heads: list = []

        class Recording(Named):
            def render(self, request):
                heads.append((request.getHeader(b"content-length"), request.getHeader(b"transfer-encoding")))
                return Named.render(self, request)

        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(Recording("r")))
        self.addCleanup(port.stopListening)
        self.ports["ws"] = port.getHost().port
        self.config = CONFIG.replace('backends = "ws"\n', 'backends = "ws"\nrequest_buffering = true\n')
        self.start()
        argv = [CURL, "-sS", "--http2", "--cacert", self.ca_path, "--resolve", f"localhost:{self.port}:127.0.0.1",
                "-H", "Expect:", "-T", "-", "-X", "POST", self.url + "ws"]
        done: defer.Deferred = defer.Deferred()

        class Curl(protocol.ProcessProtocol):
            out = b""

            def outReceived(self, data):
                self.out += data

            def processEnded(self, reason):
                done.callback((self.out, reason.value.exitCode))

        curl = Curl()
        reactor.spawnProcess(curl, CURL, argv, env=os.environ)
        self.addCleanup(lambda: done.called or curl.transport.signalProcess("KILL"))
        curl.transport.write(b"z" * 100000)
        curl.transport.closeStdin()
        out, code = yield done
        self.assertEqual(code, 0)
        self.assertIn(b"body=100000", out)
        self.assertEqual(heads, [(b"100000", None)])
