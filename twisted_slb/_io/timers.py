"""
Many deadlines behind one timer.

A proxy that arms a timer for each request (a backend has C{request_timeout}
seconds to answer) or each connection (an idle timeout, a connect timeout)
and cancels it soon after pays for Twisted's L{DelayedCall} machinery every
time: an object, a heap insertion, a cancellation, and the reactor's
periodic clean-up of cancelled calls.  Almost none of those timers fire.

L{Deadlines} keeps the pending deadlines in a dictionary, a heap of them
for finding the earliest, and one reactor timer for that earliest.  Adding
a deadline is a dictionary store and a C{heappush}; removing one is a
dictionary removal (its heap entry is dropped later, lazily).  While
requests keep coming, the timer is armed about once per timeout: when it
fires it drops the entries of deadlines already removed, expires what is
due, and sleeps until the earliest deadline still pending.  When the last
pending deadline is removed, the timer is cancelled, so an idle process
leaves nothing scheduled.
"""

from __future__ import annotations

from heapq import heapify, heappop, heappush
from itertools import count
from typing import Callable, Dict, Generic, Hashable, List, Optional, Tuple, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime

_NEVER = float("inf")


_Item = TypeVar("_Item", bound=Hashable)


class Deadlines(Generic[_Item]):
    """
    Pending deadlines, each for an item; C{expired(item)} is called for each
    item whose deadline passes before it is L{discard}ed.

    @ivar pending: the items and their deadlines (in the clock's seconds).
    """

    def __init__(self, clock: IReactorTime, expired: Callable[[_Item], None]) -> None:
        self.clock = clock
        self.expired = expired
        self.pending: Dict[_Item, float] = {}
        # (deadline, tie-breaker, item); entries whose deadline is no
        # longer the item's in `pending` are stale and skipped.
        self._heap: List[Tuple[float, int, _Item]] = []
        self._order = count()
        self._call: Optional[IDelayedCall] = None
        self._due = _NEVER  # when the timer fires

    def add(self, item: _Item, timeout: float) -> None:
        """
        Call C{expired(item)} in C{timeout} seconds unless discarded first;
        an item added again gets the new deadline instead of its old one.
        """
        deadline = self.clock.seconds() + timeout
        self.pending[item] = deadline
        heap = self._heap
        heappush(heap, (deadline, next(self._order), item))
        if len(heap) > 2 * len(self.pending) + 64:
            self._compact()
        if deadline < self._due:
            self._arm(deadline, timeout)

    def discard(self, item: _Item) -> None:
        """
        Forget C{item}'s deadline (if it has one).  With none left, the timer
        stops too.
        """
        pending = self.pending
        pending.pop(item, None)
        if not pending and self._call is not None:
            self._call.cancel()
            self._call = None
            self._due = _NEVER
            self._heap.clear()

    def _compact(self) -> None:
        """Drop the stale heap entries (when they outnumber the live ones)."""
        order = self._order
        self._heap = heap = [(deadline, next(order), item) for item, deadline in self.pending.items()]
        heapify(heap)

    def _arm(self, deadline: float, delay: float) -> None:
        if self._call is not None:
            self._call.cancel()  # only when an earlier deadline comes in
        self._due = deadline
        self._call = self.clock.callLater(max(0.0, delay), self._fire)

    def _fire(self) -> None:
        self._call = None
        self._due = _NEVER
        now = self.clock.seconds()
        heap, pending = self._heap, self.pending
        due = []
        while heap:
            deadline, _, item = heap[0]
            if pending.get(item) != deadline:
                heappop(heap)  # discarded, or added again since
            elif deadline <= now:
                heappop(heap)
                del pending[item]
                due.append(item)
            else:
                self._arm(deadline, deadline - now)
                break
        for item in due:
            self.expired(item)
