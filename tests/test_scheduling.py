"""
Tests for L{twisted_slb.scheduling}: each scheduler's distribution, weights,
and the consistent hash's movement when backends come and go.
"""

from __future__ import annotations

from collections import Counter

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twisted_slb.backends import Backend, BackendGroup
from twisted_slb.scheduling import (
    ConsistentHash,
    IScheduler,
    RoundRobin,
    SmoothWeightedRoundRobin,
    WeightedLeastConnections,
    scheduler_for,
)


def backends(*weights):
    return [Backend(chr(ord("a") + i), "10.0.0.%d" % (i + 1), 80, w) for i, w in enumerate(weights)]


KEYS = [f"10.{i >> 8 & 255}.{i & 255}.7" for i in range(10000)]


class InterfaceTests(SynchronousTestCase):
    def test_allProvideIScheduler(self):
        """Every scheduler named in the configuration provides IScheduler and carries its name."""
        for name in ("rr", "wrr", "wlc", "hash"):
            scheduler = scheduler_for(name)
            verifyObject(IScheduler, scheduler)
            self.assertEqual(scheduler.name, name)


class RoundRobinTests(SynchronousTestCase):
    def test_inTurnIgnoringWeights(self):
        """Round robin takes the backends in turn, whatever their weights."""
        bs = backends(5, 1, 1)
        rr = RoundRobin()
        self.assertEqual([rr.pick(bs, "").name for _ in range(6)], list("abcabc"))


class SmoothWeightedRoundRobinTests(SynchronousTestCase):
    def test_nginxSequence(self):
        """Weights 5, 1, 1 give nginx's smooth sequence a a b a c a a."""
        bs = backends(5, 1, 1)
        wrr = SmoothWeightedRoundRobin()
        self.assertEqual("".join(wrr.pick(bs, "").name for _ in range(7)), "aabacaa")

    def test_weightsExactOverACycle(self):
        """Over whole cycles, smooth weighted round robin picks each backend exactly in proportion to its weight."""
        bs = backends(3, 2, 7, 1)
        wrr = SmoothWeightedRoundRobin()
        counts = Counter(wrr.pick(bs, "").name for _ in range(13 * 10))
        self.assertEqual(counts, {"a": 30, "b": 20, "c": 70, "d": 10})

    def test_drainedNeverPickedThroughGroup(self):
        """A draining backend (weight 0) is never chosen for new clients."""
        group = BackendGroup("g", backends(100, 0, 100))
        self.assertNotIn("b", {group.choose("").name for _ in range(20)})

    def test_downNeverPicked(self):
        """A down backend is never chosen."""
        group = BackendGroup("g", backends(100, 100))
        group.get("a").up = False
        self.assertEqual({group.choose("").name for _ in range(10)}, {"b"})

    def test_noneLeft(self):
        """With no backend able to take a client, choose answers None."""
        group = BackendGroup("g", backends(0, 0))
        self.assertIsNone(group.choose(""))


class WeightedLeastConnectionsTests(SynchronousTestCase):
    def test_leastActivePerWeight(self):
        """Weighted least connections picks the backend with the fewest active connections per unit of weight."""
        bs = backends(100, 200)
        bs[0].active, bs[1].active = 3, 4  # 0.03 vs 0.02 per unit of weight
        self.assertEqual(WeightedLeastConnections().pick(bs, "").name, "b")

    def test_tiesAreSpread(self):
        """Ties in weighted least connections are spread over the tied backends."""
        bs = backends(100, 100, 100)
        wlc = WeightedLeastConnections()
        self.assertEqual({wlc.pick(bs, "").name for _ in range(3)}, {"a", "b", "c"})


class ConsistentHashTests(SynchronousTestCase):
    def assign(self, bs):
        h = ConsistentHash()
        return {k: h.pick(bs, k).name for k in KEYS}

    def test_sameKeySameBackendAcrossInstances(self):
        """Two schedulers over equal backends map every key alike (several balancers agree)."""
        self.assertEqual(self.assign(backends(100, 100, 100)), self.assign(backends(100, 100, 100)))

    def test_proportionalToWeights(self):
        """Keys are shared in proportion to the weights (within 3%)."""
        counts = Counter(self.assign(backends(100, 300)).values())
        self.assertLess(abs(counts["b"] / len(KEYS) - 0.75), 0.03)

    def test_addingABackendMovesAboutOneNth(self):
        """Adding a fifth backend moves about 1/5 of the clients, all onto it."""
        before = self.assign(backends(100, 100, 100, 100))
        after = self.assign(backends(100, 100, 100, 100, 100))
        moved = [k for k in KEYS if before[k] != after[k]]
        self.assertLess(abs(len(moved) / len(KEYS) - 0.2), 0.03)
        self.assertEqual({after[k] for k in moved}, {"e"})

    def test_removingABackendMovesOnlyItsClients(self):
        """Removing a backend moves only the keys it had."""
        before = self.assign(backends(100, 100, 100, 100))
        remaining = [b for b in backends(100, 100, 100, 100) if b.name != "c"]
        after = self.assign(remaining)
        moved = {k for k in KEYS if before[k] != after[k]}
        self.assertEqual(moved, {k for k in KEYS if before[k] == "c"})


