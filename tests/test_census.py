# -*- test-case-name: tests.test_census -*-
"""
Tests for L{twisted_slb.persistence.census}: the per-backend pinned counts of
stick tables, the approximate count of recent cookie clients, and how they
add up per backend; in memory, time from a L{Clock}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.config import parse_config
from twisted_slb.persistence.census import BUCKETS, PinCensus, RecentClients, table_counts
from twisted_slb.persistence.interfaces import Session
from twisted_slb.persistence.sourceip import SourceIPPersistence
from twisted_slb.persistence.tables import IStickTable, StickTable, table_key
from twisted_slb.service import BalancerService
from tests.test_cookies import FakeProxy, get, make_group, serve


class PinnedCountTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.table = StickTable(100, max_entries=4, clock=self.clock)

    def walk(self):
        """The counts by walking items(): what pinned_counts must always agree with."""
        out = {}
        for _, backend_key, _ in self.table.items():
            out[backend_key] = out.get(backend_key, 0) + 1
        return out

    def test_countsFollowSetMoveAndDelete(self):
        """Entries are counted per backend; moving a key moves its count; delete takes it away."""
        for key, backend in ((b"1", "a"), (b"2", "a"), (b"3", "b")):
            self.table.set(key, backend)
        self.assertEqual(self.table.pinned_counts(), {"a": 2, "b": 1})
        self.table.set(b"1", "b")
        self.assertEqual(self.table.pinned_counts(), {"a": 1, "b": 2})
        self.table.delete(b"2")
        self.table.delete(b"never")
        self.assertEqual(self.table.pinned_counts(), {"b": 2})
        self.assertEqual(self.table.pinned_counts(), self.walk())

    def test_expiredEntriesAreNotCounted(self):
        """An entry idle past the timeout is not counted, though no set or get dropped it yet."""
        self.table.set(b"1", "a")
        self.clock.advance(60)
        self.table.set(b"2", "a")
        self.clock.advance(41)
        self.assertEqual(self.table.pinned_counts(), {"a": 1})
        self.clock.advance(60)
        self.assertEqual(self.table.pinned_counts(), {})
        self.assertEqual(len(self.table), 0)

    def test_evictionAndRestoreAreCounted(self):
        """Entries evicted by the size bound leave the count; restored ones join it."""
        for i in range(6):
            self.table.set(b"%d" % i, "ab"[i % 2])
        self.assertEqual(self.table.pinned_counts(), self.walk())
        self.assertEqual(sum(self.table.pinned_counts().values()), 4)
        self.table.restore(b"0", "b", 10)
        self.assertEqual(self.table.pinned_counts(), self.walk())

    def test_countsSurviveReinterningBackendKeys(self):
        """When the table renumbers its backend keys (after very many), the counts follow them."""
        self.table.max_entries = 10
        self.table.set(b"x", "keep")
        for i in range(0xFFFF):
            self.table._intern(f"gone{i}")
        self.table.set(b"y", "new")
        self.assertEqual(self.table.pinned_counts(), {"keep": 1, "new": 1})

    def test_anyTableIsCountedThroughItems(self):
        """A table without pinned_counts (a shared store's) is counted by walking items()."""

        @implementer(IStickTable)
        class Plain:
            timeout = 10
            max_entries = 10

            def items(self):
                return iter([(b"1", "a", 0.0), (b"2", "a", 1.0), (b"3", "b", 2.0)])

        self.assertEqual(table_counts(Plain()), {"a": 2, "b": 1})


class RecentClientsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.clients = RecentClients(800, clock=self.clock)

    def test_smallCountsAreExactAndRepeatsCountOnce(self):
        """Tens of distinct clients are counted within one; a client seen again is not counted again."""
        for i in range(40):
            for _ in range(3):
                self.clients.seen("a", b"client %d" % i)
        self.clients.seen("b", b"client 0")
        self.assertLessEqual(abs(self.clients.estimate("a") - 40), 1)
        self.assertEqual(self.clients.counts()["b"], 1)
        self.assertEqual(self.clients.estimate("never"), 0)

    def test_largeCountsWithinTheStatedError(self):
        """50,000 distinct clients are estimated within three standard errors (10%), in 9 KB."""
        for i in range(50_000):
            self.clients.seen("a", b"%d" % i)
        self.assertLessEqual(abs(self.clients.estimate("a") - 50_000), 5_000)
        _, buckets = self.clients._sketches["a"]
        self.assertLessEqual(sum(len(b) for b in buckets if b is not None), (BUCKETS + 1) * 1024)

    def test_clientsLeaveAfterTheWindow(self):
        """A client is counted for at least the window and at most an eighth more; then the count is 0."""
        self.clients.seen("a", b"old")
        self.clock.advance(400)
        self.clients.seen("a", b"recent")
        self.clock.advance(400)
        self.assertEqual(self.clients.estimate("a"), 2)  # "old" was seen exactly 800 s ago
        self.clock.advance(100)
        self.assertEqual(self.clients.estimate("a"), 1)
        self.clock.advance(400)
        self.assertEqual(self.clients.counts(), {})
        self.assertNotIn("a", self.clients._sketches)  # its memory is given back

    def test_bucketsAreReusedRoundTheRing(self):
        """However long it runs, a backend keeps at most BUCKETS + 1 sketches."""
        for step in range(100):
            self.clients.seen("a", b"%d" % step)
            self.clock.advance(50)
        _, buckets = self.clients._sketches["a"]
        self.assertEqual(len(buckets), BUCKETS + 1)
        self.assertLessEqual(abs(self.clients.estimate("a") - 16), 2)


class CookieCountTests(SynchronousTestCase):
    def request(self, policy, cookies=(), agent=b"ua-1"):
        raw = get(cookies=cookies).replace(b"Connection: close", b"Connection: close\r\nUser-Agent: " + agent)
        return serve(policy, raw)

    def test_insertCookieCountsClientsByAddressAndAgent(self):
        """Insert cookies count each (address, User-Agent) once per backend, first visit and later ones alike."""
        from twisted_slb.persistence.cookies import InsertCookie

        clock = Clock()
        clock.advance(1_000_000)
        group = make_group()
        policy = InsertCookie(FakeProxy(group), reactor=clock)
        policy.clients = RecentClients(policy.max_idle, clock=clock)
        first = self.request(policy)
        cookie = first.one(b"set-cookie").split(b";")[0]
        self.request(policy, [cookie])
        self.request(policy, [cookie], agent=b"ua-2")
        served = group.get(first.body.split()[-1].decode())
        self.assertEqual(policy.clients.counts(), {served.id: 2})

    def test_rewriteCookieCountsSessions(self):
        """Rewrite cookies count the backend's own session values: two sessions on one backend are two."""
        from twisted_slb.persistence.cookies import RewriteCookie

        clock = Clock()
        group = make_group()
        a = group.get("a")
        policy = RewriteCookie(FakeProxy(group), name=b"JSESSIONID")
        policy.clients = RecentClients(3600, clock=clock)
        for session in (b"s1", b"s2", b"s1"):
            self.request(policy, [b"JSESSIONID=" + a.id.encode() + b"~" + session])
        self.assertEqual(policy.clients.counts(), {a.id: 2})


SERVICE = """
[backends.web]
servers = [ { name = "a", address = "127.0.0.1:1" }, { name = "b", address = "127.0.0.1:2" } ]

[listeners.tcp]
protocol = "tcp"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = { type = "source_ip", timeout = 100 }

[listeners.web]
protocol = "http"
bind = "tcp:0:interface=127.0.0.1"
backends = "web"
persistence = { type = "insert_cookie", timeout = 600, max_idle = 300 }

[[listeners.web.rules]]
path = "/api"
persistence = { type = "header", header = "X-Session-Id" }
"""


class CensusTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.service = BalancerService(parse_config(SERVICE), self.clock)
        self.census = self.service.stats.census

    def test_serviceNamesTablesAndCounters(self):
        """The service hands its tables (with type and users) and its cookie counters to the census."""
        described = {t["name"]: t for t in self.census.describe()}
        self.assertEqual(set(described), {"tcp/web", "web/web/header:x-session-id"})
        self.assertEqual((described["tcp/web"]["type"], described["tcp/web"]["routes"]), ("source_ip", ["tcp"]))
        header = described["web/web/header:x-session-id"]
        self.assertEqual((header["type"], header["routes"], header["timeout"]), ("header", ["web rule 0"], 3600))
        self.assertEqual(list(self.census.cookie_clients), ["web/web/insert_cookie:SERVERID"])
        self.assertEqual(self.census.cookie_clients["web/web/insert_cookie:SERVERID"].window, 300)

    def test_pinnedCountsFallAfterDrain(self):
        """After drain, a backend's pinned count falls as its idle clients expire, to zero when none is left."""
        group = self.service.groups["web"]
        a = group.get("a")
        policy = SourceIPPersistence(self.service.stick_tables["tcp/web"])

        def visit(ip):
            session = Session(ip, policy=policy)
            session.pinned_key = policy.find(session)
            backend = group.route(session)
            policy.remember(session, backend)
            return backend

        pinned = [ip for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4") if visit(ip) is a]
        self.assertEqual(len(pinned), 2)
        self.assertEqual(self.census.pinned()[("web", "a")], 2)
        a.admin_state = "drain"
        self.clock.advance(60)
        self.assertIs(visit(pinned[0]), a)  # a drained backend keeps its clients
        self.clock.advance(60)
        snapshot = self.service.stats.snapshot()
        counts = {b["name"]: b["pinned_clients"] for b in snapshot["groups"][0]["backends"]}
        self.assertEqual(counts, {"a": 1, "b": 0})  # every client idle for 120 s is gone
        self.clock.advance(60)
        self.assertEqual(self.census.pinned().get(("web", "a"), 0), 0)

    def test_reloadKeepsCountersAndDropsUnused(self):
        """A reload keeps a counter still in use (with its new window) and drops the others."""
        counter = self.census.cookie_clients["web/web/insert_cookie:SERVERID"]
        self.assertTrue(self.service.reload(parse_config(SERVICE.replace("max_idle = 300", "max_idle = 200"))))
        self.assertIs(self.census.cookie_clients["web/web/insert_cookie:SERVERID"], counter)
        self.assertEqual(counter.window, 200)
        self.assertTrue(self.service.reload(parse_config(SERVICE.replace('type = "insert_cookie", ', 'type = "source_ip", '
                                                                         ).replace(", max_idle = 300", ""))))
        self.assertEqual(self.census.cookie_clients, {})
        self.assertEqual(self.census.table_types["web/web"], "source_ip")
        self.assertEqual(self.census.table_routes["web/web"], ["web"])

    def test_backendsOfASplitTable(self):
        """A table of a split (groups joined by +) counts each backend in the group that has it."""
        census = PinCensus({"g1": BackendGroup("g1", [Backend("a", "10.0.0.1", 80)]),
                            "g2": BackendGroup("g2", [Backend("b", "10.0.0.2", 80)])})
        table = StickTable(100, clock=self.clock)
        table.set(b"1", Backend("a", "x", 1).id)
        table.set(b"2", Backend("b", "x", 1).id)
        table.set(b"3", "0000000000000000")  # a backend removed since
        census.tables = {"web/g1+g2": table}
        self.assertEqual(census.pinned(), {("g1", "a"): 1, ("g2", "b"): 1})
        self.assertEqual(census.backend_for("web/g1+g2", Backend("b", "x", 1).id).name, "b")
        self.assertIsNone(census.backend_for("web/g1+g2", "0000000000000000"))
        self.assertEqual(table_key("x"), b"x")
