"""
Small, fixed socket buffers for the tests that need a full one.

Linux sizes TCP buffers itself, and on loopback they grow large: with
C{net.ipv4.tcp_wmem} at C{4096 16384 4194304} and C{tcp_rmem} up to 32 MB (as on
the machines this project runs on) one socket took 4,194,976 bytes before
C{send()} said C{EAGAIN}, and how much it takes depends on the kernel's settings
and on timing. A test that needs "the socket does not take it all" (a full
buffer, a paused producer, a slow reader) must not depend on that: it sets the
sizes itself. C{SO_RCVBUF} fixes the window a socket offers, so it is set before
C{connect()} or C{listen()} (an accepted socket inherits the listener's);
C{SO_SNDBUF} can be set at any time. Setting either turns the kernel's
auto-tuning off for that socket, so the sizes hold for the whole test.
"""

from __future__ import annotations

import socket
from typing import Tuple

#: Bytes asked for each buffer; the kernel doubles it for its own bookkeeping.
SMALL = 16384


def shrink(sock: socket.socket, size: int = SMALL) -> socket.socket:
    """Give C{sock} small send and receive buffers; return it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return sock


def small_tcp_pair(size: int = SMALL) -> Tuple[socket.socket, socket.socket]:
    """
    A connected pair of TCP sockets on 127.0.0.1, both with small buffers
    set before the connection exists.

    @return: C{(accepted, connecting)}, both blocking.
    """
    server = shrink(socket.socket(), size)
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        peer = shrink(socket.socket(), size)
        peer.connect(server.getsockname())
        accepted, _ = server.accept()
    finally:
        server.close()
    shrink(accepted, size)
    return accepted, peer


def small_unix_pair(size: int = SMALL) -> Tuple[socket.socket, socket.socket]:
    """A connected pair of UNIX stream sockets with small buffers."""
    ours, peer = socket.socketpair()
    shrink(ours, size)
    shrink(peer, size)
    return ours, peer
