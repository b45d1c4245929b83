# -*- test-case-name: tests.test_tables -*-
"""
Tests for L{twisted_slb.persistence.tables}: the one stick table keyed by
bytes, header persistence and learned-cookie persistence, in memory.
"""

from __future__ import annotations

import attr
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.persistence.interfaces import IPersistencePolicy, Session
from twisted_slb.persistence.tables import (
    MAX_KEY_BYTES,
    HeaderPersistence,
    IStickTable,
    LearnCookiePersistence,
    StickTable,
    TablePersistence,
)


class StickTableKeyTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.table = StickTable(100, max_entries=3, clock=self.clock)

    def test_interface(self):
        """The in-memory table provides the whole IStickTable surface."""
        verifyObject(IStickTable, self.table)

    def test_strAndBytesAreOneKey(self):
        """A str key is its UTF-8 bytes: the source-IP policy's text keys and the header policy's bytes share one table type."""
        self.table.set("10.0.0.1", "k1")
        self.assertEqual(self.table.get(b"10.0.0.1"), "k1")
        self.assertEqual([k for k, _, _ in self.table.items()], [b"10.0.0.1"])

    def test_longKeysAreStoredAsDigests(self):
        """A key beyond MAX_KEY_BYTES costs a digest, not its length, and still finds its entry."""
        long_key = b"x" * (MAX_KEY_BYTES * 100)
        self.table.set(long_key, "k1")
        self.assertEqual(self.table.get(long_key), "k1")
        self.assertIsNone(self.table.get(b"x" * (MAX_KEY_BYTES * 100 - 1)))
        (stored, _, _), = self.table.items()
        self.assertEqual(len(stored), 17)

    def test_delete(self):
        """delete forgets a key; deleting an absent key is not an error."""
        self.table.set(b"a", "k1")
        self.table.delete(b"a")
        self.table.delete(b"never")
        self.assertIsNone(self.table.get(b"a"))

    def test_idleExpiryAndSizeBound(self):
        """Entries expire timeout seconds after their last set; the least recently used go beyond max_entries."""
        for k in (b"a", b"b", b"c"):
            self.table.set(k, "k")
        self.table.set(b"a", "k")  # a is now the most recent
        self.table.set(b"d", "k")
        self.assertIsNone(self.table.get(b"b"))
        self.assertEqual(self.table.get(b"a"), "k")
        self.clock.advance(101)
        self.assertIsNone(self.table.get(b"a"))


def request(headers=(), cookie=None):
    r = DummyRequest([b""])
    for name, value in headers:
        r.requestHeaders.addRawHeader(name, value)
    if cookie is not None:
        r.requestHeaders.addRawHeader(b"cookie", cookie)
    return r


class HeaderPersistenceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.group = BackendGroup("g", [Backend(n, "10.0.0.%d" % i, 80) for i, n in enumerate("abc", 1)])
        self.table = StickTable(60, clock=self.clock)
        self.policy = HeaderPersistence(self.table, "X-Session-Id")

    def visit(self, r):
        session = Session("192.0.2.1", request=r, policy=self.policy)
        session.pinned_key = self.policy.find(session)
        backend = self.group.route(session)
        if backend is not None:
            self.policy.remember(session, backend)
        return backend, session.outcome

    def test_interface(self):
        """The header policy is an IPersistencePolicy and a TablePersistence."""
        verifyObject(IPersistencePolicy, self.policy)
        self.assertIsInstance(self.policy, TablePersistence)

    def test_sameValueSameBackend(self):
        """Requests with one X-Session-Id value reach one backend; other values are spread."""
        first, outcome = self.visit(request([(b"X-Session-Id", b"abc")]))
        self.assertEqual(outcome, "new")
        for _ in range(5):
            self.assertEqual(self.visit(request([(b"x-session-id", b"abc")])), (first, "hit"))
        others = {self.visit(request([(b"X-Session-Id", b"v%d" % i)]))[0] for i in range(6)}
        self.assertEqual(len(others), 3)

    def test_noHeaderIsBalancedAndNothingStored(self):
        """A request without the header (or with an empty one) is balanced as usual and leaves the table empty."""
        seen = {self.visit(request())[0] for _ in range(3)}
        self.visit(request([(b"X-Session-Id", b"  ")]))
        self.assertEqual(len(seen), 3)
        self.assertEqual(len(self.table), 0)

    def test_idleValueExpires(self):
        """A value unused for longer than the timeout is balanced anew (outcome new)."""
        self.visit(request([(b"X-Session-Id", b"abc")]))
        self.clock.advance(61)
        self.assertEqual(self.visit(request([(b"X-Session-Id", b"abc")]))[1], "new")

    def test_strictKeepsTheEntry(self):
        """on_failure strict: a value pinned to a down backend gets no backend, and its entry stays."""
        self.policy = HeaderPersistence(self.table, "X-Session-Id", on_failure="strict")
        first, _ = self.visit(request([(b"X-Session-Id", b"abc")]))
        first.up = False
        self.assertEqual(self.visit(request([(b"X-Session-Id", b"abc")])), (None, "strict"))
        self.assertEqual(self.table.get(b"abc"), first.id)

    def test_badHeaderName(self):
        """A header name that is not a token is refused when the policy is built."""
        self.assertRaises(ValueError, HeaderPersistence, self.table, "X Session")


class LearnCookieTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.group = BackendGroup("g", [Backend(n, "10.0.0.%d" % i, 80) for i, n in enumerate("abc", 1)])
        self.table = StickTable(60, clock=self.clock)
        self.policy = LearnCookiePersistence(self.table, "JSESSIONID")

    def visit(self, r, set_cookies=()):
        """Route one request; the chosen backend answers with C{set_cookies}."""
        session = Session("192.0.2.1", request=r, policy=self.policy)
        session.pinned_key = self.policy.find(session)
        backend = self.group.route(session)
        for value in set_cookies:
            r.responseHeaders.addRawHeader(b"set-cookie", value)
        self.policy.remember(session, backend)
        return backend, session.outcome

    def test_learnsFromSetCookieAndNeverModifiesIt(self):
        """The backend's JSESSIONID is learned as is; the request carrying it reaches that backend, cookie untouched."""
        r = request()
        first, _ = self.visit(r, [b"JSESSIONID=sig.abc==; Path=/; HttpOnly"])
        self.assertEqual(r.responseHeaders.getRawHeaders(b"set-cookie"), [b"JSESSIONID=sig.abc==; Path=/; HttpOnly"])
        for _ in range(4):
            r = request(cookie=b"theme=dark; JSESSIONID=sig.abc==")
            self.assertEqual(self.visit(r), (first, "hit"))
            self.assertEqual(r.requestHeaders.getRawHeaders(b"cookie"), [b"theme=dark; JSESSIONID=sig.abc=="])

    def test_unknownValueIsNotStored(self):
        """A value no backend set (forged, or from before a restart) is balanced and not stored."""
        self.visit(request(cookie=b"JSESSIONID=forged"))
        self.assertIsNone(self.table.get(b"forged"))

    def test_deletionForgetsTheValue(self):
        """A Set-Cookie with Max-Age=0 forgets the value the request carried (logout)."""
        self.visit(request(), [b"JSESSIONID=s1; Path=/"])
        self.visit(request(cookie=b"JSESSIONID=s1"), [b"JSESSIONID=; Max-Age=0; Path=/"])
        self.assertIsNone(self.table.get(b"s1"))

    def test_repinnedClientKeepsItsValueOnTheNewBackend(self):
        """When the learned backend is down, the client moves and its value follows it (repin), without a new cookie."""
        first, _ = self.visit(request(), [b"JSESSIONID=s1"])
        first.up = False
        second, outcome = self.visit(request(cookie=b"JSESSIONID=s1"))
        self.assertEqual(outcome, "repin")
        first.up = True
        self.assertEqual(self.visit(request(cookie=b"JSESSIONID=s1")), (second, "hit"))

    def test_activeValueIsRefreshed(self):
        """Each request with a learned value restarts its idle time: only idle sessions expire."""
        first, _ = self.visit(request(), [b"JSESSIONID=s1"])
        for _ in range(3):
            self.clock.advance(40)
            self.assertEqual(self.visit(request(cookie=b"JSESSIONID=s1")), (first, "hit"))
        self.clock.advance(61)
        self.assertEqual(self.visit(request(cookie=b"JSESSIONID=s1"))[1], "new")

    def test_quotedValue(self):
        """A quoted cookie value is the same key as the unquoted one."""
        first, _ = self.visit(request(), [b'JSESSIONID="s1"'])
        self.assertEqual(self.visit(request(cookie=b"JSESSIONID=s1")), (first, "hit"))


