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

L{ConnectionAdmission} (L{IConnectionAdmission}) puts the limits together
with the count of open connections and the drain on stop: the one
component the TCP relay's factory, the listeners' HTTP server and
L{twisted_slb.web.site.BalancerSite} all use, in the spirit of
C{twisted.protocols.policies}' C{LimitConnectionsByPeer} and
C{LimitTotalConnectionsFactory} (composed rather than wrapped: a wrapping
protocol would add a call to every read and write).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Set

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from twisted_slb._io.accept import pause_port, resume_port
from twisted_slb._reactor import maybe_global_reactor
from twisted_slb._typing import IStreamTransport
from twisted_slb.shutdown import IdleTracker

log = Logger(namespace="twisted_slb.limits")

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
        # Refusing and not full itself: its parent (the global limit) is.
        assert which is not None
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

    # Connected before any method below runs (see twisted_slb._typing).
    transport: IStreamTransport

    def connectionMade(self) -> None:
        body = b"429 Too Many Requests: too many connections from your address\n"
        self.transport.write(
            b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.loseConnection()


class IConnectionAdmission(Interface):
    """
    Admission and drain of one listener factory's connections: the
    listener's C{max_connections} (and the global one), its
    C{max_connections_per_ip}, the set of open connections, and a graceful
    drain when the listener stops.

    A factory's C{buildProtocol} asks L{build}; a connection is L{add}ed
    once connected, its places in the limits are L{release}d when its
    client's connection closes, and it is L{forget}ten once the factory is
    done with it (for an HTTP connection, the same moment: L{remove}).
    """

    limit = Attribute("The L{ConnectionLimit} new connections count against.")
    per_ip = Attribute("The L{ClientAddressLimit} of client addresses.")
    connections = Attribute("The set of open connections (a drain waits for them).")

    def build(ip, make, *args):
        """
        Admit a new connection from C{ip} if the limits allow it.

        @param ip: the client's address, or L{None} when it must not be
            limited per address.
        @param make: called with C{args} to build the protocol of an
            admitted connection.
        @return: what C{buildProtocol} returns: the protocol C{make} built
            (its C{client_ip} set to the key L{release} takes), L{None}
            over C{max_connections} (the port closes the connection at
            once), or a protocol answering 429 over
            C{max_connections_per_ip}.
        """

    def add(connection):
        """C{connection} is open: a drain waits for it."""

    def release(ip=None):
        """An admitted connection's client closed: its places in the limits are free."""

    def forget(connection):
        """The factory is done with C{connection}: a drain waiting for the last one ends."""

    def remove(connection, ip=None):
        """L{release} and L{forget} at once."""

    def drain(grace, abort):
        """
        Wait for the open connections to end, for at most C{grace}
        seconds, then call C{abort(connection)} for each one left.

        @return: a L{Deferred} that fires when no connection is left.
        """


class IListenerFactory(Interface):
    """
    The factory of a listener (under its TLS or PROXY protocol wrappers, if
    any), as L{twisted_slb.service.ListenerService} drives it.
    """

    admission = Attribute("The L{IConnectionAdmission} of its connections.")

    def drain(grace):
        """
        Graceful shutdown, after the port stopped listening: let open
        connections finish, for at most C{grace} seconds, then close the
        rest.

        @return: a L{Deferred} that fires when no connection is left.
        """

    def retire(grace):
        """
        A reload replaced this factory (its open connections carry on):
        tell those that would otherwise stay open indefinitely to move on
        (HTTP/2 connections get GOAWAY), closing them after C{grace}
        seconds; nothing for others.
        """


@implementer(IConnectionAdmission)
class ConnectionAdmission:
    """
    The L{IConnectionAdmission} of a listener factory.

    @ivar limit: the L{ConnectionLimit} (shared with the global limit and
        kept across reloads by L{twisted_slb.service.BalancerService}).
    @ivar per_ip: the L{ClientAddressLimit} (per factory).
    @ivar connections: the open connections.
    """

    def __init__(self, limit: ConnectionLimit, per_ip: Optional[ClientAddressLimit] = None, reactor=None) -> None:
        """
        @param limit: the listener's L{ConnectionLimit}.
        @param per_ip: its L{ClientAddressLimit}; by default none (a TCP
            relay's clients are not limited per address).
        @param reactor: the L{IReactorTime} of the drain's grace period.
        """
        reactor = maybe_global_reactor(reactor)
        self.limit = limit
        self.per_ip = per_ip if per_ip is not None else ClientAddressLimit(0, limit.listener_name)
        self.reactor = reactor
        self.connections: set = set()
        self._tracker = IdleTracker()

    def build(self, ip: Optional[str], make: Callable[..., Any], *args) -> Optional[Protocol]:
        per_ip = self.per_ip
        if not per_ip.allows(ip):
            return TooManyConnections()
        if not self.limit.admit():
            return None
        connection = make(*args)
        if per_ip.limit:
            connection.client_ip = per_ip.add(ip)
        return connection

    def add(self, connection) -> None:
        self.connections.add(connection)

    def release(self, ip: Optional[str] = None) -> None:
        self.limit.release()
        self.per_ip.release(ip)

    def forget(self, connection) -> None:
        connections = self.connections
        connections.discard(connection)
        if not connections:
            self._tracker.idle()

    def remove(self, connection, ip: Optional[str] = None) -> None:
        self.release(ip)
        self.forget(connection)

    def drain(self, grace: float, abort: Callable[[object], None]) -> Deferred:
        def force() -> None:
            for connection in list(self.connections):
                abort(connection)

        return self._tracker.wait(not self.connections, grace, force, self.reactor)
