# -*- test-case-name: tests.test_testing -*-
"""
An in-memory balancer for testing persistence policies, without sockets.

As C{treq.testing} does for a web client, L{BalancerRig} runs the real HTTP
path in memory: a listener's server (L{twisted_slb.web.front.HTTPFrontFactory},
as configured listeners run, or twisted.web's C{Site}), the resource you put
in front of a L{BalancedProxyResource} (your persistence policy), the proxy
and its pool of backend connections, and backends that answer in memory.
Connections are Twisted's own fakes (L{twisted.test.iosim}) pumped over a
L{MemoryReactorClock}, so a request is answered before L{BalancerRig.get}
returns, and time only moves when the test advances C{rig.reactor}::

    from twisted_slb import InsertCookie
    from twisted_slb.testing import BalancerRig

    rig = BalancerRig(["a", "b"])
    rig.serve(InsertCookie(rig.proxy, name=b"SERVERID", reactor=rig.reactor))
    first = rig.get("/", client="192.0.2.7")
    again = rig.get("/", cookies=first.cookies)
    assert again.backend == first.backend

Only public entry points are used: the same constructors
C{docs/embedding.md} shows, with the rig's reactor passed to each.
"""

from __future__ import annotations

import ipaddress
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import attr
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site
from zope.interface import implementer

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.web.proxy import BalancedProxyResource

__all__ = ["Answer", "BackendPage", "BalancerRig", "SeenRequest"]

#: The listener's address, as the rig's clients see it.
LISTENER = ("192.0.2.1", 8080)

HeaderValues = Mapping[Union[str, bytes], Union[str, bytes]]


def _bytes(value: Union[str, bytes]) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def _address(host: str, port: int):
    return IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)


@attr.s(frozen=True, auto_attribs=True)
class SeenRequest:
    """
    A request as a backend received it (after the balancer's changes).

    @ivar method: the method, such as C{b"GET"}.
    @ivar uri: the request target, such as C{b"/cart?id=7"}.
    @ivar headers: the request headers (C{X-Forwarded-For} included).
    @ivar body: the request body.
    """

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes


class BackendPage(Resource):
    """
    An in-memory backend's answer to every request: C{200}, a body naming
    the backend (C{backend=NAME}), and the headers of L{response_headers}
    (a backend that sets its own session cookie, for instance).

    @ivar name: the backend's name.
    @ivar seen: every L{SeenRequest} this backend answered, oldest first.
    @ivar response_headers: C{(name, value)} pairs (bytes) added to each
        answer; change it at any time.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        Resource.__init__(self)
        self.name = name
        self.seen: List[SeenRequest] = []
        self.response_headers: List[Tuple[bytes, bytes]] = []

    def render(self, request) -> bytes:
        body = request.content.read() if request.content is not None else b""
        self.seen.append(SeenRequest(request.method, request.uri, request.requestHeaders.copy(), body))
        for name, value in self.response_headers:
            request.responseHeaders.addRawHeader(name, value)
        request.setHeader(b"content-type", b"text/plain")
        return b"backend=" + self.name.encode("utf-8") + b"\n"


@attr.s(frozen=True, auto_attribs=True)
class Answer:
    """
    What a client of the rig received.

    @ivar code: the status code.
    @ivar headers: the response headers.
    @ivar body: the response body.
    @ivar backend: the name of the backend that answered, or L{None} when
        none did (the balancer answered itself, e.g. C{503}).
    @ivar seen: the request as that backend received it, or L{None}.
    """

    code: int
    headers: Headers
    body: bytes
    backend: Optional[str]
    seen: Optional[SeenRequest]

    @property
    def set_cookies(self) -> Sequence[bytes]:
        """The C{Set-Cookie} header values, as sent."""
        return self.headers.getRawHeaders(b"set-cookie", [])

    @property
    def cookies(self) -> Dict[str, str]:
        """
        The name and value of each cookie set (attributes left out), to send
        back with the next request: C{rig.get("/", cookies=answer.cookies)}.
        """
        jar: Dict[str, str] = {}
        for header in self.set_cookies:
            name, _, rest = header.decode("latin-1").partition("=")
            jar[name.strip()] = rest.split(";", 1)[0].strip()
        return jar


@implementer(IStreamClientEndpoint)
class _ToListener:
    """A client endpoint whose connections reach the rig's listener in memory."""

    def __init__(self, rig: "BalancerRig", client: str) -> None:
        self.rig = rig
        self.client = client

    def connect(self, factory):
        return defer.succeed(self.rig._connect_client(factory, self.client))


