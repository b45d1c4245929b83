"""
Connection limits shared by the TCP and HTTP listeners.
"""

from __future__ import annotations

from twisted.logger import Logger

log = Logger(namespace="twisted_slb.limits")


class ConnectionLimit:
    """
    C{max_connections} of one listener: says whether a new connection may
    be served, and logs when the limit starts and stops refusing (once, not
    for every refused client).

    @ivar limit: the most connections open at once; 0 for no limit.
    """

    def __init__(self, limit: int, listener_name: str) -> None:
        self.limit = limit
        self.listener_name = listener_name
        self.refusing = False

    def admit(self, open_now: int) -> bool:
        """Whether one more connection, with C{open_now} open, is allowed."""
        if self.limit and open_now >= self.limit:
            if not self.refusing:
                self.refusing = True
                log.warn(
                    "listener {listener}: {limit} connections open (max_connections): refusing new ones",
                    listener=self.listener_name, limit=self.limit,
                )
            return False
        if self.refusing:
            self.refusing = False
            log.info("listener {listener}: accepting connections again", listener=self.listener_name)
        return True
