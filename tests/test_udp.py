"""
UDP listeners (twisted_slb.udp): sessions by client address, source-IP
persistence across source ports, refusals, the idle sweep, the session
bound, drain, reload, stats; in memory with a fake reactor, then end to end
on loopback.
"""

from __future__ import annotations

import socket

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_slb.admin import AdminAccess, MetricsPage, render_page
from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.config import parse_config
from twisted_slb.demo import UDPEchoName
from twisted_slb.health import HealthMonitor
from twisted_slb.persistence.sourceip import SourceIPPersistence, StickTable
from twisted_slb.scheduling import scheduler_for
from twisted_slb.service import BalancerService
from twisted_slb.stats import StatsRegistry, UDPListenerStats
from twisted_slb.udp import NO_BACKEND, UDPBalancer


class FakeUDPPort:
    """What listenUDP returned: records datagrams written, connect and stop."""

    def __init__(self, reactor, port: int, protocol, interface: str) -> None:
        self.reactor = reactor
        self.number = port or 40000 + len(reactor.udp_ports)
        self.protocol = protocol
        self.interface = interface
        self.connected = None
        self.written = []  # (data, address)
        self.listening = True
        self.refuse = False

    def connect(self, host: str, port: int) -> None:
        self.connected = (host, port)

    def write(self, data: bytes, addr=None) -> None:
        if self.refuse:
            self.protocol.connectionRefused()
            return
        self.written.append((data, addr if addr is not None else self.connected))

    def stopListening(self):
        if self.listening:
            self.listening = False
            self.protocol.doStop()

    def getHost(self):
        return IPv4Address("UDP", self.interface or "0.0.0.0", self.number)


class FakeUDPReactor(Clock):
    """A L{Clock} with C{listenUDP} that records the ports it made."""

    def __init__(self) -> None:
        Clock.__init__(self)
        self.udp_ports = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        fake = FakeUDPPort(self, port, protocol, interface)
        self.udp_ports.append(fake)
        protocol.makeConnection(fake)
        return fake


def group(*names, scheduler="rr"):
    return BackendGroup("g", [Backend(n, f"10.0.0.{i}", 53) for i, n in enumerate(names, 1)],
                        scheduler=scheduler_for(scheduler))