@implementer(IAgentEndpointFactory)
class _Clients:
    def __init__(self, rig: "BalancerRig") -> None:
        self.rig = rig
        self.client = "127.0.0.1"

    def endpointForURI(self, uri):
        return _ToListener(self.rig, self.client)


class BalancerRig:
    """
    A balancer listener in memory, its backends answering in memory.

    @ivar reactor: the L{MemoryReactorClock} everything runs on; pass it to
        what you build (C{InsertCookie(..., reactor=rig.reactor)},
        C{StickTable(..., clock=rig.reactor)}) and C{advance} it to let
        time pass.
    @ivar group: the L{BackendGroup} of the backends.
    @ivar proxy: a L{BalancedProxyResource} over C{group}; wrap it with the
        policy under test and give the result to L{serve}.
    @ivar pages: backend name -> the L{BackendPage} (or any resource) that
        answers for it.
    @ivar refused: names of backends whose connections are refused (as a
        stopped backend's would be); change it at any time.
    """

    def __init__(
        self,
        backends: Iterable[Union[str, Backend]] = ("a", "b"),
        scheduler=None,
        server: str = "front",
        pages: Optional[Mapping[str, IResource]] = None,
        retries: int = 2,
    ) -> None:
        """
        @param backends: backend names (each becomes a L{Backend} on its own
            documentation address, port 80), or L{Backend}s.
        @param scheduler: the group's scheduler (default: the group's own,
            smooth weighted round robin); see L{twisted_slb.scheduler_for}.
        @param server: C{"front"} for the configured listeners' HTTP server
            (L{twisted_slb.web.front.HTTPFrontFactory}), C{"site"} for
            twisted.web's C{Site}.
        @param pages: backend name -> the resource answering for it, in
            place of a L{BackendPage}.
        @param retries: the group's retries on another backend after a
            failed connection.

        @raise ValueError: C{server} is neither C{"front"} nor C{"site"}.
        """
        if server not in ("front", "site"):
            raise ValueError(f"server: {server!r} is not one of 'front', 'site'")
        self.reactor = MemoryReactorClock()
        members = []
        for i, backend in enumerate(backends, 1):
            if isinstance(backend, str):
                backend = Backend(backend, f"198.51.100.{i}", 80)
            members.append(backend)
        self.group = BackendGroup("rig", members, scheduler=scheduler, retries=retries)
        self.pages: Dict[str, IResource] = {b.name: BackendPage(b.name) for b in members}
        self.pages.update(pages or {})
        self.refused: set = set()
        self.proxy = BalancedProxyResource(self.group, reactor=self.reactor, access_log=False)
        self._server = server
        self._factory: Optional[IProtocolFactory] = None  # set by serve() below
        self._pumps: List[iosim.IOPump] = []
        self._client_ports = iter(range(40000, 65536))
        self._clients = _Clients(self)
        self._agent = Agent.usingEndpointFactory(
            self.reactor, self._clients, pool=HTTPConnectionPool(self.reactor, persistent=False)
        )
        self.serve(self.proxy)

    def serve(self, resource: IResource) -> None:
        """
        Render every request with C{resource} from now on: the policy under
        test wrapped around L{proxy} (or a router holding it).
        """
        if self._server == "front":
            from twisted_slb.web.front import HTTPFrontFactory

            self._factory = HTTPFrontFactory(resource, reactor=self.reactor)
        else:
            self._factory = Site(resource, reactor=self.reactor)

    def backend(self, name: str) -> Backend:
        """The L{Backend} named C{name} (set its C{up} or C{weight})."""
        for backend in self.group.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)

    def get(self, path: str = "/", **kwargs) -> Answer:
        """C{request("GET", path, ...)}."""
        return self.request("GET", path, **kwargs)

    def request(
        self,
        method: str,
        path: str = "/",
        headers: Optional[HeaderValues] = None,
        cookies: Optional[Mapping[str, str]] = None,
        client: str = "127.0.0.1",
        host: str = "balancer.test",
        body: Optional[bytes] = None,
    ) -> Answer:
        """
        Send one request on a new client connection and return its answer.

        @param headers: request headers (name -> value).
        @param cookies: cookies to send (name -> value), in one C{Cookie}
            header.
        @param client: the client's IP address, as the listener sees it.
        @param host: the C{Host} header (a L{twisted_slb.RuleRouter} routes
            on it).
        @param body: a request body.

        @raise AssertionError: the request is not answered once nothing is
            left to do in memory (a timer is waiting: advance C{reactor}).
        """
        ipaddress.ip_address(client)  # a ValueError names a wrong address
        values = Headers()
        for name, value in (headers or {}).items():
            values.addRawHeader(_bytes(name), _bytes(value))
        if cookies:
            values.addRawHeader(b"cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()).encode("latin-1"))
        producer = _Body(body) if body is not None else None
        before = {name: len(getattr(page, "seen", ())) for name, page in self.pages.items()}
        self._clients.client = client
        url = f"http://{host}{path}".encode("ascii")
        result: list = []
        self._agent.request(method.encode("ascii"), url, values, producer).addCallback(
            lambda response: readBody(response).addCallback(lambda data: (response, data))
        ).addBoth(result.append)
        self.flush()
        if not result:
            raise AssertionError(f"{method} {path}: no answer once everything in memory ran (advance rig.reactor?)")
        if isinstance(result[0], Failure):
            result[0].raiseException()
        response, data = result[0]
        seen_by: Dict[str, Sequence[SeenRequest]] = {
            name: getattr(page, "seen", ()) for name, page in self.pages.items()
        }
        answered = [name for name, seen_there in seen_by.items() if len(seen_there) > before[name]]
        backend = answered[0] if answered else None
        seen = seen_by[backend][-1] if backend is not None else None
        return Answer(response.code, response.headers, data, backend, seen)

    def flush(self) -> None:
        """
        Run everything that can run now: connect what was connected, move
        the bytes of every connection, run the timers due.
        """
        while True:
            moved = self._connect_backends()
            for pump in list(self._pumps):
                if pump.pump():
                    moved = True
                elif pump.clientIO.disconnected and pump.serverIO.disconnected:
                    self._pumps.remove(pump)
            now = self.reactor.seconds()
            if any(call.getTime() <= now for call in self.reactor.getDelayedCalls()):
                self.reactor.advance(0)
                moved = True
            if not moved:
                return

    def _connect_client(self, factory, client: str):
        port = next(self._client_ports)
        peer = _address(client, port)
        host = _address(*LISTENER)
        assert self._factory is not None  # __init__ serves the proxy
        server = self._factory.buildProtocol(peer)
        protocol = factory.buildProtocol(host)
        self._pumps.append(
            iosim.connect(
                server,
                iosim.FakeTransport(server, isServer=True, hostAddress=host, peerAddress=peer),
                protocol,
                iosim.FakeTransport(protocol, isServer=False, hostAddress=peer, peerAddress=host),
                greet=False,
                clock=self.reactor,
            )
        )
        return protocol

    def _connect_backends(self) -> bool:
        made = False
        while self.reactor.tcpClients:
            host, port, factory, _, _ = self.reactor.tcpClients.pop(0)
            connector = self.reactor.connectors.pop(0) if self.reactor.connectors else None
            made = True
            backend = next((b for b in self.group.backends if (b.host, b.port) == (host, port)), None)
            if backend is None or backend.name in self.refused or backend.name not in self.pages:
                # MemoryReactorClock records a connector with each connectTCP, so it is
                # None only with a reactor that records none; the relay's client
                # factory (twisted_slb.web.upstream) does not use it.
                factory.clientConnectionFailed(
                    connector, Failure(ConnectionRefusedError(host, port)))  # type: ignore[arg-type]
                continue
            address = _address(host, port)
            local = _address("192.0.2.1", next(self._client_ports))
            site = Site(self.pages[backend.name], reactor=self.reactor)
            server = site.buildProtocol(local)
            protocol = factory.buildProtocol(address)
            self._pumps.append(
                iosim.connect(
                    server,
                    iosim.FakeTransport(server, isServer=True, hostAddress=address, peerAddress=local),
                    protocol,
                    iosim.FakeTransport(protocol, isServer=False, hostAddress=local, peerAddress=address),
                    greet=False,
                    clock=self.reactor,
                )
            )
        return made


@implementer(IBodyProducer)
class _Body:
    """A request body, written at once."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass
