"""
End-to-end tests of L{twisted_slb.service.BalancerService}: a configuration
file becomes real listeners on 127.0.0.1 in front of real backends, and
clients see persistence work (and survive failures and reloads).
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Optional

from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.protocols import policies
from twisted.protocols.basic import LineOnlyReceiver
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from twisted_slb._io import lean
from twisted_slb.config import load_config
from twisted_slb.service import BalancerService


class NamePage(Resource):
    """A backend page that answers with its name (the FAQ's check page)."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        Resource.__init__(self)
        self.name = name
        self.requests = 0

    def render(self, request):
        self.requests += 1
        if request.uri.startswith(b"/redirect"):
            request.setResponseCode(302)
            request.setHeader(b"Location", b"/")
        elif request.uri.startswith(b"/missing"):
            request.setResponseCode(404)
        if request.uri.startswith(b"/session"):
            request.addCookie(b"JSESSIONID", b"s-" + self.name.encode("ascii"), path=b"/")
        request.setHeader(b"Content-Type", b"text/plain")
        seen = request.getHeader(b"cookie") or b""
        return b"backend=" + self.name.encode("ascii") + b" cookie=" + seen + b"\n"


class TrackingSite(Site):
    """A backend site that can be killed: its port and its open connections."""

    protocol = HTTPChannel  # not the HTTP/2-negotiating wrapper: we need .transport

    def __init__(self, resource) -> None:
        Site.__init__(self, resource)
        self.protocols: list = []

    def buildProtocol(self, addr):
        proto = Site.buildProtocol(self, addr)
        self.protocols.append(proto)
        return proto

    def kill(self, port) -> defer.Deferred:
        for proto in self.protocols:
            transport = getattr(proto, "transport", None)
            if transport is not None:
                transport.abortConnection()
        return defer.maybeDeferred(port.stopListening)


class NameEcho(LineOnlyReceiver):
    """A TCP backend: says its name on connect."""

    def connectionMade(self) -> None:
        self.sendLine(b"backend=" + self.factory.name.encode("ascii"))


class NameLineClient(LineOnlyReceiver):
    def __init__(self) -> None:
        self.first: defer.Deferred = defer.Deferred()

    def lineReceived(self, line: bytes) -> None:
        if not self.first.called:
            self.first.callback(line.decode("ascii"))
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.first.called:
            self.first.errback(reason)


class ServiceTestCase(TestCase):
    timeout = 30

    def connect_from(self, source: str) -> defer.Deferred:
        """A connection from C{source} to the balancer's TCP listener (C{self.port}); its first line."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, bindAddress=(source, 0))
        client = NameLineClient()
        return connectProtocol(endpoint, client).addCallback(lambda _: client.first)

    def start_http_backend(self, name: str, port: int = 0):
        page = NamePage(name)
        page.site = TrackingSite(page)
        d = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(page.site)

        def started(p):
            self.addCleanup(p.stopListening)
            return p, page

        return d.addCallback(started)

    def start_tcp_backend(self, name: str):
        factory = protocol.ServerFactory.forProtocol(NameEcho)
        factory.name = name
        d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)

        def started(p):
            self.addCleanup(p.stopListening)
            return p

        return d.addCallback(started)

    def write_config(self, text: str) -> str:
        path = os.path.abspath(self.mktemp() + ".toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def start_balancer(self, text: str) -> BalancerService:
        service = BalancerService(load_config(self.write_config(text)), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def port_of(self, service: BalancerService, name: str) -> int:
        return service.getServiceNamed(name).port.getHost().port

    def agent(self) -> Agent:
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        return Agent(reactor, pool=pool)

    @defer.inlineCallbacks
    def get(self, agent: Agent, url: str, cookies: Optional[Dict[str, str]] = None, host: Optional[str] = None):
        headers = Headers()
        if cookies:
            headers.addRawHeader(b"Cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()).encode())
        if host:
            headers.addRawHeader(b"Host", host.encode())
        response = yield agent.request(b"GET", url.encode(), headers)
        body = yield readBody(response)
        set_cookies = response.headers.getRawHeaders(b"set-cookie", [])
        return response.code, body.decode(), [c.decode() for c in set_cookies]


def backend_of(body: str) -> str:
    return re.search(r"backend=(\w+)", body).group(1)


def jar_update(jar: Dict[str, str], set_cookies: List[str]) -> None:
    for header in set_cookies:
        name, _, rest = header.partition("=")
        jar[name.strip()] = rest.split(";", 1)[0]


HTTP_CONFIG = """
[backends.web]
scheduler = "rr"
servers = [
  {{ name = "a", address = "127.0.0.1:{a}" }},
  {{ name = "b", address = "127.0.0.1:{b}" }},
  {{ name = "c", address = "127.0.0.1:{c}" }},
]

[listeners.web]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "insert_cookie", timeout = 3600 }}