class UDPCase(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeUDPReactor()
        self.group = group("a", "b")
        self.table = StickTable(300, clock=self.reactor)

    def balancer(self, persistence=True, **kwargs):
        policy = SourceIPPersistence(self.table) if persistence else None
        balancer = UDPBalancer(self.group, policy=policy, reactor=self.reactor, **kwargs)
        self.listener = self.reactor.listenUDP(5353, balancer)
        return balancer

    def side_of(self, balancer, client):
        """The fake port of C{client}'s session (connected to its backend)."""
        return balancer.sessions[client].side.transport


class SessionTests(UDPCase):
    def test_firstDatagramOpensASocketConnectedToTheBackend(self):
        """A new client's datagram leaves from a new balancer socket connected to the chosen backend."""
        b = self.balancer()
        b.datagramReceived(b"query", ("192.0.2.1", 1000))
        port = self.side_of(b, ("192.0.2.1", 1000))
        self.assertEqual(port.connected, ("10.0.0.1", 53))
        self.assertEqual(port.written, [(b"query", ("10.0.0.1", 53))])
        self.assertEqual((port.number, port.interface), (40001, ""))

    def test_replyGoesToTheClientFromTheListeningSocket(self):
        """What the backend answers is written to the client by the listener's own port."""
        b = self.balancer()
        b.datagramReceived(b"query", ("192.0.2.1", 1000))
        side = b.sessions[("192.0.2.1", 1000)].side
        side.datagramReceived(b"answer", ("10.0.0.1", 53))
        self.assertEqual(self.listener.written, [(b"answer", ("192.0.2.1", 1000))])

    def test_oneSocketPerClientAddress(self):
        """Later datagrams of a client address reuse its session's socket."""
        b = self.balancer()
        for i in range(3):
            b.datagramReceived(b"%d" % i, ("192.0.2.1", 1000))
        self.assertEqual(len(self.reactor.udp_ports), 2)  # the listener and one session
        self.assertEqual(len(self.side_of(b, ("192.0.2.1", 1000)).written), 3)
        self.assertEqual(self.group.get("a").active, 1)

    def test_sourceIpKeepsEveryPortOnOneBackend(self):
        """With source-IP persistence, all of one IP's source ports go to the backend of its first session."""
        b = self.balancer()
        for port in range(1000, 1010):
            b.datagramReceived(b"q", ("192.0.2.1", port))
            b.datagramReceived(b"q", ("192.0.2.2", port))
        by_ip = {}
        for (ip, _), session in b.sessions.items():
            by_ip.setdefault(ip, set()).add(session.backend.name)
        self.assertEqual(by_ip, {"192.0.2.1": {"a"}, "192.0.2.2": {"b"}})
        self.assertEqual(b.stats.persistence["hit"], 18)

    def test_withoutPersistenceEachSessionIsBalanced(self):
        """Without persistence, each new client address is scheduled on its own."""
        b = self.balancer(persistence=False)
        for port in range(1000, 1004):
            b.datagramReceived(b"q", ("192.0.2.1", port))
        names = [s.backend.name for s in b.sessions.values()]
        self.assertEqual(names, ["a", "b", "a", "b"])

    def test_noBackendDropsTheDatagram(self):
        """With every backend down the datagram is dropped and counted; no session is kept."""
        b = self.balancer()
        for backend in self.group.backends:
            backend.up = False
        b.datagramReceived(b"q", ("192.0.2.1", 1000))
        self.assertEqual(b.sessions, {})
        self.assertEqual(b.stats.drops[NO_BACKEND], 1)


class RefusedTests(UDPCase):
    def test_portUnreachableIsAPassiveFailureAndTheNextDatagramMoves(self):
        """ECONNREFUSED on the session's socket counts against the backend; the next datagram goes elsewhere, re-pinned."""
        b = self.balancer()
        client = ("192.0.2.1", 1000)
        b.datagramReceived(b"q1", client)
        side = b.sessions[client].side
        port = side.transport
        side.connectionRefused()
        a = self.group.get("a")
        self.assertEqual((a.failures, a.active), (1, 0))
        self.assertFalse(port.listening)
        b.datagramReceived(b"q2", client)
        self.assertEqual(b.sessions[client].backend.name, "b")
        self.assertEqual(self.side_of(b, client).written, [(b"q2", ("10.0.0.2", 53))])
        self.assertEqual(self.table.get("192.0.2.1"), self.group.get("b").id)
        self.assertEqual(b.stats.persistence["repin"], 1)
        self.assertEqual(b.stats.refused, 1)

    def test_portClosedByTheReactorIsARefusal(self):
        """The epoll reactor closes a connected UDP port on an ICMP error: that too is a failure, and the session moves."""
        b = self.balancer()
        client = ("192.0.2.1", 1000)
        b.datagramReceived(b"q1", client)
        self.side_of(b, client).stopListening()  # as the reactor does on EPOLLERR
        b.datagramReceived(b"q2", client)
        self.assertEqual(b.sessions[client].backend.name, "b")
        self.assertEqual(self.group.get("a").failures, 1)

    def test_refusalOnWriteIsHandled(self):
        """A refusal reported by the send itself (Twisted calls connectionRefused from write) moves the session too."""
        b = self.balancer()
        client = ("192.0.2.1", 1000)
        b.datagramReceived(b"q1", client)
        self.side_of(b, client).refuse = True
        b.datagramReceived(b"q2", client)
        b.datagramReceived(b"q3", client)
        self.assertEqual(b.sessions[client].backend.name, "b")
        self.assertEqual(self.group.get("a").failures, 1)

    def test_firstReplyIsAPassiveSuccess(self):
        """A backend that answers has its run of passive failures reset (once per session, not per datagram)."""
        calls = []

        class Monitor:
            def failure(self, backend, reason):
                calls.append("failure")

            def success(self, backend):
                calls.append("success")

        self.group.get("a").monitor = Monitor()
        b = self.balancer()
        b.datagramReceived(b"q", ("192.0.2.1", 1000))
        side = b.sessions[("192.0.2.1", 1000)].side
        side.datagramReceived(b"r", None)
        side.datagramReceived(b"r", None)
        self.assertEqual(calls, ["success"])


class SweepTests(UDPCase):
    def test_idleSessionsEndAndFreeTheirSockets(self):
        """After idle_timeout of silence (plus one sweep interval) a session ends and its socket closes."""
        b = self.balancer(idle_timeout=10)
        b.datagramReceived(b"q", ("192.0.2.1", 1000))
        port = self.side_of(b, ("192.0.2.1", 1000))
        self.reactor.advance(9)
        self.assertEqual(len(b.sessions), 1)
        self.reactor.pump([1] * 3)
        self.assertEqual(b.sessions, {})
        self.assertFalse(port.listening)
        self.assertEqual(self.group.get("a").active, 0)

    def test_repliesKeepTheSessionAlive(self):
        """Silence both ways ends a session: a backend still answering keeps it open."""
        b = self.balancer(idle_timeout=10)
        b.datagramReceived(b"q", ("192.0.2.1", 1000))
        side = b.sessions[("192.0.2.1", 1000)].side
        self.reactor.pump([1] * 8)
        side.datagramReceived(b"r", None)
        self.reactor.pump([1] * 8)
        self.assertEqual(len(b.sessions), 1)
        self.reactor.pump([1] * 4)
        self.assertEqual(b.sessions, {})

    def test_oneTimerForAllSessions(self):
        """However many sessions, one sweep call is pending."""
        b = self.balancer()
        for port in range(1000, 1100):
            b.datagramReceived(b"q", ("192.0.2.1", port))
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)

    def test_stoppingClosesEverySession(self):
        """When the listening port stops, every session socket closes and the timer is cancelled."""
        b = self.balancer()
        b.datagramReceived(b"q", ("192.0.2.1", 1000))
        port = self.side_of(b, ("192.0.2.1", 1000))
        self.listener.stopListening()
        self.assertFalse(port.listening)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_activeSessionRefreshesItsPin(self):
        """A session that keeps talking keeps its IP's pin alive past the table timeout."""
        self.table.timeout = 5
        b = self.balancer(idle_timeout=30)
        for _ in range(20):
            b.datagramReceived(b"q", ("192.0.2.1", 1000))
            self.reactor.advance(1)
        self.assertEqual(self.table.get("192.0.2.1"), self.group.get("a").id)


