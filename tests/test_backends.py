"""
Tests for L{twisted_slb.backends}: ids, states, routing outcomes and reloads.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_slb.backends import Backend, BackendGroup, backend_id
from twisted_slb.config import GroupConfig, ServerConfig
from twisted_slb.persistence.interfaces import EXPIRED, HIT, NEW, REPIN, STRICT, Session, strict_refusal


class BackendTests(SynchronousTestCase):
    def test_idIsStableOpaqueAndIndependentOfAddress(self):
        """
        A backend's id derives from its name only: stable across address changes, 16 hex digits, revealing no
        address.
        """
        a1 = Backend("a", "10.0.0.1", 80)
        a2 = Backend("a", "192.0.2.9", 8080)
        self.assertEqual(a1.id, a2.id)
        self.assertEqual(a1.id, backend_id("a"))
        self.assertRegex(a1.id, "^[0-9a-f]{16}$")
        self.assertNotIn("10.0.0.1", a1.id)
        self.assertNotEqual(a1.id, Backend("b", "10.0.0.1", 80).id)

    def test_states(self):
        """Weight 0 drains a backend (no new clients, pinned ones kept); down takes no clients at all."""
        b = Backend("a", "10.0.0.1", 80)
        self.assertEqual(b.state, "up")
        b.weight = 0
        self.assertEqual((b.state, b.takes_new_clients, b.takes_pinned_clients), ("drain", False, True))
        b.up = False
        self.assertEqual((b.state, b.takes_pinned_clients), ("down", False))

    def test_ipv6Address(self):
        """An IPv6 backend's address is written in brackets with its port."""
        self.assertEqual(Backend("a", "2001:db8::1", 80).address, "[2001:db8::1]:80")


class RouteTests(SynchronousTestCase):
    def setUp(self):
        self.group = BackendGroup("g", [Backend("a", "10.0.0.1", 80), Backend("b", "10.0.0.2", 80)])
        self.a = self.group.get("a")

    def session(self, key=None, policy=object()):
        return Session("10.9.9.9", policy=policy, pinned_key=key)

    def test_getByIdOrName(self):
        """A group finds a backend by its id or its name, and answers None for neither."""
        self.assertIs(self.group.get(self.a.id), self.a)
        self.assertIs(self.group.get("a"), self.a)
        self.assertIsNone(self.group.get("zz"))

    def test_hit(self):
        """A session pinned to an up backend is routed to it, with the outcome "hit"."""
        s = self.session(self.a.id)
        self.assertIs(self.group.route(s), self.a)
        self.assertEqual(s.outcome, "hit")

    def test_drainedBackendKeepsPins(self):
        """A draining backend (weight 0) still takes its pinned clients: a hit."""
        self.a.weight = 0
        s = self.session(self.a.id)
        self.assertIs(self.group.route(s), self.a)
        self.assertEqual(s.outcome, "hit")

    def test_downBackendRepins(self):
        """A session pinned to a down backend gets another one, with the outcome "repin"."""
        self.a.up = False
        s = self.session(self.a.id)
        self.assertEqual(self.group.route(s).name, "b")
        self.assertEqual(s.outcome, "repin")

    def test_unknownKeyRepins(self):
        """A pin naming no backend of the group is re-pinned."""
        s = self.session("0123456789abcdef")
        self.group.route(s)
        self.assertEqual(s.outcome, "repin")

    def test_excludedPinRepins(self):
        """A pinned backend that just failed to connect is not tried again."""
        s = self.session(self.a.id)
        self.assertEqual(self.group.route(s, exclude=[self.a]).name, "b")
        self.assertEqual(s.outcome, "repin")

    def test_newAndNone(self):
        """A session without a pin is "new"; without a policy at all, "none"."""
        s = self.session()
        self.group.route(s)
        self.assertEqual(s.outcome, "new")
        s = self.session(policy=None)
        self.group.route(s)
        self.assertEqual(s.outcome, "none")

    def test_updateKeepsObjectsOfKeptNames(self):
        """
        update() keeps the Backend objects of names that stay (with their new address and weight), drops
        removed names, adds new ones, and applies scheduler and retries.
        """
        config = GroupConfig("g", (ServerConfig("a", "10.0.0.9", 81, 5), ServerConfig("c", "10.0.0.3", 80)),
                             scheduler="hash", retries=4)
        self.group.update(config)
        self.assertIs(self.group.get("a"), self.a)
        self.assertEqual((self.a.host, self.a.port, self.a.weight), ("10.0.0.9", 81, 5))
        self.assertEqual([b.name for b in self.group.backends], ["a", "c"])
        self.assertIsNone(self.group.get("b"))
        self.assertEqual((self.group.scheduler.name, self.group.retries), ("hash", 4))


