"""
Tests of the policy in sticky_header_policy.py, with no sockets: the rig of
L{twisted_slb.testing} runs the balancer and two backends in memory.

Run from this directory::

    python -m twisted.trial test_sticky_header_policy
"""

from twisted.trial.unittest import SynchronousTestCase

from sticky_header_policy import StickyHeader
from twisted_slb.testing import BalancerRig


class StickyHeaderTests(SynchronousTestCase):
    def setUp(self):
        self.rig = BalancerRig(["a", "b", "c"])
        self.rig.serve(StickyHeader(self.rig.proxy, self.rig.group, header=b"x-user-id"))

    def backend_of(self, user, **kwargs):
        return self.rig.get("/", headers={"X-User-Id": user}, **kwargs).backend

    def test_sameUserSameBackend(self):
        """Every request of one user goes to one backend, whatever address it comes from."""
        backends = {self.backend_of("alice", client=f"192.0.2.{i}") for i in range(1, 6)}
        self.assertEqual(len(backends), 1)

    def test_noHeaderIsBalanced(self):
        """A request without the header is balanced as usual (round robin here)."""
        self.assertEqual({self.rig.get("/").backend for _ in range(3)}, {"a", "b", "c"})

    def test_downBackendMovesOnlyItsUsers(self):
        """When a backend goes down its users move; the others keep theirs, and come back when it is up."""
        users = [f"user{i}" for i in range(20)]
        before = {user: self.backend_of(user) for user in users}
        self.rig.backend("a").up = False
        after = {user: self.backend_of(user) for user in users}
        for user in users:
            if before[user] == "a":
                self.assertNotEqual(after[user], "a")
            else:
                self.assertEqual(after[user], before[user])
        self.rig.backend("a").up = True
        self.assertEqual({user: self.backend_of(user) for user in users}, before)

    def test_noCookieSet(self):
        """The header is the pin: no cookie is set."""
        self.assertEqual(self.rig.get("/", headers={"X-User-Id": "bob"}).set_cookies, [])