class HashKeyTests(SynchronousTestCase):
    """hash_key: what the hash scheduler hashes, read from the request (issue 16 section 5)."""

    def request(self, uri=b"/", headers=()):
        from twisted.web.test.requesthelper import DummyRequest

        r = DummyRequest([b""])
        r.uri = uri
        for name, value in headers:
            r.requestHeaders.addRawHeader(name, value)
        return r

    def test_eachKind(self):
        """header, cookie, query, path and host each read their part of the request."""
        from twisted_slb.scheduling import hash_key_of

        r = self.request(b"/app/x?user=42&b=1", [(b"X-Tenant", b" t1 "), (b"Cookie", b"a=1; uid=u9"),
                                                 (b"Host", b"Shop.Example.com:8080")])
        self.assertEqual(hash_key_of("header:X-Tenant", r), "t1")
        self.assertEqual(hash_key_of("header:x-tenant", r), "t1")
        self.assertEqual(hash_key_of("cookie:uid", r), "u9")
        self.assertEqual(hash_key_of("query:user", r), "42")
        self.assertEqual(hash_key_of("path", r), "/app/x")
        self.assertEqual(hash_key_of("host", r), "shop.example.com")
        absolute = self.request(b"http://api.example.com/v1?user=7")
        self.assertEqual(hash_key_of("host", absolute), "api.example.com")
        self.assertEqual(hash_key_of("path", absolute), "/v1")
        self.assertEqual(hash_key_of("query:user", absolute), "7")

    def test_missingKeyIsNone(self):
        """A request without the header, cookie or parameter (or with an empty one) has no key; TCP has none."""
        from twisted_slb.scheduling import hash_key_of

        r = self.request(b"/?user=", [(b"Cookie", b"a=1")])
        for spec in ("header:X-Tenant", "cookie:uid", "query:user", "query:other", "host"):
            self.assertIsNone(hash_key_of(spec, r), spec)
        self.assertIsNone(hash_key_of("path", None))

    def test_groupHashesTheKeyAndFallsBackToWeightedRoundRobin(self):
        """
        A group hashing header:X-Tenant sends one tenant to one backend
        whatever the client address; requests without the header go round
        by weight (3:1 here), not all to one backend.
        """
        from twisted_slb.persistence.interfaces import Session

        group = BackendGroup("g", backends(300, 100), scheduler=ConsistentHash())
        group.hash_key = "header:X-Tenant"
        chosen = {group.route(Session(f"10.0.0.{i}", request=self.request(headers=[(b"X-Tenant", b"t1")])))
                  for i in range(20)}
        self.assertEqual(len(chosen), 1)
        counts = Counter(group.route(Session("10.0.0.1", request=self.request())).name for _ in range(8))
        self.assertEqual(counts, {"a": 6, "b": 2})

    def test_addingABackendMovesAboutOneNthOfTheKeys(self):
        """
        Hashing header values over 4 backends, then 5: about 1/5 of the keys
        move, all of them to the new backend; removing it moves them back.
        """
        scheduler = ConsistentHash()
        four, five = backends(100, 100, 100, 100), backends(100, 100, 100, 100, 100)
        tenants = [f"tenant-{i}" for i in range(10000)]
        before = {k: scheduler.pick(four, k).name for k in tenants}
        after = {k: scheduler.pick(five, k).name for k in tenants}
        moved = [k for k in tenants if before[k] != after[k]]
        self.assertTrue(0.17 < len(moved) / len(tenants) < 0.23, len(moved))
        self.assertEqual({after[k] for k in moved}, {"e"})
        self.assertEqual({k: scheduler.pick(four, k).name for k in tenants}, before)


class BoundedLoadTests(SynchronousTestCase):
    """hash_balance_factor: consistent hashing with bounded loads."""

    def test_noBackendAboveTheFactor(self):
        """
        With factor 150 and every key hashing to one hot backend first, no
        backend carries more than 150% of the average active load.
        """
        scheduler = ConsistentHash(balance_factor=150)
        bs = backends(100, 100, 100, 100)
        for n in range(400):
            b = scheduler.pick(bs, "hot-key")
            b.active += 1
            total = sum(x.active for x in bs)
            self.assertLessEqual(max(x.active for x in bs), -(-150 * total // (100 * len(bs))), n)
        # The hot key's first backend took 150% of the average (100), and
        # the rest spilled to its next backends in hash order.
        self.assertEqual(max(x.active for x in bs), 150)

    def test_keysStayWhileThereIsRoom(self):
        """Below the bound a key keeps its consistent-hash backend (factor on, idle group: same as without)."""
        bs = backends(100, 100, 100)
        plain, bounded = ConsistentHash(), ConsistentHash(balance_factor=125)
        self.assertEqual([plain.pick(bs, k) for k in KEYS[:300]], [bounded.pick(bs, k) for k in KEYS[:300]])

    def test_withoutFactorTheHotBackendTakesEverything(self):
        """Factor 0 (the default) is plain consistent hashing: one key, one backend, whatever its load."""
        scheduler = ConsistentHash()
        bs = backends(100, 100)
        first = scheduler.pick(bs, "hot-key")
        first.active = 1000
        self.assertIs(scheduler.pick(bs, "hot-key"), first)
