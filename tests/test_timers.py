"""
Tests for L{twisted_slb._io.timers.Deadlines}: many deadlines, one reactor timer.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_slb._io.timers import Deadlines


class DeadlinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.expired = []
        self.deadlines = Deadlines(self.clock, self.expired.append)

    def test_expiresAfterItsTimeout(self) -> None:
        """An item expires exactly at its timeout, and leaves nothing pending."""
        self.deadlines.add("a", 10)
        self.clock.advance(9.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, ["a"])
        self.assertEqual(self.deadlines.pending, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_discardedNeverExpires(self) -> None:
        """A discarded item never expires; the others still do."""
        self.deadlines.add("a", 10)
        self.deadlines.add("b", 10)
        self.deadlines.discard("a")
        self.clock.advance(10)
        self.assertEqual(self.expired, ["b"])

    def test_discardingAnUnknownItemIsHarmless(self) -> None:
        """Discarding an item never added does nothing and sets no timer."""
        self.deadlines.discard("nothing")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_oneTimerForManyDeadlines(self) -> None:
        """Deadlines added later than the armed timer schedule nothing more."""
        for i in range(100):
            self.deadlines.add(i, 10)
            self.clock.advance(0.05)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_rearmsForWhatIsStillPending(self) -> None:
        """When the timer fires, it expires what is due and sleeps until the earliest deadline left."""
        self.deadlines.add("a", 10)
        self.clock.advance(4)
        self.deadlines.add("b", 10)  # due at 14
        self.clock.advance(6)
        self.assertEqual(self.expired, ["a"])
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 14)
        self.clock.advance(4)
        self.assertEqual(self.expired, ["a", "b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_anEarlierDeadlineRearms(self) -> None:
        """An item due earlier than the others moves the one timer earlier; the later one still expires on time."""
        self.deadlines.add("slow", 60)
        self.deadlines.add("fast", 5)
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 5)
        self.clock.advance(5)
        self.assertEqual(self.expired, ["fast"])
        self.clock.advance(55)
        self.assertEqual(self.expired, ["fast", "slow"])

    def test_discardingTheLastStopsTheTimer(self) -> None:
        """Nothing stays scheduled in the reactor once no deadline is pending."""
        self.deadlines.add("a", 10)
        self.deadlines.add("b", 10)
        self.deadlines.discard("a")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.deadlines.discard("b")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.deadlines.add("c", 10)
        self.clock.advance(10)
        self.assertEqual(self.expired, ["c"])

    def test_addingAgainMovesTheDeadline(self) -> None:
        """Adding an item again moves its deadline."""
        self.deadlines.add("a", 10)
        self.clock.advance(5)
        self.deadlines.add("a", 10)  # now due at 15
        self.clock.advance(5)
        self.assertEqual(self.expired, [])
        self.clock.advance(5)
        self.assertEqual(self.expired, ["a"])

    def test_expiryMayAddDeadlines(self) -> None:
        """What an expiry does (a retry on another backend) may set a new deadline."""
        deadlines = Deadlines(self.clock, lambda item: self.expired.append(item) or (
            item == "first" and deadlines.add("retry", 10)))
        deadlines.add("first", 10)
        self.clock.advance(10)
        self.assertEqual(deadlines.pending, {"retry": 20})
        self.clock.advance(10)
        self.assertEqual(self.expired, ["first", "retry"])

    def test_staleEntriesDoNotAccumulate(self) -> None:
        """Deadlines added and discarded by the thousand leave a small heap behind."""
        self.deadlines.add("long", 1000)
        for i in range(10000):
            self.deadlines.add(i, 10)
            self.deadlines.discard(i)
        self.assertLess(len(self.deadlines._heap), 100)
        self.assertEqual(self.deadlines.pending, {"long": 1000})
        self.clock.advance(1000)
        self.assertEqual(self.expired, ["long"])

    def test_firesOncePerLiveDeadline(self) -> None:
        """
        The timer skips the deadlines discarded since it was armed: it wakes
        for the earliest one still pending, not for each one that was ever
        set.
        """
        self.deadlines.add("a", 10)  # the timer is armed for 10
        for i in range(100):
            self.deadlines.add(i, 10)
            self.clock.advance(0.01)
            if i != 50:
                self.deadlines.discard(i)
        self.deadlines.discard("a")
        fired = []
        original = self.deadlines._fire
        self.deadlines._fire = lambda: fired.append(self.clock.seconds()) or original()
        self.deadlines._call.func = self.deadlines._fire  # the timer already armed
        self.clock.pump([1] * 20)
        self.assertEqual(self.expired, [50])
        self.assertEqual(fired, [10, 11])  # at 10 nothing is due: it sleeps until 10.5 (pumped at 11)