[listeners.app]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = {{ type = "rewrite_cookie", cookie = "JSESSIONID" }}
"""


class HTTPPersistenceTests(ServiceTestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.backends = {}
        ports = {}
        for name in "abc":
            port, page = yield self.start_http_backend(name)
            self.backends[name] = (port, page)
            ports[name] = port.getHost().port
        self.service = self.start_balancer(HTTP_CONFIG.format(**ports))
        self.url = f"http://127.0.0.1:{self.port_of(self.service, 'web')}"
        self.app_url = f"http://127.0.0.1:{self.port_of(self.service, 'app')}"

    @defer.inlineCallbacks
    def test_faqWalkThrough(self):
        """
        The FAQ's test: the first request saves the cookie, the next 30 that
        send it all reach the same backend, and the backend never sees our
        cookie.
        """
        agent = self.agent()
        jar: Dict[str, str] = {}
        code, body, set_cookies = yield self.get(agent, self.url + "/check")
        self.assertEqual(code, 200)
        jar_update(jar, set_cookies)
        self.assertIn("SERVERID", jar)
        first = backend_of(body)
        seen = set()
        for _ in range(30):
            code, body, _ = yield self.get(agent, self.url + "/check", cookies=jar)
            seen.add(backend_of(body))
            self.assertNotIn("SERVERID", body)
        self.assertEqual(seen, {first})

    @defer.inlineCallbacks
    def test_leanTransportsOnBothSides(self):
        """
        A plain HTTP listener's client connections and its connections to
        backends run on L{twisted_slb._io.lean}'s transports.
        """
        self.assertIs(self.service.getServiceNamed("web").port.transport, lean.LeanServer)
        yield self.get(self.agent(), self.url + "/")
        upstreams = list(self.service.pool.all)
        self.assertTrue(upstreams)
        self.assertEqual({type(p.transport) for p in upstreams}, {lean.LeanConnection})

    @defer.inlineCallbacks
    def test_transportFollowsTheFactoryAcrossAReload(self):
        """
        A reload that puts a factory without lean transports (a TLS wrapper)
        behind the port gives new connections Twisted's transports again,
        and a lean one brings them back.
        """
        listener = self.service.getServiceNamed("web")
        lean_factory = listener.factory
        listener.reconfigure(listener.config, policies.WrappingFactory(lean_factory))
        self.assertIs(listener.port.transport, tcp.Server)
        listener.reconfigure(listener.config, lean_factory)
        self.assertIs(listener.port.transport, lean.LeanServer)
        code, _, _ = yield self.get(self.agent(), self.url + "/")
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_withoutCookieRequestsAreSpread(self):
        """Without the cookie (curl with no jar), requests are balanced."""
        agent = self.agent()
        seen = set()
        for _ in range(6):
            _, body, _ = yield self.get(agent, self.url + "/")
            seen.add(backend_of(body))
        self.assertEqual(seen, {"a", "b", "c"})

    @defer.inlineCallbacks
    def test_404And302GetTheCookieAndNeverRepin(self):
        """
        A new client gets the cookie on a 404; a pinned client keeps its
        backend through 302s and 404s (the FAQ's two failure cases).
        """
        agent = self.agent()
        jar: Dict[str, str] = {}
        code, body, set_cookies = yield self.get(agent, self.url + "/missing")
        self.assertEqual(code, 404)
        jar_update(jar, set_cookies)
        self.assertIn("SERVERID", jar)
        first = backend_of(body)
        for path in ("/redirect", "/missing", "/redirect", "/"):
            code, body, set_cookies = yield self.get(agent, self.url + path, cookies=jar)
            self.assertEqual(backend_of(body), first)
            self.assertFalse([c for c in set_cookies if c.startswith("SERVERID=")])

    @defer.inlineCallbacks
    def test_pinnedBackendDownRepins(self):
        """
        When the pinned backend stops, the client is served by another one
        with no error and gets a new cookie, and then stays there.
        """
        agent = self.agent()
        jar: Dict[str, str] = {}
        _, body, set_cookies = yield self.get(agent, self.url + "/")
        jar_update(jar, set_cookies)
        first = backend_of(body)
        port, page = self.backends[first]
        yield page.site.kill(port)
        code, body, set_cookies = yield self.get(agent, self.url + "/", cookies=jar)
        self.assertEqual(code, 200)
        second = backend_of(body)
        self.assertNotEqual(second, first)
        old = jar["SERVERID"]
        jar_update(jar, set_cookies)
        self.assertNotEqual(jar["SERVERID"], old)
        for _ in range(5):
            _, body, _ = yield self.get(agent, self.url + "/", cookies=jar)
            self.assertEqual(backend_of(body), second)

    @defer.inlineCallbacks
    def test_rewriteCookieRoundTrip(self):
        """
        The application's JSESSIONID reaches the client prefixed with the
        backend id; sent back, it routes to that backend, which sees its own
        value unprefixed.
        """
        agent = self.agent()
        jar: Dict[str, str] = {}
        _, body, set_cookies = yield self.get(agent, self.app_url + "/session")
        first = backend_of(body)
        jar_update(jar, set_cookies)
        self.assertTrue(jar["JSESSIONID"].endswith("~s-" + first), jar)
        for _ in range(10):
            _, body, _ = yield self.get(agent, self.app_url + "/", cookies=jar)
            self.assertEqual(backend_of(body), first)
            self.assertIn("cookie=JSESSIONID=s-" + first, body)


TCP_CONFIG = """
[backends.echo]
servers = [
  {{ name = "a", address = "127.0.0.1:{a}" }},
  {{ name = "b", address = "127.0.0.1:{b}" }},
  {{ name = "c", address = "127.0.0.1:{c}" }},
]

[listeners.tcp]
protocol = "tcp"
bind = "tcp:0:interface=127.0.0.1"
backends = "echo"
persistence = {{ type = "source_ip", timeout = 1000 }}
"""


class TCPPersistenceTests(ServiceTestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.ports = {}
        for name in "abc":
            self.ports[name] = yield self.start_tcp_backend(name)
        text = TCP_CONFIG.format(**{n: p.getHost().port for n, p in self.ports.items()})
        self.service = self.start_balancer(text)
        self.port = self.port_of(self.service, "tcp")

    @defer.inlineCallbacks
    def test_eachSourceAddressStaysOnOneBackend(self):
        """
        Clients from different addresses in 127.0.0.0/8 are spread, and each
        stays on its backend across connections.
        """
        first = {}
        for i in range(2, 8):
            first[i] = yield self.connect_from(f"127.0.0.{i}")
        self.assertGreater(len(set(first.values())), 1)
        for _ in range(3):
            for i in range(2, 8):
                again = yield self.connect_from(f"127.0.0.{i}")
                self.assertEqual(again, first[i])

    @defer.inlineCallbacks
    def test_deadBackendClientsMoveAndStay(self):
        """
        When a backend dies, its clients move to another backend with no
        failed connection, and stay there.
        """
        source = "127.0.0.9"
        first = yield self.connect_from(source)
        yield self.ports[first.split("=")[1]].stopListening()
        moved = yield self.connect_from(source)
        self.assertNotEqual(moved, first)
        for _ in range(3):
            again = yield self.connect_from(source)
            self.assertEqual(again, moved)


class ReloadTests(ServiceTestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.pages = {}
        ports = {}
        for name in "abc":
            port, page = yield self.start_http_backend(name)
            self.pages[name] = page
            ports[name] = port.getHost().port
        self.ports = ports
        self.text = HTTP_CONFIG.format(**ports)
        self.path = self.write_config(self.text)
        self.service = BalancerService(load_config(self.path), reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.url = f"http://127.0.0.1:{self.port_of(self.service, 'web')}"

    def rewrite(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    @defer.inlineCallbacks
    def test_brokenConfigKeepsRunning(self):
        """A reload with a bad file is refused and the old config keeps serving."""
        self.rewrite(self.text.replace('scheduler = "rr"', 'scheduler = "fastest"'))
        self.assertFalse(self.service.reload())
        code, _, _ = yield self.get(self.agent(), self.url + "/")
        self.assertEqual(code, 200)

    def capture_log(self) -> List[dict]:
        from twisted.logger import globalLogPublisher

        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def bad_ca(self) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("not a PEM file\n")
        return path

    @defer.inlineCallbacks
    def test_reloadWithBrokenCAChangesNothing(self):
        """
        One file that sets a weight to 0 and names a non-PEM C{tls.ca}: the
        reload fails as a whole, with one "reload failed" error naming the
        field and no critical traceback; the weight stays and the listener
        serves as before.
        """
        from twisted.logger import LogLevel

        events = self.capture_log()
        broken = self.text.replace('{ name = "a", address', '{ name = "a", weight = 0, address').replace(
            'scheduler = "rr"', f'scheduler = "rr"\ntls = {{ ca = "{self.bad_ca()}" }}')
        self.rewrite(broken)
        self.assertFalse(self.service.reload())
        self.assertEqual(self.service.groups["web"].get("a").weight, 100)
        self.assertIsNone(self.service.config.backends["web"].tls)
        errors = [e for e in events if e.get("log_level") in (LogLevel.error, LogLevel.critical)]
        self.assertEqual(len(errors), 1, errors)
        self.assertEqual(errors[0]["log_level"], LogLevel.error)
        self.assertIn("backends.web.tls.ca: ", errors[0]["error"])
        self.assertIn("reload failed, keeping the running configuration", errors[0]["log_format"])
        self.assertIn("is not a PEM certificate file", errors[0]["error"])
        code, _, _ = yield self.get(self.agent(), self.url + "/")
        self.assertEqual(code, 200)

    def test_reloadFailingPastTheFileChangesNothing(self):
        """
        A configuration whose CA file breaks after it was checked (given to
        C{reload} as a value, so the file's checks are skipped) still fails
        before anything changes: the weight change in it is not applied.
        """
        import attr

        events = self.capture_log()
        config = load_config(self.path)
        group = config.backends["web"]
        from twisted_slb.config import BackendTLSConfig

        servers = (attr.evolve(group.servers[0], weight=0),) + group.servers[1:]
        group = attr.evolve(group, servers=servers, tls=BackendTLSConfig(ca=self.bad_ca()))
        old = self.service.config
        self.assertFalse(self.service.reload(attr.evolve(config, backends={"web": group})))
        self.assertIs(self.service.config, old)
        self.assertEqual(self.service.groups["web"].get("a").weight, 100)
        self.assertEqual([e["error"].split(":", 1)[0] for e in events if "error" in e], ["backends.web.tls.ca"])

    @defer.inlineCallbacks
    def test_reloadKeepsPinsAndPort(self):
        """
        After a reload that adds a listener and re-weights backends, a pinned
        client stays on its backend and the listener keeps its port.
        """
        agent = self.agent()
        jar: Dict[str, str] = {}
        _, body, set_cookies = yield self.get(agent, self.url + "/")
        jar_update(jar, set_cookies)
        first = backend_of(body)
        port = self.port_of(self.service, "web")
        new = self.text.replace('{ name = "a", address', '{ name = "a", weight = 10, address')
        new += '\n[listeners.extra]\nprotocol = "http"\nbind = "tcp:0:interface=127.0.0.1"\nbackends = "web"\n'
        self.rewrite(new)
        self.assertTrue(self.service.reload())
        self.assertEqual(self.port_of(self.service, "web"), port)
        self.assertEqual(self.service.groups["web"].get("a").weight, 10)
        for _ in range(5):
            _, body, _ = yield self.get(agent, self.url + "/", cookies=jar)
            self.assertEqual(backend_of(body), first)
        extra = f"http://127.0.0.1:{self.port_of(self.service, 'extra')}"
        code, _, _ = yield self.get(agent, extra + "/")
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_reloadRemovesListener(self):
        """A listener missing from the reloaded file stops listening."""
        self.rewrite(self.text.split("[listeners.app]")[0])
        self.assertTrue(self.service.reload())
        self.assertNotIn("app", self.service.namedServices)
        code, _, _ = yield self.get(self.agent(), self.url + "/")
        self.assertEqual(code, 200)


class SlowPage(Resource):
    """Answers when told to."""

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.waiting: List = []
        self.arrived: defer.Deferred = defer.Deferred()

    def render(self, request):
        self.waiting.append(request)
        self.arrived.callback(None)
        from twisted.web.server import NOT_DONE_YET

        return NOT_DONE_YET


class GracefulShutdownTests(ServiceTestCase):
    @defer.inlineCallbacks
    def test_inFlightRequestFinishes(self):
        """
        Stopping the service stops accepting at once but lets the request
        in flight finish; the stop completes after it.
        """
        page = SlowPage()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(page))
        self.addCleanup(port.stopListening)
        text = HTTP_CONFIG.format(a=port.getHost().port, b=port.getHost().port, c=port.getHost().port)
        service = BalancerService(load_config(self.write_config(text)), reactor)
        service.startService()
        url = f"http://127.0.0.1:{self.port_of(service, 'web')}/"
        response = self.agent().request(b"GET", url.encode())
        yield page.arrived
        stopped = service.stopService()
        self.assertFalse(stopped.called)
        page.waiting[0].write(b"done")
        page.waiting[0].finish()
        response = yield response
        body = yield readBody(response)
        self.assertEqual(body, b"done")
        yield stopped

    @defer.inlineCallbacks
    def test_requestOnAFactoryReplacedByAReloadFinishes(self):
        """
        A reload gives the listener a new factory; connections the old one
        serves are drained at stop too, not cut.
        """
        page = SlowPage()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(page))
        self.addCleanup(port.stopListening)
        text = HTTP_CONFIG.format(a=port.getHost().port, b=port.getHost().port, c=port.getHost().port)
        service = BalancerService(load_config(self.write_config(text)), reactor)
        service.startService()
        url = f"http://127.0.0.1:{self.port_of(service, 'web')}/"
        response = self.agent().request(b"GET", url.encode())
        yield page.arrived
        self.assertTrue(service.reload(load_config(service.config.path)))
        stopped = service.stopService()
        self.assertFalse(stopped.called)
        page.waiting[0].write(b"done")
        page.waiting[0].finish()
        response = yield response
        body = yield readBody(response)
        self.assertEqual(body, b"done")
        yield stopped


class AccessLogTests(ServiceTestCase):
    @defer.inlineCallbacks
    def run_one(self, access_log: str):
        from twisted.logger import globalLogPublisher

        port, _ = yield self.start_http_backend("a")
        events = []
        observer = lambda e: events.append(e) if e.get("log_namespace") == "twisted_slb.access" else None
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        text = HTTP_CONFIG.format(a=port.getHost().port, b=port.getHost().port, c=port.getHost().port)
        text = text.replace('[listeners.web]\n', f"[listeners.web]\naccess_log = {access_log}\n")
        service = self.start_balancer(text)
        yield self.get(self.agent(), f"http://127.0.0.1:{self.port_of(service, 'web')}/x?y=1")
        return events

    @defer.inlineCallbacks
    def test_oneLinePerRequest(self):
        """Each request is one access line with its backend and persistence outcome."""
        events = yield self.run_one("true")
        self.assertEqual(len(events), 1)
        e = events[0]
        self.assertEqual((e["listener"], e["method"], e["path"], e["status"], e["backend"], e["outcome"]),
                         ("web", "GET", "/x?y=1", 200, "a", "new"))

    @defer.inlineCallbacks
    def test_accessLogOff(self):
        """access_log = false: a proxied request writes no access log event."""
        events = yield self.run_one("false")
        self.assertEqual(events, [])


class HoldingLineClient(LineOnlyReceiver):
    """Keeps its connection open; C{first} fires with the first line."""

    def __init__(self) -> None:
        self.first: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()

    def lineReceived(self, line: bytes) -> None:
        if not self.first.called:
            self.first.callback(line.decode("ascii"))

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


class MaxConnectionsTests(ServiceTestCase):
    """The global C{max_connections}, with C{over_limit = "wait"}: new connections wait for a slot."""

    @defer.inlineCallbacks
    def test_overTheGlobalLimitWaitsForASlot(self):
        """
        Over the global max_connections, a client of another listener waits in the backlog and is served once
        a slot frees.
        """
        backend = yield self.start_tcp_backend("a")
        other = yield self.start_tcp_backend("b")
        service = self.start_balancer(
            f"""
max_connections = 1

[backends.t]
servers = [ {{ name = "a", address = "127.0.0.1:{backend.getHost().port}" }} ]

[listeners.one]
protocol = "tcp"
bind = "tcp:0:interface=127.0.0.1"
backends = "t"

[listeners.two]
protocol = "tcp"
bind = "tcp:0:interface=127.0.0.1"
backends = "t"
"""
        )

        def connect(name):
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port_of(service, name))
            return connectProtocol(endpoint, HoldingLineClient())

        first = yield connect("one")
        self.assertEqual((yield first.first), "backend=a")
        waiting = yield connect("two")  # the kernel completes the handshake (backlog)
        # A round trip elsewhere gives the reactor several turns to accept it.
        probe = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", other.getHost().port), HoldingLineClient()
        )
        self.assertEqual((yield probe.first), "backend=b")
        probe.transport.loseConnection()
        self.assertEqual(service.global_limit.open, 1)
        self.assertFalse(waiting.first.called)
        first.transport.loseConnection()
        self.assertEqual((yield waiting.first), "backend=a")  # served once a slot freed
        waiting.transport.loseConnection()
        yield waiting.lost


class PrivilegedPortAfterDropTests(TestCase):
    def test_reloadNeedingAPrivilegedPortSaysWhy(self):
        """
        A listener added after twistd --uid dropped privileges, refused a
        port below 1024, logs that a restart is needed (not only EACCES).
        """
        import errno

        from twisted.internet.error import CannotListenError
        from twisted.internet.testing import MemoryReactor
        from twisted.logger import globalLogPublisher

        from twisted_slb.config import ListenerConfig
        from twisted_slb.service import ListenerService

        class Refusing(MemoryReactor):
            def listenTCP(self, port, factory, backlog=50, interface=""):
                raise CannotListenError(interface, port, OSError(errno.EACCES, "Permission denied"))

        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.patch(os, "getuid", lambda: 65534)
        config = ListenerConfig(name="web", protocol="tcp", bind="tcp:80", backends="b")
        ListenerService(config, protocol.ServerFactory(), Refusing()).startService()
        messages = [e["reason"] for e in events if e.get("listener") == "web" and "reason" in e]
        self.assertEqual(len(messages), 1)
        self.assertIn("Permission denied", messages[0])
        self.assertIn("privileges this process dropped at start-up, twistd --uid: restart it", messages[0])
