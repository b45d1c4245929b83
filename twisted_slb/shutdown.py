"""
Graceful shutdown: waiting for a listener's open connections to end.
"""

from __future__ import annotations

from typing import Callable, List

from twisted.internet.defer import Deferred, succeed


class IdleTracker:
    """
    Tells waiters when a factory has no open connection left.

    The factory calls L{idle} when its last connection ends; L{wait} gives a
    L{Deferred} that fires then, or after a grace period once C{force} has
    closed what was left.
    """

    def __init__(self) -> None:
        self._waiters: List[Deferred] = []

    def idle(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def wait(self, already_idle: bool, grace: float, force: Callable[[], None], clock) -> Deferred:
        """
        @param already_idle: whether there is no open connection now.
        @param grace: seconds to wait before calling C{force}.
        @param force: closes every open connection (their ends then call
            L{idle}).
        @param clock: an L{IReactorTime}.
        """
        if already_idle:
            return succeed(None)
        d: Deferred = Deferred()
        self._waiters.append(d)
        call = clock.callLater(grace, force)

        def done(result):
            if call.active():
                call.cancel()
            return result

        return d.addBoth(done)
