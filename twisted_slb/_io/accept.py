"""
What a listener does when the process runs out of file descriptors.

When C{accept()} fails with C{EMFILE} (the process is at its
C{ulimit -n}), Twisted's TCP port frees a descriptor it keeps in reserve,
accepts every pending connection and closes it at once, then takes the
reserve back; it logs one line per closed connection, and starts over the
next time the listening socket is readable.  Under a flood that is a log line
per refused client.  Without the reserve (it could not be taken back), it
logs "Could not accept new connection" and leaves the client pending, so the
reactor calls it again at once: a busy loop, with a log line per turn.

L{AcceptGuard} makes that one warning per episode and a pause: the port
stops accepting for C{backoff} seconds at a time (new clients wait in the
listen backlog instead of being accepted and closed at once; those still
there when a pause ends with no descriptor free are closed), and when a
connection is accepted again one line says so, with how many were closed
meanwhile.
HAProxy and nginx also pause their listeners on C{EMFILE}.

Listening ports are paused for more than one reason (this, and a full
C{max_connections} with C{over_limit = "wait"}): L{pause_port} and
L{resume_port} keep the reasons apart so that one never resumes a port
another still holds.
"""

from __future__ import annotations

from errno import errorcode
from typing import Dict, Set
from weakref import WeakKeyDictionary

from twisted.logger import Logger, globalLogPublisher

from twisted_slb._io.twisted_private import ACCEPT_RESOURCE_ERRORS, watch_port

log = Logger(namespace="twisted_slb._io.accept")

_pauses: "WeakKeyDictionary[object, Set[object]]" = WeakKeyDictionary()


def _listening(port) -> bool:
    return bool(getattr(port, "connected", True)) and not getattr(port, "disconnecting", False)


def pause_port(port, reason: object) -> None:
    """Stop accepting on C{port} for C{reason} (until L{resume_port})."""
    reasons = _pauses.setdefault(port, set())
    if not reasons and _listening(port):
        # tcp.Port is a FileDescriptor: stopReading stops accept() without
        # closing the socket (IListeningPort has no pause of its own).
        port.stopReading()
    reasons.add(reason)


def resume_port(port, reason: object) -> None:
    """C{reason} no longer holds C{port}; it accepts again if nothing else does."""
    reasons = _pauses.get(port)
    if not reasons or reason not in reasons:
        return
    reasons.discard(reason)
    if not reasons and _listening(port):
        port.startReading()


class AcceptGuard:
    """
    Watches one listening port's accepts (see the module docstring).

    Out of descriptors is told by the errno of the listening socket's
    C{accept} (L{ACCEPT_RESOURCE_ERRORS}), not by the text of Twisted's log
    lines: the port is watched through
    L{twisted_slb._io.twisted_private.watch_port}, which also hands the
    guard the port's own log events (its accept loop's).  While an episode
    lasts they are dropped (they say, one line per closed client, what the
    warning says once); otherwise they reach the global log unchanged.

    @ivar episode: whether the port is out of descriptors now (since the
        last connection it accepted).
    @ivar closed: connections Twisted accepted and closed in this episode.
    """

    def __init__(self, port, listener_name: str, reactor, backoff: float = 0.5) -> None:
        self.port = port
        self.listener_name = listener_name
        self.reactor = reactor
        self.backoff = backoff
        self.episode = False
        self.closed = 0
        # accept() failed for lack of resources in this run of the port's
        # accept loop: what it accepts next, Twisted closes at once.
        self._recovering = False
        # the last socket accept was counted in closed (until it is served)
        self._counted = False
        self._resume_call = None
        self.watching = watch_port(port, self)

    def __call__(self, event: Dict) -> None:
        """The port's log events: dropped while out of descriptors, passed on otherwise."""
        if not self.episode:
            globalLogPublisher(event)

    def accept_failed(self, errno: int) -> None:
        """The listening socket's C{accept} failed with C{errno}."""
        self._counted = False
        if errno in ACCEPT_RESOURCE_ERRORS:
            self._recovering = True
            self._out_of_descriptors(errno)
        else:  # EAGAIN: nothing more pending, the accept loop ends
            self._recovering = False

    def socket_accepted(self) -> None:
        """The listening socket accepted a connection."""
        self._counted = self._recovering
        if self._recovering:
            self.closed += 1

    def _out_of_descriptors(self, errno: int) -> None:
        if not self.episode:
            self.episode = True
            self.closed = 0
            log.warn(
                "listener {listener}: cannot accept ({error}: out of file descriptors, see ulimit -n); "
                "connections that cannot be served are closed, and accepting pauses for {backoff} s at a time",
                listener=self.listener_name, error=errorcode.get(errno, str(errno)), backoff=self.backoff,
            )
        if self._resume_call is None:
            pause_port(self.port, self)
            self._resume_call = self.reactor.callLater(self.backoff, self._resume)

    def _resume(self) -> None:
        self._resume_call = None
        resume_port(self.port, self)

    def accepted(self) -> None:
        """The port accepted a connection and serves it: an episode, if any, is over."""
        self._recovering = False
        if self._counted:  # served, not closed
            self._counted = False
            self.closed -= 1
        if self.episode:
            self.episode = False
            log.info(
                "listener {listener}: accepting connections again ({closed} closed while out of file descriptors)",
                listener=self.listener_name, closed=self.closed,
            )

    def stop(self) -> None:
        """The port is closing: cancel a pending resume."""
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        self._resume_call = None
