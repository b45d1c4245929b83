"""
Demo backends (the FAQ's "check page") and the default demo run.

A demo backend answers every HTTP request with its own name and address, and
the client address and cookies it saw, so that persistence is visible with
plain curl (C{curl -c jar URL}, then C{curl -b jar URL}).  It also sets a
C{JSESSIONID} of its own, like a Java application, so that rewrite-cookie
persistence has a cookie to rewrite.  Its TCP port says C{backend=NAME} and
echoes lines.

Run one on its own::

    twistd -n --pidfile= slb-demo-backend --name a --port 9001 [--tcp-port 9101]
    python -m twisted_slb.demo --name a --port 9001
"""

from __future__ import annotations

import html
import os
import socket
import sys
from typing import List, Optional, Sequence

import attr
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Site

from twisted_slb._reactor import maybe_global_reactor
from twisted_slb._typing import IStreamTransport

DEMO_PORT_BASE = 8080
DEMO_INTERFACE = "127.0.0.1"


class CheckPage(Resource):
    """
    The FAQ's check page: who am I, who are you, which cookies came.

    @ivar name: the backend's name.
    @ivar address: C{host:port} it listens on, shown on the page.
    """

    isLeaf = True

    def __init__(self, name: str, address: str = "") -> None:
        Resource.__init__(self)
        self.name = name
        self.address = address

    def render(self, request):
        if request.path == b"/health":
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"ok\n"
        cookie = (request.getHeader(b"cookie") or b"").decode("latin-1")
        if not any(c.strip().startswith("JSESSIONID=") for c in cookie.split(";")):
            session = os.urandom(8).hex()
            request.responseHeaders.addRawHeader(
                b"set-cookie", b"JSESSIONID=" + session.encode("ascii") + b"; Path=/; HttpOnly"
            )
        client = request.getClientAddress()
        client = getattr(client, "host", str(client))
        address = self.address or f"{request.getHost().host}:{request.getHost().port}"
        accept = request.getHeader(b"accept") or b""
        if b"text/html" in accept:
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            e = html.escape
            return (
                "<!doctype html><html><head><meta charset=utf-8><title>backend {n}</title>"
                "<style>body{{font:16px sans-serif;margin:2em}}b{{font-size:2em}}</style></head><body>"
                "<p>Served by backend <b>{n}</b> at {a}</p><p>Your address: {c}</p>"
                "<p>Cookies you sent: <code>{k}</code></p></body></html>\n"
            ).format(n=e(self.name), a=e(address), c=e(client), k=e(cookie) or "(none)").encode("utf-8")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"backend={self.name} address={address} client={client} cookie={cookie}\n".encode("utf-8")


class EchoName(LineOnlyReceiver):
    """
    TCP demo backend: says C{backend=NAME}, then echoes lines; a line
    C{quit} closes the connection (curl's C{telnet://} never half-closes,
    so C{echo quit | curl telnet://...} is how a one-shot check ends).
    """

    # Connected before any method below runs (see twisted_slb._typing).
    transport: IStreamTransport

    delimiter = b"\n"

    def connectionMade(self) -> None:
        self.sendLine(b"backend=" + self.factory.name.encode("utf-8"))

    def lineReceived(self, line: bytes) -> None:
        if line.strip() == b"quit":
            self.transport.loseConnection()
            return
        self.sendLine(line)


class EchoNameFactory(Factory):
    protocol = EchoName
    noisy = False

    def __init__(self, name: str) -> None:
        self.name = name


class UDPEchoName(DatagramProtocol):
    """
    A UDP demo backend: answers each datagram with C{backend=NAME } followed
    by the datagram itself (so a udp health check's C{expect} of part of
    its C{send} passes, and a client sees which backend answered).
    """

    noisy = False

    def __init__(self, name: str) -> None:
        self.prefix = b"backend=" + name.encode("utf-8") + b" "

    def datagramReceived(self, data: bytes, addr) -> None:
        assert self.transport is not None  # a datagram arrives on a bound port
        self.transport.write(self.prefix + data, addr)


