"""
Connection limits shared by the TCP and HTTP listeners: each listener's
C{max_connections}, and the configuration's global C{max_connections} over
all of them.

What happens to a connection over a limit is the listener's C{over_limit}:

 - C{"wait"} (the default, as HAProxy's C{maxconn}): the listener stops
   accepting while the limit is reached, so new connections wait in the
   kernel's listen backlog (C{backlog=} in the bind string) and are served
   as soon as a slot frees.  Twisted accepts connections in batches; one
   already accepted past the limit when the batch ran is closed at once.
 - C{"close"}: connections keep being accepted and those over the limit are
   closed at once.

Either way the condition is logged once when it starts and once when it
ends, never once per connection.
"""

from __future__ import annotations

from typing import Dict, Optional, Set

from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from twisted_slb._io.accept import pause_port, resume_port

log = Logger(namespace="twisted_slb.limits")

#: What a listener does with connections over its limits.
OVER_LIMIT = ("wait", "close")


class ConnectionLimit:
    """
    The open-connection count and limit of one listener (or, as the
    C{parent} of listeners' limits, of all of them).

    A listener's factory calls L{admit} for each new connection and
    L{release} when an admitted one closes; the listener registers its
    listening port in L{ports} so that a C{"wait"} limit can stop and restart
    accepting.

    @ivar limit: the most connections open at once; 0 for no limit.
    @ivar open: connections admitted and not yet released.
    @ivar wait: whether a full limit stops accepting (C{over_limit = "wait"})
        rather than closing new connections.
    @ivar parent: the global limit this one also counts against, or L{None}.
    @ivar ports: listening ports paused while this listener is full.
    """

    def __init__(self, limit: int = 0, listener_name: str = "", wait: bool = False,
                 parent: Optional[ConnectionLimit] = None) -> None:
        self.limit = limit
        self.listener_name = listener_name
        self.wait = wait
        self.parent = parent
        self.open = 0
        self.refusing = False
        self.paused = False
        self.ports: Set[object] = set()
        self.children: Set[ConnectionLimit] = set()
        if parent is not None:
            parent.children.add(self)

    def full(self) -> bool:
        """Whether this limit alone is reached."""
        return bool(self.limit) and self.open >= self.limit

    def blocked(self) -> bool:
        """Whether a new connection would be over this limit or the global one."""
        return self.full() or (self.parent is not None and self.parent.full())

    def admit(self) -> bool:
        """
        Count one more connection if the limits allow it.

        @return: whether the connection may be served; when L{False} it must
            be closed (and not released).
        """
        if self.blocked():
            self._log_full()
            return False
        self.open += 1
        if self.parent is not None:
            self.parent.open += 1
        self._update()
        return True

    def release(self) -> None:
        """An admitted connection closed."""
        self.open -= 1
        if self.parent is not None:
            self.parent.open -= 1
        self._update()

    def configure(self, limit: int, wait: bool) -> None:
        """Apply a reloaded configuration; the count carries over."""
        self.limit = limit
        self.wait = wait
        self._update()
        for child in list(self.children):
            child._apply()

    def add_port(self, port) -> None:
        """Pause C{port} while this listener is full (in C{"wait"} mode)."""
        self.ports.add(port)
        if self.paused:
            pause_port(port, self)
        self._update()

    def remove_port(self, port) -> None:
        self.ports.discard(port)
        resume_port(port, self)

    def _update(self) -> None:
        """Pause or resume accepting on the listeners whose state changed."""
        parent = self.parent
        if not self.limit and not self.paused and not self.refusing and (parent is None or not parent.limit):
            return  # no limit to reach or leave (the common case: one check per connection)
        if parent is not None and parent.limit:
            for sibling in list(parent.children):
                sibling._apply()
        else:
            self._apply()

    def _log_full(self) -> None:
        """Log, once until the limit is left, that it was reached."""
        if self.refusing:
            return
        self.refusing = True
        which = self if self.full() else self.parent
        log.warn(
            "listener {listener}: {open} connections open ({scope} max_connections {limit}): {action}",
            listener=self.listener_name, open=which.open, limit=which.limit,
            scope="the listener's" if which is self else "the global",
            action="new connections wait" if self.wait else "closing new connections",
        )

    def _apply(self) -> None:
        blocked = self.blocked()
        pause = self.wait and blocked
        if pause != self.paused:
            self.paused = pause
            for port in list(self.ports):
                if pause:
                    pause_port(port, self)
                else:
                    resume_port(port, self)
        if pause:
            self._log_full()
        if self.refusing and not blocked:
            self.refusing = False
            log.info("listener {listener}: accepting connections again", listener=self.listener_name)


class ClientAddressLimit:
    """
    C{max_connections_per_ip} of an HTTP listener: open connections per
    client address.  A client over it gets L{TooManyConnections} (429).

    @ivar limit: connections per address; 0 for no limit.
    @ivar open: open connections by address (only addresses with some).
    """

    def __init__(self, limit: int, listener_name: str) -> None:
        self.limit = limit
        self.listener_name = listener_name
        self.open: Dict[str, int] = {}

    def allows(self, ip: Optional[str]) -> bool:
        """Whether C{ip} may open one more connection (logged when not)."""
        if not self.limit or ip is None or self.open.get(ip, 0) < self.limit:
            return True
        log.info("listener {listener}: client {client} over max_connections_per_ip ({limit}): 429",
                 listener=self.listener_name, client=ip, limit=self.limit)
        return False

    def add(self, ip: Optional[str]) -> Optional[str]:
        """Count a connection of C{ip}; returns the key to L{release}, or L{None} if not counted."""
        if not self.limit or ip is None:
            return None
        self.open[ip] = self.open.get(ip, 0) + 1
        return ip

    def release(self, ip: Optional[str]) -> None:
        if ip is None:
            return
        n = self.open.get(ip, 0) - 1
        if n > 0:
            self.open[ip] = n
        else:
            self.open.pop(ip, None)


class TooManyConnections(Protocol):
    """Answers 429 to a client over its connection limit, and closes."""

    def connectionMade(self) -> None:
        body = b"429 Too Many Requests: too many connections from your address\n"
        self.transport.write(
            b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.loseConnection()
