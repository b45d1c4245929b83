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
        for name in ("rr", "wrr", "wlc", "hash"):
            scheduler = scheduler_for(name)
            verifyObject(IScheduler, scheduler)
            self.assertEqual(scheduler.name, name)


class RoundRobinTests(SynchronousTestCase):
    def test_inTurnIgnoringWeights(self):
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
        bs = backends(3, 2, 7, 1)
        wrr = SmoothWeightedRoundRobin()
        counts = Counter(wrr.pick(bs, "").name for _ in range(13 * 10))
        self.assertEqual(counts, {"a": 30, "b": 20, "c": 70, "d": 10})

    def test_drainedNeverPickedThroughGroup(self):
        group = BackendGroup("g", backends(100, 0, 100))
        self.assertNotIn("b", {group.choose("").name for _ in range(20)})

    def test_downNeverPicked(self):
        group = BackendGroup("g", backends(100, 100))
        group.get("a").up = False
        self.assertEqual({group.choose("").name for _ in range(10)}, {"b"})

    def test_noneLeft(self):
        group = BackendGroup("g", backends(0, 0))
        self.assertIsNone(group.choose(""))


class WeightedLeastConnectionsTests(SynchronousTestCase):
    def test_leastActivePerWeight(self):
        bs = backends(100, 200)
        bs[0].active, bs[1].active = 3, 4  # 0.03 vs 0.02 per unit of weight
        self.assertEqual(WeightedLeastConnections().pick(bs, "").name, "b")

    def test_tiesAreSpread(self):
        bs = backends(100, 100, 100)
        wlc = WeightedLeastConnections()
        self.assertEqual({wlc.pick(bs, "").name for _ in range(3)}, {"a", "b", "c"})


class ConsistentHashTests(SynchronousTestCase):
    def assign(self, bs):
        h = ConsistentHash()
        return {k: h.pick(bs, k).name for k in KEYS}

    def test_sameKeySameBackendAcrossInstances(self):
        self.assertEqual(self.assign(backends(100, 100, 100)), self.assign(backends(100, 100, 100)))

    def test_proportionalToWeights(self):
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
        before = self.assign(backends(100, 100, 100, 100))
        remaining = [b for b in backends(100, 100, 100, 100) if b.name != "c"]
        after = self.assign(remaining)
        moved = {k for k in KEYS if before[k] != after[k]}
        self.assertEqual(moved, {k for k in KEYS if before[k] == "c"})
