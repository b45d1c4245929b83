"""
Small helpers around Twisted's TCP transports, shared by the relays.

L{write_now} is the one that matters for speed: Twisted's
C{transport.write} never sends at once; it appends to a buffer, asks the
reactor to watch the socket for writability, and sends on the reactor's
next turn, then stops watching.  For a relay that forwards one small chunk
per event, that is two C{epoll_ctl} calls and one more reactor event for
every chunk, about half of the relay's cost.  L{write_now} sends at once
when nothing is waiting in the transport's buffer, and leaves the rest
(and every other case) to C{transport.write}.
"""

from __future__ import annotations

from twisted.internet import tcp


def set_nodelay(transport) -> None:
    """
    Turn Nagle's algorithm off: a proxy writes a response head and its body
    (or a request and its body) in separate small writes, and Nagle would
    hold the second until the peer's delayed ACK, adding up to 40 ms.
    """
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is None:
        # Under TLS the TCP transport is one level down.
        setter = getattr(getattr(transport, "transport", None), "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:  # not a TCP socket after all (e.g. a UNIX socket)
            pass


def write_now(transport, data: bytes) -> None:
    """
    Write C{data} to C{transport}, sending it on the spot when the
    transport is a plain TCP connection with nothing buffered; what the
    socket does not take (and any write to another kind of transport) goes
    through C{transport.write} as usual, so ordering, back-pressure
    (C{pauseProducing} of a registered producer), half-close and error
    handling stay Twisted's.

    This reads attributes of L{twisted.internet.tcp.Connection} that are
    not part of a documented interface (C{dataBuffer}, C{_tempDataBuffer},
    C{_writeDisconnecting}, C{socket}): Twisted has no public "send now" API.  They have been
    stable since Twisted 8; the checks below fall back to
    C{transport.write} rather than guess when anything differs.
    """
    if (
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and not getattr(transport, "TLS", False)
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # EAGAIN: the socket is full; anything else (a reset): let
            # Twisted's own write path meet the error and close cleanly.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