class WrapTests(SynchronousTestCase):
    def test_wrapBuildsTablePoliciesAndKeepsTheirTable(self):
        """wrap_with_persistence builds header and learn_cookie policies; a second build reuses the caller's table."""
        from twisted.web.resource import Resource

        from twisted_slb.config import PersistenceConfig
        from twisted_slb.persistence.build import wrap_with_persistence

        tables: dict = {}
        clock = Clock()
        header = PersistenceConfig(type="header", header="X-Session-Id", timeout=60, max_entries=5)
        first = wrap_with_persistence(Resource(), header, clock, tables, "web/g")
        self.assertIsInstance(first.policy, HeaderPersistence)
        self.assertEqual(first.policy.header, b"X-Session-Id")
        again = wrap_with_persistence(Resource(), attr.evolve(header, timeout=120), clock, tables, "web/g")
        self.assertIs(again.policy.table, first.policy.table)
        self.assertEqual(again.policy.table.timeout, 120)
        learn = PersistenceConfig(type="learn_cookie", cookie="JSESSIONID", timeout=60, on_failure="strict")
        policy = wrap_with_persistence(Resource(), learn, clock).policy
        self.assertIsInstance(policy, LearnCookiePersistence)
        self.assertEqual((policy.cookie_name, policy.on_failure), (b"JSESSIONID", "strict"))

    def test_policyOfAStoreIsShared(self):
        """With a store, persistence_policy's new table is a SharedStickTable named by its key, kept by the caller."""
        from twisted_slb.config import PersistenceConfig
        from twisted_slb.persistence.build import persistence_policy
        from twisted_slb.persistence.store import RedisStore, SharedStickTable

        store = RedisStore("redis://127.0.0.1:1", clock=Clock())
        tables: dict = {}
        config = PersistenceConfig(type="source_ip", timeout=60)
        policy = persistence_policy(config, Clock(), tables, "tcp/g", store=store)
        self.assertIsInstance(policy.table, SharedStickTable)
        self.assertEqual(policy.table.name, "tcp/g")
        self.assertIs(tables["tcp/g"], policy.table)

    def test_sourceIPSchedulerAndRefusedCookieTypes(self):
        """persistence_policy gives source_ip the scheduler asked for, and refuses a cookie type (it has no table)."""
        from twisted_slb.config import PersistenceConfig
        from twisted_slb.persistence.build import persistence_policy
        from twisted_slb.scheduling import ConsistentHash

        hashing = ConsistentHash()
        policy = persistence_policy(PersistenceConfig(type="source_ip", timeout=60), Clock(), scheduler=hashing)
        self.assertIs(policy.scheduler, hashing)
        self.assertRaises(ValueError, persistence_policy, PersistenceConfig(type="insert_cookie"), Clock())

    def test_tableKeyNamesWhatIsRemembered(self):
        """A header or learned-cookie table's key names the header (lowercased) or the cookie; source_ip's is the place."""
        from twisted_slb.config import PersistenceConfig
        from twisted_slb.persistence.build import stick_table_key

        self.assertEqual(stick_table_key("web/g", PersistenceConfig(type="source_ip")), "web/g")
        self.assertEqual(stick_table_key("web/g", PersistenceConfig(type="header", header="X-User")),
                         "web/g/header:x-user")
        self.assertEqual(stick_table_key("web/g", PersistenceConfig(type="learn_cookie", cookie="SID")),
                         "web/g/learn_cookie:SID")


class LargeTableTests(SynchronousTestCase):
    """A large table finds its oldest entries once per batch, not once per entry."""

    def test_fullTableEvictsWithSlack(self):
        """
        A full table of 4096 entries evicts the oldest 5 when one more comes
        (the excess and one in 1024): the least recently used go, and the
        table walks its front once per several new entries.
        """
        table = StickTable(100, max_entries=4096, clock=Clock())
        for i in range(4097):
            table.set(b"%d" % i, "a")
        self.assertEqual(len(table), 4092)
        self.assertEqual([table.get(b"%d" % i) for i in range(6)], [None] * 5 + ["a"])
        self.assertEqual(table.pinned_counts(), {"a": 4092})

    def test_setsExpireTwoOnAverage(self):
        """
        Sets drop expired entries in batches of up to 64 every 32 sets (two a
        set on average), with no get needed: 64 sets past the timeout drop
        all 100 old entries.
        """
        clock = Clock()
        table = StickTable(10, clock=clock)
        for i in range(100):
            table.set(b"old%d" % i, "a")
        clock.advance(11)
        for i in range(64):
            table.set(b"new%d" % i, "a")
        self.assertEqual(len(table), 64)
        self.assertEqual(table.pinned_counts(), {"a": 64})
