"""
Many deadlines behind one timer.

A proxy that arms a timer for each request (a backend has C{request_timeout}
seconds to answer) and cancels it when the answer comes pays for Twisted's
L{DelayedCall} machinery on every request: an object, a heap insertion, a
cancellation, and the reactor's periodic clean-up of cancelled calls.  Almost
none of those timers ever fire.

L{Deadlines} keeps the pending deadlines in a dictionary and one reactor
timer for the earliest of them.  Adding a deadline is a dictionary store
(when it is not earlier than the timer, which with one timeout for all is
always), removing one is a dictionary removal.  While requests keep
coming, the timer is armed once per timeout, finds nothing due, and sleeps
until the earliest deadline still pending; when the last pending deadline
is removed, the timer is cancelled.
"""

from __future__ import annotations

from typing import Callable, Dict, Hashable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime

_NEVER = float("inf")


class Deadlines:
    """
    Pending deadlines, each for an item; C{expired(item)} is called for each
    item whose deadline passes before it is L{discard}ed.

    @ivar pending: the items and their deadlines (in the clock's seconds).
    """

    def __init__(self, clock: IReactorTime, expired: Callable[[Hashable], None]) -> None:
        self.clock = clock
        self.expired = expired
        self.pending: Dict[Hashable, float] = {}
        self._call: Optional[IDelayedCall] = None
        self._due = _NEVER  # when the timer fires

    def add(self, item: Hashable, timeout: float) -> None:
        """Call C{expired(item)} in C{timeout} seconds unless discarded first."""
        deadline = self.clock.seconds() + timeout
        self.pending[item] = deadline
        if deadline < self._due:
            self._arm(deadline, timeout)

    def discard(self, item: Hashable) -> None:
        """
        Forget C{item}'s deadline (if it has one).  With none left, the timer
        stops too: nothing stays scheduled in the reactor for nothing.
        """
        pending = self.pending
        pending.pop(item, None)
        if not pending and self._call is not None:
            self._call.cancel()
            self._call = None
            self._due = _NEVER

    def _arm(self, deadline: float, delay: float) -> None:
        if self._call is not None:
            self._call.cancel()  # only when an earlier deadline comes in
        self._due = deadline
        self._call = self.clock.callLater(max(0.0, delay), self._fire)

    def _fire(self) -> None:
        self._call = None
        self._due = _NEVER
        now = self.clock.seconds()
        pending = self.pending
        due = [item for item, deadline in pending.items() if deadline <= now]
        for item in due:
            del pending[item]
        if pending:
            earliest = min(pending.values())
            self._arm(earliest, earliest - now)
        for item in due:
            self.expired(item)
