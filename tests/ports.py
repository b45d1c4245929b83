"""
A loopback port that refuses connections, for the tests that need one.

Closing a listening port and using its number afterwards is a race: with
C{trial --jobs 2}, another test process (or this one) can be given the same
ephemeral port in between, and the "refused" connection is answered.  A
socket that is bound but never listens holds the number for the whole test,
and the kernel answers every connection to it with a reset (ECONNREFUSED).
"""

from __future__ import annotations

import socket


def refusing_port(case) -> int:
    """
    A port on 127.0.0.1 that refuses connections until C{case} ends.

    @param case: the test case; the socket is closed in its cleanup.
    """
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    case.addCleanup(holder.close)
    return holder.getsockname()[1]