def DemoBackendService(name: str, port: int, interface: str = DEMO_INTERFACE,
                       tcp_port: Optional[int] = None, reactor=None) -> MultiService:
    """One demo backend: the check page on C{port}, the echo on C{tcp_port}."""
    reactor = maybe_global_reactor(reactor)
    top = MultiService()
    site = Site(CheckPage(name, f"{interface}:{port}"))
    site.noisy = False
    # No access log: the instance's method is replaced on purpose (mypy
    # refuses that); a subclass would change the log prefix.
    site.log = lambda request: None  # type: ignore[method-assign]
    StreamServerEndpointService(TCP4ServerEndpoint(reactor, port, interface=interface), site).setServiceParent(top)
    if tcp_port is not None:
        StreamServerEndpointService(
            TCP4ServerEndpoint(reactor, tcp_port, interface=interface), EchoNameFactory(name)
        ).setServiceParent(top)
    return top


@attr.s(frozen=True, auto_attribs=True)
class DemoLayout:
    """Where the default demo puts everything."""

    port_base: int
    interface: str = DEMO_INTERFACE

    @property
    def backends(self) -> List[tuple]:
        """C{(name, http port, tcp port)} of the demo backends."""
        return [(n, self.port_base + 11 + i, self.port_base + 21 + i) for i, n in enumerate("abc")]

    @property
    def listener_ports(self) -> dict:
        """The balancer's ports: the three listeners, then the admin listener."""
        return {"insert": self.port_base, "rewrite": self.port_base + 1, "tcp": self.port_base + 2,
                "admin": self.port_base + 3}

    @property
    def ports(self) -> List[int]:
        return list(self.listener_ports.values()) + [p for _, h, t in self.backends for p in (h, t)]


def demo_layout(port_base: int = DEMO_PORT_BASE) -> DemoLayout:
    return DemoLayout(port_base)


def demo_config_text(port_base: int = DEMO_PORT_BASE, listen_base: Optional[int] = None) -> str:
    """
    The TOML of the demo's balancer, ready to copy into a file of your own.

    @param listen_base: where the listeners (and the admin listener) go;
        L{None}: where the demo's own are.  Another base gives a
        configuration that runs beside the demo, in front of its backends.
    """
    layout = demo_layout(port_base)
    i = layout.interface
    web = ",\n".join(f'  {{ name = "{n}", address = "{i}:{h}" }}' for n, h, _ in layout.backends)
    echo = ",\n".join(f'  {{ name = "{n}", address = "{i}:{t}" }}' for n, _, t in layout.backends)
    p = layout.listener_ports if listen_base is None else demo_layout(listen_base).listener_ports
    if listen_base is None:
        head = "# The twisted_slb demo configuration."
    else:
        head = (f"# The twisted_slb demo configuration, its listeners moved to {i}:{p['insert']}-{p['admin']}\n"
                f"# so that it runs beside the demo, in front of the demo's backends (they run while the demo does).")
    return f"""{head}
[admin]
bind = "tcp:{p['admin']}:interface={i}"

[backends.web]
scheduler = "wrr"
servers = [
{web},
]

[backends.echo]
servers = [
{echo},
]

[listeners.insert]
protocol = "http"
bind = "tcp:{p['insert']}:interface={i}"
backends = "web"
persistence = {{ type = "insert_cookie", timeout = 3600 }}

[listeners.rewrite]
protocol = "http"
bind = "tcp:{p['rewrite']}:interface={i}"
backends = "web"
persistence = {{ type = "rewrite_cookie", cookie = "JSESSIONID" }}

[listeners.tcp]
protocol = "tcp"
bind = "tcp:{p['tcp']}:interface={i}"
backends = "echo"
persistence = {{ type = "source_ip", timeout = 1000 }}
"""


def _slb_check() -> str:
    """How to call slb-check from here: by name when it is on PATH."""
    import shutil

    if shutil.which("slb-check"):
        return "slb-check"
    beside = os.path.join(os.path.dirname(sys.executable), "slb-check")
    return beside if os.path.exists(beside) else "slb-check"


def _twistd_slb() -> str:
    """How to call C{twistd slb} from here: by name when it is on PATH."""
    import shutil

    if shutil.which("twistd"):
        return "twistd slb"
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    return (beside if os.path.exists(beside) else "twistd") + " slb"