class LimitTests(UDPCase):
    def test_maxSessionsEvictsTheLeastRecentlyActive(self):
        """Beyond max_sessions a new client evicts the session silent the longest; the eviction is counted."""
        b = self.balancer(max_sessions=2)
        b.datagramReceived(b"q", ("192.0.2.1", 1))
        b.datagramReceived(b"q", ("192.0.2.2", 2))
        self.reactor.advance(1)
        b.datagramReceived(b"q", ("192.0.2.1", 1))  # now .2 is the oldest
        b.datagramReceived(b"q", ("192.0.2.3", 3))
        self.assertEqual(sorted(ip for ip, _ in b.sessions), ["192.0.2.1", "192.0.2.3"])
        self.assertEqual(b.stats.evictions, 1)

    def test_aFloodIsBoundedAndLoggedOncePerEpisode(self):
        """A flood of new source addresses keeps at most max_sessions sockets and logs one line per episode."""
        b = self.balancer(max_sessions=10, idle_timeout=5)
        with capturedLogs() as events:
            for port in range(1000, 2000):
                b.datagramReceived(b"q", ("198.51.100.9", port))
        self.assertEqual(len(b.sessions), 10)
        self.assertEqual(sum(1 for p in self.reactor.udp_ports if p.listening), 11)
        warnings = [e for e in events if "max_sessions" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(b.stats.evictions, 990)
        self.reactor.pump([1] * 7)  # everything goes idle: the episode ends
        with capturedLogs() as events:
            for port in range(1000, 1011):
                b.datagramReceived(b"q", ("198.51.100.9", port))
        self.assertEqual(len([e for e in events if "max_sessions" in e.get("log_format", "")]), 1)


class DrainTests(UDPCase):
    def test_drainedBackendKeepsSessionsButGetsNoNewOnes(self):
        """After a drain, an open session stays on its backend, and a new port of the same IP goes elsewhere."""
        b = self.balancer()
        b.datagramReceived(b"q", ("192.0.2.1", 1000))
        a = self.group.get("a")
        a.weight = 0
        b.datagramReceived(b"q", ("192.0.2.1", 1000))
        b.datagramReceived(b"q", ("192.0.2.1", 1001))
        self.assertEqual(b.sessions[("192.0.2.1", 1000)].backend.name, "a")
        self.assertEqual(b.sessions[("192.0.2.1", 1001)].backend.name, "b")
        self.assertEqual(len(self.side_of(b, ("192.0.2.1", 1000)).written), 2)


CONFIG = """
[backends.dns]
scheduler = "rr"
servers = [ { name = "a", address = "10.0.0.1:53" }, { name = "b", address = "10.0.0.2:53" } ]

[listeners.dns]
protocol = "udp"
bind = "udp:5353:interface=127.0.0.1"
backends = "dns"
persistence = { type = "source_ip", timeout = 300 }
idle_timeout = %s
max_sessions = 1000
access_log = false
"""


class ServiceTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeUDPReactor()
        self.service = BalancerService(parse_config(CONFIG % 30), reactor=self.reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def test_listensOnTheConfiguredAddress(self):
        """A udp listener listens with listenUDP on the port and interface of its bind."""
        port = self.reactor.udp_ports[0]
        self.assertEqual((port.number, port.interface), (5353, "127.0.0.1"))

    def test_reloadKeepsSessionsAndTheTable(self):
        """A reload keeps the port, the open sessions and the stick table, and applies the new settings."""
        listener = self.reactor.udp_ports[0]
        balancer = listener.protocol
        balancer.datagramReceived(b"q", ("192.0.2.1", 1000))
        table = self.service.stick_tables["dns/dns"]
        self.assertTrue(self.service.reload(parse_config(CONFIG % 60)))
        self.assertIs(self.reactor.udp_ports[0], listener)
        self.assertTrue(listener.listening)
        self.assertIs(listener.protocol, balancer)
        self.assertEqual(list(balancer.sessions), [("192.0.2.1", 1000)])
        self.assertEqual(balancer.idle_timeout, 60.0)
        self.assertIs(self.service.stick_tables["dns/dns"], table)
        self.assertIs(balancer.stats, self.service.stats.listeners["dns"])
        self.assertEqual(balancer.stats.active, 1)

    def test_statsMetricsAndPageShowUdp(self):
        """Datagrams and bytes each way, sessions and drops reach the JSON stats, Prometheus and the page."""
        balancer = self.reactor.udp_ports[0].protocol
        balancer.datagramReceived(b"query", ("192.0.2.1", 1000))
        balancer.sessions[("192.0.2.1", 1000)].side.datagramReceived(b"answer!", None)
        snapshot = self.service.stats.snapshot()
        udp = snapshot["listeners"][0]["udp"]
        self.assertEqual((udp["datagrams_in"], udp["datagrams_out"], udp["sessions"]), (1, 1, 1))
        self.assertEqual((snapshot["listeners"][0]["bytes_in"], snapshot["listeners"][0]["bytes_out"]), (5, 7))
        metrics = MetricsPage(AdminAccess(""), self.service.stats).render_GET(_Request()).decode()
        self.assertIn('slb_udp_datagrams_total{direction="in",listener="dns"} 1.0', metrics)
        self.assertIn('slb_udp_bytes_total{direction="out",listener="dns"} 7.0', metrics)
        self.assertIn('slb_udp_sessions_active{listener="dns"} 1.0', metrics)
        self.assertIn('slb_udp_drops_total{listener="dns",reason="no_backend"} 0.0', metrics)
        self.assertIn(b"<h2>UDP listeners</h2>", render_page(snapshot))


class _Request:
    def setHeader(self, name, value):
        pass


class StatsTests(SynchronousTestCase):
    def test_udpListenersGetUdpCounters(self):
        """The registry gives a udp listener the udp counters, and a page without udp listeners has no udp table."""
        registry = StatsRegistry()
        self.assertIsInstance(registry.for_listener("dns", "udp"), UDPListenerStats)
        self.assertNotIsInstance(registry.for_listener("web", "http"), UDPListenerStats)
        del registry.listeners["dns"]
        self.assertNotIn(b"UDP listeners", render_page(registry.snapshot()))


class HealthCheckTests(SynchronousTestCase):
    def setUp(self):
        from twisted_slb.config import HealthCheckConfig

        self.reactor = FakeUDPReactor()
        self.group = group("a")
        config = HealthCheckConfig(type="udp", send=b"\x12\x34ping", expect_bytes=b"\x12\x34", interval=2,
                                   timeout=1, healthy_threshold=1, unhealthy_threshold=1)
        self.monitor = HealthMonitor(self.group, config, reactor=self.reactor, random=lambda: 0.0)
        self.monitor.startService()
        self.addCleanup(self.monitor.stopService)
        self.backend = self.group.get("a")

    def probe_port(self):
        self.reactor.advance(0)
        port = self.reactor.udp_ports[-1]
        self.assertEqual(port.connected, ("10.0.0.1", 53))
        self.assertEqual(port.written, [(b"\x12\x34ping", ("10.0.0.1", 53))])
        return port

    def test_expectedAnswerPasses(self):
        """A udp check sends its payload to the backend; an answer containing expect passes and closes the socket."""
        port = self.probe_port()
        port.protocol.datagramReceived(b"xx\x12\x34yy", ("10.0.0.1", 53))
        self.assertEqual(self.backend.extra["health"].last_status, "ok")
        self.assertFalse(port.listening)

    def test_portUnreachableFails(self):
        """A refused udp check takes the backend down."""
        port = self.probe_port()
        port.protocol.connectionRefused()
        self.assertFalse(self.backend.up)
        self.assertEqual(self.backend.extra["health"].last_reason, "port unreachable (ICMP)")

    def test_silenceFails(self):
        """A backend that stops answering fails its check after the timeout."""
        port = self.probe_port()
        self.reactor.advance(1)
        self.assertFalse(self.backend.up)
        self.assertFalse(port.listening)

    def test_wrongAnswerFails(self):
        """An answer without the expected bytes fails."""
        port = self.probe_port()
        port.protocol.datagramReceived(b"nope", ("10.0.0.1", 53))
        self.assertFalse(self.backend.up)


# -- end to end, on loopback ------------------------------------------------------


class Client(DatagramProtocol):
    """A client socket: each answer fires the next waiting Deferred."""

    def __init__(self) -> None:
        self.waiting = []
        self.answers = []

    def datagramReceived(self, data, addr):
        self.answers.append(data)
        if self.waiting:
            self.waiting.pop(0).callback(data)

    def ask(self, data, addr) -> defer.Deferred:
        d = defer.Deferred()
        self.waiting.append(d)
        self.transport.write(data, addr)
        return d.addTimeout(10, reactor)


class LoopbackTests(TestCase):
    timeout = 60

    def backend(self, name):
        port = reactor.listenUDP(0, UDPEchoName(name), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def dead_port(self):
        """A loopback UDP port nothing listens on (the kernel answers port unreachable)."""
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port

    def start(self, servers, extra=""):
        text = (
            "[backends.dns]\nscheduler = \"rr\"\nservers = [ "
            + ", ".join(f'{{ name = "{n}", address = "127.0.0.1:{p}" }}' for n, p in servers)
            + " ]\n\n[listeners.dns]\nprotocol = \"udp\"\nbind = \"udp:0:interface=127.0.0.1\"\n"
            "backends = \"dns\"\naccess_log = false\n" + extra
        )
        service = BalancerService(parse_config(text), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        listener = service.getServiceNamed("dns")
        return service, listener, ("127.0.0.1", listener.port.getHost().port)

    def client(self, ip="127.0.0.1"):
        proto = Client()
        port = reactor.listenUDP(0, proto, interface=ip)
        self.addCleanup(port.stopListening)
        return proto

    @defer.inlineCallbacks
    def test_eachClientIpStaysOnOneBackendAcrossPorts(self):
        """Clients on 127.0.0.2..7, five source ports each, are each answered by one backend throughout."""
        servers = [(n, self.backend(n)) for n in "abc"]
        _, listener, address = self.start(servers, 'persistence = { type = "source_ip", timeout = 300 }\n')
        seen = {}
        for n in range(2, 8):
            ip = f"127.0.0.{n}"
            for i in range(5):
                answer = yield self.client(ip).ask(b"q%d" % i, address)
                self.assertTrue(answer.endswith(b" q%d" % i))
                seen.setdefault(ip, set()).add(answer.split()[0])
        self.assertEqual([len(names) for names in seen.values()], [1] * 6)
        self.assertEqual(len(set().union(*seen.values())), 3)
        self.assertEqual(len(listener.balancer.sessions), 30)

    @defer.inlineCallbacks
    def test_refusingBackendIsDetectedAndTheClientMoves(self):
        """A backend port that answers ICMP port unreachable is counted failed; the client's retry reaches the live one."""
        servers = [("dead", self.dead_port()), ("live", self.backend("live"))]
        service, listener, address = self.start(servers, 'persistence = { type = "source_ip", timeout = 300 }\n')
        balancer = listener.balancer
        refused = defer.Deferred()
        original = balancer.refused

        def noticed(session, side, reason):
            original(session, side, reason)
            if not refused.called:
                refused.callback(None)

        balancer.refused = noticed
        client = self.client("127.0.0.9")
        client.transport.write(b"lost", address)
        yield refused.addTimeout(10, reactor)
        dead = service.groups["dns"].get("dead")
        self.assertEqual(dead.failures, 1)
        answer = yield client.ask(b"again", address)
        self.assertEqual(answer, b"backend=live again")
        answer = yield self.client("127.0.0.9").ask(b"other port", address)
        self.assertEqual(answer, b"backend=live other port")

    @defer.inlineCallbacks
    def test_idleSweepFreesSessions(self):
        """With a short idle_timeout, sessions are freed by the sweep and their sockets closed."""
        _, listener, address = self.start([("a", self.backend("a"))], "idle_timeout = 0.2\n")
        balancer = listener.balancer
        for _ in range(3):
            yield self.client().ask(b"q", address)
        ports = [s.side.transport for s in balancer.sessions.values()]
        self.assertEqual(len(ports), 3)
        freed = defer.Deferred()
        original = balancer.sweep

        def sweep():
            ended = original()
            if not balancer.sessions and not freed.called:
                freed.callback(None)
            return ended

        balancer.sweep = sweep
        yield freed.addTimeout(10, reactor)
        yield task.deferLater(reactor, 0, lambda: None)  # a UDP port closes on the next turn
        self.assertEqual([p.connected for p in ports], [0, 0, 0])
        self.assertEqual(listener.balancer.group.get("a").active, 0)


BASE = """
[backends.dns]
servers = [ { name = "a", address = "10.0.0.1:53" } ]
%s
[listeners.dns]
protocol = "udp"
backends = "dns"
%s
"""


class ConfigTests(SynchronousTestCase):
    def error(self, listener: str, group: str = "", top: str = "") -> str:
        from twisted_slb.config import ConfigError

        with self.assertRaises(ConfigError) as e:
            parse_config(top + BASE % (group, listener), "slb.toml")
        return str(e.exception)

    def test_fullListenerParses(self):
        """Every udp setting is read, with defaults idle_timeout 30 and max_sessions 100000."""
        config = parse_config(BASE % ("", 'bind = "udp:5353:interface=127.0.0.1"\n'
                                          'persistence = { type = "source_ip", timeout = 3600 }'))
        listener = config.listeners["dns"]
        self.assertEqual((listener.protocol, listener.idle_timeout, listener.max_sessions), ("udp", 30.0, 100000))
        self.assertEqual(listener.persistence.timeout, 3600)

    def test_bindForms(self):
        """udp:PORT and udp:PORT:interface=ADDR (IPv4, IPv6 plain or with Twisted's escaped colons) are read."""
        from twisted_slb.config import parse_udp_bind

        self.assertEqual(parse_udp_bind("udp:53"), (53, ""))
        self.assertEqual(parse_udp_bind("udp:0:interface=127.0.0.2"), (0, "127.0.0.2"))
        self.assertEqual(parse_udp_bind("udp:53:interface=::1"), (53, "::1"))
        self.assertEqual(parse_udp_bind(r"udp:53:interface=\:\:1"), (53, "::1"))

    def test_badBindNamesFieldValueAndForm(self):
        """A bind that is not udp:PORT[:interface=ADDR] is an error naming the field, the value and the form."""
        for bind, why in (("tcp:53", "must start with 'udp:'"), ("udp:70000", "port 70000 out of range"),
                          ("udp:x", "'x' is not a port number"),
                          ("udp:53:interface=dns.local", "interface 'dns.local' is not an IP address"),
                          ("udp:53:backlog=5", "unknown option")):
            message = self.error(f'bind = "{bind}"')
            self.assertIn(f"slb.toml: listeners.dns.bind: not a udp address ({why}", message)
            self.assertIn(f"got {bind!r}; allowed: \"udp:PORT\" or \"udp:PORT:interface=ADDR\"", message)

    def test_persistenceIsSourceIpOnly(self):
        """A cookie persistence type on a udp listener is refused, and the timeout is 1..3600."""
        message = self.error('bind = "udp:53"\npersistence = { type = "insert_cookie" }')
        self.assertIn("listeners.dns.persistence.type: not a persistence type for udp listeners "
                      "(udp listeners persist by source IP only); got 'insert_cookie'; allowed: 'source_ip'", message)
        message = self.error('bind = "udp:53"\npersistence = { type = "source_ip", timeout = 3601 }')
        self.assertIn("listeners.dns.persistence.timeout: out of range; got 3601; allowed: an integer from 1 "
                      "to 3600 seconds", message)

    def test_settingsRangesAndForeignKeys(self):
        """idle_timeout and max_sessions are checked; tcp-only settings are named as such."""
        self.assertIn("listeners.dns.idle_timeout: out of range; got 0; allowed: a number from 0 to 3600 seconds",
                      self.error('bind = "udp:53"\nidle_timeout = 0'))
        self.assertIn("listeners.dns.max_sessions: out of range; got 0; allowed: an integer from 1 to 10000000",
                      self.error('bind = "udp:53"\nmax_sessions = 0'))
        self.assertIn("listeners.dns.proxy_protocol: not a setting of udp listeners",
                      self.error('bind = "udp:53"\nproxy_protocol = "v1"'))

    def test_backendsMustBeIpAddresses(self):
        """A group behind a udp listener needs IP addresses: a host name is an error naming the server."""
        from twisted_slb.config import ConfigError

        text = (BASE % ("", 'bind = "udp:53"')).replace("10.0.0.1:53", "dns1.example:53")
        with self.assertRaises(ConfigError) as e:
            parse_config(text, "slb.toml")
        self.assertIn("backends.dns.servers[0].address: a group used by udp listener dns needs IP addresses; "
                      "got dns1.example:53", str(e.exception))

    def test_oneProcessOnly(self):
        """udp listeners run in one process: workers > 1 is an error."""
        self.assertIn("workers: udp listeners (dns) run in one process; got 2",
                      self.error('bind = "udp:53"', top="workers = 2\n"))

    def test_udpHealthCheckPayloadEscapes(self):
        r"""send and expect are strings in which \xHH, \n, \r, \t, \0 and \\ are bytes."""
        group = "[backends.dns.health_check]\ntype = \"udp\"\nsend = 'id\\x12\\x34\\0\\\\'\nexpect = '\\x12\\x34'\n"
        config = parse_config(BASE % (group, 'bind = "udp:53"'))
        check = config.backends["dns"].health_check
        self.assertEqual((check.type, check.send, check.expect_bytes), ("udp", b"id\x12\x34\x00\\", b"\x12\x34"))

    def test_udpHealthCheckErrors(self):
        """A bad escape, a missing send, or an http setting on a udp check is an error naming the field."""
        self.assertIn(r"backends.dns.health_check.send: bad escape '\\q' at character 1; got 'a\\q'",
                      self.error('bind = "udp:53"', group="[backends.dns.health_check]\ntype = \"udp\"\nsend = 'a\\q'\n"))
        self.assertIn("backends.dns.health_check.send: a udp health check needs a datagram to send",
                      self.error('bind = "udp:53"', group="[backends.dns.health_check]\ntype = \"udp\"\n"))
        self.assertIn("backends.dns.health_check.path: not a setting of udp health checks",
                      self.error('bind = "udp:53"',
                                 group="[backends.dns.health_check]\ntype = \"udp\"\nsend = 'x'\npath = \"/\"\n"))

    def test_checkDescribesTheListener(self):
        """--check's description says how a udp listener works: sessions, idle_timeout, max_sessions, refusals."""
        from twisted_slb.config import describe

        text = describe(parse_config(BASE % ("", 'bind = "udp:5353:interface=127.0.0.1"\n'
                                                 'persistence = { type = "source_ip", timeout = 300 }')))
        self.assertIn("listener dns: udp on udp:5353:interface=127.0.0.1", text)
        self.assertIn("persistence: source_ip: a client IP stays on its backend for 300 s after its last datagram",
                      text)
        self.assertIn("idle_timeout 30.0 s (silence both ways ends a session), max_sessions 100000", text)
        self.assertIn("ICMP port unreachable counts as a failure", text)
        self.assertIn("no PROXY protocol", text)
        self.assertNotIn("connect_timeout", text)


class SocketFailureTests(UDPCase):
    def test_noSocketIsADropNotABackendFailure(self):
        """When the balancer cannot open a socket (out of descriptors) the datagram is dropped as no_socket, not held against the backend."""
        from twisted.internet.error import CannotListenError

        b = self.balancer()

        def refuse(*args, **kwargs):
            raise CannotListenError("", 0, OSError(24, "Too many open files"))

        self.reactor.listenUDP = refuse
        b.datagramReceived(b"q", ("192.0.2.1", 1000))
        self.assertEqual(b.stats.drops, {"no_backend": 0, "no_socket": 1, "send_error": 0})
        self.assertEqual(self.group.get("a").failures, 0)
        self.assertEqual(b.sessions, {})

    def test_allBackendsRefusedEndsTheSession(self):
        """A session whose every backend refused is ended, and its next datagram is a no_backend drop."""
        b = self.balancer()
        client = ("192.0.2.1", 1000)
        for _ in range(2):
            b.datagramReceived(b"q", client)
            b.sessions[client].side.connectionRefused()
        b.datagramReceived(b"q", client)
        self.assertEqual(b.sessions, {})
        self.assertEqual(b.stats.drops["no_backend"], 1)


class LoopbackHealthTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_silentBackendIsTakenDownByTheUdpCheck(self):
        """On loopback, a backend whose socket is open but never answers fails its udp check and goes down; an echo stays up."""
        from twisted_slb.config import HealthCheckConfig

        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        self.addCleanup(silent.close)
        echo = reactor.listenUDP(0, UDPEchoName("live"), interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        g = BackendGroup("g", [Backend("silent", "127.0.0.1", silent.getsockname()[1]),
                               Backend("live", "127.0.0.1", echo.getHost().port)])
        config = HealthCheckConfig(type="udp", send=b"ping", expect_bytes=b"ping", interval=0.05, timeout=0.2,
                                   healthy_threshold=1, unhealthy_threshold=2)
        monitor = HealthMonitor(g, config, reactor=reactor)
        monitor.startService()
        self.addCleanup(monitor.stopService)
        yield monitor.when(g.get("silent"), up=False).addTimeout(10, reactor)
        self.assertEqual(g.get("silent").extra["health"].last_reason, "no answer in 0.2 s")
        self.assertTrue(g.get("live").up)
        self.assertEqual(g.get("live").extra["health"].last_status, "ok")
