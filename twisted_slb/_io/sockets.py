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

import socket

from twisted.internet import tcp

from twisted_slb._io.twisted_private import tcp_is_idle_for_writing, tcp_shutdown_write_now, tcp_write_disconnecting


def port_family(port) -> int:
    """The address family of a listening port's socket (passed with its descriptor)."""
    host = port.getHost()
    if getattr(host, "type", None) is None:  # UNIXAddress
        return socket.AF_UNIX
    return socket.AF_INET6 if ":" in host.host else socket.AF_INET


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


def _flushed(transport) -> bool:
    """
    L{tcp_is_idle_for_writing<twisted_slb._io.twisted_private.tcp_is_idle_for_writing>},
    and no producer that its next write event would resume: the state in which Twisted's next write event would only finish a close.
    """
    return tcp_is_idle_for_writing(transport) and (
        transport.producer is None or (transport.streamingProducer and not transport.producerPaused)
    )


def half_close(transport) -> None:
    """
    Shut down the sending side of C{transport} (C{loseWriteConnection}),
    or close it when it cannot half-close.

    Twisted shuts the socket down on the next write event; with nothing
    buffered this does at once what that event would do (C{shutdown}, then
    the protocol's C{writeConnectionLost}), saving two C{epoll_ctl} calls
    and a reactor event per connection.  It sets the same private state
    (C{_writeDisconnecting}, C{_writeDisconnected}) and calls the same
    private method (C{_closeWriteConnection}) as
    C{twisted.internet.abstract.FileDescriptor.doWrite}, through
    L{twisted_slb._io.twisted_private}.
    """
    if isinstance(transport, tcp.Connection) and _flushed(transport):
        tcp_shutdown_write_now(transport)
        return
    lose_write = getattr(transport, "loseWriteConnection", None)
    if lose_write is None:
        transport.loseConnection()
    else:
        lose_write()


def close(transport) -> None:
    """
    C{transport.loseConnection()}, at once when nothing is left to send:
    once the sending side is shut down (L{half_close}), Twisted's
    C{loseConnection} closes on the spot instead of on the next write
    event.
    """
    if isinstance(transport, tcp.Connection) and _flushed(transport):
        half_close(transport)
    transport.loseConnection()


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
    C{_writeDisconnecting}, C{socket}): Twisted has no public "send now"
    API.  They have been stable since Twisted 8 (read through
    L{twisted_slb._io.twisted_private}); when anything differs this falls
    back to C{transport.write} rather than guess.
    """
    if tcp_is_idle_for_writing(transport) and not tcp_write_disconnecting(transport):
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
