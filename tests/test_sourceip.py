"""
Tests for L{twisted_slb.persistence.sourceip}: the stick table (idle expiry,
LRU bound, IPv6) and the source-IP policy.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.persistence.interfaces import IPersistencePolicy, Session, normalise_ip
from twisted_slb.persistence.sourceip import SourceIPPersistence, StickTable


class StickTableTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.table = StickTable(100, max_entries=3, clock=self.clock)

    def test_idleExpiry(self):
        """A table entry lives exactly its timeout after being set, then is gone (and no longer counted)."""
        self.table.set("10.0.0.1", "k1")
        self.clock.advance(100)
        self.assertEqual(self.table.get("10.0.0.1"), "k1")
        self.clock.advance(0.01)
        self.assertIsNone(self.table.get("10.0.0.1"))
        self.assertEqual(len(self.table), 0)

    def test_setRefreshes(self):
        """Setting an entry again restarts its timeout."""
        self.table.set("10.0.0.1", "k1")
        self.clock.advance(80)
        self.table.set("10.0.0.1", "k1")
        self.clock.advance(80)
        self.assertEqual(self.table.get("10.0.0.1"), "k1")

    def test_getDoesNotRefresh(self):
        """Reading an entry does not restart its timeout."""
        self.table.set("10.0.0.1", "k1")
        self.clock.advance(80)
        self.table.get("10.0.0.1")
        self.clock.advance(30)
        self.assertIsNone(self.table.get("10.0.0.1"))

    def test_lruBound(self):
        """At max_entries, a new entry evicts the least recently set one."""
        for i in range(3):
            self.table.set(f"10.0.0.{i}", "k")
        self.table.set("10.0.0.0", "k")  # most recent now
        self.table.set("10.0.0.9", "k")  # evicts 10.0.0.1, the least recently used
        self.assertIsNone(self.table.get("10.0.0.1"))
        self.assertEqual(len(self.table), 3)
        self.assertEqual(self.table.get("10.0.0.0"), "k")

    def test_expireDropsOnlyExpired(self):
        """expire() removes exactly the expired entries and says how many."""
        self.table.set("a", "k")
        self.clock.advance(60)
        self.table.set("b", "k")
        self.clock.advance(50)
        self.assertEqual(self.table.expire(), 1)
        self.assertEqual([c for c, _, _ in self.table.items()], [b"b"])

    def test_timeoutChangeOnALiveTable(self):
        """Shortening the timeout of a live table applies to entries already in it."""
        self.table.set("a", "k")
        self.clock.advance(50)
        self.table.timeout = 10
        self.assertIsNone(self.table.get("a"))

    def test_manyBackendKeysAreInterned(self):
        """Equal backend keys are stored as one object, however many entries name them."""
        table = StickTable(100, clock=self.clock)
        table.set("a", "x" * 16)
        table.set("b", "x" * 16)
        self.assertIs(table.get("a"), table.get("b"))


class NormaliseTests(SynchronousTestCase):
    def test_ipv4MappedIsIpv4(self):
        """An IPv4-mapped IPv6 address is normalised to the IPv4 address."""
        self.assertEqual(normalise_ip("::ffff:10.0.0.1"), "10.0.0.1")

    def test_ipv6Compressed(self):
        """IPv6 addresses are normalised to their compressed lowercase form."""
        self.assertEqual(normalise_ip("2001:DB8:0:0::1"), "2001:db8::1")


class PolicyTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.group = BackendGroup("g", [Backend("a", "10.0.0.1", 80), Backend("b", "10.0.0.2", 80)])
        self.policy = SourceIPPersistence(StickTable(1000, clock=self.clock))

    def visit(self, ip):
        session = Session(normalise_ip(ip), policy=self.policy)
        session.pinned_key = self.policy.find(session)
        backend = self.group.route(session)
        self.policy.remember(session, backend)
        return backend, session.outcome

    def test_interface(self):
        """SourceIPPersistence provides IPersistencePolicy."""
        verifyObject(IPersistencePolicy, self.policy)

    def test_newThenHit(self):
        """A client's first visit is "new"; the next ones go to the same backend as hits."""
        first, outcome = self.visit("192.0.2.1")
        self.assertEqual(outcome, "new")
        for _ in range(5):
            self.assertEqual(self.visit("192.0.2.1"), (first, "hit"))

    def test_ipv4MappedClientIsTheSameClient(self):
        """A client coming as an IPv4-mapped IPv6 address is the same client as its IPv4 address."""
        first, _ = self.visit("192.0.2.1")
        self.assertEqual(self.visit("::ffff:192.0.2.1"), (first, "hit"))

    def test_ipv6Clients(self):
        """Two spellings of one IPv6 address are the same client."""
        first, _ = self.visit("2001:db8::5")
        self.assertEqual(self.visit("2001:db8:0::5"), (first, "hit"))

    def test_downBackendRepinsAndTheNewPinSticks(self):
        """A client of a down backend is re-pinned, and stays on its new backend when the old one comes back."""
        first, _ = self.visit("192.0.2.1")
        first.up = False
        second, outcome = self.visit("192.0.2.1")
        self.assertEqual(outcome, "repin")
        self.assertIsNot(second, first)
        first.up = True
        self.assertEqual(self.visit("192.0.2.1"), (second, "hit"))

    def test_removedBackendRepins(self):
        """A client pinned to a backend removed by a reload is re-pinned."""
        first, _ = self.visit("192.0.2.1")
        from twisted_slb.config import GroupConfig, ServerConfig

        other = "b" if first.name == "a" else "a"
        self.group.update(GroupConfig("g", (ServerConfig(other, "10.0.0.9", 80),)))
        backend, outcome = self.visit("192.0.2.1")
        self.assertEqual((backend.name, outcome), (other, "repin"))

    def test_subclassKey(self):
        """A subclass's client_key groups clients (here by /24): they share one backend."""
        class PerNetwork(SourceIPPersistence):
            def client_key(self, session):
                return session.client_ip.rsplit(".", 1)[0]

        self.policy = PerNetwork(StickTable(1000, clock=self.clock))
        first, _ = self.visit("192.0.2.1")
        self.assertEqual(self.visit("192.0.2.200"), (first, "hit"))