class StrictPolicy:
    """A policy with C{on_failure = "strict"} (route reads only that attribute)."""

    on_failure = "strict"


class StrictRouteTests(SynchronousTestCase):
    """L{BackendGroup.route} with a strict policy (C{on_failure = "strict"})."""

    def setUp(self):
        self.group = BackendGroup("g", [Backend("a", "10.0.0.1", 80), Backend("b", "10.0.0.2", 80)])
        self.a = self.group.get("a")

    def session(self, key=None):
        return Session("10.9.9.9", policy=StrictPolicy(), pinned_key=key)

    def test_downBackendRefusesInsteadOfRepinning(self):
        """A pin to a backend that is down gives no backend and the outcome strict."""
        self.a.up = False
        s = self.session(self.a.id)
        self.assertIsNone(self.group.route(s))
        self.assertEqual(s.outcome, STRICT)

    def test_refusedBackendIsNotReplaced(self):
        """A pinned backend that failed to connect (excluded) is not replaced by another."""
        s = self.session(self.a.id)
        self.assertIsNone(self.group.route(s, exclude=[self.a]))
        self.assertEqual(s.outcome, STRICT)

    def test_drainedBackendStillServesItsPins(self):
        """Weight 0 (drain) keeps serving pinned clients in strict mode too."""
        self.a.weight = 0
        s = self.session(self.a.id)
        self.assertIs(self.group.route(s), self.a)
        self.assertEqual(s.outcome, HIT)

    def test_removedBackendIsRebalanced(self):
        """A pin to a key no backend of the group has (removed from the config) is re-pinned."""
        s = self.session(backend_id("gone"))
        self.assertIsNotNone(self.group.route(s))
        self.assertEqual(s.outcome, REPIN)

    def test_expiredOutcomeKept(self):
        """A policy that found an expired pin (outcome expired, no key) keeps that outcome for a new choice."""
        s = self.session()
        s.outcome = EXPIRED
        self.assertIsNotNone(self.group.route(s))
        self.assertEqual(s.outcome, EXPIRED)


class StrictRefusalTests(SynchronousTestCase):
    """L{strict_refusal}: what listeners ask when no backend was found."""

    def test_hitOfStrictPolicyIsRefusal(self):
        """A strict pin whose backend failed with no retries left becomes the outcome strict."""
        s = Session("10.9.9.9", policy=StrictPolicy(), outcome=HIT)
        self.assertTrue(strict_refusal(s))
        self.assertEqual(s.outcome, STRICT)

    def test_repinPolicyIsNoRefusal(self):
        """Without on_failure = strict, a failed pin is an ordinary failure."""
        s = Session("10.9.9.9", policy=object(), outcome=HIT)
        self.assertFalse(strict_refusal(s))
        self.assertEqual(s.outcome, HIT)

    def test_repinnedClientIsNoRefusal(self):
        """A client already moved (repin) or new is not refused by strict mode."""
        for outcome in (REPIN, NEW):
            s = Session("10.9.9.9", policy=StrictPolicy(), outcome=outcome)
            self.assertFalse(strict_refusal(s))