def demo_banner(port_base: int = DEMO_PORT_BASE) -> str:
    """The lines printed when the demo starts."""
    check = _slb_check()
    twistd = _twistd_slb()
    layout = demo_layout(port_base)
    i = layout.interface
    p = layout.listener_ports
    port_flag = "" if port_base == DEMO_PORT_BASE else f" --port-base {port_base}"
    backends = ", ".join(f"{n} on {i}:{h}" for n, h, _ in layout.backends)
    return f"""
twisted_slb demo is running (Ctrl-C to stop). Demo backends: {backends}.

  Insert-cookie persistence (SERVERID), http://{i}:{p['insert']}/
    curl -c jar http://{i}:{p['insert']}/        # first visit: the response sets SERVERID
    curl -b jar http://{i}:{p['insert']}/        # same backend, every time
    {check} http://{i}:{p['insert']}/ -n 30    # the FAQ's 30-request loop, with a verdict

  Rewrite-cookie persistence (the backend's JSESSIONID), http://{i}:{p['rewrite']}/
    curl -c jar2 http://{i}:{p['rewrite']}/ ; curl -b jar2 http://{i}:{p['rewrite']}/
    {check} http://{i}:{p['rewrite']}/ -n 30 --cookie JSESSIONID

  Source-IP persistence (TCP), {i}:{p['tcp']}
    for a in 1 2 3; do echo quit | curl -s telnet://{i}:{p['tcp']} --interface 127.0.0.5; done
    {check} --tcp {i}:{p['tcp']} --source 127.0.0.5 -n 10

  The admin page (listeners, backends with names and ids, drain/enable/down/up): http://{i}:{p['admin']}/
    {check} http://{i}:{p['insert']}/ -n 30 --admin http://{i}:{p['admin']}/   # names backends, not ids

  The demo's configuration: {twistd} --print-config{port_flag}
  A copy that runs beside the demo: {twistd} --print-config{port_flag} --listen-base {port_base + 1000} > slb.toml
"""


class PortTaken(Exception):
    """A demo port is in use."""


def check_ports_free(ports: Sequence[int], interface: str = DEMO_INTERFACE) -> None:
    """
    @raise PortTaken: with a message naming the first port in use and how to
        choose others.
    """
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((interface, port))
        except OSError as e:
            raise PortTaken(
                f"twisted_slb demo: port {port} on {interface} is in use ({e.strerror}); "
                f"choose other ports with --port-base N (the demo uses N..N+{max(ports) - min(ports)})"
            ) from None
        finally:
            s.close()


class _Banner(Service):
    def __init__(self, text: str) -> None:
        self.text = text

    def startService(self) -> None:
        Service.startService(self)
        # Straight to the terminal: twistd sends print() through its logger,
        # which would put a timestamp on every line of the instructions.
        stdout = sys.__stdout__
        assert stdout is not None  # twistd runs with a standard output
        stdout.write(self.text + "\n")
        stdout.flush()


def demo_service(port_base: Optional[int], reactor) -> MultiService:
    """The whole default run: demo backends, the balancer, the banner."""
    from twisted_slb.config import parse_config
    from twisted_slb.service import BalancerService

    base = DEMO_PORT_BASE if port_base is None else port_base
    layout = demo_layout(base)
    try:
        check_ports_free(layout.ports, layout.interface)
    except PortTaken as e:
        raise SystemExit(str(e))
    top = MultiService()
    for name, http_port, tcp_port in layout.backends:
        DemoBackendService(name, http_port, layout.interface, tcp_port, reactor).setServiceParent(top)
    config = parse_config(demo_config_text(base), path="<demo>")
    BalancerService(config, reactor).setServiceParent(top)
    _Banner(demo_banner(base)).setServiceParent(top)
    return top


class Options(usage.Options):
    synopsis = "--name a --port 9001 [--tcp-port 9101] [--interface 127.0.0.1]"
    longdesc = "A demo backend: the FAQ's check page (its name and address) and a TCP echo of its name."
    optParameters = [
        ["name", None, "a", "The backend's name, shown on its page."],
        ["port", None, 9001, "HTTP port.", int],
        ["tcp-port", None, None, "TCP port answering backend=NAME (optional).", int],
        ["interface", None, DEMO_INTERFACE, "Address to listen on."],
    ]


def makeService(options: Options):
    return DemoBackendService(options["name"], options["port"], options["interface"], options["tcp-port"])


if __name__ == "__main__":
    from twisted.internet import reactor

    options = Options()
    try:
        options.parseOptions(sys.argv[1:])
    except usage.UsageError as e:
        raise SystemExit(f"{e}\n{options}")
    service = makeService(options)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    print(f"demo backend {options['name']} on http://{options['interface']}:{options['port']}/")
    reactor.run()
